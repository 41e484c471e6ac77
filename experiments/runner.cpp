// Runs sweep points: calibrate (resumable) -> log every block to run.h5 -> evaluate -> summary.
#include "experiments/runner.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <memory>
#include <regex>

#include "experiments/h5_log.h"
#include "experiments/paper_table.h"
#include "experiments/progress.h"
#include "models/causal_lm.h"
#include "models/datasets.h"
#include "models/model_config.h"
#include "models/perplexity.h"
#include "models/tokenizer.h"
#include "quant/act_quant_hooks.h"
#include "quant/calibrate.h"
#include "runtime/error.h"

namespace omniq {

namespace {

bool path_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

void make_dirs(const std::string& p) {
  std::string cur;
  for (size_t i = 0; i <= p.size(); ++i) {
    if ((i == p.size() || p[i] == '/') && !cur.empty() && !path_exists(cur))
      OMNIQ_CHECK(::mkdir(cur.c_str(), 0755) == 0 || path_exists(cur), "cannot create directory '%s'", cur.c_str());
    if (i < p.size()) cur += p[i];
  }
}

// Written to a temporary name then renamed, so a killed run never leaves half a config.
void write_file_atomic(const std::string& path, const std::string& text) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    OMNIQ_CHECK(f.good(), "cannot write '%s'", tmp.c_str());
    f << text;
    OMNIQ_CHECK(f.good(), "cannot write '%s'", tmp.c_str());
  }
  OMNIQ_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename '%s' to '%s'", tmp.c_str(), path.c_str());
}

DType eval_dtype(const ExperimentConfig& c, Device dev) {
  const std::string& d = c.eval.dtype;
  if (d.empty()) return dev.is_cpu() ? DType::f32 : DType::bf16;
  if (d == "bf16") return DType::bf16;
  if (d == "f16") return DType::f16;
  return DType::f32;
}

// Eval targets in config order: (label, text file).
std::vector<std::pair<std::string, std::string>> eval_targets(const ExperimentConfig& c) {
  std::vector<std::pair<std::string, std::string>> t;
  for (const std::string& d : c.data.eval_datasets) t.emplace_back(d, dataset_path(d));
  for (const std::string& f : c.data.eval_texts) t.emplace_back(f, f);
  return t;
}

// Metrics of the summary row, read back from run.h5 (the one source of truth for skipped points too).
void fill_from_record(PointResult& res, const RunRecord& rec, const ExperimentConfig& c) {
  res.final_loss = std::numeric_limits<double>::quiet_NaN();
  res.calib_seconds = 0;
  res.peak_bytes = 0;
  for (const auto& [b, r] : rec.blocks) {
    res.final_loss = r.final_loss;  // map order: the last block wins
    res.calib_seconds += r.seconds;
    res.peak_bytes = std::max(res.peak_bytes, r.peak_bytes);
  }
  res.ppl.clear();
  for (const auto& [label, path] : eval_targets(c)) {
    auto it = rec.evals.find(h5_safe_name(label));
    res.ppl.emplace_back(label, it == rec.evals.end() ? std::numeric_limits<double>::quiet_NaN() : it->second.ppl);
  }
}

std::string fmt_num(double v, const char* f) { return std::isfinite(v) ? strformat(f, v) : std::string("-"); }

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char ch : s) q += ch == '"' ? std::string("\"\"") : std::string(1, ch);
  return q + "\"";
}

// The summary's columns: shared by the CSV and the markdown writer so they never disagree.
struct Table {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
};

Table summary_table(const std::vector<PointResult>& results) {
  std::vector<std::string> setting_keys, ppl_labels;
  for (const PointResult& r : results) {
    for (const auto& [k, v] : r.settings)
      if (std::find(setting_keys.begin(), setting_keys.end(), k) == setting_keys.end()) setting_keys.push_back(k);
    for (const auto& [l, p] : r.ppl)
      if (std::find(ppl_labels.begin(), ppl_labels.end(), l) == ppl_labels.end()) ppl_labels.push_back(l);
  }
  bool models = false;
  for (const PointResult& r : results) models = models || !r.model.empty();
  Table t;
  t.header.push_back("name");
  if (models) t.header.push_back("model");
  for (const std::string& k : setting_keys) t.header.push_back(k);
  for (const char* h : {"method", "W/A/g", "final_loss", "calib_s", "peak_MiB"}) t.header.push_back(h);
  // A text file's column is named after its file name (the full path is in run.h5 /eval/*/source).
  for (const std::string& l : ppl_labels) t.header.push_back("ppl " + l.substr(l.rfind('/') + 1));
  t.header.push_back("status");
  for (const PointResult& r : results) {
    std::vector<std::string> row{r.name};
    if (models) row.push_back(r.model);
    for (const std::string& k : setting_keys) {
      std::string v;
      for (const auto& [sk, sv] : r.settings)
        if (sk == k) v = sv;
      row.push_back(v);
    }
    row.push_back(is_unquantized(r.qc) ? "-" : r.qc.method);
    row.push_back(r.qc.setting_name());
    row.push_back(fmt_num(r.final_loss, "%.4g"));
    row.push_back(fmt_num(r.calib_seconds, "%.1f"));
    row.push_back(fmt_num(r.peak_bytes / 1048576.0, "%.0f"));
    for (const std::string& l : ppl_labels) {
      double p = std::numeric_limits<double>::quiet_NaN();
      for (const auto& [pl, pv] : r.ppl)
        if (pl == l) p = pv;
      row.push_back(fmt_num(p, "%.3f"));
    }
    row.push_back(r.status);
    t.rows.push_back(row);
  }
  return t;
}

}  // namespace

std::string resolve_device_name(const std::string& device) {
  if (device == "auto" || device.empty()) return cuda_available() ? "cuda" : "cpu";
  return device;
}

std::string sweep_dir_of(const ExperimentConfig& c) { return c.output.dir + "/" + c.name; }

PointResult run_point(const SweepPoint& point, const std::string& sweep_dir) {
  const ExperimentConfig& c = point.config;
  PointResult res;
  res.name = point.name;
  res.dir = sweep_dir + "/" + point.name;
  res.settings = point.settings;
  res.model = point.model;
  res.qc = c.quantization;
  const std::string h5 = res.dir + "/run.h5";
  RunRecord prev = read_run_log(h5);
  if (prev.status == "complete") {
    res.status = "complete";
    res.skipped = true;
    fill_from_record(res, prev, c);
    std::printf("%s: complete in %s, skipped\n", point.name.c_str(), res.dir.c_str());
    std::fflush(stdout);
    return res;
  }

  // An unset ${VAR} of a models: path (sweep.h): say which variable, not "cannot open ${...}".
  size_t var = c.model.path.find("${");
  if (var != std::string::npos) {
    res.status = "failed";
    res.error = strformat("model.path '%s': the environment variable %s is not set", c.model.path.c_str(),
                          c.model.path.substr(var + 2, c.model.path.find('}', var) - var - 2).c_str());
    std::fprintf(stderr, "%s: not started: %s\n", point.name.c_str(), res.error.c_str());
    fill_from_record(res, RunRecord{}, c);
    return res;
  }

  std::unique_ptr<RunLog> log;
  try {
    make_dirs(res.dir);
    write_file_atomic(res.dir + "/config.yaml", to_yaml(c));
    log = std::make_unique<RunLog>(h5);
    Device dev = Device::parse(resolve_device_name(c.device));
    OMNIQ_CHECK(dev.is_cpu() || cuda_available(), "device %s: no CUDA device is visible; use device: cpu (or auto)",
                dev.str().c_str());
    log->write_config(c, point.name);
    log->write_environment(collect_environment(dev));
    log->set_status("running");
    std::printf("%s: %s %s on %s -> %s%s\n", point.name.c_str(),
                is_unquantized(c.quantization) ? "unquantized" : c.quantization.method.c_str(),
                c.quantization.setting_name().c_str(), dev.str().c_str(), res.dir.c_str(),
                prev.status.empty() ? "" : strformat(" (resuming a %s run)", prev.status.c_str()).c_str());
    std::fflush(stdout);

    // ---- calibration (resumes from model.state/); the FP16 baseline evaluates the original ----
    const bool fp_baseline = is_unquantized(c.quantization);
    CalibrationOptions o;
    o.model_dir = c.model.path;
    o.out_dir = res.dir + "/model";
    o.state_dir = res.dir + "/model.state";
    o.qc = c.quantization;
    o.device = dev;
    o.compute = dev.is_cpu() ? DType::f32 : DType::bf16;
    if (fp_baseline) std::printf("  unquantized baseline: nothing to calibrate, evaluating %s\n", c.model.path.c_str());
    const int64_t nblocks = fp_baseline ? 0 : ModelConfig::from_dir(c.model.path).num_layers;
    const int64_t per_block = o.qc.trains() ? o.qc.epochs : 1;
    const bool quiet_lines = ProgressBar::enabled();  // the bar shows the same; lines are for logs
    ProgressBar cbar("calibrate " + point.name, nblocks * per_block, o.qc.trains() ? "epoch" : "block");
    o.on_epoch = [&](int64_t block, int epoch, double loss) {
      cbar.update(block * per_block + epoch + 1, strformat("block %lld loss %.4g", static_cast<long long>(block), loss));
    };
    o.on_block = [&](const BlockReport& r) {
      cbar.update((r.block + 1) * per_block, strformat("block %lld done", static_cast<long long>(r.block)));
      // A resumed block already in run.h5 keeps its original record (its seconds were the real
      // ones); one missing there (killed between the state write and the log write) is added.
      if (!(r.resumed && log->has_block(r.block))) log->write_block(r, read_learned_params(o.state_dir, r.block));
      if (!quiet_lines) {
        std::printf("  block %3lld  final mse %.6g  %.1f s  peak %.0f MiB%s\n", static_cast<long long>(r.block),
                    r.final_loss, r.seconds, r.peak_bytes / 1048576.0, r.resumed ? "  (resumed)" : "");
        std::fflush(stdout);
      }
    };
    if (!fp_baseline) calibrate_model(o);
    cbar.finish();

    // ---- evaluation of the exported model ----
    const std::string eval_dir = fp_baseline ? c.model.path : o.out_dir;
    DType edt = eval_dtype(c, dev);
    Tokenizer tok = Tokenizer::from_model_dir(eval_dir);
    CausalLM model(eval_dir, edt, dev);
    std::unique_ptr<ActivationQuantHooks> act;
    if (c.quantization.act_quant()) {  // weight-activation: activations are quantized at run time
      act = std::make_unique<ActivationQuantHooks>(c.quantization.abits);
      model.set_block_hooks(act.get());
    }
    int64_t seqlen = c.eval.seqlen > 0 ? c.eval.seqlen : std::min<int64_t>(2048, model.config().max_position_embeddings);
    OMNIQ_CHECK(seqlen <= model.config().max_position_embeddings,
                "eval.seqlen %lld exceeds the model's max_position_embeddings %lld", static_cast<long long>(seqlen),
                static_cast<long long>(model.config().max_position_embeddings));
    for (const auto& [label, path] : eval_targets(c)) {
      std::vector<int32_t> ids = tok.encode(read_text_file(path), /*add_special_tokens=*/true);
      ProgressBar bar("eval " + label, static_cast<int64_t>(ids.size()) / seqlen, "win");
      PerplexityResult r = evaluate_perplexity(model, ids, seqlen, [&](int64_t d, int64_t) { bar.update(d); });
      bar.finish();
      EvalRecord e;
      e.source = path;
      e.ppl = r.ppl;
      e.nll = r.mean_nll;
      e.tokens = r.predicted_tokens;
      e.seconds = r.seconds;
      e.windows = r.windows;
      e.seqlen = seqlen;
      log->write_eval(label, e);
      std::printf("  %s ppl %.4f  (%lld windows x %lld, %.1f s)\n", label.c_str(), r.ppl,
                  static_cast<long long>(r.windows), static_cast<long long>(seqlen), r.seconds);
      std::fflush(stdout);
    }
    log->set_status("complete");
    res.status = "complete";
  } catch (const std::exception& e) {
    res.status = "failed";
    res.error = e.what();
    std::fprintf(stderr, "%s: failed: %s\n", point.name.c_str(), e.what());
    try {
      if (!log && path_exists(res.dir)) log = std::make_unique<RunLog>(h5);
      if (log) log->set_error(res.error);
    } catch (const std::exception& e2) {
      std::fprintf(stderr, "%s: could not record the failure in %s: %s\n", point.name.c_str(), h5.c_str(), e2.what());
    }
  }
  log.reset();  // close before reading back
  fill_from_record(res, read_run_log(h5), c);
  return res;
}

PointResult read_point_result(const SweepPoint& point, const std::string& sweep_dir) {
  PointResult res;
  res.name = point.name;
  res.model = point.model;
  res.dir = sweep_dir + "/" + point.name;
  res.settings = point.settings;
  res.qc = point.config.quantization;
  RunRecord rec = read_run_log(res.dir + "/run.h5");
  res.status = rec.status.empty() ? "missing" : rec.status;
  res.error = rec.error;
  fill_from_record(res, rec, point.config);
  return res;
}

bool point_selected(const std::string& name, const std::string& only) {
  if (only.empty()) return true;
  try {
    return std::regex_search(name, std::regex(only));
  } catch (const std::regex_error& e) {
    OMNIQ_FAIL("--only '%s' is not a valid regular expression (%s)", only.c_str(), e.what());
  }
}

std::vector<SweepPoint> load_sweep_points(const std::string& path, const std::string& model_path,
                                          const std::string& output_dir) {
  std::vector<SweepPoint> points = load_sweep(path);
  OMNIQ_CHECK(!points.empty(), "%s describes no runs", path.c_str());
  const bool has_models = !points.front().model.empty();
  OMNIQ_CHECK(model_path.empty() || !has_models,
              "%s names its models in models: (one folder per model): choose points with --only instead of --model",
              path.c_str());
  for (SweepPoint& p : points) {
    if (!model_path.empty()) p.config.model.path = model_path;
    if (!output_dir.empty()) p.config.output.dir = output_dir;
  }
  return points;
}

namespace {

std::vector<bool> select_points(const std::vector<SweepPoint>& points, const std::string& only) {
  std::vector<bool> sel;
  size_t n = 0;
  for (const SweepPoint& p : points) n += (sel.push_back(point_selected(p.name, only)), sel.back());
  if (n == 0) {
    std::string names;
    for (const SweepPoint& p : points) names += "\n  " + p.name;
    OMNIQ_FAIL("--only '%s' matches none of the %zu points:%s", only.c_str(), points.size(), names.c_str());
  }
  return sel;
}

void write_tables(const std::string& dir, const std::vector<PointResult>& results, bool print_summary) {
  make_dirs(dir);
  write_file_atomic(dir + "/summary.csv", summary_csv(results));
  std::string md = summary_markdown(results);
  write_file_atomic(dir + "/summary.md", md);
  std::string table = paper_tables_markdown(results);
  write_file_atomic(dir + "/table.md", table);
  std::printf("\n%s\n", (print_summary ? md : table).c_str());
  std::printf("summary: %s/summary.md, %s/summary.csv; paper layout: %s/table.md\n", dir.c_str(), dir.c_str(),
              dir.c_str());
  std::fflush(stdout);
}

}  // namespace

std::vector<PointResult> read_sweep_results(const std::string& path, const std::string& model_path,
                                            const std::string& output_dir, const std::string& only) {
  std::vector<SweepPoint> points = load_sweep_points(path, model_path, output_dir);
  std::vector<bool> sel = select_points(points, only);
  std::vector<PointResult> results;
  for (size_t i = 0; i < points.size(); ++i) {
    if (!sel[i]) continue;
    results.push_back(read_point_result(points[i], sweep_dir_of(points[i].config)));
  }
  write_tables(sweep_dir_of(points.front().config), results, /*print_summary=*/false);
  return results;
}

std::vector<PointResult> run_sweep(const std::string& path, const std::string& model_path,
                                   const std::string& output_dir, const std::string& only) {
  std::vector<SweepPoint> points = load_sweep_points(path, model_path, output_dir);
  std::vector<bool> sel = select_points(points, only);
  const size_t nsel = static_cast<size_t>(std::count(sel.begin(), sel.end(), true));
  const std::string dir = sweep_dir_of(points.front().config);
  for (size_t i = 0; i < points.size(); ++i)  // one clear error rather than one failed point each
    if (sel[i] && points[i].config.model.path.find("${") != std::string::npos)
      OMNIQ_FAIL("%s: point %s has model.path '%s': set that environment variable (e.g. OMNIQ_ZOO_DIR=/path/to/zoo)",
                 path.c_str(), points[i].name.c_str(), points[i].config.model.path.c_str());
  if (nsel == points.size())
    std::printf("sweep %s: %zu points -> %s\n", path.c_str(), points.size(), dir.c_str());
  else
    std::printf("sweep %s: %zu of %zu points match --only '%s' -> %s\n", path.c_str(), nsel, points.size(),
                only.c_str(), dir.c_str());
  std::vector<PointResult> results;
  size_t k = 0;
  for (size_t i = 0; i < points.size(); ++i) {
    if (!sel[i]) {  // not run; shown with whatever an earlier invocation left
      results.push_back(read_point_result(points[i], sweep_dir_of(points[i].config)));
      results.back().selected = false;
      continue;
    }
    std::printf("[%zu/%zu] ", ++k, nsel);
    results.push_back(run_point(points[i], sweep_dir_of(points[i].config)));
  }
  write_tables(dir, results, /*print_summary=*/true);
  return results;
}

std::string summary_csv(const std::vector<PointResult>& results) {
  Table t = summary_table(results);
  std::string out;
  auto line = [&](const std::vector<std::string>& cells) {
    for (size_t i = 0; i < cells.size(); ++i) out += (i ? "," : "") + csv_field(cells[i]);
    out += "\n";
  };
  line(t.header);
  for (const auto& r : t.rows) line(r);
  return out;
}

std::string summary_markdown(const std::vector<PointResult>& results) {
  Table t = summary_table(results);
  std::string out;
  auto line = [&](const std::vector<std::string>& cells) {
    out += "|";
    for (const std::string& c : cells) out += " " + c + " |";
    out += "\n";
  };
  line(t.header);
  out += "|";
  for (size_t i = 0; i < t.header.size(); ++i) out += i == 0 ? " --- |" : " ---: |";
  out += "\n";
  for (const auto& r : t.rows) line(r);
  return out;
}

}  // namespace omniq
