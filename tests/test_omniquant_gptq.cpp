// OmniQuant-then-GPTQ (`quantization.gptq: true`, `omniq calibrate --gptq`): after OmniQuant's
// training the LET-fused weights are quantized by GPTQ inside the learned LWC clipping ranges.
#include <filesystem>
#include <string>

#include "quant/calibrate.h"
#include "quant/quant_config.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

using namespace omniq;

namespace {

std::string nano(const char* arch) { return test::source_path(std::string("data/models/") + arch + "-nano"); }

CalibrationOptions options(const std::string& model, const std::string& out, bool gptq) {
  CalibrationOptions o;
  o.model_dir = model;
  o.out_dir = out;
  o.qc.method = "omniquant";
  o.qc.wbits = 3;
  o.qc.group_size = 0;
  o.qc.lwc = true;
  o.qc.let = true;
  o.qc.gptq = gptq;
  o.qc.epochs = 1;
  o.qc.nsamples = 8;
  o.qc.seqlen = 128;
  return o;
}

}  // namespace

// GPTQ's error feedback on top of the learned clipping must lower the block output error of the
// quantized stream versus plain fake-quant with the same learned parameters (summed over blocks:
// a single block may lose a little to the different inputs it sees), and the state resumes.
TEST(OmniQuantGptqCpu, LowersBlockErrorAndResumes) {
  for (const char* arch : {"llama", "opt"}) {
    std::string tmp = testing::TempDir() + "/omniq_then_gptq_" + arch;
    std::filesystem::remove_all(tmp);
    CalibrationResult plain = calibrate_model(options(nano(arch), tmp + "/plain", false));
    CalibrationResult both = calibrate_model(options(nano(arch), tmp + "/gptq", true));
    double e_plain = 0, e_both = 0;
    for (size_t i = 0; i < plain.blocks.size(); ++i) {
      e_plain += plain.blocks[i].final_loss;
      e_both += both.blocks[i].final_loss;
      EXPECT_GT(both.blocks[i].gptq_seconds, 0.0) << arch << " block " << i;
    }
    std::printf("%s W3A16 LWC+LET: sum of block output MSE %.6g, then GPTQ %.6g\n", arch, e_plain, e_both);
    EXPECT_LT(e_both, e_plain) << arch;
    // Resume: the state holds the GPTQ weights; a rerun reuses every block.
    CalibrationResult again = calibrate_model(options(nano(arch), tmp + "/gptq", true));
    for (size_t i = 0; i < again.blocks.size(); ++i) {
      EXPECT_TRUE(again.blocks[i].resumed);
      // The state keeps the fused weights in fp16 (the export format) while the first run propagated
      // with the f32 GPTQ result: the same weights up to fp16 rounding.
      EXPECT_NEAR(again.blocks[i].final_loss, both.blocks[i].final_loss, 1e-3 * both.blocks[i].final_loss)
          << arch << " block " << i;
    }
  }
}

TEST(OmniQuantGptq, ConfigValidation) {
  QuantConfig q;
  q.gptq = true;
  q.method = "rtn";
  EXPECT_THROW(q.validate(), Error);
  q.method = "omniquant";
  EXPECT_NO_THROW(q.validate());
  EXPECT_TRUE(QuantConfig::from_json(q.to_json(), "test").gptq);
  q.gptq = false;
  EXPECT_EQ(q.to_json().find("gptq"), std::string::npos);  // older state folders stay valid
}
