// safetensors writer: round trips through our reader and the independent parser for every dtype,
// the exact header layout (Rust-crate padding, contiguous offsets), the streaming writer's contract,
// and crash safety under injected failures (missing/unwritable directory, file size limit).
#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "models/safetensors.h"
#include "models/safetensors_writer.h"
#include "runtime/error.h"
#include "tests/models_test_util.h"
#include "tests/file_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::throws_with;

namespace {

// tests/file_test_util.h
using file_test::file_exists;
using file_test::list_dir;

std::string host_bytes(const Tensor& t) {
  Tensor h = t.device().is_cuda() ? t.to(Device::cpu()) : t.clone();
  return std::string(static_cast<const char*>(h.data()), h.nbytes());
}

// One tensor of every dtype, several ranks, a scalar and an empty one; the given order deliberately
// mixes element sizes so the writer's alignment sort is exercised.
struct Sample {
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::vector<std::pair<std::string, const Tensor*>> list() const {
    std::vector<std::pair<std::string, const Tensor*>> v;
    for (const auto& kv : tensors) v.push_back({kv.first, &kv.second});
    return v;
  }
};

Sample make_sample(Device dev = Device::cpu()) {
  Sample s;
  s.tensors.emplace_back("u8.bytes", Tensor::from_i32({0, 1, 200, 255, 7}, Shape{5}).to(DType::u8).to(dev));
  s.tensors.emplace_back("w.f16", Tensor::uniform(Shape{3, 5}, -2.0f, 2.0f, 1, DType::f16, dev));
  s.tensors.emplace_back("w.f32", Tensor::uniform(Shape{2, 3, 4}, -1.0f, 1.0f, 2, DType::f32, dev));
  s.tensors.emplace_back("i8.vals", Tensor::from_i32({-128, -1, 0, 127}, Shape{2, 2}).to(DType::i8).to(dev));
  s.tensors.emplace_back("w.bf16", Tensor::uniform(Shape{1, 2, 3, 2}, -3.0f, 3.0f, 3, DType::bf16, dev));
  s.tensors.emplace_back("ids.i32", Tensor::from_i32({-5, 7, 1 << 20}, Shape{3}, dev));
  s.tensors.emplace_back("scalar.f32", Tensor::full(Shape(std::vector<int64_t>{}), 4.5f, DType::f32, dev));
  s.tensors.emplace_back("empty.f16", Tensor::empty(Shape{0, 4}, DType::f16, dev));
  return s;
}

void expect_round_trip(const std::string& path, const Sample& s, const std::map<std::string, std::string>& meta) {
  SafetensorsFile f(path);
  EXPECT_EQ(f.size(), s.tensors.size());
  EXPECT_EQ(f.metadata(), meta);
  auto ref = test::by_name(test::parse_safetensors_independently(path));
  ASSERT_EQ(ref.size(), s.tensors.size());
  for (const auto& kv : s.tensors) {
    const Tensor& t = kv.second;
    const std::string want = host_bytes(t);
    const SafetensorsTensorInfo& i = f.info(kv.first);
    EXPECT_EQ(i.dtype, t.dtype()) << kv.first;
    EXPECT_EQ(i.dtype_str, safetensors_dtype_name(t.dtype())) << kv.first;
    EXPECT_EQ(i.shape(path), t.shape()) << kv.first;
    Tensor back = f.read(kv.first);
    EXPECT_EQ(std::string(static_cast<const char*>(back.data()), back.nbytes()), want) << kv.first;
    const test::RawEntry& e = ref.at(kv.first);
    EXPECT_EQ(e.dtype, safetensors_dtype_name(t.dtype())) << kv.first;
    EXPECT_EQ(e.dims, std::vector<int64_t>(t.shape().dims, t.shape().dims + t.ndim())) << kv.first;
    EXPECT_EQ(e.bytes, want) << kv.first;
  }
}

// The header's entries in file order with their offsets: contiguous from 0, each aligned to its
// element size, padded with spaces to a multiple of 8.
void expect_layout(const std::string& path) {
  std::string bytes = test::read_file_bytes(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  EXPECT_EQ(n % 8, 0u) << "header length must keep the data section 8-aligned";
  std::string header = bytes.substr(8, n);
  size_t end = header.find_last_not_of(' ');
  EXPECT_EQ(header[end], '}');
  EXPECT_LT(n - 1 - end, 8u) << "at most 7 spaces of padding";
  nlohmann::ordered_json h = nlohmann::ordered_json::parse(header);
  uint64_t off = 0;
  bool first = true;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") {
      EXPECT_TRUE(first) << "__metadata__ comes first";
      continue;
    }
    first = false;
    uint64_t b = it.value()["data_offsets"][0], e = it.value()["data_offsets"][1];
    EXPECT_EQ(b, off) << it.key() << ": data_offsets must be contiguous in header order";
    EXPECT_EQ(b % safetensors_dtype_size(it.value()["dtype"]), 0u) << it.key() << " misaligned";
    off = e;
  }
  EXPECT_EQ(8 + n + off, bytes.size()) << "no trailing bytes";
}

}  // namespace

TEST(SafetensorsWriter, RoundTripEveryDtype) {
  std::string dir = test::make_temp_dir("stw_rt");
  Sample s = make_sample();
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"omniq", "{\"bits\": 3}"}};
  write_safetensors(dir + "/a.safetensors", s.list(), meta);
  expect_round_trip(dir + "/a.safetensors", s, meta);
  expect_layout(dir + "/a.safetensors");
  EXPECT_EQ(list_dir(dir), std::vector<std::string>{"a.safetensors"}) << "no temp file left behind";
}

TEST(SafetensorsWriter, OrderIsStableSortByElementSize) {
  std::string dir = test::make_temp_dir("stw_order");
  Sample s = make_sample();
  write_safetensors(dir + "/a.safetensors", s.list());
  std::string bytes = test::read_file_bytes(dir + "/a.safetensors");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  nlohmann::ordered_json h = nlohmann::ordered_json::parse(bytes.substr(8, n));
  std::vector<std::string> order;
  for (auto it = h.begin(); it != h.end(); ++it) order.push_back(it.key());
  EXPECT_EQ(order, (std::vector<std::string>{"w.f32", "ids.i32", "scalar.f32", "w.f16", "w.bf16", "empty.f16",
                                             "u8.bytes", "i8.vals"}));
}

TEST(SafetensorsWriter, ExactHeaderBytes) {
  std::string dir = test::make_temp_dir("stw_hdr");
  Tensor a = Tensor::from_f32({1.0f, 2.0f}, Shape{2});
  Tensor b = Tensor::from_f32({3.0f}, Shape{1, 1}, DType::f16);
  write_safetensors(dir + "/x.safetensors", {{"a", &a}, {"b", &b}}, {{"format", "pt"}});
  std::string bytes = test::read_file_bytes(dir + "/x.safetensors");
  const std::string json =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"F16","shape":[1,1],"data_offsets":[8,10]}})";
  std::string padded = json + std::string((8 - json.size() % 8) % 8, ' ');
  ASSERT_EQ(bytes.size(), 8 + padded.size() + 10);
  EXPECT_EQ(static_cast<uint8_t>(bytes[0]), padded.size());
  EXPECT_EQ(bytes.substr(1, 7), std::string(7, '\0'));
  EXPECT_EQ(bytes.substr(8, padded.size()), padded);
  uint16_t h3 = f32_to_f16(3.0f);
  EXPECT_EQ(bytes.substr(8 + padded.size() + 8), std::string(reinterpret_cast<const char*>(&h3), 2));
}

TEST(SafetensorsWriter, EmptyTensorList) {
  std::string dir = test::make_temp_dir("stw_empty");
  write_safetensors(dir + "/none.safetensors", {});
  EXPECT_EQ(test::read_file_bytes(dir + "/none.safetensors"), std::string("\x08\0\0\0\0\0\0\0{}      ", 16));
  SafetensorsFile f(dir + "/none.safetensors");
  EXPECT_EQ(f.size(), 0u);
  write_safetensors(dir + "/meta.safetensors", {}, {{"format", "pt"}});
  SafetensorsFile g(dir + "/meta.safetensors");
  EXPECT_EQ(g.size(), 0u);
  EXPECT_EQ(g.metadata().at("format"), "pt");
  expect_layout(dir + "/meta.safetensors");
}

TEST(SafetensorsWriter, ReplacesExistingFileAndRejectsBadLists) {
  std::string dir = test::make_temp_dir("stw_replace");
  std::string path = dir + "/w.safetensors";
  Tensor a = Tensor::from_f32({1, 2, 3}, Shape{3});
  Tensor b = Tensor::from_f32({9, 8}, Shape{2});
  write_safetensors(path, {{"a", &a}});
  write_safetensors(path, {{"b", &b}});
  SafetensorsFile f(path);
  EXPECT_FALSE(f.has("a"));
  EXPECT_EQ(f.read("b").to_f32_vector(), (std::vector<float>{9, 8}));

  EXPECT_TRUE(throws_with([&] { write_safetensors(path, {{"a", &a}, {"a", &b}}); }, {path, "'a'", "twice"}));
  EXPECT_TRUE(throws_with([&] { write_safetensors(path, {{"n", nullptr}}); }, {path, "'n'", "null"}));
  EXPECT_TRUE(throws_with([&] { write_safetensors(path, {{"__metadata__", &a}}); }, {path, "invalid tensor name"}));
  EXPECT_EQ(SafetensorsFile(path).read("b").to_f32_vector(), (std::vector<float>{9, 8})) << "old file kept";
  EXPECT_EQ(list_dir(dir), std::vector<std::string>{"w.safetensors"});
}

// ---- streaming writer ------------------------------------------------------------------------

TEST(SafetensorsStreamWriter, DeclaredOrderMatchesOneShotWriter) {
  std::string dir = test::make_temp_dir("stw_stream");
  Tensor a = Tensor::uniform(Shape{4, 8}, -1, 1, 5, DType::f16);
  Tensor b = Tensor::uniform(Shape{8}, -1, 1, 6, DType::f16);
  Tensor c = Tensor::uniform(Shape{2, 2}, -1, 1, 7, DType::bf16);
  {
    SafetensorsStreamWriter w(dir + "/s.safetensors",
                              {{"a", DType::f16, a.shape()}, {"b", DType::f16, b.shape()}, {"c", DType::bf16, c.shape()}},
                              {{"format", "pt"}});
    EXPECT_EQ(w.next_name(), "a");
    w.write("a", a);
    w.write_bytes("b", b.data(), b.nbytes());
    EXPECT_FALSE(file_exists(dir + "/s.safetensors")) << "nothing at the final path before finish()";
    w.write("c", c);
    EXPECT_EQ(w.next_name(), "");
    w.finish();
  }
  write_safetensors(dir + "/o.safetensors", {{"a", &a}, {"b", &b}, {"c", &c}}, {{"format", "pt"}});
  EXPECT_EQ(test::read_file_bytes(dir + "/s.safetensors"), test::read_file_bytes(dir + "/o.safetensors"));
  EXPECT_EQ(list_dir(dir), (std::vector<std::string>{"o.safetensors", "s.safetensors"}));
}

TEST(SafetensorsStreamWriter, WrongOrderShapeOrDtypeIsAnErrorAndWriterStaysUsable) {
  std::string dir = test::make_temp_dir("stw_wrong");
  std::string path = dir + "/s.safetensors";
  Tensor a = Tensor::uniform(Shape{4, 8}, -1, 1, 5, DType::f16);
  Tensor b = Tensor::uniform(Shape{8}, -1, 1, 6, DType::f16);
  SafetensorsStreamWriter w(path, {{"a", DType::f16, a.shape()}, {"b", DType::f16, b.shape()}});
  EXPECT_TRUE(throws_with([&] { w.write("b", b); }, {path, "'b'", "out of order", "'a'"}));
  EXPECT_TRUE(throws_with([&] { w.write("a", b); }, {path, "'a'", "f16[8]", "f16 [4, 8] was declared"}));
  Tensor a32 = a.to(DType::f32);
  EXPECT_TRUE(throws_with([&] { w.write("a", a32); }, {path, "'a'", "f32[4, 8]", "f16 [4, 8] was declared"}));
  Tensor a_t = a.reshape(Shape{8, 4});
  EXPECT_TRUE(throws_with([&] { w.write("a", a_t); }, {path, "'a'", "[4, 8]"}));
  EXPECT_TRUE(throws_with([&] { w.write_bytes("a", a.data(), 3); }, {path, "3 bytes", "64 bytes"}));
  w.write("a", a);
  EXPECT_TRUE(throws_with([&] { w.write("zz", b); }, {path, "'zz'", "out of order"}));
  w.write("b", b);
  EXPECT_TRUE(throws_with([&] { w.write("b", b); }, {path, "not declared"}));
  w.finish();
  EXPECT_TRUE(throws_with([&] { w.finish(); }, {path, "finish"}));
  SafetensorsFile f(path);
  EXPECT_EQ(host_bytes(f.read("b")), host_bytes(b));
}

TEST(SafetensorsStreamWriter, UnfinishedWriterLeavesNoFile) {
  std::string dir = test::make_temp_dir("stw_abort");
  Tensor a = Tensor::uniform(Shape{16}, -1, 1, 5, DType::f32);
  {
    SafetensorsStreamWriter w(dir + "/s.safetensors", {{"a", DType::f32, a.shape()}, {"b", DType::f32, a.shape()}});
    w.write("a", a);
    EXPECT_EQ(list_dir(dir).size(), 1u) << "the temp file exists while writing";
  }  // destroyed without finish(), as when an exception unwinds an export
  EXPECT_TRUE(list_dir(dir).empty());
  {
    SafetensorsStreamWriter w(dir + "/s.safetensors", {{"a", DType::f32, a.shape()}, {"b", DType::f32, a.shape()}});
    w.write("a", a);
    EXPECT_TRUE(throws_with([&] { w.finish(); }, {"1 of 2", "'b'", "not written"}));
  }
  EXPECT_TRUE(list_dir(dir).empty()) << "an incomplete file is never renamed into place";
  EXPECT_TRUE(throws_with([&] { SafetensorsStreamWriter w(dir + "/d.safetensors", {{"x", DType::f32, a.shape()}, {"x", DType::f32, a.shape()}}); },
                          {"'x'", "twice"}));
  EXPECT_TRUE(list_dir(dir).empty());
}

// ---- failure injection -----------------------------------------------------------------------

TEST(SafetensorsWriterFailure, MissingOrUnwritableDirectory) {
  std::string dir = test::make_temp_dir("stw_fail");
  Tensor a = Tensor::uniform(Shape{16}, -1, 1, 5, DType::f32);
  std::string missing = dir + "/no/such/dir/w.safetensors";
  EXPECT_TRUE(throws_with([&] { write_safetensors(missing, {{"a", &a}}); }, {missing, "No such file or directory"}));
  test::write_file_bytes(dir + "/plain", "x");
  std::string under_file = dir + "/plain/w.safetensors";
  EXPECT_TRUE(throws_with([&] { write_safetensors(under_file, {{"a", &a}}); }, {under_file, "Not a directory"}));
  EXPECT_TRUE(throws_with([&] { write_file_atomic(under_file, "abc"); }, {under_file, "Not a directory"}));

  // A directory we may not write to: chmod works for normal users; root ignores permissions, so
  // there sysfs (which refuses file creation even to root) stands in when available.
  std::string ro_dir;
  if (::geteuid() != 0) {
    ro_dir = dir + "/ro";
    ASSERT_EQ(::mkdir(ro_dir.c_str(), 0555), 0);
  } else if (file_exists("/sys/kernel")) {
    ro_dir = "/sys";
  }
  if (!ro_dir.empty()) {
    std::string p = ro_dir + "/omniq_test_w.safetensors";
    EXPECT_TRUE(throws_with([&] { write_safetensors(p, {{"a", &a}}); }, {p, "cannot write", "temporary file"}));
    EXPECT_FALSE(file_exists(p));
    EXPECT_FALSE(file_exists(p + ".tmp." + std::to_string(::getpid())));
  }
  std::vector<std::string> expect = {"plain"};
  if (::geteuid() != 0) expect.push_back("ro");
  EXPECT_EQ(list_dir(dir), expect) << "no temp file left behind";
}

// The file size limit makes write(2) fail part-way with EFBIG, the same path a full disk
// (ENOSPC) takes: the temp file must go, and a previous file at the path must survive intact.
TEST(SafetensorsWriterFailure, WriteErrorMidFileKeepsPreviousFile) {
  std::string dir = test::make_temp_dir("stw_fsize");
  std::string path = dir + "/w.safetensors";
  Tensor small = Tensor::from_f32({1, 2, 3}, Shape{3});
  write_safetensors(path, {{"small", &small}});
  const std::string before = test::read_file_bytes(path);

  Tensor big = Tensor::uniform(Shape{64, 1024}, -1, 1, 9, DType::f32);  // 256 KiB
  struct rlimit old;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = ::signal(SIGXFSZ, SIG_IGN);  // get EFBIG instead of being killed
  struct rlimit lim = old;
  lim.rlim_cur = 64 * 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &lim), 0);
  auto r1 = throws_with([&] { write_safetensors(path, {{"big", &big}}); }, {path, "File too large", "offset"});
  auto r2 = throws_with(
      [&] {
        SafetensorsStreamWriter w(dir + "/s.safetensors", {{"a", DType::f32, big.shape()}});
        w.write("a", big);
      },
      {dir + "/s.safetensors", "File too large"});
  auto r3 = throws_with([&] { write_file_atomic(dir + "/blob", std::string(100000, 'x')); }, {dir + "/blob", "File too large"});
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::signal(SIGXFSZ, old_handler);
  EXPECT_TRUE(r1);
  EXPECT_TRUE(r2);
  EXPECT_TRUE(r3);
  EXPECT_EQ(test::read_file_bytes(path), before) << "the previous file must be untouched";
  EXPECT_EQ(list_dir(dir), std::vector<std::string>{"w.safetensors"}) << "no temp or partial file left";
}

// ---- CUDA ------------------------------------------------------------------------------------

TEST(SafetensorsWriterCuda, CudaTensorsRoundTrip) {
  OMNIQ_REQUIRE_CUDA();
  std::string dir = test::make_temp_dir("stw_cuda");
  Sample s = make_sample(Device::cuda(0));
  write_safetensors(dir + "/g.safetensors", s.list(), {{"format", "pt"}});
  expect_round_trip(dir + "/g.safetensors", s, {{"format", "pt"}});
  expect_layout(dir + "/g.safetensors");
  // The same values from the host give a byte-identical file.
  Sample h;
  for (const auto& kv : s.tensors) h.tensors.emplace_back(kv.first, kv.second.to(Device::cpu()));
  write_safetensors(dir + "/h.safetensors", h.list(), {{"format", "pt"}});
  EXPECT_EQ(test::read_file_bytes(dir + "/g.safetensors"), test::read_file_bytes(dir + "/h.safetensors"));

  Tensor a = Tensor::uniform(Shape{32, 16}, -1, 1, 11, DType::bf16, Device::cuda(0));
  SafetensorsStreamWriter w(dir + "/s.safetensors", {{"a", DType::bf16, a.shape()}});
  w.write("a", a);
  w.finish();
  EXPECT_EQ(host_bytes(SafetensorsFile(dir + "/s.safetensors").read("a")), host_bytes(a));
}
