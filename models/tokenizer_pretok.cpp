// Normalizers (Prepend, Replace) and pre-tokenizers (Metaspace, ByteLevel with the GPT-2 regex
// split), following the `tokenizers` library's normalizers/*.rs and pre_tokenizers/*.rs.
#include <array>

#include "models/tokenizer_impl.h"

namespace omniq::tok {

// ---- normalizers -------------------------------------------------------------------------------

static void replace_all(std::string& s, const std::string& pattern, const std::string& content) {
  if (pattern.empty() || s.find(pattern) == std::string::npos) return;
  std::string out;
  out.reserve(s.size() + s.size() / 4);
  size_t pos = 0;
  for (size_t hit; (hit = s.find(pattern, pos)) != std::string::npos; pos = hit + pattern.size()) {
    out.append(s, pos, hit - pos);
    out += content;
  }
  out.append(s, pos, std::string::npos);
  s.swap(out);
}

std::string normalize(const std::vector<NormalizerStep>& steps, std::string s) {
  for (const NormalizerStep& st : steps) {
    switch (st.kind) {
      case NormalizerStep::kPrepend:
        // prepend.rs: only a non-empty string gets the prefix.
        if (!s.empty()) s.insert(0, st.content);
        break;
      case NormalizerStep::kReplace:
        replace_all(s, st.pattern, st.content);
        break;
    }
  }
  return s;
}

// ---- GPT-2 byte-level map ----------------------------------------------------------------------

namespace {
// bytes_to_unicode() of GPT-2: printable Latin-1 bytes stand for themselves, the other 68 bytes
// are given the code points 256, 257, ... in byte order, so every byte is a visible character.
struct ByteLevelTable {
  std::array<std::string, 256> chars;
  std::array<int, 324> bytes;  // code point -> byte (all stand-ins are < 256 + 68)
  ByteLevelTable() {
    bytes.fill(-1);
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      uint32_t cp = printable ? uint32_t(b) : next++;
      utf8_append(chars[b], cp);
      bytes[cp] = b;
    }
  }
};
const ByteLevelTable& byte_table() {
  static const ByteLevelTable t;
  return t;
}
}  // namespace

const std::string& byte_level_char(uint8_t b) { return byte_table().chars[b]; }

int byte_level_byte(uint32_t cp) { return cp < 324 ? byte_table().bytes[cp] : -1; }

// ---- GPT-2 regex split -------------------------------------------------------------------------
// The pattern  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// run by Oniguruma (leftmost alternative wins, greedy with backtracking). Every character is
// covered by some alternative, so consecutive matches tile the text. At position p:
//   1. an apostrophe followed by s/t/m/d (2 chars) or re/ve/ll (3 chars), case-sensitive;
//   2-4. an optional U+0020 then a maximal run of letters / numbers / "other" (neither space,
//        letter nor number), decided by the class of the first char after the optional space;
//   5. a whitespace run [p, q): all of it at the end of the text, else it gives back its last
//      char (which then precedes the next word, as " word") when the run has >= 2 chars;
//   6. otherwise the single whitespace char.
std::vector<std::pair<size_t, size_t>> gpt2_split(const std::string& s) {
  std::vector<uint32_t> cps;
  std::vector<size_t> offs;  // byte offset of each code point, plus s.size() at the end
  cps.reserve(s.size());
  offs.reserve(s.size() + 1);
  for (size_t i = 0; i < s.size();) {
    offs.push_back(i);
    cps.push_back(utf8_next(s, i));
  }
  offs.push_back(s.size());
  const size_t n = cps.size();
  std::vector<uint8_t> cls(n);
  for (size_t i = 0; i < n; ++i) cls[i] = char_class(cps[i]);
  // For the regex only letters, numbers and \s matter: marks and Pc are "other" there.
  auto klass = [&](size_t i) -> int {
    uint8_t c = cls[i];
    return (c == kLetter || c == kNumber || c == kSpace) ? int(c) : int(kOther);
  };
  auto run_end = [&](size_t i, int k) {
    while (i < n && klass(i) == k) ++i;
    return i;
  };

  std::vector<std::pair<size_t, size_t>> spans;
  size_t p = 0;
  while (p < n) {
    size_t q;
    uint32_t c = cps[p];
    uint32_t c1 = p + 1 < n ? cps[p + 1] : 0, c2 = p + 2 < n ? cps[p + 2] : 0;
    if (c == '\'' && (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd')) {
      q = p + 2;
    } else if (c == '\'' && ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))) {
      q = p + 3;
    } else {
      size_t b = (c == ' ' && p + 1 < n) ? p + 1 : p;  // the optional leading space
      int k = klass(b);
      if (k != kSpace) {
        q = run_end(b, k);  // alternatives 2-4 (a space at p itself can only lead them)
      } else {
        // Here cps[p] is whitespace (if it were ' ' followed by a non-space, k was not kSpace).
        size_t e = run_end(p, kSpace);
        if (e == n || e - p == 1)
          q = e;  // alternative 5 at the end of text, or alternative 6
        else
          q = e - 1;  // alternative 5 backtracked so that (?!\S) holds
      }
    }
    spans.emplace_back(offs[p], offs[q]);
    p = q;
  }
  return spans;
}

// ---- pre-tokenizers ----------------------------------------------------------------------------

// metaspace.rs: ' ' -> replacement; prepend the replacement (always, or only for the piece at the
// start of the input for "first"); then split with MergedWithNext, i.e. a new piece starts at every
// replacement char ("▁a▁▁b" -> "▁a", "▁", "▁b").
static void metaspace(const PreTokenizerStep& st, const Piece& in, std::vector<Piece>& out) {
  std::string s = in.text;
  replace_all(s, " ", st.replacement);
  bool starts = s.compare(0, st.replacement.size(), st.replacement) == 0;
  if (!starts && (st.prepend_scheme == PrependScheme::kAlways ||
                  (st.prepend_scheme == PrependScheme::kFirst && in.at_origin)))
    s.insert(0, st.replacement);
  if (!st.split) {
    out.push_back({std::move(s), in.at_origin});
    return;
  }
  size_t start = 0;
  for (size_t hit = s.find(st.replacement, 1); hit != std::string::npos;
       hit = s.find(st.replacement, hit + st.replacement.size())) {
    if (hit > start) out.push_back({s.substr(start, hit - start), in.at_origin && start == 0});
    start = hit;
  }
  if (start < s.size()) out.push_back({s.substr(start), in.at_origin && start == 0});
}

// byte_level.rs: optional prefix space, the GPT-2 split, then every byte of every piece becomes its
// stand-in char (so the BPE vocabulary only ever sees the 256 byte chars).
static void byte_level(const PreTokenizerStep& st, const Piece& in, std::vector<Piece>& out) {
  std::string s = in.text;
  if (st.add_prefix_space && s.compare(0, 1, " ") != 0) s.insert(0, " ");
  std::vector<std::pair<size_t, size_t>> spans;
  if (st.use_regex)
    spans = gpt2_split(s);
  else
    spans.emplace_back(0, s.size());
  for (const auto& sp : spans) {
    if (sp.second == sp.first) continue;
    Piece p{std::string(), in.at_origin && sp.first == 0};
    p.text.reserve(2 * (sp.second - sp.first));
    for (size_t i = sp.first; i < sp.second; ++i) p.text += byte_level_char(uint8_t(s[i]));
    out.push_back(std::move(p));
  }
}

void pre_tokenize(const std::vector<PreTokenizerStep>& steps, std::vector<Piece>& pieces) {
  for (const PreTokenizerStep& st : steps) {
    std::vector<Piece> out;
    out.reserve(pieces.size());
    for (const Piece& p : pieces) {
      if (st.kind == PreTokenizerStep::kMetaspace)
        metaspace(st, p, out);
      else
        byte_level(st, p, out);
    }
    pieces.swap(out);
  }
}

}  // namespace omniq::tok
