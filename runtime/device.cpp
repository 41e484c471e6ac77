#include "runtime/device.h"

#include "runtime/error.h"
#ifdef OMNIQ_HAS_CUDA
#include "runtime/cuda_backend.h"
#endif

namespace omniq {

Device Device::parse(const std::string& s) {
  if (s == "cpu") return cpu();
  if (s == "cuda" || s == "gpu") return cuda(0);
  if (s.rfind("cuda:", 0) == 0) {
    try {
      size_t used = 0;
      int idx = std::stoi(s.substr(5), &used);
      if (used == s.size() - 5 && idx >= 0) return cuda(idx);
    } catch (const std::exception&) {
    }
  }
  OMNIQ_FAIL("unknown device '%s': use cpu, cuda or cuda:N", s.c_str());
}

int cuda_device_count() {
#ifdef OMNIQ_HAS_CUDA
  static int count = cuda_rt::device_count();
  return count;
#else
  return 0;
#endif
}

bool cuda_available() { return cuda_device_count() > 0; }

}  // namespace omniq
