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
  std::vector<std::string> columns;                                       // settings
  std::vector<std::string> rows;                                          // method display names
  std::map<std::pair<std::string, std::string>, const PointResult*> cell;  // (row, column) -> point
};

std::string render(const Grid& g, bool with_fp, const std::function<std::string(const PointResult&)>& text,
                   const PointResult* fp) {
  std::string out = "| Method |";
  for (const std::string& c : g.columns) out += " " + c + " |";
  out += "\n| --- |";
  for (size_t i = 0; i < g.columns.size(); ++i) out += " ---: |";
  out += "\n";
  if (with_fp) {
    out += "| FP16 |";
    for (size_t i = 0; i < g.columns.size(); ++i) out += " " + (complete(fp) ? text(*fp) : std::string(kEmpty)) + " |";
    out += "\n";
  }
  for (const std::string& row : g.rows) {
    out += "| " + row + " |";
    for (const std::string& c : g.columns) {
      auto it = g.cell.find({row, c});
      out += " " + (it != g.cell.end() && complete(it->second) ? text(*it->second) : std::string(kEmpty)) + " |";
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
      auto [it, fresh] = g.cell.emplace(std::make_pair(row, col), r);
      if (!fresh) {  // two points for one cell (a sweep beyond the paper's): say which one is shown
        const PointResult* shown = !complete(it->second) && complete(r) ? r : it->second;
        const PointResult* other = shown == r ? it->second : r;
        it->second = shown;
        notes.push_back(strformat("%s and %s are both %s at %s%s: the table shows %s", shown->name.c_str(),
                                  other->name.c_str(), row.c_str(), col.c_str(),
                                  model.empty() ? "" : (" on " + model).c_str(), shown->name.c_str()));
      }
    }
    for (Grid* g : {&wo, &wa})
      std::stable_sort(g->rows.begin(), g->rows.end(),
                       [](const std::string& a, const std::string& b) { return method_rank(a) < method_rank(b); });

    auto ppl_text = [&](const PointResult& r) {
      double p = ppl_of(r, label);
      return std::isfinite(p) ? strformat("%.2f", p) : std::string(kEmpty);
    };
    auto sec_text = [](const PointResult& r) { return strformat("%.1f", r.calib_seconds); };
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
      out += "FP16: " + what + " " + (complete(fp) ? ppl_text(*fp) : std::string(kEmpty)) + "\n\n";
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
