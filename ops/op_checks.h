// Host-side argument checks shared by the op dispatch files (ops/<op>.cpp). Internal: not part of
// the public API, include only from ops/*.cpp.
#pragma once
#include "runtime/error.h"
#include "runtime/tensor.h"

namespace omniq::detail {

inline void check_defined(const Tensor& t, const char* op, const char* name) {
  OMNIQ_CHECK(t.defined(), "%s: %s is an undefined tensor", op, name);
}

#ifndef OMNIQ_HAS_CUDA
// A CUDA tensor reached a dispatch in a build without CUDA kernels.
[[noreturn]] inline void no_cuda(const char* op, const Tensor& t) {
  OMNIQ_FAIL("%s: %s is on a CUDA device but omniq was built without CUDA (reconfigure with -DOMNIQ_CUDA=ON)",
             op, t.str().c_str());
}
#endif

}  // namespace omniq::detail
