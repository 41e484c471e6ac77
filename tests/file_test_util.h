// Small file-system helpers shared by tests that write folders and files (tests/test_hf_export.cpp,
// tests/test_safetensors_writer.cpp, tests/test_runner.cpp, tests/test_sweep_paper.cpp).
#pragma once
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace omniq::file_test {

// The names in `dir` (without "." and ".."), sorted; empty when it cannot be opened.
inline std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d))
    if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) out.push_back(e->d_name);
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

// stat() succeeds: the path exists (a symlink counts only when its target does).
inline bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

// The whole file as bytes ("" when it cannot be read).
inline std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// Writes `s` to `p`, replacing it.
inline void spit(const std::string& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

}  // namespace omniq::file_test
