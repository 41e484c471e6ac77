// The paper-table sweep: `models:` (one file, several models, ${VAR} paths), a run's own `sweep:`,
// per-model values, experiments/configs/paper_tables.yaml itself, --only selection, the FP16
// baseline, and table.md rendered from tiny real runs of llama-nano on the CPU.
#include <filesystem>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>

#include "experiments/paper_table.h"
#include "experiments/runner.h"
#include "experiments/sweep.h"
#include "runtime/error.h"
#include "tests/error_test_util.h"
#include "tests/file_test_util.h"
#include "tests/support/test_support.h"

namespace omniq {
namespace {

using test::source_path;
using error_test::error_of;  // tests/error_test_util.h
// tests/file_test_util.h
using file_test::file_exists;
using file_test::slurp;
using file_test::spit;

void expect_error(const std::string& yaml, const std::vector<std::string>& parts) {
  std::string msg = error_of([&] { parse_sweep(yaml, "config.yaml"); });
  for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
}

const SweepPoint& point(const std::vector<SweepPoint>& pts, const std::string& name) {
  for (const SweepPoint& p : pts)
    if (p.name == name) return p;
  ADD_FAILURE() << "no point named " << name;
  static SweepPoint none;
  return none;
}

// ---- the config language ------------------------------------------------------------------------

TEST(SweepModels, ModelsRunGridsAndPerModelValues) {
  ::setenv("OMNIQ_TEST_ZOO", "/zoo", 1);
  const char* yaml = R"(name: t
models:
  a: "${OMNIQ_TEST_ZOO}/a"
  b: {model.path: /elsewhere/b, quantization.epochs: 7}
quantization: {method: omniquant, epochs: 20}
runs:
  - {name: W4, quantization.wbits: 4, sweep: {quantization.method: [rtn, gptq]}}
  - {name: W2, quantization.wbits: 2, quantization.aug_loss: {a: true}, quantization.epochs: {b: 40}}
)";
  std::vector<SweepPoint> pts = parse_sweep(yaml, "t.yaml");
  ASSERT_EQ(pts.size(), 6u);  // model-major: a (W4-rtn, W4-gptq, W2), then b
  const char* names[] = {"a-W4-rtn", "a-W4-gptq", "a-W2", "b-W4-rtn", "b-W4-gptq", "b-W2"};
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(pts[i].name, names[i]);
    EXPECT_EQ(pts[i].model, i < 3 ? "a" : "b");
    EXPECT_EQ(pts[i].config.model.path, i < 3 ? "/zoo/a" : "/elsewhere/b");
  }
  EXPECT_EQ(pts[1].config.quantization.method, "gptq");
  EXPECT_EQ(pts[1].config.quantization.wbits, 4);
  ASSERT_EQ(pts[1].settings.size(), 2u);  // the run's, then its grid's; not the model's
  EXPECT_EQ(pts[1].settings[1].first, "quantization.method");
  EXPECT_TRUE(pts[2].config.quantization.aug_loss);    // a: from the map
  EXPECT_EQ(pts[2].config.quantization.epochs, 20);    // a: the map leaves it at the base's
  EXPECT_FALSE(pts[5].config.quantization.aug_loss);   // b: left out of the map
  EXPECT_EQ(pts[5].config.quantization.epochs, 40);    // b: the run's map beats the model's 7
  EXPECT_EQ(pts[3].config.quantization.epochs, 7);     // b: the model's override
  ::unsetenv("OMNIQ_TEST_ZOO");
  // An unset variable stays in place (a table can be read back without it) and the runner refuses
  // the point naming the variable, before creating anything.
  std::vector<SweepPoint> unset = parse_sweep(yaml, "t.yaml");
  EXPECT_EQ(unset[0].config.model.path, "${OMNIQ_TEST_ZOO}/a");
  PointResult r = run_point(unset[0], "/tmp/omniq_sweep_paper_never");
  EXPECT_EQ(r.status, "failed");
  EXPECT_NE(r.error.find("OMNIQ_TEST_ZOO is not set"), std::string::npos) << r.error;
  EXPECT_FALSE(file_exists("/tmp/omniq_sweep_paper_never"));
}

TEST(SweepModels, ErrorsQuoteLineAndKey) {
  expect_error("model: {path: m}\nruns:\n  - {name: a, quantization.aug_loss: {x: true}}\n",
               {"quantization.aug_loss at config.yaml:3", "models: section"});
  expect_error("models: {p: /m, q: /n}\nruns:\n  - {name: a, quantization.aug_loss: {r: true}}\n",
               {"quantization.aug_loss at config.yaml:3", "'r'", "p, q"});
  expect_error("models: {p: /m}\nruns:\n  - {name: a, quantization.wbits: {p: three}}\n",
               {"quantization.wbits at config.yaml:3", "'three'"});
  expect_error("models:\n  p/q: /m\n", {"models at config.yaml:2", "'p/q'"});
  expect_error("models:\n  p: {model.pth: /m}\n", {"model.pth at config.yaml:2", "unknown setting"});
  expect_error("models:\n  p: [/m]\n", {"models.p at config.yaml:2", "model folder"});
  expect_error("models: {p: /m}\nsweep: {quantization.method: [rtn]}\nruns:\n  - {name: a, sweep: {quantization.method: [gptq]}}\n",
               {"quantization.method at config.yaml:4", "line 2"});
  expect_error("models: {p: /m}\nruns:\n  - {name: a, quantization.method: rtn, sweep: {quantization.method: [gptq]}}\n",
               {"quantization.method at config.yaml:3", "its own sweep"});
  // Each point is still validated: GPTQ at W4A4 is refused, naming the point.
  expect_error("models: {p: /m}\nruns:\n  - {name: a, quantization.abits: 4, sweep: {quantization.method: [rtn, gptq]}}\n",
               {"weights only", "p-a-gptq"});
}

TEST(SweepModels, PaperTablesConfigHasTheIssueTable) {
  ::setenv("OMNIQ_ZOO_DIR", "/fake/zoo", 1);
  std::vector<SweepPoint> pts = load_sweep(source_path("experiments/configs/paper_tables.yaml"));
  ::unsetenv("OMNIQ_ZOO_DIR");
  ASSERT_EQ(pts.size(), 50u);  // per model: FP16 + 5 settings x (RTN, GPTQ, AWQ, OmniQuant) + 2 x (SQ, OmniQuant)
  std::vector<std::string> expected{"FP16"};
  const char* wo[] = {"W4A16", "W4A16g128", "W3A16", "W3A16g128", "W2A16g128"};
  for (const char* s : wo)
    for (const char* m : {"rtn", "gptq", "awq"}) expected.push_back(std::string(s) + "-" + m);
  for (const char* s : wo) expected.push_back(std::string(s) + "-omniquant");
  for (const char* s : {"W6A6-smoothquant", "W4A4-smoothquant", "W6A6-omniquant", "W4A4-omniquant"}) expected.push_back(s);
  ASSERT_EQ(expected.size(), 25u);
  for (size_t i = 0; i < 50; ++i) {
    const std::string model = i < 25 ? "llama-small" : "opt-small";
    const SweepPoint& p = pts[i];
    EXPECT_EQ(p.name, model + "-" + expected[i % 25]);
    EXPECT_EQ(p.model, model);
    EXPECT_EQ(p.config.model.path, "/fake/zoo/" + model);
    const QuantConfig& q = p.config.quantization;
    EXPECT_EQ(q.nsamples, 128) << p.name;
    EXPECT_EQ(q.seqlen, 1024) << p.name;
    EXPECT_EQ(p.config.eval.seqlen, 1024);
    EXPECT_EQ(p.config.eval.dtype, "f32");
    EXPECT_EQ(p.config.data.eval_datasets, std::vector<std::string>{"wikitext2"});
    const std::string setting = expected[i % 25].substr(0, expected[i % 25].find('-'));
    if (setting != "FP16") EXPECT_EQ(q.setting_name(), setting) << p.name;
    if (q.method == "smoothquant") EXPECT_FLOAT_EQ(q.let_alpha, 0.5f) << p.name;
  }
  const std::string L = "llama-small-", O = "opt-small-";
  EXPECT_TRUE(is_unquantized(point(pts, L + "FP16").config.quantization));
  // LLaMA weight-only: LWC only, 20 epochs; W2: 40 epochs + aug_loss.
  const QuantConfig& l4 = point(pts, L + "W4A16-omniquant").config.quantization;
  EXPECT_TRUE(l4.method == "omniquant" && l4.lwc && !l4.let && !l4.aug_loss && l4.epochs == 20);
  const QuantConfig& l2 = point(pts, L + "W2A16g128-omniquant").config.quantization;
  EXPECT_TRUE(l2.lwc && !l2.let && l2.aug_loss && l2.epochs == 40 && l2.group_size == 128);
  // OPT weight-only: LWC + LET; W2: 40 epochs, no aug_loss.
  const QuantConfig& o3 = point(pts, O + "W3A16g128-omniquant").config.quantization;
  EXPECT_TRUE(o3.lwc && o3.let && !o3.aug_loss && o3.epochs == 20);
  const QuantConfig& o2 = point(pts, O + "W2A16g128-omniquant").config.quantization;
  EXPECT_TRUE(o2.lwc && o2.let && !o2.aug_loss && o2.epochs == 40);
  // The baselines do not claim OmniQuant's LET.
  EXPECT_FALSE(point(pts, O + "W3A16-gptq").config.quantization.let);
  EXPECT_EQ(point(pts, O + "W2A16g128-awq").config.quantization.method, "awq");
  // W6A6: LWC + LET, alpha 0.5; W4A4: alpha 0.75, aug_loss on LLaMA only.
  const QuantConfig& w6 = point(pts, O + "W6A6-omniquant").config.quantization;
  EXPECT_TRUE(w6.lwc && w6.let && !w6.aug_loss && w6.let_alpha == 0.5f);
  const QuantConfig& lw4 = point(pts, L + "W4A4-omniquant").config.quantization;
  EXPECT_TRUE(lw4.let && lw4.aug_loss && lw4.let_alpha == 0.75f && lw4.abits == 4);
  const QuantConfig& ow4 = point(pts, O + "W4A4-omniquant").config.quantization;
  EXPECT_TRUE(ow4.let && !ow4.aug_loss && ow4.let_alpha == 0.75f);
  // --model cannot replace the models of such a file.
  EXPECT_NE(error_of([] { load_sweep_points(source_path("experiments/configs/paper_tables.yaml"), "/m"); }).find("--only"),
            std::string::npos);
}

TEST(SweepModels, SeedVarianceConfigRepeatsThePaperRecipesOverFiveSeeds) {
  ::setenv("OMNIQ_ZOO_DIR", "/fake/zoo", 1);
  std::vector<SweepPoint> pts = load_sweep(source_path("experiments/configs/seed_variance.yaml"));
  ::unsetenv("OMNIQ_ZOO_DIR");
  ASSERT_EQ(pts.size(), 30u);  // 2 models x 3 settings x 5 seeds
  const std::string L = "llama-small-", O = "opt-small-";
  for (int seed = 2; seed <= 6; ++seed) {
    const std::string s = "-seed" + std::to_string(seed);
    const QuantConfig& l3 = point(pts, L + "W3A16" + s).config.quantization;
    EXPECT_TRUE(l3.lwc && !l3.let && !l3.aug_loss && l3.epochs == 20 && l3.seed == static_cast<uint64_t>(seed));
    const QuantConfig& l2 = point(pts, L + "W2A16g128" + s).config.quantization;
    EXPECT_TRUE(l2.aug_loss && !l2.let && l2.epochs == 40 && l2.group_size == 128 && l2.seed == static_cast<uint64_t>(seed));
    const QuantConfig& o3 = point(pts, O + "W3A16" + s).config.quantization;
    EXPECT_TRUE(o3.let && !o3.aug_loss && o3.seed == static_cast<uint64_t>(seed));
    const QuantConfig& w4 = point(pts, L + "W4A4" + s).config.quantization;
    EXPECT_TRUE(w4.let && w4.aug_loss && w4.let_alpha == 0.75f && w4.abits == 4);
    EXPECT_FALSE(point(pts, O + "W4A4" + s).config.quantization.aug_loss);
  }
}

TEST(SweepOnly, SelectsByRegexSearch) {
  EXPECT_TRUE(point_selected("opt-small-W4A16-rtn", ""));
  EXPECT_TRUE(point_selected("opt-small-W4A16-rtn", "opt-small"));
  EXPECT_FALSE(point_selected("llama-small-W4A16-rtn", "^opt-small-"));
  EXPECT_TRUE(point_selected("llama-small-W4A4-omniquant", "W4A4|W6A6"));
  EXPECT_FALSE(point_selected("llama-small-W4A16-omniquant", "W4A4|W6A6"));
  EXPECT_NE(error_of([] { point_selected("x", "(unclosed"); }).find("--only '(unclosed'"), std::string::npos);
}

// ---- tiny real runs: FP16 and RTN on llama-nano, the other points left out by --only ----------

TEST(SweepOnly, FillsThePaperTableOverSeveralInvocations) {
  char tmpl[] = "/tmp/omniq_sweep_paper_XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  spit(dir + "/calib.txt", slurp(source_path("data/text/wikitext2/wiki.valid.tokens")).substr(0, 8000));
  spit(dir + "/eval.txt", slurp(source_path("data/text/wikitext2-raw/wiki.test.raw")).substr(0, 4000));
  std::ostringstream y;
  y << "name: tiny\n"
    << "models: {nano: " << source_path("data/models/llama-nano") << "}\n"
    << "data: {calib_text: " << dir << "/calib.txt, eval_datasets: [], eval_texts: [" << dir << "/eval.txt]}\n"
    << "quantization: {method: omniquant, epochs: 1, nsamples: 2, seqlen: 64, seed: 3}\n"
    << "eval: {seqlen: 64}\ndevice: cpu\noutput: {dir: " << dir << "/runs}\n"
    << "runs:\n"
    << "  - {name: FP16, quantization.wbits: 16, quantization.abits: 16}\n"
    << "  - {name: W4A16, quantization.wbits: 4, sweep: {quantization.method: [rtn, omniquant]}}\n"
    << "  - {name: W4A4-smoothquant, quantization.method: smoothquant, quantization.wbits: 4, quantization.abits: 4}\n";
  const std::string file = dir + "/tiny.yaml";
  spit(file, y.str());
  const std::string sweep_dir = dir + "/runs/tiny";

  EXPECT_NE(error_of([&] { run_sweep(file, "", "", "nothing-matches"); }).find("nano-W4A16-rtn"), std::string::npos);

  std::vector<PointResult> r = run_sweep(file, "", "", "FP16|-rtn$");
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(r[0].name, "nano-FP16");
  EXPECT_EQ(r[0].status, "complete") << r[0].error;
  EXPECT_EQ(r[1].name, "nano-W4A16-rtn");
  EXPECT_EQ(r[1].status, "complete") << r[1].error;
  for (int i : {2, 3}) {  // not selected: not run, shown as missing
    EXPECT_FALSE(r[i].selected) << r[i].name;
    EXPECT_EQ(r[i].status, "missing");
    EXPECT_FALSE(file_exists(sweep_dir + "/" + r[i].name));
  }
  // FP16 evaluates the original checkpoint: no blocks, no exported model, a finite ppl.
  EXPECT_EQ(r[0].calib_seconds, 0.0);
  EXPECT_FALSE(file_exists(sweep_dir + "/nano-FP16/model"));
  ASSERT_EQ(r[0].ppl.size(), 1u);
  ASSERT_TRUE(std::isfinite(r[0].ppl[0].second) && std::isfinite(r[1].ppl[0].second));
  EXPECT_NE(r[0].ppl[0].second, r[1].ppl[0].second);  // RTN changed the model
  EXPECT_GT(r[1].calib_seconds, 0.0);

  // table.md: per model, methods x settings; missing cells are "—", and listed.
  const std::string table = slurp(sweep_dir + "/table.md");
  const std::string fp = strformat("%.2f", r[0].ppl[0].second), rtn = strformat("%.2f", r[1].ppl[0].second);
  EXPECT_NE(table.find("## nano"), std::string::npos) << table;
  EXPECT_NE(table.find("| Method | W4A16 |"), std::string::npos) << table;
  EXPECT_NE(table.find("| FP16 | " + fp + " |"), std::string::npos) << table;
  EXPECT_NE(table.find("| RTN | " + rtn + " |"), std::string::npos) << table;
  EXPECT_NE(table.find("| OmniQuant | — |"), std::string::npos) << table;
  EXPECT_NE(table.find("| Method | W4A4 |"), std::string::npos) << table;
  EXPECT_NE(table.find("| SmoothQuant | — |"), std::string::npos) << table;
  EXPECT_NE(table.find("| FP16 | " + fp + " |\n| SmoothQuant"), std::string::npos) << table;
  EXPECT_NE(table.find("| RTN | " + strformat("%.1f", r[1].calib_seconds) + " |"), std::string::npos) << table;
  EXPECT_NE(table.find("Not run yet (2): nano-W4A16-omniquant, nano-W4A4-smoothquant"), std::string::npos) << table;
  EXPECT_NE(slurp(sweep_dir + "/summary.md").find("| nano-W4A16-omniquant | nano |"), std::string::npos);

  // A second invocation skips what is complete; --table reads the same numbers back.
  std::vector<PointResult> again = run_sweep(file, "", "", "FP16");
  EXPECT_TRUE(again[0].skipped);
  EXPECT_EQ(again[1].ppl[0].second, r[1].ppl[0].second);  // unselected but complete: read from run.h5
  std::vector<PointResult> read = read_sweep_results(file);
  ASSERT_EQ(read.size(), 4u);
  EXPECT_EQ(read[1].status, "complete");
  EXPECT_EQ(read[1].ppl[0].second, r[1].ppl[0].second);
  EXPECT_EQ(paper_tables_markdown(read), table);

  // The CLI: --table runs nothing (value options such as --out take the next argument).
  std::string exe(4096, '\0');
  exe.resize(static_cast<size_t>(std::max<ssize_t>(0, ::readlink("/proc/self/exe", exe.data(), exe.size() - 1))));
  const std::string omniq = exe.substr(0, exe.rfind("/tests/")) + "/omniq";
  if (file_exists(omniq)) {
    std::remove((sweep_dir + "/table.md").c_str());
    std::string cmd = omniq + " sweep " + file + " --out " + dir + "/runs --table > " + dir + "/cli.txt 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << slurp(dir + "/cli.txt");
    EXPECT_EQ(slurp(sweep_dir + "/table.md"), table);
    EXPECT_NE(slurp(dir + "/cli.txt").find("| RTN | " + rtn), std::string::npos) << slurp(dir + "/cli.txt");
  }
  if (!std::getenv("OMNIQ_KEEP_TEST_DIRS")) {
    std::error_code ec;  // best effort: a leftover temp dir is not a test failure
    std::filesystem::remove_all(dir, ec);
  }
}

}  // namespace
}  // namespace omniq
