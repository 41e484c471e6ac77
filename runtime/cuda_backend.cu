#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <memory>
#include <mutex>

#include "runtime/cuda_backend.h"
#include "runtime/cuda_context.h"

namespace omniq {

// ---------------------------------------------------------------------------------------------
// error helpers

void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  cudaGetLastError();  // clear the sticky-free error state so later calls can report their own
  if (err == cudaErrorMemoryAllocation) {
    throw_error(file, line,
                strformat("out of GPU memory in %s: reduce nsamples/seqlen or the batch, or use a GPU with more "
                          "memory",
                          expr));
  }
  throw_error(file, line, strformat("CUDA call %s failed: %s (%s)", expr, cudaGetErrorString(err), cudaGetErrorName(err)));
}

void throw_cublas_error(cublasStatus_t st, const char* expr, const char* file, int line) {
  throw_error(file, line, strformat("cuBLAS call %s failed with status %d", expr, static_cast<int>(st)));
}

// ---------------------------------------------------------------------------------------------
// contexts

namespace {
constexpr int kMaxDevices = 16;
std::once_flag g_once[kMaxDevices];
std::unique_ptr<CudaContext> g_ctx[kMaxDevices];

void create_context(int index) {
  auto ctx = std::make_unique<CudaContext>();
  ctx->device = index;
  CUDA_CHECK(cudaSetDevice(index));
  CUDA_CHECK(cudaGetDeviceProperties(&ctx->prop, index));
  CUDA_CHECK(cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking));
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&ctx->pool, index));
  // Keep freed memory in the pool instead of returning it to the driver at every sync.
  uint64_t threshold = UINT64_MAX;
  CUDA_CHECK(cudaMemPoolSetAttribute(ctx->pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  CUBLAS_CHECK(cublasLtCreate(&ctx->lt));
  ctx->workspace_bytes = 32u << 20;  // 32 MiB: what cuBLASLt recommends for Hopper
  CUDA_CHECK(cudaMalloc(&ctx->workspace, ctx->workspace_bytes));
  g_ctx[index] = std::move(ctx);
}
}  // namespace

CudaContext& cuda_context(int index) {
  OMNIQ_CHECK(index >= 0 && index < kMaxDevices && index < cuda_device_count(),
              "CUDA device %d is not available (%d visible)", index, cuda_device_count());
  std::call_once(g_once[index], create_context, index);
  int current = -1;
  cudaGetDevice(&current);
  if (current != index) CUDA_CHECK(cudaSetDevice(index));
  return *g_ctx[index];
}

// ---------------------------------------------------------------------------------------------
// kernels

namespace {

template <typename T> __device__ __forceinline__ float load_f32(const T* p, int64_t i) { return static_cast<float>(p[i]); }
template <> __device__ __forceinline__ float load_f32(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
template <> __device__ __forceinline__ float load_f32(const __half* p, int64_t i) { return __half2float(p[i]); }

template <typename T> __device__ __forceinline__ void store_f32(T* p, int64_t i, float v) { p[i] = static_cast<T>(v); }
template <> __device__ __forceinline__ void store_f32(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }
template <> __device__ __forceinline__ void store_f32(__half* p, int64_t i, float v) { p[i] = __float2half(v); }
template <> __device__ __forceinline__ void store_f32(int32_t* p, int64_t i, float v) { p[i] = __float2int_rn(v); }
template <> __device__ __forceinline__ void store_f32(int8_t* p, int64_t i, float v) { p[i] = static_cast<int8_t>(__float2int_rn(v)); }
template <> __device__ __forceinline__ void store_f32(uint8_t* p, int64_t i, float v) { p[i] = static_cast<uint8_t>(__float2int_rn(v)); }

template <typename S, typename D>
__global__ void convert_kernel(const S* src, D* dst, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    store_f32(dst, i, load_f32(src, i));
}

template <typename D>
__global__ void fill_kernel(D* dst, int64_t n, float v) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    store_f32(dst, i, v);
}

// Calls f(T*) with the pointer cast to the C++ type of dtype dt.
template <typename F>
void with_type(DType dt, void* p, F f) {
  switch (dt) {
    case DType::f32: f(static_cast<float*>(p)); break;
    case DType::f16: f(static_cast<__half*>(p)); break;
    case DType::bf16: f(static_cast<__nv_bfloat16*>(p)); break;
    case DType::i32: f(static_cast<int32_t*>(p)); break;
    case DType::i8: f(static_cast<int8_t*>(p)); break;
    case DType::u8: f(static_cast<uint8_t*>(p)); break;
    default: OMNIQ_FAIL("unknown dtype");
  }
}

constexpr int kBlock = 256;
unsigned int grid_stride_grid(int64_t n) {
  unsigned int g = grid_for(n, kBlock);
  return g > 65535u * 8 ? 65535u * 8 : g;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// cuda_rt services

namespace cuda_rt {

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void* malloc_async(int dev, size_t bytes) {
  CudaContext& ctx = cuda_context(dev);
  void* p = nullptr;
  cudaError_t err = cudaMallocAsync(&p, bytes, ctx.stream);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    OMNIQ_FAIL("out of GPU memory on cuda:%d: asked for %.1f MiB with %.1f MiB free of %.1f MiB; reduce nsamples, "
               "seqlen or batch size, or use a larger GPU",
               dev, bytes / 1048576.0, free_b / 1048576.0, total_b / 1048576.0);
  }
  CUDA_CHECK(err);
  return p;
}

void free_async(int dev, void* ptr) noexcept {
  cudaError_t err = cudaFreeAsync(ptr, cuda_context(dev).stream);
  if (err != cudaSuccess) log_error(__FILE__, __LINE__, strformat("cudaFreeAsync failed: %s", cudaGetErrorString(err)));
}

void memcpy_h2d(int dev, void* dst, const void* src, size_t bytes) {
  CudaContext& ctx = cuda_context(dev);
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, ctx.stream));
  // Pageable source: the caller may free it on return, so wait for the copy.
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
}

void memcpy_d2h(int dev, void* dst, const void* src, size_t bytes) {
  CudaContext& ctx = cuda_context(dev);
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
}

void memcpy_d2d(int dev, void* dst, const void* src, size_t bytes) {
  CudaContext& ctx = cuda_context(dev);
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx.stream));
}

void convert(int dev, const void* src, DType src_dt, void* dst, DType dst_dt, int64_t n) {
  CudaContext& ctx = cuda_context(dev);
  with_type(src_dt, const_cast<void*>(src), [&](auto* s) {
    with_type(dst_dt, dst, [&](auto* d) {
      convert_kernel<<<grid_stride_grid(n), kBlock, 0, ctx.stream>>>(s, d, n);
      CUDA_CHECK_LAUNCH();
    });
  });
}

void fill(int dev, void* dst, DType dt, int64_t n, float value) {
  CudaContext& ctx = cuda_context(dev);
  with_type(dt, dst, [&](auto* d) {
    fill_kernel<<<grid_stride_grid(n), kBlock, 0, ctx.stream>>>(d, n, value);
    CUDA_CHECK_LAUNCH();
  });
}

void synchronize(int dev) { CUDA_CHECK(cudaStreamSynchronize(cuda_context(dev).stream)); }

void trim_pool(int dev) {
  CudaContext& ctx = cuda_context(dev);
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  CUDA_CHECK(cudaMemPoolTrimTo(ctx.pool, 0));
}

}  // namespace cuda_rt
}  // namespace omniq
