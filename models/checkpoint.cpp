#include "models/checkpoint.h"

#include <sys/stat.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "runtime/error.h"

namespace omniq {

namespace {

bool is_file(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  if (s.size() > 240) s = s.substr(0, 240) + "...";  // parser messages quote the input they choked on
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CheckpointReader

CheckpointReader::CheckpointReader(const std::string& model_dir) : dir_(model_dir) {
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
  OMNIQ_CHECK(is_dir(dir_), "%s: no such model directory", dir_.c_str());
  const std::string single = dir_ + "/model.safetensors";
  const std::string index = dir_ + "/model.safetensors.index.json";
  // Same preference as transformers: the single file wins when both exist.
  if (is_file(single)) {
    weights_path_ = single;
    files_[""] = std::make_unique<SafetensorsFile>(single);  // one file: validate it right away
    return;
  }
  if (!is_file(index)) {
    bool has_bin = is_file(dir_ + "/pytorch_model.bin") || is_file(dir_ + "/pytorch_model.bin.index.json");
    OMNIQ_FAIL("%s: no model.safetensors or model.safetensors.index.json in this folder%s", dir_.c_str(),
               has_bin ? " (it has pytorch_model.bin: omniq reads safetensors only; re-save the model with "
                         "save_pretrained(..., safe_serialization=True))"
                       : "");
  }
  sharded_ = true;
  weights_path_ = index;
  std::ifstream in(index, std::ios::binary);
  OMNIQ_CHECK(in.good(), "%s: cannot open", index.c_str());
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    OMNIQ_FAIL("%s: not valid JSON (%s)", index.c_str(), one_line(e.what()).c_str());
  }
  auto wm = j.is_object() ? j.find("weight_map") : j.end();
  OMNIQ_CHECK(wm != j.end() && wm->is_object(), "%s: needs a 'weight_map' object (tensor name -> shard file)",
              index.c_str());
  std::set<std::string> checked;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    OMNIQ_CHECK(it.value().is_string() && !it.value().get<std::string>().empty(),
                "%s: weight_map entry for tensor '%s' must be a shard file name, got %s", index.c_str(),
                it.key().c_str(), it.value().dump().c_str());
    const std::string shard = it.value().get<std::string>();
    weight_map_[it.key()] = shard;
    // Checking that shards exist is a stat each; mapping and validating them waits until used.
    if (checked.insert(shard).second)
      OMNIQ_CHECK(is_file(dir_ + "/" + shard),
                  "%s: names shard '%s' (for tensor '%s'), which does not exist in %s — the download is incomplete",
                  index.c_str(), shard.c_str(), it.key().c_str(), dir_.c_str());
  }
}

CheckpointReader::~CheckpointReader() = default;

std::vector<std::string> CheckpointReader::names() const {
  if (!sharded_) return files_.at("")->names();
  std::vector<std::string> out;
  for (const auto& kv : weight_map_) out.push_back(kv.first);
  return out;
}

bool CheckpointReader::has(const std::string& name) const {
  return sharded_ ? weight_map_.count(name) != 0 : files_.at("")->has(name);
}

void CheckpointReader::fail_missing(const std::string& name) const {
  OMNIQ_FAIL("%s: tensor '%s' is not in the checkpoint", weights_path_.c_str(), name.c_str());
}

std::string CheckpointReader::file_of(const std::string& name) const {
  if (!has(name)) fail_missing(name);
  return sharded_ ? dir_ + "/" + weight_map_.at(name) : weights_path_;
}

const SafetensorsFile& CheckpointReader::file_for(const std::string& name) const {
  if (!sharded_) {
    const SafetensorsFile& f = *files_.at("");
    if (!f.has(name)) fail_missing(name);
    return f;
  }
  auto it = weight_map_.find(name);
  if (it == weight_map_.end()) fail_missing(name);
  std::lock_guard<std::mutex> lock(mu_);
  std::unique_ptr<SafetensorsFile>& slot = files_[it->second];
  if (!slot) slot = std::make_unique<SafetensorsFile>(dir_ + "/" + it->second);
  OMNIQ_CHECK(slot->has(name), "%s: the index puts tensor '%s' in shard %s, but that shard has no such tensor",
              weights_path_.c_str(), name.c_str(), slot->path().c_str());
  return *slot;  // files_ entries are never erased, so the reference outlives the lock
}

const SafetensorsTensorInfo& CheckpointReader::info(const std::string& name) const {
  return file_for(name).info(name);
}

RawTensorBytes CheckpointReader::raw(const std::string& name) const { return file_for(name).raw(name); }

Tensor CheckpointReader::load(const std::string& name, DType dtype, Device dev) const {
  const SafetensorsFile& f = file_for(name);
  Tensor host = f.read(name);  // the checkpoint's own dtype; the only host copy
  f.release_pages(name);
  // Float<->float conversions for a GPU run on the GPU after the upload (fewer bytes over PCIe,
  // no slow host loop); everything else converts on the host, where integer conversions are exact.
  const bool convert_on_gpu = dev.is_cuda() && dtype_is_float(host.dtype()) && dtype_is_float(dtype);
  if (host.dtype() != dtype && !convert_on_gpu) host = host.to(dtype);
  if (dev.is_cpu()) return host;
  Tensor d = host.to(dev);
  host = Tensor();
  if (d.dtype() == dtype) return d;
  return d.to(dtype);
}

void CheckpointReader::load_into(const std::string& name, Tensor& dst) const {
  const SafetensorsFile& f = file_for(name);
  const SafetensorsTensorInfo& i = f.info(name);
  OMNIQ_CHECK(dst.defined() && i.shape(f.path()) == dst.shape(),
              "%s: tensor '%s' has shape %s but the destination is %s", f.path().c_str(), name.c_str(),
              i.shape_str().c_str(), dst.defined() ? dst.str().c_str() : "an undefined tensor");
  Tensor t = load(name, dst.dtype(), dst.device());
  dst.copy_from(t);
}

// ---------------------------------------------------------------------------------------------
// NamedWeights

const Tensor* NamedWeights::find(const std::string& key) const {
  auto it = tensors.find(key);
  return it == tensors.end() ? nullptr : &it->second;
}

Tensor& NamedWeights::get(const std::string& key) {
  auto it = tensors.find(key);
  if (it == tensors.end()) {
    std::string keys;
    for (const auto& kv : tensors) keys += (keys.empty() ? "" : ", ") + kv.first;
    OMNIQ_FAIL("%s has no weight '%s' (it has: %s)", what.c_str(), key.c_str(), keys.c_str());
  }
  return it->second;
}

const Tensor& NamedWeights::get(const std::string& key) const { return const_cast<NamedWeights*>(this)->get(key); }

size_t NamedWeights::nbytes() const {
  size_t n = 0;
  for (const auto& kv : tensors) n += kv.second.nbytes();
  return n;
}

// ---------------------------------------------------------------------------------------------
// ModelCheckpoint

ModelCheckpoint::ModelCheckpoint(const std::string& model_dir)
    : config_(ModelConfig::from_dir(model_dir)), reader_(model_dir) {
  for (const WeightSpec& s : embedding_weight_specs(config_)) check_spec(s);
  for (int64_t i = 0; i < config_.num_layers; ++i)
    for (const WeightSpec& s : block_weight_specs(config_, i)) check_spec(s);
  for (const WeightSpec& s : head_weight_specs(config_)) check_spec(s);
}

std::string ModelCheckpoint::stored_name(const WeightSpec& s) const {
  if (reader_.has(s.hf_name)) return s.hf_name;
  const std::string prefix = "model.";
  if (s.hf_name.compare(0, prefix.size(), prefix) == 0) {
    std::string base = s.hf_name.substr(prefix.size());
    if (reader_.has(base)) return base;
  }
  return "";
}

void ModelCheckpoint::check_spec(const WeightSpec& s) const {
  if (!s.stored) return;
  const std::string name = stored_name(s);
  if (name.empty()) {
    const bool lm = s.key == "lm_head.weight" && !config_.tie_word_embeddings;
    const bool prefixed = s.hf_name.compare(0, 6, "model.") == 0;
    OMNIQ_FAIL("%s: tensor '%s'%s is missing from the checkpoint; %s implies it with shape %s = %s%s",
               reader_.weights_path().c_str(), s.hf_name.c_str(),
               prefixed ? (" (or '" + s.hf_name.substr(6) + "')").c_str() : "", config_.source.c_str(),
               s.shape.str().c_str(), s.why.c_str(),
               lm ? " (tie_word_embeddings is false, so the lm_head must be stored)" : "");
  }
  const SafetensorsTensorInfo& info = reader_.info(name);
  const std::string file = reader_.file_of(name);
  bool same = info.dims.size() == static_cast<size_t>(s.shape.ndim);
  for (int d = 0; same && d < s.shape.ndim; ++d) same = info.dims[d] == s.shape[d];
  OMNIQ_CHECK(same, "%s: tensor '%s' has shape %s but %s implies %s = %s", file.c_str(), name.c_str(),
              info.shape_str().c_str(), config_.source.c_str(), s.shape.str().c_str(), s.why.c_str());
  OMNIQ_CHECK(info.loadable && dtype_is_float(info.dtype),
              "%s: tensor '%s' has dtype %s; model weights must be F32, F16 or BF16", file.c_str(), name.c_str(),
              info.dtype_str.c_str());
}

void ModelCheckpoint::load_specs(const std::vector<WeightSpec>& specs, DType compute, Device dev,
                                 NamedWeights& out) const {
  OMNIQ_CHECK(dtype_is_float(compute), "loading %s: the compute dtype must be f32, f16 or bf16, got %s",
              out.what.c_str(), dtype_name(compute));
  for (const WeightSpec& s : specs) {
    if (out.has(s.key)) continue;  // filled by the caller (tied lm_head)
    const DType dt = weight_role_dtype(s.role, compute);
    if (!s.stored) {  // LayerNorm without elementwise affine: the identity parameters
      out.tensors.emplace(s.key, Tensor::full(s.shape, s.role == WeightRole::norm_weight ? 1.0f : 0.0f, dt, dev));
      continue;
    }
    check_spec(s);  // cheap; guards callers that bypassed the constructor's check (none today)
    out.tensors.emplace(s.key, reader_.load(stored_name(s), dt, dev));
  }
}

BlockWeights ModelCheckpoint::load_block(int64_t i, DType compute, Device dev) const {
  BlockWeights w;
  w.what = strformat("block %lld of %s", static_cast<long long>(i), dir().c_str());
  load_specs(block_weight_specs(config_, i), compute, dev, w);
  return w;
}

NamedWeights ModelCheckpoint::load_embeddings(DType compute, Device dev) const {
  NamedWeights w;
  w.what = "the embeddings of " + dir();
  load_specs(embedding_weight_specs(config_), compute, dev, w);
  return w;
}

NamedWeights ModelCheckpoint::load_head(DType compute, Device dev, const NamedWeights* embeddings) const {
  NamedWeights w;
  w.what = "the head of " + dir();
  if (config_.tie_word_embeddings && embeddings) {
    const Tensor* e = embeddings->find("embed_tokens.weight");
    if (e && e->dtype() == compute && e->device() == dev) w.tensors.emplace("lm_head.weight", e->alias());
  }
  load_specs(head_weight_specs(config_), compute, dev, w);
  return w;
}

}  // namespace omniq
