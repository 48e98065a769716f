// Internal helpers of the tokenizer: UTF-8, Unicode character classes with the same meaning as Rust's
// `char` methods (what HF tokenizers uses), a PCRE2 regex wrapper with Oniguruma-like find_iter, and a
// compact string -> id hash map.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace am::tok {

// ---- UTF-8 ----
// Decodes one code point at s[i] (s must be valid UTF-8); advances i.
inline char32_t next_cp(std::string_view s, size_t& i) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) { ++i; return c; }
  if (c < 0xE0) { char32_t r = ((c & 0x1F) << 6) | (s[i + 1] & 0x3F); i += 2; return r; }
  if (c < 0xF0) {
    char32_t r = ((c & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
    i += 3;
    return r;
  }
  char32_t r = ((c & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
  i += 4;
  return r;
}
inline size_t utf8_len(unsigned char lead) {
  return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
}
void append_utf8(std::string& out, char32_t cp);
// Length of the longest valid UTF-8 prefix.
size_t valid_utf8_prefix(std::string_view s);
bool is_valid_utf8(std::string_view s);
// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes U+FFFD.
std::string utf8_lossy(std::string_view bytes);
std::vector<char32_t> to_cps(std::string_view s);

// ---- character classes (Rust semantics) ----
bool is_whitespace(char32_t c);  // char::is_whitespace (White_Space)
bool is_numeric(char32_t c);     // char::is_numeric (Nd, Nl, No)
bool is_word(char32_t c);        // regex crate \w (Unicode)
bool is_punctuation(char32_t c); // P* categories (and ASCII punctuation)
bool is_combining_mark(char32_t c);
// char::to_lowercase appended to out.
void append_lowercase(std::string& out, char32_t c);

// ---- regex (PCRE2, UTF + UCP, JIT when available) ----
class Regex {
 public:
  Regex() = default;
  // Throws std::runtime_error with PCRE2's message on a bad pattern.
  explicit Regex(const std::string& pattern, bool literal = false);
  ~Regex();
  Regex(Regex&& o) noexcept;
  Regex& operator=(Regex&& o) noexcept;
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // All non-overlapping matches, left to right (an empty match advances one character), as byte
  // offsets into s. s must be valid UTF-8.
  void find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const;
  bool valid() const { return code_ != nullptr; }

 private:
  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;
};

// ---- string -> int32 open-addressing hash map (keys live in one arena) ----
class StrMap {
 public:
  void reserve(size_t n);
  // Inserts or overwrites.
  void set(std::string_view key, int32_t value);
  // Returns -1 when absent.
  int32_t get(std::string_view key) const;
  size_t size() const { return size_; }

 private:
  struct Slot {  // 32 bytes; len == kFree marks an empty slot. Keys up to 16 bytes live inline.
    uint32_t tag = 0;  // high 32 bits of the hash
    uint32_t len = kFree;
    int32_t value = -1;
    uint32_t off = 0;  // into arena_ (keys longer than kInline)
    char inl[16] = {};
  };
  static constexpr uint32_t kInline = 16;
  const char* key_of(const Slot& s) const { return s.len <= kInline ? s.inl : arena_.data() + s.off; }
  static constexpr uint32_t kFree = 0xFFFFFFFFu;
  void grow();
  std::vector<Slot> slots_;
  std::string arena_;
  size_t size_ = 0;
};

uint64_t hash_bytes(std::string_view s);

}  // namespace am::tok
