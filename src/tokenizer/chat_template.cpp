// Loading and rendering of Hugging Face chat templates (see chat_template.h).
#include "tokenizer/chat_template.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>

#include "core/error.h"
#include "io/json_bounded.h"
#include "tokenizer/jinja_interp.h"

namespace am::tok {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw IoError("cannot read " + p.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

ojson read_json(const fs::path& p) {
  std::string text = read_file(p);
  try {
    return io::parse_json_bounded<ojson>(text, p.string() + ": invalid JSON");
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(p.string() + ": invalid JSON: " + e.what());
  }
}

// An AddedToken as tokenizer_config.json writes it: a string, {"content": ...} or null.
std::optional<std::string> token_string(const ojson& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

void collect_special_tokens(const ojson& cfg, ojson& out) {
  static const char* names[] = {"bos_token", "eos_token", "unk_token", "sep_token",
                                "pad_token", "cls_token", "mask_token"};
  if (!cfg.is_object()) return;
  for (const char* n : names) {
    if (out.contains(n) || !cfg.contains(n)) continue;
    auto s = token_string(cfg[n]);
    if (s && !s->empty()) out[n] = *s;
  }
  if (!out.contains("additional_special_tokens") && cfg.contains("additional_special_tokens") &&
      cfg["additional_special_tokens"].is_array()) {
    ojson list = ojson::array();
    for (const auto& t : cfg["additional_special_tokens"]) {
      auto s = token_string(t);
      if (s) list.push_back(*s);
    }
    if (!list.empty()) out["additional_special_tokens"] = list;
  }
}

void add_config_templates(const ojson& ct, const std::string& origin, std::map<std::string, std::string>& out) {
  if (ct.is_string()) {
    out["default"] = ct.get<std::string>();
  } else if (ct.is_array()) {
    for (const auto& e : ct) {
      if (!e.is_object() || !e.contains("name") || !e.contains("template") || !e["name"].is_string() ||
          !e["template"].is_string())
        throw FormatError(origin + ": chat_template list entries must be {\"name\": str, \"template\": str}");
      out[e["name"].get<std::string>()] = e["template"].get<std::string>();
    }
  } else if (ct.is_object()) {
    for (auto it = ct.begin(); it != ct.end(); ++it) {
      if (!it.value().is_string()) throw FormatError(origin + ": chat_template \"" + it.key() + "\" is not a string");
      out[it.key()] = it.value().get<std::string>();
    }
  } else if (!ct.is_null()) {
    throw FormatError(origin + ": chat_template must be a string or a list of named templates");
  }
}

std::optional<std::tm> env_date() {
  const char* e = std::getenv("AM_CHAT_TEMPLATE_DATE");
  if (!e || !*e) return std::nullopt;
  return parse_fixed_date(e);
}

template <class J>
std::string render_impl(const ChatTemplate& t, const J& messages, bool add_generation_prompt, const J& extra) {
  if (t.empty()) throw FormatError((t.origin.empty() ? std::string("tokenizer") : t.origin) + ": no chat template");
  if (!messages.is_array()) throw DataError("chat template: messages must be a JSON array");
  if (!extra.is_null() && !extra.is_object()) throw UsageError("chat template: extra variables must be a JSON object");

  bool has_tools = extra.is_object() && extra.contains("tools") && !extra["tools"].is_null();
  std::string name = "default";
  if (has_tools && t.sources.count("tool_use")) name = "tool_use";
  else if (!t.sources.count("default")) {
    if (t.sources.size() == 1) name = t.sources.begin()->first;
    else throw FormatError(t.origin + ": no \"default\" chat template among the named templates");
  }
  const jinja::Template& tmpl = t.compiled(name);

  jinja::Value ctx = jinja::Value::dict();
  auto& d = ctx.dict_data();
  for (auto it = t.special_tokens.begin(); it != t.special_tokens.end(); ++it)
    d.set(jinja::Value(it.key()), jinja::Value::from_json(it.value()));
  d.set(jinja::Value("messages"), jinja::Value::from_json(messages));
  d.set(jinja::Value("tools"), jinja::Value::none());
  d.set(jinja::Value("documents"), jinja::Value::none());
  d.set(jinja::Value("add_generation_prompt"), jinja::Value(add_generation_prompt));
  if (extra.is_object())
    for (auto it = extra.begin(); it != extra.end(); ++it) d.set(jinja::Value(it.key()), jinja::Value::from_json(it.value()));

  jinja::RenderOptions opts;
  opts.now = t.fixed_now ? t.fixed_now : env_date();
  return tmpl.render(ctx, opts);
}

}  // namespace

const jinja::Template& ChatTemplate::compiled(const std::string& name) const {
  static std::mutex mu;  // renders may run on several threads; compiled templates are immutable
  std::lock_guard<std::mutex> lock(mu);
  auto c = cache_.find(name);
  if (c != cache_.end()) return *c->second;
  auto s = sources.find(name);
  if (s == sources.end()) throw FormatError(origin + ": no chat template named '" + name + "'");
  std::string tname = name == "default" ? "chat_template" : "chat_template[" + name + "]";
  auto t = std::make_shared<const jinja::Template>(s->second, tname);
  cache_[name] = t;
  return *t;
}

ChatTemplate ChatTemplate::from_string(const std::string& source, const ojson& special_tokens) {
  ChatTemplate t;
  t.sources["default"] = source;
  t.special_tokens = special_tokens.is_object() ? special_tokens : ojson::object();
  t.origin = "chat_template";
  t.compiled("default");
  return t;
}

std::optional<ChatTemplate> find_chat_template(const std::string& dir) {
  fs::path d(dir);
  if (!fs::is_directory(d)) throw IoError("tokenizer folder not found: " + dir);
  ChatTemplate t;
  ojson cfg;
  fs::path cfg_path = d / "tokenizer_config.json";
  if (fs::exists(cfg_path)) cfg = read_json(cfg_path);

  fs::path jinja = d / "chat_template.jinja";
  if (fs::exists(jinja)) {
    t.sources["default"] = read_file(jinja);
    t.origin = jinja.string();
  }
  fs::path extra_dir = d / "additional_chat_templates";
  if (fs::is_directory(extra_dir)) {
    for (const auto& e : fs::directory_iterator(extra_dir))
      if (e.path().extension() == ".jinja") t.sources[e.path().stem().string()] = read_file(e.path());
    if (t.origin.empty()) t.origin = extra_dir.string();
  }
  if (t.sources.empty() && cfg.is_object() && cfg.contains("chat_template")) {
    add_config_templates(cfg["chat_template"], cfg_path.string(), t.sources);
    t.origin = cfg_path.string();
  }
  fs::path ctj = d / "chat_template.json";
  if (t.sources.empty() && fs::exists(ctj)) {
    ojson j = read_json(ctj);
    if (j.is_object() && j.contains("chat_template")) add_config_templates(j["chat_template"], ctj.string(), t.sources);
    t.origin = ctj.string();
  }
  if (t.sources.empty()) return std::nullopt;

  collect_special_tokens(cfg, t.special_tokens);
  fs::path stm = d / "special_tokens_map.json";
  if (fs::exists(stm)) collect_special_tokens(read_json(stm), t.special_tokens);

  for (const auto& kv : t.sources) {
    try {
      t.compiled(kv.first);
    } catch (const FormatError& e) {
      throw FormatError(t.origin + ": " + e.what());
    }
  }
  return t;
}

ojson special_tokens_of(const std::string& dir) {
  fs::path d(dir);
  if (!fs::is_directory(d)) throw IoError("tokenizer folder not found: " + dir);
  ojson out = ojson::object();
  if (fs::exists(d / "tokenizer_config.json")) collect_special_tokens(read_json(d / "tokenizer_config.json"), out);
  if (fs::exists(d / "special_tokens_map.json")) collect_special_tokens(read_json(d / "special_tokens_map.json"), out);
  return out;
}

ChatTemplate load_chat_template(const std::string& dir) {
  auto t = find_chat_template(dir);
  if (!t)
    throw FormatError(dir + ": no chat template (neither chat_template.jinja nor a \"chat_template\" in "
                            "tokenizer_config.json)");
  return std::move(*t);
}

std::string render_chat_template(const ChatTemplate& t, const ojson& messages, bool add_generation_prompt,
                                 const ojson& extra) {
  return render_impl(t, messages, add_generation_prompt, extra);
}

std::string render_chat_template(const ChatTemplate& t, const nlohmann::json& messages, bool add_generation_prompt,
                                 const nlohmann::json& extra) {
  return render_impl(t, messages, add_generation_prompt, extra);
}

std::tm parse_fixed_date(const std::string& s) {
  int Y, M, D, h = 0, m = 0, sec = 0;
  char sep = 0;
  int n = std::sscanf(s.c_str(), "%4d-%2d-%2d%c%2d:%2d:%2d", &Y, &M, &D, &sep, &h, &m, &sec);
  bool ok = (n == 3) || (n == 7 && (sep == ' ' || sep == 'T'));
  if (!ok || M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || m > 59 || sec > 60)
    throw UsageError("bad date '" + s + "': expected YYYY-MM-DD or YYYY-MM-DD HH:MM:SS");
  std::tm t{};
  t.tm_year = Y - 1900;
  t.tm_mon = M - 1;
  t.tm_mday = D;
  t.tm_hour = h;
  t.tm_min = m;
  t.tm_sec = sec;
  t.tm_isdst = 0;
  std::tm copy = t;
  timegm(&copy);  // fills tm_wday / tm_yday
  t.tm_wday = copy.tm_wday;
  t.tm_yday = copy.tm_yday;
  return t;
}

}  // namespace am::tok
