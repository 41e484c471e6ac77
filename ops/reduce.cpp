// Device dispatch and argument checks of the reductions (see reduce.h).
#include "ops/reduce.h"

#include "runtime/error.h"

namespace omniq {

namespace {

const char* reduce_name(ReduceOp op, bool rows) {
  switch (op) {
    case ReduceOp::sum: return rows ? "row_sum" : "col_sum";
    case ReduceOp::min: return rows ? "row_min" : "col_min";
    case ReduceOp::max: return rows ? "row_max" : "col_max";
    case ReduceOp::absmax: return rows ? "row_absmax" : "col_absmax";
  }
  return "reduce";
}

void check_input(const Tensor& x, ReduceOp op, bool rows) {
  const char* name = reduce_name(op, rows);
  OMNIQ_CHECK(x.defined(), "%s: input tensor is undefined", name);
  check_float(x, name, "x");
  // An empty sum is 0, but an empty min/max has no value a quantizer could use.
  if (op != ReduceOp::sum) {
    OMNIQ_CHECK(rows ? x.cols() > 0 : x.rows() > 0, "%s: cannot reduce over an empty dimension of %s", name,
                x.str().c_str());
  }
}

Tensor row_dispatch(ReduceOp op, const Tensor& x) {
  check_input(x, op, true);
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::row_reduce(op, x);
#else
    OMNIQ_FAIL("%s: %s is on CUDA but this omniq was built without CUDA", reduce_name(op, true), x.str().c_str());
#endif
  }
  return cpu::row_reduce(op, x);
}

Tensor col_dispatch(ReduceOp op, const Tensor& x) {
  check_input(x, op, false);
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::col_reduce(op, x);
#else
    OMNIQ_FAIL("%s: %s is on CUDA but this omniq was built without CUDA", reduce_name(op, false), x.str().c_str());
#endif
  }
  return cpu::col_reduce(op, x);
}

Tensor sum_dispatch(const Tensor& x, bool mean) {
  const char* name = mean ? "mean_all" : "sum_all";
  OMNIQ_CHECK(x.defined(), "%s: input tensor is undefined", name);
  check_float(x, name, "x");
  OMNIQ_CHECK(!mean || x.numel() > 0, "mean_all: the mean of the empty tensor %s is undefined", x.str().c_str());
  if (x.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::sum_all(x, mean);
#else
    OMNIQ_FAIL("%s: %s is on CUDA but this omniq was built without CUDA", name, x.str().c_str());
#endif
  }
  return cpu::sum_all(x, mean);
}

}  // namespace

Tensor row_absmax(const Tensor& x) { return row_dispatch(ReduceOp::absmax, x); }
Tensor row_min(const Tensor& x) { return row_dispatch(ReduceOp::min, x); }
Tensor row_max(const Tensor& x) { return row_dispatch(ReduceOp::max, x); }
Tensor row_sum(const Tensor& x) { return row_dispatch(ReduceOp::sum, x); }
Tensor col_absmax(const Tensor& x) { return col_dispatch(ReduceOp::absmax, x); }
Tensor col_min(const Tensor& x) { return col_dispatch(ReduceOp::min, x); }
Tensor col_max(const Tensor& x) { return col_dispatch(ReduceOp::max, x); }
Tensor col_sum(const Tensor& x) { return col_dispatch(ReduceOp::sum, x); }
Tensor sum_all(const Tensor& x) { return sum_dispatch(x, false); }
Tensor mean_all(const Tensor& x) { return sum_dispatch(x, true); }

}  // namespace omniq
