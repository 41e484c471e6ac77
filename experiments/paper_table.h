// The comparison tables of the OmniQuant paper (Shao et al. 2024, Tables 1 and 3), one set per
// model, rendered from sweep results (runner.h). Rows are methods (FP16, RTN, GPTQ, AWQ,
// SmoothQuant, OmniQuant: those present), columns the settings (W4A16, W3A16g128, ...):
//
//   weight-only         points with abits 16 (columns in sweep order)
//   weight-activation   points with abits < 16
//
// Cells are the perplexity on the first evaluation dataset of the points (WikiText-2 in the paper
// configs); a second table of the same shape gives the calibration seconds (sum over blocks, as
// run.h5 /summary records them: calibration and fusion, without model loading or evaluation). The
// FP16 row is the unquantized baseline (wbits 16, abits 16), repeated in every column as the
// reference. A cell without a complete run is "—"; the points behind such cells are listed below.
// Points that differ only in quantization.seed share their cell, which shows "mean ± sd" (sample
// standard deviation) over the complete ones, with a note naming the seeds: OmniQuant perplexities of
// small models move by 1–2% from seed to seed (docs/results.md), so one seed is not a result.
// Points that differ otherwise share a cell only in sweeps beyond the paper's: one is shown (a
// complete one first) and a note says which.
#pragma once
#include <string>
#include <vector>

#include "experiments/runner.h"

namespace omniq {

std::string paper_tables_markdown(const std::vector<PointResult>& results);

// "rtn" -> "RTN", "omniquant" -> "OmniQuant", ...; the unquantized baseline is "FP16".
std::string method_display_name(const QuantConfig& qc);

}  // namespace omniq
