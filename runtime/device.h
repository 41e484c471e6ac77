// Where a tensor lives: the host, or one CUDA device.
#pragma once
#include <string>

namespace omniq {

struct Device {
  enum class Kind : unsigned char { cpu, cuda };
  Kind kind = Kind::cpu;
  int index = 0;  // CUDA ordinal; 0 for the CPU

  static Device cpu() { return Device{Kind::cpu, 0}; }
  static Device cuda(int i = 0) { return Device{Kind::cuda, i}; }
  bool is_cpu() const { return kind == Kind::cpu; }
  bool is_cuda() const { return kind == Kind::cuda; }
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }
  // Parses "cpu", "cuda", "cuda:1"; throws with the accepted forms otherwise.
  static Device parse(const std::string& s);
};

// True when omniq was built with CUDA and at least one GPU is visible. Never throws.
bool cuda_available();
int cuda_device_count();

}  // namespace omniq
