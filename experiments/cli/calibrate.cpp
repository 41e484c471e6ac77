// omniq calibrate: quantize a model (RTN or OmniQuant) and write a Hugging Face folder.
#include <cstdio>
#include <memory>

#include "experiments/cli/args.h"
#include "experiments/cli/commands.h"
#include "experiments/progress.h"
#include "models/model_config.h"
#include "quant/calibrate.h"
#include "runtime/error.h"

namespace omniq::cli {

int run_calibrate(int argc, char** argv) {
  Args a("calibrate",
         "Quantize a Hugging Face LLaMA/OPT model block by block and write the result as a Hugging Face\n"
         "folder (fused, fake-quantized fp16 weights + config + tokenizer) that `omniq eval` and\n"
         "transformers load. OmniQuant trains learnable weight clipping (--lwc) and learnable\n"
         "equivalent transformations (--let) per block to match the full-precision block's output.\n"
         "Finished blocks are kept in <out>.state/: rerunning the same command resumes, and\n"
         "--epochs 0 re-fuses and re-exports from the saved parameters.");
  a.option("model", "DIR", "source model folder");
  a.option("out", "DIR", "output Hugging Face folder (written atomically at the end)");
  a.option("state", "DIR", "folder for per-block results (default: <out>.state)");
  a.option("method", "M", "rtn | omniquant | gptq | awq (weight-only) | smoothquant (weight-activation)", "omniquant");
  a.option("wbits", "N", "weight bits 2..8 (16 = keep weights)", "4");
  a.option("abits", "N", "activation bits 2..8 (16 = keep activations)", "16");
  a.option("group-size", "G", "weight group size (0 = per output channel)", "0");
  a.flag("symmetric", "symmetric weight quantization (default asymmetric)");
  a.flag("lwc", "learnable weight clipping");
  a.flag("let", "learnable equivalent transformation");
  a.flag("aug-loss", "add MSE against the fp block run on the quantized stream");
  a.flag("gptq", "omniquant: after training, quantize the LET-fused weights with GPTQ inside the learned LWC clipping");
  a.option("epochs", "N", "training epochs per block", "20");
  a.option("nsamples", "N", "calibration windows", "128");
  a.option("seqlen", "N", "calibration window length (clipped to the model's maximum)", "2048");
  a.option("seed", "N", "seed for the calibration windows", "2");
  a.option("lwc-lr", "LR", "AdamW learning rate of LWC", "1e-2");
  a.option("let-lr", "LR", "AdamW learning rate of LET", "5e-3");
  a.option("wd", "X", "AdamW weight decay", "0");
  a.option("alpha", "A", "LET init / SmoothQuant migration exponent (0.75 for W4A4 recipes)", "0.5");
  a.option("calib-text", "FILE", "calibration text (default: bundled WikiText-2 valid split)");
  a.option("device", "DEV", "cpu, cuda or cuda:N", cuda_available() ? "cuda" : "cpu");
  a.option("dtype", "T", "compute dtype on CUDA: bf16 (default) or f32", "bf16");
  a.option("dump-windows", "FILE", "write the calibration windows' token ids as JSON (for reference scripts)");
  a.example("omniq calibrate --model data/models/llama-nano --method rtn --wbits 4 --group-size 128 --out out/rtn-w4g128");
  a.example("omniq calibrate --model llama-7b --method omniquant --wbits 3 --lwc --epochs 20 --out out/llama7b-w3");
  a.example("omniq calibrate --model opt-1.3b --wbits 4 --abits 4 --lwc --let --alpha 0.75 --out out/opt-w4a4");
  a.example("omniq calibrate --model llama-7b --method gptq --wbits 3 --group-size 128 --out out/llama7b-gptq");
  a.example("omniq calibrate --model llama-7b --wbits 3 --lwc --epochs 20 --gptq --out out/llama7b-omni-gptq  # OmniQuant then GPTQ");
  a.example("omniq calibrate --model opt-1.3b --method smoothquant --wbits 8 --abits 8 --alpha 0.5 --out out/opt-sq");
  if (!a.parse(argc, argv)) return 0;
  OMNIQ_CHECK(a.has("model") && a.has("out"), "omniq calibrate: --model DIR and --out DIR are required (see --help)");

  CalibrationOptions o;
  o.model_dir = a.get("model");
  o.out_dir = a.get("out");
  o.state_dir = a.get("state");
  o.windows_out = a.get("dump-windows");
  QuantConfig& q = o.qc;
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
  q.seed = static_cast<uint64_t>(a.get_int("seed"));
  q.lwc_lr = static_cast<float>(a.get_double("lwc-lr"));
  q.let_lr = static_cast<float>(a.get_double("let-lr"));
  q.weight_decay = static_cast<float>(a.get_double("wd"));
  q.let_alpha = static_cast<float>(a.get_double("alpha"));
  q.calib_text = a.get("calib-text");
  if (q.method != "omniquant") {
    OMNIQ_CHECK(!q.lwc && !q.let, "--method %s takes no --lwc/--let (those are OmniQuant's)", q.method.c_str());
    q.epochs = 0;  // only OmniQuant trains
  } else {
    OMNIQ_CHECK(q.lwc || q.let || q.epochs == 0,
                "--method omniquant needs --lwc and/or --let (or --epochs 0 to fuse a saved state)");
  }
  q.validate();
  o.device = Device::parse(a.get("device"));
  OMNIQ_CHECK(o.device.is_cpu() || cuda_available(), "--device %s: no CUDA device visible; use --device cpu",
              o.device.str().c_str());
  std::string dt = a.get("dtype");
  OMNIQ_CHECK(dt == "bf16" || dt == "f32", "--dtype %s: use bf16 or f32", dt.c_str());
  o.compute = o.device.is_cpu() || dt == "f32" ? DType::f32 : DType::bf16;

  std::printf("calibrate %s -> %s: %s %s, %d samples x %d tokens, %d epochs, on %s\n", o.model_dir.c_str(),
              o.out_dir.c_str(), q.method.c_str(), q.setting_name().c_str(), q.nsamples, q.seqlen, q.epochs,
              o.device.str().c_str());
  // One bar over the whole run (blocks × epochs) so the ETA covers everything left.
  const int64_t nblocks = ModelConfig::from_dir(o.model_dir).num_layers;
  const int64_t per_block = q.trains() ? q.epochs : 1;
  ProgressBar bar("calibrate", nblocks * per_block, q.trains() ? "epoch" : "block");
  o.on_epoch = [&](int64_t block, int epoch, double loss) {
    bar.update(block * per_block + epoch + 1, strformat("block %lld loss %.4g", static_cast<long long>(block), loss));
  };
  o.on_block = [&](const BlockReport& r) {
    bar.update((r.block + 1) * per_block);
    if (ProgressBar::enabled()) std::fputs("\r\033[K", stderr);  // clear the bar line before the block line
    std::printf("block %3lld  %s  final mse %.6g  %.1f s  peak %.0f MiB%s\n", static_cast<long long>(r.block),
                r.epoch_loss.empty() ? "(no training)"
                                     : strformat("loss %.5g -> %.5g", r.epoch_loss.front(), r.epoch_loss.back()).c_str(),
                r.final_loss, r.seconds, r.peak_bytes / 1048576.0, r.resumed ? "  (resumed)" : "");
    std::fflush(stdout);
  };
  CalibrationResult r = calibrate_model(o);
  bar.finish();
  std::printf("done in %s: %zu blocks, peak memory %.0f MiB; model written to %s (state in %s)\n",
              format_duration(r.seconds).c_str(), r.blocks.size(), r.peak_bytes / 1048576.0, r.out_dir.c_str(),
              r.state_dir.c_str());
  return 0;
}

}  // namespace omniq::cli
