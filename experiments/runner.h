// The experiment runner: one sweep point = one run directory
//
//   <sweep_dir>/<point name>/
//     config.yaml   the resolved config (to_yaml), the exact input of this run
//     run.h5        metrics, environment, learned parameters (experiments/h5_log.h)
//     model/        the exported Hugging Face folder (quantized)
//     model.state/  calibrate_model's per-block state: what makes a killed run resume
//
// A point whose run.h5 says "complete" is skipped; an interrupted point resumes from its last
// finished block; a point that fails is logged (status "failed", `error`) and the sweep goes on.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "experiments/sweep.h"

namespace omniq {

struct PointResult {
  std::string name;
  std::string model;  // the sweep's models: entry ("" when none)
  std::string dir;
  std::vector<std::pair<std::string, std::string>> settings;  // the point's varying settings
  QuantConfig qc;
  std::string status;  // complete | failed; read back without running: also running | missing
  std::string error;
  bool skipped = false;      // already complete before this call
  bool selected = true;      // false: left out by --only (its numbers, if any, come from run.h5)
  double final_loss = 0;     // final MSE of the last block (NaN when no block finished)
  double calib_seconds = 0;  // sum of the blocks' seconds
  int64_t peak_bytes = 0;    // max over blocks
  std::vector<std::pair<std::string, double>> ppl;  // eval label -> perplexity, in config order
};

// Runs (or skips, or resumes) one point. Never throws for a failure of the run itself: it is
// reported in the result and in run.h5.
PointResult run_point(const SweepPoint& point, const std::string& sweep_dir);

// What run.h5 of a point says, without running anything (status "missing" when there is none).
PointResult read_point_result(const SweepPoint& point, const std::string& sweep_dir);

// Expands `path`, runs every point in order into <output.dir>/<name>/, writes summary.csv,
// summary.md and table.md (paper_table.h) there and prints the summary to stdout.
// model_path / output_dir, when not empty, replace every point's model.path / output.dir (so one
// table layout serves any model: `omniq sweep paper.yaml --model DIR --out runs/DIR-name`);
// model_path is refused for a file with models: (its points name their own models).
// only, when not empty, is a regular expression (ECMAScript, searched in the point name): points
// that do not match are not run, but the summary and table still show what their run.h5 holds,
// so a table can fill up over several invocations (one model per GPU machine, say).
std::vector<PointResult> run_sweep(const std::string& path, const std::string& model_path = "",
                                   const std::string& output_dir = "", const std::string& only = "");

// The points of a sweep as run_sweep would see them (overrides applied, selected by `only`), and
// every point's result read back from its run.h5 without running anything (`omniq sweep --table`).
std::vector<SweepPoint> load_sweep_points(const std::string& path, const std::string& model_path = "",
                                          const std::string& output_dir = "");
std::vector<PointResult> read_sweep_results(const std::string& path, const std::string& model_path = "",
                                            const std::string& output_dir = "", const std::string& only = "");
// True when `only` is empty or found in `name` (ECMAScript regex; a bad pattern is an error).
bool point_selected(const std::string& name, const std::string& only);

// The sweep directory of a config: output.dir + "/" + name.
std::string sweep_dir_of(const ExperimentConfig& c);

// The summary table: name, varying settings, method, W/A/g, final block loss, calibration
// seconds, peak MiB, each dataset's ppl, status.
std::string summary_markdown(const std::vector<PointResult>& results);
std::string summary_csv(const std::vector<PointResult>& results);

// "auto" -> "cuda" when a GPU is visible, else "cpu"; anything else unchanged.
std::string resolve_device_name(const std::string& device);

}  // namespace omniq
