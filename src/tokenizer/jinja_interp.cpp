// Jinja2 tree-walking interpreter (see jinja_interp.h). Scoping follows Jinja2: `for` bodies, macros,
// call/filter/set blocks and `{% generation %}` get an inner scope (a `set` there does not leak out;
// namespace attributes do), `if` does not; each loop iteration starts from a fresh scope.
#include "tokenizer/jinja_interp.h"

#include <memory>
#include <unordered_map>

#include "core/error.h"
#include "tokenizer/jinja_builtins.h"

namespace am::jinja {

namespace {

using detail::EvalError;

struct Scope;
using ScopePtr = std::shared_ptr<Scope>;
struct Scope {
  std::unordered_map<std::string, Value> vars;
  ScopePtr parent;
  explicit Scope(ScopePtr p) : parent(std::move(p)) {}
  const Value* find(const std::string& n) const {
    for (const Scope* s = this; s; s = s->parent.get()) {
      auto it = s->vars.find(n);
      if (it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};

enum class Flow { Normal, Break, Continue };

class Interp {
 public:
  Interp(const std::string& name, const RenderOptions& opts)
      : budget_(make_budget(opts)), budget_scope_(budget_), name_(name), opts_(opts) {}
  ~Interp() {
    if (opts_.stats) {
      opts_.stats->steps = budget_.steps;
      opts_.stats->peak_memory = budget_.peak_memory;
    }
  }

  std::string run(const Body& body, const Value& context) {
    auto globals = std::make_shared<Scope>(nullptr);
    install_globals(*globals);
    root_ = std::make_shared<Scope>(globals);
    if (context.is_dict())
      for (const auto& kv : context.dict_data().items)
        if (kv.first.is_string()) root_->vars[kv.first.str()] = kv.second;
    std::string out;
    out_ = &out;
    Flow f = exec(body, root_);
    if (f != Flow::Normal) throw FormatError(where(name_, 1) + "'break' or 'continue' outside of a loop");
    return out;
  }

 private:
  // First members: installed before and removed after every value of the render exists.
  RenderBudget budget_;
  BudgetScope budget_scope_;
  const std::string& name_;
  const RenderOptions& opts_;
  ScopePtr root_;
  std::string* out_ = nullptr;
  size_t total_out_ = 0;
  int depth_ = 0;  // macro calls
  int nest_ = 0;   // evaluation recursion: expressions + statements (+ the macro calls among them)

  static RenderBudget make_budget(const RenderOptions& o) {
    RenderBudget b;
    b.max_steps = o.max_steps;
    b.max_memory = o.max_memory;
    b.max_value_bytes = o.max_value_bytes;
    return b;
  }

  [[noreturn]] void rethrow(const EvalError& e, int line) const {
    if (e.kind == EvalError::Kind::Unsupported) throw FormatError(where(name_, line) + e.what());
    throw DataError(where(name_, line) + e.what());
  }
  [[noreturn]] void data_error(int line, const std::string& msg) const { throw DataError(where(name_, line) + msg); }

  void emit(std::string_view s) {
    total_out_ += s.size();
    if (total_out_ > opts_.max_output) throw DataError(name_ + ": rendered output exceeds the size limit");
    out_->append(s);
  }

  // Renders `body` in `scope` into a fresh buffer.
  std::string capture(const Body& body, const ScopePtr& scope, int line) {
    std::string buf;
    std::string* saved = out_;
    out_ = &buf;
    Flow f;
    try {
      f = exec(body, scope);
    } catch (...) {
      out_ = saved;
      throw;
    }
    out_ = saved;
    if (f != Flow::Normal) throw FormatError(where(name_, line) + "'break' or 'continue' outside of a loop");
    return buf;
  }

  struct DepthGuard {
    Interp& in;
    DepthGuard(Interp& i, int line) : in(i) {
      if (++in.depth_ > in.opts_.max_call_depth) {
        --in.depth_;
        in.data_error(line, "maximum recursion depth exceeded (more than " + std::to_string(in.opts_.max_call_depth) +
                                " nested macro calls)");
      }
    }
    ~DepthGuard() { --in.depth_; }
  };

  // Bounds the interpreter's own recursion (the stack), whatever mix of tall expressions, nested
  // statements and macro calls causes it.
  struct NestGuard {
    Interp& in;
    NestGuard(Interp& i, int line) : in(i) {
      if (++in.nest_ > kMaxNesting) {
        --in.nest_;
        in.data_error(line, "template nested too deeply at run time (more than " + std::to_string(kMaxNesting) +
                                " levels of expressions, statements and macro calls)");
      }
    }
    ~NestGuard() { --in.nest_; }
  };

  // ------------------------------------------------------------ globals

  void install_globals(Scope& g) {
    g.vars["raise_exception"] = Value::func("raise_exception", [](CallArgs& a) -> Value {
      const Value* m = a.get(0, "message");
      throw EvalError(EvalError::Kind::Raise, m ? m->to_str() : std::string());
    });
    const RenderOptions* opts = &opts_;
    g.vars["strftime_now"] = Value::func("strftime_now", [opts](CallArgs& a) -> Value {
      const Value* f = a.get(0, "format");
      if (!f || !f->is_string()) detail::fail("strftime_now() needs a format string");
      std::tm tmv{};
      if (opts->now) {
        tmv = *opts->now;
      } else {
        std::time_t t = std::time(nullptr);
        localtime_r(&t, &tmv);
      }
      if (f->str().empty()) return Value("");
      if (f->str().size() > 4096) detail::fail_limit("strftime_now() format too long (more than 4096 bytes)");
      std::string buf(256 + f->str().size() * 8, '\0');
      size_t n = std::strftime(buf.data(), buf.size(), f->str().c_str(), &tmv);
      buf.resize(n);
      return Value(buf);
    });
    g.vars["namespace"] = Value::func("namespace", [](CallArgs& a) -> Value {
      Value ns = Value::ns();
      for (const auto& p : a.pos) {
        if (!p.is_dict()) detail::fail("namespace() positional argument must be a dict");
        for (const auto& kv : p.dict_data().items) ns.dict_data().set(kv.first, kv.second);
      }
      for (const auto& kv : a.kw) ns.dict_data().set(Value(kv.first), kv.second);
      return ns;
    });
    g.vars["dict"] = Value::func("dict", [](CallArgs& a) -> Value {
      Value d = Value::dict();
      for (const auto& p : a.pos) {
        if (p.is_dict()) {
          for (const auto& kv : p.dict_data().items) d.dict_data().set(kv.first, kv.second);
        } else {
          for (const auto& item : detail::iterate(p)) {
            std::vector<Value> kv = detail::iterate(item);
            if (kv.size() != 2) detail::fail("dictionary update sequence element has wrong length");
            d.dict_data().set(kv[0], kv[1]);
          }
        }
      }
      for (const auto& kv : a.kw) d.dict_data().set(Value(kv.first), kv.second);
      return d;
    });
    g.vars["range"] = Value::func("range", [](CallArgs& a) -> Value {
      if (a.pos.empty() || a.pos.size() > 3) detail::fail("range expected 1 to 3 arguments");
      auto num = [](const Value& v) -> int64_t {
        if (!(v.is_int() || v.is_bool())) detail::fail(std::string("'") + v.type_name() + "' object cannot be interpreted as an integer");
        return v.as_int();
      };
      int64_t start = 0, stop, step = 1;
      if (a.pos.size() == 1) {
        stop = num(a.pos[0]);
      } else {
        start = num(a.pos[0]);
        stop = num(a.pos[1]);
        if (a.pos.size() == 3) step = num(a.pos[2]);
      }
      if (step == 0) detail::fail("range() arg 3 must not be zero");
      // Exact item count (128-bit: stop - start may not fit 64 bits); `k += step` could overflow.
      __int128 span = step > 0 ? static_cast<__int128>(stop) - start : static_cast<__int128>(start) - stop;
      __int128 astep = step > 0 ? static_cast<__int128>(step) : -static_cast<__int128>(step);
      __int128 count = span > 0 ? (span - 1) / astep + 1 : 0;
      if (count > 1'000'000) detail::fail_limit("range() too large (more than 1000000 items)");
      std::vector<Value> out;
      out.reserve(static_cast<size_t>(count));
      for (__int128 i = 0; i < count; ++i) out.emplace_back(static_cast<int64_t>(start + i * step));
      return Value::list(std::move(out));
    });
    g.vars["joiner"] = Value::func("joiner", [](CallArgs& a) -> Value {
      const Value* s = a.get(0, "sep");
      std::string sep = s ? s->to_str() : ", ";
      auto used = std::make_shared<bool>(false);
      return Value::func("joiner", [sep, used](CallArgs&) -> Value {
        if (!*used) {
          *used = true;
          return Value("");
        }
        return Value(sep);
      });
    });
  }

  // ------------------------------------------------------------ statements

  Flow exec(const Body& body, const ScopePtr& scope) {
    for (const auto& n : body) {
      Flow f = exec_node(*n, scope);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  Flow exec_node(const Node& n, const ScopePtr& scope) {
    NestGuard g(*this, n.line);
    try {
      limits::tick();
      return exec_node_inner(n, scope);
    } catch (const EvalError& e) {
      rethrow(e, n.line);
    }
  }

  void bind_targets(const Node& n, const ScopePtr& scope, const Value& v) {
    if (!n.unpack) {
      scope->vars[n.targets[0]] = v;
      return;
    }
    if (v.is_undefined()) detail::fail_undefined(v);
    std::vector<Value> parts = detail::iterate(v);
    if (parts.size() != n.targets.size()) {
      if (parts.size() < n.targets.size())
        detail::fail("not enough values to unpack (expected " + std::to_string(n.targets.size()) + ", got " +
                     std::to_string(parts.size()) + ")");
      detail::fail("too many values to unpack (expected " + std::to_string(n.targets.size()) + ")");
    }
    for (size_t k = 0; k < parts.size(); ++k) scope->vars[n.targets[k]] = parts[k];
  }

  Flow exec_node_inner(const Node& n, const ScopePtr& scope) {
    switch (n.kind) {
      case Node::Kind::Text:
        emit(n.text);
        return Flow::Normal;
      case Node::Kind::Output: {
        Value v = eval(*n.expr, scope);
        if (v.is_string()) emit(v.str());
        else emit(v.to_str());
        return Flow::Normal;
      }
      case Node::Kind::If: {
        for (const auto& br : n.branches)
          if (eval(*br.first, scope).truthy()) return exec(br.second, scope);
        return exec(n.else_body, scope);
      }
      case Node::Kind::For: return exec_for(n, scope);
      case Node::Kind::Set: {
        Value v = eval(*n.expr, scope);
        if (!n.attr.empty()) {
          const Value* ns = scope->find(n.targets[0]);
          if (!ns || !ns->is_namespace()) data_error(n.line, "cannot assign attribute on non-namespace object");
          ns->dict_data().set(Value(n.attr), std::move(v));
          return Flow::Normal;
        }
        bind_targets(n, scope, v);
        return Flow::Normal;
      }
      case Node::Kind::SetBlock: {
        auto inner = std::make_shared<Scope>(scope);
        Value v(capture(n.body, inner, n.line));
        if (n.expr) v = eval_chain(*n.expr, v, scope);
        scope->vars[n.targets[0]] = v;
        return Flow::Normal;
      }
      case Node::Kind::Macro: {
        scope->vars[n.name] = make_macro(n, scope, n.name);
        return Flow::Normal;
      }
      case Node::Kind::CallBlock: {
        Value caller = make_macro(n, scope, "caller");
        const Expr& call = *n.expr;
        Value callee = eval(*call.args[0], scope);
        CallArgs a = eval_args(call, scope);
        a.kw.emplace_back("caller", caller);
        Value r;
        try {
          r = detail::call_value(callee, a);
        } catch (const EvalError& e) {
          rethrow(e, call.line);
        }
        emit(r.to_str());
        return Flow::Normal;
      }
      case Node::Kind::FilterBlock: {
        auto inner = std::make_shared<Scope>(scope);
        Value v(capture(n.body, inner, n.line));
        emit(eval_chain(*n.expr, v, scope).to_str());
        return Flow::Normal;
      }
      case Node::Kind::With: {
        auto inner = std::make_shared<Scope>(scope);
        for (size_t k = 0; k < n.targets.size(); ++k) inner->vars[n.targets[k]] = eval(*n.values[k], scope);
        return exec(n.body, inner);
      }
      case Node::Kind::Generation: {
        auto inner = std::make_shared<Scope>(scope);
        return exec(n.body, inner);
      }
      case Node::Kind::Break: return Flow::Break;
      case Node::Kind::Continue: return Flow::Continue;
    }
    return Flow::Normal;
  }

  Flow exec_for(const Node& n, const ScopePtr& scope) {
    Value seq = eval(*n.expr, scope);
    std::vector<Value> items = detail::iterate(seq);
    if (n.cond) {
      std::vector<Value> kept;
      for (auto& item : items) {
        auto s = std::make_shared<Scope>(scope);
        bind_targets(n, s, item);
        if (eval(*n.cond, s).truthy()) kept.push_back(std::move(item));
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      auto s = std::make_shared<Scope>(scope);
      exec(n.else_body, s);
      return Flow::Normal;
    }
    const size_t len = items.size();
    // loop.changed's state lives as long as the loop; the function only refers to it (a strong
    // reference would make `loop.changed(loop)` a reference cycle).
    auto last_changed = std::make_shared<std::vector<Value>>();
    auto have_changed = std::make_shared<bool>(false);
    std::weak_ptr<std::vector<Value>> last_w = last_changed;
    std::weak_ptr<bool> have_w = have_changed;
    for (size_t i = 0; i < len; ++i) {
      limits::tick(16);  // an iteration (its scope and loop object) costs about as much as 30 expression nodes
      auto s = std::make_shared<Scope>(scope);
      bind_targets(n, s, items[i]);
      Value loop = Value::ns();
      DictData& d = loop.dict_data();
      d.items.reserve(13);
      auto I = [](size_t v) { return Value(static_cast<int64_t>(v)); };
      d.set(Value("index"), I(i + 1));
      d.set(Value("index0"), I(i));
      d.set(Value("revindex"), I(len - i));
      d.set(Value("revindex0"), I(len - i - 1));
      d.set(Value("first"), Value(i == 0));
      d.set(Value("last"), Value(i + 1 == len));
      d.set(Value("length"), I(len));
      d.set(Value("depth"), I(1));
      d.set(Value("depth0"), I(0));
      if (i > 0) d.set(Value("previtem"), items[i - 1]);
      if (i + 1 < len) d.set(Value("nextitem"), items[i + 1]);
      d.set(Value("cycle"), Value::func("loop.cycle", [i](CallArgs& a) -> Value {
              if (a.pos.empty()) detail::fail("no items for cycling given");
              return a.pos[i % a.pos.size()];
            }));
      d.set(Value("changed"), Value::func("loop.changed", [last_w, have_w](CallArgs& a) -> Value {
              auto last_changed = last_w.lock();
              auto have_changed = have_w.lock();
              if (!last_changed || !have_changed) return Value(true);  // called after its loop ended
              bool same = *have_changed && last_changed->size() == a.pos.size();
              if (same)
                for (size_t k = 0; k < a.pos.size(); ++k)
                  if (!py_equal((*last_changed)[k], a.pos[k])) same = false;
              *last_changed = a.pos;
              *have_changed = true;
              return Value(!same);
            }));
      s->vars["loop"] = loop;
      Flow f = exec(n.body, s);
      if (f == Flow::Break) break;
    }
    return Flow::Normal;
  }

  Value make_macro(const Node& n, const ScopePtr& scope, const std::string& name) {
    std::weak_ptr<Scope> def = scope;
    const Node* node = &n;
    return Value::func(name, [this, node, def](CallArgs& a) -> Value {
      ScopePtr parent = def.lock();
      if (!parent) parent = root_;
      return call_macro(*node, parent, a);
    });
  }

  Value call_macro(const Node& n, const ScopePtr& parent, CallArgs& a) {
    DepthGuard g(*this, n.line);
    auto s = std::make_shared<Scope>(parent);
    std::vector<Value> varargs;
    Value kwargs = Value::dict();
    std::vector<bool> bound(n.params.size(), false);
    for (size_t k = 0; k < a.pos.size(); ++k) {
      if (k < n.params.size()) {
        s->vars[n.params[k]] = a.pos[k];
        bound[k] = true;
      } else {
        varargs.push_back(a.pos[k]);
      }
    }
    for (const auto& kv : a.kw) {
      if (kv.first == "caller") {
        s->vars["caller"] = kv.second;
        continue;
      }
      bool found = false;
      for (size_t k = 0; k < n.params.size(); ++k)
        if (n.params[k] == kv.first) {
          if (bound[k]) detail::fail("macro '" + n.name + "' got multiple values for argument '" + kv.first + "'");
          s->vars[kv.first] = kv.second;
          bound[k] = true;
          found = true;
        }
      if (!found) kwargs.dict_data().set(Value(kv.first), kv.second);
    }
    for (size_t k = 0; k < n.params.size(); ++k) {
      if (bound[k]) continue;
      if (n.defaults[k]) s->vars[n.params[k]] = eval(*n.defaults[k], s);
      else s->vars[n.params[k]] = Value::undefined("parameter '" + n.params[k] + "' was not provided");
    }
    s->vars["varargs"] = Value::list(std::move(varargs));
    s->vars["kwargs"] = kwargs;
    return Value(capture(n.body, s, n.line));
  }

  // ------------------------------------------------------------ expressions

  CallArgs eval_args(const Expr& e, const ScopePtr& scope, size_t first = 1) {
    CallArgs a;
    a.line = e.line;
    for (size_t k = first; k < e.args.size(); ++k) a.pos.push_back(eval(*e.args[k], scope));
    for (const auto& kv : e.kwargs) a.kw.emplace_back(kv.first, eval(*kv.second, scope));
    if (e.dyn_args) {
      Value v = eval(*e.dyn_args, scope);
      for (auto& x : detail::iterate(v)) a.pos.push_back(std::move(x));
    }
    if (e.dyn_kwargs) {
      Value v = eval(*e.dyn_kwargs, scope);
      if (!v.is_dict()) detail::fail(std::string("argument after ** must be a mapping, not ") + v.type_name());
      limits::tick(v.dict_data().size());
      for (const auto& kv : v.dict_data().items) {
        if (!kv.first.is_string()) detail::fail("keywords must be strings");
        a.kw.emplace_back(kv.first.str(), kv.second);
      }
    }
    return a;
  }

  // Applies a filter chain whose innermost subject is null (filter / set blocks) to `v`.
  Value eval_chain(const Expr& e, const Value& v, const ScopePtr& scope) {
    NestGuard g(*this, e.line);
    Value subject = e.args[0] ? eval_chain(*e.args[0], v, scope) : v;
    CallArgs a = eval_args(e, scope);
    try {
      return detail::apply_filter(e.name, subject, a);
    } catch (const EvalError& err) {
      rethrow(err, e.line);
    }
  }

  Value eval(const Expr& e, const ScopePtr& scope) {
    NestGuard g(*this, e.line);
    try {
      limits::tick();
      return eval_inner(e, scope);
    } catch (const EvalError& err) {
      rethrow(err, e.line);
    } catch (const std::invalid_argument& err) {
      data_error(e.line, err.what());
    }
  }

  bool compare(const std::string& op, const Value& a, const Value& b) {
    if (op == "==") return py_equal(a, b);
    if (op == "!=") return !py_equal(a, b);
    if (op == "in") return detail::contains(b, a);
    if (op == "notin") return !detail::contains(b, a);
    if (a.is_undefined()) detail::fail_undefined(a);
    if (b.is_undefined()) detail::fail_undefined(b);
    auto ord_fail = [&]() {
      detail::fail("'" + std::string(op) + "' not supported between instances of '" + a.type_name() + "' and '" +
                   b.type_name() + "'");
    };
    try {
      if (op == "<") return py_less(a, b);
      if (op == ">") return py_less(b, a);
      if (op == "<=") return py_less(a, b) || py_equal(a, b);
      if (op == ">=") return py_less(b, a) || py_equal(a, b);
    } catch (const std::invalid_argument&) {
      ord_fail();
    }
    detail::fail_unsupported("comparison operator '" + op + "'");
  }

  Value eval_inner(const Expr& e, const ScopePtr& scope) {
    using K = Expr::Kind;
    switch (e.kind) {
      case K::Const: return e.value;
      case K::Name: {
        const Value* v = scope->find(e.name);
        if (v) return *v;
        return Value::undefined("'" + e.name + "' is undefined");
      }
      case K::List: case K::Tuple: {
        std::vector<Value> items;
        items.reserve(e.args.size());
        for (const auto& x : e.args) items.push_back(eval(*x, scope));
        return e.kind == K::List ? Value::list(std::move(items)) : Value::tuple(std::move(items));
      }
      case K::Dict: {
        Value d = Value::dict();
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          Value key = eval(*e.args[k], scope);
          if (key.is_sequence_like() && key.is_list()) detail::fail("unhashable type: 'list'");
          if (key.is_dict()) detail::fail("unhashable type: 'dict'");
          d.dict_data().set(key, eval(*e.args[k + 1], scope));
        }
        return d;
      }
      case K::GetAttr: return detail::get_attr(eval(*e.args[0], scope), e.name);
      case K::GetItem: {
        Value obj = eval(*e.args[0], scope);
        return detail::get_item(obj, eval(*e.args[1], scope));
      }
      case K::Slice: {
        Value obj = eval(*e.args[0], scope);
        auto part = [&](size_t k) { return e.args[k] ? eval(*e.args[k], scope) : Value::none(); };
        Value a = part(1), b = part(2), c = part(3);
        return detail::slice(obj, a, b, c);
      }
      case K::Call: {
        Value callee = eval(*e.args[0], scope);
        CallArgs a = eval_args(e, scope);
        return detail::call_value(callee, a);
      }
      case K::Filter: {
        Value subject = eval(*e.args[0], scope);
        CallArgs a = eval_args(e, scope);
        return detail::apply_filter(e.name, subject, a);
      }
      case K::Test: {
        Value subject = eval(*e.args[0], scope);
        CallArgs a = eval_args(e, scope);
        bool r = detail::apply_test(e.name, subject, a);
        return Value(e.negated ? !r : r);
      }
      case K::Not: return Value(!eval(*e.args[0], scope).truthy());
      case K::Neg: return detail::negate(eval(*e.args[0], scope));
      case K::Pos: {
        Value v = eval(*e.args[0], scope);
        if (v.is_undefined()) detail::fail_undefined(v);
        if (!v.is_number()) detail::fail(std::string("bad operand type for unary +: '") + v.type_name() + "'");
        return v.is_bool() ? Value(v.as_int()) : v;
      }
      case K::Binary: {
        Value a = eval(*e.args[0], scope);
        Value b = eval(*e.args[1], scope);
        return detail::binary_op(e.name, a, b);
      }
      case K::Compare: {
        Value left = eval(*e.args[0], scope);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value right = eval(*e.args[k + 1], scope);
          if (!compare(e.ops[k], left, right)) return Value(false);
          left = std::move(right);
        }
        return Value(true);
      }
      case K::And: {
        Value a = eval(*e.args[0], scope);
        if (!a.truthy()) return a;
        return eval(*e.args[1], scope);
      }
      case K::Or: {
        Value a = eval(*e.args[0], scope);
        if (a.truthy()) return a;
        return eval(*e.args[1], scope);
      }
      case K::Cond: {
        if (eval(*e.args[0], scope).truthy()) return eval(*e.args[1], scope);
        if (e.args[2]) return eval(*e.args[2], scope);
        return Value::undefined("the inline if-expression evaluated to false and no else section was defined.");
      }
    }
    detail::fail_unsupported("expression");
  }
};

}  // namespace

// Every failure is an am::Error: the typed errors thrown by the lexer, parser and interpreter, and as
// a safety net anything else (std::bad_alloc, ...) turned into one naming the template.
Template::Template(std::string_view source, std::string name) : name_(std::move(name)) {
  try {
    body_ = parse(lex(source, name_), name_);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw FormatError(name_ + ": cannot parse the template: " + e.what());
  }
}

std::string Template::render(const Value& context, const RenderOptions& opts) const {
  try {
    Interp in(name_, opts);
    return in.run(body_, context);
  } catch (const Error&) {
    throw;
  } catch (const EvalError& e) {
    if (e.kind == EvalError::Kind::Unsupported) throw FormatError(name_ + ": " + e.what());
    throw DataError(name_ + ": " + e.what());
  } catch (const std::exception& e) {
    throw DataError(name_ + ": cannot render the template: " + e.what());
  }
}

}  // namespace am::jinja
