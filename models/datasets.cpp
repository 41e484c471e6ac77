#include "models/datasets.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "runtime/error.h"

namespace omniq {

namespace {
struct Named {
  const char* name;
  const char* rel;
};
const Named kDatasets[] = {
    {"wikitext2", "text/wikitext2-raw/wiki.test.raw"},
    {"wikitext2-valid", "text/wikitext2/wiki.valid.tokens"},
};

// Index of the first byte that is not part of a valid UTF-8 sequence, or npos.
size_t find_invalid_utf8(const std::string& s) {
  size_t i = 0, n = s.size();
  while (i < n) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > n) return i;
    for (int k = 1; k < len; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return i;
    i += len;
  }
  return std::string::npos;
}
}  // namespace

std::string data_dir() {
  if (const char* env = std::getenv("OMNIQ_DATA_DIR")) return env;
  return OMNIQ_DATA_DIR;
}

std::vector<std::string> dataset_names() {
  std::vector<std::string> out;
  for (const Named& d : kDatasets) out.push_back(d.name);
  return out;
}

std::string dataset_path(const std::string& name) {
  for (const Named& d : kDatasets)
    if (name == d.name) return data_dir() + "/" + d.rel;
  std::string known;
  for (const Named& d : kDatasets) known += std::string(known.empty() ? "" : ", ") + d.name;
  OMNIQ_FAIL("unknown dataset '%s': known datasets are %s (or pass a text file with --text FILE)", name.c_str(),
             known.c_str());
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  OMNIQ_CHECK(f.good(), "cannot open text file '%s': check the path (OMNIQ_DATA_DIR=%s)", path.c_str(),
              data_dir().c_str());
  std::ostringstream ss;
  ss << f.rdbuf();
  std::string text = ss.str();
  size_t bad = find_invalid_utf8(text);
  OMNIQ_CHECK(bad == std::string::npos, "text file '%s' is not valid UTF-8 (first bad byte at offset %zu)",
              path.c_str(), bad);
  return text;
}

}  // namespace omniq
