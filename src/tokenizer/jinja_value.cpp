// Python-semantics values for the Jinja2 interpreter (see jinja_value.h).
#include "tokenizer/jinja_value.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include <utf8proc.h>

#include "core/error.h"

namespace am::jinja {

// ---------------------------------------------------------------- limits (see jinja_limits.h)

namespace detail {
void fail_limit(const std::string& msg) { throw EvalError(EvalError::Kind::Limit, msg); }
}  // namespace detail

namespace limits {

thread_local constinit RenderBudget* tl_budget = nullptr;
thread_local constinit int tl_value_depth = 0;

namespace {
std::string mib(size_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }
}  // namespace

void steps_exceeded() {
  detail::fail_limit("template step limit exceeded (more than " + std::to_string(tl_budget->max_steps) +
                     " steps): an endless or far too long loop or recursion");
}

size_t charge(size_t bytes) {
  RenderBudget* b = tl_budget;
  if (!b) return 0;
  if (bytes > b->max_memory || b->memory > b->max_memory - bytes)
    detail::fail_limit("template memory limit exceeded: the values alive during the render would take more than " +
                       mib(b->max_memory));
  b->memory += bytes;
  if (b->memory > b->peak_memory) b->peak_memory = b->memory;
  return bytes;
}

void credit(size_t bytes) noexcept {
  RenderBudget* b = tl_budget;
  if (!b || !bytes) return;
  b->memory = b->memory > bytes ? b->memory - bytes : 0;
}

void check_value_size(size_t bytes, const char* what) {
  size_t limit = tl_budget ? tl_budget->max_value_bytes : kMaxValueBytes;
  if (bytes > limit) {
    std::string lim = limit >= (size_t(1) << 20) ? mib(limit) : std::to_string(limit) + " bytes";
    detail::fail_limit(std::string(what) + " too large (the limit of one value is " + lim + ")");
  }
}

void ValueDepthGuard::overflow(const char* op) {
  --tl_value_depth;
  detail::fail_limit(std::string("value nested too deeply for ") + op + " (more than " +
                     std::to_string(kMaxValueDepth) + " levels)");
}

}  // namespace limits

namespace {

// Values whose destruction was deferred by a ListData / DictData destructor. The outermost such
// destructor owns the graveyard and destroys them one at a time: a destructor that runs while a
// graveyard exists moves its nested lists / dicts / functions there instead of destroying them, so
// nesting depth never turns into stack depth.
thread_local std::vector<Value>* tl_graveyard = nullptr;

class Graveyard {  // installs a graveyard unless one exists; drains it when destroyed
 public:
  Graveyard() : owner_(tl_graveyard == nullptr) {
    if (owner_) tl_graveyard = &own_;
  }
  ~Graveyard() {
    if (!owner_) return;
    while (!own_.empty()) {
      Value v = std::move(own_.back());
      own_.pop_back();
    }  // v's destructor may add more
    tl_graveyard = nullptr;
  }
  Graveyard(const Graveyard&) = delete;
  Graveyard& operator=(const Graveyard&) = delete;

 private:
  bool owner_;
  std::vector<Value> own_;
};

void defer(Value& v) {
  if (v.holds_objects()) tl_graveyard->push_back(std::move(v));
}

// The body of ~ListData / ~DictData: `values` calls its argument on every value held.
template <class Values, class Clear>
void release(Values values, Clear clear) {
  if (tl_graveyard) {
    values(defer);
    return;
  }
  bool nested = false;
  values([&](Value& v) { nested = nested || v.holds_objects(); });
  if (!nested) return;  // the common case: nothing but strings and numbers
  Graveyard g;  // the children die here, their own children in the graveyard
  clear();
}

}  // namespace

BudgetScope::BudgetScope(RenderBudget& b) : b_(b), prev_(limits::tl_budget) { limits::tl_budget = &b; }

BudgetScope::~BudgetScope() {
  // Break reference cycles through namespaces (`{% set ns.me = ns %}`): the render is over.
  {
    Graveyard g;
    for (auto& w : b_.namespaces) {
      std::shared_ptr<DictData> d = w.lock();
      if (!d) continue;
      for (auto& kv : d->items) {
        defer(kv.first);
        defer(kv.second);
      }
      d->items.clear();
      d->index.clear();
    }
    b_.namespaces.clear();
  }
  limits::tl_budget = prev_;
}

StrData::StrData(std::string text) : s(std::move(text)) {
  if (limits::tl_budget) {
    limits::check_value_size(s.size(), "string");
    limits::tick_copy(s.size());
    charged = limits::charge(s.capacity() + sizeof(StrData) + 16);
  }
}
StrData::~StrData() { limits::credit(charged); }

ListData::~ListData() {
  limits::credit(charged);
  release([&](auto&& f) {
    for (auto& v : items) f(v);
  }, [&] { items.clear(); });
}

DictData::~DictData() {
  limits::credit(charged);
  release([&](auto&& f) {
    for (auto& kv : items) {
      f(kv.first);
      f(kv.second);
    }
  }, [&] { items.clear(); });
}

// ---------------------------------------------------------------- construction

void Value::set_text(std::string s) {
  if (s.size() <= kInlineText) {
    s_ = std::move(s);
    obj_.reset();
  } else {
    s_.clear();
    obj_ = std::make_shared<StrData>(std::move(s));
  }
}

Value Value::undefined(std::string hint, bool unsafe) {
  Value v;
  v.set_text(std::move(hint));
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
Value::Value(std::string s) : type_(Type::String) { set_text(std::move(s)); }
Value Value::markup(std::string s) {
  Value v(std::move(s));
  v.b_ = true;
  return v;
}

Value Value::list(std::vector<Value> items) {
  Value v;
  v.type_ = Type::List;
  auto data = std::make_shared<ListData>();
  if (limits::tl_budget) {
    limits::check_value_size(limits::mul_size(items.size(), sizeof(Value)), "list");
    limits::tick(1 + 2 * items.size());  // copying the items in, destroying them later
    data->charged = limits::charge(items.capacity() * sizeof(Value) + sizeof(ListData) + 16);
  }
  data->items = std::move(items);
  v.obj_ = std::move(data);
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
  v.list_().kind = std::move(kind);
  return v;
}
Value Value::view(std::vector<Value> items, std::string kind) {
  Value v = list(std::move(items));
  v.list_().kind = std::move(kind);
  return v;
}
bool Value::is_view() const { return type_ == Type::List && !list_().kind.empty(); }
Value Value::dict() {
  Value v;
  v.type_ = Type::Dict;
  v.obj_ = std::make_shared<DictData>();
  return v;
}
Value Value::ns() {
  Value v = dict();
  v.type_ = Type::Namespace;
  if (RenderBudget* b = limits::tl_budget) {
    auto& reg = b->namespaces;
    if (reg.size() >= b->namespaces_compact_at) {
      reg.erase(std::remove_if(reg.begin(), reg.end(), [](const auto& w) { return w.expired(); }), reg.end());
      b->namespaces_compact_at = std::max<size_t>(1024, 2 * reg.size());
    }
    reg.push_back(std::static_pointer_cast<DictData>(v.obj_));
  }
  return v;
}
Value Value::func(std::string name, Builtin fn) {
  Value v;
  v.type_ = Type::Func;
  v.obj_ = std::make_shared<FuncData>(FuncData{std::move(name), std::move(fn)});
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
  if (holds_objects()) return obj_.get();
  return nullptr;
}

namespace {
template <class J>
Value from_json_impl(const J& j, int depth) {
  if (depth > kMaxValueDepth)
    throw DataError("template variable nested too deeply (more than " + std::to_string(kMaxValueDepth) + " levels)");
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
      for (const auto& e : j) items.push_back(from_json_impl(e, depth + 1));
      return Value::list(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      Value d = Value::dict();
      for (auto it = j.begin(); it != j.end(); ++it) d.dict_data().set(Value(it.key()), from_json_impl(it.value(), depth + 1));
      return d;
    }
    default: return Value::none();  // binary / discarded: not produced by the parser
  }
}
}  // namespace

Value Value::from_json(const nlohmann::ordered_json& j) { return from_json_impl(j, 1); }
Value Value::from_json(const nlohmann::json& j) { return from_json_impl(j, 1); }

// ---------------------------------------------------------------- dict

const Value* DictData::find(const std::string& key) const {
  auto it = index.find(key);
  return it == index.end() ? nullptr : &items[it->second].second;
}

const Value* DictData::find(const Value& key) const {
  if (key.is_string()) return find(key.str());
  limits::tick(1 + items.size());  // a scan: keys other than strings are rare
  for (const auto& kv : items)
    if (!kv.first.is_string() && py_equal(kv.first, key)) return &kv.second;
  return nullptr;
}

namespace {
// A new entry of a dict built during a render: per-dict size limit, render memory, work.
void charge_entry(DictData& d, size_t key_bytes) {
  if (!limits::tl_budget) return;
  constexpr size_t kEntry = sizeof(std::pair<Value, Value>) + 64;  // + hash index node
  limits::check_value_size(limits::mul_size(d.items.size() + 1, kEntry), "dict");
  limits::tick(1);
  d.charged += limits::charge(kEntry + key_bytes);
}
}  // namespace

void DictData::set(const Value& key, Value v) {
  if (key.is_string()) {
    auto it = index.find(key.str());
    if (it != index.end()) {
      items[it->second].second = std::move(v);
      return;
    }
    charge_entry(*this, key.str().size());
    index.emplace(key.str(), items.size());
    items.emplace_back(key, std::move(v));
    return;
  }
  limits::tick(1 + items.size());
  for (auto& kv : items)
    if (!kv.first.is_string() && py_equal(kv.first, key)) {
      kv.second = std::move(v);
      return;
    }
  charge_entry(*this, 0);
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
size_t utf8_next(std::string_view s, size_t i, char32_t& cp) {
  size_t n = s.size();
  unsigned char c = static_cast<unsigned char>(s[i]);
  size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
  if (len == 0 || i + len > n) {
    cp = c;
    return i + 1;
  }
  char32_t v = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < len; ++k) {
    unsigned char cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xC0) != 0x80) {
      cp = c;
      return i + 1;
    }
    v = (v << 6) | (cc & 0x3F);
  }
  cp = v;
  return i + len;
}

std::u32string utf8_decode(std::string_view s) {
  limits::tick_bytes(s.size());
  std::u32string out;
  out.reserve(s.size());
  char32_t cp;
  for (size_t i = 0; i < s.size();) {
    i = utf8_next(s, i, cp);
    out += cp;
  }
  return out;
}

std::string utf8_encode(std::u32string_view s) {
  limits::tick_bytes(s.size() * 4);
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) utf8_append(out, c);
  return out;
}

size_t utf8_length(std::string_view s) {
  limits::tick_bytes(s.size());
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
  limits::tick_copy(s.size());
  std::string out;
  out.reserve(s.size() + 2);
  out += quote;
  auto plain = [quote](unsigned char c) { return c >= 0x20 && c < 0x7F && c != static_cast<unsigned char>(quote) && c != '\\'; };
  size_t slow = 0;  // bytes decoded one character at a time
  for (size_t i = 0; i < s.size();) {
    if (plain(static_cast<unsigned char>(s[i]))) {  // a run of printable ASCII: copied as it is
      size_t j = i + 1;
      while (j < s.size() && plain(static_cast<unsigned char>(s[j]))) ++j;
      out.append(s, i, j - i);
      i = j;
      continue;
    }
    char32_t c;
    size_t next = utf8_next(s, i, c);
    slow += next - i;
    i = next;
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
  limits::tick_bytes(slow);
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
    case Type::List: return list_().kind.empty() ? "list" : list_().kind.c_str();
    case Type::Tuple: return "tuple";
    case Type::Dict: return "dict";
    case Type::Namespace: return "Namespace";
    case Type::Func: return "function";
    case Type::Iterator: return list_().kind.rfind("generator", 0) == 0 ? "generator" : list_().kind.c_str();
  }
  return "object";
}

bool Value::truthy() const {
  switch (type_) {
    case Type::Undefined: case Type::None: return false;
    case Type::Bool: return b_;
    case Type::Int: return i_ != 0;
    case Type::Float: return f_ != 0.0;
    case Type::String: return !str().empty();
    case Type::List: case Type::Tuple: return !list_().items.empty();
    case Type::Dict: return !dict_().items.empty();
    case Type::Namespace: case Type::Func: case Type::Iterator: return true;
  }
  return false;
}

std::string Value::to_str() const {
  if (type_ == Type::String) return str();
  if (type_ == Type::Undefined) return "";
  return repr();
}

namespace {
void check_text_size(size_t bytes) { limits::check_value_size(bytes, "string"); }
void check_text_size(const std::string& out) { check_text_size(out.size()); }

void repr_into(const Value& v, std::string& out) {
  using T = Value::Type;
  switch (v.type()) {
    case T::String:
      check_text_size(out.size() + v.str().size() + 2);  // its repr is at least that long
      if (v.is_markup()) out += "Markup(";
      out += py_str_repr(v.str());
      if (v.is_markup()) out += ")";
      break;
    case T::List: case T::Tuple: {
      limits::ValueDepthGuard g("str()");
      bool tup = v.is_tuple();
      const auto& it = v.list_data().items;
      limits::tick(1 + it.size());
      out += tup ? "(" : v.is_view() ? v.list_data().kind + "([" : "[";
      for (size_t k = 0; k < it.size(); ++k) {
        if (k) out += ", ";
        repr_into(it[k], out);
        check_text_size(out);
      }
      if (tup && it.size() == 1) out += ",";
      out += tup ? ")" : v.is_view() ? "])" : "]";
      break;
    }
    case T::Dict: case T::Namespace: {
      limits::ValueDepthGuard g("str()");
      const auto& d = v.dict_data();
      limits::tick(1 + d.size());
      if (v.is_namespace()) out += "<Namespace ";
      out += "{";
      bool first = true;
      for (const auto& kv : d.items) {
        if (!first) out += ", ";
        first = false;
        repr_into(kv.first, out);
        out += ": ";
        repr_into(kv.second, out);
        check_text_size(out);
      }
      out += "}";
      if (v.is_namespace()) out += ">";
      break;
    }
    default: out += v.repr(); break;
  }
}
}  // namespace

std::string Value::repr() const {
  switch (type_) {
    case Type::Undefined: return "Undefined";
    case Type::None: return "None";
    case Type::Bool: return b_ ? "True" : "False";
    case Type::Int: return std::to_string(i_);
    case Type::Float: return py_float_repr(f_);
    case Type::String: case Type::List: case Type::Tuple: case Type::Dict: case Type::Namespace: {
      std::string out;
      repr_into(*this, out);
      check_text_size(out);
      return out;
    }
    case Type::Func: return "<function " + func_data().name + ">";
    case Type::Iterator:
      // CPython prints an address here; a fixed one keeps the text's shape (word count, length class).
      return list_().kind == "generator" || list_().kind.empty()
                 ? "<generator object at 0x7f0000000000>"
                 : list_().kind.find("generator ") == 0 ? "<" + list_().kind + " at 0x7f0000000000>"
                                                       : "<" + list_().kind + " object at 0x7f0000000000>";
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
    case T::String:
      if (a.str().size() != b.str().size()) return false;
      limits::tick_copy(a.str().size());
      return a.str() == b.str();
    case T::List: case T::Tuple: {
      const auto& x = a.list_data().items;
      const auto& y = b.list_data().items;
      if (x.size() != y.size()) return false;
      if (a.identity() == b.identity()) return true;  // Python: `x == x` for the same list object
      limits::ValueDepthGuard g("==");
      limits::tick(1 + x.size());
      for (size_t k = 0; k < x.size(); ++k)
        if (!py_equal(x[k], y[k])) return false;
      return true;
    }
    case T::Dict: {
      const auto& x = a.dict_data();
      const auto& y = b.dict_data();
      if (x.size() != y.size()) return false;
      if (a.identity() == b.identity()) return true;
      limits::ValueDepthGuard g("==");
      limits::tick(1 + x.size());
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
  if (a.is_string() && b.is_string()) {
    limits::tick_copy(std::min(a.str().size(), b.str().size()));
    return a.str() < b.str();  // UTF-8 order == code point order
  }
  if ((a.is_list() && b.is_list()) || (a.is_tuple() && b.is_tuple())) {
    const auto& x = a.list_data().items;
    const auto& y = b.list_data().items;
    limits::ValueDepthGuard g("<");
    limits::tick(1 + std::min(x.size(), y.size()));
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
  limits::tick_copy(s.size());
  limits::check_value_size(out.size() + s.size() + 2, "tojson result");  // at least that long
  out += '"';
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c != '"' && c != '\\') {  // a run copied as it is (ensure_ascii=False)
      size_t j = i + 1;
      while (j < s.size() && static_cast<unsigned char>(s[j]) >= 0x20 && s[j] != '"' && s[j] != '\\') ++j;
      out.append(s, i, j - i);
      i = j;
      continue;
    }
    ++i;
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default: {
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\u%04x", c);
        out += buf;
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

  void newline(int level) {
    out += '\n';
    size_t unit = indent_str ? indent_str->size() : static_cast<size_t>(indent);
    limits::check_value_size(out.size() + limits::mul_size(unit, static_cast<size_t>(level)), "tojson result");
    for (int k = 0; k < level; ++k) {
      if (indent_str) out += *indent_str;
      else out.append(static_cast<size_t>(indent), ' ');
    }
  }
  bool pretty() const { return indent >= 0 || indent_str; }

  void write(const Value& v, int level) {
    limits::check_value_size(out.size(), "tojson result");
    limits::tick(1);
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
        limits::ValueDepthGuard g("tojson");
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
        limits::ValueDepthGuard g("tojson");
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
  limits::check_value_size(w.out.size(), "tojson result");
  return std::move(w.out);
}

}  // namespace am::jinja
