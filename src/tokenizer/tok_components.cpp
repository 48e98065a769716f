// Normalizers, pre-tokenizers, post-processors and decoders of tokenizer.json, with the semantics of HF
// tokenizers (written from its documentation and observed behaviour).
#include "tokenizer/tok_components.h"

#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <cstring>

namespace am::tok {

namespace {

std::string type_of(const json& j) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) return "";
  return j["type"].get<std::string>();
}

[[noreturn]] void unsupported(const char* what, const json& j) {
  std::string t = type_of(j);
  throw ComponentError{std::string("unsupported ") + what + " type '" + (t.empty() ? j.dump() : t) + "'"};
}

std::string get_str(const json& j, const char* key, const std::string& dflt = "") {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_string()) throw ComponentError{std::string("field '") + key + "' must be a string"};
  return j[key].get<std::string>();
}
bool get_bool(const json& j, const char* key, bool dflt) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_boolean()) throw ComponentError{std::string("field '") + key + "' must be a boolean"};
  return j[key].get<bool>();
}
char32_t get_char(const json& j, const char* key, char32_t dflt) {
  std::string s = get_str(j, key, "");
  if (s.empty()) return dflt;
  if (!is_valid_utf8(s)) throw ComponentError{std::string("field '") + key + "' is not valid UTF-8"};
  size_t i = 0;
  return next_cp(s, i);
}

Regex make_regex(const std::string& pat, bool literal) {
  try {
    return Regex(pat, literal);
  } catch (const std::exception& e) {
    throw ComponentError{e.what()};
  }
}

// A {"String": s} or {"Regex": r} pattern.
Regex pattern_regex(const json& p) {
  if (p.is_object() && p.contains("String") && p["String"].is_string())
    return make_regex(p["String"].get<std::string>(), true);
  if (p.is_object() && p.contains("Regex") && p["Regex"].is_string())
    return make_regex(p["Regex"].get<std::string>(), false);
  if (p.is_string()) return make_regex(p.get<std::string>(), true);
  throw ComponentError{"bad pattern " + p.dump()};
}

// Matches covering s: (start, end, is_match).
struct Span {
  size_t a, b;
  bool m;
};

void regex_spans(const Regex& re, std::string_view s, std::vector<Span>& out) {
  out.clear();
  if (s.empty()) {
    out.push_back({0, 0, false});
    return;
  }
  thread_local std::vector<std::pair<size_t, size_t>> ms;
  re.find_all(s, ms);
  size_t prev = 0;
  for (auto [a, b] : ms) {
    if (prev != a) out.push_back({prev, a, false});
    out.push_back({a, b, true});
    prev = b;
  }
  if (prev != s.size()) out.push_back({prev, s.size(), false});
}

template <class F>
void char_spans(F&& pred, std::string_view s, std::vector<Span>& out) {
  out.clear();
  if (s.empty()) {
    out.push_back({0, 0, false});
    return;
  }
  size_t last = 0, i = 0;
  while (i < s.size()) {
    size_t b = i;
    char32_t c = next_cp(s, i);
    if (pred(c)) {
      if (last < b) out.push_back({last, b, false});
      out.push_back({b, i, true});
      last = i;
    }
  }
  if (s.size() > last) out.push_back({last, s.size(), false});
}

// NormalizedString::split with a behaviour; appends non-empty sub-pieces.
void split_piece(const Piece& p, std::vector<Span>& spans, SplitBehavior beh, std::vector<Piece>& out) {
  struct R {
    size_t a, b;
    bool remove;
  };
  thread_local std::vector<R> rs;
  rs.clear();
  switch (beh) {
    case SplitBehavior::Isolated:
      for (auto& s : spans) rs.push_back({s.a, s.b, false});
      break;
    case SplitBehavior::Removed:
      for (auto& s : spans) rs.push_back({s.a, s.b, s.m});
      break;
    case SplitBehavior::Contiguous: {
      bool prev = false;
      for (auto& s : spans) {
        if (s.m == prev && !rs.empty()) rs.back().b = s.b;
        else rs.push_back({s.a, s.b, false});
        prev = s.m;
      }
      break;
    }
    case SplitBehavior::MergedWithPrevious: {
      bool prev = false;
      for (auto& s : spans) {
        if (s.m && !prev && !rs.empty()) rs.back().b = s.b;
        else rs.push_back({s.a, s.b, false});
        prev = s.m;
      }
      break;
    }
    case SplitBehavior::MergedWithNext: {
      bool prev = false;
      for (size_t k = spans.size(); k-- > 0;) {
        auto& s = spans[k];
        if (s.m && !prev && !rs.empty()) rs.back().a = s.a;
        else rs.push_back({s.a, s.b, false});
        prev = s.m;
      }
      std::reverse(rs.begin(), rs.end());
      break;
    }
  }
  for (auto& r : rs) {
    if (r.remove || r.b <= r.a) continue;
    Piece q;
    q.text.assign(p.text, r.a, r.b - r.a);
    q.first = p.first && r.a == 0;
    out.push_back(std::move(q));
  }
}

SplitBehavior parse_behavior(const json& j) {
  std::string b = j.is_string() ? j.get<std::string>() : "";
  if (b == "Removed") return SplitBehavior::Removed;
  if (b == "Isolated") return SplitBehavior::Isolated;
  if (b == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (b == "Contiguous") return SplitBehavior::Contiguous;
  throw ComponentError{"unsupported split behavior " + j.dump()};
}

// Applies fn(piece, out) to every piece.
template <class F>
void for_pieces(std::vector<Piece>& pieces, F&& fn) {
  thread_local std::vector<Piece> out;
  out.clear();
  for (auto& p : pieces) fn(p, out);
  pieces.swap(out);
}

struct ByteTables {
  std::array<std::string, 256> b2u;
  char b2u_bytes[256][2];
  uint8_t b2u_len[256];
  std::array<int16_t, 324> u2b;
  ByteTables() {
    u2b.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool visible = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      char32_t c = visible ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      append_utf8(b2u[b], c);
      b2u_len[b] = static_cast<uint8_t>(b2u[b].size());
      b2u_bytes[b][0] = b2u[b][0];
      b2u_bytes[b][1] = b2u[b].size() > 1 ? b2u[b][1] : 0;
      u2b[c] = static_cast<int16_t>(b);
    }
  }
};
const ByteTables& byte_tables() {
  static const ByteTables t;
  return t;
}


// ======================= normalizers =======================
class UnicodeNorm : public Normalizer {
 public:
  explicit UnicodeNorm(int opts) : opts_(opts) {}
  void normalize(std::string& s) const override {
    bool ascii = true;
    for (char c : s)
      if (static_cast<unsigned char>(c) >= 0x80) { ascii = false; break; }
    if (ascii) return;
    utf8proc_uint8_t* out = nullptr;
    utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                      static_cast<utf8proc_ssize_t>(s.size()), &out,
                                      static_cast<utf8proc_option_t>(opts_));
    if (n >= 0 && out) s.assign(reinterpret_cast<char*>(out), static_cast<size_t>(n));
    std::free(out);
  }

 private:
  int opts_;
};

class ReplaceNorm : public Normalizer {
 public:
  ReplaceNorm(Regex re, std::string content) : re_(std::move(re)), content_(std::move(content)) {}
  void normalize(std::string& s) const override {
    thread_local std::vector<std::pair<size_t, size_t>> ms;
    re_.find_all(s, ms);
    if (ms.empty()) return;
    std::string out;
    out.reserve(s.size() + ms.size() * content_.size());
    size_t prev = 0;
    for (auto [a, b] : ms) {
      out.append(s, prev, a - prev);
      out += content_;
      prev = b;
    }
    out.append(s, prev, std::string::npos);
    s.swap(out);
  }

 private:
  Regex re_;
  std::string content_;
};

class PrependNorm : public Normalizer {
 public:
  explicit PrependNorm(std::string p) : p_(std::move(p)) {}
  void normalize(std::string& s) const override {
    if (!s.empty()) s.insert(0, p_);
  }

 private:
  std::string p_;
};

class LowercaseNorm : public Normalizer {
 public:
  void normalize(std::string& s) const override {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) append_lowercase(out, next_cp(s, i));
    s.swap(out);
  }
};

class StripNorm : public Normalizer {
 public:
  StripNorm(bool l, bool r) : l_(l), r_(r) {}
  void normalize(std::string& s) const override {
    size_t a = 0, b = s.size();
    if (l_) {
      while (a < b) {
        size_t i = a;
        if (!is_whitespace(next_cp(s, i))) break;
        a = i;
      }
    }
    if (r_) {
      while (b > a) {
        size_t st = b - 1;
        while (st > a && (static_cast<unsigned char>(s[st]) & 0xC0) == 0x80) --st;
        size_t i = st;
        if (!is_whitespace(next_cp(s, i))) break;
        b = st;
      }
    }
    s = s.substr(a, b - a);
  }

 private:
  bool l_, r_;
};

class StripAccentsNorm : public Normalizer {
 public:
  void normalize(std::string& s) const override {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
      char32_t c = next_cp(s, i);
      if (!is_combining_mark(c)) append_utf8(out, c);
    }
    s.swap(out);
  }
};

class ByteLevelNorm : public Normalizer {
 public:
  void normalize(std::string& s) const override {
    std::string out;
    out.reserve(s.size() * 2);
    for (unsigned char c : s) out += byte_to_unicode(c);
    s.swap(out);
  }
};

class SequenceNorm : public Normalizer {
 public:
  std::vector<std::unique_ptr<Normalizer>> items;
  void normalize(std::string& s) const override {
    for (auto& n : items) n->normalize(s);
  }
};

// ======================= pre-tokenizers =======================
class SplitPre : public PreTokenizer {
 public:
  SplitPre(Regex re, SplitBehavior b, bool invert) : re_(std::move(re)), beh_(b), invert_(invert) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    thread_local std::vector<Span> spans;
    for_pieces(pieces, [&](Piece& p, std::vector<Piece>& out) {
      regex_spans(re_, p.text, spans);
      if (invert_)
        for (auto& s : spans) s.m = !s.m;
      split_piece(p, spans, beh_, out);
    });
  }

 private:
  Regex re_;
  SplitBehavior beh_;
  bool invert_;
};

const char* kGpt2Pattern = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

class ByteLevelPre : public PreTokenizer {
 public:
  ByteLevelPre(bool add_prefix_space, bool use_regex) : aps_(add_prefix_space), use_regex_(use_regex) {
    if (use_regex_) re_ = make_regex(kGpt2Pattern, false);
  }
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    thread_local std::vector<Span> spans;
    if (aps_ || use_regex_) {
      for_pieces(pieces, [&](Piece& p, std::vector<Piece>& out) {
        if (aps_ && (p.text.empty() || p.text[0] != ' ')) p.text.insert(0, " ");
        if (use_regex_) {
          regex_spans(re_, p.text, spans);
          split_piece(p, spans, SplitBehavior::Isolated, out);
        } else if (!p.text.empty()) {
          out.push_back(std::move(p));
        }
      });
    }
    const ByteTables& bt = byte_tables();
    char buf[512];
    std::string big;
    for (auto& p : pieces) {
      size_t n = p.text.size();
      if (n * 2 <= sizeof(buf)) {
        size_t k = 0;
        for (unsigned char c : p.text) {
          buf[k] = bt.b2u_bytes[c][0];
          buf[k + 1] = bt.b2u_bytes[c][1];
          k += bt.b2u_len[c];
        }
        p.text.assign(buf, k);
      } else {
        big.clear();
        big.reserve(n * 2);
        for (unsigned char c : p.text) big.append(bt.b2u_bytes[c], bt.b2u_len[c]);
        p.text.swap(big);
      }
    }
  }

 private:
  bool aps_, use_regex_;
  Regex re_;
};

class CharSplitPre : public PreTokenizer {
 public:
  enum Kind { Digits, WhitespaceSplit, Punctuation, Delimiter };
  CharSplitPre(Kind k, SplitBehavior b, char32_t delim = 0) : kind_(k), beh_(b), delim_(delim) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    thread_local std::vector<Span> spans;
    for_pieces(pieces, [&](Piece& p, std::vector<Piece>& out) {
      switch (kind_) {
        case Digits: char_spans([](char32_t c) { return is_numeric(c); }, p.text, spans); break;
        case WhitespaceSplit: char_spans([](char32_t c) { return is_whitespace(c); }, p.text, spans); break;
        case Punctuation:
          char_spans(
              [](char32_t c) {
                return (c < 0x80 && c > 0x20 && c < 0x7F && !std::isalnum(static_cast<int>(c))) ||
                       is_punctuation(c);
              },
              p.text, spans);
          break;
        case Delimiter: {
          char32_t d = delim_;
          char_spans([d](char32_t c) { return c == d; }, p.text, spans);
          break;
        }
      }
      split_piece(p, spans, beh_, out);
    });
  }

 private:
  Kind kind_;
  SplitBehavior beh_;
  char32_t delim_;
};

class WhitespacePre : public PreTokenizer {
 public:
  // Rust regex's Unicode \w also holds the join controls U+200C/U+200D.
  WhitespacePre()
      : re_(make_regex("[\\w\\x{200C}\\x{200D}]+|[^\\w\\s\\x{200C}\\x{200D}]+", false)) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    thread_local std::vector<Span> spans;
    for_pieces(pieces, [&](Piece& p, std::vector<Piece>& out) {
      regex_spans(re_, p.text, spans);
      for (auto& s : spans) s.m = !s.m;  // Invert + Removed: drop the non-matching parts
      split_piece(p, spans, SplitBehavior::Removed, out);
    });
  }

 private:
  Regex re_;
};

class MetaspacePre : public PreTokenizer {
 public:
  enum Scheme { Always, First, Never };
  MetaspacePre(char32_t rep, Scheme sc, bool split) : rep_(rep), scheme_(sc), split_(split) {
    append_utf8(rep_str_, rep);
  }
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    thread_local std::vector<Span> spans;
    for_pieces(pieces, [&](Piece& p, std::vector<Piece>& out) {
      if (p.text.find(' ') != std::string::npos) {
        std::string t;
        t.reserve(p.text.size() + 16);
        for (char c : p.text) {
          if (c == ' ') t += rep_str_;
          else t.push_back(c);
        }
        p.text.swap(t);
      }
      bool starts = p.text.compare(0, rep_str_.size(), rep_str_) == 0;
      if (!starts && (scheme_ == Always || (scheme_ == First && p.first))) p.text.insert(0, rep_str_);
      if (split_) {
        char32_t r = rep_;
        char_spans([r](char32_t c) { return c == r; }, p.text, spans);
        split_piece(p, spans, SplitBehavior::MergedWithNext, out);
      } else if (!p.text.empty()) {
        out.push_back(std::move(p));
      }
    });
  }

 private:
  char32_t rep_;
  std::string rep_str_;
  Scheme scheme_;
  bool split_;
};

class SequencePre : public PreTokenizer {
 public:
  std::vector<std::unique_ptr<PreTokenizer>> items;
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    for (auto& p : items) p->pre_tokenize(pieces);
  }
};

// ======================= post-processors =======================
// A template over one sequence: ids before and after A (type ids are not needed here).
class TemplatePost : public PostProcessor {
 public:
  std::vector<int32_t> before, after;
  void process(std::vector<int32_t>& ids, bool add) const override {
    if (!add) return;
    if (!before.empty()) ids.insert(ids.begin(), before.begin(), before.end());
    ids.insert(ids.end(), after.begin(), after.end());
  }
};

class NoopPost : public PostProcessor {
 public:
  void process(std::vector<int32_t>&, bool) const override {}
};

class SequencePost : public PostProcessor {
 public:
  std::vector<std::unique_ptr<PostProcessor>> items;
  void process(std::vector<int32_t>& ids, bool add) const override {
    for (auto& p : items) p->process(ids, add);
  }
};

std::unique_ptr<PostProcessor> make_template(const json& j) {
  auto t = std::make_unique<TemplatePost>();
  std::unordered_map<std::string, std::vector<int32_t>> specials;
  if (j.contains("special_tokens") && j["special_tokens"].is_object()) {
    for (auto& [k, v] : j["special_tokens"].items()) {
      std::vector<int32_t> ids;
      if (v.contains("ids") && v["ids"].is_array())
        for (auto& x : v["ids"]) ids.push_back(x.get<int32_t>());
      specials[k] = ids;
    }
  }
  const json& single = j.contains("single") ? j["single"] : json();
  if (!single.is_array()) throw ComponentError{"TemplateProcessing: 'single' must be an array"};
  bool seen_a = false;
  for (auto& piece : single) {
    std::string sp_id;
    bool is_seq = false;
    if (piece.is_object() && piece.contains("SpecialToken")) {
      sp_id = piece["SpecialToken"].value("id", "");
    } else if (piece.is_object() && piece.contains("Sequence")) {
      is_seq = true;
    } else if (piece.is_string()) {  // "$A", "$A:0", "[CLS]", "[CLS]:0"
      std::string s = piece.get<std::string>();
      auto colon = s.rfind(':');
      if (colon != std::string::npos) s = s.substr(0, colon);
      if (!s.empty() && s[0] == '$') is_seq = true;
      else sp_id = s;
    } else {
      throw ComponentError{"TemplateProcessing: bad piece " + piece.dump()};
    }
    if (is_seq) {
      seen_a = true;
      continue;
    }
    auto it = specials.find(sp_id);
    if (it == specials.end()) throw ComponentError{"TemplateProcessing: missing special token '" + sp_id + "'"};
    auto& dst = seen_a ? t->after : t->before;
    dst.insert(dst.end(), it->second.begin(), it->second.end());
  }
  return t;
}

// Bert: [CLS] A [SEP]; Roberta: <s> A </s>. Both store [token, id] pairs.
std::unique_ptr<PostProcessor> make_cls_sep(const json& j) {
  auto t = std::make_unique<TemplatePost>();
  auto id_of = [&](const char* k) -> int32_t {
    if (!j.contains(k) || !j[k].is_array() || j[k].size() != 2) throw ComponentError{std::string("missing ") + k};
    return j[k][1].get<int32_t>();
  };
  t->before.push_back(id_of("cls"));
  t->after.push_back(id_of("sep"));
  return t;
}

// ======================= decoders =======================
class ByteLevelDec : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& toks) const override {
    std::string bytes;
    for (auto& t : toks) {
      size_t start = bytes.size();
      bool ok = true;
      for (size_t i = 0; i < t.size();) {
        int b = unicode_to_byte(next_cp(t, i));
        if (b < 0) { ok = false; break; }
        bytes.push_back(static_cast<char>(b));
      }
      if (!ok) {
        bytes.resize(start);
        bytes += t;
      }
    }
    toks.assign(1, utf8_lossy(bytes));
  }
};

class MetaspaceDec : public Decoder {
 public:
  MetaspaceDec(char32_t rep, bool never) : rep_(rep), never_(never) {}
  void decode_chain(std::vector<std::string>& toks) const override {
    for (size_t k = 0; k < toks.size(); ++k) {
      std::string out;
      const std::string& t = toks[k];
      for (size_t i = 0; i < t.size();) {
        size_t b = i;
        char32_t c = next_cp(t, i);
        if (c == rep_) {
          if (!(k == 0 && !never_)) out.push_back(' ');
        } else {
          out.append(t, b, i - b);
        }
      }
      toks[k].swap(out);
    }
  }

 private:
  char32_t rep_;
  bool never_;
};

class ByteFallbackDec : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& toks) const override {
    std::vector<std::string> out;
    out.reserve(toks.size());
    std::string pending;
    auto flush = [&]() {
      if (pending.empty()) return;
      if (is_valid_utf8(pending)) {
        out.push_back(pending);
      } else {
        for (size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
      }
      pending.clear();
    };
    for (auto& t : toks) {
      int byte = -1;
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') {
        auto hex = [](char c) -> int {
          if (c >= '0' && c <= '9') return c - '0';
          if (c >= 'a' && c <= 'f') return c - 'a' + 10;
          if (c >= 'A' && c <= 'F') return c - 'A' + 10;
          return -1;
        };
        int h = hex(t[3]), l = hex(t[4]);
        if (h >= 0 && l >= 0) byte = h * 16 + l;
      }
      if (byte >= 0) {
        pending.push_back(static_cast<char>(byte));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    toks.swap(out);
  }
};

class FuseDec : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& toks) const override {
    std::string s;
    for (auto& t : toks) s += t;
    toks.assign(1, std::move(s));
  }
};

class StripDec : public Decoder {
 public:
  StripDec(char32_t c, size_t start, size_t stop) : c_(c), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& toks) const override {
    for (auto& t : toks) {
      std::vector<char32_t> cs = to_cps(t);
      size_t a = 0;
      for (size_t i = 0; i < start_ && i < cs.size(); ++i) {
        if (cs[i] == c_) a = i + 1;
        else break;
      }
      size_t b = cs.size();
      for (size_t i = 0; i < stop_ && i < cs.size(); ++i) {
        size_t idx = cs.size() - i - 1;
        if (cs[idx] == c_) b = idx;
        else break;
      }
      std::string out;
      for (size_t i = a; i < b; ++i) append_utf8(out, cs[i]);
      t.swap(out);
    }
  }

 private:
  char32_t c_;
  size_t start_, stop_;
};

class ReplaceDec : public Decoder {
 public:
  ReplaceDec(Regex re, std::string content) : n_(std::move(re), std::move(content)) {}
  void decode_chain(std::vector<std::string>& toks) const override {
    for (auto& t : toks) n_.normalize(t);
  }

 private:
  ReplaceNorm n_;
};

class BPEDec : public Decoder {  // replaces the end-of-word suffix by a space (none after the last token)
 public:
  explicit BPEDec(std::string suffix) : suffix_(std::move(suffix)) {}
  void decode_chain(std::vector<std::string>& toks) const override {
    for (size_t k = 0; k < toks.size(); ++k) {
      std::string& t = toks[k];
      std::string out;
      size_t pos = 0;
      while (!suffix_.empty()) {
        size_t f = t.find(suffix_, pos);
        if (f == std::string::npos) break;
        out.append(t, pos, f - pos);
        out += (k + 1 == toks.size()) ? "" : " ";
        pos = f + suffix_.size();
      }
      out.append(t, pos, std::string::npos);
      t.swap(out);
    }
  }

 private:
  std::string suffix_;
};

class SequenceDec : public Decoder {
 public:
  std::vector<std::unique_ptr<Decoder>> items;
  void decode_chain(std::vector<std::string>& toks) const override {
    for (auto& d : items) d->decode_chain(toks);
  }
};

}  // namespace

const std::string& byte_to_unicode(uint8_t b) { return byte_tables().b2u[b]; }
int unicode_to_byte(char32_t c) { return c < 324 ? byte_tables().u2b[c] : -1; }

// ======================= factories =======================
std::unique_ptr<Normalizer> make_normalizer(const json& j) {
  if (j.is_null()) return nullptr;
  std::string t = type_of(j);
  if (t == "Sequence") {
    auto s = std::make_unique<SequenceNorm>();
    if (j.contains("normalizers") && j["normalizers"].is_array())
      for (auto& x : j["normalizers"])
        if (auto n = make_normalizer(x)) s->items.push_back(std::move(n));
    return s;
  }
  if (t == "NFC") return std::make_unique<UnicodeNorm>(UTF8PROC_STABLE | UTF8PROC_COMPOSE);
  if (t == "NFD") return std::make_unique<UnicodeNorm>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE);
  if (t == "NFKC") return std::make_unique<UnicodeNorm>(UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
  if (t == "NFKD") return std::make_unique<UnicodeNorm>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT);
  if (t == "Replace") {
    if (!j.contains("pattern")) throw ComponentError{"Replace: missing 'pattern'"};
    return std::make_unique<ReplaceNorm>(pattern_regex(j["pattern"]), get_str(j, "content"));
  }
  if (t == "Prepend") return std::make_unique<PrependNorm>(get_str(j, "prepend"));
  if (t == "Lowercase") return std::make_unique<LowercaseNorm>();
  if (t == "Strip") return std::make_unique<StripNorm>(get_bool(j, "strip_left", true), get_bool(j, "strip_right", true));
  if (t == "StripAccents") return std::make_unique<StripAccentsNorm>();
  if (t == "ByteLevel") return std::make_unique<ByteLevelNorm>();
  unsupported("normalizer", j);
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j) {
  if (j.is_null()) return nullptr;
  std::string t = type_of(j);
  if (t == "Sequence") {
    auto s = std::make_unique<SequencePre>();
    if (j.contains("pretokenizers") && j["pretokenizers"].is_array())
      for (auto& x : j["pretokenizers"])
        if (auto p = make_pre_tokenizer(x)) s->items.push_back(std::move(p));
    return s;
  }
  if (t == "Split") {
    if (!j.contains("pattern")) throw ComponentError{"Split: missing 'pattern'"};
    return std::make_unique<SplitPre>(pattern_regex(j["pattern"]),
                                      parse_behavior(j.contains("behavior") ? j["behavior"] : json("Isolated")),
                                      get_bool(j, "invert", false));
  }
  if (t == "ByteLevel")
    return std::make_unique<ByteLevelPre>(get_bool(j, "add_prefix_space", true), get_bool(j, "use_regex", true));
  if (t == "Digits")
    return std::make_unique<CharSplitPre>(CharSplitPre::Digits, get_bool(j, "individual_digits", false)
                                                                    ? SplitBehavior::Isolated
                                                                    : SplitBehavior::Contiguous);
  if (t == "Whitespace") return std::make_unique<WhitespacePre>();
  if (t == "WhitespaceSplit") return std::make_unique<CharSplitPre>(CharSplitPre::WhitespaceSplit, SplitBehavior::Removed);
  if (t == "Punctuation")
    return std::make_unique<CharSplitPre>(
        CharSplitPre::Punctuation, parse_behavior(j.contains("behavior") ? j["behavior"] : json("Isolated")));
  if (t == "CharDelimiterSplit")
    return std::make_unique<CharSplitPre>(CharSplitPre::Delimiter, SplitBehavior::Removed, get_char(j, "delimiter", ' '));
  if (t == "Metaspace") {
    char32_t rep = get_char(j, "replacement", 0x2581);
    std::string sc = get_str(j, "prepend_scheme", "");
    MetaspacePre::Scheme scheme = MetaspacePre::Always;
    if (sc == "first") scheme = MetaspacePre::First;
    else if (sc == "never") scheme = MetaspacePre::Never;
    else if (sc.empty() && !get_bool(j, "add_prefix_space", true)) scheme = MetaspacePre::Never;
    return std::make_unique<MetaspacePre>(rep, scheme, get_bool(j, "split", true));
  }
  unsupported("pre_tokenizer", j);
}

std::unique_ptr<PostProcessor> make_post_processor(const json& j) {
  if (j.is_null()) return nullptr;
  std::string t = type_of(j);
  if (t == "Sequence") {
    auto s = std::make_unique<SequencePost>();
    if (j.contains("processors") && j["processors"].is_array())
      for (auto& x : j["processors"])
        if (auto p = make_post_processor(x)) s->items.push_back(std::move(p));
    return s;
  }
  if (t == "TemplateProcessing") return make_template(j);
  if (t == "ByteLevel") return std::make_unique<NoopPost>();
  if (t == "BertProcessing" || t == "RobertaProcessing") return make_cls_sep(j);
  unsupported("post_processor", j);
}

std::unique_ptr<PostProcessor> make_bos_eos_processor(int32_t bos, int32_t eos) {
  auto t = std::make_unique<TemplatePost>();
  if (bos >= 0) t->before.push_back(bos);
  if (eos >= 0) t->after.push_back(eos);
  return t;
}

std::unique_ptr<Decoder> make_decoder(const json& j) {
  if (j.is_null()) return nullptr;
  std::string t = type_of(j);
  if (t == "Sequence") {
    auto s = std::make_unique<SequenceDec>();
    if (j.contains("decoders") && j["decoders"].is_array())
      for (auto& x : j["decoders"])
        if (auto d = make_decoder(x)) s->items.push_back(std::move(d));
    return s;
  }
  if (t == "ByteLevel") return std::make_unique<ByteLevelDec>();
  if (t == "Metaspace") {
    std::string sc = get_str(j, "prepend_scheme", "");
    bool never = sc == "never" || (sc.empty() && !get_bool(j, "add_prefix_space", true));
    return std::make_unique<MetaspaceDec>(get_char(j, "replacement", 0x2581), never);
  }
  if (t == "ByteFallback") return std::make_unique<ByteFallbackDec>();
  if (t == "Fuse") return std::make_unique<FuseDec>();
  if (t == "Strip") {
    auto num = [&](const char* k) -> size_t {
      return j.contains(k) && j[k].is_number_unsigned() ? j[k].get<size_t>() : 0;
    };
    return std::make_unique<StripDec>(get_char(j, "content", ' '), num("start"), num("stop"));
  }
  if (t == "Replace") {
    if (!j.contains("pattern")) throw ComponentError{"Replace: missing 'pattern'"};
    return std::make_unique<ReplaceDec>(pattern_regex(j["pattern"]), get_str(j, "content"));
  }
  if (t == "BPEDecoder") return std::make_unique<BPEDec>(get_str(j, "suffix", "</w>"));
  unsupported("decoder", j);
}

}  // namespace am::tok
