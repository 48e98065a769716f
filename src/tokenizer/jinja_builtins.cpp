// Jinja2 / Python semantics for the chat-template interpreter: operators, lookups, filters, tests and
// str/dict/list methods (see jinja_builtins.h). Written from the Jinja2 and Python documentation.
#include "tokenizer/jinja_builtins.h"

#include "tokenizer/jinja_parser.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>

#include <utf8proc.h>

namespace am::jinja::detail {

void fail(const std::string& msg) { throw EvalError(EvalError::Kind::Runtime, msg); }
void fail_unsupported(const std::string& msg) { throw EvalError(EvalError::Kind::Unsupported, msg); }
void fail_undefined(const Value& u) {
  if (u.unsafe()) fail(u.str());
  fail(u.str().empty() ? "value is undefined" : u.str());
}

namespace {

// ------------------------------------------------------------------ small helpers

std::string obj_desc(const Value& v) { return std::string("'") + v.type_name() + " object'"; }

// One value of n bytes (see jinja_limits.h); lists: pass the bytes of their slots.
void check_size(size_t n, const char* what = "string") { limits::check_value_size(n, what); }
size_t list_bytes(size_t items) { return limits::mul_size(items, sizeof(Value)); }

char32_t cp_upper(char32_t c) { return static_cast<char32_t>(utf8proc_toupper(static_cast<utf8proc_int32_t>(c))); }
char32_t cp_lower(char32_t c) { return static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))); }
char32_t cp_title(char32_t c) { return static_cast<char32_t>(utf8proc_totitle(static_cast<utf8proc_int32_t>(c))); }
utf8proc_category_t cat(char32_t c) {
  return c > 0x10FFFF ? UTF8PROC_CATEGORY_CN : utf8proc_category(static_cast<utf8proc_int32_t>(c));
}
bool is_cased(char32_t c) {
  auto k = cat(c);
  return k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT;
}
bool is_alpha(char32_t c) {
  auto k = cat(c);
  return k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT ||
         k == UTF8PROC_CATEGORY_LM || k == UTF8PROC_CATEGORY_LO;
}
bool is_decimal(char32_t c) { return cat(c) == UTF8PROC_CATEGORY_ND; }
bool is_numeric_cp(char32_t c) {
  auto k = cat(c);
  return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}
bool is_word_cp(char32_t c) { return c == '_' || is_alpha(c) || is_numeric_cp(c); }

// Unconditional multi-character case mappings of Unicode's SpecialCasing.txt that Python applies
// (the common ones); `mode`: 0 upper, 1 lower, 2 title.
const char* special_case(char32_t c, int mode) {
  switch (c) {
    case 0x00DF: return mode == 0 ? "SS" : mode == 2 ? "Ss" : nullptr;
    case 0x0130: return mode == 1 ? "i\u0307" : nullptr;
    case 0x0149: return mode == 1 ? nullptr : "\u02BCN";
    case 0xFB00: return mode == 0 ? "FF" : mode == 2 ? "Ff" : nullptr;
    case 0xFB01: return mode == 0 ? "FI" : mode == 2 ? "Fi" : nullptr;
    case 0xFB02: return mode == 0 ? "FL" : mode == 2 ? "Fl" : nullptr;
    case 0xFB03: return mode == 0 ? "FFI" : mode == 2 ? "Ffi" : nullptr;
    case 0xFB04: return mode == 0 ? "FFL" : mode == 2 ? "Ffl" : nullptr;
    case 0xFB05: case 0xFB06: return mode == 0 ? "ST" : mode == 2 ? "St" : nullptr;
    default: return nullptr;
  }
}

void append_cased(std::string& out, char32_t c, int mode) {
  if (c >= 0xDF) {
    if (const char* sp = special_case(c, mode)) {
      out += sp;
      return;
    }
  }
  utf8_append(out, mode == 0 ? cp_upper(c) : mode == 1 ? cp_lower(c) : cp_title(c));
}

std::string map_case(const std::string& s, int mode) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : utf8_decode(s)) append_cased(out, c, mode);
  return out;
}
std::string str_upper(const std::string& s) { return map_case(s, 0); }
std::string str_lower(const std::string& s) { return map_case(s, 1); }

std::string str_capitalize(const std::string& s) {
  std::u32string cs = utf8_decode(s);
  std::string out;
  for (size_t k = 0; k < cs.size(); ++k) append_cased(out, cs[k], k == 0 ? 2 : 1);
  return out;
}

// Python str.title()
std::string str_title(const std::string& s) {
  std::string out;
  bool prev_cased = false;
  for (char32_t c : utf8_decode(s)) {
    if (is_cased(c)) {
      append_cased(out, c, prev_cased ? 1 : 2);
      prev_cased = true;
    } else {
      utf8_append(out, c);
      prev_cased = false;
    }
  }
  return out;
}

// Jinja's title filter: words start after runs of [-\s({\[<].
std::string jinja_title(const std::string& s) {
  std::string out;
  bool at_start = true;
  for (char32_t c : utf8_decode(s)) {
    bool sep = c == '-' || py_isspace(c) || c == '(' || c == '{' || c == '[' || c == '<';
    if (sep) {
      utf8_append(out, c);
      at_start = true;
    } else {
      append_cased(out, c, at_start ? 0 : 1);
      at_start = false;
    }
  }
  return out;
}

bool str_is(const std::string& s, bool (*pred)(char32_t)) {
  std::u32string cs = utf8_decode(s);
  if (cs.empty()) return false;
  for (char32_t c : cs)
    if (!pred(c)) return false;
  return true;
}

bool str_islower(const std::string& s, bool want_lower) {
  bool any = false;
  for (char32_t c : utf8_decode(s)) {
    auto k = cat(c);
    if (k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LT) {
      if (want_lower) return false;
      any = true;
    } else if (k == UTF8PROC_CATEGORY_LL) {
      if (!want_lower) return false;
      any = true;
    }
  }
  return any;
}

const std::string& need_str(const Value& v, const char* what) {
  if (!v.is_string()) fail(std::string(what) + " must be str, not " + v.type_name());
  return v.str();
}

int64_t need_int(const Value& v, const char* what) {
  if (v.is_int() || v.is_bool()) return v.as_int();
  fail(std::string(what) + ": an integer is required, not '" + v.type_name() + "'");
}

bool arg_bool(const CallArgs& a, size_t i, const char* name, bool def) {
  const Value* v = a.get(i, name);
  return v ? v->truthy() : def;
}


std::string replace_all(const std::string& s, const std::string& old, const std::string& nw, int64_t count) {
  limits::tick_copy(s.size());
  if (count == 0) return s;
  std::string out;
  if (old.empty()) {
    // Python inserts `new` before every character and at the end.
    std::u32string cs = utf8_decode(s);
    int64_t done = 0;
    for (char32_t c : cs) {
      if (count < 0 || done < count) {
        out += nw;
        ++done;
        check_size(out.size());
      }
      utf8_append(out, c);
    }
    if (count < 0 || done < count) out += nw;
    check_size(out.size());
    return out;
  }
  size_t pos = 0;
  int64_t done = 0;
  while (true) {
    size_t k = s.find(old, pos);
    if (k == std::string::npos || (count >= 0 && done >= count)) break;
    out.append(s, pos, k - pos);
    out += nw;
    check_size(out.size());
    pos = k + old.size();
    ++done;
  }
  out.append(s, pos, std::string::npos);
  return out;
}

// Python str.split / rsplit
std::vector<Value> str_split(const std::string& s, const Value* sep, int64_t maxsplit, bool from_right) {
  std::vector<std::string> parts;
  if (!sep || sep->is_none()) {
    std::u32string cs = utf8_decode(s);
    std::vector<std::pair<size_t, size_t>> words;  // [b, e) in code points
    if (!from_right) {
      size_t i = 0, n = cs.size();
      while (true) {
        while (i < n && py_isspace(cs[i])) ++i;
        if (i >= n) break;
        if (maxsplit >= 0 && static_cast<int64_t>(words.size()) == maxsplit) {
          words.emplace_back(i, n);  // the remainder keeps its trailing whitespace
          break;
        }
        size_t b = i;
        while (i < n && !py_isspace(cs[i])) ++i;
        words.emplace_back(b, i);
        check_size(list_bytes(words.size()), "list");
      }
    } else {
      size_t n = cs.size();
      size_t i = n;
      while (true) {
        while (i > 0 && py_isspace(cs[i - 1])) --i;
        if (i == 0) break;
        if (maxsplit >= 0 && static_cast<int64_t>(words.size()) == maxsplit) {
          words.emplace_back(0, i);  // the remainder keeps its leading whitespace
          break;
        }
        size_t e = i;
        while (i > 0 && !py_isspace(cs[i - 1])) --i;
        words.emplace_back(i, e);
        check_size(list_bytes(words.size()), "list");
      }
      std::reverse(words.begin(), words.end());
    }
    for (auto& w : words) parts.push_back(utf8_encode(std::u32string_view(cs).substr(w.first, w.second - w.first)));
  } else {
    const std::string& sp = need_str(*sep, "separator");
    if (sp.empty()) fail("empty separator");
    limits::tick_copy(s.size());
    if (!from_right) {
      size_t pos = 0;
      int64_t n = 0;
      while (true) {
        size_t k = s.find(sp, pos);
        if (k == std::string::npos || (maxsplit >= 0 && n >= maxsplit)) break;
        parts.push_back(s.substr(pos, k - pos));
        check_size(list_bytes(parts.size()), "list");
        pos = k + sp.size();
        ++n;
      }
      parts.push_back(s.substr(pos));
    } else {
      size_t end = s.size();
      int64_t n = 0;
      std::vector<std::string> rev;
      while (true) {
        if (maxsplit >= 0 && n >= maxsplit) break;
        if (end < sp.size()) break;
        size_t k = s.rfind(sp, end - sp.size());
        if (k == std::string::npos) break;
        rev.push_back(s.substr(k + sp.size(), end - k - sp.size()));
        check_size(list_bytes(rev.size()), "list");
        end = k;
        ++n;
      }
      rev.push_back(s.substr(0, end));
      parts.assign(rev.rbegin(), rev.rend());
    }
  }
  std::vector<Value> out;
  out.reserve(parts.size());
  for (auto& p : parts) out.emplace_back(std::move(p));
  return out;
}

std::vector<Value> str_splitlines(const std::string& s, bool keepends) {
  std::u32string cs = utf8_decode(s);
  std::vector<Value> out;
  size_t b = 0, i = 0, n = cs.size();
  while (i < n) {
    char32_t c = cs[i];
    bool br = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D || c == 0x1E ||
              c == 0x85 || c == 0x2028 || c == 0x2029;
    if (!br) {
      ++i;
      continue;
    }
    size_t e = i;
    ++i;
    if (c == '\r' && i < n && cs[i] == '\n') ++i;
    out.emplace_back(utf8_encode(std::u32string_view(cs).substr(b, (keepends ? i : e) - b)));
    check_size(list_bytes(out.size()), "list");
    b = i;
  }
  if (b < n) out.emplace_back(utf8_encode(std::u32string_view(cs).substr(b)));
  return out;
}

// Python's slice index normalization.
void slice_indices(int64_t len, const Value& start, const Value& stop, const Value& step, int64_t& b, int64_t& e,
                   int64_t& st) {
  st = 1;
  if (!step.is_none() && !step.is_undefined()) st = need_int(step, "slice indices");
  if (st == 0) fail("slice step cannot be zero");
  auto norm = [&](const Value& v, int64_t def, bool is_start) -> int64_t {
    if (v.is_none() || v.is_undefined()) return def;
    int64_t x = need_int(v, "slice indices");
    if (x < 0) {
      x += len;
      if (x < 0) x = st < 0 ? -1 : 0;
    } else if (x >= len) {
      x = st < 0 ? len - 1 : len;
    }
    (void)is_start;
    return x;
  };
  if (st > 0) {
    b = norm(start, 0, true);
    e = norm(stop, len, false);
  } else {
    b = norm(start, len - 1, true);
    e = norm(stop, -1, false);
  }
}

std::vector<size_t> slice_positions(int64_t len, const Value& start, const Value& stop, const Value& step) {
  int64_t b, e, st;
  slice_indices(len, start, stop, step, b, e, st);
  // Count first: `k += st` could overflow for a huge step.
  uint64_t ust = st > 0 ? static_cast<uint64_t>(st) : uint64_t(0) - static_cast<uint64_t>(st);
  uint64_t n = 0;
  if (st > 0 && b < e) n = static_cast<uint64_t>(e - b - 1) / ust + 1;
  if (st < 0 && b > e) n = static_cast<uint64_t>(b - e - 1) / ust + 1;
  std::vector<size_t> out;
  out.reserve(n);
  limits::tick(n);
  for (uint64_t i = 0; i < n; ++i)
    out.push_back(static_cast<size_t>(st > 0 ? b + static_cast<int64_t>(i * ust) : b - static_cast<int64_t>(i * ust)));
  return out;
}

std::string html_escape(const std::string& s) {
  limits::tick_bytes(s.size());
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

// ------------------------------------------------------------------ number formatting

constexpr int kMaxPrecision = 4096;  // digits after the point in a format spec

// snprintf into a string of the right size (a fixed buffer would silently truncate wide fields).
template <class... A>
std::string c_format(const char* fmt, A... args) {
  int n = std::snprintf(nullptr, 0, fmt, args...);
  if (n < 0) fail("invalid format");
  check_size(static_cast<size_t>(n));
  std::string out(static_cast<size_t>(n) + 1, '\0');
  std::snprintf(out.data(), out.size(), fmt, args...);
  out.resize(static_cast<size_t>(n));
  return out;
}

// Python format spec mini-language, the common subset: [[fill]align][sign][#][0][width][,][.prec][type]
std::string apply_format_spec(const Value& v, const std::string& spec) {
  if (spec.empty()) return v.to_str();
  size_t i = 0;
  std::string fill = " ";
  char align = 0;
  auto is_align = [](char c) { return c == '<' || c == '>' || c == '^' || c == '='; };
  // fill may be a multi-byte character
  size_t l0 = 1;
  {
    unsigned char c = static_cast<unsigned char>(spec[0]);
    l0 = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;
  }
  if (spec.size() > l0 && is_align(spec[l0])) {
    fill = spec.substr(0, l0);
    align = spec[l0];
    i = l0 + 1;
  } else if (is_align(spec[0])) {
    align = spec[0];
    i = 1;
  }
  char sign = '-';
  if (i < spec.size() && (spec[i] == '+' || spec[i] == '-' || spec[i] == ' ')) sign = spec[i++];
  if (i < spec.size() && spec[i] == '#') fail_unsupported("format spec '#' flag");
  if (i < spec.size() && spec[i] == '0') {
    if (!align) {
      fill = "0";
      align = '=';
    }
    ++i;
  }
  int64_t width = 0;
  while (i < spec.size() && std::isdigit(static_cast<unsigned char>(spec[i]))) {
    width = width * 10 + (spec[i++] - '0');
    if (width > static_cast<int64_t>(kMaxSize)) fail_limit("format width too large (more than " + std::to_string(kMaxSize) + ")");
  }
  if (i < spec.size() && (spec[i] == ',' || spec[i] == '_')) fail_unsupported("format spec grouping");
  int prec = -1;
  if (i < spec.size() && spec[i] == '.') {
    ++i;
    prec = 0;
    while (i < spec.size() && std::isdigit(static_cast<unsigned char>(spec[i]))) {
      prec = prec * 10 + (spec[i++] - '0');
      if (prec > kMaxPrecision) fail_limit("format precision too large (more than " + std::to_string(kMaxPrecision) + ")");
    }
  }
  char type = 0;
  if (i < spec.size()) type = spec[i++];
  if (i != spec.size()) fail("invalid format specifier");
  std::string body;
  bool numeric = false;
  bool neg = false;
  if (v.is_string()) {
    if (type && type != 's') fail(std::string("Unknown format code '") + type + "' for object of type 'str'");
    body = v.str();
    if (prec >= 0) body = utf8_encode(utf8_decode(body).substr(0, static_cast<size_t>(prec)));
    if (!align) align = '<';
  } else if (v.is_number()) {
    numeric = true;
    if (!align) align = '>';
    double d = v.as_double();
    if (!type && v.is_float()) type = 'r';
    if (!type) type = 'd';
    switch (type) {
      case 'd':
        if (v.is_float()) fail("Unknown format code 'd' for object of type 'float'");
        neg = v.as_int() < 0;
        body = std::to_string(neg ? uint64_t(0) - static_cast<uint64_t>(v.as_int()) : static_cast<uint64_t>(v.as_int()));
        break;
      case 'f': case 'F': case 'e': case 'E': case 'g': case 'G': case '%': {
        neg = std::signbit(d);
        double a = std::fabs(d);
        if (type == '%') a *= 100;
        char t = type == '%' ? 'f' : type;
        if (t == 'g' || t == 'G') fail_unsupported("format spec type 'g'");
        body = c_format((std::string("%.*") + t).c_str(), prec < 0 ? 6 : prec, a);
        if (type == '%') body += '%';
        break;
      }
      case 'r':
        if (prec >= 0) fail_unsupported("format spec precision without type");
        neg = std::signbit(d);
        body = py_float_repr(std::fabs(d));
        break;
      default: fail_unsupported(std::string("format spec type '") + type + "'");
    }
  } else {
    fail_unsupported(std::string("format spec for ") + v.type_name());
  }
  std::string sign_str;
  if (numeric) {
    if (neg) sign_str = "-";
    else if (sign == '+') sign_str = "+";
    else if (sign == ' ') sign_str = " ";
  }
  size_t len = utf8_length(sign_str) + utf8_length(body);
  size_t pad = static_cast<int64_t>(len) < width ? static_cast<size_t>(width) - len : 0;
  check_size(body.size() + limits::mul_size(pad, fill.size()));
  auto fills = [&](size_t n) {
    std::string r;
    for (size_t k = 0; k < n; ++k) r += fill;
    return r;
  };
  switch (align) {
    case '<': return sign_str + body + fills(pad);
    case '^': return fills(pad / 2) + sign_str + body + fills(pad - pad / 2);
    case '=': return sign_str + fills(pad) + body;
    default: return fills(pad) + sign_str + body;
  }
}

// Python str.format(*args, **kwargs)
std::string str_format(const std::string& f, const CallArgs& a) {
  limits::tick_bytes(f.size());
  std::string out;
  size_t i = 0, n = f.size();
  int auto_idx = 0;
  while (i < n) {
    char c = f[i];
    if (c == '{') {
      if (i + 1 < n && f[i + 1] == '{') {
        out += '{';
        i += 2;
        continue;
      }
      size_t j = f.find('}', i);
      if (j == std::string::npos) fail("Single '{' encountered in format string");
      std::string field = f.substr(i + 1, j - i - 1);
      i = j + 1;
      std::string spec, conv;
      size_t colon = field.find(':');
      if (colon != std::string::npos) {
        spec = field.substr(colon + 1);
        field = field.substr(0, colon);
      }
      size_t bang = field.find('!');
      if (bang != std::string::npos) {
        conv = field.substr(bang + 1);
        field = field.substr(0, bang);
      }
      if (field.find_first_of(".[") != std::string::npos) fail_unsupported("attribute access in str.format fields");
      const Value* v = nullptr;
      if (field.empty()) {
        v = a.get(static_cast<size_t>(auto_idx++), nullptr);
        if (!v) fail("Replacement index " + std::to_string(auto_idx - 1) + " out of range for positional args tuple");
      } else if (std::isdigit(static_cast<unsigned char>(field[0]))) {
        size_t idx = std::strtoul(field.c_str(), nullptr, 10);
        v = idx < a.pos.size() ? &a.pos[idx] : nullptr;
        if (!v) fail("Replacement index " + field + " out of range for positional args tuple");
      } else {
        for (const auto& kv : a.kw)
          if (kv.first == field) v = &kv.second;
        if (!v) fail("KeyError: '" + field + "'");
      }
      Value x = *v;
      if (x.is_string() && spec.empty() && conv.empty()) check_size(out.size() + x.str().size());
      if (conv == "r") x = Value(x.repr());
      else if (conv == "s") x = Value(x.to_str());
      else if (!conv.empty()) fail("Unknown conversion specifier " + conv);
      out += apply_format_spec(x, spec);
      check_size(out.size());
    } else if (c == '}') {
      if (i + 1 < n && f[i + 1] == '}') {
        out += '}';
        i += 2;
        continue;
      }
      fail("Single '}' encountered in format string");
    } else {
      out += c;
      ++i;
    }
  }
  return out;
}

// printf-style formatting: "%s %d" % args (and the `format` filter)
std::string percent_format(const std::string& f, const std::vector<Value>& args, const Value* mapping) {
  limits::tick_bytes(f.size());
  std::string out;
  size_t ai = 0, i = 0, n = f.size();
  while (i < n) {
    if (f[i] != '%') {
      out += f[i++];
      continue;
    }
    ++i;
    if (i < n && f[i] == '%') {
      out += '%';
      ++i;
      continue;
    }
    const Value* v = nullptr;
    if (i < n && f[i] == '(') {
      size_t j = f.find(')', i);
      if (j == std::string::npos || !mapping || !mapping->is_dict()) fail("format requires a mapping");
      v = mapping->dict_data().find(f.substr(i + 1, j - i - 1));
      if (!v) fail("KeyError: '" + f.substr(i + 1, j - i - 1) + "'");
      i = j + 1;
    }
    std::string flags;
    while (i < n && std::strchr("-+ 0#", f[i]) && f[i]) flags += f[i++];
    std::string width, prec;
    while (i < n && std::isdigit(static_cast<unsigned char>(f[i]))) width += f[i++];
    if (i < n && f[i] == '.') {
      ++i;
      prec = "0";
      std::string p;
      while (i < n && std::isdigit(static_cast<unsigned char>(f[i]))) p += f[i++];
      if (!p.empty()) prec = p;
    }
    if (i >= n) fail("incomplete format");
    char t = f[i++];
    if (!v) {
      if (ai >= args.size()) fail("not enough arguments for format string");
      v = &args[ai++];
    }
    // Width and precision: bounded before anything is padded to them.
    auto number = [](const std::string& digits, size_t cap, const char* what) -> size_t {
      size_t x = 0;
      for (char c : digits) {
        x = x * 10 + static_cast<size_t>(c - '0');
        if (x > cap) fail_limit(std::string("format ") + what + " too large (more than " + std::to_string(cap) + ")");
      }
      return x;
    };
    size_t w = number(width, kMaxSize, "width");
    bool is_text = t == 's' || t == 'r';
    size_t pr = number(prec, is_text ? kMaxSize : static_cast<size_t>(kMaxPrecision), "precision");
    std::string spec = "%" + flags + width + (prec.empty() ? "" : "." + prec);
    switch (t) {
      case 's': case 'r': {
        if (t == 's' && v->is_string() && prec.empty()) check_size(out.size() + v->str().size());
        std::string s = t == 's' ? v->to_str() : v->repr();
        if (!prec.empty()) s = utf8_encode(utf8_decode(s).substr(0, pr));
        size_t len = utf8_length(s);
        if (len < w) {
          check_size(s.size() + (w - len));
          if (flags.find('-') != std::string::npos) s += std::string(w - len, ' ');
          else s = std::string(w - len, ' ') + s;
        }
        out += s;
        break;
      }
      case 'd': case 'i': case 'x': case 'X': case 'o': {
        if (!v->is_number()) fail(std::string("%") + t + " format: a real number is required, not " + v->type_name());
        long long x;
        if (v->is_float()) {
          double d = std::trunc(v->as_double());
          if (!std::isfinite(d)) fail("cannot convert float " + py_float_repr(d) + " to integer");
          if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0))
            fail_unsupported(std::string("integer overflow in '%") + t + "' (the result needs more than 64 bits)");
          x = static_cast<long long>(d);
        } else {
          x = v->as_int();
        }
        std::string sp = spec + "ll" + (t == 'i' ? 'd' : t);
        out += c_format(sp.c_str(), x);
        break;
      }
      case 'f': case 'F': case 'e': case 'E': case 'g': case 'G': {
        if (!v->is_number()) fail(std::string("must be real number, not ") + v->type_name());
        out += c_format((spec + t).c_str(), v->as_double());
        break;
      }
      default: fail_unsupported(std::string("printf-style format character '") + t + "'");
    }
    check_size(out.size());
  }
  if (!mapping && ai < args.size()) fail("not all arguments converted during string formatting");
  return out;
}

// ------------------------------------------------------------------ methods

const std::set<std::string>& str_methods() {
  static const std::set<std::string> m = {
      "startswith", "endswith", "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "upper", "lower",
      "title", "capitalize", "replace", "format", "count", "find", "rfind", "index", "rindex", "join",
      "isdigit", "isalpha", "isalnum", "isspace", "islower", "isupper", "isnumeric", "isdecimal", "removeprefix",
      "removesuffix", "zfill", "center", "ljust", "rjust", "partition", "rpartition", "casefold", "swapcase"};
  return m;
}
const std::set<std::string>& py_str_other_methods() {
  static const std::set<std::string> m = {"encode", "expandtabs", "format_map", "isascii", "isidentifier",
                                          "isprintable", "istitle", "maketrans", "translate"};
  return m;
}

Value make_method(const Value& self, const std::string& name);

int64_t str_find(const std::string& s, const std::string& sub, bool right) {
  limits::tick_copy(s.size());
  size_t k = right ? s.rfind(sub) : s.find(sub);
  if (k == std::string::npos) return -1;
  return static_cast<int64_t>(utf8_length(std::string_view(s).substr(0, k)));
}

bool affix_match(const std::string& s, const Value& affix, bool start) {
  auto one = [&](const Value& v) {
    const std::string& a = need_str(v, start ? "startswith first arg" : "endswith first arg");
    limits::tick_copy(std::min(a.size(), s.size()));
    if (a.size() > s.size()) return false;
    return start ? s.compare(0, a.size(), a) == 0 : s.compare(s.size() - a.size(), a.size(), a) == 0;
  };
  if (affix.is_tuple() || affix.is_list()) {
    for (const auto& v : affix.list_data().items)
      if (one(v)) return true;
    return false;
  }
  return one(affix);
}

std::string pad_str(const std::string& s, int64_t width, const std::string& fill, char how) {
  int64_t len = static_cast<int64_t>(utf8_length(s));
  if (width <= len) return s;
  int64_t pad = width - len;
  check_size(s.size() + limits::mul_size(static_cast<size_t>(pad), fill.size()));
  auto fills = [&](int64_t k) {
    std::string r;
    for (int64_t q = 0; q < k; ++q) r += fill;
    return r;
  };
  if (how == '<') return s + fills(pad);
  if (how == '>') return fills(pad) + s;
  // Python's center: left = pad/2 + (pad & width & 1)
  int64_t left = pad / 2 + (pad & width & 1);
  return fills(left) + s + fills(pad - left);
}

Value str_method(const std::string& s, const std::string& m, CallArgs& a) {
  auto sarg = [&](size_t i, const char* name) -> const Value* { return a.get(i, name); };
  if (m == "startswith" || m == "endswith") {
    const Value* p = sarg(0, nullptr);
    if (!p) fail(m + "() takes at least 1 argument (0 given)");
    std::string sub = s;
    if (a.pos.size() > 1) {
      Value sl = slice(Value(s), a.pos[1], a.pos.size() > 2 ? a.pos[2] : Value::none(), Value::none());
      sub = sl.str();
    }
    return Value(affix_match(sub, *p, m == "startswith"));
  }
  if (m == "strip" || m == "lstrip" || m == "rstrip") {
    const Value* c = sarg(0, "chars");
    const std::string* chars = (c && !c->is_none()) ? &need_str(*c, "chars") : nullptr;
    return Value(py_strip(s, m != "rstrip", m != "lstrip", chars));
  }
  if (m == "split" || m == "rsplit") {
    const Value* sep = sarg(0, "sep");
    const Value* mx = sarg(1, "maxsplit");
    return Value::list(str_split(s, sep, mx ? need_int(*mx, "maxsplit") : -1, m == "rsplit"));
  }
  if (m == "splitlines") return Value::list(str_splitlines(s, arg_bool(a, 0, "keepends", false)));
  if (m == "upper") return Value(str_upper(s));
  if (m == "lower" || m == "casefold") return Value(str_lower(s));
  if (m == "title") return Value(str_title(s));
  if (m == "capitalize") return Value(str_capitalize(s));
  if (m == "swapcase") {
    std::string out;
    for (char32_t c : utf8_decode(s)) {
      auto k = cat(c);
      if (k == UTF8PROC_CATEGORY_LU) append_cased(out, c, 1);
      else if (k == UTF8PROC_CATEGORY_LL) append_cased(out, c, 0);
      else utf8_append(out, c);
    }
    return Value(out);
  }
  if (m == "replace") {
    const Value* o = sarg(0, "old");
    const Value* nw = sarg(1, "new");
    const Value* c = sarg(2, "count");
    if (!o || !nw) fail("replace() takes at least 2 arguments");
    return Value(replace_all(s, need_str(*o, "replace() argument 1"), need_str(*nw, "replace() argument 2"),
                             c ? need_int(*c, "count") : -1));
  }
  if (m == "format") return Value(str_format(s, a));
  if (m == "count") {
    const Value* sub = sarg(0, nullptr);
    if (!sub) fail("count() takes at least 1 argument (0 given)");
    const std::string& t = need_str(*sub, "count() argument");
    if (t.empty()) return Value(static_cast<int64_t>(utf8_length(s) + 1));
    limits::tick_copy(s.size());
    int64_t n = 0;
    for (size_t k = s.find(t); k != std::string::npos; k = s.find(t, k + t.size())) ++n;
    return Value(n);
  }
  if (m == "find" || m == "rfind" || m == "index" || m == "rindex") {
    const Value* sub = sarg(0, nullptr);
    if (!sub) fail(m + "() takes at least 1 argument (0 given)");
    if (a.pos.size() > 1) fail_unsupported(m + "() with start/end arguments");
    int64_t r = str_find(s, need_str(*sub, "must be str"), m[0] == 'r');
    if (r < 0 && (m == "index" || m == "rindex")) fail("substring not found");
    return Value(r);
  }
  if (m == "join") {
    const Value* it = sarg(0, nullptr);
    if (!it) fail("join() takes exactly one argument (0 given)");
    std::string out;
    size_t k = 0;
    for (const auto& v : iterate(*it)) {
      if (!v.is_string())
        fail("sequence item " + std::to_string(k) + ": expected str instance, " + v.type_name() + " found");
      if (k++) out += s;
      out += v.str();
      check_size(out.size());
    }
    return Value(out);
  }
  if (m == "isdigit" || m == "isdecimal") return Value(str_is(s, is_decimal));
  if (m == "isnumeric") return Value(str_is(s, is_numeric_cp));
  if (m == "isalpha") return Value(str_is(s, is_alpha));
  if (m == "isalnum") return Value(str_is(s, [](char32_t c) { return is_alpha(c) || is_numeric_cp(c); }));
  if (m == "isspace") return Value(str_is(s, py_isspace));
  if (m == "islower") return Value(str_islower(s, true));
  if (m == "isupper") return Value(str_islower(s, false));
  if (m == "removeprefix" || m == "removesuffix") {
    const Value* p = sarg(0, nullptr);
    if (!p) fail(m + "() takes exactly one argument (0 given)");
    const std::string& x = need_str(*p, m.c_str());
    limits::tick_copy(std::min(x.size(), s.size()));
    if (m == "removeprefix") return Value(s.compare(0, x.size(), x) == 0 ? s.substr(x.size()) : s);
    if (x.size() <= s.size() && s.compare(s.size() - x.size(), x.size(), x) == 0 && !x.empty())
      return Value(s.substr(0, s.size() - x.size()));
    return Value(s);
  }
  if (m == "zfill") {
    const Value* w = sarg(0, nullptr);
    if (!w) fail("zfill() takes exactly one argument (0 given)");
    int64_t width = need_int(*w, "zfill");
    int64_t len = static_cast<int64_t>(utf8_length(s));
    if (width <= len) return Value(s);
    check_size(static_cast<size_t>(width));
    size_t signpos = (!s.empty() && (s[0] == '+' || s[0] == '-')) ? 1 : 0;
    return Value(s.substr(0, signpos) + std::string(static_cast<size_t>(width - len), '0') + s.substr(signpos));
  }
  if (m == "center" || m == "ljust" || m == "rjust") {
    const Value* w = sarg(0, nullptr);
    if (!w) fail(m + "() takes at least 1 argument (0 given)");
    const Value* f = sarg(1, nullptr);
    int64_t width = need_int(*w, m.c_str());
    check_size(static_cast<size_t>(std::max<int64_t>(width, 0)));
    return Value(pad_str(s, width, f ? need_str(*f, "fill character") : " ", m == "center" ? '^' : m == "ljust" ? '<' : '>'));
  }
  if (m == "partition" || m == "rpartition") {
    const Value* p = sarg(0, nullptr);
    if (!p) fail(m + "() takes exactly one argument (0 given)");
    const std::string& sep = need_str(*p, m.c_str());
    if (sep.empty()) fail("empty separator");
    limits::tick_copy(s.size());
    size_t k = m == "partition" ? s.find(sep) : s.rfind(sep);
    if (k == std::string::npos)
      return m == "partition" ? Value::tuple({Value(s), Value(""), Value("")})
                              : Value::tuple({Value(""), Value(""), Value(s)});
    return Value::tuple({Value(s.substr(0, k)), Value(sep), Value(s.substr(k + sep.size()))});
  }
  fail_unsupported("unsupported str method '" + m + "'");
}

Value dict_method(const Value& self, const std::string& m, CallArgs& a) {
  const DictData& d = self.dict_data();
  if (m == "items" || m == "keys" || m == "values") {
    std::vector<Value> out;
    out.reserve(d.size());
    for (const auto& kv : d.items) {
      if (m == "items") out.push_back(Value::tuple({kv.first, kv.second}));
      else out.push_back(m == "keys" ? kv.first : kv.second);
    }
    return Value::view(std::move(out), "dict_" + m);
  }
  if (m == "get") {
    const Value* k = a.get(0, nullptr);
    if (!k) fail("get expected at least 1 argument, got 0");
    const Value* v = d.find(*k);
    if (v) return *v;
    const Value* def = a.get(1, nullptr);
    return def ? *def : Value::none();
  }
  if (m == "copy") {
    Value c = Value::dict();
    for (const auto& kv : d.items) c.dict_data().set(kv.first, kv.second);
    return c;
  }
  fail_unsupported("unsupported dict method '" + m + "'");
}

Value list_method(const Value& self, const std::string& m, CallArgs& a) {
  const auto& items = self.list_data().items;
  if (m == "index" || m == "count") {
    const Value* x = a.get(0, nullptr);
    if (!x) fail(m + "() takes at least 1 argument (0 given)");
    int64_t n = 0;
    for (size_t k = 0; k < items.size(); ++k) {
      if (py_equal(items[k], *x)) {
        if (m == "index") return Value(static_cast<int64_t>(k));
        ++n;
      }
    }
    if (m == "index") fail(x->repr() + " is not in list");
    return Value(n);
  }
  if (m == "copy") return Value::list(items);
  fail_unsupported("unsupported list method '" + m + "'");
}

Value make_method(const Value& self, const std::string& name) {
  Value s = self;
  if (self.is_string()) return Value::func("str." + name, [s, name](CallArgs& a) { return str_method(s.str(), name, a); });
  if (self.is_dict()) return Value::func("dict." + name, [s, name](CallArgs& a) { return dict_method(s, name, a); });
  return Value::func(std::string(self.type_name()) + "." + name, [s, name](CallArgs& a) { return list_method(s, name, a); });
}

Value unsafe(const Value& obj, const std::string& name) {
  return Value::undefined("access to attribute '" + name + "' of '" + obj.type_name() + "' object is unsafe.", true);
}

Value missing_attr(const Value& obj, const std::string& name) {
  return Value::undefined(obj_desc(obj) + " has no attribute '" + name + "'");
}

// Python-level getattr only (no item fallback): a method, an unsafe attribute, or nothing.
bool py_getattr(const Value& obj, const std::string& name, Value& out) {
  switch (obj.type()) {
    case Value::Type::String:
      if (str_methods().count(name)) {
        out = make_method(obj, name);
        return true;
      }
      if (py_str_other_methods().count(name)) fail_unsupported("unsupported str method '" + name + "'");
      return false;
    case Value::Type::Dict: {
      static const std::set<std::string> safe = {"items", "keys", "values", "get", "copy"};
      static const std::set<std::string> mut = {"pop", "popitem", "setdefault", "update", "clear"};
      if (safe.count(name)) {
        out = make_method(obj, name);
        return true;
      }
      if (mut.count(name)) {
        out = unsafe(obj, name);
        return true;
      }
      if (name == "fromkeys") fail_unsupported("unsupported dict method 'fromkeys'");
      return false;
    }
    case Value::Type::List: case Value::Type::Tuple: {
      if (obj.is_view()) return false;
      if (name == "index" || name == "count" || (name == "copy" && obj.is_list())) {
        out = make_method(obj, name);
        return true;
      }
      static const std::set<std::string> mut = {"append", "clear", "pop", "reverse", "insert", "sort", "extend", "remove"};
      if (obj.is_list() && mut.count(name)) {
        out = unsafe(obj, name);
        return true;
      }
      return false;
    }
    case Value::Type::Namespace: {
      const Value* v = obj.dict_data().find(name);
      if (v) {
        out = *v;
        return true;
      }
      return false;
    }
    case Value::Type::Float:
      if (name == "real") {
        out = obj;
        return true;
      }
      if (name == "imag") {
        out = Value(0.0);
        return true;
      }
      return false;
    case Value::Type::Int: case Value::Type::Bool:
      if (name == "real" || name == "numerator") {
        out = Value(obj.as_int());
        return true;
      }
      if (name == "imag") {
        out = Value(static_cast<int64_t>(0));
        return true;
      }
      if (name == "denominator") {
        out = Value(static_cast<int64_t>(1));
        return true;
      }
      return false;
    default:
      return false;
  }
}

// Python-level obj[key] (no attribute fallback). Returns false when Python raises a lookup/type error.
bool py_getitem(const Value& obj, const Value& key, Value& out) {
  switch (obj.type()) {
    case Value::Type::Dict: {
      const Value* v = obj.dict_data().find(key);
      if (!v) return false;
      out = *v;
      return true;
    }
    case Value::Type::List: case Value::Type::Tuple: {
      if (!(key.is_int() || key.is_bool()) || obj.is_view()) return false;
      int64_t n = static_cast<int64_t>(obj.list_data().items.size());
      int64_t k = key.as_int();
      if (k < 0) k += n;
      if (k < 0 || k >= n) return false;
      out = obj.list_data().items[static_cast<size_t>(k)];
      return true;
    }
    case Value::Type::String: {
      if (!(key.is_int() || key.is_bool())) return false;
      // Walk to the k-th code point (no decoding of the whole string: s[0] on a long string is cheap).
      const std::string& s = obj.str();
      int64_t k = key.as_int();
      char32_t cp = 0;
      if (k < 0) {
        int64_t n = 0;
        limits::tick_bytes(s.size());
        for (size_t i = 0; i < s.size(); ++n) i = utf8_next(s, i, cp);
        k += n;
        if (k < 0) return false;
      }
      limits::tick(1 + std::min<uint64_t>(static_cast<uint64_t>(k), s.size()) / 16);
      size_t i = 0;
      for (int64_t c = 0; c < k && i < s.size(); ++c) i = utf8_next(s, i, cp);
      if (i >= s.size()) return false;
      utf8_next(s, i, cp);
      std::string r;
      utf8_append(r, cp);
      out = Value(r);
      return true;
    }
    default:
      return false;
  }
}

}  // namespace

// ------------------------------------------------------------------ lookups

Value get_attr(const Value& obj, const std::string& name) {
  if (obj.is_undefined()) fail_undefined(obj);
  Value out;
  if (py_getattr(obj, name, out)) return out;
  if (py_getitem(obj, Value(name), out)) return out;
  return missing_attr(obj, name);
}

Value get_item(const Value& obj, const Value& key) {
  if (obj.is_undefined()) fail_undefined(obj);
  Value out;
  if (py_getitem(obj, key, out)) return out;
  if (key.is_string() && py_getattr(obj, key.str(), out)) return out;
  if (key.is_string()) return missing_attr(obj, key.str());
  if (obj.is_sequence_like() || obj.is_string())
    return Value::undefined(obj_desc(obj) + " has no element " + key.repr());
  return Value::undefined(obj_desc(obj) + " has no element " + key.repr());
}

Value slice(const Value& obj, const Value& start, const Value& stop, const Value& step) {
  if (obj.is_undefined()) fail_undefined(obj);
  if (obj.is_string()) {
    std::u32string cs = utf8_decode(obj.str());
    std::u32string r;
    for (size_t k : slice_positions(static_cast<int64_t>(cs.size()), start, stop, step)) r += cs[k];
    return Value(utf8_encode(r));
  }
  if (obj.is_sequence_like() && !obj.is_view()) {
    const auto& items = obj.list_data().items;
    std::vector<Value> r;
    for (size_t k : slice_positions(static_cast<int64_t>(items.size()), start, stop, step)) r.push_back(items[k]);
    return obj.is_tuple() ? Value::tuple(std::move(r)) : Value::list(std::move(r));
  }
  if (obj.is_dict()) fail("unhashable type: 'slice'");
  fail(std::string("'") + obj.type_name() + "' object is not subscriptable");
}

std::vector<Value> iterate(const Value& v) {
  switch (v.type()) {
    case Value::Type::Undefined:
      if (v.unsafe()) fail_undefined(v);
      return {};
    case Value::Type::List: case Value::Type::Tuple:
      limits::tick(1 + v.list_data().items.size());
      return v.list_data().items;
    case Value::Type::Iterator: {
      ListData& d = v.list_data();
      if (d.consumed) return {};
      d.consumed = true;
      if (!d.error.empty()) fail(d.error);
      limits::tick(1 + d.items.size());
      return d.items;
    }
    case Value::Type::Dict: {
      std::vector<Value> out;
      limits::tick(1 + v.dict_data().size());
      out.reserve(v.dict_data().size());
      for (const auto& kv : v.dict_data().items) out.push_back(kv.first);
      return out;
    }
    case Value::Type::String: {
      std::vector<Value> out;
      std::u32string cs = utf8_decode(v.str());
      check_size(list_bytes(cs.size()), "list of the characters of a string");
      limits::tick(cs.size());
      out.reserve(cs.size());
      for (char32_t c : cs) {
        std::string s;
        utf8_append(s, c);
        out.emplace_back(std::move(s));
      }
      return out;
    }
    default: fail(std::string("'") + v.type_name() + "' object is not iterable");
  }
}

int64_t py_len(const Value& v) {
  switch (v.type()) {
    case Value::Type::Undefined: return 0;
    case Value::Type::String: return static_cast<int64_t>(utf8_length(v.str()));
    case Value::Type::List: case Value::Type::Tuple: return static_cast<int64_t>(v.list_data().items.size());
    case Value::Type::Dict: return static_cast<int64_t>(v.dict_data().size());
    default: fail(std::string("object of type '") + v.type_name() + "' has no len()");
  }
}

bool contains(const Value& c, const Value& item) {
  switch (c.type()) {
    case Value::Type::String:
      if (!item.is_string()) fail(std::string("'in <string>' requires string as left operand, not ") + item.type_name());
      limits::tick_copy(c.str().size());
      return c.str().find(item.str()) != std::string::npos;
    case Value::Type::Dict:
      if (item.is_list() || item.is_dict() || item.is_namespace() || item.is_iterator())
        fail(std::string("unhashable type: '") + item.type_name() + "'");
      return c.dict_data().find(item) != nullptr;
    case Value::Type::Undefined:
      if (c.unsafe()) fail_undefined(c);
      return false;
    case Value::Type::List: case Value::Type::Tuple: case Value::Type::Iterator:
      for (const auto& v : iterate(c))
        if (py_equal(v, item)) return true;
      return false;
    default: fail(std::string("argument of type '") + c.type_name() + "' is not iterable");
  }
}

// ------------------------------------------------------------------ operators

namespace {
[[noreturn]] void bad_operands(const std::string& op, const Value& a, const Value& b) {
  fail("unsupported operand type(s) for " + op + ": '" + a.type_name() + "' and '" + b.type_name() + "'");
}

// Python ints are unbounded; ours are 64-bit, so a result beyond int64 is an error naming the
// operation (never undefined behaviour: INT64_MIN // -1 used to kill the process with SIGFPE).
[[noreturn]] void overflow(const char* op) {
  fail_unsupported(std::string("integer overflow in '") + op + "' (the result needs more than 64 bits)");
}

// A float with an integral value -> int64 (int(), abs() of floats, printf %d).
int64_t checked(long double r, const char* op = "int()") {
  if (!(r >= -9223372036854775808.0L && r < 9223372036854775808.0L)) overflow(op);
  return static_cast<int64_t>(r);
}

int64_t int_pow(int64_t base, int64_t exp) {  // exp >= 0
  int64_t result = 1;
  while (exp > 0) {
    if ((exp & 1) && __builtin_mul_overflow(result, base, &result)) overflow("**");
    exp >>= 1;
    if (exp && __builtin_mul_overflow(base, base, &base)) overflow("**");
  }
  return result;
}

Value repeat(const Value& seq, int64_t n) {
  if (seq.is_string()) {
    if (n <= 0 || seq.str().empty()) return seq.is_markup() ? Value::markup("") : Value("");
    size_t total = limits::mul_size(seq.str().size(), static_cast<size_t>(n));
    check_size(total);
    std::string out;
    out.reserve(total);
    out.append(seq.str());
    while (out.size() * 2 <= total) out.append(out);  // doubling: memcpy speed
    out.append(out, 0, total - out.size());
    return seq.is_markup() ? Value::markup(std::move(out)) : Value(std::move(out));
  }
  const auto& items = seq.list_data().items;
  if (n <= 0 || items.empty()) return seq.is_tuple() ? Value::tuple({}) : Value::list({});
  check_size(list_bytes(limits::mul_size(items.size(), static_cast<size_t>(n))), seq.is_tuple() ? "tuple" : "list");
  std::vector<Value> out;
  out.reserve(items.size() * static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) out.insert(out.end(), items.begin(), items.end());
  return seq.is_tuple() ? Value::tuple(std::move(out)) : Value::list(std::move(out));
}
}  // namespace

Value binary_op(const std::string& op, const Value& a, const Value& b) {
  if (op == "~") {
    if (a.unsafe()) fail_undefined(a);
    if (b.unsafe()) fail_undefined(b);
    // Jinja's markup_join: when an operand is Markup the others are escaped and the result is Markup.
    if (a.is_markup() || b.is_markup()) {
      std::string x = a.is_markup() ? a.str() : html_escape(a.to_str());
      std::string y = b.is_markup() ? b.str() : html_escape(b.to_str());
      check_size(x.size() + y.size());
      return Value::markup(x + y);
    }
    std::string x = a.to_str();
    const std::string y_copy = b.is_string() ? std::string() : b.to_str();
    const std::string& y = b.is_string() ? b.str() : y_copy;
    check_size(x.size() + y.size());
    x += y;
    return Value(std::move(x));
  }
  if (op == "%" && a.is_string()) {
    if (b.unsafe()) fail_undefined(b);
    if (b.is_tuple()) return Value(percent_format(a.str(), b.list_data().items, nullptr));
    // Python treats a non-tuple, non-str object with __getitem__ (dict, list, Undefined) as a possible
    // mapping: no "not all arguments converted" error for those.
    if (b.is_dict() || (b.is_list() && !b.is_view()) || b.is_undefined())
      return Value(percent_format(a.str(), {b}, &b));
    return Value(percent_format(a.str(), {b}, nullptr));
  }
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined()) fail_undefined(b);
  bool nums = a.is_number() && b.is_number();
  bool flt = nums && (a.is_float() || b.is_float());
  int64_t r;
  if (op == "+") {
    if (nums) {
      if (flt) return Value(a.as_double() + b.as_double());
      if (__builtin_add_overflow(a.as_int(), b.as_int(), &r)) overflow("+");
      return Value(r);
    }
    if (a.is_string() && b.is_string()) {
      check_size(a.str().size() + b.str().size());
      if (a.is_markup()) return Value::markup(a.str() + (b.is_markup() ? b.str() : html_escape(b.str())));
      // str + Markup: Python tries the subclass's reflected __radd__ first, which escapes the str
      if (b.is_markup()) return Value::markup(html_escape(a.str()) + b.str());
      return Value(a.str() + b.str());
    }
    if ((a.is_list() && b.is_list()) || (a.is_tuple() && b.is_tuple())) {
      const auto& x = a.list_data().items;
      const auto& y = b.list_data().items;
      check_size(list_bytes(x.size() + y.size()), a.is_tuple() ? "tuple" : "list");
      std::vector<Value> out;
      out.reserve(x.size() + y.size());
      out.insert(out.end(), x.begin(), x.end());
      out.insert(out.end(), y.begin(), y.end());
      return a.is_tuple() ? Value::tuple(std::move(out)) : Value::list(std::move(out));
    }
    if (a.is_string()) fail(std::string("can only concatenate str (not \"") + b.type_name() + "\") to str");
    if (a.is_list()) fail(std::string("can only concatenate list (not \"") + b.type_name() + "\") to list");
    bad_operands("+", a, b);
  }
  if (op == "-") {
    if (!nums) bad_operands("-", a, b);
    if (flt) return Value(a.as_double() - b.as_double());
    if (__builtin_sub_overflow(a.as_int(), b.as_int(), &r)) overflow("-");
    return Value(r);
  }
  if (op == "*") {
    if (nums) {
      if (flt) return Value(a.as_double() * b.as_double());
      if (__builtin_mul_overflow(a.as_int(), b.as_int(), &r)) overflow("*");
      return Value(r);
    }
    if ((a.is_string() || a.is_sequence_like()) && (b.is_int() || b.is_bool())) return repeat(a, b.as_int());
    if ((b.is_string() || b.is_sequence_like()) && (a.is_int() || a.is_bool())) return repeat(b, a.as_int());
    bad_operands("*", a, b);
  }
  if (op == "/") {
    if (!nums) bad_operands("/", a, b);
    if (b.as_double() == 0) fail(flt ? "float division by zero" : "division by zero");
    return Value(a.as_double() / b.as_double());
  }
  if (op == "//" || op == "%") {
    if (!nums) bad_operands(op, a, b);
    if (flt) {
      double x = a.as_double(), y = b.as_double();
      if (y == 0) fail(op == "%" ? "float modulo" : "float floor division by zero");
      double mod = std::fmod(x, y);
      double div = (x - mod) / y;
      if (mod != 0) {
        if ((y < 0) != (mod < 0)) {
          mod += y;
          div -= 1.0;
        }
      } else {
        mod = std::copysign(0.0, y);
      }
      if (op == "%") return Value(mod);
      double fl;
      if (div != 0) {
        fl = std::floor(div);
        if (div - fl > 0.5) fl += 1.0;
      } else {
        fl = std::copysign(0.0, x / y);
      }
      return Value(fl);
    }
    int64_t x = a.as_int(), y = b.as_int();
    if (y == 0) fail(op == "%" ? "integer modulo by zero" : "integer division or modulo by zero");
    if (y == -1) {  // x / -1 traps (SIGFPE) for INT64_MIN
      if (op == "%") return Value(static_cast<int64_t>(0));
      if (x == INT64_MIN) overflow("//");
      return Value(-x);
    }
    int64_t q = x / y, m = x % y;
    if (m != 0 && ((m < 0) != (y < 0))) {
      --q;
      m += y;
    }
    return op == "%" ? Value(m) : Value(q);
  }
  if (op == "**") {
    if (!nums) bad_operands("** or pow()", a, b);
    if (!flt && b.as_int() >= 0) return Value(int_pow(a.as_int(), b.as_int()));
    if (a.as_double() == 0 && b.as_double() < 0) fail("0.0 cannot be raised to a negative power");
    double p = std::pow(a.as_double(), b.as_double());
    if (std::isinf(p) && std::isfinite(a.as_double()) && std::isfinite(b.as_double()))
      fail("(34, 'Numerical result out of range')");
    if (std::isnan(p) && !std::isnan(a.as_double()) && !std::isnan(b.as_double()))
      fail_unsupported("complex results of **");
    return Value(p);
  }
  fail_unsupported("operator '" + op + "'");
}

Value negate(const Value& v) {
  if (v.is_undefined()) fail_undefined(v);
  if (v.is_float()) return Value(-v.as_double());
  if (v.is_int() || v.is_bool()) {
    if (v.as_int() == INT64_MIN) overflow("unary -");
    return Value(-v.as_int());
  }
  fail(std::string("bad operand type for unary -: '") + v.type_name() + "'");
}

Value call_value(const Value& f, CallArgs& a) {
  if (f.is_func()) return f.func_data().fn(a);
  if (f.is_undefined()) fail_undefined(f);
  fail(std::string("'") + f.type_name() + "' object is not callable");
}

// ------------------------------------------------------------------ filters

namespace {

// Jinja's attribute getter for filters: "a.b.0" -> environment.getitem per part.
Value attr_get(const Value& item, const Value& attribute, const Value* def = nullptr) {
  std::vector<Value> parts;
  if (attribute.is_string()) {
    const std::string& s = attribute.str();
    size_t b = 0;
    while (true) {
      size_t e = s.find('.', b);
      std::string p = s.substr(b, e == std::string::npos ? std::string::npos : e - b);
      bool digits = !p.empty() && std::all_of(p.begin(), p.end(), [](char c) { return c >= '0' && c <= '9'; });
      parts.push_back(digits ? Value(static_cast<int64_t>(std::strtoll(p.c_str(), nullptr, 10))) : Value(p));
      limits::tick(1);
      check_size(list_bytes(parts.size()), "attribute path");
      if (e == std::string::npos) break;
      b = e + 1;
    }
  } else {
    parts.push_back(attribute);
  }
  Value cur = item;
  for (const auto& p : parts) {
    cur = get_item(cur, p);
    if (def && cur.is_undefined()) return *def;
  }
  return cur;
}

Value case_key(const Value& v, bool case_sensitive) {
  if (!case_sensitive && v.is_string()) return Value(str_lower(v.str()));
  return v;
}

void sort_values(std::vector<Value>& items, bool reverse, bool case_sensitive, const Value* attribute) {
  limits::tick(items.size() * static_cast<uint64_t>(1 + std::bit_width(items.size())));  // n log n comparisons
  std::vector<std::pair<Value, size_t>> keyed;
  keyed.reserve(items.size());
  for (size_t k = 0; k < items.size(); ++k)
    keyed.emplace_back(case_key(attribute ? attr_get(items[k], *attribute) : items[k], case_sensitive), k);
  try {
    std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
      return reverse ? py_less(y.first, x.first) : py_less(x.first, y.first);
    });
  } catch (const std::invalid_argument& e) {
    fail(e.what());
  }
  std::vector<Value> out;
  out.reserve(items.size());
  for (auto& kv : keyed) out.push_back(items[kv.second]);
  items = std::move(out);
}


// Python int(str, base) for the int filter; false when Python would raise.
bool parse_py_int(std::string s, int base, int64_t& out) {
  s = py_strip(s, true, true);
  if (s.empty()) return false;
  size_t i = 0;
  bool neg = false;
  if (s[0] == '+' || s[0] == '-') {
    neg = s[0] == '-';
    i = 1;
  }
  if (base == 0 || base == 16 || base == 8 || base == 2) {
    if (i + 1 < s.size() && s[i] == '0') {
      char p = static_cast<char>(s[i + 1] | 0x20);
      int pb = p == 'x' ? 16 : p == 'o' ? 8 : p == 'b' ? 2 : 0;
      if (pb && (base == 0 || base == pb)) {
        base = pb;
        i += 2;
      }
    }
    if (base == 0) base = 10;
  }
  std::string digits;
  bool prev_us = true;
  for (; i < s.size(); ++i) {
    char c = s[i];
    if (c == '_') {
      if (prev_us) return false;
      prev_us = true;
      continue;
    }
    int d = (c >= '0' && c <= '9') ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'z' ? (c | 0x20) - 'a' + 10 : 99;
    if (d >= base) return false;
    digits += c;
    prev_us = false;
  }
  if (digits.empty() || prev_us) return false;
  errno = 0;
  unsigned long long v = std::strtoull(digits.c_str(), nullptr, base);
  if (errno || v > static_cast<unsigned long long>(INT64_MAX)) fail_unsupported("integer overflow (values beyond 64 bits)");
  out = neg ? -static_cast<int64_t>(v) : static_cast<int64_t>(v);
  return true;
}

bool parse_py_float(const std::string& s0, double& out) {
  std::string s = py_strip(s0, true, true);
  if (s.empty()) return false;
  std::string low = str_lower(s);
  std::string body = low;
  bool neg = false;
  if (!body.empty() && (body[0] == '+' || body[0] == '-')) {
    neg = body[0] == '-';
    body = body.substr(1);
  }
  if (body == "inf" || body == "infinity") {
    out = neg ? -INFINITY : INFINITY;
    return true;
  }
  if (body == "nan") {
    out = NAN;
    return true;
  }
  std::string clean;
  for (size_t k = 0; k < s.size(); ++k) {
    if (s[k] == '_') {
      if (k == 0 || k + 1 >= s.size() || !std::isdigit(static_cast<unsigned char>(s[k - 1])) ||
          !std::isdigit(static_cast<unsigned char>(s[k + 1])))
        return false;
      continue;
    }
    clean += s[k];
  }
  if (clean.find_first_of("xXpP") != std::string::npos) return false;
  char* end = nullptr;
  out = std::strtod(clean.c_str(), &end);
  return end && *end == 0 && end != clean.c_str();
}

Value round_value(const Value& v, int64_t precision, const std::string& method) {
  if (!v.is_number()) fail(std::string("type ") + v.type_name() + " doesn't define __round__ method");
  if (method != "common" && method != "ceil" && method != "floor") fail("method must be common, ceil or floor");
  if (method == "common") {
    if (!v.is_float()) {
      if (precision >= 0) return Value(v.as_int());
      fail_unsupported("round() of an integer to negative precision");
    }
    double d = v.as_double();
    if (!std::isfinite(d)) return Value(d);
    if (precision < 0 || precision > 300) fail_unsupported("round() precision outside 0..300");
    char buf[512];
    std::snprintf(buf, sizeof buf, "%.*f", static_cast<int>(precision), d);
    return Value(std::strtod(buf, nullptr));
  }
  double scale = std::pow(10.0, static_cast<double>(precision));
  double x = v.as_double() * scale;
  x = method == "ceil" ? std::ceil(x) : std::floor(x);
  return Value(x / scale);
}

std::vector<Value> select_impl(const Value& seq, CallArgs& a, bool by_attr, bool select) {
  if (!seq.truthy()) return {};  // Jinja: `if value:` before iterating
  size_t off = 0;
  Value attribute;
  if (by_attr) {
    const Value* at = a.get(0, nullptr);
    if (!at) fail("Missing parameter for attribute name");
    attribute = *at;
    off = 1;
  }
  std::string test;
  CallArgs targs;
  bool has_test = a.pos.size() > off;
  if (has_test) {
    test = need_str(a.pos[off], "test name");
    if (!known_test(test)) fail_unsupported("unsupported test '" + test + "'");
    targs.pos.assign(a.pos.begin() + static_cast<long>(off) + 1, a.pos.end());
    targs.kw = a.kw;
  }
  std::vector<Value> out;
  for (const auto& item : iterate(seq)) {
    Value x = by_attr ? attr_get(item, attribute) : item;
    bool r = has_test ? apply_test(test, x, targs) : x.truthy();
    if (r == select) out.push_back(item);
  }
  return out;
}

Value min_max(const Value& seq, CallArgs& a, bool want_max) {
  bool cs = arg_bool(a, 0, "case_sensitive", false);
  const Value* attribute = a.get(1, "attribute");
  std::vector<Value> items = iterate(seq);
  if (items.empty()) return Value::undefined(std::string("No aggregated item, sequence was empty."));
  size_t best = 0;
  try {
    for (size_t k = 1; k < items.size(); ++k) {
      Value x = case_key(attribute ? attr_get(items[k], *attribute) : items[k], cs);
      Value y = case_key(attribute ? attr_get(items[best], *attribute) : items[best], cs);
      if (want_max ? py_less(y, x) : py_less(x, y)) best = k;
    }
  } catch (const std::invalid_argument& e) {
    fail(e.what());
  }
  return items[best];
}

}  // namespace

namespace {
Value apply_filter_impl(const std::string& f, const Value& v, CallArgs& a);
}

// Jinja's map/select/reject/selectattr/rejectattr/unique/batch/items are generators: an error
// surfaces only when the result is iterated.
Value apply_filter(const std::string& f, const Value& v, CallArgs& a) {
  static const std::set<std::string> lazy = {"map", "select", "reject", "selectattr", "rejectattr",
                                             "unique", "batch", "items"};
  if (!lazy.count(f)) return apply_filter_impl(f, v, a);
  try {
    return apply_filter_impl(f, v, a);
  } catch (const EvalError& e) {
    if (e.kind != EvalError::Kind::Runtime) throw;
    const char* gen = f == "map" ? "generator object sync_do_map"
                      : f == "unique" ? "generator object sync_do_unique"
                      : f == "batch" ? "generator object do_batch"
                      : f == "items" ? "generator object do_items"
                                     : "generator object select_or_reject";
    Value it = Value::iterator({}, gen);
    it.list_data().error = e.what();
    return it;
  }
}

namespace {
Value apply_filter_impl(const std::string& f, const Value& v, CallArgs& a) {
  // Filters that accept undefined values quietly.
  if (f == "default" || f == "d") {
    const Value* def = a.get(0, "default_value");
    bool boolean = arg_bool(a, 1, "boolean", false);
    if (v.is_undefined() || (boolean && !v.truthy())) return def ? *def : Value("");
    return v;
  }
  if (v.unsafe()) fail_undefined(v);
  if (f == "length" || f == "count") return Value(py_len(v));
  if (f == "string") return Value(v.to_str());
  if (f == "safe") return v.is_markup() ? v : Value::markup(v.to_str());
  if ((f == "e" || f == "escape") && v.is_markup()) return v;
  if (f == "e" || f == "escape" || f == "forceescape") return Value::markup(html_escape(v.to_str()));
  if (f == "upper") return Value(str_upper(v.to_str()));
  if (f == "lower") return Value(str_lower(v.to_str()));
  if (f == "title") return Value(jinja_title(v.to_str()));
  if (f == "capitalize") return Value(str_capitalize(v.to_str()));
  if (f == "trim") {
    const Value* c = a.get(0, "chars");
    const std::string* chars = (c && !c->is_none()) ? &need_str(*c, "chars") : nullptr;
    return Value(py_strip(v.to_str(), true, true, chars));
  }
  if (f == "replace") {
    const Value* o = a.get(0, "old");
    const Value* nw = a.get(1, "new");
    const Value* c = a.get(2, "count");
    if (!o || !nw) fail("replace filter needs 2 arguments");
    int64_t count = (c && !c->is_none()) ? need_int(*c, "count") : -1;
    return Value(replace_all(v.to_str(), o->to_str(), nw->to_str(), count == 0 ? -1 : count));
  }
  if (f == "wordcount") {
    int64_t n = 0;
    bool in = false;
    for (char32_t c : utf8_decode(v.to_str())) {
      bool w = is_word_cp(c);
      if (w && !in) ++n;
      in = w;
    }
    return Value(n);
  }
  if (f == "center") {
    const Value* w = a.get(0, "width");
    return Value(pad_str(v.to_str(), w ? need_int(*w, "width") : 80, " ", '^'));
  }
  if (f == "indent") {
    const Value* w = a.get(0, "width");
    size_t width = 4;  // or the string `w`
    if (w && !w->is_string()) width = static_cast<size_t>(std::max<int64_t>(0, need_int(*w, "width")));
    bool first = arg_bool(a, 1, "first", false);
    bool blank = arg_bool(a, 2, "blank", false);
    if (!v.is_string()) {
      if (v.is_undefined()) fail_undefined(v);
      fail(std::string("unsupported operand type(s) for +=: '") + v.type_name() + "' and 'str'");
    }
    std::string s = v.str() + "\n";
    std::vector<Value> lines = str_splitlines(s, false);
    // The exact size of the result, before building it (and the indent string).
    size_t indents = first ? 1 : 0;
    for (size_t k = 1; k < lines.size(); ++k) indents += blank || !lines[k].str().empty();
    size_t ind_size = w && w->is_string() ? w->str().size() : width;
    check_size(s.size() + limits::mul_size(indents, ind_size));
    std::string ind = w && w->is_string() ? w->str() : std::string(indents ? width : 0, ' ');
    std::string rv;
    if (blank) {
      for (size_t k = 0; k < lines.size(); ++k) {
        if (k) rv += "\n" + ind;
        rv += lines[k].str();
      }
    } else {
      rv = lines.empty() ? "" : lines[0].str();
      for (size_t k = 1; k < lines.size(); ++k) {
        rv += "\n";
        if (!lines[k].str().empty()) rv += ind;
        rv += lines[k].str();
      }
    }
    if (first) rv = ind + rv;
    return Value(std::move(rv));
  }

  if (f == "format") {
    if (!a.kw.empty() && !a.pos.empty()) fail("can't handle positional and keyword arguments at the same time");
    if (!a.kw.empty()) {
      Value m = Value::dict();
      for (const auto& kv : a.kw) m.dict_data().set(Value(kv.first), kv.second);
      return Value(percent_format(v.to_str(), {}, &m));
    }
    if (a.pos.size() == 1 && a.pos[0].is_dict()) return Value(percent_format(v.to_str(), {}, &a.pos[0]));
    return Value(percent_format(v.to_str(), a.pos, nullptr));
  }
  if (f == "tojson") {
    const Value* ea = a.get(0, "ensure_ascii");
    const Value* ind = a.get(1, "indent");
    const Value* seps = a.get(2, "separators");
    bool sort_keys = arg_bool(a, 3, "sort_keys", false);
    if (ea && ea->truthy()) fail_unsupported("tojson(ensure_ascii=True)");
    int indent = -1;
    std::string indent_s;
    const std::string* indent_str = nullptr;
    if (ind && !ind->is_none()) {
      if (ind->is_string()) {
        indent_s = ind->str();
        indent_str = &indent_s;
      } else {
        indent = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(need_int(*ind, "indent"), 1000)));
      }
    }
    std::string item_sep, key_sep;
    const std::string *isp = nullptr, *ksp = nullptr;
    if (seps && !seps->is_none()) {
      if (!seps->is_sequence_like() || seps->list_data().items.size() != 2) fail("separators must be a pair of strings");
      item_sep = need_str(seps->list_data().items[0], "separator");
      key_sep = need_str(seps->list_data().items[1], "separator");
      isp = &item_sep;
      ksp = &key_sep;
    }
    try {
      return Value(to_json(v, indent, sort_keys, isp, ksp, indent_str));
    } catch (const std::invalid_argument& e) {
      fail(e.what());
    }
  }
  if ((f == "int" || f == "float") && v.is_undefined()) fail_undefined(v);
  if (f == "int") {
    const Value* def = a.get(0, "default");
    const Value* base = a.get(1, "base");
    Value d = def ? *def : Value(static_cast<int64_t>(0));
    int b = base ? static_cast<int>(need_int(*base, "base")) : 10;
    if (v.is_int() || v.is_bool()) return Value(v.as_int());
    if (v.is_float()) {
      double x = v.as_double();
      if (!std::isfinite(x)) return d;
      return Value(checked(std::trunc(x)));
    }
    if (v.is_string()) {
      int64_t r;
      if (parse_py_int(v.str(), b, r)) return Value(r);
      double x;
      if (parse_py_float(v.str(), x) && std::isfinite(x)) return Value(checked(std::trunc(x)));
    }
    return d;
  }
  if (f == "float") {
    const Value* def = a.get(0, "default");
    Value d = def ? *def : Value(0.0);
    if (v.is_number()) return Value(v.as_double());
    if (v.is_string()) {
      double x;
      if (parse_py_float(v.str(), x)) return Value(x);
    }
    return d;
  }
  if (f == "abs") {
    if (v.is_float()) return Value(std::fabs(v.as_double()));
    if (v.is_int() || v.is_bool()) return Value(checked(std::fabs(static_cast<long double>(v.as_int())), "abs"));
    fail(std::string("bad operand type for abs(): '") + v.type_name() + "'");
  }
  if (f == "round") {
    const Value* p = a.get(0, "precision");
    const Value* m = a.get(1, "method");
    return round_value(v, p ? need_int(*p, "precision") : 0, m ? need_str(*m, "method") : "common");
  }
  if (f == "first") {
    if (v.is_dict() || v.is_string() || v.is_sequence_like() || v.is_iterator() || v.is_undefined()) {
      if (v.is_iterator()) {
        ListData& d = v.list_data();
        if (!d.consumed && !d.error.empty()) {
          d.consumed = true;
          fail(d.error);
        }
        if (d.consumed || d.items.empty()) return Value::undefined("No first item, sequence was empty.");
        Value r = d.items[0];
        d.items.erase(d.items.begin());
        return r;
      }
      std::vector<Value> items = iterate(v);
      if (items.empty()) return Value::undefined("No first item, sequence was empty.");
      return items[0];
    }
    fail(std::string("'") + v.type_name() + "' object is not iterable");
  }
  if (f == "last") {
    if (v.is_iterator()) fail(std::string("'") + v.type_name() + "' object is not reversible");
    std::vector<Value> items = iterate(v);
    if (items.empty()) return Value::undefined("No last item, sequence was empty.");
    return items.back();
  }
  if (f == "list") return Value::list(iterate(v));
  if (f == "items") {
    if (v.is_undefined()) return Value::iterator({}, "generator object do_items");
    if (!v.is_dict()) fail("Can only get item pairs from a mapping.");
    std::vector<Value> out;
    for (const auto& kv : v.dict_data().items) out.push_back(Value::tuple({kv.first, kv.second}));
    return Value::iterator(std::move(out), "generator object do_items");
  }
  if (f == "reverse") {
    if (v.is_undefined()) return Value::iterator({}, "reversed");
    if (v.is_string()) {
      std::u32string cs = utf8_decode(v.str());
      std::reverse(cs.begin(), cs.end());
      return Value(utf8_encode(cs));
    }
    std::vector<Value> items = iterate(v);
    std::reverse(items.begin(), items.end());
    if (v.is_list()) return Value::iterator(std::move(items), "list_reverseiterator");
    if (v.is_dict()) return Value::iterator(std::move(items), "dict_reversekeyiterator");
    return Value::list(std::move(items));
  }
  if (f == "join") {
    const Value* d = a.get(0, "d");
    const Value* attribute = a.get(1, "attribute");
    std::string sep = d ? d->to_str() : "";
    std::string out;
    size_t k = 0;
    for (const auto& item : iterate(v)) {
      Value x = attribute ? attr_get(item, *attribute) : item;
      if (x.unsafe()) fail_undefined(x);
      const std::string text = x.is_string() ? std::string() : x.to_str();
      const std::string& t = x.is_string() ? x.str() : text;
      check_size(out.size() + (k ? sep.size() : 0) + t.size());
      if (k++) out += sep;
      out += t;
    }
    return Value(std::move(out));
  }
  if (f == "sort") {
    bool reverse = arg_bool(a, 0, "reverse", false);
    bool cs = arg_bool(a, 1, "case_sensitive", false);
    const Value* attribute = a.get(2, "attribute");
    std::vector<Value> items = iterate(v);
    sort_values(items, reverse, cs, attribute);
    return Value::list(std::move(items));
  }
  if (f == "dictsort") {
    if (!v.is_dict()) fail("You can only sort by either \"key\" or \"value\"");
    bool cs = arg_bool(a, 0, "case_sensitive", false);
    const Value* by = a.get(1, "by");
    bool reverse = arg_bool(a, 2, "reverse", false);
    int pos = 0;
    if (by) {
      std::string b = need_str(*by, "by");
      if (b == "value") pos = 1;
      else if (b != "key") fail("You can only sort by either \"key\" or \"value\"");
    }
    std::vector<Value> items;
    for (const auto& kv : v.dict_data().items) items.push_back(Value::tuple({kv.first, kv.second}));
    Value idx(static_cast<int64_t>(pos));
    sort_values(items, reverse, cs, &idx);
    return Value::list(std::move(items));
  }
  if (f == "unique") {
    bool cs = arg_bool(a, 0, "case_sensitive", false);
    const Value* attribute = a.get(1, "attribute");
    std::vector<Value> out, seen;
    for (const auto& item : iterate(v)) {
      Value key = case_key(attribute ? attr_get(item, *attribute) : item, cs);
      bool dup = false;
      limits::tick(1 + seen.size());
      for (const auto& s : seen)
        if (py_equal(s, key)) {
          dup = true;
          break;
        }
      if (dup) continue;
      seen.push_back(key);
      out.push_back(item);
    }
    return Value::iterator(std::move(out), "generator object sync_do_unique");
  }
  if (f == "map") {
    std::vector<Value> out;
    if (!v.truthy()) return Value::iterator({}, "generator object sync_do_map");  // Jinja: `if value:` before iterating
    const Value* attribute = nullptr;
    for (const auto& kv : a.kw)
      if (kv.first == "attribute") attribute = &kv.second;
    if (attribute) {
      const Value* def = nullptr;
      for (const auto& kv : a.kw)
        if (kv.first == "default") def = &kv.second;
      for (const auto& item : iterate(v)) out.push_back(attr_get(item, *attribute, def));
      return Value::iterator(std::move(out), "generator object sync_do_map");
    }
    if (a.pos.empty()) return Value::iterator(iterate(v), "generator object sync_do_map");
    std::string fname = need_str(a.pos[0], "filter name");
    if (!known_filter(fname)) fail_unsupported("unsupported filter '" + fname + "'");
    CallArgs fa;
    fa.pos.assign(a.pos.begin() + 1, a.pos.end());
    fa.kw = a.kw;
    limits::ValueDepthGuard g("map");  // map('map', 'map', ...) nests filters
    for (const auto& item : iterate(v)) {
      limits::tick(fa.pos.size() + fa.kw.size());
      CallArgs c = fa;
      out.push_back(apply_filter(fname, item, c));
    }
    return Value::iterator(std::move(out), "generator object sync_do_map");
  }
  if (f == "select") return Value::iterator(select_impl(v, a, false, true), "generator object select_or_reject");
  if (f == "reject") return Value::iterator(select_impl(v, a, false, false), "generator object select_or_reject");
  if (f == "selectattr") return Value::iterator(select_impl(v, a, true, true), "generator object select_or_reject");
  if (f == "rejectattr") return Value::iterator(select_impl(v, a, true, false), "generator object select_or_reject");
  if (f == "batch") {
    const Value* lc = a.get(0, "linecount");
    if (!lc) fail("batch() missing required argument 'linecount'");
    int64_t n = need_int(*lc, "linecount");
    if (n <= 0) fail("batch linecount must be positive");
    const Value* fill = a.get(1, "fill_with");
    std::vector<Value> out, tmp;
    for (const auto& item : iterate(v)) {
      if (static_cast<int64_t>(tmp.size()) == n) {
        out.push_back(Value::list(std::move(tmp)));
        tmp.clear();
      }
      tmp.push_back(item);
    }
    if (!tmp.empty()) {
      if (fill && !fill->is_none()) check_size(list_bytes(static_cast<uint64_t>(n)), "list");
      if (fill && !fill->is_none())
        while (static_cast<int64_t>(tmp.size()) < n) tmp.push_back(*fill);
      out.push_back(Value::list(std::move(tmp)));
    }
    return Value::iterator(std::move(out), "generator object do_batch");
  }
  if (f == "sum") {
    const Value* attribute = a.get(0, "attribute");
    const Value* start = a.get(1, "start");
    Value acc = start ? *start : Value(static_cast<int64_t>(0));
    for (const auto& item : iterate(v)) acc = binary_op("+", acc, attribute ? attr_get(item, *attribute) : item);
    return acc;
  }
  if (f == "min") return min_max(v, a, false);
  if (f == "max") return min_max(v, a, true);
  if (f == "attr") {
    const Value* n = a.get(0, "name");
    if (!n) fail("attr() missing required argument 'name'");
    Value out;
    if (py_getattr(v, need_str(*n, "attribute name"), out)) return out;
    return missing_attr(v, n->str());
  }
  fail_unsupported("unsupported filter '" + f + "'");
}
}  // namespace

// ------------------------------------------------------------------ tests

bool apply_test(const std::string& t, const Value& v, CallArgs& a) {
  static const std::set<std::string> no_args = {
      "defined", "undefined", "none", "boolean", "true", "false", "integer", "float", "number", "string",
      "mapping", "iterable", "sequence", "callable", "escaped", "lower", "upper", "odd", "even"};
  if (no_args.count(t) && (!a.pos.empty() || !a.kw.empty()))
    fail("test_" + t + "() takes 1 positional argument but " + std::to_string(1 + a.pos.size() + a.kw.size()) +
         " were given");
  auto arg0 = [&]() -> const Value& {
    const Value* x = a.get(0, nullptr);
    if (!x) fail("test '" + t + "' needs an argument");
    return *x;
  };
  if (t == "defined") return !v.is_undefined();
  if (t == "undefined") return v.is_undefined();
  if (t == "none") return v.is_none();
  if (t == "boolean") return v.is_bool();
  if (t == "true") return v.is_bool() && v.as_bool();
  if (t == "false") return v.is_bool() && !v.as_bool();
  if (t == "integer") return v.is_int();
  if (t == "float") return v.is_float();
  if (t == "number") return v.is_number();
  if (t == "string") return v.is_string();
  if (t == "mapping") return v.is_dict();
  if (t == "iterable")
    return v.is_undefined() || v.is_string() || v.is_sequence_like() || v.is_dict() || v.is_iterator();
  if (t == "sequence") return v.is_undefined() || v.is_string() || (v.is_sequence_like() && !v.is_view()) || v.is_dict();
  if (t == "callable") return v.is_func() || v.is_undefined();  // Undefined defines __call__
  if (t == "escaped") return false;
  if (t == "lower") return str_islower(v.to_str(), true);  // Jinja: str(value).islower()
  if (t == "upper") return str_islower(v.to_str(), false);
  if (t == "odd" || t == "even") {
    if (v.is_undefined()) fail_undefined(v);
    if (!(v.is_int() || v.is_bool())) {
      if (v.is_float()) {
        double r = std::fmod(v.as_double(), 2.0);
        if (r < 0) r += 2.0;
        return t == "odd" ? r == 1.0 : r == 0.0;
      }
      bad_operands("%", v, Value(static_cast<int64_t>(2)));
    }
    int64_t r = ((v.as_int() % 2) + 2) % 2;
    return t == "odd" ? r == 1 : r == 0;
  }
  if (t == "divisibleby") {
    Value r = binary_op("%", v, arg0());
    return py_equal(r, Value(static_cast<int64_t>(0)));
  }
  if (t == "eq" || t == "equalto" || t == "==") return py_equal(v, arg0());
  if (t == "ne" || t == "!=") return !py_equal(v, arg0());
  try {
    if (t == "lt" || t == "lessthan" || t == "<") return py_less(v, arg0());
    if (t == "gt" || t == "greaterthan" || t == ">") return py_less(arg0(), v);
    if (t == "le" || t == "<=") return !py_less(arg0(), v);
    if (t == "ge" || t == ">=") return !py_less(v, arg0());
  } catch (const std::invalid_argument& e) {
    fail(e.what());
  }
  if (t == "in") return contains(arg0(), v);
  if (t == "sameas") {
    const Value& o = arg0();
    if (v.type() != o.type()) return false;
    switch (v.type()) {
      case Value::Type::None: case Value::Type::Undefined: return true;
      case Value::Type::Bool: return v.as_bool() == o.as_bool();
      case Value::Type::Int: return v.as_int() == o.as_int() && v.as_int() >= -5 && v.as_int() <= 256;
      case Value::Type::String: return v.str() == o.str() && v.str().size() <= 1;
      case Value::Type::Float: return false;
      default: return v.identity() == o.identity();
    }
  }
  if (t == "filter") return known_filter(need_str(arg0(), "filter name"));
  if (t == "test") return known_test(need_str(arg0(), "test name"));
  fail_unsupported("unsupported test '" + t + "'");
}

}  // namespace am::jinja::detail
