// omniq eval: perplexity of a model folder (original or quantized) on named datasets or text files.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>

#include "experiments/cli/args.h"
#include "experiments/cli/commands.h"
#include "models/datasets.h"
#include "experiments/progress.h"
#include "models/causal_lm.h"
#include "models/perplexity.h"
#include "models/tokenizer.h"
#include "quant/act_quant_hooks.h"
#include "quant/calibrate.h"
#include "quant/quant_config.h"
#include "runtime/allocator.h"
#include "runtime/error.h"

namespace omniq::cli {

namespace {
DType parse_dtype(const std::string& s) {
  if (s == "f32" || s == "fp32" || s == "float32") return DType::f32;
  if (s == "bf16" || s == "bfloat16") return DType::bf16;
  if (s == "f16" || s == "fp16" || s == "float16") return DType::f16;
  OMNIQ_FAIL("unknown --dtype '%s': use f32, bf16 or f16", s.c_str());
}
}  // namespace

int run_eval(int argc, char** argv) {
  Args a("eval",
         "Perplexity of a Hugging Face LLaMA/OPT folder (config.json, *.safetensors, tokenizer.json)\n"
         "by the OmniQuant protocol: tokenize the whole text once (BOS at the start), cut it into\n"
         "len/seqlen non-overlapping windows, ppl = exp(mean NLL of all predicted tokens).\n"
         "Prints one line per dataset: `<dataset> ppl <value> ...`.");
  a.option("model", "DIR", "model folder (original or written by omniq calibrate)");
  a.repeated("dataset", "NAME", "named dataset: wikitext2 (WikiText-2 raw test, bundled)");
  a.repeated("text", "FILE", "evaluate on a UTF-8 text file instead of / besides the datasets");
  a.option("seqlen", "N", "window length; 0 = min(2048, max_position_embeddings)", "0");
  a.option("device", "DEV", "cpu, cuda or cuda:N", cuda_available() ? "cuda" : "cpu");
  a.option("dtype", "T", "compute dtype f32|bf16|f16 (default f32 on cpu, bf16 on cuda)");
  a.option("max-windows", "N", "evaluate only the first N windows (quick checks); 0 = all", "0");
  a.example("omniq eval --model data/models/llama-nano --device cpu");
  a.example("omniq eval --model out/llama-w3 --dataset wikitext2 --text my_corpus.txt --seqlen 1024");
  if (!a.parse(argc, argv)) return 0;
  OMNIQ_CHECK(a.has("model"), "omniq eval: --model DIR is required (see omniq eval --help)");

  Device dev = Device::parse(a.get("device"));
  OMNIQ_CHECK(dev.is_cpu() || cuda_available(), "--device %s: no CUDA device is visible; use --device cpu",
              dev.str().c_str());
  DType dt = a.has("dtype") ? parse_dtype(a.get("dtype")) : (dev.is_cpu() ? DType::f32 : DType::bf16);
  OMNIQ_CHECK(!(dev.is_cpu() && dt != DType::f32), "--dtype %s on the CPU: the CPU path computes in f32",
              dtype_name(dt));

  std::vector<std::pair<std::string, std::string>> texts;  // label, path
  for (const std::string& d : a.all("dataset")) texts.emplace_back(d, dataset_path(d));
  for (const std::string& f : a.all("text")) texts.emplace_back(f, f);
  if (texts.empty()) texts.emplace_back("wikitext2", dataset_path("wikitext2"));

  std::string dir = a.get("model");
  Tokenizer tok = Tokenizer::from_model_dir(dir);
  CausalLM model(dir, dt, dev);
  // A weight-activation model exported by omniq calibrate: its activations are quantized at run time.
  std::unique_ptr<ActivationQuantHooks> act_hooks;
  std::string qpath = dir + "/" + kQuantConfigFile;
  if (std::ifstream qf{qpath}) {
    std::string text((std::istreambuf_iterator<char>(qf)), std::istreambuf_iterator<char>());
    QuantConfig qc = QuantConfig::from_json(text, qpath);
    std::printf("quantized by omniq: %s %s\n", qc.method.c_str(), qc.setting_name().c_str());
    if (qc.act_quant()) {
      act_hooks = std::make_unique<ActivationQuantHooks>(qc.abits);
      model.set_block_hooks(act_hooks.get());
    }
  }
  int64_t seqlen = a.get_int("seqlen");
  if (seqlen == 0) seqlen = std::min<int64_t>(2048, model.config().max_position_embeddings);
  OMNIQ_CHECK(seqlen >= 2 && seqlen <= model.config().max_position_embeddings,
              "--seqlen %lld is outside [2, max_position_embeddings = %lld]", static_cast<long long>(seqlen),
              static_cast<long long>(model.config().max_position_embeddings));
  int64_t max_windows = a.get_int("max-windows");

  std::printf("model %s: %s, %s on %s, seqlen %lld\n", dir.c_str(), model.config().summary().c_str(), dtype_name(dt),
              dev.str().c_str(), static_cast<long long>(seqlen));
  for (const auto& [label, path] : texts) {
    std::vector<int32_t> ids = tok.encode(read_text_file(path), /*add_special_tokens=*/true);
    if (max_windows > 0 && static_cast<int64_t>(ids.size()) > max_windows * seqlen) ids.resize(max_windows * seqlen);
    ProgressBar bar("eval " + label, static_cast<int64_t>(ids.size()) / seqlen, "win");
    PerplexityResult r = evaluate_perplexity(model, ids, seqlen, [&](int64_t d, int64_t) { bar.update(d); });
    bar.finish();
    std::printf("%s ppl %.4f  (nll %.6f, %lld windows x %lld, %lld tokens, %.1f s, %.0f tokens/s)\n", label.c_str(),
                r.ppl, r.mean_nll, static_cast<long long>(r.windows), static_cast<long long>(seqlen),
                static_cast<long long>(r.predicted_tokens), r.seconds, r.tokens_per_second);
  }
  if (dev.is_cuda()) {
    std::printf("peak GPU memory %.1f MiB\n", memory_stats(dev).peak_bytes / 1048576.0);
  }
  return 0;
}

}  // namespace omniq::cli
