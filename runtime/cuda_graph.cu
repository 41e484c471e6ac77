#include "runtime/cuda_graph.h"

#include <cstdlib>

#include "runtime/cuda_context.h"

namespace omniq {

bool cuda_graphs_enabled() {
  const char* env = std::getenv("OMNIQ_NO_CUDA_GRAPH");
  return !(env && *env && std::string(env) != "0");
}

CudaGraph::~CudaGraph() {
  try {
    reset();
  } catch (...) {
    // A destructor must not throw; the driver reclaims the graph with the context.
  }
}

void CudaGraph::reset() {
  if (!exec_ && !graph_) return;
  CudaContext& ctx = cuda_context(dev_);
  // A replay may still be running: destroy only once the stream has drained.
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  if (exec_) CUDA_CHECK(cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_)));
  if (graph_) CUDA_CHECK(cudaGraphDestroy(static_cast<cudaGraph_t>(graph_)));
  exec_ = graph_ = nullptr;
  // The graph's allocations sit in a device-wide cache for graphs; give them back so the eager
  // work that follows (propagation, the next block) can use that memory.
  CUDA_CHECK(cudaDeviceGraphMemTrim(dev_));
}

bool CudaGraph::capture(int dev, const std::function<void()>& body, std::string* why) {
  reset();
  dev_ = dev;
  CudaContext& ctx = cuda_context(dev);
  // Relaxed: other host threads may use CUDA meanwhile (progress bars, loaders); only this stream's
  // work is recorded.
  CUDA_CHECK(cudaStreamBeginCapture(ctx.stream, cudaStreamCaptureModeRelaxed));
  std::string failure;
  try {
    body();
  } catch (const std::exception& e) {
    failure = e.what();
  }
  cudaGraph_t g = nullptr;
  cudaError_t end = cudaStreamEndCapture(ctx.stream, &g);
  if (end != cudaSuccess && failure.empty()) failure = std::string("stream capture failed: ") + cudaGetErrorString(end);
  if (failure.empty()) {
    cudaGraphExec_t e = nullptr;
    cudaError_t inst = cudaGraphInstantiate(&e, g, 0);
    if (inst == cudaSuccess) {
      graph_ = g;
      exec_ = e;
      return true;
    }
    failure = std::string("graph instantiation failed: ") + cudaGetErrorString(inst);
  }
  cudaGetLastError();  // clear the error capture left behind, so later calls report their own
  if (g) cudaGraphDestroy(g);
  if (why) *why = failure;
  return false;
}

void CudaGraph::launch() {
  OMNIQ_CHECK(exec_ != nullptr, "CudaGraph::launch: nothing captured");
  CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), cuda_context(dev_).stream));
}

}  // namespace omniq
