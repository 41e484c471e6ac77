// CUDA graphs with no CUDA types in the interface (plain C++ callers such as the block trainer).
//
// A calibration step of a small model is dozens of short kernels; launching them one by one costs
// more host time than the GPU needs to run them, and even for 7B shapes the launch gaps add up.
// CudaGraph records everything `body` queues on the device context's stream once (stream capture)
// and replays it with one launch. Stream-ordered allocations made inside the body become part of
// the graph (they must also be freed inside it, so a replay owns no memory afterwards).
//
// Requirements on the body (checked by CUDA; capture then fails and `capture` returns false with
// the reason, so the caller can run the work eagerly instead): no host synchronisation, no host
// reads of device data, no work on other streams; every pointer it uses must stay valid and keep
// its meaning for as long as the graph is replayed (inputs are copied into fixed buffers between
// replays, parameters are updated in place).
// Present only when OMNIQ_HAS_CUDA is defined.
#pragma once
#include <functional>
#include <string>

namespace omniq {

class CudaGraph {
 public:
  CudaGraph() = default;
  ~CudaGraph();
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  // Captures body() on device `dev`'s stream and instantiates it. On failure (a non-capturable call
  // inside body, or body throwing) the capture is ended, nothing was executed, and false is returned
  // with the reason in *why. Exceptions from body are reported the same way, not rethrown.
  bool capture(int dev, const std::function<void()>& body, std::string* why);
  // Replays the captured work on the device's stream (asynchronous).
  void launch();
  bool ready() const { return exec_ != nullptr; }
  // Destroys the graph and returns its memory to the driver (synchronises the device's stream).
  void reset();

 private:
  int dev_ = -1;
  void* graph_ = nullptr;  // cudaGraph_t
  void* exec_ = nullptr;   // cudaGraphExec_t
};

// Whether calibration steps run as CUDA graphs: on unless OMNIQ_NO_CUDA_GRAPH is set (A/B switch).
bool cuda_graphs_enabled();

}  // namespace omniq
