#include "models/perplexity.h"

#include <chrono>
#include <cmath>

#include "ops/loss.h"
#include "runtime/error.h"

namespace omniq {

PerplexityResult evaluate_perplexity(const CausalLM& model, const std::vector<int32_t>& ids, int64_t seqlen,
                                     const std::function<void(int64_t, int64_t)>& progress) {
  OMNIQ_CHECK(seqlen >= 2, "perplexity: seqlen must be at least 2, got %lld", static_cast<long long>(seqlen));
  int64_t n = static_cast<int64_t>(ids.size()) / seqlen;
  OMNIQ_CHECK(n >= 1, "perplexity: the text has %zu tokens, fewer than one window of %lld", ids.size(),
              static_cast<long long>(seqlen));
  auto t0 = std::chrono::steady_clock::now();
  double total_nll = 0;
  for (int64_t w = 0; w < n; ++w) {
    const int32_t* base = ids.data() + w * seqlen;
    std::vector<int32_t> window(base, base + seqlen);
    std::vector<int32_t> targets(base + 1, base + seqlen);
    Tensor inp = Tensor::from_i32(window, {1, seqlen}, model.device());
    Tensor logits = model.forward(inp);  // [1, T, V]
    Tensor pred = logits.reshape({seqlen, logits.size(-1)}).view_rows(0, seqlen - 1);
    Tensor nll = cross_entropy_forward(pred, Tensor::from_i32(targets, {seqlen - 1}, model.device()));
    double sum = 0;
    for (float v : nll.to_f32_vector()) sum += v;
    OMNIQ_CHECK(std::isfinite(sum), "perplexity: window %lld has a non-finite loss (%g): the model produced NaN/Inf",
                static_cast<long long>(w), sum);
    total_nll += sum;
    if (progress) progress(w + 1, n);
  }
  PerplexityResult r;
  r.windows = n;
  r.predicted_tokens = n * (seqlen - 1);
  r.mean_nll = total_nll / static_cast<double>(r.predicted_tokens);
  r.ppl = std::exp(r.mean_nll);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.tokens_per_second = r.seconds > 0 ? static_cast<double>(n * seqlen) / r.seconds : 0;
  return r;
}

}  // namespace omniq
