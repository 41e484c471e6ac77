// Test-only helpers for the checkpoint tests: temp dirs, a tiny independent safetensors parser and
// writer (written from the format description, sharing no code with models/safetensors.cpp, so the
// reader is checked against a second implementation), and an error-message matcher.
#pragma once
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/error.h"

namespace omniq::test {

inline std::string read_file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot read " << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void write_file_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  ASSERT_TRUE(out.good()) << "cannot write " << path;
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A fresh directory under gtest's temp dir (removed by the OS / CI; tests never depend on leftovers).
inline std::string make_temp_dir(const std::string& tag) {
  std::string tmpl = ::testing::TempDir() + "omniq_" + tag + "_XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  char* p = ::mkdtemp(buf.data());
  EXPECT_NE(p, nullptr) << "mkdtemp failed for " << tmpl;
  return p ? std::string(p) : std::string();
}

struct RawEntry {
  std::string name;
  std::string dtype;          // "F16", ...
  std::vector<int64_t> dims;
  std::string bytes;
};

// Independent parse: 8-byte little-endian length, JSON header, data section.
inline std::vector<RawEntry> parse_safetensors_independently(const std::string& path) {
  std::string f = read_file_bytes(path);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(f[i])) << (8 * i);
  nlohmann::json h = nlohmann::json::parse(f.substr(8, n));
  std::vector<RawEntry> out;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    RawEntry e;
    e.name = it.key();
    e.dtype = it.value()["dtype"].get<std::string>();
    e.dims = it.value()["shape"].get<std::vector<int64_t>>();
    uint64_t b = it.value()["data_offsets"][0].get<uint64_t>(), end = it.value()["data_offsets"][1].get<uint64_t>();
    e.bytes = f.substr(8 + n + b, end - b);
    out.push_back(std::move(e));
  }
  return out;
}

inline std::map<std::string, RawEntry> by_name(std::vector<RawEntry> v) {
  std::map<std::string, RawEntry> m;
  for (RawEntry& e : v) m[e.name] = std::move(e);
  return m;
}

// Writes a raw file: little-endian length of `header`, `header`, `data`.
inline void write_raw_safetensors(const std::string& path, const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  write_file_bytes(path, out + header + data);
}

// Writes well-formed safetensors with the entries packed in order.
inline void write_safetensors(const std::string& path, const std::vector<RawEntry>& entries) {
  nlohmann::json h = nlohmann::json::object();
  h["__metadata__"] = {{"format", "pt"}};
  std::string data;
  for (const RawEntry& e : entries) {
    h[e.name] = {{"dtype", e.dtype}, {"shape", e.dims}, {"data_offsets", {data.size(), data.size() + e.bytes.size()}}};
    data += e.bytes;
  }
  write_raw_safetensors(path, h.dump(), data);
}

inline void copy_file(const std::string& from, const std::string& to) { write_file_bytes(to, read_file_bytes(from)); }

// Runs fn, expects an omniq::Error whose one-line message contains every string in `parts`.
inline ::testing::AssertionResult throws_with(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const omniq::Error& e) {
    std::string msg = e.what();
    if (msg.find('\n') != std::string::npos) return ::testing::AssertionFailure() << "multi-line message: " << msg;
    for (const std::string& p : parts)
      if (msg.find(p) == std::string::npos)
        return ::testing::AssertionFailure() << "message lacks \"" << p << "\": " << msg;
    if (std::getenv("OMNIQ_PRINT_ERRORS")) std::printf("  error: %s\n", msg.c_str());  // to review wording
    return ::testing::AssertionSuccess() << msg;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-omniq exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

}  // namespace omniq::test
