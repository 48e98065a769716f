// Chat templates of Hugging Face tokenizers, rendered exactly as transformers'
// `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does, by the
// Jinja2 interpreter in jinja_interp.h. See docs/chat_templates.md.
//
// Where the template comes from (transformers' order): DIR/chat_template.jinja (plus named templates
// in DIR/additional_chat_templates/*.jinja), else tokenizer_config.json's "chat_template" (a string, or
// a list of {"name", "template"} whose "default" is used), else chat_template.json's "chat_template".
// The special tokens of tokenizer_config.json (bos_token, eos_token, unk_token, sep_token, pad_token,
// cls_token, mask_token, additional_special_tokens; special_tokens_map.json fills gaps) are passed to
// the template as strings, like transformers' `special_tokens_map`.
#pragma once
#include <ctime>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace am::jinja {
class Template;
}

namespace am::tok {

struct ChatTemplate {
  // name -> template source; "default" is the one used unless tools are passed and "tool_use" exists.
  std::map<std::string, std::string> sources;
  // Template variables every render gets: the special token strings.
  nlohmann::ordered_json special_tokens = nlohmann::ordered_json::object();
  // Where the template came from (for messages).
  std::string origin;
  // strftime_now() returns this time when set (goldens, reproducible data); otherwise the environment
  // variable AM_CHAT_TEMPLATE_DATE ("YYYY-MM-DD" or "YYYY-MM-DD HH:MM:SS") when set, else local time.
  std::optional<std::tm> fixed_now;

  bool empty() const { return sources.empty(); }
  // The compiled template of that name (compiled once; throws am::FormatError on syntax errors).
  const jinja::Template& compiled(const std::string& name) const;

  // A template from its source text.
  static ChatTemplate from_string(const std::string& source,
                                  const nlohmann::ordered_json& special_tokens = nlohmann::ordered_json::object());

 private:
  mutable std::map<std::string, std::shared_ptr<const jinja::Template>> cache_;
};

// The chat template of a tokenizer folder; std::nullopt when it has none. Throws am::IoError /
// am::FormatError for unreadable or malformed files and templates with syntax errors.
std::optional<ChatTemplate> find_chat_template(const std::string& dir);
// Same, but a folder without a chat template is an am::FormatError.
ChatTemplate load_chat_template(const std::string& dir);
// The special-token variables of a tokenizer folder (tokenizer_config.json, then
// special_tokens_map.json), as every render receives them.
nlohmann::ordered_json special_tokens_of(const std::string& dir);

// Renders `messages` (a JSON array of {"role", "content", ...}). `extra` holds further template
// variables as in apply_chat_template(**kwargs): "tools", "documents", "enable_thinking",
// "date_string", ... `tools` and `documents` default to None. The ordered_json overload keeps the
// key order of the caller's objects (which `tojson` prints); nlohmann::json sorts keys.
// Errors: am::FormatError (unsupported construct / syntax), am::DataError (raise_exception() in the
// template, or a runtime error such as an undefined value used where Python raises).
std::string render_chat_template(const ChatTemplate& tmpl, const nlohmann::ordered_json& messages,
                                 bool add_generation_prompt,
                                 const nlohmann::ordered_json& extra = nlohmann::ordered_json::object());
std::string render_chat_template(const ChatTemplate& tmpl, const nlohmann::json& messages, bool add_generation_prompt,
                                 const nlohmann::json& extra = nlohmann::json::object());

// Parses "YYYY-MM-DD" or "YYYY-MM-DD HH:MM:SS" (or with 'T') into a broken-down time (weekday and
// day of year filled in); throws am::UsageError on a bad string.
std::tm parse_fixed_date(const std::string& s);

}  // namespace am::tok
