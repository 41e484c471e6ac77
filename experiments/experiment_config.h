// The typed form of one experiment YAML file. Every section maps 1:1 onto a struct, so the file a
// researcher writes, the struct the runner reads and the resolved config written into a run
// directory are the same thing. Unknown keys, wrong types and impossible values are errors that
// quote the file, the line and the column (yaml-cpp marks), because a typo in a sweep should fail
// in the first second, not after an hour of calibration.
//
//   name: llama-w3
//   model: {path: data/models/llama-nano}
//   data: {calib_text: "", eval_datasets: [wikitext2], eval_texts: []}
//   quantization: {method: omniquant, wbits: 3, group_size: 128, ...}   # every QuantConfig field
//   eval: {seqlen: 0, dtype: ""}
//   device: cpu            # cpu | cuda | cuda:N | auto
//   output: {dir: runs}
//
// Sweeps (`sweep:` / `runs:`) live in experiments/sweep.h; they reuse the pieces below.
#pragma once
#include <yaml-cpp/yaml.h>

#include <map>
#include <string>
#include <vector>

#include "quant/quant_config.h"

namespace omniq {

struct ModelSection {
  std::string path;  // Hugging Face folder (config.json + safetensors + tokenizer); required
};

struct DataSection {
  // data.calib_text is stored in ExperimentConfig::quantization.calib_text: QuantConfig owns it
  // (calibrate() reads it there), and one storage place means the two can never disagree.
  std::vector<std::string> eval_datasets{"wikitext2"};  // named, bundled datasets
  std::vector<std::string> eval_texts;                  // extra plain-text files to evaluate on
};

struct EvalSection {
  int seqlen = 0;     // 0 = min(2048, max_position_embeddings)
  std::string dtype;  // "" = f32 on cpu, bf16 on cuda; else f32 | bf16 | f16
};

struct OutputSection {
  std::string dir = "runs";  // run directories are created below it
};

struct ExperimentConfig {
  std::string name;  // the experiment (sweep) name; a sweep point's own name is SweepPoint::name
  ModelSection model;
  DataSection data;
  QuantConfig quantization;  // defaults = QuantConfig's defaults
  EvalSection eval;
  std::string device = "auto";  // cpu | cuda | cuda:N | auto (cuda when a GPU is visible, else cpu)
  OutputSection output;
};

// Field-by-field equality (floats compared exactly: a round trip through YAML must be lossless).
bool operator==(const ExperimentConfig& a, const ExperimentConfig& b);
inline bool operator!=(const ExperimentConfig& a, const ExperimentConfig& b) { return !(a == b); }

// Parses one experiment (a file without `sweep:` / `runs:`) and validates it. `source_name` is the
// file name quoted in errors ("config.yaml:7:10").
ExperimentConfig parse_experiment(const std::string& yaml_text, const std::string& source_name);
ExperimentConfig load_experiment(const std::string& path);

// The resolved config as YAML, every field spelled out (defaults included) in the schema's order.
// parse_experiment(to_yaml(c), any) == c for every valid c.
std::string to_yaml(const ExperimentConfig& c);

// ---- building blocks shared with sweep.cpp -------------------------------------------------

// Where each setting was written (dotted path -> mark of its value, or of its key when the value
// has none; sections -> mark of the section), so a check that runs after overrides are applied
// can still quote the right line.
struct ConfigLocations {
  std::string source;
  std::map<std::string, YAML::Mark> marks;
  // The best mark for `path`: its own, else its section's, else line 1.
  YAML::Mark find(const std::string& path) const;
};

// Parses text into a YAML tree; malformed YAML becomes an omniq::Error quoting source:line:col.
YAML::Node load_yaml_text(const std::string& yaml_text, const std::string& source);
// Reads a config file (a clear error naming the path when it cannot be opened).
std::string read_config_file(const std::string& path);

// The fields of the root map, without validating values. Keys named in `extra_top_keys` (e.g.
// "sweep", "runs") are skipped rather than reported as unknown.
ExperimentConfig parse_experiment_fields(const YAML::Node& root, const std::string& source,
                                         const std::vector<std::string>& extra_top_keys,
                                         ConfigLocations* where);

// Every dotted path of the schema ("name", "quantization.wbits", ..., "output.dir"), in order.
const std::vector<std::string>& experiment_field_paths();
bool is_experiment_field(const std::string& path);

// Sets one field from a YAML value; wrong types are errors quoting source:line:col and the path.
// Unknown paths are errors listing the allowed ones.
// `key_mark` is quoted instead when the value is empty (yaml-cpp marks an empty value at the next
// line, which would send the user to the wrong place).
void set_experiment_field(ExperimentConfig& c, const std::string& path, const YAML::Node& value,
                          const std::string& source, const YAML::Mark& key_mark = YAML::Mark::null_mark());

// The field's value as it appears in to_yaml (lists as "[a, b]"); used to name sweep points.
std::string experiment_field_text(const ExperimentConfig& c, const std::string& path);

// wbits 16 and abits 16: the unquantized baseline (the paper's FP16 row). An experiment may ask
// for it: the runner then calibrates nothing and evaluates the original checkpoint (the method is
// not used). QuantConfig::validate itself refuses W16A16, which quantizes nothing.
inline bool is_unquantized(const QuantConfig& q) { return !q.weight_quant() && !q.act_quant(); }
// QuantConfig::validate, except that W16A16 (is_unquantized) is allowed.
void validate_quantization(const QuantConfig& q);

// Checks values (validate_quantization, device, eval dtype/seqlen, datasets, model path) and
// reports the first problem at the line of the offending key (or of its section).
void validate_experiment(const ExperimentConfig& c, const ConfigLocations& where);

// "<path> at <source>:<line>:<col>: <message>" (path omitted when empty).
[[noreturn]] void fail_at(const std::string& source, const YAML::Mark& mark, const std::string& path,
                          const std::string& message);

}  // namespace omniq
