#include "experiments/calib_bench.h"


#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "models/model_shapes.h"
#include "ops/attention.h"
#include "runtime/allocator.h"
#include "runtime/error.h"

namespace omniq {

namespace {

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t s = a * 0x9E3779B97F4A7C15ull + b;
  return splitmix64(s);
}

// Approximately N(0, std²) values (Irwin–Hall: a sum of 4 uniforms, centred and scaled to unit
// variance), deterministic in (seed, index) whatever the thread count. A 70B block is ~0.86 G
// weights and its inputs ~2 G values: std::normal_distribution on one core would take minutes.
void fill_normal(std::vector<float>& v, float std, uint64_t seed) {
  constexpr size_t kChunk = 1 << 16;
  const size_t nchunks = (v.size() + kChunk - 1) / kChunk;
  const float scale = std * std::sqrt(3.0f) / 4294967296.0f;  // (Σ4 u − 2)·√3 with u = x / 2^32
  auto work = [&](size_t first, size_t step) {
    for (size_t c = first; c < nchunks; c += step) {
      uint64_t s = mix(seed, c);
      size_t end = std::min(v.size(), (c + 1) * kChunk);
      for (size_t i = c * kChunk; i < end; ++i) {
        uint64_t a = splitmix64(s), b = splitmix64(s);
        int64_t sum = static_cast<int64_t>(a & 0xffffffffu) + static_cast<int64_t>(a >> 32) +
                      static_cast<int64_t>(b & 0xffffffffu) + static_cast<int64_t>(b >> 32);
        v[i] = static_cast<float>(sum - (int64_t{1} << 33)) * scale;
      }
    }
  };
  size_t nt = std::max<size_t>(1, std::min<size_t>(std::thread::hardware_concurrency(), nchunks));
  std::vector<std::thread> ts;
  for (size_t t = 1; t < nt; ++t) ts.emplace_back(work, t, nt);
  work(0, nt);
  for (std::thread& t : ts) t.join();
}

Tensor random_normal(const Shape& shape, float std, uint64_t seed, DType dt, Device dev) {
  std::vector<float> v(static_cast<size_t>(shape.numel()));
  fill_normal(v, std, seed);
  return Tensor::from_f32(v, shape, dt, dev);
}

uint64_t name_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (char c : s) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return h;
}

double mean(const std::vector<double>& v, size_t from) {
  double s = 0;
  for (size_t i = from; i < v.size(); ++i) s += v[i];
  return v.size() > from ? s / static_cast<double>(v.size() - from) : 0;
}

}  // namespace

CalibFlops calib_flops(const ModelConfig& cfg, const QuantConfig& qc, int64_t T) {
  // Sites whose weight LET transforms (producer rows or consumer columns): they need dW with LET.
  std::set<std::string> let_sites;
  for (const TransformPair& p : block_transform_pairs(cfg)) {
    for (const std::string& c : p.consumers) let_sites.insert(c);
    if (p.kind != TransformPair::Kind::norm_to_linears) let_sites.insert(p.producer);
  }
  const bool lwc = qc.lwc && qc.weight_quant();
  CalibFlops f;
  for (const WeightSpec& s : block_weight_specs(cfg, 0)) {
    if (s.role != WeightRole::linear_weight) continue;
    const std::string site = s.key.substr(0, s.key.find('.'));
    const double gemm = 2.0 * static_cast<double>(T) * static_cast<double>(s.shape.numel());
    f.linear_params += s.shape.numel();
    f.forward += gemm;
    f.train_step += gemm;
    // q/k/v read the normed block input: no gradient flows there unless LET scales the norm.
    bool first_group = site == "q_proj" || site == "k_proj" || site == "v_proj";
    if (!first_group || qc.let) f.train_step += gemm;                         // dX
    if (lwc || (qc.let && let_sites.count(site))) f.train_step += gemm;       // dW
  }
  f.attention_forward = 2.0 * static_cast<double>(T) * static_cast<double>(T) * static_cast<double>(cfg.head_dim) *
                        static_cast<double>(cfg.num_heads);
  f.forward += f.attention_forward;
  f.train_step += 3.5 * f.attention_forward;
  return f;
}

void random_block_weights(const ModelConfig& cfg, int64_t layer, uint64_t seed, Device dev, DType compute,
                          BlockWeights& f32, BlockWeights& cw) {
  f32 = BlockWeights{};
  cw = BlockWeights{};
  f32.what = cw.what = strformat("random block %lld of %s", static_cast<long long>(layer), cfg.source.c_str());
  for (const WeightSpec& s : block_weight_specs(cfg, layer)) {
    Tensor t;
    if (s.role == WeightRole::norm_weight) t = Tensor::full(s.shape, 1.0f, DType::f32, dev);
    else if (s.role == WeightRole::norm_bias) t = Tensor::zeros(s.shape, DType::f32, dev);
    else t = random_normal(s.shape, 0.02f, mix(mix(seed, static_cast<uint64_t>(layer)), name_hash(s.key)), DType::f32, dev)
                 .to(DType::f16)
                 .to(DType::f32);  // fp16 values, like a Hugging Face checkpoint (calibration relies on it)
    if (compute == DType::f32) {  // one copy, as calibrate_model loads it
      cw.tensors[s.key] = std::move(t);
      continue;
    }
    cw.tensors[s.key] = t.to(weight_role_dtype(s.role, compute));
    f32.tensors[s.key] = std::move(t);
  }
}

CalibBenchResult run_calib_bench(const CalibBenchOptions& opt, const std::function<void(const CalibBenchBlock&)>& on_block) {
  const QuantConfig& qc = opt.qc;
  qc.validate();
  CalibBenchResult r;
  r.cfg = model_shape(opt.shape);
  OMNIQ_CHECK(opt.blocks >= 1 && opt.blocks <= r.cfg.num_layers, "--blocks %lld: use 1..%lld (the layers of %s)",
              static_cast<long long>(opt.blocks), static_cast<long long>(r.cfg.num_layers), opt.shape.c_str());
  OMNIQ_CHECK(opt.peak_tflops > 0, "--peak %g: the device's peak TFLOP/s must be positive", opt.peak_tflops);
  r.seqlen = std::min<int64_t>(qc.seqlen, r.cfg.max_position_embeddings);
  r.flops = calib_flops(r.cfg, qc, r.seqlen);
  const int64_t N = qc.nsamples, T = r.seqlen, C = r.cfg.hidden_size;

  // Block-0 inputs ~ N(0, 1), one sample at a time (host memory stays one window).
  CalibStreams streams;
  streams.fp = Tensor::empty({N, T, C}, opt.compute, opt.device);
  for (int64_t j = 0; j < N; ++j)
    streams.fp.view_rows(j, 1).copy_from(random_normal({1, T, C}, 1.0f, mix(opt.seed ^ 0xA5A5u, static_cast<uint64_t>(j)),
                                                       opt.compute, opt.device));
  streams.q = streams.fp.clone();

  std::vector<double> secs;
  for (int64_t i = 0; i < opt.blocks; ++i) {
    reset_peak_memory(opt.device);  // as calibrate_model: the block's weights count in its peak
    BlockWeights w32, wc;
    random_block_weights(r.cfg, i, opt.seed, opt.device, opt.compute, w32, wc);
    BlockCallbacks cb;
    cb.on_epoch = [&](int e, double l) {
      if (opt.on_epoch) opt.on_epoch(i, e, l);
    };
    const BlockWeights& wq = opt.compute == DType::f32 ? wc : w32;
    CalibBenchBlock b;
    GpuMonitor monitor(opt.device);
    b.report = calibrate_block(r.cfg, qc, wc, wq, streams, i, cb);
    b.gpu = monitor.stop();
    const BlockReport& rep = b.report;
    double fwd_passes = static_cast<double>(N) * (qc.aug_loss && qc.trains() ? 3 : 2);
    b.train_flops = static_cast<double>(rep.train_steps) * r.flops.train_step;
    b.flops = fwd_passes * r.flops.forward + b.train_flops;
    b.ms_per_step = rep.train_steps ? 1e3 * rep.train_seconds / static_cast<double>(rep.train_steps) : 0;
    b.train_tflops = rep.train_seconds > 0 ? b.train_flops / rep.train_seconds / 1e12 : 0;
    b.block_tflops = rep.seconds > 0 ? b.flops / rep.seconds / 1e12 : 0;
    secs.push_back(rep.seconds);
    r.blocks.push_back(b);
    if (on_block) on_block(r.blocks.back());
  }
  // Block 0 also pays one-time costs (cuBLASLt heuristics, the memory pool growing): extrapolate
  // from the later blocks when there are any.
  r.block_seconds = mean(secs, secs.size() > 1 ? 1 : 0);
  r.total_minutes = r.block_seconds * static_cast<double>(r.cfg.num_layers) / 60.0;
  const CalibBenchBlock& last = r.blocks.back();
  int64_t peak = 0;
  for (const CalibBenchBlock& b : r.blocks) peak = std::max(peak, b.report.peak_bytes);
  r.summary = strformat(
      "%s %s%s%s%s, %lld x %lld tokens, %d epochs on %s %s: %.1f s/block (%.1f ms/step, %.0f TFLOP/s = %.0f%% of "
      "%.0f), peak %.1f GiB -> %lld layers ~ %.1f min",
      opt.shape.c_str(), qc.setting_name().c_str(), qc.lwc ? " lwc" : "", qc.let ? " let" : "",
      qc.aug_loss ? " aug" : "", static_cast<long long>(N), static_cast<long long>(T), qc.epochs,
      opt.device.str().c_str(), dtype_name(opt.compute), r.block_seconds, last.ms_per_step, last.train_tflops,
      100 * last.train_tflops / opt.peak_tflops, opt.peak_tflops, peak / 1073741824.0,
      static_cast<long long>(r.cfg.num_layers), r.total_minutes);
  if (last.gpu.available && last.gpu.samples > 0)
    r.summary += strformat(" (at %.0f MHz mean SM clock, power-capped %.0f%%)", last.gpu.mean_sm_mhz,
                           100 * last.gpu.power_capped);
  return r;
}

std::string calib_bench_json(const CalibBenchOptions& opt, const CalibBenchResult& r) {
  using nlohmann::ordered_json;
  const QuantConfig& qc = opt.qc;
  ordered_json j;
  j["shape"] = opt.shape;
  j["model"] = r.cfg.summary();
  j["method"] = qc.method;
  j["setting"] = qc.setting_name();
  j["lwc"] = qc.lwc;
  j["let"] = qc.let;
  j["aug_loss"] = qc.aug_loss;
  j["epochs"] = qc.epochs;
  j["nsamples"] = qc.nsamples;
  j["seqlen"] = r.seqlen;
  j["device"] = opt.device.str();
  j["dtype"] = dtype_name(opt.compute);
  j["deterministic"] = attention_deterministic();
  j["peak_tflops"] = opt.peak_tflops;
  j["seed"] = opt.seed;
  j["flops"] = {{"definition",
                 "forward = sum_s 2*T*P_s + A; train_step = sum_s 2*T*P_s*(1 + dX + dW) + 3.5*A, dX = 0 for q/k/v "
                 "without LET, dW = 0 for sites without LWC/LET; A = 2*T^2*D*H (causal); "
                 "block = N*forward*(2, 3 with aug_loss) + steps*train_step"},
                {"linear_params", r.flops.linear_params},
                {"attention_forward", r.flops.attention_forward},
                {"forward_per_sample", r.flops.forward},
                {"train_step", r.flops.train_step}};
  ordered_json blocks = ordered_json::array();
  for (const CalibBenchBlock& b : r.blocks) {
    const BlockReport& p = b.report;
    blocks.push_back({{"block", p.block},
                      {"seconds", p.seconds},
                      {"fp_seconds", p.fp_seconds},
                      {"init_seconds", p.init_seconds},
                      {"train_seconds", p.train_seconds},
                      {"gptq_seconds", p.gptq_seconds},
                      {"propagate_seconds", p.propagate_seconds},
                      {"train_steps", p.train_steps},
                      {"graph_steps", p.graph_steps},
                      {"ms_per_step", b.ms_per_step},
                      {"train_tflops", b.train_tflops},
                      {"train_pct_of_peak", 100 * b.train_tflops / opt.peak_tflops},
                      {"block_flops", b.flops},
                      {"block_tflops", b.block_tflops},
                      {"block_pct_of_peak", 100 * b.block_tflops / opt.peak_tflops},
                      {"peak_bytes", p.peak_bytes},
                      {"peak_gib", p.peak_bytes / 1073741824.0},
                      {"epoch_loss", p.epoch_loss},
                      {"final_loss", p.final_loss},
                      {"gpu", b.gpu.available ? ordered_json{{"samples", b.gpu.samples},
                                                             {"mean_sm_mhz", b.gpu.mean_sm_mhz},
                                                             {"min_sm_mhz", b.gpu.min_sm_mhz},
                                                             {"max_sm_mhz", b.gpu.max_sm_mhz},
                                                             {"mean_power_w", b.gpu.mean_power_w},
                                                             {"power_limit_w", b.gpu.power_limit_w},
                                                             {"power_capped_fraction", b.gpu.power_capped},
                                                             {"thermal_limited_fraction", b.gpu.thermal_limited}}
                                              : ordered_json{{"unavailable", b.gpu.why}}}});
  }
  j["blocks"] = blocks;
  j["extrapolation"] = {{"layers", r.cfg.num_layers},
                        {"seconds_per_block", r.block_seconds},
                        {"from_blocks", r.blocks.size() > 1 ? "1.." : "0"},
                        {"minutes", r.total_minutes}};
  j["summary"] = r.summary;
  return j.dump(1) + "\n";
}

}  // namespace omniq
