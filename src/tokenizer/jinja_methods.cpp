// Attribute and item lookup with the sandbox rules transformers uses (ImmutableSandboxedEnvironment), and the
// methods of str / dict / list that templates call (see jinja_builtins.h). Written from the Jinja2 and Python
// documentation.
#include "tokenizer/jinja_builtins_internal.h"
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
namespace bi {

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

}  // namespace bi

using namespace bi;

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


}  // namespace am::jinja::detail
