// Named evaluation/calibration texts bundled with omniq (data/text), and reading any text file.
#pragma once
#include <string>
#include <vector>

namespace omniq {

// "wikitext2" -> the WikiText-2 raw test split; "wikitext2-valid" -> the valid split (the default
// calibration text). The data folder is $OMNIQ_DATA_DIR if set, else the source tree's data/.
std::string dataset_path(const std::string& name);
std::vector<std::string> dataset_names();
std::string data_dir();

// Whole file as bytes; a clear error when missing, unreadable or not valid UTF-8.
std::string read_text_file(const std::string& path);

}  // namespace omniq
