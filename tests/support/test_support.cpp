#include "tests/support/test_support.h"

#include <algorithm>
#include <cmath>
#include <sstream>

namespace omniq::test {

::testing::AssertionResult all_close(const std::vector<float>& got, const std::vector<float>& ref, float atol,
                                     float rtol) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure() << "size mismatch: " << got.size() << " vs " << ref.size();
  }
  size_t bad = 0, worst = 0;
  double worst_excess = -1;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] == ref[i]) continue;  // exact, including equal infinities
    double diff = std::fabs(static_cast<double>(got[i]) - ref[i]);
    double tol = atol + rtol * std::fabs(static_cast<double>(ref[i]));
    bool nan_mismatch = std::isnan(got[i]) != std::isnan(ref[i]);
    if (diff > tol || nan_mismatch || (std::isnan(diff) && !std::isnan(ref[i]))) {
      if (bad < 5) first << "\n  [" << i << "] got " << got[i] << " ref " << ref[i] << " (|diff| " << diff << ")";
      ++bad;
      if (diff - tol > worst_excess) { worst_excess = diff - tol; worst = i; }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements differ beyond atol=" << atol
                                       << " rtol=" << rtol << "; worst at [" << worst << "]: got " << got[worst]
                                       << " ref " << ref[worst] << first.str();
}

::testing::AssertionResult all_close(const Tensor& got, const Tensor& ref, float atol, float rtol) {
  if (got.shape() != ref.shape()) {
    return ::testing::AssertionFailure() << "shape mismatch: " << got.str() << " vs " << ref.str();
  }
  return all_close(got.to_f32_vector(), ref.to_f32_vector(), atol, rtol);
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

float max_rel_error(const std::vector<float>& got, const std::vector<float>& ref) {
  float scale = 0;
  for (float r : ref) scale = std::max(scale, std::fabs(r));
  return max_abs_diff(got, ref) / (scale > 0 ? scale : 1.0f);
}

::testing::AssertionResult check_gradient(Tensor& x, const std::function<double()>& f, const Tensor& grad,
                                          double eps, double atol, double rtol, int max_points) {
  if (!x.device().is_cpu() || x.dtype() != DType::f32) {
    return ::testing::AssertionFailure() << "check_gradient needs an f32 CPU tensor, got " << x.str();
  }
  std::vector<float> g = grad.to_f32_vector();
  if (static_cast<int64_t>(g.size()) != x.numel()) {
    return ::testing::AssertionFailure() << "gradient has " << g.size() << " elements for " << x.str();
  }
  float* p = x.data_as<float>();
  int64_t n = x.numel();
  int64_t stride = std::max<int64_t>(1, n / max_points);
  std::ostringstream bad;
  int nbad = 0;
  for (int64_t i = 0; i < n; i += stride) {
    float orig = p[i];
    p[i] = static_cast<float>(orig + eps);
    double fp = f();
    p[i] = static_cast<float>(orig - eps);
    double fm = f();
    p[i] = orig;
    double fd = (fp - fm) / (2 * eps);
    double diff = std::fabs(fd - g[i]);
    if (diff > atol + rtol * std::fabs(fd)) {
      if (nbad < 5) bad << "\n  [" << i << "] analytic " << g[i] << " finite-diff " << fd;
      ++nbad;
    }
  }
  if (nbad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << nbad << " gradient entries disagree with finite differences" << bad.str();
}

std::string source_path(const std::string& rel) { return std::string(OMNIQ_SOURCE_DIR) + "/" + rel; }
std::string shared_path(const std::string& rel) { return std::string(OMNIQ_SHARED_DIR) + "/" + rel; }

}  // namespace omniq::test
