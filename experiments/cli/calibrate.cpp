// omniq calibrate: quantize a model (RTN or OmniQuant) and write a Hugging Face folder.
#include <cstdio>
#include <memory>

#include "experiments/cli/args.h"
#include "experiments/cli/commands.h"
#include "experiments/cli/quant_flags.h"
#include "experiments/progress.h"
#include "models/model_config.h"
#include "quant/calibrate.h"
#include "runtime/error.h"
#include "runtime/gpu_monitor.h"

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
  add_quant_flags(a, "0");
  a.option("seed", "N", "seed for the calibration windows", "2");
  a.option("calib-text", "FILE", "calibration text (default: bundled WikiText-2 valid split)");
  add_device_flags(a);
  a.option("dump-windows", "FILE", "write the calibration windows' token ids as JSON (for reference scripts)");
  a.example("omniq calibrate --model data/models/llama-nano --method rtn --wbits 4 --group-size 128 --out out/rtn-w4g128");
  a.example("omniq calibrate --model llama-7b --method omniquant --wbits 3 --lwc --epochs 20 --out out/llama7b-w3");
  a.example("omniq calibrate --model opt-1.3b --wbits 4 --abits 4 --lwc --let --alpha 0.75 --out out/opt-w4a4");
  a.example("omniq calibrate --model llama-7b --method gptq --wbits 3 --group-size 128 --out out/llama7b-gptq");
  a.example("omniq calibrate --model llama-7b --wbits 3 --lwc --epochs 20 --gptq --out out/llama7b-omni-gptq");
  a.example("omniq calibrate --model opt-1.3b --method smoothquant --wbits 8 --abits 8 --alpha 0.5 --out out/opt-sq");
  if (!a.parse(argc, argv)) return 0;
  OMNIQ_CHECK(a.has("model") && a.has("out"), "omniq calibrate: --model DIR and --out DIR are required (see --help)");

  CalibrationOptions o;
  o.model_dir = a.get("model");
  o.out_dir = a.get("out");
  o.state_dir = a.get("state");
  o.windows_out = a.get("dump-windows");
  o.qc = read_quant_flags(a);
  QuantConfig& q = o.qc;
  q.seed = static_cast<uint64_t>(a.get_int("seed"));
  q.calib_text = a.get("calib-text");
  OMNIQ_CHECK(q.method != "omniquant" || q.lwc || q.let || q.epochs == 0,
              "--method omniquant needs --lwc and/or --let (or --epochs 0 to fuse a saved state)");
  q.validate();
  DeviceChoice dc = read_device_flags(a);
  o.device = dc.device;
  o.compute = dc.compute;

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
  GpuMonitor gpu(o.device);  // the clocks the run got: times are comparable only next to them
  CalibrationResult r = calibrate_model(o);
  const GpuMonitorStats g = gpu.stop();
  bar.finish();
  std::printf("done in %s: %zu blocks, peak memory %.0f MiB; model written to %s (state in %s)\n",
              format_duration(r.seconds).c_str(), r.blocks.size(), r.peak_bytes / 1048576.0, r.out_dir.c_str(),
              r.state_dir.c_str());
  if (g.available) std::printf("GPU during the run: %s\n", GpuMonitor::describe(g).c_str());
  return 0;
}

}  // namespace omniq::cli
