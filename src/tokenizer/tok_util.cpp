#include "tokenizer/tok_util.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <cstring>
#include <stdexcept>

namespace am::tok {

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Length of the valid UTF-8 sequence at s[i], or 0 with *bad set to the length of the maximal invalid
// subpart (>= 1) when the bytes there are not a valid sequence.
static size_t seq_at(std::string_view s, size_t i, size_t* bad) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size();
  unsigned char c = p[i];
  if (c < 0x80) return 1;
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) need = 2;
  else if (c == 0xE0) { need = 3; lo = 0xA0; }
  else if (c >= 0xE1 && c <= 0xEC) need = 3;
  else if (c == 0xED) { need = 3; hi = 0x9F; }
  else if (c >= 0xEE && c <= 0xEF) need = 3;
  else if (c == 0xF0) { need = 4; lo = 0x90; }
  else if (c >= 0xF1 && c <= 0xF3) need = 4;
  else if (c == 0xF4) { need = 4; hi = 0x8F; }
  else { *bad = 1; return 0; }
  size_t k = 1;
  for (; k < need; ++k) {
    if (i + k >= n) { *bad = k; return 0; }
    unsigned char b = p[i + k];
    unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) { *bad = k; return 0; }
  }
  return need;
}

size_t valid_utf8_prefix(std::string_view s) {
  size_t i = 0, bad = 0;
  while (i < s.size()) {
    while (i + 8 <= s.size()) {  // ASCII fast path
      uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= s.size()) break;
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    size_t l = seq_at(s, i, &bad);
    if (!l) return i;
    i += l;
  }
  return i;
}

bool is_valid_utf8(std::string_view s) { return valid_utf8_prefix(s) == s.size(); }

std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    size_t bad = 0;
    size_t l = seq_at(s, i, &bad);
    if (l) {
      out.append(s.data() + i, l);
      i += l;
    } else {
      out.append("\xEF\xBF\xBD");
      i += bad;
    }
  }
  return out;
}

std::vector<char32_t> to_cps(std::string_view s) {
  std::vector<char32_t> r;
  r.reserve(s.size());
  for (size_t i = 0; i < s.size();) r.push_back(next_cp(s, i));
  return r;
}

bool is_whitespace(char32_t c) {
  if (c <= 0x20) return c == 0x20 || (c >= 0x09 && c <= 0x0D);
  if (c < 0x85) return false;
  switch (c) {
    case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
      return true;
    default:
      return c >= 0x2000 && c <= 0x200A;
  }
}

static inline int cat(char32_t c) { return utf8proc_category(static_cast<utf8proc_int32_t>(c)); }

bool is_numeric(char32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  int k = cat(c);
  return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

bool is_word(char32_t c) {
  if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  if (c == 0x200C || c == 0x200D) return true;
  int k = cat(c);
  return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_NL) || k == UTF8PROC_CATEGORY_PC;
}

bool is_punctuation(char32_t c) {
  int k = cat(c);
  return k >= UTF8PROC_CATEGORY_PC && k <= UTF8PROC_CATEGORY_PO;
}

bool is_combining_mark(char32_t c) {
  int k = cat(c);
  return k >= UTF8PROC_CATEGORY_MN && k <= UTF8PROC_CATEGORY_ME;
}

void append_lowercase(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c >= 'A' && c <= 'Z' ? c + 32 : c));
    return;
  }
  if (c == 0x130) {  // the only unconditional multi-character lowercase mapping
    out.append("i\xCC\x87");
    return;
  }
  append_utf8(out, static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))));
}

// ---------------- Regex ----------------
// PCRE2's \w (even with UCP) is letters, numbers and '_'; Oniguruma's and Rust regex's Unicode \w is
// Alphabetic, marks, decimal digits and connector punctuation. Rewrite \w (and \W outside classes).
static std::string unicode_word_classes(const std::string& p) {
  static const char* kWord = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}";
  if (p.find("\\w") == std::string::npos && p.find("\\W") == std::string::npos) return p;
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      char n = p[i + 1];
      if (n == 'w') out += in_class ? std::string(kWord) : "[" + std::string(kWord) + "]";
      else if (n == 'W' && !in_class) out += "[^" + std::string(kWord) + "]";
      else { out += c; out += n; }
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // a ']' right after '[' or '[^' is a literal
      if (i + 1 < p.size() && p[i + 1] == '^') { out += '^'; ++i; }
      if (i + 1 < p.size() && p[i + 1] == ']') { out += ']'; ++i; }
      continue;
    }
    if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {  // POSIX [:name:]
      size_t e = p.find(":]", i + 2);
      if (e != std::string::npos) {
        out.append(p, i, e + 2 - i);
        i = e + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

Regex::Regex(const std::string& pattern_in, bool literal) {
  int err = 0;
  PCRE2_SIZE off = 0;
  const std::string pattern = literal ? pattern_in : unicode_word_classes(pattern_in);
  uint32_t opts = literal ? (PCRE2_UTF | PCRE2_LITERAL) : (PCRE2_UTF | PCRE2_UCP);
  pcre2_code* c = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), opts, &err, &off,
                                nullptr);
  if (!c) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(err, buf, sizeof(buf));
    throw std::runtime_error("bad regex /" + pattern + "/ at offset " + std::to_string(off) + ": " +
                             reinterpret_cast<char*>(buf));
  }
  code_ = c;
  jit_ = pcre2_jit_compile(c, PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() {
  if (code_) pcre2_code_free(static_cast<pcre2_code*>(code_));
}
Regex::Regex(Regex&& o) noexcept : code_(o.code_), jit_(o.jit_) { o.code_ = nullptr; }
Regex& Regex::operator=(Regex&& o) noexcept {
  if (this != &o) {
    if (code_) pcre2_code_free(static_cast<pcre2_code*>(code_));
    code_ = o.code_;
    jit_ = o.jit_;
    o.code_ = nullptr;
  }
  return *this;
}

namespace {
// Per-thread match data, grown on demand (avoids one malloc per call).
struct MatchData {
  pcre2_match_data* md = nullptr;
  ~MatchData() {
    if (md) pcre2_match_data_free(md);
  }
};
thread_local MatchData t_md;
}  // namespace

void Regex::find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const {
  out.clear();
  if (!code_) return;
  auto* code = static_cast<pcre2_code*>(code_);
  if (!t_md.md) t_md.md = pcre2_match_data_create(32, nullptr);
  pcre2_match_data* md = t_md.md;
  auto subj = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t pos = 0;
  const size_t n = s.size();
  while (pos <= n) {
    int rc;
    if (jit_) {
      rc = pcre2_jit_match(code, subj, n, pos, 0, md, nullptr);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT) rc = pcre2_match(code, subj, n, pos, PCRE2_NO_UTF_CHECK, md, nullptr);
    } else {
      rc = pcre2_match(code, subj, n, pos, PCRE2_NO_UTF_CHECK, md, nullptr);
    }
    if (rc < 0) break;  // no match (or a resource error: stop like onig's iterator does)
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t a = ov[0], b = ov[1];
    out.emplace_back(a, b);
    if (b > a) {
      pos = b;
    } else {
      if (a >= n) break;
      pos = a + utf8_len(static_cast<unsigned char>(s[a]));
    }
  }
}

// ---------------- StrMap ----------------
uint64_t hash_bytes(std::string_view s) {
  // FNV-1a over 8-byte words with a final mix: fast for short keys.
  uint64_t h = 0xcbf29ce484222325ull ^ (s.size() * 0x9E3779B97F4A7C15ull);
  const char* p = s.data();
  size_t n = s.size();
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  if (n) {
    uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = (h ^ w) * 0x100000001b3ull;
  }
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

void StrMap::reserve(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  if (cap <= slots_.size()) return;
  std::vector<Slot> old;
  old.swap(slots_);
  slots_.assign(cap, Slot{});
  size_t mask = cap - 1;
  for (const Slot& sl : old) {
    if (sl.len == kFree) continue;
    size_t i = hash_bytes(std::string_view(key_of(sl), sl.len)) & mask;
    while (slots_[i].len != kFree) i = (i + 1) & mask;
    slots_[i] = sl;
  }
}

void StrMap::grow() { reserve(std::max<size_t>(16, slots_.size())); }

void StrMap::set(std::string_view key, int32_t value) {
  if ((size_ + 1) * 2 > slots_.size()) reserve(std::max<size_t>(8, (size_ + 1) * 2));
  uint64_t h = hash_bytes(key);
  uint32_t tag = static_cast<uint32_t>(h >> 32);
  size_t mask = slots_.size() - 1;
  size_t i = h & mask;
  while (slots_[i].len != kFree) {
    const Slot& sl = slots_[i];
    if (sl.tag == tag && sl.len == key.size() && std::memcmp(key_of(sl), key.data(), key.size()) == 0) {
      slots_[i].value = value;
      return;
    }
    i = (i + 1) & mask;
  }
  Slot& sl = slots_[i];
  sl.tag = tag;
  sl.len = static_cast<uint32_t>(key.size());
  sl.value = value;
  if (key.size() <= kInline) {
    std::memcpy(sl.inl, key.data(), key.size());
  } else {
    sl.off = static_cast<uint32_t>(arena_.size());
    arena_.append(key);
  }
  ++size_;
}

int32_t StrMap::get(std::string_view key) const {
  if (slots_.empty()) return -1;
  uint64_t h = hash_bytes(key);
  uint32_t tag = static_cast<uint32_t>(h >> 32);
  size_t mask = slots_.size() - 1;
  size_t i = h & mask;
  const char* arena = arena_.data();
  const size_t n = key.size();
  while (true) {
    const Slot& sl = slots_[i];
    if (sl.len == kFree) return -1;
    if (sl.tag == tag && sl.len == n &&
        std::memcmp(n <= kInline ? sl.inl : arena + sl.off, key.data(), n) == 0)
      return sl.value;
    i = (i + 1) & mask;
  }
}

}  // namespace am::tok
