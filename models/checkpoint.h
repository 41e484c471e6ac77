// Reading a Hugging Face model folder: `CheckpointReader` hides single-file vs sharded safetensors,
// `ModelCheckpoint` adds config.json and the architecture's weight layout and loads weights one
// decoder block at a time.
//
// Streaming: shards are mmap'd (address space only); `load_block(i)` copies just block i's bytes out
// of the mapping, converts them and uploads them, then tells the kernel those pages may go. Host
// memory stays around one tensor, so a 70B checkpoint streams on a machine with little RAM.
//
// Accepted tensor names (per tensor, the first that exists):
//   1. the `*ForCausalLM` names that `save_pretrained` writes: `model.layers.{i}.…` (LLaMA),
//      `model.decoder.layers.{i}.…` (OPT), `lm_head.weight`;
//   2. the same without the leading `model.`: checkpoints of the base model (`LlamaModel`,
//      `OPTModel`, e.g. the original facebook/opt-* files with `decoder.…` names).
// Tensors the layout does not name (e.g. old `rotary_emb.inv_freq` buffers) are ignored. With
// tie_word_embeddings the lm_head is the embedding and a stored `lm_head.weight` is ignored, as in
// transformers.
#pragma once
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "models/model_config.h"
#include "models/safetensors.h"
#include "runtime/tensor.h"

namespace omniq {

// The tensors of a model directory, from `model.safetensors` or, when absent,
// `model.safetensors.index.json` (its `weight_map`: tensor name -> shard file). Shards are opened
// (mapped and validated) the first time one of their tensors is asked for, then stay mapped.
// Thread-safe for concurrent reads.
class CheckpointReader {
 public:
  // Throws when the folder has neither file, the index is malformed, or a shard it names is missing.
  explicit CheckpointReader(const std::string& model_dir);
  ~CheckpointReader();
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  const std::string& dir() const { return dir_; }
  bool sharded() const { return sharded_; }
  // model.safetensors or model.safetensors.index.json: the file messages name for the checkpoint.
  const std::string& weights_path() const { return weights_path_; }

  std::vector<std::string> names() const;  // sorted
  bool has(const std::string& name) const;
  std::string file_of(const std::string& name) const;  // path of the file holding the tensor
  const SafetensorsTensorInfo& info(const std::string& name) const;
  RawTensorBytes raw(const std::string& name) const;

  // The tensor converted to `dtype` on `dev` (float dtypes are converted on the GPU after upload,
  // so the PCIe copy moves the checkpoint's bytes).
  Tensor load(const std::string& name, DType dtype, Device dev = Device::cpu()) const;
  // Into an existing tensor (any dtype/device) of the same shape.
  void load_into(const std::string& name, Tensor& dst) const;

 private:
  const SafetensorsFile& file_for(const std::string& name) const;
  [[noreturn]] void fail_missing(const std::string& name) const;

  std::string dir_;
  std::string weights_path_;
  bool sharded_ = false;
  std::map<std::string, std::string> weight_map_;  // sharded: tensor -> shard file name
  mutable std::mutex mu_;
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;  // by shard file name
};

// Named tensors of one part of the model; keys are the `WeightSpec::key`s (`q_proj.weight`, …).
struct NamedWeights {
  std::string what;  // "block 3 of data/models/llama-nano", for messages
  std::map<std::string, Tensor> tensors;

  bool has(const std::string& key) const { return tensors.count(key) != 0; }
  const Tensor* find(const std::string& key) const;  // nullptr when absent (optional biases)
  const Tensor& get(const std::string& key) const;   // throws naming `what`, the key and the keys present
  Tensor& get(const std::string& key);
  size_t nbytes() const;
};
using BlockWeights = NamedWeights;

class ModelCheckpoint {
 public:
  // Reads <dir>/config.json, opens the weights and checks every tensor the config implies: present,
  // the shape config.json implies, a loadable dtype. Only headers are read, so a broken checkpoint
  // fails here in milliseconds instead of after the first blocks have run.
  explicit ModelCheckpoint(const std::string& model_dir);

  const std::string& dir() const { return reader_.dir(); }
  const ModelConfig& config() const { return config_; }
  const CheckpointReader& reader() const { return reader_; }
  int64_t num_blocks() const { return config_.num_layers; }

  // The name the checkpoint stores `spec` under (see the accepted names above); "" when absent.
  std::string stored_name(const WeightSpec& spec) const;

  // Block i: norm weights/biases in f32, Linear weights and biases in `compute`, on `dev`.
  BlockWeights load_block(int64_t i, DType compute, Device dev) const;
  // embed_tokens (+ OPT embed_positions, project_in) in `compute`.
  NamedWeights load_embeddings(DType compute, Device dev) const;
  // Final norm (f32), OPT project_out, lm_head (in `compute`). When tied, lm_head.weight aliases
  // `embeddings`' embed_tokens.weight if given (same dtype/device), else reads the embedding again.
  NamedWeights load_head(DType compute, Device dev, const NamedWeights* embeddings = nullptr) const;

 private:
  void check_spec(const WeightSpec& s) const;
  void load_specs(const std::vector<WeightSpec>& specs, DType compute, Device dev, NamedWeights& out) const;

  ModelConfig config_;
  CheckpointReader reader_;
};

}  // namespace omniq
