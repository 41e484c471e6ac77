// Encoding: the order of stages of the `tokenizers` library's TokenizerImpl::encode_single_sequence:
//   1. added tokens with normalized=false are cut out of the RAW text (AddedVocabulary);
//   2. every other segment is normalized on its own, then cut at added tokens with normalized=true;
//   3. the pre-tokenizer splits each remaining piece into words;
//   4. the model (BPE) turns each word into ids;
//   5. the post-processor adds the template's special tokens (BOS) when asked.
// Because each raw segment is normalized and pre-tokenized separately, an added token changes how
// its neighbours tokenize: LLaMA-2's Prepend normalizer gives the text after `<unk>` its own "▁",
// and Metaspace's "first" scheme prepends "▁" only to the segment that starts the input.
#include "models/tokenizer_impl.h"
#include "runtime/error.h"

namespace omniq::tok {

void TokenizerData::add_token(const AddedToken& t) {
  auto it = added_by_content.find(t.content);
  size_t idx;
  if (it != added_by_content.end()) {
    idx = it->second;
    added_by_id.erase(added[idx].id);
    added[idx] = t;
  } else {
    idx = added.size();
    added.push_back(t);
    added_by_content[t.content] = idx;
  }
  added_by_id[t.id] = idx;
  if (t.special) special_contents.insert(t.content);
}

int32_t TokenizerData::token_to_id(const std::string& s) const {
  auto a = added_by_content.find(s);
  if (a != added_by_content.end()) return added[a->second].id;
  auto v = model.vocab.find(s);
  return v == model.vocab.end() ? -1 : v->second;
}

namespace {

// Rust regex `\s*$` / `^\s*` on a byte range: where the trailing whitespace run starts / where
// the leading one ends.
size_t trailing_space_start(const std::string& s, size_t begin, size_t end) {
  size_t start = end;  // start of the whitespace run in progress; `end` = no run
  for (size_t i = begin; i < end;) {
    size_t at = i;
    if (!is_space(utf8_next(s, i)))
      start = end;
    else if (start == end)
      start = at;
  }
  return start;
}

size_t leading_space_end(const std::string& s, size_t begin, size_t end) {
  size_t i = begin;
  while (i < end) {
    size_t at = i;
    if (!is_space(utf8_next(s, i))) return at;
  }
  return end;
}

bool word_char_before(const std::string& s, size_t pos) {
  if (pos == 0) return false;
  size_t i = pos - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return is_word_char(utf8_next(s, i));
}

bool word_char_after(const std::string& s, size_t pos) {
  if (pos >= s.size()) return false;
  return is_word_char(utf8_next(s, pos));
}

}  // namespace

std::vector<Segment> split_on_added_tokens(const TokenizerData& d, const std::string& text, bool normalized) {
  // The candidate patterns: normalized tokens are matched in their normalized form.
  struct Pattern {
    std::string text;
    size_t token;  // index in d.added
  };
  std::vector<Pattern> pats;
  bool first_byte[256] = {false};
  for (size_t k = 0; k < d.added.size(); ++k) {
    const AddedToken& t = d.added[k];
    if (t.normalized != normalized || t.content.empty()) continue;
    std::string p = normalized ? normalize(d.normalizers, t.content) : t.content;
    if (p.empty()) continue;
    first_byte[static_cast<unsigned char>(p[0])] = true;
    pats.push_back({std::move(p), k});
  }

  std::vector<Segment> out;
  size_t start_offset = 0, pos = 0;
  const size_t n = text.size();
  while (!pats.empty() && pos < n) {
    // Aho-Corasick LeftmostLongest: the earliest start, the longest pattern there.
    size_t mstart = n, mlen = 0, mtok = 0;
    for (size_t i = pos; i < n && mlen == 0; ++i) {
      if (!first_byte[static_cast<unsigned char>(text[i])]) continue;
      for (const Pattern& p : pats)
        if (p.text.size() > mlen && text.compare(i, p.text.size(), p.text) == 0) {
          mstart = i;
          mlen = p.text.size();
          mtok = p.token;
        }
    }
    if (mlen == 0) break;
    size_t start = mstart, stop = mstart + mlen;
    pos = stop;  // the matcher resumes after the match even when it is discarded below
    const AddedToken& t = d.added[mtok];
    if (t.single_word && (word_char_before(text, start) || word_char_after(text, stop))) continue;
    if (t.lstrip) start = std::max(trailing_space_start(text, 0, start), start_offset);
    if (t.rstrip) stop = leading_space_end(text, stop, n);
    if (start_offset < start) out.push_back({start_offset, start, -1});
    out.push_back({start, stop, t.id});
    start_offset = stop;
  }
  if (start_offset < n) out.push_back({start_offset, n, -1});
  return out;
}

}  // namespace omniq::tok

namespace omniq {

using namespace tok;

std::vector<int32_t> Tokenizer::encode(const std::string& text, bool add_special_tokens) const {
  const TokenizerData& d = *d_;
  size_t bad = utf8_find_invalid(text);
  OMNIQ_CHECK(bad == std::string::npos, "Tokenizer::encode: the text is not valid UTF-8 (byte offset %zu)", bad);

  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special_tokens && d.has_template) ids = d.template_prefix;

  std::vector<Piece> pieces;
  for (const Segment& seg : split_on_added_tokens(d, text, /*normalized=*/false)) {
    if (seg.id >= 0) {
      ids.push_back(seg.id);
      continue;
    }
    std::string norm = normalize(d.normalizers, text.substr(seg.begin, seg.end - seg.begin));
    if (norm.empty()) continue;
    for (const Segment& sub : split_on_added_tokens(d, norm, /*normalized=*/true)) {
      if (sub.id >= 0) {
        ids.push_back(sub.id);
        continue;
      }
      // Metaspace "first" asks whether the piece's ORIGINAL offset is 0: true when the raw segment
      // starts the text and the piece starts the normalized segment. (Not modelled: a piece after a
      // normalized=true added token that itself began with text a normalizer inserted, which also
      // maps to offset 0 in the library; no supported tokenizer combines those.)
      pieces.clear();
      pieces.push_back({norm.substr(sub.begin, sub.end - sub.begin), seg.begin == 0 && sub.begin == 0});
      pre_tokenize(d.pre_tokenizers, pieces);
      for (const Piece& p : pieces) d.model.tokenize(p.text, ids);
    }
  }

  if (add_special_tokens && d.has_template)
    ids.insert(ids.end(), d.template_suffix.begin(), d.template_suffix.end());
  return ids;
}

int32_t Tokenizer::vocab_size() const {
  int32_t n = int32_t(d_->model.id_to_token.size());
  for (const AddedToken& t : d_->added) n = std::max(n, t.id + 1);
  return n;
}

int32_t Tokenizer::bos_id() const {
  return d_->has_template && !d_->template_prefix.empty() ? d_->template_prefix.front() : -1;
}

int32_t Tokenizer::token_to_id(const std::string& token) const { return d_->token_to_id(token); }

std::string Tokenizer::id_to_token(int32_t id) const {
  auto a = d_->added_by_id.find(id);
  if (a != d_->added_by_id.end()) return d_->added[a->second].content;
  const BpeModel& m = d_->model;
  if (id >= 0 && size_t(id) < m.has_id.size() && m.has_id[size_t(id)]) return m.id_to_token[size_t(id)];
  return std::string();
}

const std::string& Tokenizer::source() const { return d_->source; }

}  // namespace omniq
