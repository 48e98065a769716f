// automodel chat-template --tokenizer DIR [--add-generation-prompt] [--template FILE.jinja] [--date YYYY-MM-DD]
//                         --jsonl FILE|-
// Each input line is a JSON array of messages -> each output line is the rendered text as a JSON
// string, exactly as transformers' apply_chat_template(tokenize=False) renders it. An input line may
// also be an object {"messages": [...], "tools": [...], <other template variables>...}.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "io/json_bounded.h"
#include "tokenizer/chat_template.h"

namespace am {

namespace {
const char* kChatTemplateUsage =
    "usage: automodel chat-template --tokenizer DIR [--add-generation-prompt] [--template FILE.jinja] "
    "[--date YYYY-MM-DD] --jsonl FILE|-";
}

int cmd_chat_template(int argc, char** argv) {
  std::string dir, input, date, template_file;
  bool add_gen = false, have_input = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const std::string& name) -> std::string {
      auto eq = a.find('=');
      if (eq != std::string::npos) return a.substr(eq + 1);
      if (i + 1 >= argc) throw UsageError(name + " needs a value\n" + kChatTemplateUsage);
      return argv[++i];
    };
    if (a == "--tokenizer" || a.rfind("--tokenizer=", 0) == 0) {
      dir = value("--tokenizer");
    } else if (a == "--jsonl" || a.rfind("--jsonl=", 0) == 0) {
      input = value("--jsonl");
      have_input = true;
    } else if (a == "--template" || a.rfind("--template=", 0) == 0) {
      template_file = value("--template");
    } else if (a == "--date" || a.rfind("--date=", 0) == 0) {
      date = value("--date");
    } else if (a == "--add-generation-prompt") {
      add_gen = true;
    } else if (a == "-h" || a == "--help") {
      std::printf("%s\n", kChatTemplateUsage);
      return 0;
    } else {
      throw UsageError("chat-template: unknown argument '" + a + "'\n" + kChatTemplateUsage);
    }
  }
  if (dir.empty()) throw UsageError(std::string("chat-template: --tokenizer DIR is required\n") + kChatTemplateUsage);
  if (!have_input || input.empty())
    throw UsageError(std::string("chat-template: --jsonl FILE|- is required\n") + kChatTemplateUsage);

  tok::ChatTemplate tmpl;
  if (template_file.empty()) {
    tmpl = tok::load_chat_template(dir);
  } else {
    // an explicit template (like apply_chat_template(chat_template=...)); special tokens still come
    // from the tokenizer folder
    std::ifstream tf(template_file, std::ios::binary);
    if (!tf) throw IoError("chat-template: cannot open " + template_file);
    std::string src((std::istreambuf_iterator<char>(tf)), std::istreambuf_iterator<char>());
    tmpl = tok::ChatTemplate::from_string(src, tok::special_tokens_of(dir));
    tmpl.origin = template_file;
  }
  if (!date.empty()) tmpl.fixed_now = tok::parse_fixed_date(date);

  std::ifstream file;
  std::istream* in = &std::cin;
  std::string name = input == "-" ? "<stdin>" : input;
  if (input != "-") {
    file.open(input, std::ios::binary);
    if (!file) throw IoError("chat-template: cannot open " + input);
    in = &file;
  }
  std::ios::sync_with_stdio(false);

  std::string line;
  size_t lineno = 0;
  while (std::getline(*in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    std::string where = name + ":" + std::to_string(lineno);
    nlohmann::ordered_json j;
    try {
      j = io::parse_json_bounded<nlohmann::ordered_json>(line, where);
    } catch (const FormatError& e) {
      throw DataError(where + ": invalid JSON: " + std::string(e.what()).substr(where.size() + 2));
    }
    nlohmann::ordered_json messages, extra = nlohmann::ordered_json::object();
    if (j.is_array()) {
      messages = std::move(j);
    } else if (j.is_object() && j.contains("messages") && j["messages"].is_array()) {
      for (auto it = j.begin(); it != j.end(); ++it)
        if (it.key() == "messages") messages = it.value();
        else extra[it.key()] = it.value();
    } else {
      throw DataError(where + ": expected a JSON array of messages");
    }
    for (const auto& m : messages)
      if (!m.is_object()) throw DataError(where + ": each message must be a JSON object");
    std::string text;
    try {
      text = tok::render_chat_template(tmpl, messages, add_gen, extra);
    } catch (const DataError& e) {
      throw DataError(where + ": " + e.what());
    }
    std::string out = nlohmann::ordered_json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    out += '\n';
    std::fwrite(out.data(), 1, out.size(), stdout);
  }
  if (in->bad()) throw IoError("chat-template: error reading " + name);
  std::fflush(stdout);
  return 0;
}

}  // namespace am
