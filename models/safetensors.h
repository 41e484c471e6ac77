// Reader for one .safetensors file: an 8-byte little-endian header length, a JSON header naming
// each tensor's dtype, shape and byte range, then the raw data section.
//
// The file is mmap'd read-only (MAP_PRIVATE) so a 70B checkpoint costs address space, not host RAM:
// bytes are paged in only when a tensor is read. Everything in the header is validated against the
// file length when the file is opened, so a truncated or corrupt file fails at once with a message
// naming the file and the tensor instead of crashing later on a bad pointer.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace omniq {

// One tensor as described by the header. Offsets are absolute byte offsets into the file.
struct SafetensorsTensorInfo {
  std::string name;
  std::string dtype_str;       // as written in the file: "F16", "BF16", "F32", "I64", ...
  bool loadable = false;       // dtype is one omniq holds (F32, F16, BF16, I32, I8, U8)
  DType dtype = DType::f32;    // meaningful only when loadable
  size_t element_size = 0;     // bytes per element of dtype_str
  std::vector<int64_t> dims;   // any rank; Shape (at most 4-D) is built on load
  int64_t numel = 1;
  size_t begin = 0;            // absolute file offset of the first byte
  size_t nbytes = 0;           // = numel * element_size

  std::string shape_str() const;  // "[4096, 256]"
  // The dims as a runtime Shape; throws (naming `file` and the tensor) above kMaxDims dimensions.
  Shape shape(const std::string& file) const;
};

// A read-only view of tensor bytes inside the mapping (valid while the file object lives).
struct RawTensorBytes {
  const void* data = nullptr;
  size_t bytes = 0;
};

class SafetensorsFile {
 public:
  // Opens, maps and validates the whole header. Throws omniq::Error naming `path` (and the tensor
  // when one entry is at fault).
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& o) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& o) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  size_t file_size() const { return size_; }
  size_t header_bytes() const { return header_len_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }  // "__metadata__"

  std::vector<std::string> names() const;  // sorted
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  size_t size() const { return tensors_.size(); }
  // Throws "<path>: no tensor named '<name>'" when absent.
  const SafetensorsTensorInfo& info(const std::string& name) const;
  RawTensorBytes raw(const std::string& name) const;

  // Copies the tensor into a new host tensor of its own dtype (the bytes, unconverted). Throws for
  // dtypes omniq does not hold (e.g. F64, I64, BOOL) and for more than 4 dimensions.
  Tensor read(const std::string& name) const;

  // Hint that the tensor's pages are no longer needed in this process (madvise DONTNEED); the next
  // read faults them in again from the page cache. Keeps resident memory at about one block when
  // a large checkpoint is streamed block by block.
  void release_pages(const std::string& name) const;

 private:
  void close() noexcept;
  void parse_header();

  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t size_ = 0;
  size_t header_len_ = 0;
  std::map<std::string, SafetensorsTensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Maps a safetensors dtype string to its element size; returns 0 for strings not in the format.
size_t safetensors_dtype_size(const std::string& dtype_str);
// The safetensors dtype string for an omniq dtype ("F32", "F16", "BF16", "I32", "I8", "U8").
const char* safetensors_dtype_name(DType dt);

}  // namespace omniq
