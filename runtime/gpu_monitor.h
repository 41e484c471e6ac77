// What the GPU's clocks and power did while a benchmark ran: a background thread samples the SM
// clock, the board power and the clock-limit reasons through NVML.
//
// Why: under a sustained calibration the H100 hits its board power limit and lowers the SM clock
// (measured: 1620–1700 MHz at 690 of 700 W during a 7B training block, against 1980 MHz under ncu,
// which profiles one kernel at a time). Achieved TFLOP/s are only comparable across runs and against
// kernel profiles together with the clock they ran at, so `omniq bench calibrate` reports it.
//
// NVML is loaded with dlopen at run time (libnvidia-ml.so.1 ships with the driver), so binaries
// still start on machines without a GPU driver; there the monitor says it is unavailable and why.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "runtime/device.h"

namespace omniq {

struct GpuMonitorStats {
  bool available = false;
  std::string why;              // when not available: what was missing
  int64_t samples = 0;
  double mean_sm_mhz = 0, min_sm_mhz = 0;
  double max_sm_mhz = 0;        // the device's maximum SM clock (NVML max clock info)
  double mean_power_w = 0;
  double power_limit_w = 0;     // the enforced board power limit
  double power_capped = 0;      // fraction of samples whose clock was limited by the power cap (SW or HW)
  double thermal_limited = 0;   // fraction limited by a thermal slowdown
};

class GpuMonitor {
 public:
  // Starts sampling `dev` every `period_ms` (a CPU device or no NVML: an unavailable monitor).
  explicit GpuMonitor(const Device& dev, int period_ms = 50);
  ~GpuMonitor();
  GpuMonitor(const GpuMonitor&) = delete;
  GpuMonitor& operator=(const GpuMonitor&) = delete;

  // Stops sampling (idempotent) and returns what was seen since the start.
  GpuMonitorStats stop();

  // One line for logs: "SM clock 1665 MHz mean (1620 min, 1980 max), 690 W of 700 W, power-capped 96%".
  static std::string describe(const GpuMonitorStats& s);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  GpuMonitorStats stats_;
  bool stopped_ = false;
};

}  // namespace omniq
