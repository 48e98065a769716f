// Jinja2 parser (see jinja_parser.h).
#include "tokenizer/jinja_parser.h"

#include <algorithm>
#include <cstring>
#include <set>

#include "core/error.h"

namespace am::jinja {

namespace {

constexpr int kMaxDepth = 200;  // recursion of the parser: nested blocks, brackets, unary operators

class Parser {
 public:
  Parser(const std::vector<Token>& toks, const std::string& name) : t_(toks), name_(name) {}

  Body parse_all() {
    Body body = parse_body({});
    if (cur().type != TokType::Eof) fail(cur().line, "unexpected tag");
    return body;
  }

 private:
  const std::vector<Token>& t_;
  const std::string& name_;
  size_t p_ = 0;
  int depth_ = 0;

  struct DepthGuard {
    Parser& p;
    explicit DepthGuard(Parser& pp, int line) : p(pp) {
      if (++p.depth_ > kMaxDepth) {
        --p.depth_;
        p.fail(line, "template nested too deeply (more than " + std::to_string(kMaxDepth) + " levels of blocks and brackets)");
      }
    }
    ~DepthGuard() { --p.depth_; }
  };

  [[noreturn]] void fail(int line, const std::string& msg) const { throw FormatError(where(name_, line) + msg); }

  const Token& cur() const { return t_[p_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(p_ + k, t_.size() - 1)]; }
  const Token& next() {
    const Token& t = t_[p_];
    if (p_ + 1 < t_.size()) ++p_;
    return t;
  }
  bool is_op(const char* op) const { return cur().type == TokType::Op && cur().text == op; }
  bool is_name(const char* n) const { return cur().type == TokType::Name && cur().text == n; }
  bool skip_op(const char* op) {
    if (!is_op(op)) return false;
    next();
    return true;
  }
  bool skip_name(const char* n) {
    if (!is_name(n)) return false;
    next();
    return true;
  }
  static std::string describe(const Token& t) {
    switch (t.type) {
      case TokType::Eof: return "end of template";
      case TokType::BlockEnd: return "end of statement block";
      case TokType::VarEnd: return "end of print statement";
      case TokType::String: return "string";
      case TokType::Int: case TokType::Float: return "number";
      default: return "'" + t.text + "'";
    }
  }
  void expect_op(const char* op) {
    if (!skip_op(op)) fail(cur().line, std::string("expected '") + op + "', got " + describe(cur()));
  }
  std::string expect_name() {
    if (cur().type != TokType::Name) fail(cur().line, "expected a name, got " + describe(cur()));
    return next().text;
  }
  void expect_block_end() {
    if (cur().type != TokType::BlockEnd) fail(cur().line, "expected end of statement block, got " + describe(cur()));
    next();
  }

  // ------------------------------------------------------------ statements

  // Parses nodes until a block tag whose keyword is in `ends` (left unconsumed: the cursor is on the
  // keyword) or the end of input.
  Body parse_body(const std::set<std::string>& ends) {
    DepthGuard g(*this, cur().line);
    Body body;
    while (true) {
      const Token& t = cur();
      if (t.type == TokType::Eof) {
        if (!ends.empty()) {
          std::string list;
          for (const auto& e : ends) list += (list.empty() ? "'" : " or '") + e + "'";
          fail(t.line, "unexpected end of template, expected " + list);
        }
        return body;
      }
      if (t.type == TokType::Text) {
        auto n = std::make_shared<Node>();
        n->kind = Node::Kind::Text;
        n->line = t.line;
        n->text = t.text;
        body.push_back(n);
        next();
        continue;
      }
      if (t.type == TokType::VarBegin) {
        next();
        auto n = std::make_shared<Node>();
        n->kind = Node::Kind::Output;
        n->line = t.line;
        n->expr = parse_tuple(false, true);
        if (cur().type != TokType::VarEnd) fail(cur().line, "expected end of print statement, got " + describe(cur()));
        next();
        body.push_back(n);
        continue;
      }
      if (t.type == TokType::BlockBegin) {
        const Token& kw = peek();
        if (kw.type != TokType::Name) fail(kw.line, "expected a statement name, got " + describe(kw));
        if (ends.count(kw.text)) {
          next();  // the cursor is now on the keyword
          return body;
        }
        next();
        body.push_back(parse_statement());
        continue;
      }
      fail(t.line, "unexpected " + describe(t));
    }
  }

  NodePtr parse_statement() {
    const Token& kw = cur();
    int line = kw.line;
    std::string k = kw.text;
    next();
    auto n = std::make_shared<Node>();
    n->line = line;
    if (k == "if") {
      n->kind = Node::Kind::If;
      ExprPtr c = parse_tuple(false, true);
      expect_block_end();
      while (true) {
        Body b = parse_body({"elif", "else", "endif"});
        n->branches.emplace_back(c, std::move(b));
        std::string e = next().text;
        if (e == "elif") {
          c = parse_tuple(false, true);
          expect_block_end();
          continue;
        }
        if (e == "else") {
          expect_block_end();
          n->else_body = parse_body({"endif"});
          next();
        }
        expect_block_end();
        break;
      }
      return n;
    }
    if (k == "for") {
      n->kind = Node::Kind::For;
      parse_targets(n.get(), "in");
      if (!skip_name("in")) fail(cur().line, "expected 'in', got " + describe(cur()));
      n->expr = parse_tuple(false, false);
      if (skip_name("if")) n->cond = parse_expression(true);
      if (is_name("recursive")) fail(cur().line, "unsupported: recursive for loops");
      expect_block_end();
      n->body = parse_body({"endfor", "else"});
      if (next().text == "else") {
        expect_block_end();
        n->else_body = parse_body({"endfor"});
        next();
      }
      expect_block_end();
      return n;
    }
    if (k == "set") {
      // set a = ..., set a, b = ..., set ns.attr = ..., or block set
      if (cur().type == TokType::Name && peek().type == TokType::Op && peek().text == "." &&
          peek(2).type == TokType::Name) {
        n->kind = Node::Kind::Set;
        n->targets.push_back(next().text);
        next();
        n->attr = next().text;
        expect_op("=");
        n->expr = parse_tuple(false, true);
        expect_block_end();
        return n;
      }
      parse_targets(n.get(), "=");
      if (skip_op("=")) {
        n->kind = Node::Kind::Set;
        n->expr = parse_tuple(false, true);
        expect_block_end();
        return n;
      }
      if (n->unpack) fail(cur().line, "expected '=' in set statement");
      n->kind = Node::Kind::SetBlock;
      if (is_op("|")) n->expr = parse_filter_chain(nullptr);
      expect_block_end();
      n->body = parse_body({"endset"});
      next();
      expect_block_end();
      return n;
    }
    if (k == "macro") {
      n->kind = Node::Kind::Macro;
      n->name = expect_name();
      parse_signature(n.get());
      expect_block_end();
      n->body = parse_body({"endmacro"});
      next();
      if (cur().type == TokType::Name) next();  // tolerate `endmacro name`
      expect_block_end();
      return n;
    }
    if (k == "call") {
      n->kind = Node::Kind::CallBlock;
      if (is_op("(")) parse_signature(n.get());
      n->expr = parse_expression(true);
      if (n->expr->kind != Expr::Kind::Call) fail(line, "expected a call expression in call block");
      expect_block_end();
      n->body = parse_body({"endcall"});
      next();
      expect_block_end();
      return n;
    }
    if (k == "filter") {
      n->kind = Node::Kind::FilterBlock;
      n->expr = parse_filter_chain(nullptr, /*first_without_pipe=*/true);
      expect_block_end();
      n->body = parse_body({"endfilter"});
      next();
      expect_block_end();
      return n;
    }
    if (k == "with") {
      n->kind = Node::Kind::With;
      while (cur().type != TokType::BlockEnd) {
        if (!n->targets.empty()) expect_op(",");
        n->targets.push_back(expect_name());
        expect_op("=");
        n->values.push_back(parse_expression(true));
      }
      expect_block_end();
      n->body = parse_body({"endwith"});
      next();
      expect_block_end();
      return n;
    }
    if (k == "generation") {
      n->kind = Node::Kind::Generation;
      expect_block_end();
      n->body = parse_body({"endgeneration"});
      next();
      expect_block_end();
      return n;
    }
    if (k == "break" || k == "continue") {
      n->kind = k == "break" ? Node::Kind::Break : Node::Kind::Continue;
      expect_block_end();
      return n;
    }
    static const std::set<std::string> end_words = {"endif", "endfor", "endset", "endmacro", "endcall", "endfilter",
                                                     "endwith", "endgeneration", "elif", "else", "endraw"};
    if (end_words.count(k)) fail(line, "unexpected '" + k + "' tag");
    fail(line, "unsupported tag '" + k + "'");
  }

  // Names separated by commas (optionally parenthesized), up to `stop` (a name) or '='.
  void parse_targets(Node* n, const char* stop) {
    bool paren = skip_op("(");
    while (true) {
      n->targets.push_back(expect_name());
      if (!skip_op(",")) break;
      n->unpack = true;
      if (paren && is_op(")")) break;
      if (!paren && (is_name(stop) || is_op("="))) break;  // trailing comma
    }
    if (paren) {
      expect_op(")");
      n->unpack = true;
    }
  }

  void parse_signature(Node* n) {
    expect_op("(");
    while (!is_op(")")) {
      if (!n->params.empty()) expect_op(",");
      if (is_op(")")) break;
      n->params.push_back(expect_name());
      n->defaults.push_back(skip_op("=") ? parse_expression(true) : nullptr);
    }
    expect_op(")");
  }

  // ------------------------------------------------------------ expressions

  ExprPtr mk(Expr::Kind k, int line) {
    auto e = std::make_shared<Expr>();
    e->kind = k;
    e->line = line;
    return e;
  }

  // Called on every node with children once they are attached: records the subtree's height and
  // rejects trees taller than kMaxExprHeight. Chains (`a|f|f|...`, `x.y.y...`, `a ~ b ~ ...`) are
  // parsed by loops, not recursion, so only this bounds the recursion of evaluating them.
  ExprPtr seal(ExprPtr e) {
    int h = 0;
    for (const auto& a : e->args)
      if (a) h = std::max(h, a->height);
    for (const auto& kv : e->kwargs) h = std::max(h, kv.second->height);
    if (e->dyn_args) h = std::max(h, e->dyn_args->height);
    if (e->dyn_kwargs) h = std::max(h, e->dyn_kwargs->height);
    e->height = h + 1;
    if (e->height > kMaxExprHeight)
      fail(e->line, "expression nested too deeply (more than " + std::to_string(kMaxExprHeight) +
                        " levels of operators, filters, attributes, calls or brackets)");
    return e;
  }

  // expression [, expression ...] -> Tuple when there is a comma
  ExprPtr parse_tuple(bool explicit_parens, bool with_condexpr) {
    int line = cur().line;
    std::vector<ExprPtr> items;
    bool comma = false;
    while (true) {
      if (!items.empty()) {
        if (!skip_op(",")) break;
        comma = true;
      }
      if (is_tuple_end(explicit_parens)) break;
      items.push_back(parse_expression(with_condexpr));
    }
    if (!comma) {
      if (!items.empty()) return items[0];
      if (!explicit_parens) fail(cur().line, "expected an expression, got " + describe(cur()));
    }
    auto e = mk(Expr::Kind::Tuple, line);
    e->args = std::move(items);
    return seal(e);
  }

  bool is_tuple_end(bool explicit_parens) const {
    const Token& t = cur();
    if (t.type == TokType::VarEnd || t.type == TokType::BlockEnd || t.type == TokType::Eof) return true;
    if (explicit_parens) return t.type == TokType::Op && t.text == ")";
    return t.type == TokType::Name && (t.text == "in" || t.text == "if");
  }

  ExprPtr parse_expression(bool with_condexpr) {
    DepthGuard g(*this, cur().line);
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  ExprPtr parse_condexpr() {
    ExprPtr e1 = parse_or();
    while (is_name("if")) {
      int line = next().line;
      DepthGuard g(*this, line);  // `a if b else c if d else ...` recurses
      ExprPtr c = parse_or();
      ExprPtr e3;
      if (skip_name("else")) e3 = parse_condexpr();
      auto e = mk(Expr::Kind::Cond, line);
      e->args = {c, e1, e3};
      e1 = seal(e);
    }
    return e1;
  }

  ExprPtr parse_or() {
    ExprPtr l = parse_and();
    while (is_name("or")) {
      int line = next().line;
      auto e = mk(Expr::Kind::Or, line);
      e->args = {l, parse_and()};
      l = seal(e);
    }
    return l;
  }

  ExprPtr parse_and() {
    ExprPtr l = parse_not();
    while (is_name("and")) {
      int line = next().line;
      auto e = mk(Expr::Kind::And, line);
      e->args = {l, parse_not()};
      l = seal(e);
    }
    return l;
  }

  ExprPtr parse_not() {
    if (is_name("not")) {
      int line = next().line;
      DepthGuard g(*this, line);
      auto e = mk(Expr::Kind::Not, line);
      e->args = {parse_not()};
      return seal(e);
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    int line = cur().line;
    ExprPtr first = parse_math1();
    ExprPtr cmp;
    while (true) {
      std::string op;
      const Token& t = cur();
      if (t.type == TokType::Op &&
          (t.text == "==" || t.text == "!=" || t.text == "<" || t.text == "<=" || t.text == ">" || t.text == ">=")) {
        op = t.text;
        next();
      } else if (is_name("in")) {
        op = "in";
        next();
      } else if (is_name("not") && peek().type == TokType::Name && peek().text == "in") {
        op = "notin";
        next();
        next();
      } else {
        break;
      }
      if (!cmp) {
        cmp = mk(Expr::Kind::Compare, line);
        cmp->args.push_back(first);
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? seal(cmp) : first;
  }

  ExprPtr binary(const std::string& op, ExprPtr l, ExprPtr r, int line) {
    auto e = mk(Expr::Kind::Binary, line);
    e->name = op;
    e->args = {std::move(l), std::move(r)};
    return seal(e);
  }

  ExprPtr parse_math1() {
    ExprPtr l = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Token& t = next();
      l = binary(t.text, l, parse_concat(), t.line);
    }
    return l;
  }

  ExprPtr parse_concat() {
    ExprPtr l = parse_math2();
    while (is_op("~")) {
      int line = next().line;
      l = binary("~", l, parse_math2(), line);
    }
    return l;
  }

  ExprPtr parse_math2() {
    ExprPtr l = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token& t = next();
      l = binary(t.text, l, parse_pow(), t.line);
    }
    return l;
  }

  ExprPtr parse_pow() {
    ExprPtr l = parse_unary(true);
    while (is_op("**")) {
      int line = next().line;
      ExprPtr r = parse_unary(true);
      // Jinja2 folds `-<number>` into a constant and writes it into Python source unparenthesized,
      // so `-2 ** 2` evaluates as -(2 ** 2). Mirror that.
      if (l->kind == Expr::Kind::Neg && l->args[0]->kind == Expr::Kind::Const && l->args[0]->value.is_number() &&
          !l->args[0]->value.is_bool() && !is_const(*r)) {
        auto neg = mk(Expr::Kind::Neg, l->line);
        neg->args = {binary("**", l->args[0], r, line)};
        l = seal(neg);
      } else {
        l = binary("**", l, r, line);
      }
    }
    return l;
  }

  // Whether Jinja2's optimizer would fold `e` into a constant (then `-2 ** e` is computed properly).
  static bool is_const(const Expr& e) {
    using K = Expr::Kind;
    switch (e.kind) {
      case K::Const: return true;
      case K::Name: case K::Call: return false;
      default:
        for (const auto& a : e.args)
          if (a && !is_const(*a)) return false;
        for (const auto& kv : e.kwargs)
          if (!is_const(*kv.second)) return false;
        return !e.dyn_args && !e.dyn_kwargs;
    }
  }

  ExprPtr parse_unary(bool with_filter) {
    DepthGuard g(*this, cur().line);
    ExprPtr node;
    if (is_op("-") || is_op("+")) {
      const Token& t = next();
      node = mk(t.text == "-" ? Expr::Kind::Neg : Expr::Kind::Pos, t.line);
      node->args = {parse_unary(false)};
      node = seal(node);
    } else {
      node = parse_primary();
    }
    node = parse_postfix(node);
    if (with_filter) node = parse_filter_expr(node);
    return node;
  }

  ExprPtr parse_primary() {
    const Token& t = cur();
    int line = t.line;
    switch (t.type) {
      case TokType::Name: {
        next();
        const std::string& n = t.text;
        if (n == "true" || n == "True") return constant(Value(true), line);
        if (n == "false" || n == "False") return constant(Value(false), line);
        if (n == "none" || n == "None") return constant(Value::none(), line);
        auto e = mk(Expr::Kind::Name, line);
        e->name = n;
        return e;
      }
      case TokType::String: {
        std::string s = next().text;
        while (cur().type == TokType::String) s += next().text;
        return constant(Value(std::move(s)), line);
      }
      case TokType::Int: return constant(Value(next().ival), line);
      case TokType::Float: return constant(Value(next().fval), line);
      case TokType::Op: {
        if (t.text == "(") {
          next();
          ExprPtr e = parse_tuple(true, true);
          expect_op(")");
          return e;
        }
        if (t.text == "[") {
          next();
          auto e = mk(Expr::Kind::List, line);
          while (!is_op("]")) {
            if (!e->args.empty()) expect_op(",");
            if (is_op("]")) break;
            e->args.push_back(parse_expression(true));
          }
          expect_op("]");
          return seal(e);
        }
        if (t.text == "{") {
          next();
          auto e = mk(Expr::Kind::Dict, line);
          while (!is_op("}")) {
            if (!e->args.empty()) expect_op(",");
            if (is_op("}")) break;
            e->args.push_back(parse_expression(true));
            expect_op(":");
            e->args.push_back(parse_expression(true));
          }
          expect_op("}");
          return seal(e);
        }
        break;
      }
      default: break;
    }
    fail(line, "unexpected " + describe(t));
  }

  ExprPtr constant(Value v, int line) {
    auto e = mk(Expr::Kind::Const, line);
    e->value = std::move(v);
    return e;
  }

  ExprPtr parse_postfix(ExprPtr node) {
    while (true) {
      if (is_op(".")) {
        int line = next().line;
        if (cur().type == TokType::Name) {
          auto e = mk(Expr::Kind::GetAttr, line);
          e->name = next().text;
          e->args = {node};
          node = seal(e);
        } else if (cur().type == TokType::Int) {
          auto e = mk(Expr::Kind::GetItem, line);
          e->args = {node, constant(Value(next().ival), line)};
          node = seal(e);
        } else {
          fail(line, "expected a name after '.', got " + describe(cur()));
        }
      } else if (is_op("[")) {
        node = parse_subscript(node);
      } else if (is_op("(")) {
        node = parse_call(node);
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr node) {
    int line = next().line;  // '['
    std::vector<ExprPtr> parts;  // for a slice: start, stop, step
    bool slice = false;
    ExprPtr single;
    std::vector<ExprPtr> items;
    bool tuple = false;
    while (true) {
      ExprPtr item;
      bool is_slice = false;
      ExprPtr a, b, c;
      if (!is_op(":")) {
        if (is_op("]")) break;
        a = parse_expression(true);
      }
      if (skip_op(":")) {
        is_slice = true;
        if (!is_op("]") && !is_op(",") && !is_op(":")) b = parse_expression(true);
        if (skip_op(":")) {
          if (!is_op("]") && !is_op(",")) c = parse_expression(true);
        }
      }
      if (is_slice) {
        if (!items.empty() || tuple) fail(line, "unsupported: slices inside a tuple subscript");
        slice = true;
        parts = {a, b, c};
      } else {
        items.push_back(a);
      }
      if (!skip_op(",")) break;
      if (slice) fail(line, "unsupported: slices inside a tuple subscript");
      tuple = true;
    }
    expect_op("]");
    if (slice) {
      auto e = mk(Expr::Kind::Slice, line);
      e->args = {node, parts[0], parts[1], parts[2]};
      return seal(e);
    }
    if (items.empty()) fail(line, "expected an expression in subscript");
    auto e = mk(Expr::Kind::GetItem, line);
    if (tuple) {
      auto t = mk(Expr::Kind::Tuple, line);
      t->args = items;
      e->args = {node, seal(t)};
    } else {
      e->args = {node, items[0]};
    }
    (void)single;
    return seal(e);
  }

  void parse_call_args(Expr* e) {
    expect_op("(");
    bool first = true;
    while (!is_op(")")) {
      if (!first) expect_op(",");
      first = false;
      if (is_op(")")) break;
      if (is_op("*")) {
        if (e->dyn_args || e->dyn_kwargs) fail(cur().line, "invalid syntax for function call expression");
        next();
        e->dyn_args = parse_expression(true);
        continue;
      }
      if (is_op("**")) {
        if (e->dyn_kwargs) fail(cur().line, "invalid syntax for function call expression");
        next();
        e->dyn_kwargs = parse_expression(true);
        continue;
      }
      if (e->dyn_args || e->dyn_kwargs) fail(cur().line, "invalid syntax for function call expression");
      if (cur().type == TokType::Name && peek().type == TokType::Op && peek().text == "=") {
        std::string k = next().text;
        next();
        e->kwargs.emplace_back(k, parse_expression(true));
      } else {
        if (!e->kwargs.empty()) fail(cur().line, "positional argument follows keyword argument");
        e->args.push_back(parse_expression(true));
      }
    }
    expect_op(")");
  }

  ExprPtr parse_call(ExprPtr node) {
    auto e = mk(Expr::Kind::Call, cur().line);
    e->args.push_back(node);
    parse_call_args(e.get());
    return seal(e);
  }

  ExprPtr parse_filter_expr(ExprPtr node) {
    while (true) {
      if (is_op("|")) {
        node = parse_filter_chain(node, false, true);
      } else if (is_name("is")) {
        node = parse_test(node);
      } else if (is_op("(")) {
        node = parse_call(node);
      } else {
        return node;
      }
    }
  }

  // | f(args) | g ... ; with single=true only one filter is parsed.
  ExprPtr parse_filter_chain(ExprPtr node, bool first_without_pipe = false, bool single = false) {
    bool first = true;
    while (true) {
      if (!(first && first_without_pipe)) {
        if (!skip_op("|")) break;
      }
      first = false;
      int line = cur().line;
      std::string fname = expect_name();
      while (is_op(".") && peek().type == TokType::Name) {
        next();
        fname += "." + next().text;
      }
      if (!known_filter(fname)) fail(line, "unsupported filter '" + fname + "'");
      auto e = mk(Expr::Kind::Filter, line);
      e->name = fname;
      e->args.push_back(node);
      if (is_op("(")) parse_call_args(e.get());
      node = seal(e);
      if (single) break;
    }
    return node;
  }

  ExprPtr parse_test(ExprPtr node) {
    int line = next().line;  // 'is'
    bool neg = skip_name("not");
    std::string tname = expect_name();
    while (is_op(".") && peek().type == TokType::Name) {
      next();
      tname += "." + next().text;
    }
    if (!known_test(tname)) fail(line, "unsupported test '" + tname + "'");
    auto e = mk(Expr::Kind::Test, line);
    e->name = tname;
    e->negated = neg;
    e->args.push_back(node);
    const Token& t = cur();
    if (is_op("(")) {
      parse_call_args(e.get());
    } else if ((t.type == TokType::Name || t.type == TokType::String || t.type == TokType::Int ||
                t.type == TokType::Float || (t.type == TokType::Op && (t.text == "[" || t.text == "{"))) &&
               !(t.type == TokType::Name && (t.text == "else" || t.text == "or" || t.text == "and"))) {
      if (t.type == TokType::Name && t.text == "is") fail(t.line, "you cannot chain multiple tests with is");
      ExprPtr arg = parse_postfix(parse_primary());
      e->args.push_back(arg);
    }
    return seal(e);
  }
};

}  // namespace

Body parse(const std::vector<Token>& tokens, const std::string& name) {
  Parser p(tokens, name);
  return p.parse_all();
}

bool known_filter(const std::string& n) {
  static const std::set<std::string> names = {
      "abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e", "escape",
      "first", "float", "forceescape", "format", "groupby", "indent", "int", "items", "join", "last",
      "length", "list", "lower", "map", "max", "min", "reject", "rejectattr", "replace", "reverse",
      "round", "safe", "select", "selectattr", "slice", "sort", "string", "striptags", "sum", "title",
      "tojson", "trim", "truncate", "unique", "upper", "wordcount", "wordwrap", "pprint", "urlencode",
      "xmlattr", "filesizeformat", "center"};
  return names.count(n) > 0;
}

bool known_test(const std::string& n) {
  static const std::set<std::string> names = {
      "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "==", "escaped", "even", "false",
      "filter", "float", "ge", ">=", "gt", "greaterthan", ">", "in", "integer", "iterable", "le", "<=",
      "lower", "lt", "lessthan", "<", "mapping", "ne", "!=", "none", "number", "odd", "sameas",
      "sequence", "string", "test", "true", "undefined", "upper"};
  return names.count(n) > 0;
}

}  // namespace am::jinja
