// Loading: `tokenizer.json` (the serialized form of the `tokenizers` library), the GPT-2 file pair
// vocab.json + merges.txt, and Hugging Face model folders. Every component is checked against the
// supported subset; anything else is an error that names the file, the component and the list of
// what is supported, so a user knows at load time rather than from wrong ids later.
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <sys/stat.h>

#include "models/tokenizer_impl.h"
#include "runtime/error.h"

namespace omniq {

using json = nlohmann::json;
using namespace tok;

namespace {

const char* kSupportedModels = "supported: BPE";
const char* kSupportedNormalizers = "supported: Sequence, Prepend, Replace with a String pattern";
const char* kSupportedPreTokenizers = "supported: Metaspace, ByteLevel, Sequence of those";
const char* kSupportedPostProcessors =
    "supported: TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel, Sequence of those";
const char* kSupportedDecoders =
    "supported: Sequence, Replace with a String pattern, ByteFallback, Fuse, Strip, ByteLevel, Metaspace";

bool file_exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string read_text_file(const std::string& path, const char* what) {
  std::ifstream f(path, std::ios::binary);
  OMNIQ_CHECK(f.good(), "%s '%s' cannot be opened (missing or unreadable)", what, path.c_str());
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

json read_json_file(const std::string& path, const char* what) {
  std::string text = read_text_file(path, what);
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    OMNIQ_FAIL("%s '%s' is not valid JSON: %s", what, path.c_str(), e.what());
  }
}

std::string type_of(const json& j, const std::string& src, const char* component) {
  OMNIQ_CHECK(j.is_object() && j.contains("type") && j["type"].is_string(),
              "tokenizer '%s': the %s has no \"type\" string", src.c_str(), component);
  return j["type"].get<std::string>();
}

bool get_bool(const json& j, const char* key, bool def) {
  auto it = j.find(key);
  return (it == j.end() || it->is_null()) ? def : it->get<bool>();
}

std::string get_string(const json& j, const char* key, const std::string& def) {
  auto it = j.find(key);
  return (it == j.end() || it->is_null()) ? def : it->get<std::string>();
}

// A Replace's pattern: {"String": "..."}; a Regex pattern is not supported.
std::string string_pattern(const json& j, const std::string& src, const char* component, const char* supported) {
  const json& p = j.at("pattern");
  if (p.is_object() && p.contains("String")) return p["String"].get<std::string>();
  OMNIQ_FAIL("tokenizer '%s': %s Replace with pattern %s is not supported (%s)", src.c_str(), component,
             p.dump().c_str(), supported);
}

PrependScheme parse_scheme(const json& j, const std::string& src) {
  // metaspace.rs: add_prefix_space=false (legacy) means "never"; no scheme means "always".
  std::string s = get_string(j, "prepend_scheme", "");
  if (j.contains("add_prefix_space") && j["add_prefix_space"].is_boolean() && !j["add_prefix_space"].get<bool>()) {
    OMNIQ_CHECK(s.empty() || s == "never", "tokenizer '%s': Metaspace add_prefix_space=false contradicts "
                "prepend_scheme \"%s\"", src.c_str(), s.c_str());
    return PrependScheme::kNever;
  }
  if (s.empty() || s == "always") return PrependScheme::kAlways;
  if (s == "first") return PrependScheme::kFirst;
  if (s == "never") return PrependScheme::kNever;
  OMNIQ_FAIL("tokenizer '%s': unknown Metaspace prepend_scheme \"%s\" (always, first or never)", src.c_str(), s.c_str());
}

std::string one_char(const json& j, const char* key, const std::string& def, const std::string& src) {
  std::string s = get_string(j, key, def);
  size_t i = 0;
  bool one = utf8_find_invalid(s) == std::string::npos && !s.empty() && (utf8_next(s, i), i == s.size());
  OMNIQ_CHECK(one, "tokenizer '%s': \"%s\" must be exactly one character, got \"%s\"", src.c_str(), key, s.c_str());
  return s;
}

void parse_normalizer(const json& j, const std::string& src, std::vector<NormalizerStep>& out) {
  if (j.is_null()) return;
  std::string t = type_of(j, src, "normalizer");
  if (t == "Sequence") {
    for (const json& n : j.at("normalizers")) parse_normalizer(n, src, out);
  } else if (t == "Prepend") {
    out.push_back({NormalizerStep::kPrepend, "", j.at("prepend").get<std::string>()});
  } else if (t == "Replace") {
    std::string pat = string_pattern(j, src, "normalizer", kSupportedNormalizers);
    OMNIQ_CHECK(!pat.empty(), "tokenizer '%s': normalizer Replace with an empty pattern", src.c_str());
    out.push_back({NormalizerStep::kReplace, pat, j.at("content").get<std::string>()});
  } else {
    OMNIQ_FAIL("tokenizer '%s': normalizer type \"%s\" is not supported (%s)", src.c_str(), t.c_str(),
               kSupportedNormalizers);
  }
}

void parse_pre_tokenizer(const json& j, const std::string& src, std::vector<PreTokenizerStep>& out) {
  if (j.is_null()) return;
  std::string t = type_of(j, src, "pre_tokenizer");
  if (t == "Sequence") {
    for (const json& p : j.at("pretokenizers")) parse_pre_tokenizer(p, src, out);
  } else if (t == "Metaspace") {
    PreTokenizerStep st;
    st.kind = PreTokenizerStep::kMetaspace;
    st.replacement = one_char(j, "replacement", "\xE2\x96\x81", src);
    st.prepend_scheme = parse_scheme(j, src);
    st.split = get_bool(j, "split", true);
    out.push_back(st);
  } else if (t == "ByteLevel") {
    PreTokenizerStep st;
    st.kind = PreTokenizerStep::kByteLevel;
    st.add_prefix_space = get_bool(j, "add_prefix_space", true);
    st.use_regex = get_bool(j, "use_regex", true);
    out.push_back(st);
  } else {
    OMNIQ_FAIL("tokenizer '%s': pre_tokenizer type \"%s\" is not supported (%s)", src.c_str(), t.c_str(),
               kSupportedPreTokenizers);
  }
}

// The ids a post-processor puts before and after one sequence; composed in order for a Sequence.
void parse_post_processor(const json& j, const std::string& src, TokenizerData& d) {
  if (j.is_null()) return;
  std::string t = type_of(j, src, "post_processor");
  std::vector<int32_t> pre, post;
  if (t == "Sequence") {
    for (const json& p : j.at("processors")) parse_post_processor(p, src, d);
    return;
  } else if (t == "ByteLevel") {
    return;  // only trims offsets; ids are unchanged
  } else if (t == "TemplateProcessing") {
    const json& specials = j.at("special_tokens");
    bool seen_a = false;
    for (const json& item : j.at("single")) {
      if (item.contains("Sequence")) {
        std::string id = item["Sequence"].at("id").get<std::string>();
        OMNIQ_CHECK(id == "A" && !seen_a, "tokenizer '%s': TemplateProcessing single template uses sequence \"%s\"",
                    src.c_str(), id.c_str());
        seen_a = true;
      } else if (item.contains("SpecialToken")) {
        std::string name = item["SpecialToken"].at("id").get<std::string>();
        OMNIQ_CHECK(specials.contains(name), "tokenizer '%s': TemplateProcessing uses special token \"%s\" that is "
                    "not in its special_tokens", src.c_str(), name.c_str());
        for (const json& id : specials[name].at("ids")) (seen_a ? post : pre).push_back(id.get<int32_t>());
      } else {
        OMNIQ_FAIL("tokenizer '%s': TemplateProcessing item %s is not supported", src.c_str(), item.dump().c_str());
      }
    }
    OMNIQ_CHECK(seen_a, "tokenizer '%s': TemplateProcessing single template has no $A", src.c_str());
  } else if (t == "BertProcessing" || t == "RobertaProcessing") {
    pre.push_back(j.at("cls").at(1).get<int32_t>());   // [cls] A [sep]
    post.push_back(j.at("sep").at(1).get<int32_t>());
  } else {
    OMNIQ_FAIL("tokenizer '%s': post_processor type \"%s\" is not supported (%s)", src.c_str(), t.c_str(),
               kSupportedPostProcessors);
  }
  d.has_template = true;
  d.template_prefix.insert(d.template_prefix.begin(), pre.begin(), pre.end());
  d.template_suffix.insert(d.template_suffix.end(), post.begin(), post.end());
}

void parse_decoder(const json& j, const std::string& src, std::vector<DecoderStep>& out) {
  std::string t = type_of(j, src, "decoder");
  DecoderStep st;
  if (t == "Sequence") {
    for (const json& dj : j.at("decoders")) parse_decoder(dj, src, out);
    return;
  } else if (t == "Replace") {
    st.kind = DecoderStep::kReplace;
    st.pattern = string_pattern(j, src, "decoder", kSupportedDecoders);
    st.content = j.at("content").get<std::string>();
  } else if (t == "ByteFallback") {
    st.kind = DecoderStep::kByteFallback;
  } else if (t == "Fuse") {
    st.kind = DecoderStep::kFuse;
  } else if (t == "Strip") {
    st.kind = DecoderStep::kStrip;
    std::string c = one_char(j, "content", " ", src);
    size_t i = 0;
    st.strip_char = utf8_next(c, i);
    st.strip_start = j.value("start", size_t(0));
    st.strip_stop = j.value("stop", size_t(0));
  } else if (t == "ByteLevel") {
    st.kind = DecoderStep::kByteLevel;
  } else if (t == "Metaspace") {
    st.kind = DecoderStep::kMetaspace;
    st.replacement = one_char(j, "replacement", "\xE2\x96\x81", src);
    st.prepend_scheme = parse_scheme(j, src);
  } else {
    OMNIQ_FAIL("tokenizer '%s': decoder type \"%s\" is not supported (%s)", src.c_str(), t.c_str(), kSupportedDecoders);
  }
  out.push_back(st);
}

std::unordered_map<std::string, int32_t> parse_vocab(const json& v, const std::string& src) {
  OMNIQ_CHECK(v.is_object(), "tokenizer '%s': the vocabulary is not a JSON object of token -> id", src.c_str());
  std::unordered_map<std::string, int32_t> vocab;
  vocab.reserve(v.size());
  for (auto it = v.begin(); it != v.end(); ++it) {
    OMNIQ_CHECK(it.value().is_number_integer() && it.value().get<int64_t>() >= 0 &&
                    it.value().get<int64_t>() < (int64_t(1) << 30),
                "tokenizer '%s': vocabulary entry \"%s\" has id %s (expected a non-negative integer)", src.c_str(),
                it.key().c_str(), it.value().dump().c_str());
    vocab[it.key()] = it.value().get<int32_t>();
  }
  return vocab;
}

void parse_model(const json& m, const std::string& src, BpeModel& model) {
  OMNIQ_CHECK(m.is_object(), "tokenizer '%s': \"model\" is missing or not an object", src.c_str());
  // Files written before the "type" tag existed are recognised by their merges, as the library does.
  std::string t = m.contains("type") ? m["type"].get<std::string>() : (m.contains("merges") ? "BPE" : "?");
  OMNIQ_CHECK(t == "BPE", "tokenizer '%s': model type \"%s\" is not supported (%s)", src.c_str(), t.c_str(),
              kSupportedModels);
  auto dropout = m.find("dropout");
  OMNIQ_CHECK(dropout == m.end() || dropout->is_null() || dropout->get<double>() == 0.0,
              "tokenizer '%s': BPE dropout %s is not supported (encoding would be random)", src.c_str(),
              dropout->dump().c_str());
  model.continuing_subword_prefix = get_string(m, "continuing_subword_prefix", "");
  model.end_of_word_suffix = get_string(m, "end_of_word_suffix", "");
  model.fuse_unk = get_bool(m, "fuse_unk", false);
  model.byte_fallback = get_bool(m, "byte_fallback", false);
  model.ignore_merges = get_bool(m, "ignore_merges", false);
  model.set_vocab(parse_vocab(m.at("vocab"), src));
  model.unk_token = get_string(m, "unk_token", "");
  model.unk_id = model.unk_token.empty() ? -1 : (model.vocab.count(model.unk_token) ? model.vocab[model.unk_token] : -1);
  const json& merges = m.at("merges");
  OMNIQ_CHECK(merges.is_array(), "tokenizer '%s': BPE \"merges\" is not an array", src.c_str());
  model.merges.reserve(merges.size());
  int32_t rank = 0;
  for (const json& e : merges) {
    std::string a, b;
    if (e.is_string()) {  // legacy "a b", split at the first space
      std::string s = e.get<std::string>();
      size_t sp = s.find(' ');
      OMNIQ_CHECK(sp != std::string::npos, "tokenizer '%s': merge #%d \"%s\" is not \"left right\"", src.c_str(),
                  rank, s.c_str());
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      OMNIQ_CHECK(e.is_array() && e.size() == 2, "tokenizer '%s': merge #%d is neither \"a b\" nor [a, b]",
                  src.c_str(), rank);
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    }
    model.add_merge(a, b, rank++, "tokenizer '" + src + "'");
  }
}

}  // namespace

Tokenizer Tokenizer::from_file(const std::string& path) {
  json j = read_json_file(path, "tokenizer file");
  auto d = std::make_shared<TokenizerData>();
  d->source = path;
  try {
    OMNIQ_CHECK(j.is_object(), "tokenizer '%s': the top level is not a JSON object", path.c_str());
    std::string version = get_string(j, "version", "1.0");
    OMNIQ_CHECK(version == "1.0", "tokenizer '%s': unknown format version \"%s\" (expected \"1.0\")", path.c_str(),
                version.c_str());
    for (const char* key : {"truncation", "padding"})
      OMNIQ_CHECK(!j.contains(key) || j[key].is_null(),
                  "tokenizer '%s': \"%s\" is set; truncation and padding are not supported (set them to null)",
                  path.c_str(), key);
    parse_model(j.contains("model") ? j["model"] : json(), path, d->model);
    parse_normalizer(j.value("normalizer", json()), path, d->normalizers);
    parse_pre_tokenizer(j.value("pre_tokenizer", json()), path, d->pre_tokenizers);
    parse_post_processor(j.value("post_processor", json()), path, *d);
    json dec = j.value("decoder", json());
    if (!dec.is_null()) {
      d->has_decoder = true;
      parse_decoder(dec, path, d->decoders);
    }
    for (const json& a : j.value("added_tokens", json::array())) {
      AddedToken t;
      t.content = a.at("content").get<std::string>();
      t.special = get_bool(a, "special", false);
      t.normalized = get_bool(a, "normalized", !t.special);
      t.lstrip = get_bool(a, "lstrip", false);
      t.rstrip = get_bool(a, "rstrip", false);
      t.single_word = get_bool(a, "single_word", false);
      // The declared id; the library re-derives it from the vocab and warns when they differ.
      t.id = a.contains("id") ? a["id"].get<int32_t>() : d->token_to_id(t.content);
      OMNIQ_CHECK(t.id >= 0, "tokenizer '%s': added token \"%s\" has no id", path.c_str(), t.content.c_str());
      d->add_token(t);
    }
  } catch (const json::exception& e) {
    // A field of the wrong JSON type or a missing required field.
    OMNIQ_FAIL("tokenizer '%s': malformed: %s", path.c_str(), e.what());
  }
  return Tokenizer(std::move(d));
}

namespace {

std::shared_ptr<TokenizerData> load_gpt2_pair(const std::string& vocab_json, const std::string& merges_txt) {
  auto d = std::make_shared<TokenizerData>();
  d->source = vocab_json + " + " + merges_txt;
  json v = read_json_file(vocab_json, "GPT-2 vocabulary file");
  d->model.set_vocab(parse_vocab(v, vocab_json));
  // merges.txt (models/bpe/model.rs read_file): "#version" lines skipped, each line "left right".
  std::istringstream lines(read_text_file(merges_txt, "GPT-2 merges file"));
  std::string line;
  int32_t rank = 0, lineno = 0;
  while (std::getline(lines, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.compare(0, 8, "#version") == 0 || line.empty()) continue;
    size_t sp = line.find(' ');
    OMNIQ_CHECK(sp != std::string::npos && line.find(' ', sp + 1) == std::string::npos,
                "GPT-2 merges file '%s' line %d: expected \"left right\", got \"%s\"", merges_txt.c_str(), lineno,
                line.c_str());
    d->model.add_merge(line.substr(0, sp), line.substr(sp + 1), rank++, "GPT-2 merges file '" + merges_txt + "'");
  }
  PreTokenizerStep pre;
  pre.kind = PreTokenizerStep::kByteLevel;
  pre.add_prefix_space = false;
  d->pre_tokenizers.push_back(pre);
  d->has_decoder = true;
  DecoderStep dec;
  dec.kind = DecoderStep::kByteLevel;
  d->decoders.push_back(dec);
  auto eot = d->model.vocab.find("<|endoftext|>");
  if (eot != d->model.vocab.end()) {
    AddedToken t;
    t.content = eot->first;
    t.id = eot->second;
    t.special = true;
    d->add_token(t);
  }
  return d;
}

// A tokenizer_config.json token entry: "text" or {"content": "text", ...}.
std::string token_content(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::string();
}

}  // namespace

Tokenizer Tokenizer::from_gpt2_files(const std::string& vocab_json, const std::string& merges_txt) {
  try {
    return Tokenizer(load_gpt2_pair(vocab_json, merges_txt));
  } catch (const json::exception& e) {
    OMNIQ_FAIL("GPT-2 tokenizer files '%s' + '%s': malformed: %s", vocab_json.c_str(), merges_txt.c_str(), e.what());
  }
}

Tokenizer Tokenizer::from_model_dir(const std::string& dir) {
  const std::string tj = dir + "/tokenizer.json", vj = dir + "/vocab.json", mt = dir + "/merges.txt";
  if (file_exists(tj)) return from_file(tj);
  OMNIQ_CHECK(file_exists(vj) && file_exists(mt),
              "model folder '%s' has no tokenizer: expected tokenizer.json, or vocab.json + merges.txt", dir.c_str());
  std::shared_ptr<TokenizerData> d = load_gpt2_pair(vj, mt);
  const std::string tc_path = dir + "/tokenizer_config.json", stm_path = dir + "/special_tokens_map.json",
                    cfg_path = dir + "/config.json";
  json tc = file_exists(tc_path) ? read_json_file(tc_path, "tokenizer config") : json::object();
  json stm = file_exists(stm_path) ? read_json_file(stm_path, "special tokens map") : json::object();
  json cfg = file_exists(cfg_path) ? read_json_file(cfg_path, "model config") : json::object();
  try {
    // Special tokens: explicit added_tokens_decoder entries, then the named ones that the vocab has.
    if (tc.contains("added_tokens_decoder") && tc["added_tokens_decoder"].is_object()) {
      for (auto it = tc["added_tokens_decoder"].begin(); it != tc["added_tokens_decoder"].end(); ++it) {
        AddedToken t;
        t.id = std::stoi(it.key());
        t.content = token_content(it.value());
        t.special = get_bool(it.value(), "special", true);
        t.normalized = get_bool(it.value(), "normalized", !t.special);
        t.lstrip = get_bool(it.value(), "lstrip", false);
        t.rstrip = get_bool(it.value(), "rstrip", false);
        t.single_word = get_bool(it.value(), "single_word", false);
        if (!t.content.empty()) d->add_token(t);
      }
    }
    std::vector<std::string> named;
    for (const json* src : {&tc, &stm}) {
      for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                              "mask_token"})
        if (src->contains(key)) named.push_back(token_content((*src)[key]));
      if (src->contains("additional_special_tokens") && (*src)["additional_special_tokens"].is_array())
        for (const json& v : (*src)["additional_special_tokens"]) named.push_back(token_content(v));
    }
    for (const std::string& s : named) {
      if (s.empty() || d->added_by_content.count(s)) continue;
      auto it = d->model.vocab.find(s);
      if (it == d->model.vocab.end()) continue;  // a token the vocab lacks would need a new id: ignored
      AddedToken t;
      t.content = s;
      t.id = it->second;
      t.special = true;
      d->add_token(t);
    }
    // The BOS rule (see tokenizer.h).
    bool add_bos = tc.contains("add_bos_token") && tc["add_bos_token"].is_boolean()
                       ? tc["add_bos_token"].get<bool>()
                       : get_string(cfg, "model_type", "") == "opt";
    if (add_bos) {
      std::string bos = tc.contains("bos_token") ? token_content(tc["bos_token"])
                                                 : (stm.contains("bos_token") ? token_content(stm["bos_token"]) : "");
      int32_t bos_id = bos.empty() ? -1 : d->token_to_id(bos);
      if (bos_id < 0 && cfg.contains("bos_token_id") && cfg["bos_token_id"].is_number_integer())
        bos_id = cfg["bos_token_id"].get<int32_t>();
      OMNIQ_CHECK(bos_id >= 0, "model folder '%s': a BOS token is required (add_bos_token or model_type opt) but "
                  "neither tokenizer_config.json's bos_token nor config.json's bos_token_id gives one", dir.c_str());
      d->has_template = true;
      d->template_prefix = {bos_id};
    }
  } catch (const json::exception& e) {
    OMNIQ_FAIL("model folder '%s': malformed tokenizer_config.json / config.json: %s", dir.c_str(), e.what());
  }
  d->source = dir + " (vocab.json + merges.txt)";
  return Tokenizer(std::move(d));
}

}  // namespace omniq
