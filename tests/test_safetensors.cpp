// safetensors reader: the bundled real checkpoints against an independent parser, every dtype, and
// every way a header can be broken (each error must be one line naming the file and the tensor).
#include <cstring>

#include "models/safetensors.h"
#include "runtime/error.h"
#include "tests/models_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::RawEntry;
using omniq::test::throws_with;

namespace {

std::string llama_file() { return test::source_path("data/models/llama-nano/model.safetensors"); }
std::string opt_file() { return test::source_path("data/models/opt-nano/model.safetensors"); }

std::string f32_bytes(const std::vector<float>& v) { return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4); }

std::vector<uint16_t> u16s(const void* p, size_t n) {
  std::vector<uint16_t> v(n);
  std::memcpy(v.data(), p, n * 2);
  return v;
}

}  // namespace

TEST(Safetensors, RealLlamaNanoMatchesIndependentParser) {
  SafetensorsFile f(llama_file());
  auto ref = test::parse_safetensors_independently(llama_file());
  ASSERT_EQ(f.size(), ref.size());
  EXPECT_EQ(f.size(), 38u);  // 4 blocks x 9 + embed_tokens + norm (lm_head tied, not stored)
  EXPECT_EQ(f.metadata().at("format"), "pt");
  for (const RawEntry& e : ref) {
    const SafetensorsTensorInfo& i = f.info(e.name);
    EXPECT_EQ(i.dtype_str, e.dtype) << e.name;
    EXPECT_EQ(i.dims, e.dims) << e.name;
    RawTensorBytes r = f.raw(e.name);
    ASSERT_EQ(r.bytes, e.bytes.size()) << e.name;
    EXPECT_EQ(std::memcmp(r.data, e.bytes.data(), r.bytes), 0) << e.name;
  }
}

TEST(Safetensors, RealModelsKnownValues) {
  // First fp16 words read with Python's struct module from the committed files.
  SafetensorsFile l(llama_file());
  const SafetensorsTensorInfo& norm = l.info("model.norm.weight");
  EXPECT_EQ(norm.dtype, DType::f16);
  EXPECT_TRUE(norm.loadable);
  EXPECT_EQ(norm.shape_str(), "[256]");
  EXPECT_EQ(u16s(l.raw("model.norm.weight").data, 4), (std::vector<uint16_t>{0x3f14, 0x3eed, 0x3ebf, 0x3e52}));
  Tensor t = l.read("model.layers.3.mlp.down_proj.weight");
  EXPECT_EQ(t.dtype(), DType::f16);
  EXPECT_EQ(t.shape(), Shape({256, 768}));
  std::vector<float> v = t.to_f32_vector();
  EXPECT_EQ(v[0], -0.02032470703125f);
  EXPECT_EQ(v[1], 0.01419830322265625f);
  EXPECT_EQ(v[2], -0.09454345703125f);

  SafetensorsFile o(opt_file());
  EXPECT_EQ(o.size(), 68u);  // 4 x 16 + tokens + positions + final norm weight/bias
  EXPECT_EQ(o.info("model.decoder.embed_positions.weight").dims, (std::vector<int64_t>{1026, 256}));
  EXPECT_EQ(u16s(o.raw("model.decoder.layers.0.fc1.bias").data, 4),
            (std::vector<uint16_t>{0xa6dd, 0xa880, 0xa75e, 0xa984}));
}

TEST(Safetensors, AllLoadableDtypesRoundTrip) {
  std::string dir = test::make_temp_dir("st_dtypes");
  std::string path = dir + "/x.safetensors";
  std::vector<float> f32 = {1.5f, -2.25f, 3.0f, 0.0f, 1e-3f, -7.0f};
  std::string bf16, f16;
  for (float x : f32) {
    uint16_t b = f32_to_bf16(x), h = f32_to_f16(x);
    bf16.append(reinterpret_cast<const char*>(&b), 2);
    f16.append(reinterpret_cast<const char*>(&h), 2);
  }
  int32_t i32[3] = {-5, 7, 1 << 20};
  test::write_safetensors(path, {{"a.f32", "F32", {2, 3}, f32_bytes(f32)},
                                 {"a.bf16", "BF16", {3, 2}, bf16},
                                 {"a.f16", "F16", {6}, f16},
                                 {"a.i32", "I32", {3}, std::string(reinterpret_cast<const char*>(i32), 12)},
                                 {"a.i8", "I8", {2}, std::string("\xfe\x05", 2)},
                                 {"a.u8", "U8", {2}, std::string("\xfe\x05", 2)},
                                 {"a.f64", "F64", {1}, std::string(8, '\0')},
                                 {"scalar", "F32", {}, f32_bytes({4.5f})},
                                 {"empty", "F16", {0, 4}, ""}});
  SafetensorsFile f(path);
  EXPECT_EQ(f.names().size(), 9u);
  EXPECT_EQ(f.read("a.f32").to_f32_vector(), f32);
  EXPECT_EQ(f.read("a.f32").shape(), Shape({2, 3}));
  std::vector<float> rb = f.read("a.bf16").to_f32_vector();
  std::vector<float> rh = f.read("a.f16").to_f32_vector();
  for (size_t i = 0; i < f32.size(); ++i) {
    EXPECT_EQ(rb[i], round_bf16(f32[i]));
    EXPECT_EQ(rh[i], f16_to_f32(f32_to_f16(f32[i])));
  }
  EXPECT_EQ(f.read("a.i32").to_i32_vector(), (std::vector<int32_t>{-5, 7, 1 << 20}));
  EXPECT_EQ(f.read("a.i8").to_i32_vector(), (std::vector<int32_t>{-2, 5}));
  EXPECT_EQ(f.read("a.u8").to_i32_vector(), (std::vector<int32_t>{254, 5}));
  EXPECT_EQ(f.read("scalar").item(), 4.5f);
  EXPECT_EQ(f.read("empty").numel(), 0);
  // F64 is a valid safetensors dtype: the file opens, but omniq refuses to read that tensor.
  EXPECT_FALSE(f.info("a.f64").loadable);
  EXPECT_TRUE(throws_with([&] { f.read("a.f64"); }, {path, "a.f64", "F64"}));
  EXPECT_TRUE(throws_with([&] { f.info("nope"); }, {path, "nope"}));
  // Moving keeps the mapping valid.
  SafetensorsFile g(std::move(f));
  EXPECT_EQ(g.read("a.f32").to_f32_vector(), f32);
}

TEST(Safetensors, MissingOrTooShortFile) {
  std::string dir = test::make_temp_dir("st_short");
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(dir + "/none.safetensors"); }, {dir + "/none.safetensors", "cannot open"}));
  std::string p = dir + "/short.safetensors";
  test::write_file_bytes(p, "abc");
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "too short"}));
}

TEST(Safetensors, HeaderLengthBeyondFile) {
  std::string dir = test::make_temp_dir("st_hlen");
  std::string p = dir + "/x.safetensors";
  std::string bytes = test::read_file_bytes(llama_file()).substr(0, 8) + "{}";  // header says 4048 bytes
  test::write_file_bytes(p, bytes);
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "header length 4048", "beyond the file"}));
  // A huge length (e.g. the first bytes of some other format) is refused without reading.
  test::write_file_bytes(p, std::string("\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10));
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "header length"}));
}

TEST(Safetensors, HeaderNotJson) {
  std::string dir = test::make_temp_dir("st_json");
  std::string p = dir + "/x.safetensors";
  test::write_raw_safetensors(p, "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], ", std::string(4, '\0'));
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "not valid JSON"}));
  test::write_raw_safetensors(p, "[1, 2]", "");
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "JSON object"}));
  test::write_raw_safetensors(p, "{\"w\": 3}", "");
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "'w'"}));
}

TEST(Safetensors, UnknownDtype) {
  std::string dir = test::make_temp_dir("st_dtype");
  std::string p = dir + "/x.safetensors";
  test::write_raw_safetensors(p, R"({"blk.w": {"dtype": "F17", "shape": [2], "data_offsets": [0, 4]}})", "abcd");
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "'blk.w'", "unknown dtype 'F17'"}));
  test::write_raw_safetensors(p, R"({"blk.w": {"shape": [2], "data_offsets": [0, 4]}})", "abcd");
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "'blk.w'", "dtype"}));
}

TEST(Safetensors, ShapeTimesDtypeMustEqualByteSpan) {
  std::string dir = test::make_temp_dir("st_span");
  std::string p = dir + "/x.safetensors";
  test::write_raw_safetensors(p, R"({"blk.w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 8]}})",
                              std::string(12, '\0'));
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "'blk.w'", "spans 8 bytes", "needs 12"}));
  // Bad shapes: negative and non-integer dimensions.
  test::write_raw_safetensors(p, R"({"blk.w": {"dtype": "F16", "shape": [-2], "data_offsets": [0, 4]}})", "abcd");
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "'blk.w'", "shape"}));
  test::write_raw_safetensors(p, R"({"blk.w": {"dtype": "F16", "shape": [2.5], "data_offsets": [0, 4]}})", "abcd");
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "'blk.w'", "shape"}));
  // Overflowing element count.
  test::write_raw_safetensors(
      p, R"({"blk.w": {"dtype": "F16", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}})", "abcd");
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "'blk.w'", "overflows"}));
}

TEST(Safetensors, OffsetsOutOfRange) {
  std::string dir = test::make_temp_dir("st_offsets");
  std::string p = dir + "/x.safetensors";
  test::write_raw_safetensors(p, R"({"blk.w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})",
                              std::string(8, '\0'));
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "'blk.w'", "begin > end"}));
  test::write_raw_safetensors(p, R"({"blk.w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", "");
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "'blk.w'", "data_offsets"}));
  test::write_raw_safetensors(p, R"({"blk.w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})", "");
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "'blk.w'", "data_offsets"}));
  test::write_raw_safetensors(p, R"({"blk.w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                              std::string(8, '\0'));
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "'blk.w'", "[4, 12)", "data section of 8 bytes"}));
}

TEST(Safetensors, TruncatedRealCheckpoint) {
  // The real file cut in the middle of the last tensor: the tensor whose bytes end past the cut is named.
  std::string dir = test::make_temp_dir("st_trunc");
  std::string p = dir + "/model.safetensors";
  std::string bytes = test::read_file_bytes(llama_file());
  test::write_file_bytes(p, bytes.substr(0, bytes.size() - 1000));
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "beyond the file's data section", "truncated"}));
  try {
    SafetensorsFile f(p);
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("tensor 'model."), std::string::npos) << msg;
  }
  // Cut inside the header.
  test::write_file_bytes(p, bytes.substr(0, 100));
  EXPECT_TRUE(throws_with([&] { SafetensorsFile f(p); }, {p, "beyond the file"}));
}

TEST(Safetensors, DimensionsAboveFourLoadOnlyWhereNeeded) {
  std::string dir = test::make_temp_dir("st_5d");
  std::string p = dir + "/x.safetensors";
  test::write_safetensors(p, {{"conv", "F32", {1, 1, 1, 1, 2}, f32_bytes({1, 2})}, {"w", "F32", {2}, f32_bytes({3, 4})}});
  SafetensorsFile f(p);  // the file itself is fine
  EXPECT_EQ(f.read("w").to_f32_vector(), (std::vector<float>{3, 4}));
  EXPECT_TRUE(throws_with([&] { f.read("conv"); }, {p, "'conv'", "5 dimensions"}));
}
