#include "models/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "runtime/error.h"

namespace omniq {

namespace {

// A header beyond this is not a real checkpoint (70B models have headers of ~100 KB); refusing it
// avoids parsing garbage when the first 8 bytes of a non-safetensors file happen to be small.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct DTypeEntry {
  const char* name;
  size_t size;
  bool loadable;
  DType dtype;
};

// Every dtype of the safetensors format with a whole-byte element size. Those omniq cannot hold are
// still parsed (so the file validates and other tensors load); reading one of them is an error.
const DTypeEntry kDTypes[] = {
    {"F32", 4, true, DType::f32},      {"F16", 2, true, DType::f16},       {"BF16", 2, true, DType::bf16},
    {"I32", 4, true, DType::i32},      {"I8", 1, true, DType::i8},         {"U8", 1, true, DType::u8},
    {"F64", 8, false, DType::f32},     {"I64", 8, false, DType::f32},      {"U64", 8, false, DType::f32},
    {"U32", 4, false, DType::f32},     {"I16", 2, false, DType::f32},      {"U16", 2, false, DType::f32},
    {"BOOL", 1, false, DType::f32},    {"F8_E4M3", 1, false, DType::f32},  {"F8_E5M2", 1, false, DType::f32},
    {"F8_E8M0", 1, false, DType::f32},
};

const DTypeEntry* find_dtype(const std::string& s) {
  for (const DTypeEntry& e : kDTypes)
    if (s == e.name) return &e;
  return nullptr;
}

// Error messages must stay on one line (they are printed as "omniq: <message>" by the CLI).
std::string one_line(std::string s) {
  for (char& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  if (s.size() > 240) s = s.substr(0, 240) + "...";  // parser messages quote the input they choked on
  return s;
}

std::string json_type(const nlohmann::json& j) { return j.type_name(); }

}  // namespace

size_t safetensors_dtype_size(const std::string& dtype_str) {
  const DTypeEntry* e = find_dtype(dtype_str);
  return e ? e->size : 0;
}

const char* safetensors_dtype_name(DType dt) {
  for (const DTypeEntry& e : kDTypes)
    if (e.loadable && e.dtype == dt) return e.name;
  return "?";
}

std::string SafetensorsTensorInfo::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

Shape SafetensorsTensorInfo::shape(const std::string& file) const {
  OMNIQ_CHECK(dims.size() <= static_cast<size_t>(kMaxDims),
              "%s: tensor '%s' has %zu dimensions %s; omniq tensors have at most %d", file.c_str(), name.c_str(),
              dims.size(), shape_str().c_str(), kMaxDims);
  return Shape(dims);
}

// ---------------------------------------------------------------------------------------------
// open / close

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  OMNIQ_CHECK(fd >= 0, "%s: cannot open safetensors file: %s", path.c_str(), std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    OMNIQ_FAIL("%s: not a regular file", path.c_str());
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    OMNIQ_FAIL("%s: file is %zu bytes, too short to hold a safetensors header (8-byte length + JSON) — the file "
               "is truncated or not a safetensors file",
               path.c_str(), size_);
  }
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);  // the mapping keeps the file alive
  OMNIQ_CHECK(p != MAP_FAILED, "%s: mmap of %zu bytes failed: %s", path.c_str(), size_, std::strerror(map_errno));
  map_ = static_cast<const uint8_t*>(p);
  try {
    parse_header();
  } catch (...) {
    close();
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { close(); }

void SafetensorsFile::close() noexcept {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), size_);
  map_ = nullptr;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept { *this = std::move(o); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    close();
    path_ = std::move(o.path_);
    map_ = o.map_;
    size_ = o.size_;
    header_len_ = o.header_len_;
    tensors_ = std::move(o.tensors_);
    metadata_ = std::move(o.metadata_);
    o.map_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

// ---------------------------------------------------------------------------------------------
// header validation: every number is checked against the file length before it is ever used

void SafetensorsFile::parse_header() {
  const char* f = path_.c_str();
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | map_[i];  // little-endian, independent of the host
  OMNIQ_CHECK(n <= kMaxHeaderBytes && n <= size_ - 8,
              "%s: header length %llu is beyond the file (%zu bytes) or above the %llu-byte limit — the file is "
              "truncated, corrupt or not a safetensors file",
              f, static_cast<unsigned long long>(n), size_, static_cast<unsigned long long>(kMaxHeaderBytes));
  header_len_ = static_cast<size_t>(n);
  const char* text = reinterpret_cast<const char*>(map_ + 8);

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, text + header_len_);
  } catch (const nlohmann::json::exception& e) {
    OMNIQ_FAIL("%s: the safetensors header (%zu bytes) is not valid JSON (%s) — the file is corrupt", f,
               header_len_, one_line(e.what()).c_str());
  }
  OMNIQ_CHECK(header.is_object(), "%s: the safetensors header must be a JSON object, got %s", f,
              json_type(header).c_str());

  const size_t data_start = 8 + header_len_;
  const size_t data_size = size_ - data_start;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    const char* t = name.c_str();
    if (name == "__metadata__") {
      OMNIQ_CHECK(v.is_object() || v.is_null(), "%s: '__metadata__' must be a JSON object, got %s", f,
                  json_type(v).c_str());
      if (v.is_object())
        for (auto m = v.begin(); m != v.end(); ++m)
          metadata_[m.key()] = m.value().is_string() ? m.value().get<std::string>() : m.value().dump();
      continue;
    }
    OMNIQ_CHECK(v.is_object(), "%s: header entry for tensor '%s' must be a JSON object, got %s", f, t,
                json_type(v).c_str());
    SafetensorsTensorInfo info;
    info.name = name;

    auto dt = v.find("dtype");
    OMNIQ_CHECK(dt != v.end() && dt->is_string(), "%s: tensor '%s' has no string 'dtype' in the header", f, t);
    info.dtype_str = dt->get<std::string>();
    const DTypeEntry* e = find_dtype(info.dtype_str);
    OMNIQ_CHECK(e != nullptr,
                "%s: tensor '%s' has unknown dtype '%s' (safetensors dtypes: F64, F32, F16, BF16, I64, I32, I16, "
                "I8, U64, U32, U16, U8, BOOL, F8_E4M3, F8_E5M2, F8_E8M0)",
                f, t, info.dtype_str.c_str());
    info.loadable = e->loadable;
    info.dtype = e->dtype;
    info.element_size = e->size;

    auto sh = v.find("shape");
    OMNIQ_CHECK(sh != v.end() && sh->is_array(), "%s: tensor '%s' has no 'shape' array in the header", f, t);
    int64_t numel = 1;
    for (const nlohmann::json& d : *sh) {
      OMNIQ_CHECK(d.is_number_unsigned(), "%s: tensor '%s' has shape entry %s; dimensions must be integers >= 0",
                  f, t, d.dump().c_str());
      uint64_t dim = d.get<uint64_t>();
      OMNIQ_CHECK(dim <= static_cast<uint64_t>(INT64_MAX) && !__builtin_mul_overflow(numel, static_cast<int64_t>(dim), &numel),
                  "%s: tensor '%s' has shape %s whose element count overflows", f, t, sh->dump().c_str());
      info.dims.push_back(static_cast<int64_t>(dim));
    }
    info.numel = numel;

    auto off = v.find("data_offsets");
    OMNIQ_CHECK(off != v.end() && off->is_array() && off->size() == 2 && (*off)[0].is_number_unsigned() &&
                    (*off)[1].is_number_unsigned(),
                "%s: tensor '%s' needs 'data_offsets' [begin, end] of two integers >= 0, got %s", f, t,
                off == v.end() ? "nothing" : off->dump().c_str());
    uint64_t b = (*off)[0].get<uint64_t>(), end = (*off)[1].get<uint64_t>();
    OMNIQ_CHECK(b <= end, "%s: tensor '%s' has data_offsets [%llu, %llu) with begin > end — the file is corrupt", f,
                t, static_cast<unsigned long long>(b), static_cast<unsigned long long>(end));
    OMNIQ_CHECK(end <= data_size,
                "%s: tensor '%s' has data_offsets [%llu, %llu) beyond the file's data section of %zu bytes — the "
                "file is truncated or corrupt",
                f, t, static_cast<unsigned long long>(b), static_cast<unsigned long long>(end), data_size);
    uint64_t expect = 0;
    OMNIQ_CHECK(!__builtin_mul_overflow(static_cast<uint64_t>(numel), static_cast<uint64_t>(e->size), &expect) &&
                    expect == end - b,
                "%s: tensor '%s' spans %llu bytes but shape %s x %s (%zu bytes each) needs %llu — the header is "
                "corrupt",
                f, t, static_cast<unsigned long long>(end - b), info.shape_str().c_str(), info.dtype_str.c_str(),
                e->size, static_cast<unsigned long long>(expect));
    info.begin = data_start + static_cast<size_t>(b);
    info.nbytes = static_cast<size_t>(end - b);
    tensors_.emplace(name, std::move(info));
  }
}

// ---------------------------------------------------------------------------------------------
// access

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& kv : tensors_) out.push_back(kv.first);
  return out;
}

const SafetensorsTensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  OMNIQ_CHECK(it != tensors_.end(), "%s: no tensor named '%s' in this file (it has %zu tensors)", path_.c_str(),
              name.c_str(), tensors_.size());
  return it->second;
}

RawTensorBytes SafetensorsFile::raw(const std::string& name) const {
  const SafetensorsTensorInfo& i = info(name);
  return RawTensorBytes{map_ + i.begin, i.nbytes};
}

Tensor SafetensorsFile::read(const std::string& name) const {
  const SafetensorsTensorInfo& i = info(name);
  OMNIQ_CHECK(i.loadable, "%s: tensor '%s' has dtype %s, which omniq does not load (supported: F32, F16, BF16, I32, I8, U8)",
              path_.c_str(), name.c_str(), i.dtype_str.c_str());
  Tensor t = Tensor::empty(i.shape(path_), i.dtype, Device::cpu());
  if (i.nbytes) std::memcpy(t.data(), map_ + i.begin, i.nbytes);
  return t;
}

void SafetensorsFile::release_pages(const std::string& name) const {
  const SafetensorsTensorInfo& i = info(name);
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  // Only whole pages inside the tensor: neighbours sharing a boundary page keep theirs.
  size_t lo = (i.begin + page - 1) / page * page;
  size_t hi = (i.begin + i.nbytes) / page * page;
  if (hi > lo) ::madvise(const_cast<uint8_t*>(map_) + lo, hi - lo, MADV_DONTNEED);  // advice only
}

}  // namespace omniq
