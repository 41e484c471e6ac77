// Calibration windows: `nsamples` random windows of `seqlen` tokens from a token stream, drawn
// with a fixed seed (spec §5.1) so a run is reproducible and a resumed run sees the same data.
#pragma once
#include <cstdint>
#include <vector>

namespace omniq {

// Window starts are uniform in [0, len - seqlen - 1] (as the reference code's random.randint).
// Throws when the text has fewer than seqlen + 1 tokens.
std::vector<std::vector<int32_t>> sample_calibration_windows(const std::vector<int32_t>& ids, int64_t nsamples,
                                                             int64_t seqlen, uint64_t seed);

}  // namespace omniq
