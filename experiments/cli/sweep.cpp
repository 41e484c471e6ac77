// omniq sweep / omniq run: experiments described by one YAML file (experiments/experiment_config.h,
// experiments/sweep.h), run into run directories with HDF5 logs (experiments/runner.h).
#include <cstdio>
#include <vector>

#include "experiments/cli/args.h"
#include "experiments/cli/commands.h"
#include "experiments/runner.h"
#include "experiments/sweep.h"
#include "runtime/error.h"

namespace omniq::cli {

namespace {

const char* kRunDirHelp =
    "Each point gets a run directory:\n"
    "  config.yaml    the resolved config (every setting spelled out)\n"
    "  run.h5         config, environment, per-block losses/time/memory, learned parameters, ppl\n"
    "                 (layout: docs/hdf5-layout.md; h5ls -r run.h5, or h5py / tools/plot_run.py)\n"
    "  model/         the quantized model as a Hugging Face folder (omniq eval, transformers)\n"
    "  model.state/   one file per finished block: a killed run resumes from its last block\n"
    "Rerunning the same command skips points whose run.h5 says status=complete and resumes the\n"
    "others, with the same final numbers as an uninterrupted run (same seed, same device).";

// Args takes only --options; these commands take one positional FILE. No option of theirs takes a
// value, so every argument not starting with '-' is the file.
std::string take_file(int argc, char** argv, std::vector<char*>* options, const char* command) {
  std::string file;
  for (int i = 0; i < argc; ++i) {
    if (argv[i][0] == '-') {
      options->push_back(argv[i]);
    } else {
      OMNIQ_CHECK(file.empty(), "omniq %s: one FILE.yaml only (got '%s' and '%s')", command, file.c_str(), argv[i]);
      file = argv[i];
    }
  }
  return file;
}

bool is_sweep_file(const std::string& path) {
  YAML::Node root = load_yaml_text(read_config_file(path), path);
  return root.IsMap() && (root["sweep"] || root["runs"]);
}

}  // namespace

int run_sweep_command(int argc, char** argv) {
  Args a("sweep",
         std::string("Runs every point of a sweep file in order: a `sweep:` grid (each key a dotted setting\n"
                     "with a list of values; the first key varies slowest) and/or a `runs:` list of named\n"
                     "points, each on top of the base config written outside those sections. Points go to\n"
                     "<output.dir>/<name>/<point>/; a failed point is logged and the sweep goes on. At the end\n"
                     "summary.csv and summary.md (one row per point) are written to <output.dir>/<name>/ and\n"
                     "the table is printed.\n\n") +
             kRunDirHelp + "\n\nusage: omniq sweep FILE.yaml");
  a.example("omniq sweep experiments/configs/quickstart.yaml");
  a.option("model", "DIR", "use this model folder for every point (replaces model.path)");
  a.option("out", "DIR", "write the sweep under this folder (replaces output.dir)");
  a.example("omniq sweep experiments/configs/paper_weight_only.yaml --model /models/Llama-2-7b-hf --out runs/llama2-7b");
  std::vector<char*> opts;
  std::string file = take_file(argc, argv, &opts, "sweep");
  if (!a.parse(static_cast<int>(opts.size()), opts.data())) return 0;
  OMNIQ_CHECK(!file.empty(), "omniq sweep: give the sweep file, e.g. omniq sweep experiments/configs/quickstart.yaml");
  std::vector<PointResult> results = run_sweep(file, a.get("model"), a.get("out"));
  int failed = 0;
  for (const PointResult& r : results) failed += r.status != "complete";
  if (failed) std::fprintf(stderr, "omniq sweep: %d of %zu points failed (see their run.h5 `error`)\n", failed, results.size());
  return failed ? 1 : 0;
}

int run_run_command(int argc, char** argv) {
  Args a("run",
         std::string("Runs one experiment file (no `sweep:`/`runs:` section): calibrate the model, log every\n"
                     "block to run.h5, export the quantized model, evaluate perplexity. The run directory is\n"
                     "<output.dir>/<name>/.\n\n") +
             kRunDirHelp + "\n\nusage: omniq run FILE.yaml     (for a file with sweep:/runs: use omniq sweep)");
  a.example("omniq run my_w3.yaml");
  std::vector<char*> opts;
  std::string file = take_file(argc, argv, &opts, "run");
  if (!a.parse(static_cast<int>(opts.size()), opts.data())) return 0;
  OMNIQ_CHECK(!file.empty(), "omniq run: give the experiment file, e.g. omniq run my_w3.yaml");
  OMNIQ_CHECK(!is_sweep_file(file),
              "%s is a sweep (it has a sweep: or runs: section): run it with `omniq sweep %s`, or remove "
              "those sections to run the base config alone",
              file.c_str(), file.c_str());
  ExperimentConfig c = load_experiment(file);
  OMNIQ_CHECK(!c.name.empty(), "%s: give the run a `name:` (its directory under output.dir)", file.c_str());
  SweepPoint p{c.name, {}, c};
  PointResult r = run_point(p, c.output.dir);
  std::printf("\n%s", summary_markdown({r}).c_str());
  if (r.status != "complete") {
    std::fprintf(stderr, "omniq run: failed: %s\n", r.error.c_str());
    return 1;
  }
  return 0;
}

}  // namespace omniq::cli
