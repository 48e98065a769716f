// Values of the Jinja2 interpreter used for chat templates, with Python semantics: truthiness,
// equality and ordering, str() / repr() printing (None, True, 1.0, ['a']), json.dumps for `tojson`.
// Lists and dicts have reference semantics (like Python objects); dicts keep insertion order. Strings
// are immutable and long ones are shared between copies. The memory of what a render creates is
// accounted against its budget (jinja_limits.h).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/jinja_limits.h"

namespace am::jinja {

class Value;
struct ListData;
struct DictData;
struct FuncData;
struct CallArgs;

// The bytes of a long string, shared by the copies of a Value (copying a Value never copies a long
// string: a template cannot multiply memory by copying). Charged to the render that created it.
struct StrData {
  explicit StrData(std::string text);
  ~StrData();
  StrData(const StrData&) = delete;
  StrData& operator=(const StrData&) = delete;
  std::string s;
  size_t charged = 0;
};

using Builtin = std::function<Value(CallArgs&)>;

class Value {
 public:
  // Iterator: a single-pass generator (what Jinja's map/select/... filters return): always true,
  // no len(), empty once iterated.
  enum class Type { Undefined, None, Bool, Int, Float, String, List, Tuple, Dict, Namespace, Func, Iterator };

  Value() = default;  // undefined
  static Value undefined(std::string hint = {}, bool unsafe = false);
  static Value none();
  Value(bool b);
  Value(int v) : Value(static_cast<int64_t>(v)) {}
  Value(int64_t v);
  Value(double v);
  Value(std::string s);
  Value(const char* s) : Value(std::string(s)) {}
  // markupsafe.Markup: a str that `+` keeps safe by HTML-escaping plain str operands (what |safe and
  // |escape return).
  static Value markup(std::string s);
  static Value list(std::vector<Value> items = {});
  static Value tuple(std::vector<Value> items);
  static Value iterator(std::vector<Value> items, std::string kind = "generator");
  static Value view(std::vector<Value> items, std::string kind);  // dict_items / dict_keys / dict_values
  static Value dict();
  static Value ns();
  static Value func(std::string name, Builtin fn);

  Type type() const { return type_; }
  bool is_undefined() const { return type_ == Type::Undefined; }
  bool is_none() const { return type_ == Type::None; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_int() const { return type_ == Type::Int; }      // not bool
  bool is_float() const { return type_ == Type::Float; }
  bool is_number() const { return type_ == Type::Int || type_ == Type::Float || type_ == Type::Bool; }
  bool is_string() const { return type_ == Type::String; }
  bool is_list() const { return type_ == Type::List; }
  bool is_tuple() const { return type_ == Type::Tuple; }
  bool is_sequence_like() const { return type_ == Type::List || type_ == Type::Tuple; }
  bool is_dict() const { return type_ == Type::Dict; }
  bool is_namespace() const { return type_ == Type::Namespace; }
  bool is_func() const { return type_ == Type::Func; }
  bool is_iterator() const { return type_ == Type::Iterator; }
  bool is_view() const;

  bool as_bool() const { return b_; }
  int64_t as_int() const { return type_ == Type::Bool ? (b_ ? 1 : 0) : i_; }  // Int or Bool
  double as_double() const;                                                   // any number
  // String; Undefined: the hint.
  const std::string& str() const { return has_text_object() ? static_cast<const StrData*>(obj_.get())->s : s_; }
  bool unsafe() const { return b_ && type_ == Type::Undefined; }
  bool is_markup() const { return b_ && type_ == Type::String; }
  ListData& list_data() const { return *static_cast<ListData*>(obj_.get()); }  // List, Tuple, Iterator
  DictData& dict_data() const { return *static_cast<DictData*>(obj_.get()); }  // Dict, Namespace
  const FuncData& func_data() const { return *static_cast<const FuncData*>(obj_.get()); }
  const void* identity() const;

  bool truthy() const;
  // Python str(): Undefined -> "", None -> "None", True -> "True", 1.0 -> "1.0", lists/dicts as repr.
  std::string to_str() const;
  // Python repr().
  std::string repr() const;
  // Python type name, for error messages ("str", "int", "NoneType", "dict", ...).
  const char* type_name() const;

  // Throws am::DataError for a document nested deeper than kMaxValueDepth.
  static Value from_json(const nlohmann::ordered_json& j);
  static Value from_json(const nlohmann::json& j);

  // Whether destroying this value may release a list / dict / function (see ListData::~ListData).
  bool holds_objects() const { return obj_ && !has_text_object(); }

 private:
  Type type_ = Type::Undefined;
  bool b_ = false;
  union {
    int64_t i_ = 0;  // Int
    double f_;       // Float
  };
  std::string s_;  // String / Undefined hint up to kInlineText bytes
  // The shared object: a longer string's StrData (String, Undefined), ListData (List, Tuple,
  // Iterator), DictData (Dict, Namespace) or FuncData (Func).
  std::shared_ptr<void> obj_;
  static constexpr size_t kInlineText = 15;  // what std::string keeps without allocating
  void set_text(std::string s);
  bool has_text_object() const { return obj_ && (type_ == Type::String || type_ == Type::Undefined); }
  ListData& list_() const { return list_data(); }
  DictData& dict_() const { return dict_data(); }
};

// Lists, tuples, iterators: their slots are charged to the render that created them (see jinja_limits.h).
// The destructors of ListData / DictData release nested containers iteratively, so that destroying a
// value nested a million levels deep does not overflow the stack.
struct ListData {
  ListData() = default;
  ~ListData();
  ListData(const ListData&) = delete;
  ListData& operator=(const ListData&) = delete;
  std::vector<Value> items;
  size_t charged = 0;
  bool consumed = false;  // Iterator only
  // Iterator: its Python type ("generator", "list_reverseiterator"); List: "" or, for the views
  // dict.items() / keys() / values() return, "dict_items" / "dict_keys" / "dict_values".
  std::string kind;
  std::string error;  // Iterator only: a lazily raised error (Python raises when it is iterated)
};

// Insertion-ordered mapping. String keys are indexed; other keys (rare) are found by a scan.
struct DictData {
  DictData() = default;
  ~DictData();
  DictData(const DictData&) = delete;
  DictData& operator=(const DictData&) = delete;
  std::vector<std::pair<Value, Value>> items;
  std::unordered_map<std::string, size_t> index;
  size_t charged = 0;

  const Value* find(const Value& key) const;
  const Value* find(const std::string& key) const;
  void set(const Value& key, Value v);
  size_t size() const { return items.size(); }
};

struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  int line = 0;
  // The argument at position i, or keyword `name`, or nullptr.
  const Value* get(size_t i, const char* name) const;
};

struct FuncData {
  std::string name;
  Builtin fn;
};

// Python semantics.
bool py_equal(const Value& a, const Value& b);
// a < b; throws std::invalid_argument("'<' not supported between instances of 'x' and 'y'").
bool py_less(const Value& a, const Value& b);
std::string py_float_repr(double d);
std::string py_str_repr(std::string_view s);

// json.dumps(v, ensure_ascii=False, indent=indent, separators=..., sort_keys=sort_keys); indent < 0:
// None. `indent_str` replaces the spaces when the caller passed a string indent.
// Throws std::invalid_argument for values JSON cannot hold (undefined, functions, namespaces).
std::string to_json(const Value& v, int indent = -1, bool sort_keys = false,
                    const std::string* item_sep = nullptr, const std::string* key_sep = nullptr,
                    const std::string* indent_str = nullptr);

// ---- UTF-8 helpers (code point based, as Python str) ----
std::u32string utf8_decode(std::string_view s);
// Decodes the code point at s[i] (as utf8_decode does: an invalid byte is a code point of its own);
// returns where the next one starts.
size_t utf8_next(std::string_view s, size_t i, char32_t& cp);
std::string utf8_encode(std::u32string_view s);
void utf8_append(std::string& out, char32_t cp);
size_t utf8_length(std::string_view s);
bool py_isspace(char32_t c);
std::string py_strip(std::string_view s, bool left, bool right, const std::string* chars = nullptr);

}  // namespace am::jinja
