// The typed YAML experiment layer: parsing with defaults, errors that quote file:line and the key,
// sweep grid / runs expansion, and the YAML round trip of a resolved config.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "experiments/experiment_config.h"
#include "experiments/sweep.h"
#include "runtime/error.h"
#include "tests/error_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;

namespace {

using error_test::error_of;  // tests/error_test_util.h

// Every error must name the file, the line and the key, so a user can go straight to it.
void expect_error(const std::string& yaml, const std::vector<std::string>& parts, bool sweep = false) {
  std::string msg = error_of([&] {
    if (sweep) parse_sweep(yaml, "config.yaml");
    else parse_experiment(yaml, "config.yaml");
  });
  for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
}

const char* kMinimal = "model:\n  path: some/model\n";

}  // namespace

TEST(ExperimentConfig, DefaultsAreQuantConfigDefaults) {
  ExperimentConfig c = parse_experiment(kMinimal, "config.yaml");
  QuantConfig d;
  EXPECT_EQ(c.model.path, "some/model");
  EXPECT_EQ(c.quantization.method, d.method);
  EXPECT_EQ(c.quantization.wbits, d.wbits);
  EXPECT_EQ(c.quantization.abits, d.abits);
  EXPECT_EQ(c.quantization.group_size, d.group_size);
  EXPECT_EQ(c.quantization.lwc, d.lwc);
  EXPECT_EQ(c.quantization.epochs, d.epochs);
  EXPECT_EQ(c.quantization.nsamples, d.nsamples);
  EXPECT_EQ(c.quantization.seed, d.seed);
  EXPECT_EQ(c.quantization.lwc_lr, d.lwc_lr);
  EXPECT_EQ(c.quantization.let_alpha, d.let_alpha);
  EXPECT_EQ(c.quantization.calib_text, "");
  EXPECT_EQ(c.data.eval_datasets, std::vector<std::string>{"wikitext2"});
  EXPECT_EQ(c.eval.seqlen, 0);
  EXPECT_EQ(c.device, "auto");
  EXPECT_EQ(c.output.dir, "runs");
  ExperimentConfig expected;
  expected.model.path = "some/model";
  EXPECT_TRUE(c == expected);
}

TEST(ExperimentConfig, ParsesEverySection) {
  const char* yaml = R"(name: w3
model: {path: m}
data:
  calib_text: calib.txt
  eval_datasets: [wikitext2]
  eval_texts: [a.txt, b.txt]
quantization:
  method: rtn
  wbits: 3
  abits: 16
  group_size: 128
  symmetric: yes
  lwc: false
  let: true
  aug_loss: true
  epochs: 40
  nsamples: 16
  seqlen: 256
  seed: 7
  lwc_lr: 5e-3
  let_lr: 0.001
  weight_decay: 0
  let_alpha: 0.75
  let_scale_floor: 0.02
  max_nan_retries: 1
eval: {seqlen: 512, dtype: bf16}
device: cuda:1
output: {dir: out}
)";
  ExperimentConfig c = parse_experiment(yaml, "config.yaml");
  EXPECT_EQ(c.name, "w3");
  EXPECT_EQ(c.quantization.calib_text, "calib.txt");
  EXPECT_EQ(c.data.eval_texts, (std::vector<std::string>{"a.txt", "b.txt"}));
  EXPECT_EQ(c.quantization.method, "rtn");
  EXPECT_EQ(c.quantization.wbits, 3);
  EXPECT_EQ(c.quantization.group_size, 128);
  EXPECT_TRUE(c.quantization.symmetric);
  EXPECT_FALSE(c.quantization.lwc);
  EXPECT_TRUE(c.quantization.let);
  EXPECT_TRUE(c.quantization.aug_loss);
  EXPECT_EQ(c.quantization.epochs, 40);
  EXPECT_EQ(c.quantization.seed, 7u);
  EXPECT_FLOAT_EQ(c.quantization.lwc_lr, 5e-3f);
  EXPECT_FLOAT_EQ(c.quantization.let_alpha, 0.75f);
  EXPECT_FLOAT_EQ(c.quantization.let_scale_floor, 0.02f);
  EXPECT_EQ(c.quantization.max_nan_retries, 1);
  EXPECT_EQ(c.eval.seqlen, 512);
  EXPECT_EQ(c.eval.dtype, "bf16");
  EXPECT_EQ(c.device, "cuda:1");
  EXPECT_EQ(c.output.dir, "out");
  EXPECT_EQ(c.quantization.setting_name(), "W3A16g128");

  // Round trip: the emitted YAML parses back to the same config, bit for bit.
  std::string text = to_yaml(c);
  EXPECT_TRUE(parse_experiment(text, "resolved.yaml") == c) << text;
  ExperimentConfig other = c;
  other.quantization.lwc_lr = std::nextafter(other.quantization.lwc_lr, 1.0f);
  EXPECT_FALSE(other == c);  // equality really compares floats exactly
}

TEST(ExperimentConfig, RoundTripKeepsAwkwardStrings) {
  ExperimentConfig c;
  c.name = "yes";              // would read back as a bool if emitted plain
  c.model.path = "16";         // would look like a number
  c.data.eval_texts = {"a, b.txt", "#c.txt"};
  c.quantization.calib_text = "";
  c.quantization.lwc_lr = 0.1f + 0.2f;  // not representable in few digits
  c.quantization.seed = 18446744073709551615ull;
  std::string text = to_yaml(c);
  ExperimentConfig back = parse_experiment(text, "resolved.yaml");
  EXPECT_TRUE(back == c) << text;
  EXPECT_EQ(back.data.eval_texts, c.data.eval_texts);
}

TEST(ExperimentConfig, MalformedYamlQuotesLine) {
  expect_error("model:\n  path: m\nquantization:\n  wbits: [3, 4\n", {"config.yaml:", "malformed YAML"});
  // The unclosed flow list is reported at or after line 4 (yaml-cpp reports where it noticed).
  std::string msg = error_of([] { parse_experiment("model: {path: m}\nquantization:\n\twbits: 3\n", "config.yaml"); });
  EXPECT_NE(msg.find("config.yaml:3"), std::string::npos) << msg;
}

TEST(ExperimentConfig, UnknownKeysListAllowedKeys) {
  expect_error("model: {path: m}\nquantization:\n  wbits: 3\n  wbit: 4\n",
               {"config.yaml:4:3", "quantization.wbit", "unknown key", "group_size", "let_alpha"});
  expect_error("model: {path: m}\nevaluation: {seqlen: 3}\n", {"config.yaml:2:1", "evaluation", "quantization", "eval"});
  expect_error("model:\n  path: m\n  dtype: f32\n", {"config.yaml:3:3", "model.dtype", "path"});
}

TEST(ExperimentConfig, WrongTypesQuoteValue) {
  expect_error("model: {path: m}\nquantization:\n  wbits: four\n",
               {"quantization.wbits at config.yaml:3:10", "expected an integer, got 'four'"});
  expect_error("model: {path: m}\nquantization:\n  group_size: 12.5\n", {"quantization.group_size", ":3:", "integer"});
  expect_error("model: {path: m}\nquantization:\n  lwc: maybe\n", {"quantization.lwc", ":3:", "true or false", "'maybe'"});
  expect_error("model: {path: m}\nquantization:\n  lwc_lr: fast\n", {"quantization.lwc_lr", ":3:", "a number"});
  expect_error("model: {path: m}\nquantization:\n  seed: -1\n", {"quantization.seed", ":3:", "non-negative"});
  expect_error("model: {path: m}\nquantization:\n  method: [rtn]\n", {"quantization.method", ":3:", "a string"});
  expect_error("model: {path: m}\ndata:\n  eval_datasets: wikitext2\n", {"data.eval_datasets", ":3:", "list"});
  expect_error("model: {path: m}\nquantization: 4\n", {"quantization at config.yaml:2", "map"});
  expect_error("model: {path: m}\nquantization:\n  wbits:\n", {"quantization.wbits", ":3:", "integer"});
}

TEST(ExperimentConfig, ImpossibleValuesBlameTheirKey) {
  expect_error("model: {path: m}\nquantization:\n  method: omniquant\n  wbits: 1\n",
               {"quantization.wbits at config.yaml:4", "wbits 1 unsupported"});
  expect_error("model: {path: m}\nquantization:\n  group_size: 100\n", {"quantization.group_size at config.yaml:3", "group size 100"});
  expect_error("model: {path: m}\nquantization:\n  method: hqq\n", {"quantization.method at config.yaml:3", "hqq"});
  expect_error("model: {path: m}\nquantization:\n  let_alpha: 1.5\n", {"quantization.let_alpha at config.yaml:3"});
  // Only wrong together (GPTQ quantizes weights only): the section is blamed.
  expect_error("model: {path: m}\nquantization:\n  epochs: 3\n  method: gptq\n  abits: 4\n",
               {"quantization at config.yaml:2", "weights only"});
  // W16A16 is the unquantized (FP16) baseline: allowed, and its other fields are still checked.
  EXPECT_TRUE(is_unquantized(parse_experiment("model: {path: m}\nquantization: {wbits: 16, abits: 16}\n", "c.yaml").quantization));
  expect_error("model: {path: m}\nquantization: {wbits: 16, abits: 16, group_size: 7}\n",
               {"quantization.group_size at config.yaml:2", "group size 7"});
  expect_error("model: {path: m}\ndevice: gpu\n", {"device at config.yaml:2", "cuda:N"});
  expect_error("model: {path: m}\ndevice: cpu\neval: {dtype: bf16}\n", {"eval.dtype at config.yaml:3", "f32"});
  expect_error("model: {path: m}\ndata: {eval_datasets: [ptb]}\n", {"data.eval_datasets at config.yaml:2", "ptb", "wikitext2"});
  expect_error("name: x\n", {"model.path", "config.yaml:1", "required"});
  expect_error("model: {path: m}\nmodel: {path: n}\n", {"config.yaml:2", "model", "twice"});
  expect_error("model: {path: m}\nsweep: {quantization.wbits: [3]}\n", {"config.yaml:2", "sweep", "expand_sweep"});
}

TEST(Sweep, GridExpandsInKeyOrder) {
  const char* yaml = R"(name: grid
model: {path: m}
quantization: {method: rtn}
sweep:
  quantization.wbits: [2, 3, 4]
  quantization.group_size: [0, 128]
)";
  std::vector<SweepPoint> pts = parse_sweep(yaml, "grid.yaml");
  ASSERT_EQ(pts.size(), 6u);
  const char* names[] = {"wbits2-group_size0", "wbits2-group_size128", "wbits3-group_size0",
                         "wbits3-group_size128", "wbits4-group_size0", "wbits4-group_size128"};
  for (size_t i = 0; i < pts.size(); ++i) {
    EXPECT_EQ(pts[i].name, names[i]);
    EXPECT_EQ(pts[i].config.quantization.method, "rtn");
    EXPECT_EQ(pts[i].config.name, "grid");
    ASSERT_EQ(pts[i].settings.size(), 2u);
    EXPECT_EQ(pts[i].settings[0].first, "quantization.wbits");
  }
  EXPECT_EQ(pts[3].config.quantization.wbits, 3);
  EXPECT_EQ(pts[3].config.quantization.group_size, 128);
  EXPECT_EQ(pts[3].settings[1].second, "128");
  // A resolved point round-trips through YAML.
  EXPECT_TRUE(parse_experiment(to_yaml(pts[3].config), "point.yaml") == pts[3].config);
}

TEST(Sweep, LabelsForStringsBoolsAndSharedLeaves) {
  const char* yaml = R"(model: {path: m}
sweep:
  quantization.method: [rtn]
  quantization.let: [true, false]
  quantization.seqlen: [256]
  eval.seqlen: [512]
)";
  std::vector<SweepPoint> pts = parse_sweep(yaml, "s.yaml");
  ASSERT_EQ(pts.size(), 2u);
  EXPECT_EQ(pts[0].name, "rtn-let-quantization_seqlen256-eval_seqlen512");
  EXPECT_EQ(pts[1].name, "rtn-no_let-quantization_seqlen256-eval_seqlen512");
}

TEST(Sweep, NoSweepIsOnePoint) {
  std::vector<SweepPoint> pts = parse_sweep("name: solo\nmodel: {path: m}\n", "s.yaml");
  ASSERT_EQ(pts.size(), 1u);
  EXPECT_EQ(pts[0].name, "solo");
  EXPECT_TRUE(pts[0].settings.empty());
}

TEST(Sweep, RunsListAndRunsTimesGrid) {
  const char* yaml = R"(model: {path: m}
quantization: {wbits: 16, abits: 16}   # meaningless alone; every point overrides it
runs:
  - {name: W4A16, quantization.wbits: 4}
  - {quantization.wbits: 2, quantization.group_size: 128, quantization.epochs: 40}
sweep:
  quantization.method: [rtn, omniquant]
)";
  std::vector<SweepPoint> pts = parse_sweep(yaml, "t.yaml");
  ASSERT_EQ(pts.size(), 4u);
  EXPECT_EQ(pts[0].name, "W4A16-rtn");
  EXPECT_EQ(pts[1].name, "W4A16-omniquant");
  EXPECT_EQ(pts[2].name, "wbits2-group_size128-epochs40-rtn");
  EXPECT_EQ(pts[3].name, "wbits2-group_size128-epochs40-omniquant");
  EXPECT_EQ(pts[1].config.quantization.wbits, 4);
  EXPECT_EQ(pts[1].config.quantization.method, "omniquant");
  EXPECT_EQ(pts[3].config.quantization.epochs, 40);
  EXPECT_EQ(pts[3].config.quantization.group_size, 128);
  EXPECT_EQ(pts[0].config.quantization.epochs, QuantConfig{}.epochs);  // runs do not leak into each other
}

TEST(Sweep, ErrorsQuoteLineAndKey) {
  expect_error("model: {path: m}\nsweep:\n  quantization.wbitz: [2, 3]\n",
               {"quantization.wbitz", "config.yaml:3", "unknown setting", "quantization.wbits"}, true);
  expect_error("model: {path: m}\nsweep:\n  quantization.wbits: 3\n", {"sweep.quantization.wbits", "config.yaml:3", "list"}, true);
  expect_error("model: {path: m}\nsweep:\n  quantization.wbits: [3, three]\n",
               {"quantization.wbits at config.yaml:3", "'three'"}, true);
  expect_error("model: {path: m}\nruns:\n  - {name: a, quantization.lwcc: true}\n",
               {"quantization.lwcc", "config.yaml:3", "unknown setting"}, true);
  expect_error("model: {path: m}\nruns:\n  - name: a\n    quantization.wbits: x\n",
               {"quantization.wbits at config.yaml:4", "integer"}, true);
  expect_error("model: {path: m}\nruns:\n  quantization.wbits: 3\n", {"runs at config.yaml:3", "list"}, true);
  // An impossible value in a sweep is blamed on its own list element, and names the point.
  expect_error("model: {path: m}\nsweep:\n  quantization.wbits: [3,\n    1]\n",
               {"quantization.wbits at config.yaml:4", "wbits 1", "wbits1"}, true);
  expect_error("model: {path: m}\nruns:\n  - {name: a}\n  - {name: a}\n", {"config.yaml:4", "'a'"}, true);
  expect_error("model: {path: m}\nruns:\n  - {name: a, quantization.wbits: 3}\nsweep:\n  quantization.wbits: [2]\n",
               {"quantization.wbits at config.yaml:3", "line 5"}, true);
  expect_error("model: {path: m}\nrun:\n  - {name: a}\n", {"run at config.yaml:2", "runs", "sweep"}, true);
}

TEST(Sweep, ExampleConfigsParse) {
  std::vector<SweepPoint> q = load_sweep(test::source_path("experiments/configs/quickstart.yaml"));
  ASSERT_EQ(q.size(), 4u);
  EXPECT_EQ(q[0].name, "W4A16g128-rtn");
  EXPECT_EQ(q[1].name, "W4A16g128-omniquant");
  EXPECT_EQ(q[3].name, "W3A16-omniquant");
  for (const SweepPoint& p : q) {
    EXPECT_EQ(p.config.model.path, "data/models/llama-nano");
    EXPECT_EQ(p.config.device, "cpu");
    EXPECT_EQ(p.config.quantization.nsamples, 16);
    EXPECT_EQ(p.config.quantization.seqlen, 256);
    EXPECT_EQ(p.config.quantization.epochs, 2);
    EXPECT_TRUE(parse_experiment(to_yaml(p.config), "p.yaml") == p.config);
  }
  EXPECT_EQ(q[1].config.quantization.setting_name(), "W4A16g128");
  EXPECT_EQ(q[3].config.quantization.setting_name(), "W3A16");

  std::vector<SweepPoint> w = load_sweep(test::source_path("experiments/configs/paper_weight_only.yaml"));
  ASSERT_EQ(w.size(), 10u);
  const char* settings[] = {"W4A16", "W4A16g128", "W3A16", "W3A16g128", "W2A16g128"};
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(w[2 * i].name, std::string(settings[i]) + "-rtn");
    EXPECT_EQ(w[2 * i + 1].config.quantization.setting_name(), settings[i]);
    EXPECT_EQ(w[2 * i + 1].config.model.path, "MODEL_DIR");
  }
  EXPECT_EQ(w[9].config.quantization.epochs, 40);
  EXPECT_TRUE(w[9].config.quantization.aug_loss);
  EXPECT_EQ(w[1].config.quantization.epochs, 20);
  EXPECT_FALSE(w[1].config.quantization.let);

  std::vector<SweepPoint> wa = load_sweep(test::source_path("experiments/configs/paper_weight_activation.yaml"));
  ASSERT_EQ(wa.size(), 4u);
  EXPECT_EQ(wa[1].name, "W6A6-omniquant");
  EXPECT_EQ(wa[3].config.quantization.setting_name(), "W4A4");
  EXPECT_FLOAT_EQ(wa[3].config.quantization.let_alpha, 0.75f);
  EXPECT_FLOAT_EQ(wa[1].config.quantization.let_alpha, 0.5f);
  EXPECT_TRUE(wa[3].config.quantization.let && wa[3].config.quantization.lwc);
}
