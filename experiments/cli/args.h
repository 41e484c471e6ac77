// A small command-line parser for the omniq subcommands: `--name value`, `--name=value` and
// boolean `--flag` options, each declared with a help line so `--help` teaches what it does.
#pragma once
#include <map>
#include <string>
#include <vector>

namespace omniq::cli {

class Args {
 public:
  Args(std::string command, std::string summary) : command_(std::move(command)), summary_(std::move(summary)) {}

  // Declarations (call before parse). `value_name` appears in the help, e.g. "DIR".
  void option(const std::string& name, const std::string& value_name, const std::string& help,
              const std::string& default_value = "");
  void flag(const std::string& name, const std::string& help);
  void repeated(const std::string& name, const std::string& value_name, const std::string& help);
  void example(const std::string& line) { examples_.push_back(line); }

  // Returns false when --help was asked (help already printed). Throws omniq::Error on unknown
  // options or missing values, naming the option and pointing at --help.
  bool parse(int argc, char** argv);

  std::string get(const std::string& name) const;      // value or default ("" if none)
  bool has(const std::string& name) const;             // given on the command line
  bool flag_set(const std::string& name) const;
  std::vector<std::string> all(const std::string& name) const;  // repeated option values
  int get_int(const std::string& name) const;          // with a clear error for non-integers
  double get_double(const std::string& name) const;
  std::string help() const;

 private:
  struct Spec {
    std::string value_name, help, default_value;
    bool is_flag = false, is_repeated = false;
  };
  std::string command_, summary_;
  std::vector<std::string> order_;
  std::map<std::string, Spec> specs_;
  std::map<std::string, std::vector<std::string>> values_;
  std::vector<std::string> examples_;
};

}  // namespace omniq::cli
