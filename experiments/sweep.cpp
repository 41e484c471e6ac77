#include "experiments/sweep.h"

#include <cstdlib>
#include <map>
#include <set>

#include "runtime/error.h"

namespace omniq {
namespace {

// One override: a setting, the YAML value to give it, and where that value was written. In a file
// with models: a run's value may be a map {model name: value}; it is then held in per_model and
// `value` is unused.
struct Override {
  std::string path;
  YAML::Node value;
  YAML::Mark mark;
  std::map<std::string, YAML::Node> per_model;
};

struct GridAxis {
  std::string path;
  YAML::Mark key_mark;
  std::vector<YAML::Node> values;
};

struct Run {
  std::string name;  // empty = named after its overrides
  YAML::Mark mark;
  std::vector<Override> overrides;
  std::vector<GridAxis> grid;  // the run's own `sweep:`, crossed after the top-level grid
};

struct ModelEntry {
  std::string name;  // empty = the file has no models: section
  YAML::Mark mark;
  std::vector<Override> overrides;
};

std::string leaf_of(const std::string& path) {
  size_t dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

// Keeps names usable as directory names on every filesystem we run on.
std::string sanitize(const std::string& s) {
  std::string out;
  for (char ch : s) {
    bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
              ch == '_' || ch == '+' || ch == '-';
    out += ok ? ch : '_';
  }
  return out;
}

// "wbits3", "group_size128", "rtn" (string values speak for themselves), "lwc" / "no_lwc".
std::string label(const std::string& key, const std::string& text) {
  if (text == "true") return key;
  if (text == "false") return "no_" + key;
  if (!text.empty() && text.front() == '[') {
    std::string inner = text.substr(1, text.size() - 2), joined;
    for (size_t i = 0; i < inner.size(); ++i) {
      if (inner.compare(i, 2, ", ") == 0) { joined += '+'; ++i; }
      else joined += inner[i];
    }
    return key + sanitize(joined);
  }
  bool numeric = !text.empty() && ((text[0] >= '0' && text[0] <= '9') || text[0] == '-' || text[0] == '.');
  return numeric ? key + sanitize(text) : sanitize(text);
}

// Checks one override's path and type up front (on a scratch config) so the error points at the
// sweep entry itself rather than at the first point that uses it.
void check_override(const std::string& path, const YAML::Node& key, const YAML::Node& value, const std::string& source,
                    const char* where) {
  if (path == "name")
    fail_at(source, key.Mark(), path, std::string("cannot be set in ") + where + ": it names the whole experiment");
  if (!is_experiment_field(path)) {
    std::string all;
    for (const std::string& p : experiment_field_paths())
      if (p != "name") all += (all.empty() ? "" : ", ") + p;
    fail_at(source, key.Mark(), path, std::string("unknown setting in ") + where + "; the settings are: " + all);
  }
  ExperimentConfig scratch;
  set_experiment_field(scratch, path, value, source, key.Mark());
}

std::vector<GridAxis> read_grid(const YAML::Node& sweep, const std::string& source) {
  std::vector<GridAxis> axes;
  if (!sweep || sweep.IsNull()) return axes;
  if (!sweep.IsMap())
    fail_at(source, sweep.Mark(), "sweep", "expected a map of dotted settings to lists, e.g. quantization.wbits: [2, 3, 4]");
  std::set<std::string> seen;
  for (const auto& kv : sweep) {
    if (!kv.first.IsScalar()) fail_at(source, kv.first.Mark(), "sweep", "expected a dotted setting name as key");
    const std::string path = kv.first.Scalar();
    const std::string shown = "sweep." + path;
    if (!seen.insert(path).second) fail_at(source, kv.first.Mark(), shown, "is given twice");
    const YAML::Node& list = kv.second;
    if (!list.IsSequence() || list.size() == 0)
      fail_at(source, list.Mark().is_null() ? kv.first.Mark() : list.Mark(), shown,
              "expected a non-empty list of values such as [2, 3, 4] (a single value belongs in the base config)");
    GridAxis axis{path, kv.first.Mark(), {}};
    for (const YAML::Node& v : list) {
      check_override(path, kv.first, v, source, "sweep:");
      axis.values.push_back(v);
    }
    axes.push_back(std::move(axis));
  }
  return axes;
}

// A run's value that is a map gives one value per model (recipes that differ by architecture).
Override read_run_value(const std::string& path, const YAML::Node& key, const YAML::Node& value,
                        const std::set<std::string>& models, const std::string& source) {
  Override o{path, value, value.Mark().is_null() ? key.Mark() : value.Mark(), {}};
  if (!value.IsMap()) {
    check_override(path, key, value, source, "runs:");
    return o;
  }
  if (models.empty())
    fail_at(source, value.Mark(), path,
            "a map value gives one value per model ({llama-small: true, opt-small: false}): it needs a models: section");
  for (const auto& kv : value) {
    const std::string m = kv.first.IsScalar() ? kv.first.Scalar() : "";
    if (!models.count(m)) {
      std::string all;
      for (const std::string& n : models) all += (all.empty() ? "" : ", ") + n;
      fail_at(source, kv.first.Mark(), path, "'" + m + "' is not a model of this file; the models are: " + all);
    }
    if (kv.second.IsMap()) fail_at(source, kv.second.Mark(), path + "." + m, "expected a single value");
    check_override(path, kv.first, kv.second, source, "runs:");
    o.per_model[m] = kv.second;
  }
  return o;
}

std::vector<Run> read_runs(const YAML::Node& runs, const std::set<std::string>& models, const std::string& source) {
  std::vector<Run> out;
  if (!runs || runs.IsNull()) return out;
  if (!runs.IsSequence() || runs.size() == 0)
    fail_at(source, runs.Mark(), "runs", "expected a non-empty list of runs, each a map such as {name: W4A16, quantization.wbits: 4}");
  for (size_t i = 0; i < runs.size(); ++i) {
    const YAML::Node& entry = runs[i];
    const std::string shown = "runs[" + std::to_string(i) + "]";
    if (!entry.IsMap()) fail_at(source, entry.Mark(), shown, "expected a map of dotted settings (and an optional name)");
    Run run;
    run.mark = entry.Mark();
    std::set<std::string> seen;
    for (const auto& kv : entry) {
      if (!kv.first.IsScalar()) fail_at(source, kv.first.Mark(), shown, "expected a dotted setting name as key");
      const std::string path = kv.first.Scalar();
      if (!seen.insert(path).second) fail_at(source, kv.first.Mark(), shown + "." + path, "is given twice");
      if (path == "name") {
        if (!kv.second.IsScalar() || kv.second.Scalar().empty())
          fail_at(source, kv.second.Mark().is_null() ? kv.first.Mark() : kv.second.Mark(), shown + ".name",
                  "expected a non-empty string");
        run.name = kv.second.Scalar();
        if (sanitize(run.name) != run.name)
          fail_at(source, kv.second.Mark(), shown + ".name",
                  "'" + run.name + "' is used as a directory name: use only letters, digits and . _ + -");
        continue;
      }
      if (path == "sweep") {
        run.grid = read_grid(kv.second, source);
        continue;
      }
      run.overrides.push_back(read_run_value(path, kv.first, kv.second, models, source));
    }
    out.push_back(std::move(run));
  }
  return out;
}

// models: {name: PATH} or {name: {dotted settings}}, in file order.
std::vector<ModelEntry> read_models(const YAML::Node& models, const std::string& source) {
  std::vector<ModelEntry> out;
  if (!models || models.IsNull()) return out;
  if (!models.IsMap() || models.size() == 0)
    fail_at(source, models.Mark(), "models",
            "expected a map of model names to folders, e.g. {llama-small: ${OMNIQ_ZOO_DIR}/llama-small}");
  for (const auto& kv : models) {
    const std::string name = kv.first.IsScalar() ? kv.first.Scalar() : "";
    if (name.empty() || sanitize(name) != name)
      fail_at(source, kv.first.Mark(), "models",
              "'" + name + "' names the model's points and directories: use only letters, digits and . _ + -");
    ModelEntry m{name, kv.first.Mark(), {}};
    const YAML::Node& v = kv.second;
    if (v.IsScalar()) {
      check_override("model.path", kv.first, v, source, "models:");
      m.overrides.push_back({"model.path", v, v.Mark(), {}});
    } else if (v.IsMap()) {
      std::set<std::string> seen;
      for (const auto& s : v) {
        const std::string path = s.first.IsScalar() ? s.first.Scalar() : "";
        if (!seen.insert(path).second) fail_at(source, s.first.Mark(), "models." + name + "." + path, "is given twice");
        check_override(path, s.first, s.second, source, "models:");
        m.overrides.push_back({path, s.second, s.second.Mark().is_null() ? s.first.Mark() : s.second.Mark(), {}});
      }
    } else {
      fail_at(source, v.Mark().is_null() ? kv.first.Mark() : v.Mark(), "models." + name,
              "expected the model folder, or a map of dotted settings such as {model.path: DIR, quantization.let: true}");
    }
    out.push_back(std::move(m));
  }
  return out;
}

// "${OMNIQ_ZOO_DIR}/opt-small" -> "/zoo/opt-small" when OMNIQ_ZOO_DIR is set; unset ones stay.
std::string expand_env(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    size_t end = s.compare(i, 2, "${") == 0 ? s.find('}', i + 2) : std::string::npos;
    if (end != std::string::npos && end > i + 2) {
      const char* v = std::getenv(s.substr(i + 2, end - i - 2).c_str());
      if (v) {
        out += v;
        i = end + 1;
        continue;
      }
    }
    out += s[i++];
  }
  return out;
}

}  // namespace

std::vector<SweepPoint> expand_sweep(const YAML::Node& root, const std::string& source) {
  ConfigLocations base_where;
  ExperimentConfig base = parse_experiment_fields(root, source, {"sweep", "runs", "models"}, &base_where);
  std::vector<GridAxis> grid = read_grid(root["sweep"], source);
  std::vector<ModelEntry> models = read_models(root["models"], source);
  std::set<std::string> model_names;
  for (const ModelEntry& m : models) model_names.insert(m.name);
  std::vector<Run> runs = read_runs(root["runs"], model_names, source);
  const bool explicit_runs = !runs.empty();
  if (runs.empty()) runs.push_back(Run{});        // no runs: = one run with no overrides
  if (models.empty()) models.push_back(ModelEntry{});  // no models: = the base's model

  // Leaf names label points ("wbits3"); when two varying settings share a leaf (quantization.seqlen
  // and eval.seqlen) both use their full path instead, so labels stay unambiguous.
  std::map<std::string, std::set<std::string>> leaf_paths;
  for (const GridAxis& a : grid) leaf_paths[leaf_of(a.path)].insert(a.path);
  for (const Run& r : runs) {
    for (const Override& o : r.overrides) leaf_paths[leaf_of(o.path)].insert(o.path);
    for (const GridAxis& a : r.grid) leaf_paths[leaf_of(a.path)].insert(a.path);
  }
  auto key_of = [&](const std::string& path) {
    const std::string leaf = leaf_of(path);
    if (leaf_paths[leaf].size() <= 1) return leaf;
    std::string k = path;
    for (char& ch : k)
      if (ch == '.') ch = '_';
    return k;
  };

  for (const Run& r : runs) {
    for (const GridAxis& own : r.grid)
      for (const GridAxis& a : grid)
        if (a.path == own.path)
          fail_at(source, own.key_mark, own.path,
                  "is swept by this run and also in the top-level sweep: (line " + std::to_string(a.key_mark.line + 1) +
                      "); sweep it in one place");
    for (const Override& o : r.overrides) {
      for (const GridAxis& a : grid)
        if (a.path == o.path)
          fail_at(source, o.mark, o.path,
                  "is set by a run and also swept in sweep: (line " + std::to_string(a.key_mark.line + 1) +
                      "); set it in one place");
      for (const GridAxis& a : r.grid)
        if (a.path == o.path)
          fail_at(source, o.mark, o.path, "is set by this run and also swept in its own sweep:; set it in one place");
    }
  }

  std::vector<SweepPoint> points;
  std::map<std::string, YAML::Mark> name_marks;
  for (const ModelEntry& m : models) {
    for (const Run& r : runs) {
      std::vector<const GridAxis*> axes;  // top-level axes first, then the run's own
      for (const GridAxis& a : grid) axes.push_back(&a);
      for (const GridAxis& a : r.grid) axes.push_back(&a);
      size_t grid_points = 1;
      for (const GridAxis* a : axes) grid_points *= a->values.size();

      for (size_t g = 0; g < grid_points; ++g) {
        // Decode g into one index per axis, the last axis fastest (first key varies slowest).
        std::vector<size_t> idx(axes.size());
        size_t rest = g;
        for (size_t a = axes.size(); a-- > 0;) {
          idx[a] = rest % axes[a]->values.size();
          rest /= axes[a]->values.size();
        }
        SweepPoint p;
        p.model = m.name;
        p.config = base;
        ConfigLocations where = base_where;
        std::vector<std::string> parts;
        if (!m.name.empty()) parts.push_back(m.name);
        for (const Override& o : m.overrides) {
          set_experiment_field(p.config, o.path, o.value, source, o.mark);
          where.marks[o.path] = o.mark;
        }
        if (!r.name.empty()) parts.push_back(r.name);
        for (const Override& o : r.overrides) {
          const YAML::Node* v = &o.value;
          if (!o.per_model.empty()) {
            auto it = o.per_model.find(m.name);
            if (it == o.per_model.end()) continue;  // this model keeps its own value
            v = &it->second;
          }
          set_experiment_field(p.config, o.path, *v, source, o.mark);
          where.marks[o.path] = v->Mark().is_null() ? o.mark : v->Mark();
          p.settings.emplace_back(o.path, experiment_field_text(p.config, o.path));
          if (r.name.empty()) parts.push_back(label(key_of(o.path), p.settings.back().second));
        }
        for (size_t a = 0; a < axes.size(); ++a) {
          const YAML::Node& v = axes[a]->values[idx[a]];
          set_experiment_field(p.config, axes[a]->path, v, source);
          where.marks[axes[a]->path] = v.Mark();
          p.settings.emplace_back(axes[a]->path, experiment_field_text(p.config, axes[a]->path));
          parts.push_back(label(key_of(axes[a]->path), p.settings.back().second));
        }
        for (size_t i = 0; i < parts.size(); ++i) p.name += (i ? "-" : "") + parts[i];
        if (p.name.empty()) p.name = base.name.empty() ? "run" : sanitize(base.name);
        p.config.model.path = expand_env(p.config.model.path);

        const YAML::Mark point_mark =
            explicit_runs ? r.mark : (!axes.empty() ? axes[0]->key_mark : (m.name.empty() ? YAML::Mark() : m.mark));
        try {
          validate_experiment(p.config, where);
        } catch (const Error& e) {
          throw Error(std::string(e.what()) + " (in sweep point '" + p.name + "')");
        }
        auto [it, fresh] = name_marks.emplace(p.name, point_mark);
        if (!fresh)
          fail_at(source, point_mark, "runs", "two sweep points are both named '" + p.name + "' (the first at line " +
                                                  std::to_string(it->second.line + 1) +
                                                  "): give the runs distinct name: keys");
        points.push_back(std::move(p));
      }
    }
  }
  return points;
}

std::vector<SweepPoint> parse_sweep(const std::string& yaml_text, const std::string& source) {
  return expand_sweep(load_yaml_text(yaml_text, source), source);
}

std::vector<SweepPoint> load_sweep(const std::string& path) { return parse_sweep(read_config_file(path), path); }

}  // namespace omniq
