// Jinja2 lexer (see jinja_lexer.h). Follows the documented Jinja2 whitespace rules:
//  - `{%-` / `{{-` / `{#-` strip all whitespace before the tag, `-%}` / `-}}` / `-#}` all after it;
//  - lstrip_blocks: spaces/tabs between a line start and a `{%` or `{#` tag are removed (not for
//    `{{`, not for `{%+`);
//  - trim_blocks: the first newline after `%}` or `#}` is removed (not after `+%}`);
//  - one trailing newline of the template is dropped.
#include "tokenizer/jinja_lexer.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "tokenizer/jinja_value.h"

namespace am::jinja {

std::string where(const std::string& name, int line) { return name + " line " + std::to_string(line) + ": "; }

namespace {

// Decodes the UTF-8 code point at s[i] without advancing; len receives its byte length.
char32_t peek_cp(std::string_view s, size_t i, size_t& len) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  if (i + len > s.size()) len = 1;
  if (len == 1) return c;
  std::u32string d = utf8_decode(s.substr(i, len));
  return d.size() == 1 ? d[0] : c;
}

// Python's `\s` at s[i] (any Unicode whitespace); len receives the byte length.
bool ws_at(std::string_view s, size_t i, size_t& len) {
  if (i >= s.size()) return false;
  return py_isspace(peek_cp(s, i, len));
}

size_t skip_ws(std::string_view s, size_t i) {
  size_t len;
  while (ws_at(s, i, len)) i += len;
  return i;
}

// Python str.rstrip() on UTF-8.
std::string rstrip_ws(std::string_view s) { return py_strip(s, false, true); }

bool only_ws(std::string_view s) {
  size_t i = 0, len;
  while (i < s.size()) {
    if (!ws_at(s, i, len)) return false;
    i += len;
  }
  return true;
}

int count_nl(std::string_view s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

bool starts(std::string_view s, size_t i, const char* lit) {
  size_t n = std::strlen(lit);
  return i + n <= s.size() && s.compare(i, n, lit) == 0;
}

bool is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_name_char(char c) { return is_name_start(c) || (c >= '0' && c <= '9'); }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

class Lexer {
 public:
  Lexer(std::string_view src, const std::string& name) : src_(src), name_(name) {}

  std::vector<Token> run() {
    size_t n = src_.size();
    while (pos_ < n) {
      size_t k = find_open(pos_);
      if (k == std::string::npos) {
        emit_text(src_.substr(pos_), line_);
        break;
      }
      std::string_view text = src_.substr(pos_, k - pos_);
      char kind = src_[k + 1];
      char mod = (k + 2 < n && (src_[k + 2] == '-' || src_[k + 2] == '+')) ? src_[k + 2] : 0;
      int text_line = line_;
      line_ += count_nl(text);

      // raw block: {% raw %} ... {% endraw %}
      size_t raw_body = 0;
      bool raw = kind == '%' && is_raw_open(k + 2 + (mod ? 1 : 0), raw_body);

      std::string data;
      if (mod == '-') {
        data = rstrip_ws(text);
      } else if (mod != '+' && kind != '{') {
        size_t l_pos = text.rfind('\n');
        l_pos = l_pos == std::string_view::npos ? 0 : l_pos + 1;
        if ((l_pos > 0 || line_starting_) && l_pos < text.size() && only_ws(text.substr(l_pos)))
          data = std::string(text.substr(0, l_pos));
        else
          data = std::string(text);
      } else {
        data = std::string(text);
      }
      emit_text(data, text_line);

      if (raw) {
        lex_raw(k, raw_body);
      } else if (kind == '#') {
        lex_comment(k + 2 + (mod ? 1 : 0));
      } else {
        lex_tag(kind, k + 2 + (mod ? 1 : 0));
      }
    }
    Token eof;
    eof.type = TokType::Eof;
    eof.line = line_;
    out_.push_back(eof);
    return std::move(out_);
  }

 private:
  std::string_view src_;
  const std::string& name_;
  size_t pos_ = 0;
  int line_ = 1;
  bool line_starting_ = true;
  std::vector<Token> out_;

  [[noreturn]] void fail(int line, const std::string& msg) { throw FormatError(where(name_, line) + msg); }

  size_t find_open(size_t from) const {
    for (size_t i = src_.find('{', from); i != std::string::npos && i + 1 < src_.size(); i = src_.find('{', i + 1)) {
      char c = src_[i + 1];
      if (c == '{' || c == '%' || c == '#') return i;
    }
    return std::string::npos;
  }

  void emit_text(std::string_view s, int line) {
    if (s.empty()) return;
    Token t;
    t.type = TokType::Text;
    t.text = std::string(s);
    t.line = line;
    out_.push_back(std::move(t));
  }

  void push(TokType type, std::string text, int line) {
    Token t;
    t.type = type;
    t.text = std::move(text);
    t.line = line;
    out_.push_back(std::move(t));
  }

  // At i (just after "{%" and its modifier): \s* raw \s* ( -%} \s* | %} ). body receives the offset
  // where the raw content starts.
  bool is_raw_open(size_t i, size_t& body) {
    i = skip_ws(src_, i);
    if (!starts(src_, i, "raw")) return false;
    if (i + 3 < src_.size() && is_name_char(src_[i + 3])) return false;
    i = skip_ws(src_, i + 3);
    if (starts(src_, i, "-%}")) {
      body = skip_ws(src_, i + 3);
      return true;
    }
    if (starts(src_, i, "%}")) {
      body = i + 2;
      return true;
    }
    return false;
  }

  void lex_raw(size_t open, size_t body) {
    int start_line = line_;
    line_ += count_nl(src_.substr(open, body - open));
    // find {%(-|+|)\s*endraw\s*(+%}|-%}\s*|%}\n?)
    for (size_t i = src_.find("{%", body); i != std::string::npos; i = src_.find("{%", i + 1)) {
      size_t j = i + 2;
      char mod = 0;
      if (j < src_.size() && (src_[j] == '-' || src_[j] == '+')) mod = src_[j++];
      j = skip_ws(src_, j);
      if (!starts(src_, j, "endraw")) continue;
      j = skip_ws(src_, j + 6);
      size_t end;
      if (starts(src_, j, "+%}")) end = j + 3;
      else if (starts(src_, j, "-%}")) end = skip_ws(src_, j + 3);
      else if (starts(src_, j, "%}")) end = j + 2 + ((j + 2 < src_.size() && src_[j + 2] == '\n') ? 1 : 0);
      else continue;
      std::string_view text = src_.substr(body, i - body);
      std::string data;
      if (mod == '-') {
        data = rstrip_ws(text);
      } else if (mod != '+') {
        size_t l_pos = text.rfind('\n');
        l_pos = l_pos == std::string_view::npos ? 0 : l_pos + 1;
        // the raw body never starts a line by itself for lstrip purposes unless after a newline
        if (l_pos > 0 && l_pos < text.size() && only_ws(text.substr(l_pos))) data = std::string(text.substr(0, l_pos));
        else data = std::string(text);
      } else {
        data = std::string(text);
      }
      emit_text(data, line_);
      line_ += count_nl(src_.substr(body, end - body));
      line_starting_ = end > 0 && src_[end - 1] == '\n';
      pos_ = end;
      return;
    }
    fail(start_line, "missing end of raw directive");
  }

  void lex_comment(size_t i) {
    int start_line = line_;
    for (size_t p = i; p < src_.size(); ++p) {
      size_t end;
      if (starts(src_, p, "+#}")) end = p + 3;
      else if (starts(src_, p, "-#}")) end = skip_ws(src_, p + 3);
      else if (starts(src_, p, "#}")) end = p + 2 + ((p + 2 < src_.size() && src_[p + 2] == '\n') ? 1 : 0);
      else continue;
      line_ += count_nl(src_.substr(i, end - i));
      line_starting_ = src_[end - 1] == '\n';
      pos_ = end;
      return;
    }
    fail(start_line, "missing end of comment tag");
  }

  void lex_tag(char kind, size_t i) {
    bool block = kind == '%';
    push(block ? TokType::BlockBegin : TokType::VarBegin, block ? "{%" : "{{", line_);
    std::vector<char> stack;
    size_t n = src_.size();
    while (true) {
      if (i >= n) fail(line_, block ? "unexpected end of template, expected '%}'" : "unexpected end of template, expected '}}'");
      if (stack.empty()) {
        size_t end = 0;
        bool found = false;
        if (block) {
          if (starts(src_, i, "+%}")) end = i + 3, found = true;
          else if (starts(src_, i, "-%}")) end = skip_ws(src_, i + 3), found = true;
          else if (starts(src_, i, "%}")) end = i + 2 + ((i + 2 < n && src_[i + 2] == '\n') ? 1 : 0), found = true;
        } else {
          if (starts(src_, i, "-}}")) end = skip_ws(src_, i + 3), found = true;
          else if (starts(src_, i, "}}")) end = i + 2, found = true;
        }
        if (found) {
          push(block ? TokType::BlockEnd : TokType::VarEnd, block ? "%}" : "}}", line_);
          line_ += count_nl(src_.substr(i, end - i));
          line_starting_ = src_[end - 1] == '\n';
          pos_ = end;
          return;
        }
      }
      size_t len;
      if (ws_at(src_, i, len)) {
        size_t j = skip_ws(src_, i);
        line_ += count_nl(src_.substr(i, j - i));
        i = j;
        continue;
      }
      char c = src_[i];
      if (is_digit(c)) {
        i = lex_number(i);
        continue;
      }
      if (is_name_start(c)) {
        size_t j = i;
        while (j < n && is_name_char(src_[j])) ++j;
        push(TokType::Name, std::string(src_.substr(i, j - i)), line_);
        i = j;
        continue;
      }
      if (c == '\'' || c == '"') {
        i = lex_string(i);
        continue;
      }
      static const char* ops2[] = {"//", "**", "==", "!=", ">=", "<="};
      bool op2 = false;
      for (const char* o : ops2)
        if (starts(src_, i, o)) {
          push(TokType::Op, o, line_);
          i += 2;
          op2 = true;
          break;
        }
      if (op2) continue;
      if (std::strchr("+-/*%~[](){}><=.:|,;", c) && c != 0) {
        if (c == '(' || c == '[' || c == '{') {
          stack.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
        } else if (c == ')' || c == ']' || c == '}') {
          if (stack.empty()) fail(line_, std::string("unexpected '") + c + "'");
          if (stack.back() != c) fail(line_, std::string("unexpected '") + c + "', expected '" + stack.back() + "'");
          stack.pop_back();
        }
        push(TokType::Op, std::string(1, c), line_);
        ++i;
        continue;
      }
      size_t l;
      peek_cp(src_, i, l);
      fail(line_, "unexpected char '" + std::string(src_.substr(i, l)) + "'");
    }
  }

  size_t digits_(size_t i, bool hex = false) const {
    // (\d+_)*\d+ (hex: [\da-f] with optional single underscores)
    size_t j = i;
    auto ok = [&](char c) { return is_digit(c) || (hex && std::strchr("abcdefABCDEF", c) && c); };
    while (j < src_.size()) {
      if (ok(src_[j])) {
        ++j;
      } else if (src_[j] == '_' && j > i && j + 1 < src_.size() && ok(src_[j + 1])) {
        ++j;
      } else {
        break;
      }
    }
    return j;
  }

  size_t lex_number(size_t i) {
    size_t n = src_.size();
    auto clean = [](std::string_view s) {
      std::string r;
      for (char c : s)
        if (c != '_') r += c;
      return r;
    };
    // prefixed integers
    if (src_[i] == '0' && i + 1 < n && std::strchr("xXoObB", src_[i + 1]) && src_[i + 1]) {
      char p = static_cast<char>(src_[i + 1] | 0x20);
      int base = p == 'x' ? 16 : p == 'o' ? 8 : 2;
      size_t j = i + 2;
      if (j < n && src_[j] == '_') ++j;
      size_t e = digits_(j, base == 16);
      if (e > j) {
        std::string d = clean(src_.substr(j, e - j));
        Token t;
        t.type = TokType::Int;
        t.text = std::string(src_.substr(i, e - i));
        errno = 0;
        unsigned long long v = std::strtoull(d.c_str(), nullptr, base);
        if (errno || v > static_cast<unsigned long long>(INT64_MAX)) fail(line_, "integer literal too large: " + t.text);
        t.ival = static_cast<int64_t>(v);
        t.line = line_;
        out_.push_back(std::move(t));
        return e;
      }
    }
    size_t j = digits_(i);
    bool is_float = false;
    size_t e = j;
    if (e + 1 < n && src_[e] == '.' && is_digit(src_[e + 1])) {
      e = digits_(e + 1);
      is_float = true;
    }
    if (e < n && (src_[e] == 'e' || src_[e] == 'E')) {
      size_t k = e + 1;
      if (k < n && (src_[k] == '+' || src_[k] == '-')) ++k;
      if (k < n && is_digit(src_[k])) {
        e = digits_(k);
        is_float = true;
      }
    }
    Token t;
    t.line = line_;
    t.text = std::string(src_.substr(i, e - i));
    std::string d = clean(t.text);
    if (is_float) {
      t.type = TokType::Float;
      t.fval = std::strtod(d.c_str(), nullptr);
    } else {
      t.type = TokType::Int;
      errno = 0;
      unsigned long long v = std::strtoull(d.c_str(), nullptr, 10);
      if (errno || v > static_cast<unsigned long long>(INT64_MAX)) fail(line_, "integer literal too large: " + t.text);
      t.ival = static_cast<int64_t>(v);
    }
    out_.push_back(std::move(t));
    return e;
  }

  static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    c = static_cast<char>(c | 0x20);
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  }

  size_t lex_string(size_t i) {
    char q = src_[i];
    int start_line = line_;
    size_t j = i + 1, n = src_.size();
    std::string v;
    while (true) {
      if (j >= n) fail(start_line, "unexpected end of string literal");
      char c = src_[j];
      if (c == q) break;
      if (c != '\\') {
        if (c == '\n') ++line_;
        v += c;
        ++j;
        continue;
      }
      if (j + 1 >= n) fail(start_line, "unexpected end of string literal");
      char e = src_[j + 1];
      j += 2;
      switch (e) {
        case '\n': ++line_; break;  // line continuation
        case '\\': v += '\\'; break;
        case '\'': v += '\''; break;
        case '"': v += '"'; break;
        case 'a': v += '\a'; break;
        case 'b': v += '\b'; break;
        case 'f': v += '\f'; break;
        case 'n': v += '\n'; break;
        case 'r': v += '\r'; break;
        case 't': v += '\t'; break;
        case 'v': v += '\v'; break;
        case 'x': case 'u': case 'U': {
          int nd = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          uint32_t cp = 0;
          for (int k = 0; k < nd; ++k) {
            int h = j + k < n ? hexval(src_[j + k]) : -1;
            if (h < 0) fail(start_line, std::string("truncated \\") + e + " escape in string literal");
            cp = cp * 16 + static_cast<uint32_t>(h);
          }
          if (cp > 0x10FFFF) fail(start_line, "illegal Unicode character in string literal");
          j += static_cast<size_t>(nd);
          utf8_append(v, cp);
          break;
        }
        case 'N': fail(start_line, "unsupported \\N{...} escape in string literal");
        default:
          if (e >= '0' && e <= '7') {
            uint32_t cp = static_cast<uint32_t>(e - '0');
            for (int k = 0; k < 2 && j < n && src_[j] >= '0' && src_[j] <= '7'; ++k) cp = cp * 8 + static_cast<uint32_t>(src_[j++] - '0');
            utf8_append(v, cp);
          } else {
            v += '\\';
            v += e;
            if (e == '\n') ++line_;
          }
      }
    }
    Token t;
    t.type = TokType::String;
    t.text = std::move(v);
    t.line = start_line;
    out_.push_back(std::move(t));
    return j + 1;
  }
};

}  // namespace

std::vector<Token> lex(std::string_view source, const std::string& name) {
  // newline normalization (\r\n, \r -> \n) and keep_trailing_newline=False
  std::string src;
  src.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      src += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      src += source[i];
    }
  }
  if (!src.empty() && src.back() == '\n') src.pop_back();
  Lexer lx(src, name);
  return lx.run();
}

}  // namespace am::jinja
