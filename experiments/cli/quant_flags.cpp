#include "experiments/cli/quant_flags.h"

#include "ops/attention.h"
#include "runtime/device.h"
#include "runtime/error.h"

namespace omniq::cli {

void add_quant_flags(Args& a, const char* group_size_default) {
  a.option("method", "M", "rtn | omniquant | gptq | awq (weight-only) | smoothquant (weight-activation)", "omniquant");
  a.option("wbits", "N", "weight bits 2..8 (16 = keep weights)", "4");
  a.option("abits", "N", "activation bits 2..8 (16 = keep activations)", "16");
  a.option("group-size", "G", "weight group size (0 = per output channel)", group_size_default);
  a.flag("symmetric", "symmetric weight quantization (default asymmetric)");
  a.flag("lwc", "learnable weight clipping");
  a.flag("let", "learnable equivalent transformation");
  a.flag("aug-loss", "add MSE against the fp block run on the quantized stream (a third stream buffer)");
  a.flag("gptq", "omniquant: after training, quantize the LET-fused weights with GPTQ inside the learned LWC clipping");
  a.option("epochs", "N", "training epochs per block", "20");
  a.option("nsamples", "N", "calibration windows", "128");
  a.option("seqlen", "N", "calibration window length (clipped to the model's maximum)", "2048");
  a.option("lwc-lr", "LR", "AdamW learning rate of LWC", "1e-2");
  a.option("let-lr", "LR", "AdamW learning rate of LET", "5e-3");
  a.option("wd", "X", "AdamW weight decay", "0");
  a.option("alpha", "A", "LET init / SmoothQuant migration exponent (0.75 for W4A4 recipes)", "0.5");
}

QuantConfig read_quant_flags(const Args& a) {
  QuantConfig q;
  q.method = a.get("method");
  q.wbits = a.get_int("wbits");
  q.abits = a.get_int("abits");
  q.group_size = a.get_int("group-size");
  q.symmetric = a.flag_set("symmetric");
  q.lwc = a.flag_set("lwc");
  q.let = a.flag_set("let");
  q.aug_loss = a.flag_set("aug-loss");
  q.gptq = a.flag_set("gptq");
  q.epochs = a.get_int("epochs");
  q.nsamples = a.get_int("nsamples");
  q.seqlen = a.get_int("seqlen");
  q.lwc_lr = static_cast<float>(a.get_double("lwc-lr"));
  q.let_lr = static_cast<float>(a.get_double("let-lr"));
  q.weight_decay = static_cast<float>(a.get_double("wd"));
  q.let_alpha = static_cast<float>(a.get_double("alpha"));
  if (q.method != "omniquant") {
    OMNIQ_CHECK(!q.lwc && !q.let, "--method %s takes no --lwc/--let (those are OmniQuant's)", q.method.c_str());
    q.epochs = 0;  // only OmniQuant trains
  }
  return q;
}

void add_device_flags(Args& a) {
  a.option("device", "DEV", "cpu, cuda or cuda:N", cuda_available() ? "cuda" : "cpu");
  a.option("dtype", "T", "compute dtype on CUDA: bf16 (default) or f32 (the CPU computes in f32)", "bf16");
  a.flag("nondeterministic",
         "atomic flash-attention backward: a few % faster training steps, but reruns are no longer bit-identical "
         "(default: deterministic; also OMNIQ_NONDETERMINISTIC_ATTENTION=1)");
}

DeviceChoice read_device_flags(const Args& a) {
  DeviceChoice c;
  c.device = Device::parse(a.get("device"));
  OMNIQ_CHECK(c.device.is_cpu() || cuda_available(), "--device %s: no CUDA device visible; use --device cpu",
              c.device.str().c_str());
  std::string dt = a.get("dtype");
  OMNIQ_CHECK(dt == "bf16" || dt == "f32", "--dtype %s: use bf16 or f32", dt.c_str());
  c.compute = c.device.is_cpu() || dt == "f32" ? DType::f32 : DType::bf16;
  if (a.flag_set("nondeterministic")) set_attention_deterministic(false);
  return c;
}

}  // namespace omniq::cli
