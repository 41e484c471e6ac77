// CPU reference of the embedding gather and its scatter-add gradient.
#include <cstring>
#include <vector>

#include "ops/embedding.h"
#include "runtime/error.h"

namespace omniq::cpu {

namespace {

Shape with_last_dim(const Shape& s, int64_t C) {
  std::vector<int64_t> d(s.dims, s.dims + s.ndim);
  d.push_back(C);
  return Shape(d);
}

void check_id(int32_t id, int64_t n, int64_t V, const char* op) {
  OMNIQ_CHECK(id >= 0 && id < V, "%s: token id %d at position %lld is out of range for vocabulary size V=%lld", op,
              id, static_cast<long long>(n), static_cast<long long>(V));
}

}  // namespace

Tensor embedding_forward(const Tensor& ids, const Tensor& table) {
  const int64_t N = ids.numel(), V = table.size(0), C = table.size(1);
  const int32_t* id = ids.data_as<int32_t>();
  Tensor out = Tensor::empty(with_last_dim(ids.shape(), C), table.dtype());
  // A gather copies rows verbatim, so it works on the stored bytes of any dtype.
  const size_t row_bytes = static_cast<size_t>(C) * dtype_size(table.dtype());
  const char* src = static_cast<const char*>(table.data());
  char* dst = static_cast<char*>(out.data());
  for (int64_t n = 0; n < N; ++n) {
    check_id(id[n], n, V, "embedding_forward");
    std::memcpy(dst + n * row_bytes, src + id[n] * row_bytes, row_bytes);
  }
  return out;
}

Tensor embedding_backward(const Tensor& dy, const Tensor& ids, int64_t vocab) {
  const int64_t N = ids.numel(), C = dy.cols();
  const int32_t* id = ids.data_as<int32_t>();
  std::vector<float> g = dy.to_f32_vector();
  std::vector<float> out(static_cast<size_t>(vocab * C), 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    check_id(id[n], n, vocab, "embedding_backward");
    for (int64_t c = 0; c < C; ++c) out[id[n] * C + c] += g[n * C + c];
  }
  return Tensor::from_f32(out, Shape{vocab, C});
}

}  // namespace omniq::cpu
