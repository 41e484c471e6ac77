// Exporting a Hugging Face model folder (config + tokenizer + safetensors weights) that transformers'
// `AutoModelForCausalLM.from_pretrained` loads, with some tensors replaced (e.g. fused,
// fake-quantized weights from a calibration run).
//
// Streaming: the weights are written tensor by tensor (source tensors are read from the mapped
// checkpoint, overrides asked for one at a time), so exporting a 70B model needs about one tensor of
// host RAM.
//
// Crash safety: everything is built in `<out_dir>.partial` (every file fsync'd), a marker file
// `omniq_export.json` is written last, and only then is the folder renamed to `<out_dir>`. A crash at
// any point leaves either no `<out_dir>`, or the previous complete one: nothing half-written is ever
// named like a model folder. An existing `<out_dir>` is replaced only if it is a previous omniq
// export (it has the marker) or empty; the swap is atomic (renameat2 RENAME_EXCHANGE where the file
// system supports it, else rename old aside, rename new in, delete old).
#pragma once
#include <cstddef>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "models/checkpoint.h"
#include "runtime/tensor.h"

namespace omniq {

struct HfExportOptions {
  DType dtype = DType::f16;              // every exported tensor, norms included (HF loads them in the model dtype)
  size_t max_shard_bytes = 5ull << 30;   // 0 = never shard; else huggingface_hub's greedy split
};

// The marker file that makes a folder "a previous omniq export" (safe to replace).
constexpr const char* kHfExportMarker = "omniq_export.json";

// The tensors an export of `ckpt` writes, in layout order: every stored tensor of the layout
// (embeddings, blocks 0..L-1, head) under its canonical `*ForCausalLM` name (`WeightSpec::hf_name`,
// even when the source stores base-model names), without a tied lm_head (as save_pretrained) and
// without synthesized tensors (OPT LayerNorms without elementwise affine).
std::vector<std::string> hf_tensor_names(const ModelCheckpoint& ckpt);

// Writes `out_dir` as a complete Hugging Face folder from the checkpoint in `src_dir`.
//   override_tensor(hf_name): called exactly once per exported tensor, in hf_tensor_names order
//     (embeddings, block 0, block 1, ..., head, also when sharded); return a tensor
//     (any float dtype, CPU or CUDA, the source's shape) to write instead of the source's, or nullptr
//     to copy the source. The pointer must stay valid until the next call (or the export returns), so
//     a caller may build tensors block by block. May be empty (no overrides).
//   Every tensor is converted to opt.dtype; a value that is not finite after conversion (e.g. beyond
//     f16's range 65504) is an error naming the tensor: no non-finite weight is ever written.
//   config.json is copied with "dtype"/"torch_dtype" set to opt.dtype (other keys and their order
//     kept); tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json,
//     vocab.json, merges.txt, tokenizer.model, added_tokens.json are copied when present.
//   extra_files: file name -> contents written into the folder too (e.g. "omniq_quant.json").
//   Sharding: when the weights exceed opt.max_shard_bytes, `model-00001-of-0000N.safetensors` +
//     `model.safetensors.index.json` (metadata.total_size / total_parameters, weight_map), as
//     save_pretrained names them; else one `model.safetensors`.
// Throws omniq::Error (and leaves `out_dir` untouched, no `.partial` behind) on any failure.
void export_hf_model(const std::string& src_dir, const std::string& out_dir,
                     const std::function<const Tensor*(const std::string& hf_name)>& override_tensor,
                     const HfExportOptions& opt = {}, const std::map<std::string, std::string>& extra_files = {});

// Shard assignment as huggingface_hub's `split_torch_state_dict_into_shards`: tensors in order; one
// bigger than the limit gets a shard of its own; otherwise a new shard starts when the next tensor
// would tip the current one over the limit. Returns, per tensor, its shard index (0-based), and the
// shard count in *num_shards. max_shard_bytes 0: everything in shard 0.
std::vector<size_t> hf_shard_plan(const std::vector<size_t>& tensor_bytes, size_t max_shard_bytes,
                                  size_t* num_shards);
// "model.safetensors" for one shard, else "model-00002-of-00005.safetensors" (shard 1 of 5).
std::string hf_shard_file_name(size_t shard, size_t num_shards);

}  // namespace omniq
