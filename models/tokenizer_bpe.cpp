// The BPE model: split a pre-token into characters (with byte fallback / unk), then apply merges
// lowest rank first. This is a port of the `tokenizers` library's models/bpe/{model,word}.rs:
// a doubly-linked list of symbols plus a min-heap of candidate merges keyed by (rank, position),
// O(n log n) in the word length, so LLaMA-2's "whole text is one word" stays fast on a 1 MB text
// (the textbook "rescan all pairs after each merge" loop is O(n^2) there).
#include <queue>

#include "models/tokenizer_impl.h"
#include "runtime/error.h"

namespace omniq::tok {

static uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

void BpeModel::set_vocab(std::unordered_map<std::string, int32_t> v) {
  vocab = std::move(v);
  int32_t max_id = -1;
  for (const auto& kv : vocab) max_id = std::max(max_id, kv.second);
  id_to_token.assign(size_t(max_id + 1), std::string());
  has_id.assign(size_t(max_id + 1), 0);
  for (const auto& kv : vocab) {
    id_to_token[size_t(kv.second)] = kv.first;
    has_id[size_t(kv.second)] = 1;
  }
  for (int b = 0; b < 256; ++b) {
    // The library looks up format!("<{b:#04X}>"), e.g. "<0x0A>": lowercase x, uppercase digits.
    char name[8];
    snprintf(name, sizeof(name), "<0x%02X>", b);
    auto it = vocab.find(name);
    byte_tokens[b] = it == vocab.end() ? -1 : it->second;
  }
}

void BpeModel::add_merge(const std::string& a, const std::string& b, int32_t rank, const std::string& where) {
  auto ia = vocab.find(a), ib = vocab.find(b);
  OMNIQ_CHECK(ia != vocab.end(), "%s: merge #%d (\"%s\" \"%s\"): token \"%s\" is not in the vocabulary",
              where.c_str(), rank, a.c_str(), b.c_str(), a.c_str());
  OMNIQ_CHECK(ib != vocab.end(), "%s: merge #%d (\"%s\" \"%s\"): token \"%s\" is not in the vocabulary",
              where.c_str(), rank, a.c_str(), b.c_str(), b.c_str());
  // With a continuing_subword_prefix the right part carries the prefix, which the merged token
  // does not repeat (model.rs: format!("{}{}", a, &b[prefix_len..])).
  size_t cut = continuing_subword_prefix.size();
  std::string merged = a + (b.size() >= cut ? b.substr(cut) : std::string());
  auto im = vocab.find(merged);
  OMNIQ_CHECK(im != vocab.end(), "%s: merge #%d (\"%s\" \"%s\"): merged token \"%s\" is not in the vocabulary",
              where.c_str(), rank, a.c_str(), b.c_str(), merged.c_str());
  merges[pair_key(ia->second, ib->second)] = {rank, im->second};
}

namespace {

struct Symbol {
  int32_t id;
  int32_t prev, next;  // -1 at the ends
  size_t len;          // bytes covered; 0 marks a symbol merged into its left neighbour
};

struct Merge {
  int32_t rank;
  size_t pos;
  int32_t new_id;
};
// std::priority_queue pops the "largest": make that the lowest rank, then the leftmost position,
// exactly the order of word.rs's Ord for Merge.
struct MergeAfter {
  bool operator()(const Merge& a, const Merge& b) const {
    if (a.rank != b.rank) return a.rank > b.rank;
    return a.pos > b.pos;
  }
};

}  // namespace

void BpeModel::tokenize(const std::string& word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges) {
    auto it = vocab.find(word);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }

  // 1. Characters -> symbols (model.rs merge_word). A character missing from the vocab becomes its
  //    "<0xXX>" byte tokens (byte_fallback, only if all exist), else the unk token, consecutive unks
  //    fused into one with fuse_unk, else it is dropped.
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  auto push = [&](int32_t id, size_t len) {
    int32_t idx = int32_t(sym.size());
    sym.push_back({id, idx - 1, -1, len});
    if (idx > 0) sym[size_t(idx) - 1].next = idx;
  };
  bool have_unk = false;  // a pending unk symbol, flushed when a known char follows
  size_t unk_len = 0;
  std::string piece;
  for (size_t i = 0; i < word.size();) {
    size_t start = i;
    utf8_next(word, i);
    size_t byte_len = i - start;
    piece.assign(word, start, byte_len);
    if (start > 0 && !continuing_subword_prefix.empty()) piece.insert(0, continuing_subword_prefix);
    if (i == word.size() && !end_of_word_suffix.empty()) piece += end_of_word_suffix;

    auto it = vocab.find(piece);
    if (it != vocab.end()) {
      if (have_unk) {
        push(unk_id, unk_len);
        have_unk = false;
      }
      push(it->second, byte_len);
      continue;
    }
    if (byte_fallback) {
      bool all = true;
      for (unsigned char ch : piece) all = all && byte_tokens[ch] >= 0;
      if (all) {
        // Like the library, a pending unk is not flushed first (it cannot arise with a full set
        // of byte tokens, which every byte_fallback vocabulary has).
        for (unsigned char ch : piece) push(byte_tokens[ch], 1);
        continue;
      }
    }
    if (!unk_token.empty()) {
      OMNIQ_CHECK(unk_id >= 0, "BPE: the unk token \"%s\" is not in the vocabulary", unk_token.c_str());
      if (have_unk && fuse_unk) {
        unk_len += byte_len;
      } else {
        if (have_unk) push(unk_id, unk_len);
        have_unk = true;
        unk_len = byte_len;
      }
    }
  }
  if (have_unk) push(unk_id, unk_len);
  if (sym.empty()) return;

  // 2. Merges (word.rs merge_all). Queue entries can go stale as neighbours merge; an entry is
  //    still applied when the pair now at `pos` merges to the same id (the library checks only
  //    that), otherwise it is dropped.
  auto find_merge = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
    auto it = merges.find(pair_key(a, b));
    return it == merges.end() ? nullptr : &it->second;
  };
  std::vector<Merge> initial;
  initial.reserve(sym.size());
  for (size_t k = 0; k + 1 < sym.size(); ++k)
    if (const auto* m = find_merge(sym[k].id, sym[k + 1].id)) initial.push_back({m->first, k, m->second});
  std::priority_queue<Merge, std::vector<Merge>, MergeAfter> queue(MergeAfter(), std::move(initial));

  while (!queue.empty()) {
    Merge top = queue.top();
    queue.pop();
    Symbol& cur = sym[top.pos];
    if (cur.len == 0 || cur.next == -1) continue;
    size_t next_pos = size_t(cur.next);
    Symbol right = sym[next_pos];
    const auto* m = find_merge(cur.id, right.id);
    if (!m || m->second != top.new_id) continue;

    cur.id = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    sym[next_pos].len = 0;
    if (right.next >= 0) sym[size_t(right.next)].prev = int32_t(top.pos);

    if (cur.prev >= 0) {
      if (const auto* mp = find_merge(sym[size_t(cur.prev)].id, cur.id))
        queue.push({mp->first, size_t(cur.prev), mp->second});
    }
    if (cur.next >= 0) {
      if (const auto* mn = find_merge(cur.id, sym[size_t(cur.next)].id))
        queue.push({mn->first, top.pos, mn->second});
    }
  }

  for (const Symbol& s : sym)
    if (s.len != 0) out.push_back(s.id);
}

}  // namespace omniq::tok
