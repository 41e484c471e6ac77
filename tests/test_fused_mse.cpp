// The block trainer's fused loss (ops/loss.h mse_loss_rows_with_grad, ag::mse_loss_rows): the loss
// and y's gradient read the targets from the tables at a device-side row index, in one pass. It
// replaces  mse_loss(y, row copy) (+ add(·, mse_loss(y, aug row copy)))  and Tape::backward from 1,
// and must give the SAME BITS (the trainer's losses and the fixed perplexities depend on it):
// CPU and CUDA against that composition bitwise, CPU against a double formula and finite
// differences, CUDA against the CPU reference, the row read on the device inside a CUDA graph, the
// root check of the autograd function, and whole training runs fused vs OMNIQ_NO_FUSED_LOSS=1.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "autograd/functions.h"
#include "experiments/calib_bench.h"
#include "ops/loss.h"
#include "runtime/error.h"
#include "tests/block_trainer_test_util.h"
#include "tests/support/test_support.h"
#ifdef OMNIQ_HAS_CUDA
#include "runtime/cuda_graph.h"
#endif

using namespace omniq;
using omniq::test::all_close;
using omniq::test::check_gradient;

namespace {

struct LossAndGrad {
  Tensor loss, dy;
};

// Tables [N, T, C] of distinct random values, in dtype on dev.
std::vector<Tensor> make_tables(int ntables, int64_t N, int64_t T, int64_t C, DType dt, Device dev, uint64_t seed) {
  std::vector<Tensor> out;
  for (int i = 0; i < ntables; ++i) out.push_back(Tensor::uniform({N, T, C}, -2, 2, seed + 10 * i, dt, dev));
  return out;
}

std::vector<const Tensor*> ptrs(const std::vector<Tensor>& ts) {
  std::vector<const Tensor*> p;
  for (const Tensor& t : ts) p.push_back(&t);
  return p;
}

// The composition the trainer ran before: each target row copied into a fresh buffer (as fp_buf /
// aug_buf), mse_loss per table, the two losses added, Tape::backward from the seed 1.
LossAndGrad composed(const Tensor& y, const std::vector<Tensor>& tables, int64_t r) {
  ag::Tape t;
  ag::Var yv = ag::constant(y.alias());
  yv->requires_grad = true;  // an intermediate (not a parameter): its gradient keeps y's dtype
  std::vector<Tensor> rows;
  for (const Tensor& tb : tables) rows.push_back(tb.view_rows(r, 1).reshape(y.shape()).clone());
  ag::Var loss = ag::mse_loss(t, yv, ag::constant(rows[0].alias()));
  if (rows.size() == 2) loss = ag::add(t, loss, ag::mse_loss(t, yv, ag::constant(rows[1].alias())));
  t.backward(loss);
  return {loss->value.clone(), yv->grad.clone()};
}

// The fused autograd function with the row index in a device buffer.
LossAndGrad fused(const Tensor& y, const std::vector<Tensor>& tables, int64_t r) {
  Tensor row = Tensor::from_i32({static_cast<int32_t>(r)}, {1}, y.device());
  ag::Tape t;
  ag::Var yv = ag::constant(y.alias());
  yv->requires_grad = true;
  ag::Var loss = ag::mse_loss_rows(t, yv, ptrs(tables), row);
  t.backward(loss);
  return {loss->value.clone(), yv->grad.clone()};
}

// Bitwise equality of two tensors of one dtype (any device), reporting the first difference.
::testing::AssertionResult same_bits(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.numel() != b.numel())
    return ::testing::AssertionFailure() << a.str() << " vs " << b.str();
  const Tensor ha = a.to(Device::cpu()), hb = b.to(Device::cpu());
  const size_t es = dtype_size(a.dtype());
  const auto* pa = static_cast<const unsigned char*>(ha.data());
  const auto* pb = static_cast<const unsigned char*>(hb.data());
  if (std::memcmp(pa, pb, ha.nbytes()) == 0) return ::testing::AssertionSuccess();
  const std::vector<float> fa = ha.to_f32_vector(), fb = hb.to_f32_vector();
  int64_t diff = 0, first = -1;
  for (int64_t i = 0; i < a.numel(); ++i)
    if (std::memcmp(pa + i * es, pb + i * es, es) != 0) {
      ++diff;
      if (first < 0) first = i;
    }
  return ::testing::AssertionFailure() << diff << " of " << a.numel() << " elements differ; first at " << first
                                       << ": " << fa[first] << " vs " << fb[first];
}

// Σ_i mean((y − t_i)²) in double: the loss of row r.
double loss_double(const Tensor& y, const std::vector<Tensor>& tables, int64_t r) {
  const std::vector<float> yv = y.to_f32_vector();
  double total = 0;
  for (const Tensor& tb : tables) {
    const std::vector<float> tv = tb.view_rows(r, 1).to_f32_vector();
    double s = 0;
    for (size_t k = 0; k < yv.size(); ++k) {
      const double d = static_cast<double>(yv[k]) - tv[k];
      s += d * d;
    }
    total += s / static_cast<double>(yv.size());
  }
  return total;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CPU reference

TEST(FusedMseCpu, EqualsComposedLossAndGradientBitwise) {
  for (DType dt : {DType::f32, DType::bf16})
    for (int ntables : {1, 2}) {
      const int64_t N = 3, T = 5, C = 12;
      std::vector<Tensor> tables = make_tables(ntables, N, T, C, dt, Device::cpu(), 7);
      Tensor y = Tensor::uniform({1, T, C}, -2, 2, 3, dt);
      for (int64_t r = 0; r < N; ++r) {
        LossAndGrad a = composed(y, tables, r), b = fused(y, tables, r);
        EXPECT_TRUE(same_bits(a.loss, b.loss)) << dtype_name(dt) << " tables " << ntables << " row " << r;
        EXPECT_TRUE(same_bits(a.dy, b.dy)) << dtype_name(dt) << " tables " << ntables << " row " << r;
      }
    }
}

TEST(FusedMseCpu, LossMatchesDoubleFormula) {
  const int64_t N = 4, T = 6, C = 10;
  std::vector<Tensor> tables = make_tables(2, N, T, C, DType::f32, Device::cpu(), 21);
  Tensor y = Tensor::uniform({1, T, C}, -2, 2, 22);
  Tensor row = Tensor::from_i32({2}, {1});
  MseLossGrad g = mse_loss_rows_with_grad(y, ptrs(tables), row);
  EXPECT_EQ(g.loss.shape(), Shape({1}));
  EXPECT_EQ(g.dy.shape(), y.shape());
  EXPECT_NEAR(g.loss.item(), loss_double(y, tables, 2), 1e-6 * loss_double(y, tables, 2));
  // The other rows give other losses (the row index is honoured).
  EXPECT_NE(g.loss.item(), mse_loss_rows_with_grad(y, ptrs(tables), Tensor::from_i32({1}, {1})).loss.item());
  // loss_into: the loss is written there and returned as a view of it.
  Tensor buf = Tensor::zeros({1}, DType::f32);
  MseLossGrad h = mse_loss_rows_with_grad(y, ptrs(tables), row, &buf);
  EXPECT_TRUE(h.loss.shares_storage_with(buf));
  EXPECT_EQ(buf.item(), g.loss.item());
  Tensor bad = Tensor::zeros({2}, DType::f32);
  EXPECT_THROW(mse_loss_rows_with_grad(y, ptrs(tables), row, &bad), Error);
}

TEST(FusedMseCpu, GradientMatchesFiniteDifferences) {
  for (int ntables : {1, 2}) {
    const int64_t N = 3, T = 4, C = 6;
    std::vector<Tensor> tables = make_tables(ntables, N, T, C, DType::f32, Device::cpu(), 31);
    Tensor y = Tensor::uniform({1, T, C}, -2, 2, 32);
    MseLossGrad g = mse_loss_rows_with_grad(y, ptrs(tables), Tensor::from_i32({1}, {1}));
    EXPECT_TRUE(check_gradient(y, [&] { return loss_double(y, tables, 1); }, g.dy)) << "tables " << ntables;
  }
}

TEST(FusedMseCpu, RejectsBadArguments) {
  std::vector<Tensor> tables = make_tables(2, 3, 4, 8, DType::f32, Device::cpu(), 41);
  Tensor y = Tensor::uniform({1, 4, 8}, -1, 1, 42);
  auto call = [&](const Tensor& yy, const std::vector<const Tensor*>& tb, int32_t r) {
    return mse_loss_rows_with_grad(yy, tb, Tensor::from_i32({r}, {1}));
  };
  EXPECT_THROW(call(y, ptrs(tables), 3), Error);   // row past the table
  EXPECT_THROW(call(y, ptrs(tables), -1), Error);  // negative row
  EXPECT_THROW(call(Tensor::uniform({1, 4, 7}, -1, 1, 1), ptrs(tables), 0), Error);  // row length
  EXPECT_THROW(call(y.to(DType::bf16), ptrs(tables), 0), Error);                     // dtype
  EXPECT_THROW(call(y, {}, 0), Error);
  EXPECT_THROW(call(y, {&tables[0], &tables[1], &tables[0]}, 0), Error);
  EXPECT_THROW(mse_loss_rows_with_grad(y, ptrs(tables), Tensor::from_f32({0.0f}, {1})), Error);  // f32 row
}

// The backward hands over a gradient computed for d(loss) = 1: it must refuse a loss that is
// combined further on the tape, and a second backward.
TEST(FusedMseCpu, BackwardRequiresTheTapeRoot) {
  std::vector<Tensor> tables = make_tables(1, 2, 3, 4, DType::f32, Device::cpu(), 51);
  Tensor y = Tensor::uniform({1, 3, 4}, -1, 1, 52);
  Tensor row = Tensor::from_i32({0}, {1});
  {
    ag::Tape t;
    ag::Var yv = ag::constant(y.alias());
    yv->requires_grad = true;
    ag::Var loss = ag::scale(t, ag::mse_loss_rows(t, yv, ptrs(tables), row), 2.0f);
    EXPECT_THROW(t.backward(loss), Error);
  }
  {
    ag::Tape t;
    ag::Var yv = ag::constant(y.alias());
    yv->requires_grad = true;
    ag::Var loss = ag::mse_loss_rows(t, yv, ptrs(tables), row);
    t.backward(loss);
    EXPECT_TRUE(yv->grad.defined());
    EXPECT_THROW(t.backward(loss), Error);
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA

#ifdef OMNIQ_HAS_CUDA

namespace {

// Fused vs composed on the GPU for every row. `exact_loss`: the loss bits too (whenever the row
// length is a whole number of 16-byte vectors, see ops/loss.h); the gradient is always exact.
void expect_cuda_same_bits(DType dt, int ntables, int64_t N, int64_t T, int64_t C, bool exact_loss) {
  std::vector<Tensor> tables = make_tables(ntables, N, T, C, dt, Device::cuda(), 61);
  Tensor y = Tensor::uniform({1, T, C}, -2, 2, 62, dt, Device::cuda());
  for (int64_t r = 0; r < N; ++r) {
    LossAndGrad a = composed(y, tables, r), b = fused(y, tables, r);
    const std::string what = std::string(dtype_name(dt)) + " tables " + std::to_string(ntables) + " T " +
                             std::to_string(T) + " C " + std::to_string(C) + " row " + std::to_string(r);
    if (exact_loss) EXPECT_TRUE(same_bits(a.loss, b.loss)) << what;
    else EXPECT_NEAR(a.loss.item(), b.loss.item(), 1e-5 * std::fabs(a.loss.item())) << what;
    EXPECT_TRUE(same_bits(a.dy, b.dy)) << what;
  }
}

}  // namespace

TEST(FusedMseCuda, EqualsComposedLossAndGradientBitwise) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16})
    for (int ntables : {1, 2}) {
      expect_cuda_same_bits(dt, ntables, 3, 64, 512, true);  // 64 blocks, one pack per thread
      expect_cuda_same_bits(dt, ntables, 2, 33, 96, true);   // a partial last block
      expect_cuda_same_bits(dt, ntables, 3, 7, 37, false);   // odd rows: element-wise, with a tail
    }
}

// The LLaMA-7B step's shape: 1024 blocks, several grid-stride trips per thread.
TEST(FusedMseCuda, EqualsComposedAtLlama7bShape) {
  OMNIQ_REQUIRE_CUDA();
  for (int ntables : {1, 2}) expect_cuda_same_bits(DType::bf16, ntables, 2, 2048, 4096, true);
  expect_cuda_same_bits(DType::f32, 1, 2, 2048, 4096, true);
}

// CUDA against the CPU reference on the same inputs. The per-element gradient math is the same fp32
// operations and rounding on both sides, so dy agrees exactly (tolerance 0 + 1e-7 slack); the loss
// sums in another order (fp32 packs into double vs double): rtol 1e-5.
TEST(FusedMseCuda, MatchesCpuReference) {
  OMNIQ_REQUIRE_CUDA();
  for (DType dt : {DType::f32, DType::bf16})
    for (int ntables : {1, 2}) {
      const int64_t N = 4, T = 40, C = 72;
      std::vector<Tensor> tables = make_tables(ntables, N, T, C, dt, Device::cpu(), 71);
      std::vector<Tensor> dtables;
      for (const Tensor& t : tables) dtables.push_back(t.to(Device::cuda()));
      Tensor y = Tensor::uniform({1, T, C}, -2, 2, 72, dt);
      Tensor dy_dev = y.to(Device::cuda());
      MseLossGrad c = mse_loss_rows_with_grad(y, ptrs(tables), Tensor::from_i32({3}, {1}));
      MseLossGrad g =
          mse_loss_rows_with_grad(dy_dev, ptrs(dtables), Tensor::from_i32({3}, {1}, Device::cuda()));
      EXPECT_TRUE(all_close(g.loss, c.loss, 0.0f, 1e-5f)) << dtype_name(dt) << " tables " << ntables;
      EXPECT_TRUE(all_close(g.dy, c.dy, 1e-7f, 1e-6f)) << dtype_name(dt) << " tables " << ntables;
    }
}

// The row index is read on the device: a captured graph replayed after the row buffer changed
// (as the trainer does between steps) computes the new row.
TEST(FusedMseCuda, GraphReplayReadsTheRowOnTheDevice) {
  OMNIQ_REQUIRE_CUDA();
  const int64_t N = 3, T = 16, C = 256;
  std::vector<Tensor> tables = make_tables(2, N, T, C, DType::bf16, Device::cuda(), 81);
  Tensor y = Tensor::uniform({1, T, C}, -2, 2, 82, DType::bf16, Device::cuda());
  Tensor row_table = Tensor::from_i32({0, 1, 2}, {N}, Device::cuda());
  Tensor row = Tensor::zeros({1}, DType::i32, Device::cuda());
  Tensor loss_out = Tensor::zeros({1}, DType::f32, Device::cuda());
  Tensor dy_out = Tensor::zeros(y.shape(), DType::bf16, Device::cuda());
  CudaGraph graph;
  std::string why;
  ASSERT_TRUE(graph.capture(
      Device::cuda().index,
      [&] {
        MseLossGrad g = mse_loss_rows_with_grad(y, ptrs(tables), row, &loss_out);  // written in place
        dy_out.copy_from(g.dy);
      },
      &why))
      << why;
  for (int64_t r : {2, 0, 1, 2}) {
    row.copy_from(row_table.view_rows(r, 1));
    graph.launch();
    LossAndGrad want = composed(y, tables, r);
    EXPECT_TRUE(same_bits(loss_out, want.loss)) << "row " << r;
    EXPECT_TRUE(same_bits(dy_out, want.dy)) << "row " << r;
  }
  graph.reset();
}

// A row outside the table cannot be reported without a host sync: NaN loss and gradient instead.
TEST(FusedMseCuda, RowOutsideTheTableGivesNan) {
  OMNIQ_REQUIRE_CUDA();
  std::vector<Tensor> tables = make_tables(2, 3, 8, 64, DType::bf16, Device::cuda(), 91);
  Tensor y = Tensor::uniform({1, 8, 64}, -1, 1, 92, DType::bf16, Device::cuda());
  for (int32_t r : {3, -1}) {
    MseLossGrad g = mse_loss_rows_with_grad(y, ptrs(tables), Tensor::from_i32({r}, {1}, Device::cuda()));
    EXPECT_TRUE(std::isnan(g.loss.item())) << r;
    for (float v : g.dy.to_f32_vector()) ASSERT_TRUE(std::isnan(v)) << r;
  }
}

namespace {

// Every epoch loss and the final loss of two blocks of calibration, with the fused loss or without.
std::vector<double> train_losses(const QuantConfig& qc, bool fused_loss) {
  if (fused_loss) unsetenv("OMNIQ_NO_FUSED_LOSS");
  else setenv("OMNIQ_NO_FUSED_LOSS", "1", 1);
  CalibBenchOptions o;
  o.shape = "tiny";
  o.blocks = 2;
  o.qc = qc;
  o.device = Device::cuda();
  o.compute = DType::bf16;
  CalibBenchResult r = run_calib_bench(o);
  unsetenv("OMNIQ_NO_FUSED_LOSS");
  std::vector<double> l;
  for (const CalibBenchBlock& b : r.blocks) {
    l.insert(l.end(), b.report.epoch_loss.begin(), b.report.epoch_loss.end());
    l.push_back(b.report.final_loss);
  }
  return l;
}

void expect_training_same_bits(const QuantConfig& qc) {
  const std::vector<double> old_loss = train_losses(qc, false), new_loss = train_losses(qc, true);
  ASSERT_EQ(old_loss.size(), new_loss.size());
  for (size_t i = 0; i < old_loss.size(); ++i) {
    EXPECT_TRUE(std::isfinite(new_loss[i])) << i;
    EXPECT_EQ(old_loss[i], new_loss[i]) << "loss " << i;
  }
  EXPECT_NE(new_loss[0], new_loss[1]);  // training did move the parameters
}

}  // namespace

TEST(FusedMseTrainerCuda, WeightOnlyTrainingEqualsComposedLoss) {
  OMNIQ_REQUIRE_CUDA();
  expect_training_same_bits(bt_test::omniquant(3, 16, 32, false));
}

TEST(FusedMseTrainerCuda, W4A4LetAugTrainingEqualsComposedLoss) {
  OMNIQ_REQUIRE_CUDA();
  expect_training_same_bits(bt_test::omniquant(4, 4, 0, true));
}

#endif  // OMNIQ_HAS_CUDA
