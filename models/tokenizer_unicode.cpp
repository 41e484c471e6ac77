// UTF-8 helpers and the Unicode class lookup for the tokenizer. The class table itself is generated
// (tokenizer_unicode_table.cpp, by tests/reference/make_tokenizer_unicode_table.py).
#include <algorithm>

#include "models/tokenizer_impl.h"

namespace omniq::tok {

namespace {

// ASCII is by far the most common input: answer it from a 128-entry table built once.
struct AsciiClasses {
  uint8_t cls[128];
  AsciiClasses() {
    for (uint32_t c = 0; c < 128; ++c) cls[c] = lookup(c);
  }
  static uint8_t lookup(uint32_t cp) {
    const UnicodeRun* end = kUnicodeRuns + kUnicodeRunCount;
    const UnicodeRun* it =
        std::upper_bound(kUnicodeRuns, end, cp, [](uint32_t v, const UnicodeRun& r) { return v < r.first; });
    if (it == kUnicodeRuns) return kOther;
    --it;
    return cp <= it->last ? it->cls : uint8_t(kOther);
  }
};

}  // namespace

CharClass char_class(uint32_t cp) {
  static const AsciiClasses ascii;
  if (cp < 128) return static_cast<CharClass>(ascii.cls[cp]);
  return static_cast<CharClass>(AsciiClasses::lookup(cp));
}

// Length of the well-formed prefix of a UTF-8 sequence starting at p (at most n bytes), following
// the Unicode "maximal subpart" rules (the same ones Rust's from_utf8_lossy uses). Sets *complete
// when the whole sequence is well formed.
static size_t utf8_sequence(const unsigned char* p, size_t n, bool* complete) {
  *complete = false;
  unsigned char c = p[0];
  if (c < 0x80) {
    *complete = true;
    return 1;
  }
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    need = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 3;
    if (c == 0xE0) lo = 0xA0;  // no overlong forms
    if (c == 0xED) hi = 0x9F;  // no surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return 1;  // a continuation byte or 0xC0/0xC1/0xF5..0xFF cannot start a sequence
  }
  size_t k = 1;
  for (; k < need && k < n; ++k) {
    unsigned char b = p[k];
    bool ok = (k == 1) ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return k;
  }
  if (k == need) *complete = true;
  return k;
}

size_t utf8_find_invalid(const std::string& s) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size(), i = 0;
  while (i < n) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    bool complete;
    size_t k = utf8_sequence(p + i, n - i, &complete);
    if (!complete) return i;
    i += k;
  }
  return std::string::npos;
}

uint32_t utf8_next(const std::string& s, size_t& i) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  unsigned char c = p[0];
  if (c < 0x80) {
    i += 1;
    return c;
  }
  if (c < 0xE0) {
    i += 2;
    return (uint32_t(c & 0x1F) << 6) | (p[1] & 0x3F);
  }
  if (c < 0xF0) {
    i += 3;
    return (uint32_t(c & 0x0F) << 12) | (uint32_t(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
  }
  i += 4;
  return (uint32_t(c & 0x07) << 18) | (uint32_t(p[1] & 0x3F) << 12) | (uint32_t(p[2] & 0x3F) << 6) |
         (p[3] & 0x3F);
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

std::string utf8_lossy(const std::string& bytes) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t n = bytes.size(), i = 0;
  std::string out;
  out.reserve(n);
  while (i < n) {
    bool complete;
    size_t k = utf8_sequence(p + i, n - i, &complete);
    if (complete)
      out.append(bytes, i, k);
    else
      out += "\xEF\xBF\xBD";  // U+FFFD
    i += k;
  }
  return out;
}

}  // namespace omniq::tok
