// Internal to the Jinja2 interpreter: Python/Jinja2 semantics of operators, attribute and item
// lookup (with the ImmutableSandboxedEnvironment rules transformers uses), filters, tests and the
// methods of str / dict / list.
#pragma once
#include <stdexcept>
#include <string>
#include <vector>

#include "tokenizer/jinja_limits.h"
#include "tokenizer/jinja_value.h"

namespace am::jinja::detail {

// EvalError (jinja_limits.h): errors raised while evaluating.
[[noreturn]] void fail(const std::string& msg);              // Runtime
[[noreturn]] void fail_unsupported(const std::string& msg);  // Unsupported

// Undefined errors: using an undefined value where Python would raise.
[[noreturn]] void fail_undefined(const Value& u);

constexpr size_t kMaxSize = kMaxValueBytes;  // bytes of one string / list / dict built by a template

Value get_attr(const Value& obj, const std::string& name);  // obj.name
Value get_item(const Value& obj, const Value& key);         // obj[key]
Value slice(const Value& obj, const Value& start, const Value& stop, const Value& step);
std::vector<Value> iterate(const Value& v);  // Python iter(): list, tuple, str (chars), dict (keys)
int64_t py_len(const Value& v);
bool contains(const Value& container, const Value& item);  // item in container
Value binary_op(const std::string& op, const Value& a, const Value& b);
Value negate(const Value& v);

Value apply_filter(const std::string& name, const Value& v, CallArgs& a);
bool apply_test(const std::string& name, const Value& v, CallArgs& a);
Value call_value(const Value& f, CallArgs& a);  // f(...)

}  // namespace am::jinja::detail
