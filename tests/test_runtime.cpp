// Runtime: dtype conversions, tensor views/copies, memory counters, CPU<->CUDA round trips.
#include <cmath>

#include "runtime/allocator.h"
#include "runtime/error.h"
#include "runtime/tensor.h"
#include "tests/support/test_support.h"

using namespace omniq;

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to even (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  EXPECT_TRUE(std::isinf(bf16_to_f32(f32_to_bf16(INFINITY))));
}

TEST(DType, F16RoundTripsAllFiniteHalfValues) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    uint16_t bits = static_cast<uint16_t>(h);
    if (((bits >> 10) & 0x1f) == 0x1f) continue;  // inf/nan
    float f = f16_to_f32(bits);
    ASSERT_EQ(f32_to_f16(f), bits) << "half bits " << h << " value " << f;
  }
  EXPECT_EQ(f16_to_f32(f32_to_f16(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
}

TEST(Tensor, ViewsShareStorageAndCopiesDoNot) {
  Tensor t = Tensor::from_f32({0, 1, 2, 3, 4, 5}, {3, 2});
  Tensor v = t.view_rows(1, 2);
  EXPECT_EQ(v.shape(), Shape({2, 2}));
  EXPECT_EQ(v.to_f32_vector(), (std::vector<float>{2, 3, 4, 5}));
  v.data_as<float>()[0] = 42;
  EXPECT_EQ(t.to_f32_vector()[2], 42);
  Tensor c = t.clone();
  c.data_as<float>()[0] = -1;
  EXPECT_EQ(t.to_f32_vector()[0], 0);
  EXPECT_TRUE(v.shares_storage_with(t));
  EXPECT_FALSE(c.shares_storage_with(t));
  EXPECT_EQ(t.reshape({6}).shape(), Shape({6}));
  EXPECT_THROW(t.reshape({4}), Error);
  EXPECT_THROW(t.view_rows(2, 2), Error);
}

TEST(Tensor, DtypeConversions) {
  Tensor t = Tensor::from_f32({1.5f, -2.25f, 3.0f}, {3});
  EXPECT_EQ(t.to(DType::bf16).to(DType::f32).to_f32_vector(), (std::vector<float>{1.5f, -2.25f, 3.0f}));
  EXPECT_EQ(t.to(DType::f16).to_f32_vector(), (std::vector<float>{1.5f, -2.25f, 3.0f}));
  Tensor i = Tensor::from_i32({7, -3, 100000000}, {3});
  EXPECT_EQ(i.to(DType::i8).to_i32_vector()[1], -3);
  EXPECT_EQ(i.to_i32_vector()[2], 100000000);
}

TEST(Tensor, HostMemoryCounters) {
  MemoryStats before = memory_stats(Device::cpu());
  {
    Tensor t = Tensor::empty({1024, 1024}, DType::f32);
    EXPECT_EQ(memory_stats(Device::cpu()).live_bytes, before.live_bytes + (4 << 20));
    EXPECT_GE(memory_stats(Device::cpu()).peak_bytes, before.live_bytes + (4 << 20));
  }
  EXPECT_EQ(memory_stats(Device::cpu()).live_bytes, before.live_bytes);
}

TEST(Error, CheckCarriesFileLineAndMessage) {
  try {
    OMNIQ_CHECK(1 + 1 == 3, "group size %d does not divide %d", 7, 256);
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("tests/test_runtime.cpp:"), std::string::npos) << what;
    EXPECT_NE(what.find("group size 7 does not divide 256"), std::string::npos) << what;
  }
  EXPECT_THROW(Device::parse("tpu"), Error);
  EXPECT_EQ(Device::parse("cuda:1"), Device::cuda(1));
}

TEST(RuntimeCuda, RoundTripAndConvert) {
  OMNIQ_REQUIRE_CUDA();
  Tensor h = Tensor::uniform({17, 33}, -3, 3, 1);
  Tensor d = h.to(Device::cuda());
  EXPECT_EQ(d.to(Device::cpu()).to_f32_vector(), h.to_f32_vector());
  // Device-side conversions agree bit-for-bit with the host ones (round to nearest even).
  EXPECT_EQ(d.to(DType::bf16).to_f32_vector(), h.to(DType::bf16).to_f32_vector());
  EXPECT_EQ(d.to(DType::f16).to_f32_vector(), h.to(DType::f16).to_f32_vector());
  Tensor z = Tensor::full({5}, 2.5f, DType::bf16, Device::cuda());
  EXPECT_EQ(z.to_f32_vector(), std::vector<float>(5, 2.5f));
  Tensor v = d.view_rows(3, 2).clone();
  EXPECT_EQ(v.to_f32_vector(), h.view_rows(3, 2).to_f32_vector());
}

TEST(RuntimeCuda, PoolCountersTrackLiveAndPeak) {
  OMNIQ_REQUIRE_CUDA();
  Device dev = Device::cuda();
  reset_peak_memory(dev);
  MemoryStats before = memory_stats(dev);
  {
    Tensor t = Tensor::empty({256, 1024}, DType::f32, dev);
    EXPECT_EQ(memory_stats(dev).live_bytes, before.live_bytes + (1 << 20));
  }
  EXPECT_EQ(memory_stats(dev).live_bytes, before.live_bytes);
  EXPECT_EQ(memory_stats(dev).peak_bytes, before.live_bytes + (1 << 20));
}

TEST(RuntimeCuda, OutOfMemoryIsAClearError) {
  OMNIQ_REQUIRE_CUDA();
  try {
    Tensor t = Tensor::empty({int64_t(1) << 40, 1024}, DType::f32, Device::cuda());
    FAIL() << "allocation of 4 PiB succeeded?";
  } catch (const OutOfMemoryError& e) {
    EXPECT_NE(std::string(e.what()).find("out of GPU memory"), std::string::npos) << e.what();
  }
}
