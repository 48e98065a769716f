// Jinja2 / Python semantics for the chat-template interpreter, split by concern (see jinja_builtins.h):
//   jinja_builtins.cpp  errors, operators (+ - * / // % ** ~ comparisons, in, is), calls
//   jinja_methods.cpp   attribute / item lookup (sandboxed) and str / dict / list methods
//   jinja_filters.cpp   filters and tests
//   jinja_text.cpp      Python str semantics shared by the above (case mapping, split, format)
// Written from the Jinja2 and Python documentation.
#include "tokenizer/jinja_builtins.h"

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

void fail(const std::string& msg) { throw EvalError(EvalError::Kind::Runtime, msg); }
void fail_unsupported(const std::string& msg) { throw EvalError(EvalError::Kind::Unsupported, msg); }
void fail_undefined(const Value& u) {
  if (u.unsafe()) fail(u.str());
  fail(u.str().empty() ? "value is undefined" : u.str());
}


using namespace bi;

// ------------------------------------------------------------------ operators

namespace {
// Python ints are unbounded; ours are 64-bit, so a result beyond int64 is an error naming the
// operation (never undefined behaviour: INT64_MIN // -1 used to kill the process with SIGFPE).
[[noreturn]] void overflow(const char* op) {
  fail_unsupported(std::string("integer overflow in '") + op + "' (the result needs more than 64 bits)");
}
}  // namespace

namespace bi {
void bad_operands(const std::string& op, const Value& a, const Value& b) {
  fail("unsupported operand type(s) for " + op + ": '" + a.type_name() + "' and '" + b.type_name() + "'");
}

// A float with an integral value -> int64 (int(), abs() of floats, printf %d).
int64_t checked(long double r, const char* op) {
  if (!(r >= -9223372036854775808.0L && r < 9223372036854775808.0L)) overflow(op);
  return static_cast<int64_t>(r);
}
}  // namespace bi

namespace {
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

}  // namespace am::jinja::detail
