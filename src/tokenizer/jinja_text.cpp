// Python str semantics for the chat-template interpreter: Unicode case mapping and classes (utf8proc), split /
// splitlines / replace, slicing indices, HTML escaping, and str.format / %-formatting with format specs.
// Shared with the other builtin files through jinja_builtins_internal.h. Written from the Python documentation.
#include "tokenizer/jinja_builtins_internal.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>

#include <utf8proc.h>

namespace am::jinja::detail::bi {

// ------------------------------------------------------------------ small helpers

std::string obj_desc(const Value& v) { return std::string("'") + v.type_name() + " object'"; }

// One value of n bytes (see jinja_limits.h); lists: pass the bytes of their slots.
void check_size(size_t n, const char* what) { limits::check_value_size(n, what); }
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

}  // namespace am::jinja::detail::bi
