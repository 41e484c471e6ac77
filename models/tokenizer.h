// Tokenizer: a C++ implementation of the subset of Hugging Face `tokenizer.json` that LLaMA/OPT/GPT-2
// checkpoints use, producing the same ids as the `tokenizers` Python package.
//
// Supported pipeline (anything else is rejected at load time with a message listing what is
// supported):
//   added tokens   matched in the raw text first (flags special/normalized/lstrip/rstrip/single_word)
//   normalizer     Sequence, Prepend, Replace (String pattern)
//   pre-tokenizer  Metaspace (prepend_scheme always/first/never, split or not), ByteLevel (GPT-2 regex
//                  split, add_prefix_space, use_regex), Sequence of those
//   model          BPE (merge ranks, byte_fallback, fuse_unk, unk token, ignore_merges,
//                  continuing_subword_prefix / end_of_word_suffix)
//   post-processor TemplateProcessing (single sequence), BertProcessing, RobertaProcessing,
//                  ByteLevel (no-op for ids), Sequence of those
//   decoder        Sequence, Replace (String), ByteFallback, Fuse, Strip, ByteLevel, Metaspace
// Every public function is const and thread-safe; copies share the loaded tables.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace omniq {

namespace tok {
struct TokenizerData;
}

class Tokenizer {
 public:
  // Loads a `tokenizer.json`. Throws omniq::Error naming the file and what is wrong or unsupported.
  static Tokenizer from_file(const std::string& tokenizer_json_path);

  // A Hugging Face model folder: `tokenizer.json` when present, else the GPT-2 style pair
  // `vocab.json` + `merges.txt` (real OPT checkpoints ship only that pair). For the pair, special
  // tokens come from `tokenizer_config.json` (bos/eos/unk/pad/additional/added_tokens_decoder) and
  // the BOS rule is: `add_bos_token` from tokenizer_config.json when it says; otherwise a BOS is
  // prepended only for `model_type: "opt"` in config.json (OPT puts `</s>` in front of every
  // prompt). The BOS token is tokenizer_config's `bos_token`, else config.json's `bos_token_id`.
  static Tokenizer from_model_dir(const std::string& dir);

  // GPT-2 byte-level BPE from `encoder.json`/`vocab.json` + `vocab.bpe`/`merges.txt`, configured like
  // GPT-2's tokenizer: ByteLevel pre-tokenizer (regex split, no prefix space), ByteLevel decoder,
  // `<|endoftext|>` (when in the vocab) as a special token, and no BOS.
  static Tokenizer from_gpt2_files(const std::string& vocab_json, const std::string& merges_txt);

  // Text (UTF-8; invalid UTF-8 is an error) to ids. add_special_tokens applies the post-processor
  // (e.g. prepends BOS); added tokens in the text are matched either way, like the Python library.
  std::vector<int32_t> encode(const std::string& text, bool add_special_tokens = true) const;

  // Ids to text through the configured decoder. Ids outside the vocabulary are skipped (as the
  // Python library does); skip_special_tokens drops special added tokens such as `<s>`.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  int32_t vocab_size() const;  // 1 + the largest id of the model vocab and the added tokens
  int32_t bos_id() const;      // id that encode() prepends with add_special_tokens; -1 if none
  int32_t token_to_id(const std::string& token) const;  // -1 if absent
  std::string id_to_token(int32_t id) const;            // "" if absent
  const std::string& source() const;                    // file(s) the tokenizer was loaded from

 private:
  explicit Tokenizer(std::shared_ptr<const tok::TokenizerData> data) : d_(std::move(data)) {}
  std::shared_ptr<const tok::TokenizerData> d_;
};

}  // namespace omniq
