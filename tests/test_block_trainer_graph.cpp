// The OmniQuant training step as a CUDA graph (quant/block_trainer.cpp): replaying the captured
// step must give the same bits as launching its kernels one by one (OMNIQ_NO_CUDA_GRAPH=1): every
// epoch loss and the final loss of two consecutive blocks, weight-only and W4A4 with LET and the aug
// loss, LLaMA and OPT. The step reads its sample, targets and AdamW scalars from fixed buffers, so
// a replay that used stale inputs or frozen bias corrections would show here.
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "experiments/calib_bench.h"
#include "models/model_shapes.h"
#include "quant/block_quantizer.h"
#include "quant/block_trainer.h"
#include "runtime/error.h"
#include "tests/block_trainer_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;

namespace {

struct Losses {
  std::vector<double> all;  // per block: every epoch loss, then the final loss
};

Losses run(const std::string& shape, const QuantConfig& qc, bool graphs) {
  if (graphs) unsetenv("OMNIQ_NO_CUDA_GRAPH");
  else setenv("OMNIQ_NO_CUDA_GRAPH", "1", 1);
  CalibBenchOptions o;
  o.shape = shape;
  o.blocks = 2;
  o.qc = qc;
  o.device = Device::cuda();
  o.compute = DType::bf16;
  CalibBenchResult r = run_calib_bench(o);
  unsetenv("OMNIQ_NO_CUDA_GRAPH");
  Losses l;
  for (const CalibBenchBlock& b : r.blocks) {
    EXPECT_TRUE(b.report.epoch_loss.size() == static_cast<size_t>(qc.epochs));
    l.all.insert(l.all.end(), b.report.epoch_loss.begin(), b.report.epoch_loss.end());
    l.all.push_back(b.report.final_loss);
    // All but the block's first (eager) step are replays, or none without graphs.
    EXPECT_EQ(b.report.graph_steps, graphs ? b.report.train_steps - 1 : 0) << shape;
  }
  return l;
}

void expect_same_bits(const std::string& shape, const QuantConfig& qc) {
  Losses eager = run(shape, qc, false), graph = run(shape, qc, true);
  ASSERT_EQ(eager.all.size(), graph.all.size());
  for (size_t i = 0; i < eager.all.size(); ++i) {
    EXPECT_TRUE(std::isfinite(eager.all[i])) << shape << " " << i;
    EXPECT_EQ(eager.all[i], graph.all[i]) << shape << " loss " << i;
  }
  // The losses move between epochs (the parameters do get updated by the replays).
  EXPECT_NE(graph.all[0], graph.all[1]) << shape;
}

}  // namespace

TEST(BlockTrainerGraphCuda, LlamaWeightOnlyReplayEqualsEager) {
  OMNIQ_REQUIRE_CUDA();
  expect_same_bits("tiny", bt_test::omniquant(3, 16, 32, false));
}

TEST(BlockTrainerGraphCuda, LlamaW4A4LetAugReplayEqualsEager) {
  OMNIQ_REQUIRE_CUDA();
  expect_same_bits("tiny", bt_test::omniquant(4, 4, 0, true));
}

TEST(BlockTrainerGraphCuda, OptW4A4LetReplayEqualsEager) {
  OMNIQ_REQUIRE_CUDA();
  expect_same_bits("tiny-opt", bt_test::omniquant(4, 4, 0, true));
}

// A non-finite loss under graph replay: found at the end of the epoch, the epoch restored and
// retried with halved learning rates (the parameters are restored in place, so the captured graph
// stays valid), then reported with block, epoch and sample; no non-finite parameter is kept.
TEST(BlockTrainerGraphCuda, PersistentNanLossIsReportedAndParametersStayFinite) {
  OMNIQ_REQUIRE_CUDA();
  unsetenv("OMNIQ_NO_CUDA_GRAPH");
  const ModelConfig cfg = model_shape("tiny");
  BlockWeights w32, wc;
  random_block_weights(cfg, 0, 1, Device::cuda(), DType::bf16, w32, wc);
  const int64_t N = 4, T = 32;
  Tensor q_inps = Tensor::uniform({N, T, cfg.hidden_size}, -1, 1, 3, DType::f32);
  q_inps.data_as<float>()[2 * T * cfg.hidden_size + 5] = NAN;  // sample 2 is poisoned
  q_inps = q_inps.to(DType::bf16).to(Device::cuda());
  Tensor fp_outs = Tensor::uniform({N, T, cfg.hidden_size}, -1, 1, 4, DType::bf16, Device::cuda());
  QuantConfig qc;
  qc.wbits = 3;
  qc.group_size = 32;
  qc.epochs = 2;
  qc.max_nan_retries = 2;
  BlockQuantizer bq(cfg, qc, wc, nullptr, DType::bf16);
  ASSERT_NO_FATAL_FAILURE(
      bt_test::expect_nan_loss_reported(cfg, qc, wc, bq, q_inps, fp_outs, /*expect_retries=*/true));
  bt_test::assert_lwc_params_finite(bq);
}
