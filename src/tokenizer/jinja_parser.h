// Jinja2 parser: tokens -> syntax tree, with Jinja2's operator precedence
// (condexpr < or < and < not < comparisons < + - < ~ < * / // % < ** < unary/postfix/filters/tests).
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tokenizer/jinja_lexer.h"
#include "tokenizer/jinja_value.h"

namespace am::jinja {

struct Expr;
using ExprPtr = std::shared_ptr<Expr>;

struct Expr {
  enum class Kind {
    Const,     // value
    Name,      // name
    List,      // args
    Tuple,     // args
    Dict,      // args: k0, v0, k1, v1, ...
    GetAttr,   // args[0] . name
    GetItem,   // args[0] [ args[1] ]
    Slice,     // args[0] [ args[1] : args[2] : args[3] ] (null = omitted)
    Call,      // args[0] ( args[1..], kwargs )
    Filter,    // args[0] | name ( args[1..], kwargs ); args[0] null inside {% filter %}
    Test,      // args[0] is [not] name ( args[1..], kwargs )
    Not,       // not args[0]
    Neg,       // - args[0]
    Pos,       // + args[0]
    Binary,    // args[0] op args[1]; op in + - * / // % ** ~
    Compare,   // args[0] ops[0] args[1] ops[1] args[2] ...; ops in == != < <= > >= in notin
    And,       // args[0] and args[1]
    Or,        // args[0] or args[1]
    Cond,      // args[1] if args[0] else args[2] (args[2] null = undefined)
  };
  Kind kind = Kind::Const;
  int line = 0;
  Value value;
  std::string name;  // Name / GetAttr attribute / Filter / Test / Binary op
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  ExprPtr dyn_args, dyn_kwargs;  // Call / Filter / Test: f(*dyn_args, **dyn_kwargs)
  std::vector<std::string> ops;
  bool negated = false;  // `is not`
  int height = 1;        // of this subtree (<= kMaxExprHeight, checked while parsing)
};

struct Node;
using NodePtr = std::shared_ptr<Node>;
using Body = std::vector<NodePtr>;

struct Node {
  enum class Kind {
    Text,         // text
    Output,       // {{ expr }}
    If,           // branches (cond, body) ...; else_body
    For,          // targets in expr [if cond] body else else_body
    Set,          // targets [. attr] = expr
    SetBlock,     // {% set name [| filters] %} body {% endset %}; expr = filter chain over null
    Macro,        // name(params=defaults) body
    CallBlock,    // {% call(params) expr %} body {% endcall %}
    FilterBlock,  // {% filter f %} body {% endfilter %}; expr = filter chain over null
    With,         // {% with a = 1 %} body {% endwith %}: targets/values
    Break,
    Continue,
    Generation,   // {% generation %} body {% endgeneration %}
  };
  Kind kind = Kind::Text;
  int line = 0;
  std::string text;
  ExprPtr expr;
  ExprPtr cond;  // For: loop filter
  std::vector<std::pair<ExprPtr, Body>> branches;
  Body body, else_body;
  std::vector<std::string> targets;
  bool unpack = false;    // For/Set: target is a tuple
  std::string attr;       // Set: ns.attr
  std::string name;       // Macro
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // same size as params; null = no default
  std::vector<ExprPtr> values;    // With
};

// Parses a whole template. Throws am::FormatError("<name> line N: ...") on syntax errors, on
// constructs outside the supported subset (unknown filters/tests, {% include %}, ...) and on nesting
// beyond the limits of jinja_limits.h.
Body parse(const std::vector<Token>& tokens, const std::string& name);

// The filter / test names the interpreter implements.
bool known_filter(const std::string& name);
bool known_test(const std::string& name);

}  // namespace am::jinja
