// table.md from sweep results (experiments/paper_table.h) on synthetic results: single cells, seed
// repeats averaged as mean ± sample sd, and other duplicates shown once with a note.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "experiments/paper_table.h"

namespace omniq {
namespace {

PointResult point(const std::string& name, const std::string& method, int wbits, uint64_t seed, double ppl,
                  double seconds, const std::string& status = "complete") {
  PointResult r;
  r.name = name;
  r.model = "m";
  r.qc.method = method;
  r.qc.wbits = wbits;
  r.qc.seed = seed;
  r.status = status;
  r.calib_seconds = seconds;
  if (status == "complete") r.ppl = {{"wikitext2", ppl}};
  return r;
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST(PaperTable, SingleCellsShowTheirValue) {
  std::vector<PointResult> r = {point("m-FP16", "rtn", 16, 2, 303.11, 0), point("m-W3-rtn", "rtn", 3, 2, 353.24, 1.5)};
  r[0].qc.abits = 16;
  const std::string t = paper_tables_markdown(r);
  EXPECT_TRUE(has(t, "| FP16 | 303.11 |")) << t;
  EXPECT_TRUE(has(t, "| RTN | 353.24 |")) << t;
  EXPECT_TRUE(has(t, "| RTN | 1.5 |")) << t;
  EXPECT_FALSE(has(t, "±")) << t;
  EXPECT_FALSE(has(t, "Note:")) << t;
}

TEST(PaperTable, SeedRepeatsShowMeanAndSampleSd) {
  std::vector<PointResult> r = {point("m-W3-s2", "omniquant", 3, 2, 320, 10), point("m-W3-s3", "omniquant", 3, 3, 322, 20),
                                point("m-W3-s4", "omniquant", 3, 4, 324, 30)};
  const std::string t = paper_tables_markdown(r);
  // mean 322, sample sd sqrt(((-2)² + 0 + 2²) / 2) = 2
  EXPECT_TRUE(has(t, "| OmniQuant | 322.00 ± 2.00 |")) << t;
  EXPECT_TRUE(has(t, "| OmniQuant | 20.0 ± 10.0 |")) << t;
  EXPECT_TRUE(has(t, "Note: OmniQuant at W3A16 on m: mean ± sample standard deviation over 3 seeds (2, 3, 4)")) << t;

  // A failed seed: the mean of the complete ones, the failure listed, n = 2.
  r[1] = point("m-W3-s3", "omniquant", 3, 3, 0, 0, "failed");
  r[1].error = "NaN loss";
  const std::string f = paper_tables_markdown(r);
  EXPECT_TRUE(has(f, "| OmniQuant | 322.00 ± 2.83 |")) << f;  // sd of {320, 324} = 2·√2
  EXPECT_TRUE(has(f, "over 2 seeds (2, 4)")) << f;
  EXPECT_TRUE(has(f, "- m-W3-s3: NaN loss")) << f;

  // One complete seed left: its value, no ± and no note.
  r[2] = point("m-W3-s4", "omniquant", 3, 4, 0, 0, "missing");
  const std::string one = paper_tables_markdown(r);
  EXPECT_TRUE(has(one, "| OmniQuant | 320.00 |")) << one;
  EXPECT_FALSE(has(one, "standard deviation")) << one;
}

TEST(PaperTable, OtherDuplicatesShowOneAndSayWhich) {
  std::vector<PointResult> r = {point("m-W3-a", "omniquant", 3, 2, 0, 0, "missing"),
                                point("m-W3-b", "omniquant", 3, 2, 330, 5)};
  r[1].qc.epochs = 40;  // a different recipe in the same cell: not averaged
  const std::string t = paper_tables_markdown(r);
  EXPECT_TRUE(has(t, "| OmniQuant | 330.00 |")) << t;  // the complete one
  EXPECT_FALSE(has(t, "±")) << t;
  EXPECT_TRUE(has(t, "Note: m-W3-b and m-W3-a are all OmniQuant at W3A16 on m: the table shows m-W3-b")) << t;
}

}  // namespace
}  // namespace omniq
