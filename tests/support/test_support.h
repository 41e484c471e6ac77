// Shared helpers for the GoogleTest suites: tolerance comparison, skipping CUDA tests without a
// GPU, finite-difference gradient checks, and paths to the bundled data.
#pragma once
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace omniq::test {

// In a CUDA test: skip with a message when no GPU is visible (CI has none).
#define OMNIQ_REQUIRE_CUDA()                                                              \
  do {                                                                                    \
    if (!::omniq::cuda_available()) GTEST_SKIP() << "no CUDA device visible: skipping GPU test"; \
  } while (0)

// |a - b| <= atol + rtol * |ref| elementwise; on failure reports the count, the worst element and
// the first few mismatches. Returns the max abs error (useful to print in notes).
::testing::AssertionResult all_close(const std::vector<float>& got, const std::vector<float>& ref, float atol,
                                     float rtol);
::testing::AssertionResult all_close(const Tensor& got, const Tensor& ref, float atol, float rtol);

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b);
float max_rel_error(const std::vector<float>& got, const std::vector<float>& ref);  // max |a-b| / max|ref|

// Central finite differences of a scalar function of the fp32 CPU tensor `x` (modified in place
// and restored), compared to the analytic gradient `grad` (same shape).
::testing::AssertionResult check_gradient(Tensor& x, const std::function<double()>& f, const Tensor& grad,
                                          double eps = 1e-3, double atol = 1e-3, double rtol = 1e-2,
                                          int max_points = 64);

// Repository paths.
std::string source_path(const std::string& rel);  // <repo>/rel
std::string shared_path(const std::string& rel);  // <repo>/../shared/rel (may not exist)

}  // namespace omniq::test
