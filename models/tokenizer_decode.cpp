// Decoding: ids -> token strings -> the decoder chain (decoders/*.rs of the `tokenizers` library).
// Each decoder maps a list of token strings to a new list (decode_chain); the final list is joined.
#include "models/tokenizer_impl.h"
#include "runtime/error.h"

namespace omniq::tok {

namespace {

using Tokens = std::vector<std::string>;

void replace_in_each(Tokens& toks, const std::string& pattern, const std::string& content) {
  if (pattern.empty()) return;
  for (std::string& t : toks) {
    std::string out;
    size_t pos = 0;
    for (size_t hit; (hit = t.find(pattern, pos)) != std::string::npos; pos = hit + pattern.size()) {
      out.append(t, pos, hit - pos);
      out += content;
    }
    out.append(t, pos, std::string::npos);
    t.swap(out);
  }
}

// byte_fallback.rs: runs of "<0xXX>" tokens become the string of their bytes when that is valid
// UTF-8, else one U+FFFD per byte.
int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}
int byte_token_value(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  int hi = hex_digit(t[3]), lo = hex_digit(t[4]);
  if (t[3] == '+' && lo >= 0) return lo;  // u8::from_str_radix accepts a leading '+'
  return (hi >= 0 && lo >= 0) ? hi * 16 + lo : -1;
}
Tokens byte_fallback(const Tokens& toks) {
  Tokens out;
  std::string bytes;
  auto flush = [&] {
    if (bytes.empty()) return;
    if (utf8_find_invalid(bytes) == std::string::npos) {
      out.push_back(bytes);
    } else {
      for (size_t k = 0; k < bytes.size(); ++k) out.push_back("\xEF\xBF\xBD");
    }
    bytes.clear();
  };
  for (const std::string& t : toks) {
    int b = byte_token_value(t);
    if (b >= 0) {
      bytes += char(b);
    } else {
      flush();
      out.push_back(t);
    }
  }
  flush();
  return out;
}

Tokens fuse(const Tokens& toks) {
  std::string all;
  for (const std::string& t : toks) all += t;
  return Tokens{all};
}

// strip.rs: remove up to `start` leading and `stop` trailing occurrences of one char per token.
Tokens strip(const Tokens& toks, uint32_t ch, size_t n_start, size_t n_stop) {
  Tokens out;
  for (const std::string& t : toks) {
    std::vector<size_t> offs;  // char start offsets, then t.size()
    std::vector<uint32_t> cps;
    for (size_t i = 0; i < t.size();) {
      offs.push_back(i);
      cps.push_back(utf8_next(t, i));
    }
    offs.push_back(t.size());
    size_t a = 0, b = cps.size();
    for (size_t i = 0; i < n_start && i < cps.size() && cps[i] == ch; ++i) a = i + 1;
    for (size_t i = 0; i < n_stop && i < cps.size() && cps[cps.size() - 1 - i] == ch; ++i) b = cps.size() - 1 - i;
    out.push_back(a < b ? t.substr(offs[a], offs[b] - offs[a]) : std::string());
  }
  return out;
}

// byte_level.rs (decoder): every char of a token back to its byte (a token with any char outside
// the byte map is taken as its raw UTF-8), all tokens concatenated, then lossy UTF-8.
Tokens byte_level(const Tokens& toks) {
  std::string bytes;
  for (const std::string& t : toks) {
    std::string mine;
    bool ok = true;
    for (size_t i = 0; i < t.size() && ok;) {
      int b = byte_level_byte(utf8_next(t, i));
      if (b < 0)
        ok = false;
      else
        mine += char(b);
    }
    bytes += ok ? mine : t;
  }
  return Tokens{utf8_lossy(bytes)};
}

// metaspace.rs (decoder): the replacement char becomes ' ', except in the first token where it is
// dropped unless the prepend scheme is "never".
Tokens metaspace(const Tokens& toks, const std::string& rep, PrependScheme scheme) {
  Tokens out;
  for (size_t k = 0; k < toks.size(); ++k) {
    std::string s;
    const std::string& t = toks[k];
    for (size_t pos = 0;;) {
      size_t hit = t.find(rep, pos);
      s.append(t, pos, hit == std::string::npos ? std::string::npos : hit - pos);
      if (hit == std::string::npos) break;
      if (!(k == 0 && scheme != PrependScheme::kNever)) s += ' ';
      pos = hit + rep.size();
    }
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace

std::string run_decoders(const std::vector<DecoderStep>& steps, std::vector<std::string> tokens) {
  for (const DecoderStep& st : steps) {
    switch (st.kind) {
      case DecoderStep::kReplace: replace_in_each(tokens, st.pattern, st.content); break;
      case DecoderStep::kByteFallback: tokens = byte_fallback(tokens); break;
      case DecoderStep::kFuse: tokens = fuse(tokens); break;
      case DecoderStep::kStrip: tokens = strip(tokens, st.strip_char, st.strip_start, st.strip_stop); break;
      case DecoderStep::kByteLevel: tokens = byte_level(tokens); break;
      case DecoderStep::kMetaspace: tokens = metaspace(tokens, st.replacement, st.prepend_scheme); break;
    }
  }
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

}  // namespace omniq::tok

namespace omniq {

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  const tok::TokenizerData& d = *d_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    std::string t;
    auto a = d.added_by_id.find(id);
    if (a != d.added_by_id.end()) {
      t = d.added[a->second].content;
    } else if (id >= 0 && size_t(id) < d.model.has_id.size() && d.model.has_id[size_t(id)]) {
      t = d.model.id_to_token[size_t(id)];
    } else {
      continue;  // unknown id: the library skips it silently
    }
    // The library tests the token string against the special set, whichever table it came from.
    if (skip_special_tokens && d.special_contents.count(t)) continue;
    tokens.push_back(std::move(t));
  }
  if (d.has_decoder) return tok::run_decoders(d.decoders, std::move(tokens));
  std::string out;  // no decoder: tokens joined by spaces
  for (size_t k = 0; k < tokens.size(); ++k) out += (k ? " " : "") + tokens[k];
  return out;
}

}  // namespace omniq
