// Device dispatch and argument checks of the embedding (see embedding.h for how bad ids are found).
#include "ops/embedding.h"

#include "runtime/error.h"

namespace omniq {

namespace {

void check_ids(const Tensor& ids, const char* op) {
  OMNIQ_CHECK(ids.defined(), "%s: ids are undefined", op);
  check_dtype(ids, DType::i32, op, "ids");
  OMNIQ_CHECK(ids.ndim() == 1 || ids.ndim() == 2, "%s: ids must be (N) or (B, T), got %s", op, ids.str().c_str());
  OMNIQ_CHECK(ids.numel() < (int64_t{1} << 31), "%s: %lld ids is more than one call supports (2^31)", op,
              static_cast<long long>(ids.numel()));
}

// Host-side range check of host ids (the CPU reference checks again while gathering).
[[maybe_unused]] void validate_host_ids(const Tensor& ids, int64_t V, const char* op) {
  const int32_t* p = ids.data_as<int32_t>();
  for (int64_t n = 0; n < ids.numel(); ++n)
    OMNIQ_CHECK(p[n] >= 0 && p[n] < V, "%s: token id %d at position %lld is out of range for vocabulary size V=%lld",
                op, p[n], static_cast<long long>(n), static_cast<long long>(V));
}

}  // namespace

Tensor embedding_forward(const Tensor& ids, const Tensor& table, bool check_device_ids) {
  const char* op = "embedding_forward";
  check_ids(ids, op);
  OMNIQ_CHECK(table.defined(), "%s: table is undefined", op);
  check_float(table, op, "table");
  OMNIQ_CHECK(table.ndim() == 2, "%s: table must be (V, C), got %s", op, table.str().c_str());
  if (table.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    if (ids.device().is_cpu()) {
      validate_host_ids(ids, table.size(0), op);
      return cuda::embedding_forward(ids.to(table.device()), table, /*check_ids=*/false);
    }
    check_same_device(ids, table, op);
    return cuda::embedding_forward(ids, table, check_device_ids);
#else
    OMNIQ_FAIL("%s: %s is on CUDA but this omniq was built without CUDA", op, table.str().c_str());
#endif
  }
  if (ids.device().is_cuda()) return cpu::embedding_forward(ids.to(Device::cpu()), table);
  return cpu::embedding_forward(ids, table);
}

Tensor embedding_backward(const Tensor& dy, const Tensor& ids, int64_t vocab, bool check_device_ids) {
  const char* op = "embedding_backward";
  check_ids(ids, op);
  OMNIQ_CHECK(dy.defined(), "%s: dy is undefined", op);
  check_float(dy, op, "dy");
  OMNIQ_CHECK(vocab > 0, "%s: vocab must be positive, got %lld", op, static_cast<long long>(vocab));
  // dy is (..., C) whose leading dims flatten to the N ids (usually ids' own shape).
  OMNIQ_CHECK(dy.ndim() >= 2 && dy.rows() == ids.numel(),
              "%s: dy %s must have one row of the embedding dim per id (ids %s)", op, dy.str().c_str(),
              ids.shape().str().c_str());
  if (dy.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    if (ids.device().is_cpu()) {
      validate_host_ids(ids, vocab, op);
      return cuda::embedding_backward(dy, ids.to(dy.device()), vocab, /*check_ids=*/false);
    }
    check_same_device(ids, dy, op);
    return cuda::embedding_backward(dy, ids, vocab, check_device_ids);
#else
    OMNIQ_FAIL("%s: %s is on CUDA but this omniq was built without CUDA", op, dy.str().c_str());
#endif
  }
  if (ids.device().is_cuda()) return cpu::embedding_backward(dy, ids.to(Device::cpu()), vocab);
  return cpu::embedding_backward(dy, ids, vocab);
}

}  // namespace omniq
