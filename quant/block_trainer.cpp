#include "quant/block_trainer.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "autograd/functions.h"
#include "ops/adamw.h"
#include "runtime/error.h"
#ifdef OMNIQ_HAS_CUDA
#include "runtime/cuda_backend.h"
#include "runtime/cuda_graph.h"
#endif

namespace omniq {

namespace {

struct OptimizedParam {
  ag::Var var;
  Tensor m, v;
  float lr;
};

struct Snapshot {
  std::vector<Tensor> values, m, v;
};

Snapshot take_snapshot(const std::vector<OptimizedParam>& ps) {
  Snapshot s;
  for (const OptimizedParam& p : ps) {
    s.values.push_back(p.var->value.clone());
    s.m.push_back(p.m.clone());
    s.v.push_back(p.v.clone());
  }
  return s;
}

void restore(std::vector<OptimizedParam>& ps, const Snapshot& s) {
  for (size_t i = 0; i < ps.size(); ++i) {
    ps[i].var->value.copy_from(s.values[i]);
    ps[i].m.copy_from(s.m[i]);
    ps[i].v.copy_from(s.v[i]);
  }
}

// OMNIQ_NO_FUSED_LWC=1 keeps the unfused LWC step on CUDA (fake-quant backward, AdamW, next forward as
// three kernels per weight): the A/B switch of the fused one (ops/fake_quant_lwc_update.h).
bool fused_lwc_disabled() {
  const char* e = std::getenv("OMNIQ_NO_FUSED_LWC");
  return e != nullptr && std::strcmp(e, "1") == 0;
}

// Per-channel weights (group = whole row) are fused too unless OMNIQ_FUSED_LWC_PER_CHANNEL=0 (A/B switch).
// History: session 6's first 7B W3 per-channel A/B measured the fused step slower (5.61 vs 5.36 ms),
// so it was opt-in; after the register kernel took rows <= 8192 it was 5.31 vs 5.36, and session 7
// measured 5.07 / 5.06 vs 5.17 / 5.13 ms (alternating 4-epoch runs, one H100): now the default.
bool fused_lwc_per_channel() {
  const char* e = std::getenv("OMNIQ_FUSED_LWC_PER_CHANNEL");
  return !(e != nullptr && std::strcmp(e, "0") == 0);
}

// OMNIQ_NO_FUSED_LOSS=1 keeps the composed loss on CUDA (the target rows copied into fixed buffers
// each step, mse_loss forward and backward as separate passes): the A/B switch of ag::mse_loss_rows.
bool fused_loss_disabled() {
  const char* e = std::getenv("OMNIQ_NO_FUSED_LOSS");
  return e != nullptr && std::strcmp(e, "1") == 0;
}

// Turns the quantizer's fused LWC mode off when training ends (also on an exception): its caches alias
// the optimizer state that dies with train_block.
struct FusedLwcGuard {
  BlockQuantizer& bq;
  ~FusedLwcGuard() { bq.disable_fused_lwc_update(); }
};

}  // namespace

BlockTrainingResult train_block(const ModelConfig& cfg, const QuantConfig& qc,
                                const std::map<std::string, ag::Var>& params, BlockQuantizer& bq,
                                const BlockTrainingData& data, int64_t block_index,
                                const std::function<void(int, double)>& on_epoch) {
  BlockTrainingResult result;
  std::vector<OptimizedParam> opt;
  const std::vector<ag::Var> lwc = bq.lwc_params();
  for (const ag::Var& p : lwc) opt.push_back({p, Tensor::zeros(p->value.shape(), DType::f32, p->value.device()),
                                                          Tensor::zeros(p->value.shape(), DType::f32, p->value.device()), qc.lwc_lr});
  for (const ag::Var& p : bq.let_params()) opt.push_back({p, Tensor::zeros(p->value.shape(), DType::f32, p->value.device()),
                                                          Tensor::zeros(p->value.shape(), DType::f32, p->value.device()), qc.let_lr});
  if (opt.empty() || qc.epochs == 0) return result;

  const Tensor& q_inps = *data.q_inps;
  int64_t n = q_inps.size(0);
  Device dev = q_inps.device();
  Tensor losses = Tensor::zeros({n}, DType::f32, dev);
  int64_t step = 0;

  // On CUDA every step reads its sample, targets and AdamW scalars from fixed buffers, so the
  // whole step (forward, backward, AdamW: ~60 kernels) can be captured once as a CUDA graph and
  // replayed with one launch (see the epoch loop); without graphs (OMNIQ_NO_CUDA_GRAPH=1) the
  // same code runs eagerly, with the same kernels and bits.
  //
  // The loss (fused_loss): ag::mse_loss_rows reads the targets straight from the tables on the device
  // at the row in row_buf (one 4-byte device copy per step instead of copying each 16 MB target row
  // into fp_buf/aug_buf) and computes y's gradient in the same pass; bitwise the composed mse_loss.
  // It needs the tables on the training device; otherwise (or with OMNIQ_NO_FUSED_LOSS=1) the rows
  // are copied into fp_buf/aug_buf as before.
  const bool on_cuda = dev.is_cuda();
  const bool fused_loss = on_cuda && !fused_loss_disabled() && data.fp_outs->device() == dev &&
                          (!data.aug_outs || data.aug_outs->device() == dev);
  std::vector<const Tensor*> loss_tables{data.fp_outs};
  if (data.aug_outs) loss_tables.push_back(data.aug_outs);
  Tensor x_buf, fp_buf, aug_buf, row_buf, row_table, loss_buf, scalars_buf, scalar_table;
  if (on_cuda) {
    x_buf = Tensor::empty(q_inps.view_rows(0, 1).shape(), q_inps.dtype(), dev);
    if (fused_loss) {
      std::vector<int32_t> rows(static_cast<size_t>(n));
      for (int64_t j = 0; j < n; ++j) rows[static_cast<size_t>(j)] = static_cast<int32_t>(j);
      row_table = Tensor::from_i32(rows, {n}, dev);
      row_buf = Tensor::zeros({1}, DType::i32, dev);
    } else {
      fp_buf = Tensor::empty(data.fp_outs->view_rows(0, 1).shape(), data.fp_outs->dtype(), dev);
      if (data.aug_outs) aug_buf = Tensor::empty(data.aug_outs->view_rows(0, 1).shape(), data.aug_outs->dtype(), dev);
    }
    loss_buf = Tensor::zeros({1}, DType::f32, dev);
    scalars_buf = Tensor::zeros({static_cast<int64_t>(opt.size()) * 7}, DType::f32, dev);
  }
  std::vector<AdamWConfig> configs(opt.size());
  auto refresh_configs = [&] {
    for (size_t i = 0; i < opt.size(); ++i) {
      configs[i] = AdamWConfig{};
      configs[i].lr = opt[i].lr;
      configs[i].weight_decay = qc.weight_decay;
    }
  };
  refresh_configs();

  // The fused LWC step on CUDA: for weight-only-quantized Linears without LET the fake-quant backward,
  // the AdamW update of γ, β and the next step's forward run as one kernel per weight in the backward
  // (BlockQuantizer::enable_fused_lwc_update); those γ, β then get no gradient and the AdamW launch
  // below skips them. Same bits as the unfused step. Set up here, before the first (eager) step, so the
  // ŵ caches are allocated outside any graph capture.
  FusedLwcGuard fused_guard{bq};
  const bool fused_lwc = on_cuda && !fused_lwc_disabled() && (qc.group_size > 0 || fused_lwc_per_channel());
  if (fused_lwc) {
    std::vector<LwcAdamWSlot> slots;
    for (size_t i = 0; i < lwc.size(); ++i)
      slots.push_back({opt[i].var, opt[i].m.alias(), opt[i].v.alias(), static_cast<int64_t>(i)});
    result.fused_lwc_weights = bq.enable_fused_lwc_update(slots, scalars_buf);
  }

  // One training step on sample j. On CUDA the sample is already in x_buf, its row index in row_buf
  // (or its targets in fp_buf/aug_buf) and the step's AdamW scalars in scalars_buf; the loss goes to
  // loss_buf. Everything it allocates is freed before it returns (a captured graph then owns no
  // memory between replays).
  auto step_body = [&](int64_t j) {
    ag::Tape t;
    ag::Var x = ag::constant(on_cuda ? x_buf.alias() : q_inps.view_rows(j, 1));
    ag::Var y = decoder_block_forward(t, cfg, params, x, &bq);
    ag::Var loss;
    if (fused_loss) {
      loss = ag::mse_loss_rows(t, y, loss_tables, row_buf, &loss_buf);  // the tape's root, as it requires
    } else {
      loss = ag::mse_loss(t, y, ag::constant(on_cuda ? fp_buf.alias() : data.fp_outs->view_rows(j, 1)));
      if (data.aug_outs) {
        ag::Var aug = ag::constant(on_cuda ? aug_buf.alias() : data.aug_outs->view_rows(j, 1));
        loss = ag::add(t, loss, ag::mse_loss(t, y, aug));
      }
    }
    t.backward(loss);
    if (!on_cuda) losses.view_rows(j, 1).copy_from(loss->value);
    else if (!fused_loss) loss_buf.copy_from(loss->value);  // (the fused loss was written into loss_buf)
    std::vector<AdamWParam> updates;
    for (size_t i = 0; i < opt.size(); ++i) {
      OptimizedParam& p = opt[i];
      const bool has = p.var->grad.defined();
      if (on_cuda) updates.push_back({&p.var->value, has ? &p.var->grad : nullptr, &p.m, &p.v, configs[i]});
      else if (has) updates.push_back({&p.var->value, &p.var->grad, &p.m, &p.v, configs[i]});
    }
    // One launch for all of them; on CUDA the scalars (indexed by position in opt) come from the
    // device buffer the loop below fills before each step.
    if (on_cuda) adamw_step_many_indirect(updates, scalars_buf);
    else adamw_step_many(updates, step);
    // Dropped rather than zeroed: the next step's first gradient is then moved in, not added to
    // zeros (a fill and an add kernel less per parameter per step; same values).
    for (OptimizedParam& p : opt) p.var->grad = Tensor();
  };

#ifdef OMNIQ_HAS_CUDA
  // The step as a CUDA graph: captured at the block's second step (the first runs eagerly, so
  // one-time work such as cuBLASLt heuristics, RoPE tables and lazily made weight copies is done
  // outside the graph), then replayed. A capture failure falls back to eager steps with a warning.
  bool use_graph = on_cuda && cuda_graphs_enabled();
  CudaGraph graph;
#endif
  for (int epoch = 0; epoch < qc.epochs; ++epoch) {
    Snapshot snap = take_snapshot(opt);
    int64_t step_at_start = step;
    for (int attempt = 0;; ++attempt) {
      refresh_configs();
      if (on_cuda) {
        // This epoch's AdamW scalars, row j for its step j: one upload per epoch, one device copy
        // per step (graph replays read them from scalars_buf).
        std::vector<float> table;
        for (int64_t j = 0; j < n; ++j) {
          std::vector<float> row = adamw_scalar_floats(configs, step_at_start + j + 1);
          table.insert(table.end(), row.begin(), row.end());
        }
        scalar_table = Tensor::from_f32(table, {n, static_cast<int64_t>(opt.size()) * 7}, DType::f32, dev);
      }
      for (int64_t j = 0; j < n; ++j) {
        ++step;
        if (!on_cuda) {
          step_body(j);
          continue;
        }
        x_buf.copy_from(q_inps.view_rows(j, 1));
        if (fused_loss) {
          row_buf.copy_from(row_table.view_rows(j, 1));
        } else {
          fp_buf.copy_from(data.fp_outs->view_rows(j, 1));
          if (data.aug_outs) aug_buf.copy_from(data.aug_outs->view_rows(j, 1));
        }
        scalars_buf.copy_from(scalar_table.view_rows(j, 1).reshape(scalars_buf.shape()));
#ifdef OMNIQ_HAS_CUDA
        if (use_graph && !graph.ready() && step > 1) {
          // Give the eager step's cached pool memory back first: the graph holds its own.
          cuda_rt::trim_pool(dev.index);
          std::string why;
          if (!graph.capture(dev.index, [&] { step_body(j); }, &why)) {
            use_graph = false;
            result.warnings.push_back("CUDA graph capture of the training step failed (" + why +
                                      "); running the steps eagerly");
            std::fprintf(stderr, "warning: %s\n", result.warnings.back().c_str());
          }
        }
        if (use_graph && graph.ready()) {
          graph.launch();
          ++result.graph_steps;
        }
        else step_body(j);
#else
        step_body(j);
#endif
        losses.view_rows(j, 1).copy_from(loss_buf);
      }
      // One host read per epoch.
      std::vector<float> l = losses.to_f32_vector();
      if (data.poison_loss && n > 0 && data.poison_loss(epoch, attempt)) l[0] = std::nanf("");
      int64_t bad = -1;
      double sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (!std::isfinite(l[static_cast<size_t>(j)])) {
          bad = j;
          break;
        }
        sum += l[static_cast<size_t>(j)];
      }
      if (bad < 0) {
        result.epoch_loss.push_back(sum / static_cast<double>(n));
        break;
      }
      std::string msg = strformat("block %lld epoch %d sample %lld: non-finite loss (%g)", static_cast<long long>(block_index),
                                  epoch, static_cast<long long>(bad), l[static_cast<size_t>(bad)]);
      restore(opt, snap);  // never keep parameters a non-finite step has touched
      if (bq.fused_lwc_enabled()) bq.refresh_fused_lwc_cache();  // the ŵ caches of the restored γ, β
      OMNIQ_CHECK(attempt < qc.max_nan_retries,
                  "%s after %d retries with halved learning rates: giving up. Check the input data, try lower "
                  "--lwc-lr/--let-lr, or --device cpu to rule out bf16 overflow",
                  msg.c_str(), attempt);
      step = step_at_start;
      for (OptimizedParam& p : opt) p.lr *= 0.5f;
      ++result.nan_retries;
      result.warnings.push_back(msg + ": restored the epoch's start, halved the learning rates, retrying");
      std::fprintf(stderr, "warning: %s\n", result.warnings.back().c_str());
    }
    if (on_epoch) on_epoch(epoch, result.epoch_loss.back());
  }
#ifdef OMNIQ_HAS_CUDA
  graph.reset();  // its memory goes back before the block's propagation
#endif
  return result;
}

}  // namespace omniq
