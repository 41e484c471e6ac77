#include "experiments/paper_table.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>

#include "runtime/error.h"

namespace omniq {

namespace {

const char* const kEmpty = "—";

// Row order of the paper: the reference, then the baselines in order of sophistication.
int method_rank(const std::string& display) {
  static const char* const order[] = {"FP16", "RTN", "GPTQ", "AWQ", "SmoothQuant", "OmniQuant"};
  for (int i = 0; i < 6; ++i)
    if (display == order[i]) return i;
  return 6;  // unknown methods after, in sweep order (stable sort)
}

std::string dataset_title(const std::string& label) {
  if (label == "wikitext2") return "WikiText-2";
  return label.substr(label.rfind('/') + 1);
}

double ppl_of(const PointResult& r, const std::string& label) {
  for (const auto& [l, p] : r.ppl)
    if (l == label) return p;
  return std::nan("");
}

bool complete(const PointResult* r) { return r && r->status == "complete"; }

struct Grid {
  std::vector<std::string> columns;  // settings
  std::vector<std::string> rows;     // method display names
  // (row, column) -> the points of that cell: one, or several differing only in the seed (their
  // mean ± sd is shown), or several differing otherwise (one is shown, a note says which).
  std::map<std::pair<std::string, std::string>, std::vector<const PointResult*>> cell;
};

// Same quantization except for the calibration seed.
bool same_but_seed(const PointResult& a, const PointResult& b) {
  QuantConfig qa = a.qc, qb = b.qc;
  qa.seed = qb.seed = 0;
  return a.model == b.model && qa.to_json() == qb.to_json();
}

// The complete points of a cell whose points are seed repeats (empty when they are not).
std::vector<const PointResult*> seed_repeats(const std::vector<const PointResult*>& pts) {
  if (pts.size() < 2) return {};
  for (const PointResult* p : pts)
    if (!same_but_seed(*p, *pts.front())) return {};
  std::vector<const PointResult*> done;
  for (const PointResult* p : pts)
    if (p->status == "complete") done.push_back(p);
  return done;
}

// "mean ± sd" of f over the points (sample sd); the single value for one point.
std::string mean_sd(const std::vector<const PointResult*>& pts, const std::function<double(const PointResult&)>& f,
                    const char* fmt) {
  double sum = 0;
  int n = 0;
  for (const PointResult* p : pts) {
    if (!std::isfinite(f(*p))) continue;
    sum += f(*p);
    ++n;
  }
  if (n == 0) return kEmpty;
  const double mean = sum / n;
  if (n == 1) return strformat(fmt, mean);
  double ss = 0;
  for (const PointResult* p : pts)
    if (std::isfinite(f(*p))) ss += (f(*p) - mean) * (f(*p) - mean);
  return strformat(fmt, mean) + " ± " + strformat(fmt, std::sqrt(ss / (n - 1)));
}

// text(points): the cell's text from its complete points (one, or the seed repeats).
std::string render(const Grid& g, bool with_fp,
                   const std::function<std::string(const std::vector<const PointResult*>&)>& text,
                   const PointResult* fp) {
  std::string out = "| Method |";
  for (const std::string& c : g.columns) out += " " + c + " |";
  out += "\n| --- |";
  for (size_t i = 0; i < g.columns.size(); ++i) out += " ---: |";
  out += "\n";
  if (with_fp) {
    out += "| FP16 |";
    for (size_t i = 0; i < g.columns.size(); ++i) out += " " + (complete(fp) ? text({fp}) : std::string(kEmpty)) + " |";
    out += "\n";
  }
  for (const std::string& row : g.rows) {
    out += "| " + row + " |";
    for (const std::string& c : g.columns) {
      auto it = g.cell.find({row, c});
      std::vector<const PointResult*> shown;
      if (it != g.cell.end()) {
        shown = seed_repeats(it->second);
        if (shown.empty() && complete(it->second.front())) shown = {it->second.front()};
      }
      out += " " + (shown.empty() ? std::string(kEmpty) : text(shown)) + " |";
    }
    out += "\n";
  }
  return out;
}

}  // namespace

std::string method_display_name(const QuantConfig& qc) {
  if (is_unquantized(qc)) return "FP16";
  static const std::map<std::string, std::string> names = {
      {"rtn", "RTN"}, {"gptq", "GPTQ"}, {"awq", "AWQ"}, {"smoothquant", "SmoothQuant"}, {"omniquant", "OmniQuant"}};
  auto it = names.find(qc.method);
  return it == names.end() ? qc.method : it->second;
}

std::string paper_tables_markdown(const std::vector<PointResult>& results) {
  std::vector<std::string> models;
  for (const PointResult& r : results)
    if (std::find(models.begin(), models.end(), r.model) == models.end()) models.push_back(r.model);

  std::string out;
  std::vector<std::string> notes;  // shared cells
  for (const std::string& model : models) {
    std::vector<const PointResult*> pts;
    for (const PointResult& r : results)
      if (r.model == model) pts.push_back(&r);
    std::string label;  // the first evaluation dataset of the model's points
    for (const PointResult* r : pts)
      if (label.empty() && !r->ppl.empty()) label = r->ppl.front().first;

    const PointResult* fp = nullptr;
    Grid wo, wa;  // weight-only, weight-activation
    for (const PointResult* r : pts) {
      if (is_unquantized(r->qc)) {
        if (!complete(fp)) fp = r;  // a complete one wins over a missing one
        continue;
      }
      Grid& g = r->qc.act_quant() ? wa : wo;
      const std::string col = r->qc.setting_name(), row = method_display_name(r->qc);
      if (std::find(g.columns.begin(), g.columns.end(), col) == g.columns.end()) g.columns.push_back(col);
      if (std::find(g.rows.begin(), g.rows.end(), row) == g.rows.end()) g.rows.push_back(row);
      g.cell[{row, col}].push_back(r);
    }
    // Cells with several points: seed repeats are averaged; otherwise one is shown (a complete one
    // first) and a note says which.
    const std::string on = model.empty() ? "" : " on " + model;
    for (Grid* g : {&wo, &wa})
      for (auto& [key, v] : g->cell) {
        if (v.size() < 2) continue;
        const std::vector<const PointResult*> reps = seed_repeats(v);
        if (std::all_of(v.begin(), v.end(), [&](const PointResult* p) { return same_but_seed(*p, *v.front()); })) {
          std::string seeds;
          for (size_t i = 0; i < reps.size(); ++i) seeds += (i ? ", " : "") + std::to_string(reps[i]->qc.seed);
          if (reps.size() >= 2)
            notes.push_back(strformat("%s at %s%s: mean ± sample standard deviation over %zu seeds (%s)",
                                      key.first.c_str(), key.second.c_str(), on.c_str(), reps.size(), seeds.c_str()));
          continue;
        }
        std::stable_partition(v.begin(), v.end(), [](const PointResult* p) { return complete(p); });
        std::string others;
        for (size_t i = 1; i < v.size(); ++i) others += (i > 1 ? ", " : "") + v[i]->name;
        notes.push_back(strformat("%s and %s are all %s at %s%s: the table shows %s", v.front()->name.c_str(),
                                  others.c_str(), key.first.c_str(), key.second.c_str(), on.c_str(),
                                  v.front()->name.c_str()));
      }
    for (Grid* g : {&wo, &wa})
      std::stable_sort(g->rows.begin(), g->rows.end(),
                       [](const std::string& a, const std::string& b) { return method_rank(a) < method_rank(b); });

    auto ppl_text = [&](const std::vector<const PointResult*>& v) {
      return mean_sd(v, [&](const PointResult& r) { return ppl_of(r, label); }, "%.2f");
    };
    auto sec_text = [](const std::vector<const PointResult*>& v) {
      return mean_sd(v, [](const PointResult& r) { return r.calib_seconds; }, "%.1f");
    };
    const std::string what = dataset_title(label.empty() ? "wikitext2" : label) + " perplexity";
    out += "## " + (model.empty() ? std::string("Results") : model) + "\n\n";
    if (!wo.columns.empty()) {
      out += "Weight-only quantization: " + what + " (lower is better)\n\n" + render(wo, fp != nullptr, ppl_text, fp);
      out += "\nWeight-only quantization: calibration time (seconds)\n\n" + render(wo, false, sec_text, nullptr) + "\n";
    }
    if (!wa.columns.empty()) {
      out += "Weight-activation quantization: " + what + " (lower is better)\n\n" + render(wa, fp != nullptr, ppl_text, fp);
      out += "\nWeight-activation quantization: calibration time (seconds)\n\n" + render(wa, false, sec_text, nullptr) + "\n";
    }
    if (wo.columns.empty() && wa.columns.empty() && fp)
      out += "FP16: " + what + " " + (complete(fp) ? ppl_text({fp}) : std::string(kEmpty)) + "\n\n";
  }

  // What the "—" cells stand for.
  std::vector<std::string> missing, failed;
  for (const PointResult& r : results) {
    if (r.status == "complete") continue;
    if (r.status == "failed")
      failed.push_back("- " + r.name + ": " + r.error);
    else
      missing.push_back(r.name + (r.status == "missing" ? "" : " (" + r.status + ")"));
  }
  if (!missing.empty()) {
    out += "Not run yet (" + std::to_string(missing.size()) + "): ";
    for (size_t i = 0; i < missing.size(); ++i) out += (i ? ", " : "") + missing[i];
    out += "\n\n";
  }
  if (!failed.empty()) {
    out += "Failed:\n";
    for (const std::string& f : failed) out += f + "\n";
    out += "\n";
  }
  for (const std::string& n : notes) out += "Note: " + n + "\n";
  return out;
}

}  // namespace omniq
