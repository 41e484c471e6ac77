// The GPU clock/power monitor behind `omniq bench calibrate`'s clock line.
#include <chrono>
#include <thread>

#include "runtime/gpu_monitor.h"
#include "runtime/tensor.h"
#include "tests/support/test_support.h"

namespace omniq {

TEST(GpuMonitor, CpuDeviceIsUnavailableWithAReason) {
  GpuMonitor m(Device::cpu());
  GpuMonitorStats s = m.stop();
  EXPECT_FALSE(s.available);
  EXPECT_EQ(s.why, "not a CUDA device");
  EXPECT_EQ(s.samples, 0);
  EXPECT_NE(GpuMonitor::describe(s).find("not monitored"), std::string::npos);
  EXPECT_EQ(m.stop().why, s.why);  // stop is idempotent
}

TEST(GpuMonitorCuda, SamplesClockAndPowerWhileWorking) {
  OMNIQ_REQUIRE_CUDA();
  GpuMonitor m(Device::cuda(0), 10);
  // Keep the GPU busy for ~0.3 s so the samples see it working.
  Tensor a = Tensor::uniform({2048, 2048}, -1.0f, 1.0f, 1, DType::f32, Device::cuda(0));
  const auto t0 = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(300)) {
    Tensor b = a.clone();
    (void)b.to_f32_vector();
  }
  GpuMonitorStats s = m.stop();
  if (!s.available) GTEST_SKIP() << "NVML unavailable: " << s.why;
  EXPECT_GE(s.samples, 5);  // 10 ms period over >= 0.3 s
  EXPECT_GT(s.mean_sm_mhz, 0);
  EXPECT_GT(s.max_sm_mhz, 0);
  EXPECT_LE(s.min_sm_mhz, s.mean_sm_mhz);
  EXPECT_LE(s.mean_sm_mhz, s.max_sm_mhz + 1);  // mean of samples never above the board maximum
  EXPECT_GT(s.mean_power_w, 0);
  EXPECT_GT(s.power_limit_w, 0);
  EXPECT_GE(s.power_capped, 0);
  EXPECT_LE(s.power_capped, 1);
  EXPECT_NE(GpuMonitor::describe(s).find("MHz mean"), std::string::npos);
}

}  // namespace omniq
