// Writing .safetensors files, crash-safe.
//
// Format (as the Rust `safetensors` crate writes it): an 8-byte little-endian header length N, N
// bytes of JSON (`"__metadata__"` first, then one entry per tensor in data order, padded with spaces
// so that 8 + N is a multiple of 8), then the tensors' bytes back to back (`data_offsets` contiguous,
// no holes: the Rust validator rejects gaps).
//
// Crash safety: bytes go to `<path>.tmp.<pid>`; only after the whole file is written and fsync'd is
// it renamed over `<path>` and the directory fsync'd. So `<path>` is always either the previous
// complete file or the new complete file, never a prefix. On any error the temp file is removed and
// an omniq::Error names the path and the errno text ("No space left on device" with a hint when
// the disk is full).
#pragma once
#include <cstddef>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "runtime/tensor.h"

namespace omniq {

// Writes `tensors` (any dtype omniq holds, on CPU or CUDA; a CUDA tensor is copied to the host one
// at a time) with optional `__metadata__` (string -> string, e.g. {"format": "pt"}).
//
// Order: tensors are stably sorted by element size, largest first (F32/I32, then F16/BF16, then
// I8/U8), keeping the given order within one size, like the Rust crate does; this places every
// tensor at an offset aligned to its element size, which zero-copy readers rely on. A list of
// tensors of one dtype is written exactly in the given order. Duplicate names are an error.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, const Tensor*>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// One tensor of a streamed file, declared before any data is written.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
};

// Streams one file tensor by tensor, so a 70B export never holds more than one tensor in host RAM.
// The full list of (name, dtype, shape) is given up front: the header (which records every byte
// range) is written first, then `write` appends each tensor's bytes in exactly the declared order
// (declared order = data order; declare larger element sizes first to keep offsets aligned).
// `finish()` fsyncs and renames the temp file into place. Destroying the writer without a
// successful `finish()` removes the temp file, so an exception anywhere leaves no file behind.
class SafetensorsStreamWriter {
 public:
  // Creates `<path>.tmp.<pid>` and writes the header. Throws on duplicate/empty names or I/O errors.
  SafetensorsStreamWriter(const std::string& path, std::vector<SafetensorsEntry> entries,
                          const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsStreamWriter();
  SafetensorsStreamWriter(const SafetensorsStreamWriter&) = delete;
  SafetensorsStreamWriter& operator=(const SafetensorsStreamWriter&) = delete;

  // Appends tensor `name`, which must be the next declared one, with the declared dtype and shape
  // (on CPU or CUDA). A mismatch throws before anything is written (the writer stays usable); an
  // I/O error throws and removes the temp file (the writer is then dead).
  void write(const std::string& name, const Tensor& t);
  // The same from raw host bytes (exactly the declared byte count), e.g. straight from a mapping.
  void write_bytes(const std::string& name, const void* data, size_t nbytes);
  // Checks every declared tensor was written, fsyncs, renames over `path`, fsyncs the directory.
  void finish();

  const std::string& path() const { return path_; }
  size_t next_index() const { return next_; }            // how many tensors were written
  const std::string& next_name() const;                  // the tensor `write` expects next ("" when done)
  size_t data_bytes() const { return data_bytes_; }      // size of the data section
  size_t file_bytes() const { return 8 + header_bytes_ + data_bytes_; }

 private:
  // Throws unless `name` is the next declared tensor (and, when `what` is given, nbytes matches).
  void check_next(const std::string& name, size_t nbytes, const char* what) const;
  void append(const void* data, size_t nbytes);
  void abort() noexcept;

  std::string path_;
  std::string tmp_;
  int fd_ = -1;
  bool dead_ = false;      // an I/O error or finish() happened: nothing more may be written
  std::vector<SafetensorsEntry> entries_;
  size_t next_ = 0;
  size_t header_bytes_ = 0;
  size_t data_bytes_ = 0;
  size_t written_ = 0;     // data bytes written so far
};

// ---- crash-safe file helpers (also used by the Hugging Face export) -------------------------

// Writes `bytes` to `<path>.tmp.<pid>`, fsyncs, renames over `path`, fsyncs the directory.
void write_file_atomic(const std::string& path, const std::string& bytes);
// fsync of a directory, so that renames/creations inside it survive a power loss.
void fsync_directory(const std::string& dir);
// The directory part of a path ("." when it has none).
std::string parent_directory(const std::string& path);

}  // namespace omniq
