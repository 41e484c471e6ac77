#include "quant/calibrate.h"

#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "autograd/functions.h"
#include "models/datasets.h"
#include "models/causal_lm.h"
#include "models/hf_export.h"
#include "models/safetensors.h"
#include "models/safetensors_writer.h"
#include "models/tokenizer.h"
#include "ops/loss.h"
#include "ops/reduce.h"
#include "quant/act_quant_hooks.h"
#include "quant/awq.h"
#include "quant/gptq.h"
#include "quant/smoothquant.h"
#include "quant/block_quantizer.h"
#include "quant/block_trainer.h"
#include "quant/calib_data.h"
#include "runtime/allocator.h"
#include "runtime/error.h"

namespace omniq {

namespace {

constexpr int64_t kAwqSearchSamples = 32;

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

void make_dirs(const std::string& p) {
  std::string cur;
  for (size_t i = 0; i <= p.size(); ++i) {
    if (i == p.size() || p[i] == '/') {
      if (!cur.empty() && !exists(cur)) {
        OMNIQ_CHECK(::mkdir(cur.c_str(), 0755) == 0 || exists(cur), "cannot create directory '%s'", cur.c_str());
      }
    }
    if (i < p.size()) cur += p[i];
  }
}

std::string block_state_path(const std::string& dir, int64_t i) {
  char name[64];
  std::snprintf(name, sizeof name, "/block_%03lld.safetensors", static_cast<long long>(i));
  return dir + name;
}

// Runs `block` over every sample of `in` ([N, T, C]) into a new [N, T, C] tensor.
Tensor run_block_over(const ModelConfig& cfg, const std::map<std::string, ag::Var>& params, const Tensor& in,
                      BlockHooks* hooks) {
  Tensor out = Tensor::empty(in.shape(), in.dtype(), in.device());
  for (int64_t j = 0; j < in.size(0); ++j) {
    ag::Tape t;
    ag::Var y = decoder_block_forward(t, cfg, params, ag::constant(in.view_rows(j, 1)), hooks);
    out.view_rows(j, 1).copy_from(y->value);
  }
  return out;
}

// Mean over samples of MSE(a_j, b_j), one host read.
double mean_mse(const Tensor& a, const Tensor& b) {
  Tensor acc = Tensor::zeros({a.size(0)}, DType::f32, a.device());
  for (int64_t j = 0; j < a.size(0); ++j) acc.view_rows(j, 1).copy_from(mse_loss_forward(a.view_rows(j, 1), b.view_rows(j, 1)));
  double s = 0;
  for (float v : acc.to_f32_vector()) s += v;
  return s / static_cast<double>(a.size(0));
}

bool all_finite(const BlockWeights& w) {
  for (const auto& [k, t] : w.tensors)
    if (!std::isfinite(sum_all(t).item())) return false;
  return true;
}

BlockWeights clone_as(const BlockWeights& w, DType dt) {
  BlockWeights out;
  out.what = w.what;
  for (const auto& [k, t] : w.tensors) out.tensors[k] = t.to(dt);
  return out;
}

}  // namespace

CalibrationResult calibrate_model(const CalibrationOptions& opt) {
  const QuantConfig& qc = opt.qc;
  qc.validate();
  double t0 = now_seconds();
  Device dev = opt.device;
  DType compute = opt.compute;
  reset_peak_memory(dev);

  ModelCheckpoint ckpt(opt.model_dir);
  const ModelConfig& cfg = ckpt.config();
  int64_t seqlen = std::min<int64_t>(qc.seqlen, cfg.max_position_embeddings);

  CalibrationResult result;
  result.out_dir = opt.out_dir;
  result.state_dir = opt.state_dir.empty() ? opt.out_dir + ".state" : opt.state_dir;
  make_dirs(result.state_dir);
  // A state folder belongs to one configuration: refuse to mix blocks of different settings.
  std::string cfg_path = result.state_dir + "/quant_config.json";
  QuantConfig resolved = qc;
  resolved.seqlen = static_cast<int>(seqlen);
  std::string cfg_json = resolved.to_json();
  if (exists(cfg_path)) {
    std::ifstream f(cfg_path);
    std::string prev((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    QuantConfig p = QuantConfig::from_json(prev, cfg_path);
    p.epochs = resolved.epochs;  // --epochs 0 re-uses trained blocks
    OMNIQ_CHECK(p.to_json() == cfg_json,
                "%s was written by a run with other settings: use another --out (or --state), or delete it",
                cfg_path.c_str());
  } else {
    std::ofstream(cfg_path) << cfg_json;
  }

  // 1. Calibration windows and block-0 inputs.
  std::string calib_path = qc.calib_text.empty() ? dataset_path("wikitext2-valid") : qc.calib_text;
  Tokenizer tok = Tokenizer::from_model_dir(opt.model_dir);
  std::vector<int32_t> ids = tok.encode(read_text_file(calib_path), true);
  auto windows = sample_calibration_windows(ids, qc.nsamples, seqlen, qc.seed);
  result.calib_tokens = qc.nsamples * seqlen;
  if (!opt.windows_out.empty()) write_file_atomic(opt.windows_out, nlohmann::json(windows).dump());
  Tensor fp_inps = Tensor::empty({qc.nsamples, seqlen, cfg.hidden_size}, compute, dev);
  {
    NamedWeights emb = ckpt.load_embeddings(compute, dev);
    for (int64_t j = 0; j < qc.nsamples; ++j) {
      Tensor x = embed_tokens(cfg, emb, Tensor::from_i32(windows[static_cast<size_t>(j)], {1, seqlen}), dev);
      fp_inps.view_rows(j, 1).copy_from(x);
    }
  }
  Tensor q_inps = fp_inps.clone();

  // 2. Blocks.
  std::map<int64_t, BlockWeights> gptq_blocks;  // GPTQ's weights of the current block (f32)
  for (int64_t i = 0; i < ckpt.num_blocks(); ++i) {
    double tb = now_seconds();
    reset_peak_memory(dev);
    BlockReport rep;
    rep.block = i;
    BlockWeights w = ckpt.load_block(i, compute, dev);
    BlockWeights w32 = compute == DType::f32 ? BlockWeights{} : ckpt.load_block(i, DType::f32, dev);
    const BlockWeights& wq = compute == DType::f32 ? w : w32;
    auto fp_params = block_params(w);

    // fp targets, and the per-channel input statistics LET / SmoothQuant / AWQ initialise from.
    ActivationStatsRecorder stats;
    bool need_stats = qc.let || qc.method == "smoothquant" || qc.method == "awq";
    Tensor fp_outs = run_block_over(cfg, fp_params, fp_inps, need_stats ? &stats : nullptr);
    BlockQuantizer bq(cfg, qc, wq, &stats.stats(), compute);  // knows each method's parameters
    if (qc.method == "smoothquant") init_smoothquant(bq, cfg, qc, wq, stats.stats());
    if (qc.method == "awq") {
      // The search runs 60 fused-block passes per pair grid: like the AWQ paper's 128 × 512 tokens,
      // search on a subset of the windows (at most 32).
      int64_t ns = std::min<int64_t>(fp_inps.size(0), kAwqSearchSamples);
      AwqReport ar = init_awq(bq, cfg, qc, wq, block_params(wq), fp_inps.view_rows(0, ns), fp_outs.view_rows(0, ns),
                              stats.stats());
      for (const auto& [pair, alpha] : ar.alpha) rep.search[pair + ".alpha"] = alpha;
    }

    std::string state = block_state_path(result.state_dir, i);
    if (exists(state)) {
      SafetensorsFile f(state);
      for (auto& [name, var] : bq.learned()) {
        OMNIQ_CHECK(f.has("learned." + name), "%s lacks learned.%s: delete it to recalibrate block %lld",
                    state.c_str(), name.c_str(), static_cast<long long>(i));
        var->value.copy_from(f.read("learned." + name));
      }
      if (qc.method == "gptq") {  // GPTQ has no learned parameters: the state holds its weights
        BlockWeights g = bq.fused(wq, DType::f32);
        for (auto& [key, t] : g.tensors) t.copy_from(f.read("fused." + key));
        gptq_blocks[i] = std::move(g);
      }
      auto meta = f.metadata();
      if (meta.count("epoch_loss")) rep.epoch_loss = nlohmann::json::parse(meta.at("epoch_loss")).get<std::vector<double>>();
      rep.resumed = true;
    } else if (qc.trains()) {
      std::unique_ptr<Tensor> aug;
      if (qc.aug_loss) aug = std::make_unique<Tensor>(run_block_over(cfg, fp_params, q_inps, nullptr));
      BlockTrainingData data{&q_inps, &fp_outs, aug.get()};
      BlockTrainingResult tr = train_block(cfg, qc, block_params(wq), bq, data, i, [&](int e, double l) {
        if (opt.on_epoch) opt.on_epoch(i, e, l);
      });
      rep.epoch_loss = tr.epoch_loss;
      rep.nan_retries = tr.nan_retries;
    }

    // Fuse, check, and propagate the quantized stream through the final block.
    BlockWeights fused = bq.fused(wq, compute);
    if (qc.method == "gptq" && gptq_blocks.count(i)) {
      for (auto& [key, t] : fused.tensors) t.copy_from(gptq_blocks.at(i).get(key));
    } else if (qc.method == "gptq") {
      // GPTQ replaces the weights: sequentially per input group, on the quantized stream's inputs.
      BlockWeights g = bq.fused(wq, DType::f32);  // the (untransformed) block with f32 Linear weights
      for (const std::string& site : block_linear_sites(cfg)) g.get(site + ".weight").copy_from(wq.get(site + ".weight"));
      gptq_quantize_block(cfg, g, q_inps, WeightQuantSpec{qc.wbits, qc.group_size, qc.symmetric}, GptqOptions{});
      for (auto& [key, t] : fused.tensors) t.copy_from(g.get(key));
      gptq_blocks[i] = std::move(g);
    }
    OMNIQ_CHECK(all_finite(fused), "block %lld: the fused quantized weights contain NaN/Inf; nothing was written",
                static_cast<long long>(i));
    ActivationQuantHooks act(qc.abits);
    Tensor q_outs = run_block_over(cfg, block_params(fused), q_inps, qc.act_quant() ? &act : nullptr);
    rep.final_loss = mean_mse(q_outs, fp_outs);
    rep.seconds = now_seconds() - tb;
    rep.peak_bytes = memory_stats(dev).peak_bytes;

    if (!rep.resumed) {
      BlockWeights fused16 = qc.method == "gptq" ? clone_as(gptq_blocks.at(i), DType::f16) : bq.fused(wq, DType::f16);
      std::vector<std::pair<std::string, const Tensor*>> tensors;
      std::vector<std::string> names;
      for (auto& [name, var] : bq.learned()) tensors.emplace_back("learned." + name, &var->value);
      for (auto& [key, t] : fused16.tensors) tensors.emplace_back("fused." + key, &t);
      std::map<std::string, std::string> meta{{"block", std::to_string(i)},
                                              {"epoch_loss", nlohmann::json(rep.epoch_loss).dump()},
                                              {"final_loss", std::to_string(rep.final_loss)},
                                              {"seconds", std::to_string(rep.seconds)},
                                              {"nan_retries", std::to_string(rep.nan_retries)},
                                              {"search", nlohmann::json(rep.search).dump()},
                                              {"quant_config", cfg_json}};
      write_safetensors(state, tensors, meta);
    }
    gptq_blocks.erase(i);
    q_inps = std::move(q_outs);
    fp_inps = std::move(fp_outs);
    result.peak_bytes = std::max(result.peak_bytes, rep.peak_bytes);
    result.blocks.push_back(rep);
    if (opt.on_block) opt.on_block(rep);
  }

  // 3. Export: the source checkpoint with every block's tensors replaced by the fused ones.
  if (opt.export_model) {
    std::map<std::string, std::pair<int64_t, std::string>> where;  // hf_name -> (block, key)
    for (int64_t i = 0; i < ckpt.num_blocks(); ++i)
      for (const WeightSpec& s : block_weight_specs(cfg, i)) where[s.hf_name] = {i, s.key};
    int64_t open_block = -1;
    std::unique_ptr<SafetensorsFile> file;
    Tensor current;
    nlohmann::ordered_json meta = nlohmann::ordered_json::parse(cfg_json);
    nlohmann::ordered_json blocks = nlohmann::ordered_json::array();
    for (const BlockReport& b : result.blocks) blocks.push_back({{"block", b.block}, {"final_loss", b.final_loss}});
    meta["blocks"] = blocks;
    export_hf_model(
        opt.model_dir, opt.out_dir,
        [&](const std::string& hf_name) -> const Tensor* {
          auto it = where.find(hf_name);
          if (it == where.end()) return nullptr;
          if (it->second.first != open_block) {
            open_block = it->second.first;
            file = std::make_unique<SafetensorsFile>(block_state_path(result.state_dir, open_block));
          }
          current = file->read("fused." + it->second.second);
          return &current;
        },
        HfExportOptions{}, {{kQuantConfigFile, meta.dump(1)}});
  }
  result.seconds = now_seconds() - t0;
  return result;
}

}  // namespace omniq
