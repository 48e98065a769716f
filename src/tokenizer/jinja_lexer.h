// Jinja2 lexer with the environment transformers uses for chat templates: trim_blocks=True,
// lstrip_blocks=True, keep_trailing_newline=False, newlines normalized to "\n". Whitespace control
// (`{%-`, `-%}`, `{{-`, `-}}`, `{#-`, `-#}`, `{%+`, `+%}`) and `{% raw %}` are resolved here, so the
// parser sees plain text tokens and tag contents. Comments are dropped.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace am::jinja {

enum class TokType { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };

struct Token {
  TokType type = TokType::Eof;
  std::string text;  // Text: the data; Name/Op: the spelling; String: the decoded value
  int64_t ival = 0;
  double fval = 0;
  int line = 1;
};

// Throws am::FormatError("<name> line N: ...") on a syntax error.
std::vector<Token> lex(std::string_view source, const std::string& name);

// "<name> line N: msg" -- the prefix every template error carries.
std::string where(const std::string& name, int line);

}  // namespace am::jinja
