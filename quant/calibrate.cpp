#include "quant/calibrate.h"

#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
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
#include "ops/elementwise.h"
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
#ifdef OMNIQ_HAS_CUDA
#include "runtime/cuda_backend.h"
#endif
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

// Runs `block` over every sample of x ([N, T, C]) in place: sample j's output is computed into a
// temporary, then copied over its input, so the stream needs no second [N, T, C] buffer. With
// `ref`, returns the mean over samples of MSE(out_j, ref_j) (one host read), else 0.
double run_block_in_place(const ModelConfig& cfg, const std::map<std::string, ag::Var>& params, Tensor& x,
                          BlockHooks* hooks, const Tensor* ref) {
  Tensor acc = ref ? Tensor::zeros({x.size(0)}, DType::f32, x.device()) : Tensor();
  for (int64_t j = 0; j < x.size(0); ++j) {
    ag::Tape t;
    Tensor xj = x.view_rows(j, 1);
    ag::Var y = decoder_block_forward(t, cfg, params, ag::constant(xj.alias()), hooks);
    if (ref) acc.view_rows(j, 1).copy_from(mse_loss_forward(y->value, ref->view_rows(j, 1)));
    xj.copy_from(y->value);
  }
  if (!ref) return 0;
  double s = 0;
  for (float v : acc.to_f32_vector()) s += v;
  return s / static_cast<double>(x.size(0));
}

// Waits for the device's queued work, so host timestamps bound the phases of a block.
void sync_device(Device dev) {
#ifdef OMNIQ_HAS_CUDA
  if (dev.is_cuda()) cuda_rt::synchronize(dev.index);
#else
  (void)dev;
#endif
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

// Weight-only OmniQuant/RTN without LET reads every Linear weight twice per training step (the
// fake-quant forward and backward). Hugging Face checkpoints are fp16, so the f32 copy holds
// fp16 values: keeping those weights in f16 halves the bytes read and changes no result (f16 -> f32
// is exact). `out` gets f16 Linear weights and aliases of the rest; false (and `out` unused) when
// any Linear weight is not exactly representable in f16.
static bool linear_weights_to_f16_if_exact(const ModelConfig& cfg, const BlockWeights& w32, BlockWeights& out) {
  out = BlockWeights{};
  out.what = w32.what;
  std::vector<std::string> sites = block_linear_sites(cfg);
  for (const auto& [key, t] : w32.tensors) {
    bool linear_weight = false;
    for (const std::string& s : sites) linear_weight = linear_weight || key == s + ".weight";
    if (!linear_weight || t.dtype() != DType::f32) {
      out.tensors[key] = t.alias();
      continue;
    }
    Tensor h = t.to(DType::f16);
    for (float d : col_absmax(sub(t, h.to(DType::f32))).to_f32_vector())  // once per block: [in] floats
      if (!(d == 0.0f)) return false;
    out.tensors[key] = std::move(h);
  }
  return true;
}

BlockReport calibrate_block(const ModelConfig& cfg, const QuantConfig& qc, const BlockWeights& w,
                            const BlockWeights& wq_f32, CalibStreams& streams, int64_t index,
                            const BlockCallbacks& cb) {
  Tensor& fp = streams.fp;
  Tensor& q = streams.q;
  OMNIQ_CHECK(fp.defined() && q.defined() && fp.ndim() == 3 && fp.shape() == q.shape() && fp.dtype() == q.dtype() &&
                  fp.device() == q.device() && fp.size(2) == cfg.hidden_size,
              "calibrate_block %lld: the streams must be two [N, T, %lld] tensors of one dtype and device, got %s and %s",
              static_cast<long long>(index), static_cast<long long>(cfg.hidden_size), fp.str().c_str(),
              q.str().c_str());
  const Device dev = fp.device();
  const DType compute = fp.dtype();
  double t = now_seconds();
  auto phase_end = [&](double& into) {  // time since the last phase boundary, device work included
    sync_device(dev);
    double n = now_seconds();
    into += n - t;
    t = n;
  };
  const double t0 = t;
  BlockReport rep;
  rep.block = index;
  auto fp_params = block_params(w);
  const bool then_gptq = qc.method == "omniquant" && qc.gptq;  // OmniQuant-then-GPTQ
  const bool uses_gptq = qc.method == "gptq" || then_gptq;
  BlockWeights w16;
  const bool store16 = compute != DType::f32 && (qc.method == "omniquant" || qc.method == "rtn") &&
                       (!qc.let || BlockQuantizer::fuses_all_let(cfg, qc)) &&
                       std::getenv("OMNIQ_NO_F16_WEIGHTS") == nullptr &&  // A/B switch for measurements
                       linear_weights_to_f16_if_exact(cfg, wq_f32, w16);
  const BlockWeights& wq = store16 ? w16 : wq_f32;

  // 1. fp targets, in place, and the per-channel input statistics LET / SmoothQuant / AWQ
  //    initialise from. AWQ's search compares against fp outputs of fp inputs, so it keeps a clone of
  //    the first windows it searches on (like the AWQ paper's 128 × 512 tokens, at most 32 windows,
  //    because the search runs 60 fused-block passes per pair grid).
  ActivationStatsRecorder stats;
  bool need_stats = qc.let || qc.method == "smoothquant" || qc.method == "awq";
  int64_t awq_n = std::min<int64_t>(fp.size(0), kAwqSearchSamples);
  Tensor awq_inps = qc.method == "awq" ? fp.view_rows(0, awq_n).clone() : Tensor();
  run_block_in_place(cfg, fp_params, fp, need_stats ? &stats : nullptr, nullptr);
  phase_end(rep.fp_seconds);

  // 2. The quantizer (knows each method's parameters) and its initialisation.
  BlockQuantizer bq(cfg, qc, wq, &stats.stats(), compute);
  if (qc.method == "smoothquant") init_smoothquant(bq, cfg, qc, wq, stats.stats());
  if (qc.method == "awq") {
    AwqReport ar = init_awq(bq, cfg, qc, wq, block_params(wq), awq_inps, fp.view_rows(0, awq_n), stats.stats());
    for (const auto& [pair, alpha] : ar.alpha) rep.search[pair + ".alpha"] = alpha;
    awq_inps = Tensor();
  }
  // GPTQ replaces the Linear weights: the block with f32 weights it works on (or restores into).
  BlockWeights gptq;
  if (qc.method == "gptq") gptq = bq.fused(wq, DType::f32);
  if (then_gptq) gptq = bq.fused_unquantized(wq);  // (re)computed after training
  if (cb.restore && cb.restore(bq, uses_gptq ? &gptq : nullptr, rep)) rep.resumed = true;
  phase_end(rep.init_seconds);

  // 3. Training (OmniQuant) or GPTQ, unless restored.
  if (!rep.resumed && qc.trains()) {
    std::unique_ptr<Tensor> aug;  // block_fp(q inputs): the third stream buffer, only while training
    if (qc.aug_loss) {
      aug = std::make_unique<Tensor>(run_block_over(cfg, fp_params, q, nullptr));
      phase_end(rep.fp_seconds);  // fp-block work, so train_seconds is the optimizer steps alone
    }
    BlockTrainingData data{&q, &fp, aug.get()};
    BlockTrainingResult tr = train_block(cfg, qc, block_params(wq), bq, data, index, [&](int e, double l) {
      if (cb.on_epoch) cb.on_epoch(e, l);
    });
    rep.epoch_loss = tr.epoch_loss;
    rep.nan_retries = tr.nan_retries;
    rep.graph_steps = tr.graph_steps;
    rep.train_steps = static_cast<int64_t>(tr.epoch_loss.size() + static_cast<size_t>(tr.nan_retries)) * q.size(0);
    phase_end(rep.train_seconds);
  }
  if (!rep.resumed && qc.method == "gptq") {
    // Sequentially per input group, on the quantized stream's inputs, from the untransformed weights.
    for (const std::string& site : block_linear_sites(cfg)) gptq.get(site + ".weight").copy_from(wq.get(site + ".weight"));
    gptq_quantize_block(cfg, gptq, q, WeightQuantSpec{qc.wbits, qc.group_size, qc.symmetric}, GptqOptions{});
    phase_end(rep.gptq_seconds);
  }
  if (!rep.resumed && then_gptq) {
    // The trained LET fused into the weights, then GPTQ on them with OmniQuant's quantizer (range not
    // forced to contain 0) and each group's range shrunk by the learned σ(γ), σ(β).
    gptq = bq.fused_unquantized(wq);
    GptqOptions o;
    o.range_contains_zero = false;
    for (const std::string& site : block_linear_sites(cfg)) {
      auto g = bq.learned().find(site + ".lwc_gamma");
      if (g != bq.learned().end())
        o.clip[site] = gptq_clip_from_lwc(g->second->value, bq.learned().at(site + ".lwc_beta")->value);
    }
    gptq_quantize_block(cfg, gptq, q, WeightQuantSpec{qc.wbits, qc.group_size, qc.symmetric}, o);
    phase_end(rep.gptq_seconds);
  }

  // 4. Fuse, check, and propagate the quantized stream through the final block, in place.
  {
    BlockWeights fused = bq.fused(wq, compute);
    if (uses_gptq)
      for (auto& [key, tensor] : fused.tensors) tensor.copy_from(gptq.get(key));
    OMNIQ_CHECK(all_finite(fused), "block %lld: the fused quantized weights contain NaN/Inf; nothing was written",
                static_cast<long long>(index));
    ActivationQuantHooks act(qc.abits);
    rep.final_loss = run_block_in_place(cfg, block_params(fused), q, qc.act_quant() ? &act : nullptr, &fp);
  }
  phase_end(rep.propagate_seconds);
  rep.seconds = now_seconds() - t0;
  rep.peak_bytes = memory_stats(dev).peak_bytes;
  if (cb.on_done) cb.on_done(bq, uses_gptq ? &gptq : nullptr, rep);
  return rep;
}

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

  // 1. Calibration windows and block-0 inputs (fp stream = quantized stream at the start).
  std::string calib_path = qc.calib_text.empty() ? dataset_path("wikitext2-valid") : qc.calib_text;
  Tokenizer tok = Tokenizer::from_model_dir(opt.model_dir);
  std::vector<int32_t> ids = tok.encode(read_text_file(calib_path), true);
  auto windows = sample_calibration_windows(ids, qc.nsamples, seqlen, qc.seed);
  result.calib_tokens = qc.nsamples * seqlen;
  if (!opt.windows_out.empty()) write_file_atomic(opt.windows_out, nlohmann::json(windows).dump());
  CalibStreams streams;
  streams.fp = Tensor::empty({qc.nsamples, seqlen, cfg.hidden_size}, compute, dev);
  {
    NamedWeights emb = ckpt.load_embeddings(compute, dev);
    for (int64_t j = 0; j < qc.nsamples; ++j) {
      Tensor x = embed_tokens(cfg, emb, Tensor::from_i32(windows[static_cast<size_t>(j)], {1, seqlen}), dev);
      streams.fp.view_rows(j, 1).copy_from(x);
    }
  }
  streams.q = streams.fp.clone();

  // 2. Blocks: load, calibrate (calibrate_block), write the block's state file, free.
  for (int64_t i = 0; i < ckpt.num_blocks(); ++i) {
    double tb = now_seconds();
    reset_peak_memory(dev);
    BlockWeights w = ckpt.load_block(i, compute, dev);
    BlockWeights w32 = compute == DType::f32 ? BlockWeights{} : ckpt.load_block(i, DType::f32, dev);
    const BlockWeights& wq = compute == DType::f32 ? w : w32;
    std::string state = block_state_path(result.state_dir, i);

    BlockCallbacks cb;
    cb.on_epoch = [&](int e, double l) {
      if (opt.on_epoch) opt.on_epoch(i, e, l);
    };
    cb.restore = [&](BlockQuantizer& bq, BlockWeights* gptq, BlockReport& rep) {
      if (!exists(state)) return false;
      SafetensorsFile f(state);
      for (auto& [name, var] : bq.learned()) {
        OMNIQ_CHECK(f.has("learned." + name), "%s lacks learned.%s: delete it to recalibrate block %lld",
                    state.c_str(), name.c_str(), static_cast<long long>(i));
        var->value.copy_from(f.read("learned." + name));
      }
      if (gptq)  // GPTQ has no learned parameters: the state holds its weights
        for (auto& [key, t] : gptq->tensors) t.copy_from(f.read("fused." + key));
      auto meta = f.metadata();
      if (meta.count("epoch_loss")) rep.epoch_loss = nlohmann::json::parse(meta.at("epoch_loss")).get<std::vector<double>>();
      return true;
    };
    cb.on_done = [&](BlockQuantizer& bq, const BlockWeights* gptq, BlockReport& rep) {
      rep.seconds = now_seconds() - tb;  // weight loading included
      if (rep.resumed) return;
      BlockWeights fused16 = gptq ? clone_as(*gptq, DType::f16) : bq.fused(wq, DType::f16);
      std::vector<std::pair<std::string, const Tensor*>> tensors;
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
    };
    BlockReport rep = calibrate_block(cfg, qc, w, wq, streams, i, cb);
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
