#include "runtime/gpu_monitor.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <type_traits>

#include "runtime/error.h"
#ifdef OMNIQ_HAS_CUDA
#include <cuda_runtime.h>
#endif

namespace omniq {

namespace {

// The few NVML entry points used, declared here instead of including nvml.h: NVML is optional and
// loaded at run time. These signatures and constants are NVML's stable C API.
using NvmlReturn = int;  // nvmlReturn_t; 0 = NVML_SUCCESS
using NvmlDevice = struct NvmlDeviceOpaque*;
constexpr int kNvmlClockSm = 1;  // NVML_CLOCK_SM
// nvmlClocksEventReasons bits
constexpr unsigned long long kSwPowerCap = 0x4ull, kHwSlowdown = 0x8ull, kSwThermal = 0x20ull,
                             kHwThermal = 0x40ull, kHwPowerBrake = 0x80ull;

struct Nvml {
  bool ok = false;
  std::string why;
  NvmlReturn (*init)() = nullptr;
  NvmlReturn (*by_pci)(const char*, NvmlDevice*) = nullptr;
  NvmlReturn (*by_index)(unsigned, NvmlDevice*) = nullptr;
  NvmlReturn (*clock)(NvmlDevice, int, unsigned*) = nullptr;
  NvmlReturn (*max_clock)(NvmlDevice, int, unsigned*) = nullptr;
  NvmlReturn (*power)(NvmlDevice, unsigned*) = nullptr;        // mW
  NvmlReturn (*power_limit)(NvmlDevice, unsigned*) = nullptr;  // mW
  NvmlReturn (*reasons)(NvmlDevice, unsigned long long*) = nullptr;

  Nvml() {
    void* h = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      why = "libnvidia-ml.so.1 not found (no NVIDIA driver)";
      return;
    }
    auto sym = [&](auto& fn, const char* name) { fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name)); };
    sym(init, "nvmlInit_v2");
    sym(by_pci, "nvmlDeviceGetHandleByPciBusId_v2");
    sym(by_index, "nvmlDeviceGetHandleByIndex_v2");
    sym(clock, "nvmlDeviceGetClockInfo");
    sym(max_clock, "nvmlDeviceGetMaxClockInfo");
    sym(power, "nvmlDeviceGetPowerUsage");
    sym(power_limit, "nvmlDeviceGetEnforcedPowerLimit");
    sym(reasons, "nvmlDeviceGetCurrentClocksEventReasons");  // the newer name first
    if (!reasons) sym(reasons, "nvmlDeviceGetCurrentClocksThrottleReasons");
    if (!init || !clock || !power || (!by_pci && !by_index)) {
      why = "libnvidia-ml.so.1 lacks the clock/power queries";
      return;
    }
    if (init() != 0) {
      why = "nvmlInit failed";
      return;
    }
    ok = true;
  }
};

Nvml& nvml() {
  static Nvml n;  // loaded once per process, thread-safe
  return n;
}

}  // namespace

struct GpuMonitor::Impl {
  NvmlDevice dev = nullptr;
  int period_ms = 50;
  std::mutex mu;
  double sum_mhz = 0, sum_w = 0, min_mhz = 1e30;
  int64_t n = 0, capped = 0, thermal = 0;

  void sample() {
    Nvml& L = nvml();
    unsigned mhz = 0, mw = 0;
    unsigned long long r = 0;
    if (L.clock(dev, kNvmlClockSm, &mhz) != 0 || L.power(dev, &mw) != 0) return;
    const bool have_r = L.reasons && L.reasons(dev, &r) == 0;
    std::lock_guard<std::mutex> g(mu);
    ++n;
    sum_mhz += mhz;
    sum_w += mw * 1e-3;
    min_mhz = std::min(min_mhz, static_cast<double>(mhz));
    if (have_r && (r & (kSwPowerCap | kHwPowerBrake | kHwSlowdown))) ++capped;
    if (have_r && (r & (kSwThermal | kHwThermal))) ++thermal;
  }
};

GpuMonitor::GpuMonitor(const Device& dev, int period_ms) {
  if (!dev.is_cuda()) {
    stats_.why = "not a CUDA device";
    return;
  }
#ifdef OMNIQ_HAS_CUDA
  Nvml& L = nvml();
  if (!L.ok) {
    stats_.why = L.why;
    return;
  }
  auto impl = std::make_unique<Impl>();
  impl->period_ms = std::max(period_ms, 1);
  // By PCI bus id, so CUDA_VISIBLE_DEVICES renumbering cannot pick the wrong board.
  char bus[32] = {0};
  bool found = false;
  if (L.by_pci && cudaDeviceGetPCIBusId(bus, sizeof bus, dev.index) == cudaSuccess)
    found = L.by_pci(bus, &impl->dev) == 0;
  if (!found && L.by_index) found = L.by_index(static_cast<unsigned>(dev.index), &impl->dev) == 0;
  if (!found) {
    stats_.why = "NVML does not know " + dev.str();
    return;
  }
  unsigned v = 0;
  if (L.max_clock && L.max_clock(impl->dev, kNvmlClockSm, &v) == 0) stats_.max_sm_mhz = v;
  if (L.power_limit && L.power_limit(impl->dev, &v) == 0) stats_.power_limit_w = v * 1e-3;
  stats_.available = true;
  impl_ = std::move(impl);
  Impl* p = impl_.get();
  thread_ = std::thread([this, p] {
    while (!stop_.load(std::memory_order_relaxed)) {
      p->sample();
      std::this_thread::sleep_for(std::chrono::milliseconds(p->period_ms));
    }
  });
#else
  stats_.why = "built without CUDA";
#endif
}

GpuMonitor::~GpuMonitor() { stop(); }

GpuMonitorStats GpuMonitor::stop() {
  if (stopped_) return stats_;
  stopped_ = true;
  stop_ = true;
  if (thread_.joinable()) thread_.join();
  if (!impl_) return stats_;
  impl_->sample();  // at least one sample, however short the run
  std::lock_guard<std::mutex> g(impl_->mu);
  const double n = static_cast<double>(impl_->n);
  stats_.samples = impl_->n;
  if (impl_->n > 0) {
    stats_.mean_sm_mhz = impl_->sum_mhz / n;
    stats_.min_sm_mhz = impl_->min_mhz;
    stats_.mean_power_w = impl_->sum_w / n;
    stats_.power_capped = static_cast<double>(impl_->capped) / n;
    stats_.thermal_limited = static_cast<double>(impl_->thermal) / n;
  }
  return stats_;
}

std::string GpuMonitor::describe(const GpuMonitorStats& s) {
  if (!s.available) return "clock/power not monitored (" + s.why + ")";
  if (s.samples == 0) return "clock/power: no samples";
  std::string out = strformat("SM clock %.0f MHz mean (%.0f min, %.0f max), %.0f W of %.0f W, power-capped %.0f%%",
                              s.mean_sm_mhz, s.min_sm_mhz, s.max_sm_mhz, s.mean_power_w, s.power_limit_w,
                              100 * s.power_capped);
  if (s.thermal_limited > 0) out += strformat(", thermal-limited %.0f%%", 100 * s.thermal_limited);
  return out;
}

}  // namespace omniq
