#include "models/safetensors_writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "models/safetensors.h"
#include "runtime/error.h"

namespace omniq {

namespace {

// strerror plus what a user can do about the common causes, so "disk full" reads as such.
std::string errno_text(int err) {
  std::string s = std::strerror(err);
  switch (err) {
    case ENOSPC: return s + " (the disk is full: free space or write somewhere else)";
    case EDQUOT: return s + " (disk quota exceeded: free space or write somewhere else)";
    case EFBIG: return s + " (the file size limit (ulimit -f) or the file system's maximum was reached)";
    case EROFS: return s + " (the file system is mounted read-only)";
    case EACCES:
    case EPERM: return s + " (no permission to write there)";
    default: return s;
  }
}

std::string tmp_path_for(const std::string& path) { return path + ".tmp." + std::to_string(::getpid()); }

// write(2) until everything is out: it may write less than asked (signals, >2 GiB requests).
// Returns 0 or the errno of the failure.
int write_all(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t(1) << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (w == 0) return EIO;  // should not happen for regular files; avoid spinning forever
    p += w;
    n -= static_cast<size_t>(w);
  }
  return 0;
}

// Opens the temp file next to `path` (truncating a stale one left by a crashed process that had
// the same pid). Throws naming `path` when the directory is not writable.
int open_tmp(const std::string& path, const std::string& tmp, const char* what) {
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    int err = errno;
    OMNIQ_FAIL("%s: cannot write %s: creating the temporary file %s failed: %s", path.c_str(), what, tmp.c_str(),
               errno_text(err).c_str());
  }
  return fd;
}

// fsync + close + rename + directory fsync. On failure removes the temp file and throws.
void commit_tmp(int fd, const std::string& tmp, const std::string& path, const char* what) {
  int err = 0;
  const char* step = "";
  if (::fsync(fd) != 0) err = errno, step = "fsync";
  if (::close(fd) != 0 && !err) err = errno, step = "close";  // NFS reports write errors at close
  if (!err && ::rename(tmp.c_str(), path.c_str()) != 0) err = errno, step = "rename into place";
  if (err) {
    ::unlink(tmp.c_str());
    OMNIQ_FAIL("%s: cannot write %s: %s failed: %s", path.c_str(), what, step, errno_text(err).c_str());
  }
  fsync_directory(parent_directory(path));
}

// The JSON header, padded with spaces to a multiple of 8 bytes (so the data section starts
// 8-aligned), exactly as the Rust crate pads it.
std::string make_header(const std::vector<SafetensorsEntry>& entries, const std::map<std::string, std::string>& metadata,
                        const std::string& path, size_t* data_bytes) {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& kv : metadata) m[kv.first] = kv.second;
    h["__metadata__"] = std::move(m);
  }
  std::set<std::string> seen;
  size_t off = 0;
  for (const SafetensorsEntry& e : entries) {
    OMNIQ_CHECK(!e.name.empty() && e.name != "__metadata__", "%s: invalid tensor name '%s'", path.c_str(),
                e.name.c_str());
    OMNIQ_CHECK(seen.insert(e.name).second, "%s: tensor '%s' is listed twice", path.c_str(), e.name.c_str());
    std::vector<int64_t> dims(e.shape.dims, e.shape.dims + e.shape.ndim);
    const size_t nbytes = static_cast<size_t>(e.shape.numel()) * dtype_size(e.dtype);
    nlohmann::ordered_json t = nlohmann::ordered_json::object();
    t["dtype"] = safetensors_dtype_name(e.dtype);
    t["shape"] = dims;
    t["data_offsets"] = {off, off + nbytes};
    h[e.name] = std::move(t);
    off += nbytes;
  }
  *data_bytes = off;
  std::string s = h.dump();
  s.append((8 - s.size() % 8) % 8, ' ');
  return s;
}

}  // namespace

std::string parent_directory(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

void fsync_directory(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    OMNIQ_FAIL("%s: cannot open directory to fsync it: %s", dir.c_str(), errno_text(err).c_str());
  }
  int err = ::fsync(fd) != 0 ? errno : 0;
  ::close(fd);
  // Some file systems do not support fsync on directories; the rename is still done.
  OMNIQ_CHECK(err == 0 || err == EINVAL || err == ENOTSUP, "%s: fsync of the directory failed: %s", dir.c_str(),
              errno_text(err).c_str());
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = tmp_path_for(path);
  int fd = open_tmp(path, tmp, "the file");
  int err = write_all(fd, bytes.data(), bytes.size());
  if (err) {
    ::close(fd);
    ::unlink(tmp.c_str());
    OMNIQ_FAIL("%s: cannot write the file: writing %zu bytes failed: %s", path.c_str(), bytes.size(),
               errno_text(err).c_str());
  }
  commit_tmp(fd, tmp, path, "the file");
}

// ---------------------------------------------------------------------------------------------
// SafetensorsStreamWriter

SafetensorsStreamWriter::SafetensorsStreamWriter(const std::string& path, std::vector<SafetensorsEntry> entries,
                                                 const std::map<std::string, std::string>& metadata)
    : path_(path), tmp_(tmp_path_for(path)), entries_(std::move(entries)) {
  const std::string header = make_header(entries_, metadata, path_, &data_bytes_);  // validates before creating
  header_bytes_ = header.size();
  fd_ = open_tmp(path_, tmp_, "safetensors file");
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>((static_cast<uint64_t>(header_bytes_) >> (8 * i)) & 0xff);
  append(len, 8);
  append(header.data(), header.size());
}

SafetensorsStreamWriter::~SafetensorsStreamWriter() { abort(); }

void SafetensorsStreamWriter::abort() noexcept {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
  fd_ = -1;
  dead_ = true;
}

const std::string& SafetensorsStreamWriter::next_name() const {
  static const std::string none;
  return next_ < entries_.size() ? entries_[next_].name : none;
}

void SafetensorsStreamWriter::append(const void* data, size_t nbytes) {
  if (nbytes == 0) return;
  int err = write_all(fd_, data, nbytes);
  if (err) {
    abort();
    OMNIQ_FAIL("%s: cannot write safetensors file: writing %zu bytes at offset %zu failed: %s", path_.c_str(),
               nbytes, 8 + header_bytes_ + written_, errno_text(err).c_str());
  }
}

void SafetensorsStreamWriter::check_next(const std::string& name, size_t nbytes, const char* what) const {
  OMNIQ_CHECK(!dead_, "%s: the writer is finished or failed earlier; cannot write tensor '%s'", path_.c_str(),
              name.c_str());
  OMNIQ_CHECK(next_ < entries_.size(), "%s: tensor '%s' was not declared (all %zu declared tensors are written)",
              path_.c_str(), name.c_str(), entries_.size());
  const SafetensorsEntry& e = entries_[next_];
  OMNIQ_CHECK(e.name == name, "%s: tensor '%s' written out of order: tensor %zu of %zu is '%s' (tensors are written "
              "in declared order)", path_.c_str(), name.c_str(), next_, entries_.size(), e.name.c_str());
  const size_t expect = static_cast<size_t>(e.shape.numel()) * dtype_size(e.dtype);
  OMNIQ_CHECK(what == nullptr || nbytes == expect, "%s: tensor '%s': got %s of %zu bytes but %s %s was declared (%zu bytes)",
              path_.c_str(), name.c_str(), what, nbytes, dtype_name(e.dtype), e.shape.str().c_str(), expect);
}

void SafetensorsStreamWriter::write(const std::string& name, const Tensor& t) {
  OMNIQ_CHECK(t.defined(), "%s: tensor '%s' is undefined", path_.c_str(), name.c_str());
  check_next(name, 0, nullptr);  // the dtype/shape check below says more than a byte count
  const SafetensorsEntry& e = entries_[next_];
  OMNIQ_CHECK(t.dtype() == e.dtype && t.shape() == e.shape, "%s: tensor '%s' is %s but %s %s was declared",
              path_.c_str(), name.c_str(), t.str().c_str(), dtype_name(e.dtype), e.shape.str().c_str());
  if (t.device().is_cuda()) {
    Tensor host = t.to(Device::cpu());  // one tensor at a time: host RAM stays at one tensor
    append(host.data(), host.nbytes());
  } else if (t.nbytes()) {
    append(t.data(), t.nbytes());
  }
  written_ += t.nbytes();
  ++next_;
}

void SafetensorsStreamWriter::write_bytes(const std::string& name, const void* data, size_t nbytes) {
  check_next(name, nbytes, "raw bytes");
  append(data, nbytes);
  written_ += nbytes;
  ++next_;
}

void SafetensorsStreamWriter::finish() {
  OMNIQ_CHECK(!dead_, "%s: finish() after the writer was finished or failed", path_.c_str());
  if (next_ != entries_.size()) {
    const std::string missing = entries_[next_].name;
    const size_t done = next_;
    abort();  // an incomplete file must never be renamed into place
    OMNIQ_FAIL("%s: finish() with %zu of %zu declared tensors written (next: '%s'); the file was not written",
               path_.c_str(), done, entries_.size(), missing.c_str());
  }
  int fd = fd_;
  fd_ = -1;  // commit_tmp closes it, and removes the temp file on failure
  dead_ = true;
  commit_tmp(fd, tmp_, path_, "safetensors file");
}

// ---------------------------------------------------------------------------------------------

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, const Tensor*>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) {
    order[i] = i;
    OMNIQ_CHECK(tensors[i].second && tensors[i].second->defined(), "%s: tensor '%s' is null or undefined",
                path.c_str(), tensors[i].first.c_str());
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return dtype_size(tensors[a].second->dtype()) > dtype_size(tensors[b].second->dtype());
  });
  std::vector<SafetensorsEntry> entries;
  entries.reserve(order.size());
  for (size_t i : order) entries.push_back({tensors[i].first, tensors[i].second->dtype(), tensors[i].second->shape()});
  SafetensorsStreamWriter w(path, std::move(entries), metadata);
  for (size_t i : order) w.write(tensors[i].first, *tensors[i].second);
  w.finish();
}

}  // namespace omniq
