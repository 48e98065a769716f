// Jinja2 filters (|tojson, |map, |selectattr, |format, ...) and tests (is defined, is string, ...) for the
// chat-template interpreter (see jinja_builtins.h). Written from the Jinja2 documentation.
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

using namespace bi;

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
