// Internal to the builtin files of the Jinja2 interpreter (jinja_builtins.cpp, jinja_methods.cpp,
// jinja_filters.cpp, jinja_text.cpp): the helpers more than one of them uses. Nothing outside tokenizer/jinja_*
// includes this.
#pragma once
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <utf8proc.h>

#include "tokenizer/jinja_builtins.h"

namespace am::jinja::detail::bi {

// ---- jinja_text.cpp: Python str semantics ----
std::string obj_desc(const Value& v);                    // "'<type> object'" as Python's messages write it
void check_size(size_t n, const char* what = "string");  // kMaxValueBytes limit (EvalError)
size_t list_bytes(size_t items);                         // bytes of a list of `items` Values (overflow-checked)
utf8proc_category_t cat(char32_t c);                     // Unicode general category
bool is_alpha(char32_t c);
bool is_decimal(char32_t c);
bool is_numeric_cp(char32_t c);
bool is_word_cp(char32_t c);                             // \w: '_', letters, numerics
void append_cased(std::string& out, char32_t c, int mode);  // mode 0 upper, 1 lower, 2 title (full mappings)
std::string str_upper(const std::string& s);
std::string str_lower(const std::string& s);
std::string str_capitalize(const std::string& s);
std::string str_title(const std::string& s);             // Python str.title()
std::string jinja_title(const std::string& s);           // Jinja's |title (word starts after space/bracket)
bool str_is(const std::string& s, bool (*pred)(char32_t));  // non-empty and every code point satisfies pred
bool str_islower(const std::string& s, bool want_lower);    // str.islower() / str.isupper()
const std::string& need_str(const Value& v, const char* what);  // else EvalError "<what> must be str"
int64_t need_int(const Value& v, const char* what);
bool arg_bool(const CallArgs& a, size_t i, const char* name, bool def);
std::string replace_all(const std::string& s, const std::string& old, const std::string& nw, int64_t count);
std::vector<Value> str_split(const std::string& s, const Value* sep, int64_t maxsplit, bool from_right);
std::vector<Value> str_splitlines(const std::string& s, bool keepends);
// Python slice semantics: the positions obj[start:stop:step] visits in a sequence of length len.
std::vector<size_t> slice_positions(int64_t len, const Value& start, const Value& stop, const Value& step);
std::string html_escape(const std::string& s);
std::string str_format(const std::string& f, const CallArgs& a);  // str.format(*args, **kwargs)
std::string percent_format(const std::string& f, const std::vector<Value>& args, const Value* mapping);  // f % args

// ---- jinja_builtins.cpp: operators ----
[[noreturn]] void bad_operands(const std::string& op, const Value& a, const Value& b);  // TypeError text
int64_t checked(long double r, const char* op = "int()");  // integral float -> int64, else overflow EvalError

// ---- jinja_methods.cpp: sandboxed lookups ----
std::string pad_str(const std::string& s, int64_t width, const std::string& fill, char how);  // center/ljust/rjust
Value unsafe(const Value& obj, const std::string& name);         // the sandbox's "access to attribute ... is unsafe"
Value missing_attr(const Value& obj, const std::string& name);   // Undefined naming the missing attribute
bool py_getattr(const Value& obj, const std::string& name, Value& out);  // false: no such attribute
bool py_getitem(const Value& obj, const Value& key, Value& out);         // false: no such item

}  // namespace am::jinja::detail::bi
