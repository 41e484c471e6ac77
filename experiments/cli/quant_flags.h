// The command-line flags shared by `omniq calibrate` and `omniq bench calibrate`: the quantization
// settings (method, bits, group size, LWC/LET, recipe numbers) and the device/compute dtype, declared
// once so both commands spell, document and validate them the same way.
#pragma once
#include "experiments/cli/args.h"
#include "quant/quant_config.h"
#include "runtime/device.h"
#include "runtime/dtype.h"

namespace omniq::cli {

// `group_size_default`: "0" for calibrate (per channel, the paper's W3A16/W4A16), "128" for the
// bench (its headline setting is W4A16g128).
void add_quant_flags(Args& a, const char* group_size_default);
// The QuantConfig the flags describe (not yet validated; the caller adds its own method rules).
QuantConfig read_quant_flags(const Args& a);

void add_device_flags(Args& a);
struct DeviceChoice {
  Device device;
  DType compute;  // f32 on the CPU; bf16 (default) or f32 on CUDA
};
// Checks that a requested CUDA device exists and the dtype is bf16|f32.
DeviceChoice read_device_flags(const Args& a);

}  // namespace omniq::cli
