#include "models/hf_export.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "models/safetensors_writer.h"
#include "runtime/error.h"

namespace omniq {

namespace {

namespace fs = std::filesystem;

// Tokenizer and generation files transformers reads from a model folder; copied when present.
const char* const kCopiedFiles[] = {"tokenizer.json",       "tokenizer_config.json", "special_tokens_map.json",
                                    "generation_config.json", "vocab.json",          "merges.txt",
                                    "tokenizer.model",      "added_tokens.json"};

struct ExportTensor {
  std::string hf_name;  // name written (canonical *ForCausalLM name)
  std::string stored;   // name in the source checkpoint
  Shape shape;
};

std::vector<ExportTensor> plan_tensors(const ModelCheckpoint& ck) {
  const ModelConfig& c = ck.config();
  std::vector<WeightSpec> specs = embedding_weight_specs(c);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    std::vector<WeightSpec> b = block_weight_specs(c, i);
    specs.insert(specs.end(), b.begin(), b.end());
  }
  std::vector<WeightSpec> h = head_weight_specs(c);
  specs.insert(specs.end(), h.begin(), h.end());

  std::vector<ExportTensor> out;
  std::set<std::string> seen;
  for (const WeightSpec& s : specs) {
    if (!s.stored) continue;  // synthesized identity LayerNorm: not in HF checkpoints either
    if (s.key == "lm_head.weight" && c.tie_word_embeddings) continue;  // save_pretrained drops tied weights
    if (!seen.insert(s.hf_name).second) continue;
    std::string stored = ck.stored_name(s);
    OMNIQ_CHECK(!stored.empty(), "%s: tensor '%s' is missing from the checkpoint", ck.dir().c_str(),
                s.hf_name.c_str());
    out.push_back({s.hf_name, stored, s.shape});
  }
  return out;
}

const char* hf_dtype_name(DType dt) {
  switch (dt) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    default: OMNIQ_FAIL("HF export: dtype %s is not a float dtype (use f16, bf16 or f32)", dtype_name(dt));
  }
}

// Index of the first element that is Inf or NaN (exponent bits all ones), or -1. Bit tests keep
// this at memory speed on a 70B export.
int64_t first_non_finite(const Tensor& t) {
  const int64_t n = t.numel();
  if (t.dtype() == DType::f32) {
    const uint32_t* p = t.data_as<uint32_t>();
    for (int64_t i = 0; i < n; ++i)
      if ((p[i] & 0x7f800000u) == 0x7f800000u) return i;
  } else {
    const uint16_t mask = t.dtype() == DType::f16 ? 0x7c00 : 0x7f80;
    const uint16_t* p = t.data_as<uint16_t>();
    for (int64_t i = 0; i < n; ++i)
      if ((p[i] & mask) == mask) return i;
  }
  return -1;
}

bool is_regular_file(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  OMNIQ_CHECK(in.good(), "%s: cannot open for reading: %s", path.c_str(), std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  OMNIQ_CHECK(!in.bad(), "%s: read failed", path.c_str());
  return ss.str();
}

void remove_tree(const std::string& p) noexcept {
  std::error_code ec;
  fs::remove_all(p, ec);  // best effort: called on cleanup paths
}

std::string strip_slashes(std::string p) {
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

// What is at out_dir now: nothing, an omniq export / empty folder (replaceable), or anything else.
enum class OutState { absent, replaceable };

OutState check_out_dir(const std::string& out) {
  struct stat st;
  if (::lstat(out.c_str(), &st) != 0) {
    OMNIQ_CHECK(errno == ENOENT, "%s: cannot inspect the output folder: %s", out.c_str(), std::strerror(errno));
    return OutState::absent;
  }
  OMNIQ_CHECK(S_ISDIR(st.st_mode), "%s: exists and is not a directory; refusing to replace it with a model folder",
              out.c_str());
  std::error_code ec;
  const bool empty = fs::is_empty(out, ec);
  OMNIQ_CHECK(empty || is_regular_file(out + "/" + kHfExportMarker),
              "%s: exists and is not a previous omniq export (no %s in it); refusing to overwrite it — remove it or "
              "choose another output folder",
              out.c_str(), kHfExportMarker);
  return OutState::replaceable;
}

// Moves the finished `partial` folder to `out`, replacing a previous export atomically.
void swap_into_place(const std::string& partial, const std::string& out, OutState state) {
  if (state == OutState::absent) {
    if (::rename(partial.c_str(), out.c_str()) != 0) {
      int err = errno;
      OMNIQ_FAIL("%s: cannot rename the finished export %s into place: %s", out.c_str(), partial.c_str(),
                 std::strerror(err));
    }
  } else if (::renameat2(AT_FDCWD, partial.c_str(), AT_FDCWD, out.c_str(), RENAME_EXCHANGE) == 0) {
    remove_tree(partial);  // now holds the previous export
  } else {
    // File systems without RENAME_EXCHANGE: old aside, new in, old deleted. A crash in between leaves
    // out_dir absent and the old export at `.old` (still complete), never a partial folder.
    const std::string old = out + ".old";
    remove_tree(old);
    if (::rename(out.c_str(), old.c_str()) != 0) {
      int err = errno;
      OMNIQ_FAIL("%s: cannot move the previous export aside to %s: %s", out.c_str(), old.c_str(), std::strerror(err));
    }
    if (::rename(partial.c_str(), out.c_str()) != 0) {
      int err = errno;
      ::rename(old.c_str(), out.c_str());  // put the previous export back
      OMNIQ_FAIL("%s: cannot rename the finished export %s into place: %s", out.c_str(), partial.c_str(),
                 std::strerror(err));
    }
    remove_tree(old);
  }
  fsync_directory(parent_directory(out));
}

// The host tensor to write for `t`: in `dtype`, checked for shape and finiteness. Returns either
// `*src` itself (host, right dtype) or a converted copy held in `hold`.
const Tensor& export_tensor(const ExportTensor& e, const Tensor* over, const CheckpointReader& reader, DType dtype,
                            Tensor& hold) {
  const Tensor* t = over;
  if (over) {
    OMNIQ_CHECK(over->defined(), "HF export: the override for '%s' is an undefined tensor", e.hf_name.c_str());
    OMNIQ_CHECK(dtype_is_float(over->dtype()), "HF export: the override for '%s' is %s; weights must be f32, f16 or bf16",
                e.hf_name.c_str(), over->str().c_str());
    OMNIQ_CHECK(over->shape() == e.shape, "HF export: the override for '%s' is %s but the checkpoint's tensor is %s",
                e.hf_name.c_str(), over->str().c_str(), e.shape.str().c_str());
    if (over->device().is_cuda()) {
      // Convert on the GPU first: fewer bytes over PCIe.
      hold = over->dtype() == dtype ? over->to(Device::cpu()) : over->to(dtype).to(Device::cpu());
      t = &hold;
    } else if (over->dtype() != dtype) {
      hold = over->to(dtype);
      t = &hold;
    }
  } else {
    hold = reader.load(e.stored, dtype, Device::cpu());
    t = &hold;
  }
  int64_t bad = first_non_finite(*t);
  OMNIQ_CHECK(bad < 0, "HF export: %s tensor '%s' has a non-finite value at element %lld after conversion to %s%s; "
              "no non-finite weight is written",
              over ? "overridden" : "source", e.hf_name.c_str(), static_cast<long long>(bad), dtype_name(dtype),
              dtype == DType::f16 ? " (|value| > 65504 overflows f16: export in bf16 or f32)" : "");
  return *t;
}

void write_weights(const std::string& partial, const ModelCheckpoint& ck, const std::vector<ExportTensor>& tensors,
                   const std::function<const Tensor*(const std::string&)>& override_tensor, const HfExportOptions& opt,
                   std::set<std::string>* files_written) {
  std::vector<size_t> bytes;
  size_t total_bytes = 0;
  int64_t total_params = 0;
  for (const ExportTensor& e : tensors) {
    bytes.push_back(static_cast<size_t>(e.shape.numel()) * dtype_size(opt.dtype));
    total_bytes += bytes.back();
    total_params += e.shape.numel();
  }
  size_t num_shards = 0;
  std::vector<size_t> plan = hf_shard_plan(bytes, opt.max_shard_bytes, &num_shards);
  std::vector<std::vector<SafetensorsEntry>> entries(num_shards);
  std::vector<size_t> last(num_shards, 0);  // index of each shard's last tensor: the writer finishes there
  for (size_t i = 0; i < tensors.size(); ++i) {
    entries[plan[i]].push_back({tensors[i].hf_name, opt.dtype, tensors[i].shape});
    last[plan[i]] = i;
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}};  // transformers checks format == "pt"

  // Tensors are produced in layout order. Shards are contiguous runs of that order except the
  // singletons of oversized tensors, so at most two writers are open at once.
  std::vector<std::unique_ptr<SafetensorsStreamWriter>> writers(num_shards);
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const size_t s = plan[i];
    const std::string file = hf_shard_file_name(s, num_shards);
    if (!writers[s]) writers[s] = std::make_unique<SafetensorsStreamWriter>(partial + "/" + file, entries[s], meta);
    const Tensor* over = override_tensor ? override_tensor(tensors[i].hf_name) : nullptr;
    Tensor hold;
    writers[s]->write(tensors[i].hf_name, export_tensor(tensors[i], over, ck.reader(), opt.dtype, hold));
    weight_map[tensors[i].hf_name] = file;
    if (last[s] == i) {
      writers[s]->finish();
      writers[s].reset();
    }
  }
  if (tensors.empty()) {  // degenerate, but still a valid (empty) file
    SafetensorsStreamWriter w(partial + "/model.safetensors", {}, meta);
    w.finish();
  }
  for (size_t s = 0; s < num_shards; ++s) files_written->insert(hf_shard_file_name(s, num_shards));
  if (num_shards > 1) {
    // nlohmann::json keeps keys sorted, like transformers' json.dumps(index, indent=2, sort_keys=True).
    nlohmann::json index = {{"metadata", {{"total_parameters", total_params}, {"total_size", total_bytes}}},
                            {"weight_map", weight_map}};
    write_file_atomic(partial + "/model.safetensors.index.json", index.dump(2) + "\n");
    files_written->insert("model.safetensors.index.json");
  }
}

std::string export_config(const std::string& src_dir, DType dtype) {
  const std::string path = src_dir + "/config.json";
  nlohmann::ordered_json cfg;
  try {
    cfg = nlohmann::ordered_json::parse(read_whole_file(path));
  } catch (const nlohmann::json::exception& e) {
    OMNIQ_FAIL("%s: not valid JSON (%s)", path.c_str(), e.what());
  }
  // transformers 5 writes "dtype", 4.x "torch_dtype"; update whichever the source has (both read it).
  const bool has_dtype = cfg.contains("dtype"), has_torch = cfg.contains("torch_dtype");
  if (has_dtype) cfg["dtype"] = hf_dtype_name(dtype);
  if (has_torch || !has_dtype) cfg["torch_dtype"] = hf_dtype_name(dtype);
  return cfg.dump(2) + "\n";
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::vector<size_t> hf_shard_plan(const std::vector<size_t>& tensor_bytes, size_t max_shard_bytes,
                                  size_t* num_shards) {
  std::vector<std::vector<size_t>> shards;
  std::vector<size_t> cur;
  size_t cur_bytes = 0;
  for (size_t i = 0; i < tensor_bytes.size(); ++i) {
    const size_t b = tensor_bytes[i];
    if (max_shard_bytes != 0) {
      if (b > max_shard_bytes) {  // alone in a shard, appended before the one being filled
        shards.push_back({i});
        continue;
      }
      if (cur_bytes + b > max_shard_bytes) {
        shards.push_back(std::move(cur));
        cur.clear();
        cur_bytes = 0;
      }
    }
    cur.push_back(i);
    cur_bytes += b;
  }
  if (!cur.empty()) shards.push_back(std::move(cur));
  std::vector<size_t> plan(tensor_bytes.size(), 0);
  for (size_t s = 0; s < shards.size(); ++s)
    for (size_t i : shards[s]) plan[i] = s;
  *num_shards = std::max<size_t>(1, shards.size());
  return plan;
}

std::string hf_shard_file_name(size_t shard, size_t num_shards) {
  if (num_shards <= 1) return "model.safetensors";
  return strformat("model-%05zu-of-%05zu.safetensors", shard + 1, num_shards);
}

std::vector<std::string> hf_tensor_names(const ModelCheckpoint& ckpt) {
  std::vector<std::string> out;
  for (const ExportTensor& e : plan_tensors(ckpt)) out.push_back(e.hf_name);
  return out;
}

void export_hf_model(const std::string& src_dir_in, const std::string& out_dir_in,
                     const std::function<const Tensor*(const std::string& hf_name)>& override_tensor,
                     const HfExportOptions& opt, const std::map<std::string, std::string>& extra_files) {
  const std::string src_dir = strip_slashes(src_dir_in), out = strip_slashes(out_dir_in);
  OMNIQ_CHECK(!out.empty(), "HF export: empty output folder name");
  hf_dtype_name(opt.dtype);  // validates the dtype before any work
  ModelCheckpoint ck(src_dir);  // validates config and every tensor header up front

  std::error_code ec;
  OMNIQ_CHECK(!fs::equivalent(src_dir, out, ec), "HF export: the output folder %s is the source model folder %s",
              out.c_str(), src_dir.c_str());
  const OutState state = check_out_dir(out);
  std::set<std::string> reserved = {"config.json", "model.safetensors", "model.safetensors.index.json", kHfExportMarker};
  for (const char* f : kCopiedFiles) reserved.insert(f);
  for (const auto& kv : extra_files) {
    const std::string& n = kv.first;
    OMNIQ_CHECK(!n.empty() && n != "." && n != ".." && n.find('/') == std::string::npos,
                "HF export: extra file name '%s' must be a plain file name", n.c_str());
    OMNIQ_CHECK(!reserved.count(n) && n.compare(0, 6, "model-") != 0,
                "HF export: extra file '%s' would replace a file of the model folder", n.c_str());
  }
  const std::vector<ExportTensor> tensors = plan_tensors(ck);

  const std::string parent = parent_directory(out);
  fs::create_directories(parent, ec);
  OMNIQ_CHECK(!ec, "%s: cannot create the parent folder %s: %s", out.c_str(), parent.c_str(), ec.message().c_str());
  const std::string partial = out + ".partial";
  remove_tree(partial);  // left by a crashed export: never complete, safe to drop
  if (::mkdir(partial.c_str(), 0755) != 0) {
    int err = errno;
    OMNIQ_FAIL("%s: cannot create the working folder %s: %s", out.c_str(), partial.c_str(), std::strerror(err));
  }
  try {
    std::set<std::string> files;  // for the marker's listing
    write_weights(partial, ck, tensors, override_tensor, opt, &files);
    write_file_atomic(partial + "/config.json", export_config(src_dir, opt.dtype));
    files.insert("config.json");
    for (const char* f : kCopiedFiles) {
      const std::string from = src_dir + "/" + f;
      if (!is_regular_file(from)) continue;
      write_file_atomic(partial + "/" + f, read_whole_file(from));
      files.insert(f);
    }
    for (const auto& kv : extra_files) {
      write_file_atomic(partial + "/" + kv.first, kv.second);
      files.insert(kv.first);
    }
    // The marker goes last: a folder with it is complete (and replaceable by the next export).
    nlohmann::ordered_json marker = {{"format", "omniq-hf-export"},
                                     {"version", 1},
                                     {"source", src_dir},
                                     {"dtype", hf_dtype_name(opt.dtype)},
                                     {"num_tensors", tensors.size()},
                                     {"files", nlohmann::json::array()}};
    for (const std::string& f : files) marker["files"].push_back(f);
    write_file_atomic(partial + "/" + kHfExportMarker, marker.dump(2) + "\n");
    fsync_directory(partial);
    swap_into_place(partial, out, state);
  } catch (...) {
    remove_tree(partial);
    throw;
  }
}

}  // namespace omniq
