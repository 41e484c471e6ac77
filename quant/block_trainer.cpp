#include "quant/block_trainer.h"

#include <cmath>

#include "autograd/functions.h"
#include "ops/adamw.h"
#include "runtime/error.h"

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

}  // namespace

BlockTrainingResult train_block(const ModelConfig& cfg, const QuantConfig& qc,
                                const std::map<std::string, ag::Var>& params, BlockQuantizer& bq,
                                const BlockTrainingData& data, int64_t block_index,
                                const std::function<void(int, double)>& on_epoch) {
  BlockTrainingResult result;
  std::vector<OptimizedParam> opt;
  for (const ag::Var& p : bq.lwc_params()) opt.push_back({p, Tensor::zeros(p->value.shape(), DType::f32, p->value.device()),
                                                          Tensor::zeros(p->value.shape(), DType::f32, p->value.device()), qc.lwc_lr});
  for (const ag::Var& p : bq.let_params()) opt.push_back({p, Tensor::zeros(p->value.shape(), DType::f32, p->value.device()),
                                                          Tensor::zeros(p->value.shape(), DType::f32, p->value.device()), qc.let_lr});
  if (opt.empty() || qc.epochs == 0) return result;

  const Tensor& q_inps = *data.q_inps;
  int64_t n = q_inps.size(0);
  Device dev = q_inps.device();
  Tensor losses = Tensor::zeros({n}, DType::f32, dev);
  int64_t step = 0;

  for (int epoch = 0; epoch < qc.epochs; ++epoch) {
    Snapshot snap = take_snapshot(opt);
    int64_t step_at_start = step;
    for (int attempt = 0;; ++attempt) {
      for (int64_t j = 0; j < n; ++j) {
        ag::Tape t;
        ag::Var x = ag::constant(q_inps.view_rows(j, 1));
        ag::Var y = decoder_block_forward(t, cfg, params, x, &bq);
        ag::Var loss = ag::mse_loss(t, y, ag::constant(data.fp_outs->view_rows(j, 1)));
        if (data.aug_outs) loss = ag::add(t, loss, ag::mse_loss(t, y, ag::constant(data.aug_outs->view_rows(j, 1))));
        t.backward(loss);
        losses.view_rows(j, 1).copy_from(loss->value);
        ++step;
        std::vector<AdamWParam> updates;
        for (OptimizedParam& p : opt) {
          if (!p.var->grad.defined()) continue;
          AdamWConfig ac;
          ac.lr = p.lr;
          ac.weight_decay = qc.weight_decay;
          updates.push_back({&p.var->value, &p.var->grad, &p.m, &p.v, ac});
        }
        adamw_step_many(updates, step);  // one launch for all of them
        // Dropped rather than zeroed: the next step's first gradient is then moved in, not added to
        // zeros (a fill and an add kernel less per parameter per step; same values).
        for (OptimizedParam& p : opt) p.var->grad = Tensor();
      }
      // One host read per epoch.
      std::vector<float> l = losses.to_f32_vector();
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
  return result;
}

}  // namespace omniq
