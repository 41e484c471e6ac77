#include "quant/calib_data.h"

#include <random>

#include "runtime/error.h"

namespace omniq {

std::vector<std::vector<int32_t>> sample_calibration_windows(const std::vector<int32_t>& ids, int64_t nsamples,
                                                             int64_t seqlen, uint64_t seed) {
  int64_t len = static_cast<int64_t>(ids.size());
  OMNIQ_CHECK(len > seqlen, "the calibration text has %lld tokens, too few for windows of %lld: use a longer "
              "--calib-text or a smaller --seqlen", static_cast<long long>(len), static_cast<long long>(seqlen));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> start(0, len - seqlen - 1);
  std::vector<std::vector<int32_t>> out;
  out.reserve(static_cast<size_t>(nsamples));
  for (int64_t i = 0; i < nsamples; ++i) {
    int64_t s = start(rng);
    out.emplace_back(ids.begin() + s, ids.begin() + s + seqlen);
  }
  return out;
}

}  // namespace omniq
