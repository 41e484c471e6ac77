// The experiment runner end to end on the CPU with llama-nano and tiny budgets: run.h5 contents
// read back with the HDF5 C API, sweep summaries, skipping of finished points, a failed point that
// does not stop the sweep, and a run killed with SIGKILL mid-calibration that resumes to the
// bit-identical result of an uninterrupted run.
#include <filesystem>
#include <gtest/gtest.h>
#include <hdf5.h>
#include <signal.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "experiments/h5_log.h"
#include "experiments/runner.h"
#include "experiments/sweep.h"
#include "models/safetensors.h"
#include "tests/file_test_util.h"
#include "tests/support/test_support.h"

namespace omniq {
namespace {

using test::source_path;
// tests/file_test_util.h
using file_test::file_exists;
using file_test::slurp;
using file_test::spit;

// A fresh temporary folder per test, with small calibration and evaluation texts cut from the
// bundled WikiText-2 files (tokenizing the whole files would dominate the test time).
struct TempRun {
  std::string dir;
  TempRun() {
    char tmpl[] = "/tmp/omniq_runner_XXXXXX";
    dir = ::mkdtemp(tmpl);
    spit(dir + "/calib.txt", slurp(source_path("data/text/wikitext2/wiki.valid.tokens")).substr(0, 20000));
    spit(dir + "/eval.txt", slurp(source_path("data/text/wikitext2-raw/wiki.test.raw")).substr(0, 6000));
  }
  ~TempRun() {
    if (!std::getenv("OMNIQ_KEEP_TEST_DIRS")) {
      std::error_code ec;  // best effort: a leftover temp dir is not a test failure
      std::filesystem::remove_all(dir, ec);
    }
  }
  // The base config (YAML) of every test: 4 windows x 64 tokens, eval on eval.txt with seqlen 64.
  std::string base(const std::string& name, const std::string& out, int epochs, const std::string& method = "omniquant") const {
    std::ostringstream y;
    y << "name: " << name << "\n"
      << "model: {path: " << source_path("data/models/llama-nano") << "}\n"
      << "data: {calib_text: " << dir << "/calib.txt, eval_datasets: [], eval_texts: [" << dir << "/eval.txt]}\n"
      << "quantization: {method: " << method << ", wbits: 3, group_size: 0, lwc: true, epochs: " << epochs
      << ", nsamples: 4, seqlen: 64, seed: 3}\n"
      << "eval: {seqlen: 64}\n"
      << "device: cpu\n"
      << "output: {dir: " << out << "}\n";
    return y.str();
  }
};

// ---- reading run.h5 with the plain HDF5 C API (what any other tool sees) --------------------

std::string h5_attr_string(hid_t obj, const char* name) {
  hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
  if (a < 0) return "<missing>";
  hid_t t = H5Tcopy(H5T_C_S1);
  H5Tset_size(t, H5T_VARIABLE);
  // Read in the character set the file stores (omniq writes UTF-8; HDF5 will not convert charsets).
  hid_t ft = H5Aget_type(a);
  H5Tset_cset(t, H5Tget_cset(ft));
  H5Tclose(ft);
  char* p = nullptr;
  std::string s = H5Aread(a, t, &p) >= 0 && p ? p : "<unreadable>";
  if (p) H5free_memory(p);
  H5Tclose(t);
  H5Aclose(a);
  return s;
}

double h5_attr_double(hid_t obj, const char* name) {
  double v = NAN;
  hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
  if (a < 0) return NAN;
  H5Aread(a, H5T_NATIVE_DOUBLE, &v);
  H5Aclose(a);
  return v;
}

template <typename T>
std::vector<T> h5_dataset(hid_t loc, const std::string& name, hid_t mem_type) {
  hid_t d = H5Dopen2(loc, name.c_str(), H5P_DEFAULT);
  if (d < 0) return {};
  hid_t s = H5Dget_space(d);
  std::vector<T> v(static_cast<size_t>(H5Sget_simple_extent_npoints(s)));
  if (!v.empty()) H5Dread(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
  H5Sclose(s);
  H5Dclose(d);
  return v;
}

std::string h5_status(const std::string& path) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) return "<unopenable>";
  std::string s = h5_attr_string(f, "status");
  H5Fclose(f);
  return s;
}

std::vector<float> learned(const std::string& state_dir, int64_t block, const std::string& name) {
  SafetensorsFile f(state_dir + "/" + block_group_name(block) + ".safetensors");
  return f.read("learned." + name).to(DType::f32).to_f32_vector();
}

// ---- the omniq binary (for the SIGKILL test): <build>/tests/test_runner -> <build>/omniq ----

std::string omniq_binary() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return "";
  std::string p(buf, static_cast<size_t>(n));
  p = p.substr(0, p.rfind('/'));  // <build>/tests
  p = p.substr(0, p.rfind('/'));  // <build>
  return p + "/omniq";
}

pid_t spawn_omniq(const std::vector<std::string>& args, const std::string& log) {
  pid_t pid = ::fork();
  if (pid == 0) {
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    ::setenv("OMNIQ_NO_PROGRESS", "1", 1);
    std::string bin = omniq_binary();
    std::vector<char*> argv{const_cast<char*>(bin.c_str())};
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(bin.c_str(), argv.data());
    ::_exit(127);
  }
  return pid;
}

int wait_exit(pid_t pid) {
  int st = 0;
  ::waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
}

// ---- tests -----------------------------------------------------------------------------------

TEST(Runner, RunPointWritesTheDocumentedHdf5Layout) {
  TempRun t;
  std::vector<SweepPoint> pts = parse_sweep(t.base("one", t.dir + "/runs", 1), "one.yaml");
  ASSERT_EQ(pts.size(), 1u);
  PointResult r = run_point(pts[0], t.dir + "/runs");
  ASSERT_EQ(r.status, "complete") << r.error;
  const std::string run = t.dir + "/runs/one";
  EXPECT_TRUE(file_exists(run + "/config.yaml"));
  EXPECT_TRUE(file_exists(run + "/model/config.json"));
  EXPECT_EQ(parse_experiment(slurp(run + "/config.yaml"), "config.yaml"), pts[0].config);

  hid_t f = H5Fopen((run + "/run.h5").c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  EXPECT_EQ(h5_attr_string(f, "status"), "complete");
  EXPECT_EQ(parse_experiment(h5_attr_string(f, "config_yaml"), "run.h5"), pts[0].config);
  EXPECT_EQ(h5_attr_double(f, "quantization.wbits"), 3.0);
  EXPECT_EQ(h5_attr_double(f, "quantization.nsamples"), 4.0);
  EXPECT_EQ(h5_attr_string(f, "quantization.method"), "omniquant");
  EXPECT_NE(h5_attr_string(f, "device_name"), "<missing>");
  EXPECT_EQ(h5_attr_string(f, "device"), "cpu");
  EXPECT_NE(h5_attr_string(f, "omniq_commit"), "<missing>");
  EXPECT_EQ(h5_attr_double(f, "deterministic"), 1.0);  // the default attention backward
  EXPECT_EQ(H5Aexists(f, "error"), 0);

  // per block: epoch losses, metrics, learned parameters equal to the state file's
  for (int64_t b = 0; b < 4; ++b) {
    std::string g = "/blocks/" + block_group_name(b);
    hid_t grp = H5Gopen2(f, g.c_str(), H5P_DEFAULT);
    ASSERT_GE(grp, 0) << g;
    EXPECT_EQ(h5_dataset<double>(grp, "epoch_loss", H5T_NATIVE_DOUBLE).size(), 1u);
    double loss = h5_attr_double(grp, "final_loss");
    EXPECT_TRUE(std::isfinite(loss) && loss > 0) << loss;
    EXPECT_GE(h5_attr_double(grp, "seconds"), 0.0);
    EXPECT_GT(h5_attr_double(grp, "peak_bytes"), 0.0);
    EXPECT_EQ(h5_attr_double(grp, "resumed"), 0.0);
    std::vector<float> gamma = h5_dataset<float>(grp, "params/q_proj.lwc_gamma", H5T_NATIVE_FLOAT);
    EXPECT_EQ(gamma, learned(run + "/model.state", b, "q_proj.lwc_gamma")) << g;
    EXPECT_FALSE(gamma.empty());
    H5Gclose(grp);
  }
  // flat summary columns, one row per block
  EXPECT_EQ(h5_dataset<int64_t>(f, "/summary/block", H5T_NATIVE_INT64), (std::vector<int64_t>{0, 1, 2, 3}));
  std::vector<double> summary_loss = h5_dataset<double>(f, "/summary/final_loss", H5T_NATIVE_DOUBLE);
  ASSERT_EQ(summary_loss.size(), 4u);
  EXPECT_EQ(summary_loss[3], r.final_loss);
  EXPECT_EQ(h5_dataset<double>(f, "/summary/seconds", H5T_NATIVE_DOUBLE).size(), 4u);
  EXPECT_EQ(h5_dataset<int64_t>(f, "/summary/peak_bytes", H5T_NATIVE_INT64).size(), 4u);
  // evaluation
  std::string eval_group = "/eval/" + h5_safe_name(t.dir + "/eval.txt");
  hid_t ev = H5Gopen2(f, eval_group.c_str(), H5P_DEFAULT);
  ASSERT_GE(ev, 0) << eval_group;
  double ppl = h5_attr_double(ev, "ppl");
  EXPECT_TRUE(std::isfinite(ppl) && ppl > 1) << ppl;
  ASSERT_EQ(r.ppl.size(), 1u);
  EXPECT_EQ(r.ppl[0].second, ppl);
  EXPECT_NEAR(std::exp(h5_attr_double(ev, "nll")), ppl, 1e-9 * ppl);
  EXPECT_GT(h5_attr_double(ev, "tokens"), 0.0);
  H5Gclose(ev);
  H5Fclose(f);
}

TEST(Runner, SweepWritesSummarySkipsFinishedPointsAndSurvivesAFailure) {
  TempRun t;
  std::string yaml = t.base("two", t.dir + "/runs", 1) +
                     "runs:\n"
                     "  - {name: rtn, quantization.method: rtn}\n"
                     "  - {name: omni, quantization.method: omniquant}\n"
                     "  - {name: broken, quantization.method: rtn, data.eval_texts: [" + t.dir + "/missing.txt]}\n";
  spit(t.dir + "/sweep.yaml", yaml);
  std::vector<PointResult> first = run_sweep(t.dir + "/sweep.yaml");
  ASSERT_EQ(first.size(), 3u);
  EXPECT_EQ(first[0].status, "complete") << first[0].error;
  EXPECT_EQ(first[1].status, "complete") << first[1].error;
  EXPECT_EQ(first[2].status, "failed");
  EXPECT_NE(first[2].error.find("missing.txt"), std::string::npos) << first[2].error;
  // the failed point's file says so, with the error; it never claims completion
  EXPECT_EQ(h5_status(t.dir + "/runs/two/broken/run.h5"), "failed");
  {
    hid_t f = H5Fopen((t.dir + "/runs/two/broken/run.h5").c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    EXPECT_NE(h5_attr_string(f, "error").find("missing.txt"), std::string::npos);
    H5Fclose(f);
  }

  std::string csv = slurp(t.dir + "/runs/two/summary.csv");
  std::istringstream lines(csv);
  std::vector<std::string> rows;
  for (std::string l; std::getline(lines, l);) rows.push_back(l);
  ASSERT_EQ(rows.size(), 4u) << csv;  // header + 3 points
  EXPECT_EQ(rows[0].rfind("name,", 0), 0u) << rows[0];
  EXPECT_NE(rows[0].find("ppl "), std::string::npos) << rows[0];
  EXPECT_EQ(rows[1].rfind("rtn,", 0), 0u) << rows[1];
  EXPECT_NE(rows[2].find(",complete"), std::string::npos) << rows[2];
  EXPECT_NE(rows[3].find(",failed"), std::string::npos) << rows[3];
  EXPECT_TRUE(file_exists(t.dir + "/runs/two/summary.md"));

  // rerun: the complete points are skipped with the same numbers
  std::vector<PointResult> again = run_sweep(t.dir + "/sweep.yaml");
  ASSERT_EQ(again.size(), 3u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_TRUE(again[i].skipped) << again[i].name;
    ASSERT_EQ(again[i].ppl.size(), 1u);
    EXPECT_EQ(again[i].ppl[0].second, first[i].ppl[0].second);
    EXPECT_EQ(again[i].final_loss, first[i].final_loss);
  }
  EXPECT_FALSE(again[2].skipped);
  EXPECT_EQ(again[2].status, "failed");
}

TEST(RunLog, ReopenKeepsFinishedBlocksAndRewritesRedoneOnes) {
  TempRun t;
  const std::string path = t.dir + "/run.h5";
  auto report = [](int64_t b, double loss) {
    BlockReport r;
    r.block = b;
    r.final_loss = loss;
    r.epoch_loss = {2 * loss, loss};
    r.seconds = 1.5;
    r.peak_bytes = 1024;
    r.train_steps = 256 * b;
    r.graph_steps = 255 * b;
    return r;
  };
  std::vector<std::pair<std::string, Tensor>> params;
  params.emplace_back("q_proj.lwc_gamma", Tensor::from_f32({1.f, 2.f, 3.f, 4.f, 5.f, 6.f}, {2, 3}));
  {
    RunLog log(path);
    log.set_status("running");
    log.write_block(report(0, 0.1), params);
    log.write_block(report(1, 0.2), params);
    log.write_eval("wikitext2", EvalRecord{"x", 10.0, std::log(10.0), 1.0, 100, 2, 64});
    log.set_status("complete");
  }
  {
    RunLog log(path);  // a rerun of the same point
    EXPECT_TRUE(log.has_block(0));
    EXPECT_TRUE(log.has_block(1));
    EXPECT_FALSE(log.has_block(2));
    log.set_status("running");  // drops the old evaluation: it no longer describes the file
    log.write_block(report(1, 0.25), {});
    log.write_block(report(2, 0.3), params);
  }
  RunRecord rec = read_run_log(path);
  EXPECT_EQ(rec.status, "running");
  EXPECT_TRUE(rec.evals.empty());
  ASSERT_EQ(rec.blocks.size(), 3u);
  EXPECT_EQ(rec.blocks.at(0).final_loss, 0.1);
  EXPECT_EQ(rec.blocks.at(1).final_loss, 0.25);
  EXPECT_EQ(rec.blocks.at(2).epoch_loss, (std::vector<double>{0.6, 0.3}));
  EXPECT_EQ(rec.blocks.at(2).train_steps, 512);
  EXPECT_EQ(rec.blocks.at(2).graph_steps, 510);
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  EXPECT_EQ(h5_dataset<double>(f, "/summary/final_loss", H5T_NATIVE_DOUBLE), (std::vector<double>{0.1, 0.25, 0.3}));
  // a 2-D parameter keeps its shape
  hid_t d = H5Dopen2(f, "/blocks/block_002/params/q_proj.lwc_gamma", H5P_DEFAULT);
  ASSERT_GE(d, 0);
  hid_t sp = H5Dget_space(d);
  hsize_t dims[2] = {0, 0};
  EXPECT_EQ(H5Sget_simple_extent_dims(sp, dims, nullptr), 2);
  EXPECT_EQ(dims[0], 2u);
  EXPECT_EQ(dims[1], 3u);
  H5Sclose(sp);
  H5Dclose(d);
  // block 1 was redone without parameters: the old ones are gone with the old record
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  EXPECT_LE(H5Lexists(f, "/blocks/block_001/params/q_proj.lwc_gamma", H5P_DEFAULT), 0);
  H5Fclose(f);
}

TEST(RunLog, AnUnreadableFileIsMovedAsideNotTrusted) {
  TempRun t;
  const std::string path = t.dir + "/run.h5";
  spit(path, "this is not an HDF5 file");
  EXPECT_EQ(read_run_log(path).status, "");
  {
    RunLog log(path);
    log.set_status("running");
  }
  EXPECT_EQ(h5_status(path), "running");
  EXPECT_EQ(slurp(path + ".corrupt"), "this is not an HDF5 file");
}

TEST(Runner, RunCommandRefusesASweepFile) {
  TempRun t;
  ASSERT_TRUE(file_exists(omniq_binary()));
  spit(t.dir + "/s.yaml", t.base("s", t.dir + "/runs", 1) + "sweep:\n  quantization.wbits: [3, 4]\n");
  EXPECT_EQ(wait_exit(spawn_omniq({"run", t.dir + "/s.yaml"}, t.dir + "/s.log")), 1);
  EXPECT_NE(slurp(t.dir + "/s.log").find("omniq sweep"), std::string::npos) << slurp(t.dir + "/s.log");
  EXPECT_FALSE(file_exists(t.dir + "/runs"));
}

TEST(Runner, SigkilledRunResumesToTheUninterruptedResult) {
  TempRun t;
  const std::string bin = omniq_binary();
  ASSERT_TRUE(file_exists(bin)) << "build the omniq binary first (expected at " << bin << ")";
  // Enough epochs that one block takes on the order of a second, so the kill lands mid-block.
  const int epochs = 12;
  spit(t.dir + "/a.yaml", t.base("k", t.dir + "/a", epochs));
  spit(t.dir + "/b.yaml", t.base("k", t.dir + "/b", epochs));

  ASSERT_EQ(wait_exit(spawn_omniq({"run", t.dir + "/a.yaml"}, t.dir + "/a.log")), 0) << slurp(t.dir + "/a.log");

  const std::string run_b = t.dir + "/b/k";
  pid_t pid = spawn_omniq({"run", t.dir + "/b.yaml"}, t.dir + "/b.log");
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!file_exists(run_b + "/model.state/block_001.safetensors") &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ::kill(pid, SIGKILL);
  EXPECT_EQ(wait_exit(pid), -SIGKILL) << slurp(t.dir + "/b.log");
  ASSERT_TRUE(file_exists(run_b + "/model.state/block_001.safetensors"));
  // The kill must have landed inside calibration, or the test proves nothing.
  ASSERT_FALSE(file_exists(run_b + "/model.state/block_003.safetensors")) << "the run finished before the kill";
  EXPECT_NE(h5_status(run_b + "/run.h5"), "complete");

  ASSERT_EQ(wait_exit(spawn_omniq({"run", t.dir + "/b.yaml"}, t.dir + "/b.log")), 0) << slurp(t.dir + "/b.log");
  std::string log = slurp(t.dir + "/b.log");
  EXPECT_NE(log.find("(resumed)"), std::string::npos) << log;
  EXPECT_EQ(h5_status(run_b + "/run.h5"), "complete");

  // bit-identical learned parameters, block by block, tensor by tensor
  for (int64_t b = 0; b < 4; ++b) {
    SafetensorsFile fa(t.dir + "/a/k/model.state/" + block_group_name(b) + ".safetensors");
    SafetensorsFile fb(run_b + "/model.state/" + block_group_name(b) + ".safetensors");
    int compared = 0;
    for (const std::string& n : fa.names()) {
      if (n.rfind("learned.", 0) != 0) continue;
      ASSERT_TRUE(fb.has(n)) << n;
      EXPECT_EQ(fa.read(n).to_f32_vector(), fb.read(n).to_f32_vector()) << "block " << b << " " << n;
      ++compared;
    }
    EXPECT_GT(compared, 0);
  }
  // the same perplexity, exactly
  RunRecord ra = read_run_log(t.dir + "/a/k/run.h5"), rb = read_run_log(run_b + "/run.h5");
  ASSERT_EQ(ra.evals.size(), 1u);
  ASSERT_EQ(rb.evals.size(), 1u);
  EXPECT_EQ(ra.evals.begin()->second.ppl, rb.evals.begin()->second.ppl);
  EXPECT_EQ(rb.blocks.size(), 4u);
  for (const auto& [b, rep] : ra.blocks) EXPECT_EQ(rep.final_loss, rb.blocks.at(b).final_loss) << "block " << b;
}

}  // namespace
}  // namespace omniq
