#include "experiments/cli/args.h"

#include <cstdio>
#include <cstdlib>

#include "runtime/error.h"

namespace omniq::cli {

void Args::option(const std::string& name, const std::string& value_name, const std::string& help,
                  const std::string& default_value) {
  order_.push_back(name);
  specs_[name] = Spec{value_name, help, default_value, false, false};
}

void Args::flag(const std::string& name, const std::string& help) {
  order_.push_back(name);
  specs_[name] = Spec{"", help, "", true, false};
}

void Args::repeated(const std::string& name, const std::string& value_name, const std::string& help) {
  order_.push_back(name);
  specs_[name] = Spec{value_name, help, "", false, true};
}

bool Args::parse(int argc, char** argv) {
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(help().c_str(), stdout);
      return false;
    }
    OMNIQ_CHECK(a.rfind("--", 0) == 0, "omniq %s: unexpected argument '%s' (options start with --; see omniq %s --help)",
                command_.c_str(), a.c_str(), command_.c_str());
    std::string name = a.substr(2), value;
    bool inline_value = false;
    size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    auto it = specs_.find(name);
    OMNIQ_CHECK(it != specs_.end(), "omniq %s: unknown option --%s (see omniq %s --help)", command_.c_str(),
                name.c_str(), command_.c_str());
    if (it->second.is_flag) {
      OMNIQ_CHECK(!inline_value || value == "true" || value == "false", "omniq %s: --%s takes no value",
                  command_.c_str(), name.c_str());
      values_[name] = {inline_value ? value : "true"};
      continue;
    }
    if (!inline_value) {
      OMNIQ_CHECK(i + 1 < argc, "omniq %s: --%s needs a value (%s)", command_.c_str(), name.c_str(),
                  it->second.value_name.c_str());
      value = argv[++i];
    }
    if (it->second.is_repeated) {
      values_[name].push_back(value);
    } else {
      values_[name] = {value};
    }
  }
  return true;
}

std::string Args::get(const std::string& name) const {
  auto v = values_.find(name);
  if (v != values_.end() && !v->second.empty()) return v->second.back();
  auto s = specs_.find(name);
  OMNIQ_CHECK(s != specs_.end(), "internal: option --%s was not declared", name.c_str());
  return s->second.default_value;
}

bool Args::has(const std::string& name) const { return values_.count(name) > 0; }

bool Args::flag_set(const std::string& name) const { return has(name) && get(name) == "true"; }

std::vector<std::string> Args::all(const std::string& name) const {
  auto v = values_.find(name);
  return v == values_.end() ? std::vector<std::string>{} : v->second;
}

int Args::get_int(const std::string& name) const {
  std::string s = get(name);
  char* end = nullptr;
  long v = std::strtol(s.c_str(), &end, 10);
  OMNIQ_CHECK(!s.empty() && end && *end == '\0', "omniq %s: --%s expects an integer, got '%s'", command_.c_str(),
              name.c_str(), s.c_str());
  return static_cast<int>(v);
}

double Args::get_double(const std::string& name) const {
  std::string s = get(name);
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  OMNIQ_CHECK(!s.empty() && end && *end == '\0', "omniq %s: --%s expects a number, got '%s'", command_.c_str(),
              name.c_str(), s.c_str());
  return v;
}

std::string Args::help() const {
  std::string h = "usage: omniq " + command_ + " [options]\n\n" + summary_ + "\n\noptions:\n";
  for (const std::string& name : order_) {
    const Spec& s = specs_.at(name);
    std::string left = "  --" + name + (s.is_flag ? "" : " " + s.value_name);
    if (left.size() < 28) left.resize(28, ' ');
    else left += "\n" + std::string(28, ' ');
    h += left + s.help;
    if (!s.default_value.empty()) h += " (default: " + s.default_value + ")";
    if (s.is_repeated) h += " (repeatable)";
    h += "\n";
  }
  h += "  --help                    show this help\n";
  if (!examples_.empty()) {
    h += "\nexamples:\n";
    for (const std::string& e : examples_) h += "  " + e + "\n";
  }
  return h;
}

}  // namespace omniq::cli
