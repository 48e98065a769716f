// Python-semantics values for the Jinja2 interpreter (see jinja_value.h).
#include "tokenizer/jinja_value.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include <utf8proc.h>

namespace am::jinja {

// ---------------------------------------------------------------- construction

Value Value::undefined(std::string hint, bool unsafe) {
  Value v;
  v.s_ = std::move(hint);
  v.b_ = unsafe;
  return v;
}
Value Value::none() {
  Value v;
  v.type_ = Type::None;
  return v;
}
Value::Value(bool b) : type_(Type::Bool), b_(b) {}
Value::Value(int64_t v) : type_(Type::Int), i_(v) {}
Value::Value(double v) : type_(Type::Float), f_(v) {}
Value::Value(std::string s) : type_(Type::String), s_(std::move(s)) {}
Value Value::markup(std::string s) {
  Value v(std::move(s));
  v.b_ = true;
  return v;
}

Value Value::list(std::vector<Value> items) {
  Value v;
  v.type_ = Type::List;
  v.list_ = std::make_shared<ListData>();
  v.list_->items = std::move(items);
  return v;
}
Value Value::tuple(std::vector<Value> items) {
  Value v = list(std::move(items));
  v.type_ = Type::Tuple;
  return v;
}
Value Value::iterator(std::vector<Value> items, std::string kind) {
  Value v = list(std::move(items));
  v.type_ = Type::Iterator;
  v.list_->kind = std::move(kind);
  return v;
}
Value Value::view(std::vector<Value> items, std::string kind) {
  Value v = list(std::move(items));
  v.list_->kind = std::move(kind);
  return v;
}
bool Value::is_view() const { return type_ == Type::List && !list_->kind.empty(); }
Value Value::dict() {
  Value v;
  v.type_ = Type::Dict;
  v.dict_ = std::make_shared<DictData>();
  return v;
}
Value Value::ns() {
  Value v = dict();
  v.type_ = Type::Namespace;
  return v;
}
Value Value::func(std::string name, Builtin fn) {
  Value v;
  v.type_ = Type::Func;
  v.func_ = std::make_shared<FuncData>(FuncData{std::move(name), std::move(fn)});
  return v;
}

double Value::as_double() const {
  switch (type_) {
    case Type::Float: return f_;
    case Type::Int: return static_cast<double>(i_);
    case Type::Bool: return b_ ? 1.0 : 0.0;
    default: return 0.0;
  }
}

const void* Value::identity() const {
  if (list_) return list_.get();
  if (dict_) return dict_.get();
  if (func_) return func_.get();
  return nullptr;
}

namespace {
template <class J>
Value from_json_impl(const J& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null: return Value::none();
    case nlohmann::json::value_t::boolean: return Value(j.template get<bool>());
    case nlohmann::json::value_t::number_integer: return Value(j.template get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: {
      uint64_t u = j.template get<uint64_t>();
      if (u <= static_cast<uint64_t>(INT64_MAX)) return Value(static_cast<int64_t>(u));
      return Value(static_cast<double>(u));
    }
    case nlohmann::json::value_t::number_float: return Value(j.template get<double>());
    case nlohmann::json::value_t::string: return Value(j.template get<std::string>());
    case nlohmann::json::value_t::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& e : j) items.push_back(from_json_impl(e));
      return Value::list(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      Value d = Value::dict();
      for (auto it = j.begin(); it != j.end(); ++it) d.dict_data().set(Value(it.key()), from_json_impl(it.value()));
      return d;
    }
    default: return Value::none();  // binary / discarded: not produced by the parser
  }
}
}  // namespace

Value Value::from_json(const nlohmann::ordered_json& j) { return from_json_impl(j); }
Value Value::from_json(const nlohmann::json& j) { return from_json_impl(j); }

// ---------------------------------------------------------------- dict

const Value* DictData::find(const std::string& key) const {
  auto it = index.find(key);
  return it == index.end() ? nullptr : &items[it->second].second;
}

const Value* DictData::find(const Value& key) const {
  if (key.is_string()) return find(key.str());
  for (const auto& kv : items)
    if (!kv.first.is_string() && py_equal(kv.first, key)) return &kv.second;
  return nullptr;
}

void DictData::set(const Value& key, Value v) {
  if (key.is_string()) {
    auto it = index.find(key.str());
    if (it != index.end()) {
      items[it->second].second = std::move(v);
      return;
    }
    index.emplace(key.str(), items.size());
    items.emplace_back(key, std::move(v));
    return;
  }
  for (auto& kv : items)
    if (!kv.first.is_string() && py_equal(kv.first, key)) {
      kv.second = std::move(v);
      return;
    }
  items.emplace_back(key, std::move(v));
}

const Value* CallArgs::get(size_t i, const char* name) const {
  if (i < pos.size()) return &pos[i];
  if (name)
    for (const auto& kv : kw)
      if (kv.first == name) return &kv.second;
  return nullptr;
}

// ---------------------------------------------------------------- utf-8

void utf8_append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Lenient decoder: a byte that does not start a valid sequence becomes U+FFFD-free raw code point
// (its byte value), so that encode(decode(s)) == s for Latin-1-ish junk is not guaranteed but nothing
// crashes.
std::u32string utf8_decode(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  size_t i = 0, n = s.size();
  while (i < n) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > n) {
      out += static_cast<char32_t>(c);
      ++i;
      continue;
    }
    char32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    bool ok = true;
    for (size_t k = 1; k < len; ++k) {
      unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) {
        ok = false;
        break;
      }
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (!ok) {
      out += static_cast<char32_t>(c);
      ++i;
      continue;
    }
    out += cp;
    i += len;
  }
  return out;
}

std::string utf8_encode(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) utf8_append(out, c);
  return out;
}

size_t utf8_length(std::string_view s) {
  size_t n = 0;
  for (unsigned char c : s)
    if ((c & 0xC0) != 0x80) ++n;
  return n;
}

bool py_isspace(char32_t c) {
  switch (c) {
    case 0x09: case 0x0A: case 0x0B: case 0x0C: case 0x0D: case 0x1C: case 0x1D: case 0x1E:
    case 0x1F: case 0x20: case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029:
    case 0x202F: case 0x205F: case 0x3000:
      return true;
    default:
      return c >= 0x2000 && c <= 0x200A;
  }
}

std::string py_strip(std::string_view s, bool left, bool right, const std::string* chars) {
  std::u32string cs = utf8_decode(s);
  std::u32string set;
  if (chars) set = utf8_decode(*chars);
  auto strip_it = [&](char32_t c) { return chars ? set.find(c) != std::u32string::npos : py_isspace(c); };
  size_t b = 0, e = cs.size();
  if (left)
    while (b < e && strip_it(cs[b])) ++b;
  if (right)
    while (e > b && strip_it(cs[e - 1])) --e;
  return utf8_encode(std::u32string_view(cs).substr(b, e - b));
}

// ---------------------------------------------------------------- printing

std::string py_float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  char buf[64];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  std::string s(buf);
  bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  size_t epos = s.find('e');
  int exp = std::atoi(s.c_str() + epos + 1);
  std::string digits;
  for (size_t k = 0; k < epos; ++k)
    if (s[k] != '.') digits += s[k];
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out = neg ? "-" : "";
  if (exp < -4 || exp >= 16) {
    out += digits[0];
    if (digits.size() > 1) {
      out += '.';
      out += digits.substr(1);
    }
    out += 'e';
    out += exp < 0 ? '-' : '+';
    int ae = exp < 0 ? -exp : exp;
    if (ae < 10) out += '0';
    out += std::to_string(ae);
  } else if (exp >= 0) {
    size_t ip = static_cast<size_t>(exp) + 1;
    if (digits.size() <= ip) {
      out += digits + std::string(ip - digits.size(), '0') + ".0";
    } else {
      out += digits.substr(0, ip) + "." + digits.substr(ip);
    }
  } else {
    out += "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  }
  return out;
}

namespace {
bool py_isprintable(char32_t c) {
  if (c == ' ') return true;
  if (c < 0x20 || c == 0x7F) return false;
  if (c < 0x7F) return true;
  if (c > 0x10FFFF) return false;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_CC: case UTF8PROC_CATEGORY_CF: case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO: case UTF8PROC_CATEGORY_CN: case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP: case UTF8PROC_CATEGORY_ZS:
      return false;
    default:
      return true;
  }
}
}  // namespace

std::string py_str_repr(std::string_view s) {
  char quote = '\'';
  if (s.find('\'') != std::string_view::npos && s.find('"') == std::string_view::npos) quote = '"';
  std::string out(1, quote);
  for (char32_t c : utf8_decode(s)) {
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (!py_isprintable(c)) {
      char buf[16];
      if (c <= 0xFF) std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
      else if (c <= 0xFFFF) std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
      else std::snprintf(buf, sizeof buf, "\\U%08x", static_cast<unsigned>(c));
      out += buf;
    } else {
      utf8_append(out, c);
    }
  }
  out += quote;
  return out;
}

const char* Value::type_name() const {
  switch (type_) {
    case Type::Undefined: return "Undefined";
    case Type::None: return "NoneType";
    case Type::Bool: return "bool";
    case Type::Int: return "int";
    case Type::Float: return "float";
    case Type::String: return "str";
    case Type::List: return list_->kind.empty() ? "list" : list_->kind.c_str();
    case Type::Tuple: return "tuple";
    case Type::Dict: return "dict";
    case Type::Namespace: return "Namespace";
    case Type::Func: return "function";
    case Type::Iterator: return list_->kind.rfind("generator", 0) == 0 ? "generator" : list_->kind.c_str();
  }
  return "object";
}

bool Value::truthy() const {
  switch (type_) {
    case Type::Undefined: case Type::None: return false;
    case Type::Bool: return b_;
    case Type::Int: return i_ != 0;
    case Type::Float: return f_ != 0.0;
    case Type::String: return !s_.empty();
    case Type::List: case Type::Tuple: return !list_->items.empty();
    case Type::Dict: return !dict_->items.empty();
    case Type::Namespace: case Type::Func: case Type::Iterator: return true;
  }
  return false;
}

std::string Value::to_str() const {
  if (type_ == Type::String) return s_;
  if (type_ == Type::Undefined) return "";
  return repr();
}

std::string Value::repr() const {
  switch (type_) {
    case Type::Undefined: return "Undefined";
    case Type::None: return "None";
    case Type::Bool: return b_ ? "True" : "False";
    case Type::Int: return std::to_string(i_);
    case Type::Float: return py_float_repr(f_);
    case Type::String: return b_ ? "Markup(" + py_str_repr(s_) + ")" : py_str_repr(s_);
    case Type::List: case Type::Tuple: {
      bool tup = type_ == Type::Tuple;
      std::string out = tup ? "(" : "[";
      if (is_view()) out = list_->kind + "([";
      const auto& it = list_->items;
      for (size_t k = 0; k < it.size(); ++k) {
        if (k) out += ", ";
        out += it[k].repr();
      }
      if (tup && it.size() == 1) out += ",";
      out += tup ? ")" : is_view() ? "])" : "]";
      return out;
    }
    case Type::Dict: case Type::Namespace: {
      std::string out = "{";
      bool first = true;
      for (const auto& kv : dict_->items) {
        if (!first) out += ", ";
        first = false;
        out += kv.first.repr();
        out += ": ";
        out += kv.second.repr();
      }
      out += "}";
      return type_ == Type::Namespace ? "<Namespace " + out + ">" : out;
    }
    case Type::Func: return "<function " + func_->name + ">";
    case Type::Iterator:
      // CPython prints an address here; a fixed one keeps the text's shape (word count, length class).
      return list_->kind == "generator" || list_->kind.empty()
                 ? "<generator object at 0x7f0000000000>"
                 : list_->kind.find("generator ") == 0 ? "<" + list_->kind + " at 0x7f0000000000>"
                                                      : "<" + list_->kind + " object at 0x7f0000000000>";
  }
  return "";
}

// ---------------------------------------------------------------- comparison

bool py_equal(const Value& a, const Value& b) {
  using T = Value::Type;
  if (a.is_undefined() || b.is_undefined()) return a.is_undefined() && b.is_undefined();
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) return a.as_double() == b.as_double();
    return a.as_int() == b.as_int();
  }
  if (a.type() != b.type()) return false;
  switch (a.type()) {
    case T::None: return true;
    case T::String: return a.str() == b.str();
    case T::List: case T::Tuple: {
      const auto& x = a.list_data().items;
      const auto& y = b.list_data().items;
      if (x.size() != y.size()) return false;
      for (size_t k = 0; k < x.size(); ++k)
        if (!py_equal(x[k], y[k])) return false;
      return true;
    }
    case T::Dict: {
      const auto& x = a.dict_data();
      const auto& y = b.dict_data();
      if (x.size() != y.size()) return false;
      for (const auto& kv : x.items) {
        const Value* o = y.find(kv.first);
        if (!o || !py_equal(kv.second, *o)) return false;
      }
      return true;
    }
    default: return a.identity() == b.identity();
  }
}

bool py_less(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) return a.as_double() < b.as_double();
    return a.as_int() < b.as_int();
  }
  if (a.is_string() && b.is_string()) return a.str() < b.str();  // UTF-8 order == code point order
  if ((a.is_list() && b.is_list()) || (a.is_tuple() && b.is_tuple())) {
    const auto& x = a.list_data().items;
    const auto& y = b.list_data().items;
    for (size_t k = 0; k < x.size() && k < y.size(); ++k) {
      if (py_equal(x[k], y[k])) continue;
      return py_less(x[k], y[k]);
    }
    return x.size() < y.size();
  }
  throw std::invalid_argument(std::string("'<' not supported between instances of '") + a.type_name() +
                              "' and '" + b.type_name() + "'");
}

// ---------------------------------------------------------------- json

namespace {
void json_string(std::string& out, std::string_view s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

std::string json_key(const Value& k) {
  switch (k.type()) {
    case Value::Type::String: return k.str();
    case Value::Type::Bool: return k.as_bool() ? "true" : "false";
    case Value::Type::None: return "null";
    case Value::Type::Int: return std::to_string(k.as_int());
    case Value::Type::Float: return py_float_repr(k.as_double());
    default:
      throw std::invalid_argument(std::string("keys must be str, int, float, bool or None, not ") + k.type_name());
  }
}

struct JsonWriter {
  int indent;
  const std::string* indent_str;
  bool sort_keys;
  std::string item_sep, key_sep;
  std::string out;
  int depth_guard = 0;

  void newline(int level) {
    out += '\n';
    for (int k = 0; k < level; ++k) {
      if (indent_str) out += *indent_str;
      else out.append(static_cast<size_t>(indent), ' ');
    }
  }
  bool pretty() const { return indent >= 0 || indent_str; }

  void write(const Value& v, int level) {
    if (++depth_guard > 512) throw std::invalid_argument("value nested too deeply for tojson");
    switch (v.type()) {
      case Value::Type::None: out += "null"; break;
      case Value::Type::Bool: out += v.as_bool() ? "true" : "false"; break;
      case Value::Type::Int: out += std::to_string(v.as_int()); break;
      case Value::Type::Float: {
        double d = v.as_double();
        if (std::isnan(d)) out += "NaN";
        else if (std::isinf(d)) out += d > 0 ? "Infinity" : "-Infinity";
        else out += py_float_repr(d);
        break;
      }
      case Value::Type::String: json_string(out, v.str()); break;
      case Value::Type::List: case Value::Type::Tuple: {
        if (v.is_view()) throw std::invalid_argument(std::string("Object of type ") + v.type_name() + " is not JSON serializable");
        const auto& items = v.list_data().items;
        if (items.empty()) {
          out += "[]";
          break;
        }
        out += '[';
        for (size_t k = 0; k < items.size(); ++k) {
          if (k) out += item_sep;
          if (pretty()) newline(level + 1);
          write(items[k], level + 1);
        }
        if (pretty()) newline(level);
        out += ']';
        break;
      }
      case Value::Type::Dict: {
        const auto& d = v.dict_data();
        if (d.items.empty()) {
          out += "{}";
          break;
        }
        std::vector<std::pair<std::string, const Value*>> entries;
        entries.reserve(d.items.size());
        for (const auto& kv : d.items) entries.emplace_back(json_key(kv.first), &kv.second);
        if (sort_keys)
          std::stable_sort(entries.begin(), entries.end(),
                           [](const auto& a, const auto& b) { return a.first < b.first; });
        out += '{';
        for (size_t k = 0; k < entries.size(); ++k) {
          if (k) out += item_sep;
          if (pretty()) newline(level + 1);
          json_string(out, entries[k].first);
          out += key_sep;
          write(*entries[k].second, level + 1);
        }
        if (pretty()) newline(level);
        out += '}';
        break;
      }
      case Value::Type::Undefined:
        throw std::invalid_argument("Object of type Undefined is not JSON serializable");
      default:
        throw std::invalid_argument(std::string("Object of type ") + v.type_name() + " is not JSON serializable");
    }
    --depth_guard;
  }
};
}  // namespace

std::string to_json(const Value& v, int indent, bool sort_keys, const std::string* item_sep,
                    const std::string* key_sep, const std::string* indent_str) {
  JsonWriter w;
  w.indent = indent;
  w.indent_str = indent_str;
  w.sort_keys = sort_keys;
  bool pretty = indent >= 0 || indent_str;
  w.item_sep = item_sep ? *item_sep : (pretty ? "," : ", ");
  w.key_sep = key_sep ? *key_sep : ": ";
  w.write(v, 0);
  return std::move(w.out);
}

}  // namespace am::jinja
