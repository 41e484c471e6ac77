// Perplexity by the protocol of spec/omniquant.md §7: the token ids of a whole text (BOS once at
// the start, as the tokenizer adds it), cut into n = len / seqlen non-overlapping windows; the
// mean NLL over all predicted positions (seqlen − 1 per window); ppl = exp(mean).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "models/causal_lm.h"

namespace omniq {

struct PerplexityResult {
  double ppl = 0;
  double mean_nll = 0;
  int64_t windows = 0;
  int64_t predicted_tokens = 0;
  double seconds = 0;
  double tokens_per_second = 0;  // tokens processed by the forward (windows × seqlen) per second
};

// `progress(done, total)` is called after every window (may be empty). Throws when the text has
// fewer than seqlen tokens or when a window's loss is not finite (a broken model must not report
// a number).
PerplexityResult evaluate_perplexity(const CausalLM& model, const std::vector<int32_t>& ids, int64_t seqlen,
                                     const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace omniq
