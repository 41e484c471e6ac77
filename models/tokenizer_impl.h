// Internals of models/tokenizer*.cpp (not part of the public API; tests may include it to check
// the pieces one by one). Each stage mirrors one component of the `tokenizers` library, whose
// behaviour is the specification: where a rule looks odd, it is because the library does it so.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "models/tokenizer.h"

namespace omniq::tok {

// ---- Unicode and UTF-8 (tokenizer_unicode.cpp, table in tokenizer_unicode_table.cpp) ----------
enum CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3, kMark = 4, kConnector = 5 };
struct UnicodeRun {
  uint32_t first, last;
  uint8_t cls;
};
extern const UnicodeRun kUnicodeRuns[];
extern const size_t kUnicodeRunCount;

CharClass char_class(uint32_t cp);
inline bool is_space(uint32_t cp) { return char_class(cp) == kSpace; }  // Oniguruma \s
// Approximation of the Rust regex `\w` (used only for `single_word` added tokens).
inline bool is_word_char(uint32_t cp) {
  CharClass c = char_class(cp);
  return c == kLetter || c == kNumber || c == kMark || c == kConnector;
}

// Byte offset of the first malformed UTF-8 sequence in s, or std::string::npos if s is valid.
size_t utf8_find_invalid(const std::string& s);
// Decodes the code point starting at s[i] (s must be valid UTF-8) and advances i past it.
uint32_t utf8_next(const std::string& s, size_t& i);
void utf8_append(std::string& out, uint32_t cp);
// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD.
std::string utf8_lossy(const std::string& bytes);

// ---- normalizers (tokenizer_pretok.cpp) --------------------------------------------------------
struct NormalizerStep {
  enum Kind { kPrepend, kReplace } kind;
  std::string pattern;  // Replace: literal to find
  std::string content;  // Prepend: text to put in front; Replace: replacement
};
std::string normalize(const std::vector<NormalizerStep>& steps, std::string s);

// ---- pre-tokenizers (tokenizer_pretok.cpp) -----------------------------------------------------
enum class PrependScheme { kAlways, kFirst, kNever };
struct PreTokenizerStep {
  enum Kind { kMetaspace, kByteLevel } kind = kMetaspace;
  std::string replacement = "\xE2\x96\x81";  // Metaspace: U+2581 '▁'
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  bool split = true;              // Metaspace: cut before every replacement char
  bool add_prefix_space = false;  // ByteLevel
  bool use_regex = true;          // ByteLevel: GPT-2 regex split
};
// One pre-token. at_origin: the piece starts at byte 0 of the caller's input text (Metaspace's
// "first" scheme prepends only there: the library tests the piece's original offset == 0).
struct Piece {
  std::string text;
  bool at_origin;
};
void pre_tokenize(const std::vector<PreTokenizerStep>& steps, std::vector<Piece>& pieces);
// The GPT-2 regex split of s as byte ranges [begin, end) covering s (written by hand: see .cpp).
std::vector<std::pair<size_t, size_t>> gpt2_split(const std::string& s);
// GPT-2's bytes_to_unicode: UTF-8 of the printable stand-in char of byte b, and the inverse.
const std::string& byte_level_char(uint8_t b);
int byte_level_byte(uint32_t cp);  // -1 when cp stands for no byte

// ---- BPE model (tokenizer_bpe.cpp) -------------------------------------------------------------
struct BpeModel {
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_token;  // "" where no token has that id
  std::vector<uint8_t> has_id;           // 1 where id_to_token is meaningful
  // (left id << 32 | right id) -> (rank, merged id); a later duplicate pair overwrites an earlier
  // one, as the library's HashMap collect does.
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;
  std::string unk_token;  // "" = none
  int32_t unk_id = -1;    // -1 when unk_token is empty or missing from the vocab
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  std::string continuing_subword_prefix, end_of_word_suffix;
  int32_t byte_tokens[256];  // ids of "<0xXX>" (byte_fallback), -1 when absent

  void set_vocab(std::unordered_map<std::string, int32_t> v);
  // Adds merge number `rank` (a, b); throws (naming `where`) when a, b or a+b is not in the vocab.
  void add_merge(const std::string& a, const std::string& b, int32_t rank, const std::string& where);
  // Appends the ids of one pre-token.
  void tokenize(const std::string& word, std::vector<int32_t>& out) const;
};

// ---- decoders (tokenizer_decode.cpp) -----------------------------------------------------------
struct DecoderStep {
  enum Kind { kReplace, kByteFallback, kFuse, kStrip, kByteLevel, kMetaspace } kind = kFuse;
  std::string pattern, content;  // Replace
  uint32_t strip_char = ' ';     // Strip
  size_t strip_start = 0, strip_stop = 0;
  std::string replacement = "\xE2\x96\x81";  // Metaspace
  PrependScheme prepend_scheme = PrependScheme::kAlways;
};
// Runs the chain on the token strings and joins the result (the library's decode_chain + join).
std::string run_decoders(const std::vector<DecoderStep>& steps, std::vector<std::string> tokens);

// ---- the whole tokenizer -----------------------------------------------------------------------
struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false, normalized = false, lstrip = false, rstrip = false, single_word = false;
};

struct TokenizerData {
  std::string source;  // file(s) it was loaded from, for messages
  BpeModel model;
  std::vector<AddedToken> added;                   // in declaration order
  std::unordered_map<std::string, size_t> added_by_content;  // -> index in `added`
  std::unordered_map<int32_t, size_t> added_by_id;           // -> index in `added`
  std::unordered_set<std::string> special_contents;          // contents of special added tokens
  std::vector<NormalizerStep> normalizers;
  std::vector<PreTokenizerStep> pre_tokenizers;
  // Post-processor for one sequence: ids before and after the text's ids.
  bool has_template = false;
  std::vector<int32_t> template_prefix, template_suffix;
  bool has_decoder = false;
  std::vector<DecoderStep> decoders;

  void add_token(const AddedToken& t);  // adds or replaces (by content)
  int32_t token_to_id(const std::string& s) const;
};

// Encoding stages (tokenizer.cpp), exposed for tests.
struct Segment {
  size_t begin, end;  // byte range in the text handed to split_on_added_tokens
  int32_t id;         // added-token id, or -1 for ordinary text
};
// The library's AddedVocabulary::find_matches: leftmost-longest matches of the added tokens whose
// `normalized` flag equals `normalized`, with single_word/lstrip/rstrip, gaps as id -1 segments.
std::vector<Segment> split_on_added_tokens(const TokenizerData& d, const std::string& text, bool normalized);

}  // namespace omniq::tok
