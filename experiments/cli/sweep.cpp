// omniq sweep / omniq run: experiments described by one YAML file (experiments/experiment_config.h,
// experiments/sweep.h), run into run directories with HDF5 logs (experiments/runner.h).
#include <algorithm>
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

// Args takes only --options; these commands take one positional FILE. Every argument not starting
// with '-' is the file, except the value after an option that takes one (`--out DIR`).
std::string take_file(int argc, char** argv, std::vector<char*>* options, const char* command,
                      const std::vector<std::string>& value_options = {}) {
  std::string file;
  for (int i = 0; i < argc; ++i) {
    if (argv[i][0] == '-') {
      options->push_back(argv[i]);
      const std::string opt = argv[i];
      bool takes_value = std::find(value_options.begin(), value_options.end(), opt) != value_options.end();
      if (takes_value && i + 1 < argc) options->push_back(argv[++i]);
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
                     "points (a run may carry its own `sweep:`), each on top of the base config written outside\n"
                     "those sections; a `models:` map makes every point once per model (experiments/sweep.h).\n"
                     "Points go to <output.dir>/<name>/<point>/; a failed point is logged and the sweep goes on.\n"
                     "At the end summary.csv and summary.md (one row per point) and table.md (the paper's\n"
                     "layout: per model, methods x settings, perplexity and calibration seconds) are written\n"
                     "to <output.dir>/<name>/ and the summary is printed.\n\n") +
             kRunDirHelp + "\n\nusage: omniq sweep FILE.yaml [--only REGEX] [--table]");
  a.example("omniq sweep experiments/configs/quickstart.yaml");
  a.option("model", "DIR", "use this model folder for every point (replaces model.path; not for files with models:)");
  a.option("out", "DIR", "write the sweep under this folder (replaces output.dir)");
  a.option("only", "REGEX",
           "run only the points whose name matches (a regex, searched); the others fill the table from their run.h5");
  a.flag("table", "run nothing: read every point's run.h5, print and write table.md (with --only: those points)");
  a.example("omniq sweep experiments/configs/paper_weight_only.yaml --model /models/Llama-2-7b-hf --out runs/llama2-7b");
  a.example("OMNIQ_ZOO_DIR=/zoo omniq sweep experiments/configs/paper_tables.yaml --only '^opt-small-' --out runs/paper");
  a.example("omniq sweep experiments/configs/paper_tables.yaml --out runs/paper --table");
  std::vector<char*> opts;
  std::string file = take_file(argc, argv, &opts, "sweep", {"--model", "--out", "--only"});
  if (!a.parse(static_cast<int>(opts.size()), opts.data())) return 0;
  OMNIQ_CHECK(!file.empty(), "omniq sweep: give the sweep file, e.g. omniq sweep experiments/configs/quickstart.yaml");
  if (a.flag_set("table")) {
    read_sweep_results(file, a.get("model"), a.get("out"), a.get("only"));
    return 0;
  }
  std::vector<PointResult> results = run_sweep(file, a.get("model"), a.get("out"), a.get("only"));
  int failed = 0, ran = 0;
  for (const PointResult& r : results) {
    ran += r.selected;
    failed += r.selected && r.status != "complete";
  }
  if (failed) std::fprintf(stderr, "omniq sweep: %d of %d points failed (see their run.h5 `error`)\n", failed, ran);
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
  SweepPoint p{c.name, "", {}, c};
  PointResult r = run_point(p, c.output.dir);
  std::printf("\n%s", summary_markdown({r}).c_str());
  if (r.status != "complete") {
    std::fprintf(stderr, "omniq run: failed: %s\n", r.error.c_str());
    return 1;
  }
  return 0;
}

}  // namespace omniq::cli
