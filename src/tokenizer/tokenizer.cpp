// Tokenizer: tokenizer.json + tokenizer_config.json, the HF pipeline (added tokens -> normalizer ->
// pre-tokenizer -> BPE -> post-processor) and decode, plus transformers' add_special_tokens / decode
// conventions.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <atomic>
#include <fstream>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "io/json_bounded.h"
#include "tokenizer/tok_components.h"

namespace am::tok {

namespace {

struct AddedTok {
  std::string content;
  int32_t id = -1;
  bool special = false, lstrip = false, rstrip = false, normalized = true, single_word = false;
};

// Leftmost-longest matcher over a set of byte strings (the added tokens).
class TokenTrie {
 public:
  void add(std::string_view s, int32_t value) {
    if (s.empty()) return;
    if (nodes_.empty()) nodes_.emplace_back();
    int32_t n = 0;
    for (unsigned char c : s) {
      int32_t nx = child(n, c);
      if (nx < 0) {
        nx = static_cast<int32_t>(nodes_.size());
        nodes_.emplace_back();
        nodes_[n].kids.emplace_back(c, nx);
      }
      n = nx;
    }
    if (nodes_[n].term < 0) nodes_[n].term = value;  // first one wins for identical patterns
    first_[static_cast<unsigned char>(s[0])] = true;
  }
  bool empty() const { return nodes_.empty(); }
  // Longest match starting at s[pos]: returns its length (0 if none) and sets *value.
  size_t longest(std::string_view s, size_t pos, int32_t* value) const {
    if (nodes_.empty() || !first_[static_cast<unsigned char>(s[pos])]) return 0;
    int32_t n = 0;
    size_t best = 0;
    for (size_t i = pos; i < s.size(); ++i) {
      n = child(n, static_cast<unsigned char>(s[i]));
      if (n < 0) break;
      if (nodes_[n].term >= 0) {
        best = i + 1 - pos;
        *value = nodes_[n].term;
      }
    }
    return best;
  }
  bool could_start(unsigned char c) const { return first_[c]; }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> kids;
    int32_t term = -1;
  };
  int32_t child(int32_t n, unsigned char c) const {
    for (auto& [k, v] : nodes_[n].kids)
      if (k == c) return v;
    return -1;
  }
  std::vector<Node> nodes_;
  bool first_[256] = {};
};

bool ends_with_word(std::string_view s) {
  if (s.empty()) return false;
  size_t st = s.size() - 1;
  while (st > 0 && (static_cast<unsigned char>(s[st]) & 0xC0) == 0x80) --st;
  size_t i = st;
  return is_word(next_cp(s, i));
}
bool starts_with_word(std::string_view s) {
  if (s.empty()) return false;
  size_t i = 0;
  return is_word(next_cp(s, i));
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw am::IoError("cannot open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A special token entry of tokenizer_config.json: "str" or {"content": "str", ...}.
std::string config_token(const json& cfg, const char* key) {
  if (!cfg.is_object() || !cfg.contains(key)) return "";
  const json& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return "";
}

// transformers' clean_up_tokenization (PreTrainedTokenizerBase)
std::string clean_up_tokenization(std::string s) {
  static const std::pair<const char*, const char*> reps[] = {
      {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"}, {" n't", "n't"},
      {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
  for (auto [from, to] : reps) {
    std::string_view f(from);
    if (s.find(f) == std::string::npos) continue;
    std::string out;
    out.reserve(s.size());
    size_t pos = 0;
    while (true) {
      size_t k = s.find(f, pos);
      if (k == std::string::npos) break;
      out.append(s, pos, k - pos);
      out += to;
      pos = k + f.size();
    }
    out.append(s, pos, std::string::npos);
    s.swap(out);
  }
  return s;
}

}  // namespace

struct TokenizerImpl {
  std::string origin;
  json config = json::object();
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<BPE> model;
  std::unique_ptr<PostProcessor> post_processor;
  std::unique_ptr<Decoder> decoder;

  std::vector<AddedTok> added;  // index = position in tokenizer.json
  std::unordered_map<std::string, int32_t> added_by_content;
  std::unordered_map<int32_t, int32_t> added_by_id;  // id -> index in `added`
  std::unordered_set<std::string> special_set;
  TokenTrie trie_raw, trie_norm;

  std::string bos, eos, pad, unk;
  std::optional<int32_t> bos_id, eos_id, pad_id, unk_id;
  bool clean_up = false;
  int64_t vocab_size = 0;

  std::optional<int32_t> token_to_id(std::string_view t) const {
    auto it = added_by_content.find(std::string(t));
    if (it != added_by_content.end()) return it->second;
    int32_t id = model->token_to_id(t);
    if (id >= 0) return id;
    return std::nullopt;
  }

  // AddedVocabulary::find_matches + split: appends pieces / token ids to `out`.
  struct Seg {
    std::string text;
    int32_t id;  // >= 0: an added token
    bool first;
  };
  void split_added(const TokenTrie& trie, const std::string& s, bool first, std::vector<Seg>& out) const {
    if (trie.empty()) {
      if (!s.empty()) out.push_back({s, -1, first});
      return;
    }
    size_t start_offset = 0, pos = 0;
    const size_t n = s.size();
    while (pos < n) {
      if (!trie.could_start(static_cast<unsigned char>(s[pos]))) {
        ++pos;
        continue;
      }
      int32_t tok_id = -1;
      size_t len = trie.longest(s, pos, &tok_id);
      if (!len) {
        ++pos;
        continue;
      }
      size_t start = pos, stop = pos + len;
      pos = stop;
      const AddedTok& t = added[added_by_id.at(tok_id)];  // the latest flags for that id
      if (t.single_word) {
        bool start_space = start == 0 || !ends_with_word(std::string_view(s).substr(0, start));
        bool stop_space = stop == n || !starts_with_word(std::string_view(s).substr(stop));
        if (!start_space || !stop_space) continue;
      }
      if (t.lstrip) {
        size_t ns = start;
        while (ns > 0) {
          size_t st = ns - 1;
          while (st > 0 && (static_cast<unsigned char>(s[st]) & 0xC0) == 0x80) --st;
          size_t i = st;
          if (!is_whitespace(next_cp(s, i))) break;
          ns = st;
        }
        start = std::max(ns, start_offset);
      }
      if (t.rstrip) {
        while (stop < n) {
          size_t i = stop;
          if (!is_whitespace(next_cp(s, i))) break;
          stop = i;
        }
      }
      start = std::max(start, start_offset);
      if (start_offset < start) out.push_back({s.substr(start_offset, start - start_offset), -1, first && start_offset == 0});
      out.push_back({std::string(), t.id, false});
      start_offset = stop;
      if (pos < stop) pos = stop;
    }
    if (start_offset < n) out.push_back({s.substr(start_offset), -1, first && start_offset == 0});
  }

  void encode_into(std::string_view text_in, bool add_special, std::vector<int32_t>& ids) const {
    std::string text;
    if (is_valid_utf8(text_in)) text.assign(text_in);
    else text = utf8_lossy(text_in);
    thread_local std::vector<Seg> segs1, segs2;
    thread_local std::vector<Piece> pieces;
    segs1.clear();
    segs2.clear();
    split_added(trie_raw, text, true, segs1);
    for (auto& sg : segs1) {
      if (sg.id >= 0) {
        segs2.push_back(std::move(sg));
        continue;
      }
      if (normalizer) normalizer->normalize(sg.text);
      split_added(trie_norm, sg.text, sg.first, segs2);
    }
    for (auto& sg : segs2) {
      if (sg.id >= 0) {
        ids.push_back(sg.id);
        continue;
      }
      if (sg.text.empty()) continue;
      pieces.clear();
      pieces.push_back(Piece{std::move(sg.text), sg.first});
      if (pre_tokenizer) pre_tokenizer->pre_tokenize(pieces);
      for (auto& p : pieces) model->tokenize(p.text, ids);
    }
    if (post_processor) post_processor->process(ids, add_special);
  }

  std::string decode_raw(const std::vector<int32_t>& ids, bool skip_special) const {
    std::vector<std::string> toks;
    toks.reserve(ids.size());
    for (int32_t id : ids) {
      auto it = added_by_id.find(id);
      if (it != added_by_id.end()) {
        const AddedTok& t = added[it->second];
        if (skip_special && special_set.count(t.content)) continue;
        toks.push_back(t.content);
        continue;
      }
      const std::string* s = model->id_to_token(id);
      if (!s) continue;
      if (skip_special && !special_set.empty() && special_set.count(*s)) continue;
      toks.push_back(*s);
    }
    if (decoder) {
      decoder->decode_chain(toks);
      std::string out;
      for (auto& t : toks) out += t;
      return out;
    }
    std::string out;
    for (size_t i = 0; i < toks.size(); ++i) {
      if (i) out.push_back(' ');
      out += toks[i];
    }
    return out;
  }
};

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::from_dir(const std::string& dir) {
  std::string tj = dir + "/tokenizer.json";
  std::string tc = dir + "/tokenizer_config.json";
  std::string text = read_file(tj);
  json cfg = nullptr;
  {
    std::ifstream f(tc, std::ios::binary);
    if (f) {
      std::ostringstream ss;
      ss << f.rdbuf();
      try {
        cfg = am::io::parse_json_bounded(ss.str(), tc + ": invalid JSON");
      } catch (const json::exception& e) {
        throw am::FormatError(tc + ": invalid JSON: " + e.what());
      }
      if (!cfg.is_object()) throw am::FormatError(tc + ": expected a JSON object");
    }
  }
  return from_json(text, cfg, tj);
}

Tokenizer Tokenizer::from_json(const std::string& tokenizer_json, const json& config, const std::string& origin) {
  json j;
  try {
    j = am::io::parse_json_bounded(tokenizer_json, origin + ": invalid JSON");
  } catch (const json::exception& e) {
    throw am::FormatError(origin + ": invalid JSON: " + e.what());
  }
  return from_json_value(j, config, origin);
}

Tokenizer Tokenizer::from_json_value(const json& j, const json& config, const std::string& origin) {
  if (!j.is_object()) throw am::FormatError(origin + ": expected a JSON object");
  auto impl = std::make_unique<TokenizerImpl>();
  impl->origin = origin;
  if (config.is_object()) impl->config = config;
  const char* stage = "model";
  try {
    if (!j.contains("model") || !j["model"].is_object()) throw ComponentError{"missing 'model'"};
    const json& mj = j["model"];
    std::string mt = mj.value("type", "");
    if (mt.empty() && mj.contains("merges")) mt = "BPE";
    if (mt != "BPE") throw ComponentError{"unsupported model type '" + mt + "'"};
    impl->model = BPE::from_json(mj);
    stage = "normalizer";
    impl->normalizer = make_normalizer(j.value("normalizer", json()));
    stage = "pre_tokenizer";
    impl->pre_tokenizer = make_pre_tokenizer(j.value("pre_tokenizer", json()));
    stage = "post_processor";
    impl->post_processor = make_post_processor(j.value("post_processor", json()));
    stage = "decoder";
    impl->decoder = make_decoder(j.value("decoder", json()));
    stage = "added_tokens";
    if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
      int32_t next_id = static_cast<int32_t>(impl->model->size());
      for (const json& a : j["added_tokens"]) {
        AddedTok t;
        if (!a.is_object() || !a.contains("content") || !a["content"].is_string())
          throw ComponentError{"bad added token " + a.dump()};
        t.content = a["content"].get<std::string>();
        t.special = a.value("special", false);
        t.lstrip = a.value("lstrip", false);
        t.rstrip = a.value("rstrip", false);
        t.single_word = a.value("single_word", false);
        t.normalized = a.value("normalized", !t.special);
        if (t.content.empty()) continue;
        // Like HF, the ids in the file are not trusted: a token gets the id it already has (added
        // earlier or in the model vocabulary), else the next free one from the model vocabulary size.
        auto prev = impl->added_by_content.find(t.content);
        if (prev != impl->added_by_content.end()) {
          t.id = prev->second;
        } else {
          int32_t id = impl->model->token_to_id(t.content);
          t.id = id >= 0 ? id : next_id++;
        }
        int32_t idx = static_cast<int32_t>(impl->added.size());
        impl->added_by_content[t.content] = t.id;
        impl->added_by_id[t.id] = idx;
        if (t.special) impl->special_set.insert(t.content);
        impl->added.push_back(std::move(t));
      }
    }
  } catch (const ComponentError& e) {
    throw am::FormatError(origin + ": " + stage + ": " + e.msg);
  } catch (const json::exception& e) {
    throw am::FormatError(origin + ": " + stage + ": " + e.what());
  }
  // Matching tries: specials first, then the others (HF order); normalized tokens are matched in
  // their normalized form against the normalized text.
  std::unordered_set<std::string> seen_special;
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < impl->added.size(); ++i) {
      const AddedTok& t = impl->added[i];
      if (t.special != (pass == 0)) continue;
      if (pass == 0 && !seen_special.insert(t.content).second) continue;  // first entry decides
      if (pass == 1 && impl->special_set.count(t.content)) continue;
      if (!t.normalized) {
        impl->trie_raw.add(t.content, t.id);
      } else {
        std::string s = t.content;
        if (impl->normalizer) impl->normalizer->normalize(s);
        impl->trie_norm.add(s, t.id);
      }
    }
  }

  // vocab size
  int64_t mx = impl->model->max_id();
  for (auto& t : impl->added) mx = std::max<int64_t>(mx, t.id);
  impl->vocab_size = mx + 1;

  // tokenizer_config.json conventions (transformers)
  const json& cfg = impl->config;
  impl->bos = config_token(cfg, "bos_token");
  impl->eos = config_token(cfg, "eos_token");
  impl->pad = config_token(cfg, "pad_token");
  impl->unk = config_token(cfg, "unk_token");
  if (impl->unk.empty() && !impl->model->unk_token().empty()) impl->unk = impl->model->unk_token();
  auto resolve = [&](const std::string& s) -> std::optional<int32_t> {
    if (s.empty()) return std::nullopt;
    return impl->token_to_id(s);
  };
  impl->bos_id = resolve(impl->bos);
  impl->eos_id = resolve(impl->eos);
  impl->pad_id = resolve(impl->pad);
  impl->unk_id = resolve(impl->unk);
  if (cfg.contains("clean_up_tokenization_spaces") && cfg["clean_up_tokenization_spaces"].is_boolean())
    impl->clean_up = cfg["clean_up_tokenization_spaces"].get<bool>();
  // LlamaTokenizerFast (and Gemma/CodeLlama) rebuild the post-processor from add_bos_token/add_eos_token.
  std::string cls = cfg.is_object() ? cfg.value("tokenizer_class", "") : "";
  static const std::unordered_set<std::string> llama_like = {
      "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
      "GemmaTokenizer", "GemmaTokenizerFast"};
  if (llama_like.count(cls)) {
    bool add_bos = cfg.contains("add_bos_token") && cfg["add_bos_token"].is_boolean() ? cfg["add_bos_token"].get<bool>() : true;
    bool add_eos = cfg.contains("add_eos_token") && cfg["add_eos_token"].is_boolean() ? cfg["add_eos_token"].get<bool>() : false;
    int32_t b = add_bos && impl->bos_id ? *impl->bos_id : -1;
    int32_t e = add_eos && impl->eos_id ? *impl->eos_id : -1;
    impl->post_processor = make_bos_eos_processor(b, e);
  }
  Tokenizer t;
  t.impl_ = std::move(impl);
  return t;
}

static const TokenizerImpl& need(const std::unique_ptr<TokenizerImpl>& p) {
  if (!p) throw am::Error("tokenizer: not loaded");
  return *p;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const TokenizerImpl& im = need(impl_);
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  try {
    im.encode_into(text, add_special_tokens, ids);
  } catch (const am::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw am::DataError(im.origin + ": encode failed: " + e.what());
  }
  return ids;
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(const std::vector<std::string>& texts,
                                                          bool add_special_tokens, int num_threads) const {
  need(impl_);
  std::vector<std::vector<int32_t>> out(texts.size());
  int nt = num_threads > 0 ? num_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  nt = static_cast<int>(std::min<size_t>(static_cast<size_t>(nt), std::max<size_t>(1, texts.size() / 4)));
  if (nt <= 1) {
    for (size_t i = 0; i < texts.size(); ++i) out[i] = encode(texts[i], add_special_tokens);
    return out;
  }
  std::atomic<size_t> next{0};
  std::exception_ptr err;
  std::mutex err_mu;
  auto work = [&]() {
    try {
      while (true) {
        size_t begin = next.fetch_add(64);
        if (begin >= texts.size()) break;
        size_t end = std::min(texts.size(), begin + 64);
        for (size_t i = begin; i < end; ++i) out[i] = encode(texts[i], add_special_tokens);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lk(err_mu);
      if (!err) err = std::current_exception();
      next.store(texts.size());
    }
  };
  std::vector<std::thread> ths;
  for (int i = 0; i < nt; ++i) ths.emplace_back(work);
  for (auto& t : ths) t.join();
  if (err) std::rethrow_exception(err);
  return out;
}

std::string Tokenizer::decode_raw(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  return need(impl_).decode_raw(ids, skip_special_tokens);
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  const TokenizerImpl& im = need(impl_);
  std::string s = im.decode_raw(ids, skip_special_tokens);
  if (im.clean_up) s = clean_up_tokenization(std::move(s));
  return s;
}

int64_t Tokenizer::vocab_size() const { return need(impl_).vocab_size; }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const { return need(impl_).token_to_id(token); }

std::string Tokenizer::id_to_token(int32_t id) const {
  const TokenizerImpl& im = need(impl_);
  auto it = im.added_by_id.find(id);
  if (it != im.added_by_id.end()) return im.added[it->second].content;
  const std::string* s = im.model->id_to_token(id);
  return s ? *s : std::string();
}

bool Tokenizer::is_special_id(int32_t id) const {
  const TokenizerImpl& im = need(impl_);
  auto it = im.added_by_id.find(id);
  return it != im.added_by_id.end() && im.added[it->second].special;
}

std::optional<int32_t> Tokenizer::bos_id() const { return need(impl_).bos_id; }
std::optional<int32_t> Tokenizer::eos_id() const { return need(impl_).eos_id; }
std::optional<int32_t> Tokenizer::pad_id() const { return need(impl_).pad_id; }
std::optional<int32_t> Tokenizer::unk_id() const { return need(impl_).unk_id; }
const std::string& Tokenizer::bos_token() const { return need(impl_).bos; }
const std::string& Tokenizer::eos_token() const { return need(impl_).eos; }
const std::string& Tokenizer::pad_token() const { return need(impl_).pad; }
const json& Tokenizer::tokenizer_config() const { return need(impl_).config; }

}  // namespace am::tok
