// Sweeps: one YAML file describes many runs. Two forms, usable together:
//
//   sweep:                           # a Cartesian grid; the first key varies slowest
//     quantization.wbits: [2, 3, 4]
//     quantization.group_size: [0, 128]
//
//   runs:                            # an explicit list, for tables that are not a grid
//     - {name: W4A16, quantization.wbits: 4}
//     - {name: W2A16g128, quantization.wbits: 2, quantization.group_size: 128, quantization.epochs: 40}
//
// Keys are dotted paths to settings of experiment_config.h. With both sections every run is
// crossed with the whole grid (run-major order). Everything outside `sweep:`/`runs:`/`models:` is
// the base config each point starts from. Each point is validated on its own, so a base that is
// only meaningful with its overrides (wbits 16 before a wbits sweep) is fine.
//
// Two additions for tables that are not a grid (experiments/configs/paper_tables.yaml):
//
//   runs:
//     - name: W4A16                  # a run may carry its own grid, crossed with that run only
//       quantization.wbits: 4        # (and with the top-level one): W4A16-rtn, W4A16-gptq, ...
//       sweep: {quantization.method: [rtn, gptq, awq]}
//
//   models:                          # several models in one file; every point is made per model
//     llama-small: ${OMNIQ_ZOO_DIR}/llama-small                    # a path, or
//     opt-small: {model.path: ${OMNIQ_ZOO_DIR}/opt-small, quantization.let: true}  # overrides
//
// With `models:` every run x grid point is made once per model (model-major), named
// "<model>-<point>"; a model's overrides come after the base and before the run's, so a run can
// still change them. A run's setting may then also be a map from model name to value, for the
// recipes that differ by architecture: `quantization.aug_loss: {llama-small: true, opt-small: false}`
// (a model the map leaves out keeps its own value). `${VAR}` in model.path is replaced by the
// environment variable VAR when it is set; an unset one is left in place and the runner refuses to
// start such a point (so a table can still be read back without it).
//
// wbits 16 with abits 16 is the unquantized baseline (the paper's FP16 row): the runner evaluates
// the original checkpoint and calibrates nothing.
#pragma once
#include <yaml-cpp/yaml.h>

#include <string>
#include <utility>
#include <vector>

#include "experiments/experiment_config.h"

namespace omniq {

struct SweepPoint {
  // "wbits3-group_size128", a run's `name`, or "<run name>-<grid values>"; unique in the sweep and
  // safe as a directory name. A file with neither section gives one point named after `name:`.
  std::string name;
  // The models: entry this point belongs to ("" when the file has no models: section).
  std::string model;
  // The settings this point overrides, in application order (run's, then grid's): dotted path and
  // the value as to_yaml writes it. Used for the summary table's columns. A model's own overrides
  // are not listed (the point's `model` names them).
  std::vector<std::pair<std::string, std::string>> settings;
  ExperimentConfig config;  // fully resolved and validated
};

// Expands a parsed YAML tree; errors quote `source`:line:col and the offending key.
std::vector<SweepPoint> expand_sweep(const YAML::Node& root, const std::string& source);
std::vector<SweepPoint> parse_sweep(const std::string& yaml_text, const std::string& source);
std::vector<SweepPoint> load_sweep(const std::string& path);

}  // namespace omniq
