// CUDA GEMM ops on cuBLASLt: Linear forward/backward, batched matmul, and the cached strided-batched
// GEMM (cuda::gemm) other CUDA ops build on. All work goes on the device context's stream.
//
// Row-major -> column-major mapping (cuBLASLt is column-major):
//   A row-major R x C matrix with leading dim ld is, byte for byte, the column-major C x R matrix
//   (its transpose) with the same ld. So our row-major product  C[M,N] = op(A)[M,K] · op(B)[K,N]
//   is computed as the column-major product  Cᵀ[N,M] = op(B)ᵀ[N,K] · op(A)ᵀ[K,M]:
//     cuBLASLt "A" := our B, transa := trans_b, layout (trans_b ? K x N : N x K), ld = ldb
//     cuBLASLt "B" := our A, transb := trans_a, layout (trans_a ? M x K : K x M), ld = lda
//     cuBLASLt "C"/"D" := our C/D, layout N x M, ld = ldc; m = N, n = M, k = K.
//   cuBLASLt takes C (read, scaled by beta) and D (written) separately; with GemmArgs::D set they
//   are different buffers of one layout: that is how a residual add is folded into a Linear
//   (C = residual, beta = 1, D = the fresh output) without an extra elementwise pass.
//   The BIAS epilogue adds a vector of length "rows of D" = N broadcast over the M columns, which is
//   exactly our per-output-feature bias broadcast over rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>

#include "ops/matmul.h"
#include "ops/cuda/elementwise_util.cuh"
#include "runtime/cuda_context.h"

namespace omniq::cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// CUDA kernels

// fp32 load/store of f32, bf16 and f16 elements (round to nearest even): ops/cuda/elementwise_util.cuh.
using ew::from_f32;
using ew::to_f32;

// y[r, n] += bias[n], used only when cuBLASLt offers no BIAS-epilogue algorithm for a shape.
template <typename T>
__global__ void add_bias_kernel(T* __restrict__ y, const T* __restrict__ bias, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = from_f32<T>(to_f32(y[i]) + to_f32(bias[i % cols]));
}

// out[c] = Σ_r x[r, c] in fp32. A block owns 32 adjacent columns (coalesced 32-wide row reads);
// its kSumRows thread rows stride over the rows, then a shared-memory pass folds them. Deterministic.
constexpr int kSumRows = 32;
template <typename T>
__global__ void column_sum_kernel(const T* __restrict__ x, float* __restrict__ out, int64_t rows, int64_t cols) {
  __shared__ float part[kSumRows][33];  // +1 column: no bank conflicts on the transposed read
  const int64_t col = blockIdx.x * 32 + threadIdx.x;
  float acc = 0.f;
  if (col < cols)
    for (int64_t r = threadIdx.y; r < rows; r += kSumRows) acc += to_f32(x[r * cols + col]);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float s = 0.f;
    for (int i = 0; i < kSumRows; ++i) s += part[i][threadIdx.x];
    out[col] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// helpers

cudaDataType_t cuda_type(DType dt) {
  switch (dt) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    default: OMNIQ_FAIL("cuBLASLt GEMM: unsupported dtype %s", dtype_name(dt));
  }
}

// Calls f(T*) with a null pointer of the device type of dt (a type tag for the templated launches).
template <typename F>
void with_float_type(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: f(static_cast<float*>(nullptr)); break;
    case DType::bf16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case DType::f16: f(static_cast<__half*>(nullptr)); break;
    default: OMNIQ_FAIL("CUDA matmul: unsupported dtype %s", dtype_name(dt));
  }
}

bool supported_types(DType ab, DType c) {
  if (ab == DType::f32) return c == DType::f32;
  if (ab == DType::bf16) return c == DType::bf16 || c == DType::f32;
  if (ab == DType::f16) return c == DType::f16 || c == DType::f32;
  return false;
}

// Largest power of two (<= 256) dividing the address: cuBLASLt assumes 256-byte aligned operands
// unless told otherwise, and views (view_rows, attention head offsets) can be much less aligned.
uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a == 0) return 256;
  const uintptr_t low = a & (~a + 1);
  return static_cast<uint32_t>(low > 256 ? 256 : low);
}

// One cached GEMM configuration: descriptors plus the algorithm the heuristic picked for them.
struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t lay_a = nullptr, lay_b = nullptr, lay_c = nullptr;  // cuBLASLt's A, B, C (= D's layout)
  cublasLtMatmulAlgo_t algo{};
  bool bias_epilogue = false;  // false with a bias: add it with add_bias_kernel after the GEMM

  GemmPlan() = default;
  GemmPlan(const GemmPlan&) = delete;
  GemmPlan& operator=(const GemmPlan&) = delete;
  ~GemmPlan() {  // host-side objects only; errors here are not actionable
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (lay_a) cublasLtMatrixLayoutDestroy(lay_a);
    if (lay_b) cublasLtMatrixLayoutDestroy(lay_b);
    if (lay_c) cublasLtMatrixLayoutDestroy(lay_c);
  }
};

using PlanKey = std::array<int64_t, 21>;

// The buffer the GEMM writes: D when given, else C (in place).
void* out_ptr(const GemmArgs& g) { return g.D ? g.D : g.C; }
// The C operand handed to cuBLASLt: C when it is read (beta != 0), else the output itself, so the
// pointer whose alignment the plan was built for is the one passed (and a null C never is).
const void* c_operand(const GemmArgs& g) { return g.beta != 0.f ? g.C : out_ptr(g); }

PlanKey make_key(const GemmArgs& g) {
  return {g.trans_a, g.trans_b, g.M, g.N, g.K, g.lda, g.ldb, g.ldc, g.stride_a, g.stride_b, g.stride_c, g.batch,
          static_cast<int64_t>(g.ab_type), static_cast<int64_t>(g.c_type), g.beta != 0.f, g.bias != nullptr,
          alignment_of(g.A), alignment_of(g.B), alignment_of(c_operand(g)), g.bias ? alignment_of(g.bias) : 0,
          alignment_of(out_ptr(g))};
}

// Plans per device. The mutex also covers the launch, because the bias pointer is an attribute of
// the (shared) descriptor and is set just before cublasLtMatmul.
struct PlanCache {
  std::mutex mu;
  std::map<PlanKey, std::unique_ptr<GemmPlan>> plans;
};
constexpr int kMaxDevices = 16;
constexpr size_t kMaxPlans = 4096;  // distinct shapes in a run are few; this only bounds a pathological caller
PlanCache g_cache[kMaxDevices];

void set_layout_batch(cublasLtMatrixLayout_t lay, int64_t batch, int64_t stride) {
  if (batch <= 1) return;
  const int32_t count = static_cast<int32_t>(batch);
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(lay, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(lay, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                sizeof(stride)));
}

// OMNIQ_GEMM_PLAN_LOG=1 (read once): one stderr line per new plan with the shape, beta, whether C
// and D differ, the alignments and the algorithm the heuristic picked (config id, tile, stages,
// split-K, reduction scheme, swizzle, cluster shape, waves). For comparing plans across A/B runs
// (e.g. a residual GEMM with beta = 1 against the plain one) next to an ncu profile.
bool plan_log_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("OMNIQ_GEMM_PLAN_LOG");
    return e != nullptr && e[0] != '\0' && !(e[0] == '0' && e[1] == '\0');
  }();
  return on;
}

uint32_t algo_attr(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  uint32_t v = 0;  // every attribute read here is 32-bit; unknown ones leave 0
  size_t written = 0;
  if (cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof(v), &written) != CUBLAS_STATUS_SUCCESS) return 0;
  return v;
}

void log_plan(const GemmArgs& g, const GemmPlan& p, const cublasLtMatmulHeuristicResult_t& r) {
  if (!plan_log_enabled()) return;
  std::fprintf(stderr,
               "[omniq gemm plan] M=%lld N=%lld K=%lld batch=%lld ta=%d tb=%d %s->%s beta=%g C%sD bias=%s "
               "align A/B/C/D=%u/%u/%u/%u | algo id=%u tile=%u stages=%u splitk=%u red=%u swizzle=%u "
               "custom=%u cluster=%u waves=%.2f ws=%zu\n",
               (long long)g.M, (long long)g.N, (long long)g.K, (long long)g.batch, g.trans_a, g.trans_b,
               dtype_name(g.ab_type), dtype_name(g.c_type), g.beta, g.D && g.D != g.C ? "!=" : "==",
               g.bias ? (p.bias_epilogue ? "epilogue" : "kernel") : "none", alignment_of(g.A), alignment_of(g.B),
               alignment_of(c_operand(g)), alignment_of(out_ptr(g)), algo_attr(p.algo, CUBLASLT_ALGO_CONFIG_ID),
               algo_attr(p.algo, CUBLASLT_ALGO_CONFIG_TILE_ID), algo_attr(p.algo, CUBLASLT_ALGO_CONFIG_STAGES_ID),
               algo_attr(p.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
               algo_attr(p.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
               algo_attr(p.algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING), algo_attr(p.algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION),
               algo_attr(p.algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID), r.wavesCount, r.workspaceSize);
}

// Builds descriptors and asks the heuristic for one algorithm. Returns null when the heuristic has
// none for this configuration (the caller then retries without the bias epilogue or fails).
std::unique_ptr<GemmPlan> build_plan(const GemmArgs& g, bool bias_epilogue, const CudaContext& ctx) {
  auto p = std::make_unique<GemmPlan>();
  p->bias_epilogue = bias_epilogue;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));  // no TF32, fp32 scale
  const cublasOperation_t op_a = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt A is our B
  const cublasOperation_t op_b = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt B is our A
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  if (bias_epilogue) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    // The heuristic reads the pointer's alignment (the cache key holds it too).
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  }
  const cudaDataType_t ab = cuda_type(g.ab_type), c = cuda_type(g.c_type);
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->lay_a, ab, g.trans_b ? g.K : g.N, g.trans_b ? g.N : g.K, g.ldb));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->lay_b, ab, g.trans_a ? g.M : g.K, g.trans_a ? g.K : g.M, g.lda));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->lay_c, c, g.N, g.M, g.ldc));
  set_layout_batch(p->lay_a, g.batch, g.stride_b);
  set_layout_batch(p->lay_b, g.batch, g.stride_a);
  set_layout_batch(p->lay_c, g.batch, g.stride_c);

  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  // Destroy the preference on every exit path (CUBLAS_CHECK throws).
  std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, cublasStatus_t (*)(cublasLtMatmulPreference_t)>
      pref_guard(pref, cublasLtMatmulPreferenceDestroy);
  const uint64_t ws = ctx.workspace_bytes;
  const uint32_t al_a = alignment_of(g.B), al_b = alignment_of(g.A), al_c = alignment_of(c_operand(g)),
                 al_d = alignment_of(out_ptr(g));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, sizeof(al_d)));

  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(ctx.lt, p->desc, p->lay_a, p->lay_b, p->lay_c, p->lay_c,
                                                           pref, 1, &result, &returned);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || (st == CUBLAS_STATUS_SUCCESS && returned == 0)) return nullptr;
  CUBLAS_CHECK(st);
  CUBLAS_CHECK(result.state);
  p->algo = result.algo;
  log_plan(g, *p, result);
  return p;
}

void check_gemm_args(const GemmArgs& g) {
  OMNIQ_CHECK(supported_types(g.ab_type, g.c_type),
              "cuda::gemm: unsupported dtypes A/B %s with C %s (allowed: f32->f32, bf16->bf16|f32, f16->f16|f32)",
              dtype_name(g.ab_type), dtype_name(g.c_type));
  OMNIQ_CHECK(g.M >= 0 && g.N >= 0 && g.K > 0 && g.batch >= 0,
              "cuda::gemm: bad sizes M=%lld N=%lld K=%lld batch=%lld (K must be positive)", (long long)g.M,
              (long long)g.N, (long long)g.K, (long long)g.batch);
  OMNIQ_CHECK(g.lda >= (g.trans_a ? g.M : g.K) && g.ldb >= (g.trans_b ? g.K : g.N) && g.ldc >= g.N,
              "cuda::gemm: leading dims too small: lda=%lld ldb=%lld ldc=%lld for M=%lld N=%lld K=%lld trans_a=%d "
              "trans_b=%d",
              (long long)g.lda, (long long)g.ldb, (long long)g.ldc, (long long)g.M, (long long)g.N, (long long)g.K,
              g.trans_a, g.trans_b);
  OMNIQ_CHECK(g.batch <= 2147483647, "cuda::gemm: batch %lld exceeds cuBLASLt's int32 batch count",
              (long long)g.batch);
  OMNIQ_CHECK(g.bias == nullptr || g.batch == 1, "cuda::gemm: a bias needs batch == 1 (got %lld)",
              (long long)g.batch);
  OMNIQ_CHECK(g.device >= 0 && g.device < kMaxDevices, "cuda::gemm: device %d out of range", g.device);
  OMNIQ_CHECK(out_ptr(g) != nullptr, "cuda::gemm: no output buffer (C and D are both null)");
  OMNIQ_CHECK(g.beta == 0.f || g.C != nullptr, "cuda::gemm: beta = %g needs a C operand", g.beta);
}

Shape with_last_dim(const Shape& s, int64_t n) {
  Shape out = s;
  out.dims[out.ndim - 1] = n;
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers and ops

void gemm(const GemmArgs& g) {
  check_gemm_args(g);
  if (g.M == 0 || g.N == 0 || g.batch == 0) return;
  CudaContext& ctx = cuda_context(g.device);
  PlanCache& cache = g_cache[g.device];
  bool bias_by_kernel = false;
  {
    std::lock_guard<std::mutex> lock(cache.mu);
    const PlanKey key = make_key(g);
    auto it = cache.plans.find(key);
    if (it == cache.plans.end()) {
      std::unique_ptr<GemmPlan> plan = build_plan(g, g.bias != nullptr, ctx);
      if (!plan && g.bias) plan = build_plan(g, false, ctx);  // no epilogue algorithm: bias kernel instead
      OMNIQ_CHECK(plan != nullptr,
                  "cuBLASLt has no algorithm for GEMM M=%lld N=%lld K=%lld (lda=%lld ldb=%lld ldc=%lld, batch=%lld, "
                  "trans_a=%d trans_b=%d, %s -> %s)",
                  (long long)g.M, (long long)g.N, (long long)g.K, (long long)g.lda, (long long)g.ldb,
                  (long long)g.ldc, (long long)g.batch, g.trans_a, g.trans_b, dtype_name(g.ab_type),
                  dtype_name(g.c_type));
      if (cache.plans.size() >= kMaxPlans) cache.plans.clear();
      it = cache.plans.emplace(key, std::move(plan)).first;
    }
    GemmPlan& p = *it->second;
    if (p.bias_epilogue)
      CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
    bias_by_kernel = g.bias != nullptr && !p.bias_epilogue;
    // Swapped operands: see the mapping at the top of this file. C and D share one layout.
    CUBLAS_CHECK(cublasLtMatmul(ctx.lt, p.desc, &g.alpha, g.B, p.lay_a, g.A, p.lay_b, &g.beta, c_operand(g), p.lay_c,
                                out_ptr(g), p.lay_c, &p.algo, ctx.workspace, ctx.workspace_bytes, ctx.stream));
  }
  if (bias_by_kernel) {
    OMNIQ_CHECK(g.ldc == g.N, "cuda::gemm: bias fallback needs a packed C (ldc %lld != N %lld)", (long long)g.ldc,
                (long long)g.N);
    with_float_type(g.c_type, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      add_bias_kernel<T><<<grid_for(g.M * g.N, 256), 256, 0, ctx.stream>>>(
          static_cast<T*>(out_ptr(g)), static_cast<const T*>(g.bias), g.M, g.N);
      CUDA_CHECK_LAUNCH();
    });
  }
}

Tensor linear_forward(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* residual) {
  const int64_t R = x.rows(), K = x.cols(), N = w.size(0);
  Tensor y = Tensor::empty(with_last_dim(x.shape(), N), x.dtype(), x.device());
  GemmArgs g;
  g.device = x.device().index;
  g.trans_b = true;  // Y[R, N] = X[R, K] · W[N, K]ᵀ
  g.M = R, g.N = N, g.K = K;
  g.ab_type = g.c_type = x.dtype();
  g.A = x.data(), g.lda = K;
  g.B = w.data(), g.ldb = K;
  g.C = y.data(), g.ldc = N;
  if (residual) {
    // Y = X·Wᵀ (+ b) + 1·R in the epilogue: C = residual (only read), D = y. Napkin math for
    // T = 2048, C = 4096 bf16: the separate add read 2 × 16 MB and wrote 16 MB (~15 µs on an H100);
    // here the GEMM reads R once while it writes Y anyway. Measured (ncu, H100, 7B step): the
    // beta = 1 GEMMs take 3-5.5 µs longer than beta = 0 (same algorithm: the heuristic does not see
    // beta), the add kernels they replace took ~16 µs each.
    g.C = residual->data();  // const data: cuBLASLt only reads C when D is given
    g.D = y.data();
    g.beta = 1.f;
  }
  g.bias = bias ? bias->data() : nullptr;
  if (R > 0) gemm(g);
  return y;
}

void linear_backward_dx_accumulate(const Tensor& dy, const Tensor& w, Tensor& dx) {
  // dX[R, K] += dY[R, N] · W[N, K]: beta = 1, C = D = dx (in place, one layout).
  const int64_t R = dx.rows(), K = dx.cols(), N = w.size(0);
  GemmArgs g;
  g.device = dx.device().index;
  g.M = R, g.N = K, g.K = N;
  g.ab_type = g.c_type = dx.dtype();
  g.A = dy.data(), g.lda = N;
  g.B = w.data(), g.ldb = K;
  g.C = dx.data(), g.ldc = K;
  g.beta = 1.f;
  if (R > 0) gemm(g);
}

LinearGrads linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, bool need_dx, bool need_dw,
                            bool need_db, DType dw_dtype) {
  const int64_t R = x.rows(), K = x.cols(), N = w.size(0);
  const Device dev = x.device();
  LinearGrads out;
  if (need_dx) {
    // dX[R, K] = dY[R, N] · W[N, K]
    out.dx = Tensor::empty(x.shape(), x.dtype(), dev);
    GemmArgs g;
    g.device = dev.index;
    g.M = R, g.N = K, g.K = N;
    g.ab_type = g.c_type = x.dtype();
    g.A = dy.data(), g.lda = N;
    g.B = w.data(), g.ldb = K;
    g.C = out.dx.data(), g.ldc = K;
    if (R > 0) gemm(g);
  }
  if (need_dw) {
    // dW[N, K] = dY[R, N]ᵀ · X[R, K], bf16/f16 operands with an f32 (or x's dtype) result, fp32
    // accumulation (cuBLASLt supports both mixes).
    if (R == 0) {
      out.dw = Tensor::zeros(w.shape(), dw_dtype, dev);
    } else {
      out.dw = Tensor::empty(w.shape(), dw_dtype, dev);
      GemmArgs g;
      g.device = dev.index;
      g.trans_a = true;
      g.M = N, g.N = K, g.K = R;
      g.ab_type = x.dtype(), g.c_type = dw_dtype;
      g.A = dy.data(), g.lda = N;
      g.B = x.data(), g.ldb = K;
      g.C = out.dw.data(), g.ldc = K;
      gemm(g);
    }
  }
  if (need_db) {
    out.db = Tensor::empty(Shape{N}, DType::f32, dev);
    cudaStream_t stream = cuda_context(dev).stream;
    with_float_type(dy.dtype(), [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const unsigned int blocks = grid_for(N, 32);
      column_sum_kernel<T><<<blocks, dim3(32, kSumRows), 0, stream>>>(dy.data_as<T>(), out.db.data_as<float>(), R, N);
      CUDA_CHECK_LAUNCH();
    });
  }
  return out;
}

Tensor bmm(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, float alpha, DType out_dtype) {
  const int64_t M = trans_a ? a.size(-1) : a.size(-2);
  const int64_t K = trans_a ? a.size(-2) : a.size(-1);
  const int64_t N = trans_b ? b.size(-2) : b.size(-1);
  int64_t batch = 1;
  for (int i = 0; i + 2 < a.ndim(); ++i) batch *= a.size(i);
  Shape out_shape = a.shape();
  out_shape.dims[out_shape.ndim - 2] = M;
  out_shape.dims[out_shape.ndim - 1] = N;
  // cuBLASLt cannot write e.g. bf16 from f32 operands: compute those in f32 and convert once.
  const bool direct = supported_types(a.dtype(), out_dtype);
  const DType c_type = direct ? out_dtype : DType::f32;
  Tensor c = Tensor::empty(out_shape, c_type, a.device());
  GemmArgs g;
  g.device = a.device().index;
  g.trans_a = trans_a, g.trans_b = trans_b;
  g.M = M, g.N = N, g.K = K;
  g.alpha = alpha;
  g.ab_type = a.dtype(), g.c_type = c_type;
  g.A = a.data(), g.lda = a.size(-1), g.stride_a = a.size(-1) * a.size(-2);
  g.B = b.data(), g.ldb = b.size(-1), g.stride_b = b.size(-1) * b.size(-2);
  g.C = c.data(), g.ldc = N, g.stride_c = M * N;
  g.batch = batch;
  gemm(g);
  return direct ? std::move(c) : c.to(out_dtype);
}

}  // namespace omniq::cuda
