// run.h5 writer/reader on the stable HDF5 C API (H5F/H5G/H5D/H5A/H5S/H5T only, so it builds against
// HDF5 1.10 and 1.14 alike). Strings are variable-length UTF-8 (h5py reads them as `str`).
#include "experiments/h5_log.h"


#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <fstream>
#include <set>

#include "models/safetensors.h"
#include "ops/attention.h"
#include "runtime/error.h"

#ifdef OMNIQ_HAS_CUDA
#include <cuda_runtime.h>
#endif

namespace omniq {

namespace {

// Every HDF5 call that can fail goes through this: HDF5's own error printing is switched off (a
// probe such as "does this attribute exist" is not an error), and a real failure becomes an
// omniq::Error naming the file and the operation.
#define H5_CHECK(expr, path)                                                                   \
  do {                                                                                         \
    if ((expr) < 0) OMNIQ_FAIL("HDF5 error in %s: %s failed", (path).c_str(), #expr);          \
  } while (0)

void quiet_hdf5() {
  static bool done = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)done;
}

// RAII for hid_t handles of any kind (H5Oclose closes groups/datasets, others have their own).
struct Handle {
  hid_t id;
  herr_t (*close)(hid_t);
  Handle(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  ~Handle() {
    if (id >= 0) close(id);
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  operator hid_t() const { return id; }
};

bool link_exists(hid_t loc, const std::string& name) { return H5Lexists(loc, name.c_str(), H5P_DEFAULT) > 0; }

void delete_link(hid_t loc, const std::string& name) {
  if (link_exists(loc, name)) H5Ldelete(loc, name.c_str(), H5P_DEFAULT);
}

hid_t open_or_create_group(hid_t loc, const std::string& name) {
  if (link_exists(loc, name)) return H5Gopen2(loc, name.c_str(), H5P_DEFAULT);
  return H5Gcreate2(loc, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
}

// ---- attributes ----------------------------------------------------------------------------

void write_attr(hid_t obj, const std::string& name, hid_t mem_type, hid_t file_type, const void* value) {
  if (H5Aexists(obj, name.c_str()) > 0) H5Adelete(obj, name.c_str());
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attr(H5Acreate2(obj, name.c_str(), file_type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  OMNIQ_CHECK(attr.id >= 0, "HDF5: cannot create attribute '%s'", name.c_str());
  OMNIQ_CHECK(H5Awrite(attr, mem_type, value) >= 0, "HDF5: cannot write attribute '%s'", name.c_str());
}

hid_t vlen_string_type() {
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, H5T_VARIABLE);
  H5Tset_cset(t, H5T_CSET_UTF8);
  return t;
}

void attr_str(hid_t obj, const std::string& name, const std::string& value) {
  Handle t(vlen_string_type(), H5Tclose);
  const char* p = value.c_str();
  write_attr(obj, name, t, t, &p);
}
void attr_i64(hid_t obj, const std::string& name, int64_t v) { write_attr(obj, name, H5T_NATIVE_INT64, H5T_STD_I64LE, &v); }
void attr_u64(hid_t obj, const std::string& name, uint64_t v) { write_attr(obj, name, H5T_NATIVE_UINT64, H5T_STD_U64LE, &v); }
void attr_f64(hid_t obj, const std::string& name, double v) { write_attr(obj, name, H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE, &v); }
void attr_f32(hid_t obj, const std::string& name, float v) { write_attr(obj, name, H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, &v); }

bool read_attr_str(hid_t obj, const std::string& name, std::string* out) {
  if (H5Aexists(obj, name.c_str()) <= 0) return false;
  Handle attr(H5Aopen(obj, name.c_str(), H5P_DEFAULT), H5Aclose);
  Handle ftype(H5Aget_type(attr), H5Tclose);
  if (H5Tget_class(ftype) != H5T_STRING) return false;
  if (H5Tis_variable_str(ftype) > 0) {
    Handle t(vlen_string_type(), H5Tclose);
    char* p = nullptr;
    if (H5Aread(attr, t, &p) < 0) return false;
    *out = p ? p : "";
    if (p) H5free_memory(p);
  } else {  // fixed-length (written by another tool)
    size_t n = H5Tget_size(ftype);
    std::string buf(n, '\0');
    if (H5Aread(attr, ftype, &buf[0]) < 0) return false;
    *out = buf.c_str();
  }
  return true;
}

template <typename T>
bool read_attr_num(hid_t obj, const std::string& name, hid_t mem_type, T* out) {
  if (H5Aexists(obj, name.c_str()) <= 0) return false;
  Handle attr(H5Aopen(obj, name.c_str(), H5P_DEFAULT), H5Aclose);
  return H5Aread(attr, mem_type, out) >= 0;  // HDF5 converts between numeric types
}

// ---- datasets ------------------------------------------------------------------------------

void write_dataset(hid_t loc, const std::string& name, hid_t mem_type, hid_t file_type, const std::vector<hsize_t>& dims,
                   const void* data) {
  delete_link(loc, name);
  Handle space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  Handle ds(H5Dcreate2(loc, name.c_str(), file_type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  OMNIQ_CHECK(ds.id >= 0, "HDF5: cannot create dataset '%s'", name.c_str());
  hsize_t n = 1;
  for (hsize_t d : dims) n *= d;
  if (n > 0) OMNIQ_CHECK(H5Dwrite(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0, "HDF5: cannot write '%s'", name.c_str());
}

template <typename T>
std::vector<T> read_dataset_1d(hid_t loc, const std::string& name, hid_t mem_type) {
  std::vector<T> v;
  if (!link_exists(loc, name)) return v;
  Handle ds(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), H5Dclose);
  Handle space(H5Dget_space(ds), H5Sclose);
  hssize_t n = H5Sget_simple_extent_npoints(space);
  if (n <= 0) return v;
  v.resize(static_cast<size_t>(n));
  if (H5Dread(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()) < 0) v.clear();
  return v;
}

BlockReport read_block_group(hid_t g, int64_t block) {
  BlockReport r;
  r.block = block;
  r.epoch_loss = read_dataset_1d<double>(g, "epoch_loss", H5T_NATIVE_DOUBLE);
  read_attr_num(g, "final_loss", H5T_NATIVE_DOUBLE, &r.final_loss);
  read_attr_num(g, "seconds", H5T_NATIVE_DOUBLE, &r.seconds);
  read_attr_num(g, "peak_bytes", H5T_NATIVE_INT64, &r.peak_bytes);
  int64_t v = 0;
  if (read_attr_num(g, "nan_retries", H5T_NATIVE_INT64, &v)) r.nan_retries = static_cast<int>(v);
  read_attr_num(g, "train_steps", H5T_NATIVE_INT64, &r.train_steps);  // absent in files before session 4
  read_attr_num(g, "graph_steps", H5T_NATIVE_INT64, &r.graph_steps);
  if (read_attr_num(g, "resumed", H5T_NATIVE_INT64, &(v = 0))) r.resumed = v != 0;
  return r;
}

// Every block_NNN group under /blocks.
std::map<int64_t, BlockReport> read_blocks(hid_t file) {
  std::map<int64_t, BlockReport> out;
  if (!link_exists(file, "blocks")) return out;
  Handle blocks(H5Gopen2(file, "blocks", H5P_DEFAULT), H5Gclose);
  H5G_info_t info;
  if (H5Gget_info(blocks, &info) < 0) return out;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    char name[256];
    if (H5Lget_name_by_idx(blocks, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT) < 0) continue;
    long long b = -1;
    if (std::sscanf(name, "block_%lld", &b) != 1 || b < 0) continue;
    Handle g(H5Gopen2(blocks, name, H5P_DEFAULT), H5Gclose);
    if (g.id >= 0) out[b] = read_block_group(g, b);
  }
  return out;
}

std::string read_command_line(const std::string& cmd) {
  std::string out;
  if (FILE* p = ::popen(cmd.c_str(), "r")) {
    char buf[256];
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    ::pclose(p);
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

}  // namespace

std::string block_group_name(int64_t block) {
  char name[32];
  std::snprintf(name, sizeof name, "block_%03lld", static_cast<long long>(block));
  return name;
}

std::string h5_safe_name(const std::string& label) {
  std::string s = label;
  for (char& c : s)
    if (c == '/') c = '_';
  if (s.empty() || s == "." || s == "..") s = "_" + s;
  return s;
}

RunEnvironment collect_environment(Device dev) {
  RunEnvironment e;
  e.device = dev.str();
  e.device_name = "unknown";
#ifdef OMNIQ_HAS_CUDA
  if (dev.is_cuda()) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, dev.index) == cudaSuccess) e.device_name = p.name;
    int v = 0;
    if (cudaDriverGetVersion(&v) == cudaSuccess) e.cuda_driver = strformat("%d.%d", v / 1000, (v % 1000) / 10);
    if (cudaRuntimeGetVersion(&v) == cudaSuccess) e.cuda_runtime = strformat("%d.%d", v / 1000, (v % 1000) / 10);
  }
#endif
  if (dev.is_cpu()) {
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line)) {
      if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) {
        e.device_name = line.substr(line.find(':') + 2);
        break;
      }
    }
  }
  // The source tree is the parent of the bundled data folder (a compile definition of the library).
  e.omniq_commit = "unknown";
#ifdef OMNIQ_DATA_DIR
  std::string src = std::string(OMNIQ_DATA_DIR) + "/..";
  std::string head = read_command_line("git -C '" + src + "' rev-parse HEAD 2>/dev/null");
  if (head.size() == 40) e.omniq_commit = head;
#endif
  char host[256] = {0};
  e.hostname = ::gethostname(host, sizeof host - 1) == 0 ? host : "unknown";
  e.deterministic = attention_deterministic();
  std::time_t t = std::time(nullptr);
  char iso[32];
  std::strftime(iso, sizeof iso, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  e.started_utc = iso;
  return e;
}

// ---- RunLog --------------------------------------------------------------------------------

RunLog::RunLog(const std::string& path) : path_(path) {
  quiet_hdf5();
  open_or_create();
  load_existing_blocks();
}

RunLog::~RunLog() {
  if (file_ >= 0) {
    H5Fflush(file_, H5F_SCOPE_GLOBAL);
    H5Fclose(file_);
  }
}

void RunLog::open_or_create() {
  struct stat st;
  if (::stat(path_.c_str(), &st) == 0) {
    file_ = H5Fopen(path_.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    if (file_ >= 0) return;
    // A file torn by a crash: keep it for inspection and start over (finished blocks come back
    // from calibrate_model's state folder, marked `resumed`).
    std::string aside = path_ + ".corrupt";
    std::rename(path_.c_str(), aside.c_str());
    std::fprintf(stderr, "warning: %s could not be opened; moved it to %s and started a new file\n", path_.c_str(),
                 aside.c_str());
  }
  file_ = H5Fcreate(path_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  OMNIQ_CHECK(file_ >= 0, "cannot create HDF5 file '%s'", path_.c_str());
}

void RunLog::load_existing_blocks() { blocks_ = read_blocks(file_); }

void RunLog::flush() { H5_CHECK(H5Fflush(file_, H5F_SCOPE_GLOBAL), path_); }

void RunLog::write_config(const ExperimentConfig& c, const std::string& point_name) {
  attr_str(file_, "config_yaml", to_yaml(c));
  attr_str(file_, "point_name", point_name);
  attr_str(file_, "experiment_name", c.name);
  // Typed scalars for the quantization settings (what pandas/plots filter on)...
  const QuantConfig& q = c.quantization;
  attr_str(file_, "quantization.method", q.method);
  attr_i64(file_, "quantization.wbits", q.wbits);
  attr_i64(file_, "quantization.abits", q.abits);
  attr_i64(file_, "quantization.group_size", q.group_size);
  attr_i64(file_, "quantization.symmetric", q.symmetric);
  attr_i64(file_, "quantization.lwc", q.lwc);
  attr_i64(file_, "quantization.let", q.let);
  attr_i64(file_, "quantization.aug_loss", q.aug_loss);
  attr_i64(file_, "quantization.gptq", q.gptq);
  attr_i64(file_, "quantization.epochs", q.epochs);
  attr_i64(file_, "quantization.nsamples", q.nsamples);
  attr_i64(file_, "quantization.seqlen", q.seqlen);
  attr_u64(file_, "quantization.seed", q.seed);
  attr_f32(file_, "quantization.lwc_lr", q.lwc_lr);
  attr_f32(file_, "quantization.let_lr", q.let_lr);
  attr_f32(file_, "quantization.weight_decay", q.weight_decay);
  attr_f32(file_, "quantization.let_alpha", q.let_alpha);
  attr_f32(file_, "quantization.let_scale_floor", q.let_scale_floor);
  attr_i64(file_, "quantization.max_nan_retries", q.max_nan_retries);
  attr_str(file_, "quantization.setting", q.setting_name());
  // ...and every other setting as its YAML text, so a field added to the schema later is never lost.
  for (const std::string& p : experiment_field_paths()) {
    if (H5Aexists(file_, p.c_str()) > 0 && p.rfind("quantization.", 0) == 0) continue;
    attr_str(file_, p, experiment_field_text(c, p));
  }
  flush();
}

void RunLog::write_environment(const RunEnvironment& e) {
  attr_str(file_, "device", e.device);
  attr_str(file_, "device_name", e.device_name);
  attr_str(file_, "cuda_driver", e.cuda_driver);
  attr_str(file_, "cuda_runtime", e.cuda_runtime);
  attr_str(file_, "omniq_commit", e.omniq_commit);
  attr_str(file_, "hostname", e.hostname);
  attr_str(file_, "started_utc", e.started_utc);
  attr_i64(file_, "deterministic", e.deterministic ? 1 : 0);
  flush();
}

void RunLog::set_status(const std::string& status) {
  if (status == "running") {
    // A rerun: the previous attempt's error and evaluation no longer describe this file.
    if (H5Aexists(file_, "error") > 0) H5Adelete(file_, "error");
    delete_link(file_, "eval");
  }
  attr_str(file_, "status", status);
  flush();
}

void RunLog::set_error(const std::string& message) {
  attr_str(file_, "error", message);
  attr_str(file_, "status", "failed");
  flush();
}

void RunLog::write_block(const BlockReport& r, const std::vector<std::pair<std::string, Tensor>>& params) {
  Handle blocks(open_or_create_group(file_, "blocks"), H5Gclose);
  H5_CHECK(blocks.id, path_);
  std::string name = block_group_name(r.block);
  delete_link(blocks, name);  // a block done again replaces its old record entirely
  Handle g(H5Gcreate2(blocks, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
  H5_CHECK(g.id, path_);
  write_dataset(g, "epoch_loss", H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE, {static_cast<hsize_t>(r.epoch_loss.size())},
                r.epoch_loss.data());
  attr_f64(g, "final_loss", r.final_loss);
  attr_f64(g, "seconds", r.seconds);
  attr_i64(g, "peak_bytes", r.peak_bytes);
  attr_i64(g, "nan_retries", r.nan_retries);
  attr_i64(g, "train_steps", r.train_steps);
  attr_i64(g, "graph_steps", r.graph_steps);
  attr_i64(g, "resumed", r.resumed ? 1 : 0);
  for (const auto& [k, v] : r.search) attr_f64(g, "search." + k, v);  // e.g. AWQ's searched alphas
  Handle pg(H5Gcreate2(g, "params", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
  H5_CHECK(pg.id, path_);
  for (const auto& [pname, t] : params) {
    Tensor host = t.to(Device::cpu()).to(DType::f32);
    std::vector<float> v = host.to_f32_vector();
    std::vector<hsize_t> dims;
    for (int d = 0; d < host.ndim(); ++d) dims.push_back(static_cast<hsize_t>(host.size(d)));
    if (dims.empty()) dims.push_back(1);
    write_dataset(pg, h5_safe_name(pname), H5T_NATIVE_FLOAT, H5T_IEEE_F32LE, dims, v.data());
  }
  blocks_[r.block] = r;
  write_summary();
  flush();
}

void RunLog::write_summary() {
  delete_link(file_, "summary");
  Handle s(H5Gcreate2(file_, "summary", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
  H5_CHECK(s.id, path_);
  std::vector<int64_t> block, peak;
  std::vector<double> loss, secs;
  for (const auto& [b, r] : blocks_) {
    block.push_back(b);
    loss.push_back(r.final_loss);
    secs.push_back(r.seconds);
    peak.push_back(r.peak_bytes);
  }
  hsize_t n = block.size();
  write_dataset(s, "block", H5T_NATIVE_INT64, H5T_STD_I64LE, {n}, block.data());
  write_dataset(s, "final_loss", H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE, {n}, loss.data());
  write_dataset(s, "seconds", H5T_NATIVE_DOUBLE, H5T_IEEE_F64LE, {n}, secs.data());
  write_dataset(s, "peak_bytes", H5T_NATIVE_INT64, H5T_STD_I64LE, {n}, peak.data());
}

void RunLog::write_eval(const std::string& name, const EvalRecord& e) {
  Handle ev(open_or_create_group(file_, "eval"), H5Gclose);
  H5_CHECK(ev.id, path_);
  std::string gname = h5_safe_name(name);
  delete_link(ev, gname);
  Handle g(H5Gcreate2(ev, gname.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
  H5_CHECK(g.id, path_);
  attr_str(g, "source", e.source);
  attr_f64(g, "ppl", e.ppl);
  attr_f64(g, "nll", e.nll);
  attr_i64(g, "tokens", e.tokens);
  attr_f64(g, "seconds", e.seconds);
  attr_i64(g, "windows", e.windows);
  attr_i64(g, "seqlen", e.seqlen);
  flush();
}

// ---- reading -------------------------------------------------------------------------------

RunRecord read_run_log(const std::string& path) {
  quiet_hdf5();
  RunRecord rec;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return rec;
  Handle f(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (f.id < 0) return rec;
  read_attr_str(f, "status", &rec.status);
  read_attr_str(f, "error", &rec.error);
  rec.blocks = read_blocks(f);
  if (link_exists(f, "eval")) {
    Handle ev(H5Gopen2(f, "eval", H5P_DEFAULT), H5Gclose);
    H5G_info_t info;
    if (ev.id >= 0 && H5Gget_info(ev, &info) >= 0) {
      for (hsize_t i = 0; i < info.nlinks; ++i) {
        char name[1024];
        if (H5Lget_name_by_idx(ev, ".", H5_INDEX_CRT_ORDER, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT) < 0 &&
            H5Lget_name_by_idx(ev, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name, H5P_DEFAULT) < 0)
          continue;
        Handle g(H5Gopen2(ev, name, H5P_DEFAULT), H5Gclose);
        if (g.id < 0) continue;
        EvalRecord e;
        read_attr_str(g, "source", &e.source);
        read_attr_num(g, "ppl", H5T_NATIVE_DOUBLE, &e.ppl);
        read_attr_num(g, "nll", H5T_NATIVE_DOUBLE, &e.nll);
        read_attr_num(g, "tokens", H5T_NATIVE_INT64, &e.tokens);
        read_attr_num(g, "seconds", H5T_NATIVE_DOUBLE, &e.seconds);
        read_attr_num(g, "windows", H5T_NATIVE_INT64, &e.windows);
        read_attr_num(g, "seqlen", H5T_NATIVE_INT64, &e.seqlen);
        rec.evals[name] = e;
      }
    }
  }
  return rec;
}

std::vector<std::pair<std::string, Tensor>> read_learned_params(const std::string& state_dir, int64_t block) {
  std::string path = state_dir + "/" + block_group_name(block) + ".safetensors";
  SafetensorsFile f(path);
  std::vector<std::pair<std::string, Tensor>> out;
  const std::string prefix = "learned.";
  for (const std::string& n : f.names())
    if (n.rfind(prefix, 0) == 0) out.emplace_back(n.substr(prefix.size()), f.read(n).to(DType::f32));
  return out;
}

}  // namespace omniq
