// One HDF5 file per run point (`run.h5`): the resolved config, the environment, per-block
// calibration metrics and learned parameters, and the evaluation results. Layout: docs/hdf5-layout.md.
//
// The file is written incrementally and flushed after every block, and it never claims more than
// was done: `status` is "running" until the last evaluation is written, then "complete" (or
// "failed" with an `error` attribute). Reopening the file of an interrupted run keeps the blocks it
// already holds and rewrites those that are done again, so h5py/pandas always see a consistent file.
#pragma once
#include <hdf5.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "experiments/experiment_config.h"
#include "quant/calibrate.h"
#include "runtime/tensor.h"

namespace omniq {

// Where and with what a run was made (root attributes of run.h5).
struct RunEnvironment {
  std::string device;          // "cpu", "cuda:0"
  std::string device_name;     // GPU name, or the CPU model
  std::string cuda_driver;     // "13.0" when on a GPU, else ""
  std::string cuda_runtime;    // likewise
  std::string omniq_commit;    // `git rev-parse HEAD` of the source tree, or "unknown"
  std::string hostname;
  std::string started_utc;     // ISO 8601
  bool deterministic = true;   // flash-attention backward mode (reruns bit-identical on one GPU model)
};
// Collects the environment of a run on `dev` (never throws: unknown facts become "unknown").
RunEnvironment collect_environment(Device dev);

struct EvalRecord {
  std::string source;  // dataset name or text file path
  double ppl = 0, nll = 0, seconds = 0;
  int64_t tokens = 0;  // predicted tokens
  int64_t windows = 0, seqlen = 0;
};

// What read_run_log gives back (the metrics the sweep summary shows).
struct RunRecord {
  std::string status;  // "" when the file does not exist or cannot be read
  std::string error;
  std::map<int64_t, BlockReport> blocks;
  std::map<std::string, EvalRecord> evals;  // by group name under /eval
};

class RunLog {
 public:
  // Opens `path` for writing: creates it, or reopens the file of an interrupted run (its finished
  // blocks are kept). A file that cannot be opened (e.g. torn by a crash) is moved aside to
  // `<path>.corrupt` and a new one is started.
  explicit RunLog(const std::string& path);
  ~RunLog();
  RunLog(const RunLog&) = delete;
  RunLog& operator=(const RunLog&) = delete;

  // Root attributes: `config_yaml`, `point_name`, `experiment_name`, `model_path`, `device_config`
  // and one scalar per quantization field (`quantization.wbits`, ...).
  void write_config(const ExperimentConfig& c, const std::string& point_name);
  void write_environment(const RunEnvironment& env);
  // "running" | "complete" | "failed"; flushes. "running" also drops a stale `error` and /eval.
  void set_status(const std::string& status);
  void set_error(const std::string& message);  // `error` attribute + status "failed"; flushes

  bool has_block(int64_t block) const { return blocks_.count(block) != 0; }
  // Writes (or rewrites) /blocks/block_NNN with its learned parameters, rewrites /summary, flushes.
  void write_block(const BlockReport& r, const std::vector<std::pair<std::string, Tensor>>& params);
  // /eval/<name> attributes; flushes.
  void write_eval(const std::string& name, const EvalRecord& e);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void open_or_create();
  void load_existing_blocks();
  void write_summary();
  std::string path_;
  hid_t file_ = -1;
  std::map<int64_t, BlockReport> blocks_;  // what the file holds, for /summary
};

// Reads status, error, blocks (metrics only) and evals of a run.h5; status "" when missing/unreadable.
RunRecord read_run_log(const std::string& path);

// The learned parameters of a finished block from calibrate_model's state file
// (`learned.<name>` tensors of <state_dir>/block_NNN.safetensors), as f32 host tensors.
std::vector<std::pair<std::string, Tensor>> read_learned_params(const std::string& state_dir, int64_t block);

// "block_007"
std::string block_group_name(int64_t block);
// A dataset label as an HDF5 link name ('/' would make a path): "data/x.txt" -> "data_x.txt".
std::string h5_safe_name(const std::string& label);

}  // namespace omniq
