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
// crossed with the whole grid (run-major order). Everything outside `sweep:`/`runs:` is the base
// config each point starts from. Each point is validated on its own, so a base that is only
// meaningful with its overrides (wbits 16 before a wbits sweep) is fine.
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
  // The settings this point overrides, in application order (run's, then grid's): dotted path and
  // the value as to_yaml writes it. Used for the summary table's columns.
  std::vector<std::pair<std::string, std::string>> settings;
  ExperimentConfig config;  // fully resolved and validated
};

// Expands a parsed YAML tree; errors quote `source`:line:col and the offending key.
std::vector<SweepPoint> expand_sweep(const YAML::Node& root, const std::string& source);
std::vector<SweepPoint> parse_sweep(const std::string& yaml_text, const std::string& source);
std::vector<SweepPoint> load_sweep(const std::string& path);

}  // namespace omniq
