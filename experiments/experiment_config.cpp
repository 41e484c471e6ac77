#include "experiments/experiment_config.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "runtime/error.h"

namespace omniq {
namespace {

// The one list of the schema: parsing, emitting, sweeps and equality all walk it, so adding a
// field here is the only edit a new setting needs. `f(path, member)` is called in schema order.
template <class F>
void for_each_field(ExperimentConfig& c, F&& f) {
  QuantConfig& q = c.quantization;
  f("name", c.name);
  f("model.path", c.model.path);
  f("data.calib_text", q.calib_text);
  f("data.eval_datasets", c.data.eval_datasets);
  f("data.eval_texts", c.data.eval_texts);
  f("quantization.method", q.method);
  f("quantization.wbits", q.wbits);
  f("quantization.abits", q.abits);
  f("quantization.group_size", q.group_size);
  f("quantization.symmetric", q.symmetric);
  f("quantization.lwc", q.lwc);
  f("quantization.let", q.let);
  f("quantization.aug_loss", q.aug_loss);
  f("quantization.gptq", q.gptq);
  f("quantization.epochs", q.epochs);
  f("quantization.nsamples", q.nsamples);
  f("quantization.seqlen", q.seqlen);
  f("quantization.seed", q.seed);
  f("quantization.lwc_lr", q.lwc_lr);
  f("quantization.let_lr", q.let_lr);
  f("quantization.weight_decay", q.weight_decay);
  f("quantization.let_alpha", q.let_alpha);
  f("quantization.let_scale_floor", q.let_scale_floor);
  f("quantization.max_nan_retries", q.max_nan_retries);
  f("eval.seqlen", c.eval.seqlen);
  f("eval.dtype", c.eval.dtype);
  f("device", c.device);
  f("output.dir", c.output.dir);
}

const char* const kSections[] = {"model", "data", "quantization", "eval", "output"};

bool is_section(const std::string& key) {
  for (const char* s : kSections)
    if (key == s) return true;
  return false;
}

std::string section_of(const std::string& path) {
  size_t dot = path.find('.');
  return dot == std::string::npos ? std::string() : path.substr(0, dot);
}

// What a node is, for "expected an integer, got ..." messages.
std::string describe(const YAML::Node& v) {
  switch (v.Type()) {
    case YAML::NodeType::Scalar: return "'" + v.Scalar() + "'";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a map";
    default: return "nothing (an empty value)";
  }
}

// Typed conversions. yaml-cpp's as<T>() is already strict about trailing characters ("3.5" is not
// an int); the extra checks below catch what it lets through (negative seeds, float overflow).
struct Converter {
  const std::string& source;
  const std::string& path;
  YAML::Mark key_mark;

  [[noreturn]] void wrong(const YAML::Node& v, const char* expected) const {
    bool use_key = (v.IsNull() || v.Mark().is_null()) && !key_mark.is_null();
    fail_at(source, use_key ? key_mark : v.Mark(), path, std::string("expected ") + expected + ", got " + describe(v));
  }
  void operator()(const YAML::Node& v, std::string& out) const {
    if (v.IsNull()) { out.clear(); return; }  // `calib_text:` with nothing = the empty string
    if (!v.IsScalar()) wrong(v, "a string");
    out = v.Scalar();
  }
  void operator()(const YAML::Node& v, int& out) const {
    int x = 0;
    if (!v.IsScalar() || !YAML::convert<int>::decode(v, x)) wrong(v, "an integer");
    out = x;
  }
  void operator()(const YAML::Node& v, uint64_t& out) const {
    if (!v.IsScalar() || v.Scalar().empty()) wrong(v, "a non-negative integer");
    const std::string& s = v.Scalar();
    for (char ch : s)
      if (ch < '0' || ch > '9') wrong(v, "a non-negative integer");
    errno = 0;
    unsigned long long x = std::strtoull(s.c_str(), nullptr, 10);
    if (errno == ERANGE) wrong(v, "an integer below 2^64");
    out = static_cast<uint64_t>(x);
  }
  void operator()(const YAML::Node& v, bool& out) const {
    bool x = false;
    if (!v.IsScalar() || !YAML::convert<bool>::decode(v, x)) wrong(v, "true or false");
    out = x;
  }
  void operator()(const YAML::Node& v, float& out) const {
    double x = 0;
    if (!v.IsScalar() || !YAML::convert<double>::decode(v, x)) wrong(v, "a number");
    if (std::isfinite(x) && std::fabs(x) > std::numeric_limits<float>::max()) wrong(v, "a number in float range");
    out = static_cast<float>(x);
  }
  void operator()(const YAML::Node& v, std::vector<std::string>& out) const {
    if (v.IsNull()) { out.clear(); return; }
    if (!v.IsSequence()) wrong(v, "a list of strings such as [a, b]");
    std::vector<std::string> xs;
    for (const YAML::Node& e : v) {
      if (!e.IsScalar()) fail_at(source, e.Mark(), path, "expected a list of strings, got an element that is " + describe(e));
      xs.push_back(e.Scalar());
    }
    out = std::move(xs);
  }
};

// Shortest decimal that reads back to the same float (%.9g always does; try shorter first so the
// emitted file says 0.01, not 0.00999999978).
std::string float_text(float x) {
  for (int prec = 6; prec <= 9; ++prec) {
    std::string s = strformat("%.*g", prec, static_cast<double>(x));
    if (std::strtof(s.c_str(), nullptr) == x) return s;
  }
  return strformat("%.9g", static_cast<double>(x));
}

// Text form of one field (also the value written into to_yaml's tree).
struct ToText {
  std::string operator()(const std::string& s) const { return s; }
  std::string operator()(int x) const { return std::to_string(x); }
  std::string operator()(uint64_t x) const { return std::to_string(x); }
  std::string operator()(bool x) const { return x ? "true" : "false"; }
  std::string operator()(float x) const { return float_text(x); }
  std::string operator()(const std::vector<std::string>& xs) const {
    std::string s = "[";
    for (size_t i = 0; i < xs.size(); ++i) s += (i ? ", " : "") + xs[i];
    return s + "]";
  }
};

std::string join(const std::vector<std::string>& xs) {
  std::string s;
  for (size_t i = 0; i < xs.size(); ++i) s += (i ? ", " : "") + xs[i];
  return s;
}

std::vector<std::string> keys_of_section(const std::string& section) {
  std::vector<std::string> keys;
  for (const std::string& p : experiment_field_paths())
    if (section_of(p) == section) keys.push_back(section.empty() ? p : p.substr(section.size() + 1));
  return keys;
}

// QuantConfig::validate's message carries "quant_config.cpp:NN: " — the user needs the YAML line,
// not ours, so keep only the sentence.
std::string strip_code_location(const std::string& what) {
  size_t cpp = what.find(".cpp:");
  if (cpp == std::string::npos) return what;
  size_t sep = what.find(": ", cpp);
  return sep == std::string::npos ? what : what.substr(sep + 2);
}

}  // namespace

YAML::Mark ConfigLocations::find(const std::string& path) const {
  auto it = marks.find(path);
  if (it != marks.end()) return it->second;
  it = marks.find(section_of(path));
  if (!section_of(path).empty() && it != marks.end()) return it->second;
  YAML::Mark m;
  m.pos = 0, m.line = 0, m.column = 0;
  return m;
}

void fail_at(const std::string& source, const YAML::Mark& mark, const std::string& path, const std::string& message) {
  std::string where = mark.is_null() ? source : strformat("%s:%d:%d", source.c_str(), mark.line + 1, mark.column + 1);
  if (path.empty()) throw Error(where + ": " + message);
  throw Error(path + " at " + where + ": " + message);
}

const std::vector<std::string>& experiment_field_paths() {
  static const std::vector<std::string> paths = [] {
    std::vector<std::string> p;
    ExperimentConfig c;
    for_each_field(c, [&](const char* path, auto&) { p.emplace_back(path); });
    return p;
  }();
  return paths;
}

bool is_experiment_field(const std::string& path) {
  for (const std::string& p : experiment_field_paths())
    if (p == path) return true;
  return false;
}

void set_experiment_field(ExperimentConfig& c, const std::string& path, const YAML::Node& value,
                          const std::string& source, const YAML::Mark& key_mark) {
  bool found = false;
  Converter conv{source, path, key_mark};
  for_each_field(c, [&](const char* p, auto& member) {
    if (!found && path == p) {
      conv(value, member);
      found = true;
    }
  });
  if (!found)
    fail_at(source, key_mark.is_null() ? value.Mark() : key_mark, path,
            "unknown setting; the settings are: " + join(experiment_field_paths()));
}

std::string experiment_field_text(const ExperimentConfig& c, const std::string& path) {
  std::string text;
  bool found = false;
  for_each_field(const_cast<ExperimentConfig&>(c), [&](const char* p, auto& member) {
    if (!found && path == p) {
      text = ToText{}(member);
      found = true;
    }
  });
  OMNIQ_CHECK(found, "unknown experiment setting '%s'", path.c_str());
  return text;
}

YAML::Node load_yaml_text(const std::string& yaml_text, const std::string& source) {
  try {
    return YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    fail_at(source, e.mark, "", "malformed YAML: " + e.msg);
  }
}

std::string read_config_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  OMNIQ_CHECK(f.good(), "cannot open experiment config '%s'", path.c_str());
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

ExperimentConfig parse_experiment_fields(const YAML::Node& root, const std::string& source,
                                         const std::vector<std::string>& extra_top_keys, ConfigLocations* where) {
  if (root.IsNull()) fail_at(source, YAML::Mark(), "", "the file is empty: expected a map with model:, quantization:, ...");
  if (!root.IsMap()) fail_at(source, root.Mark(), "", "expected a map of sections (model:, data:, quantization:, ...) at the top level, got " + describe(root));
  ConfigLocations local;
  ConfigLocations& loc = where ? *where : local;
  loc.source = source;
  ExperimentConfig c;

  // yaml-cpp keeps duplicate keys silently; a repeated key in a config is almost always a mistake.
  auto check_duplicate = [&](std::set<std::string>& seen, const YAML::Node& key, const std::string& path) {
    if (!seen.insert(key.Scalar()).second) fail_at(source, key.Mark(), path, "is given twice");
  };
  auto remember = [&](const std::string& path, const YAML::Node& key, const YAML::Node& value) {
    loc.marks[path] = value.Mark().is_null() ? key.Mark() : value.Mark();
  };

  std::vector<std::string> top_keys = keys_of_section("");
  for (const char* s : kSections) top_keys.emplace_back(s);
  for (const std::string& s : extra_top_keys) top_keys.push_back(s);

  std::set<std::string> seen_top;
  for (const auto& kv : root) {
    const YAML::Node& key = kv.first;
    const YAML::Node& value = kv.second;
    if (!key.IsScalar()) fail_at(source, key.Mark(), "", "expected a section name, got " + describe(key));
    const std::string k = key.Scalar();
    check_duplicate(seen_top, key, k);
    bool extra = false;
    for (const std::string& s : extra_top_keys) extra = extra || s == k;
    if (extra) continue;
    if (is_experiment_field(k)) {
      remember(k, key, value);
      set_experiment_field(c, k, value, source, key.Mark());
      continue;
    }
    if (!is_section(k)) fail_at(source, key.Mark(), k, "unknown key; the top-level keys are: " + join(top_keys));
    loc.marks[k] = key.Mark();
    if (value.IsNull()) continue;  // `eval:` with nothing under it = all defaults
    if (!value.IsMap()) fail_at(source, value.Mark(), k, "expected a map of settings, got " + describe(value));
    std::set<std::string> seen;
    for (const auto& sub : value) {
      if (!sub.first.IsScalar()) fail_at(source, sub.first.Mark(), k, "expected a setting name, got " + describe(sub.first));
      const std::string path = k + "." + sub.first.Scalar();
      check_duplicate(seen, sub.first, path);
      if (!is_experiment_field(path))
        fail_at(source, sub.first.Mark(), path, "unknown key; the keys of " + k + " are: " + join(keys_of_section(k)));
      remember(path, sub.first, sub.second);
      set_experiment_field(c, path, sub.second, source, sub.first.Mark());
    }
  }
  return c;
}

void validate_quantization(const QuantConfig& q) {
  if (!is_unquantized(q)) return q.validate();
  // QuantConfig refuses W16A16 (calibrate_model would have nothing to do); here it is the FP16
  // baseline, so every other field is checked as it would be with quantized weights.
  QuantConfig probe = q;
  probe.wbits = 8;
  probe.validate();
}

void validate_experiment(const ExperimentConfig& c, const ConfigLocations& where) {
  const std::string& src = where.source;
  auto fail = [&](const std::string& path, const std::string& msg) { fail_at(src, where.find(path), path, msg); };

  try {
    validate_quantization(c.quantization);
  } catch (const Error& e) {
    // Find the key to blame: the first field that is invalid on its own (set alone on top of the
    // defaults). A combination that is only wrong together (W16A16) blames the first field that
    // differs from the defaults, else the section.
    std::string culprit = "quantization";
    for_each_field(const_cast<ExperimentConfig&>(c), [&](const char* p, auto& member) {
      if (culprit != "quantization" || section_of(p) != "quantization") return;
      ExperimentConfig one;
      bool differs = false;
      for_each_field(one, [&](const char* q, auto& m2) {
        using A = std::decay_t<decltype(member)>;
        using B = std::decay_t<decltype(m2)>;
        if constexpr (std::is_same_v<A, B>) {
          if (std::string(p) == q) {
            differs = !(m2 == member);
            m2 = member;
          }
        }
      });
      if (!differs) return;
      try {
        validate_quantization(one.quantization);
      } catch (const Error&) {
        culprit = p;
      }
    });
    if (culprit == "quantization" && where.marks.count("quantization.wbits")) culprit = "quantization.wbits";
    fail(culprit, strip_code_location(e.what()));
  }

  if (c.model.path.empty()) fail("model.path", "is required: the Hugging Face model folder to quantize");
  const std::string& d = c.device;
  bool device_ok = d == "cpu" || d == "cuda" || d == "auto";
  if (d.size() > 5 && d.compare(0, 5, "cuda:") == 0) {
    device_ok = true;
    for (size_t i = 5; i < d.size(); ++i) device_ok = device_ok && d[i] >= '0' && d[i] <= '9';
  }
  if (!device_ok) fail("device", "unknown device '" + d + "': use cpu, cuda, cuda:N or auto");
  const std::string& dt = c.eval.dtype;
  if (!(dt.empty() || dt == "f32" || dt == "bf16" || dt == "f16"))
    fail("eval.dtype", "unknown dtype '" + dt + "': use f32, bf16 or f16 (or leave empty: f32 on cpu, bf16 on cuda)");
  if (d == "cpu" && !dt.empty() && dt != "f32") fail("eval.dtype", "dtype " + dt + " on the CPU: the CPU path computes in f32");
  if (c.eval.seqlen < 0 || c.eval.seqlen == 1)
    fail("eval.seqlen", strformat("must be 0 (model default) or >= 2, got %d", c.eval.seqlen));
  for (const std::string& ds : c.data.eval_datasets)
    if (ds != "wikitext2") fail("data.eval_datasets", "unknown dataset '" + ds + "': the bundled datasets are: wikitext2 (use data.eval_texts for your own files)");
  for (const std::string& t : c.data.eval_texts)
    if (t.empty()) fail("data.eval_texts", "an entry is empty: give a text file path");
  if (c.output.dir.empty()) fail("output.dir", "is empty: give the directory that run folders go into");
}

ExperimentConfig parse_experiment(const std::string& yaml_text, const std::string& source_name) {
  // const: a non-const operator[] would insert the key it looks up.
  const YAML::Node root = load_yaml_text(yaml_text, source_name);
  if (root.IsMap())
    for (const char* k : {"sweep", "runs"})
      if (root[k]) fail_at(source_name, root[k].Mark(), k, "this file is a sweep: expand it with expand_sweep (`omniq sweep`), not as a single run");
  ConfigLocations where;
  ExperimentConfig c = parse_experiment_fields(root, source_name, {}, &where);
  validate_experiment(c, where);
  return c;
}

ExperimentConfig load_experiment(const std::string& path) { return parse_experiment(read_config_file(path), path); }

std::string to_yaml(const ExperimentConfig& c) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  std::string open_section;
  for_each_field(const_cast<ExperimentConfig&>(c), [&](const char* p, auto& member) {
    const std::string path = p;
    const std::string section = section_of(path);
    if (section != open_section) {
      if (!open_section.empty()) out << YAML::EndMap;
      if (!section.empty()) out << YAML::Key << section << YAML::Value << YAML::BeginMap;
      open_section = section;
    }
    out << YAML::Key << (section.empty() ? path : path.substr(section.size() + 1)) << YAML::Value;
    using T = std::decay_t<decltype(member)>;
    if constexpr (std::is_same_v<T, std::vector<std::string>>) {
      out << YAML::Flow << YAML::BeginSeq;
      for (const std::string& s : member) out << YAML::DoubleQuoted << s;
      out << YAML::EndSeq;
    } else if constexpr (std::is_same_v<T, std::string>) {
      out << YAML::DoubleQuoted << member;  // quoted: "yes" or "16" must read back as strings
    } else {
      out << ToText{}(member);
    }
  });
  if (!open_section.empty()) out << YAML::EndMap;
  out << YAML::EndMap;
  OMNIQ_CHECK(out.good(), "to_yaml: YAML emitter failed: %s", out.GetLastError().c_str());
  return std::string(out.c_str()) + "\n";
}

namespace {
// An exact, unambiguous text of one field for equality: floats in hex (%a), list elements with
// their lengths (so ["a, b"] and [a, b] differ).
struct ExactText {
  std::string operator()(float x) const { return strformat("%a", static_cast<double>(x)); }
  std::string operator()(const std::vector<std::string>& xs) const {
    std::string s;
    for (const std::string& x : xs) s += std::to_string(x.size()) + ":" + x + ";";
    return s;
  }
  template <class T>
  std::string operator()(const T& x) const { return ToText{}(x); }
};
}  // namespace

bool operator==(const ExperimentConfig& a, const ExperimentConfig& b) {
  // Both walks visit the fields in the same order, so the k-th texts belong to the same field.
  std::vector<std::string> ta, tb;
  for_each_field(const_cast<ExperimentConfig&>(a), [&](const char*, auto& m) { ta.push_back(ExactText{}(m)); });
  for_each_field(const_cast<ExperimentConfig&>(b), [&](const char*, auto& m) { tb.push_back(ExactText{}(m)); });
  return ta == tb;
}

}  // namespace omniq
