// Unit tests of the Jinja2 interpreter behind chat templates. The expected strings of the table were
// produced by Python's jinja2 configured as transformers configures it (trim_blocks, lstrip_blocks,
// loopcontrols, ImmutableSandboxedEnvironment) -- see tools/make_chat_template_goldens.js.
#include <gtest/gtest.h>

#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/jinja_interp.h"

using namespace am;
using am::jinja::Template;
using am::jinja::Value;

namespace {

std::string render(const std::string& src, const std::string& ctx_json = "{}") {
  Template t(src, "chat_template");
  return t.render(Value::from_json(nlohmann::ordered_json::parse(ctx_json)));
}

struct Case {
  const char* tmpl;
  const char* ctx;
  const char* want;
};

const Case kCases[] = {
    {R"J(  {% if true %}
  x
  {% endif %}
  y)J",
     R"J({})J",
     R"J(  x
  y)J"},
    {R"J(a {%- if true %} b {% endif -%} c)J",
     R"J({})J",
     R"J(a b c)J"},
    {R"J(a
  {%+ if true %}b{% endif %}
c)J",
     R"J({})J",
     R"J(a
  bc)J"},
    {R"J({% if true +%}
keep{% endif %})J",
     R"J({})J",
     R"J(
keep)J"},
    {R"J(x {{- ' y ' -}} z)J",
     R"J({})J",
     R"J(x y z)J"},
    {R"J({{ 'x' }}
{{ 'y' }}
)J",
     R"J({})J",
     R"J(x
y)J"},
    {R"J(line
  {# comment #}
next)J",
     R"J({})J",
     R"J(line
next)J"},
    {R"J(a  {#- c -#}  b)J",
     R"J({})J",
     R"J(ab)J"},
    {R"J({% for m in ['a', 'b'] %}
    {{ m }}
{% endfor %}
)J",
     R"J({})J",
     R"J(    a
    b
)J"},
    {R"J({%- for m in ['a','b'] -%}
  {{- m -}}
{%- endfor %})J",
     R"J({})J",
     R"J(ab)J"},
    {R"J({% raw %}{{ not }}{% endraw %})J",
     R"J({})J",
     R"J({{ not }})J"},
    {"x\r\ny\rz\n",
     R"J({})J",
     R"J(x
y
z)J"},
    {"\t{% if true %}t{% endif %}",
     R"J({})J",
     R"J(t)J"},
    {R"J({{ 1 }}  {% if true %}x{% endif %})J",
     R"J({})J",
     R"J(1  x)J"},
    {R"J({% for x in 'abc' %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }};{% endfor %})J",
     R"J({})J",
     R"J(1032TrueFalse3;2121FalseFalse3;3210FalseTrue3;)J"},
    {R"J({% for x in [1, 2, 3] %}{{ loop.previtem }}<{{ x }}>{{ loop.nextitem }}|{% endfor %})J",
     R"J({})J",
     R"J(<1>2|1<2>3|2<3>|)J"},
    {R"J({% for x in [1, 2, 3, 4, 5] if x is odd %}{{ loop.index }}/{{ loop.length }}={{ x }} {% endfor %})J",
     R"J({})J",
     R"J(1/3=1 2/3=3 3/3=5 )J"},
    {R"J({% for x in [] %}x{% else %}empty{% endfor %})J",
     R"J({})J",
     R"J(empty)J"},
    {R"J({% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %})J",
     R"J({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}], "d": {"b": 1, "a": 2}})J",
     R"J(b=1,a=2,)J"},
    {R"J({% for k, v in d|dictsort %}{{ k }}={{ v }},{% endfor %})J",
     R"J({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}], "d": {"b": 1, "a": 2}})J",
     R"J(a=2,b=1,)J"},
    {R"J({% for x in [1, 2, 3, 4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %})J",
     R"J({})J",
     R"J(13)J"},
    {R"J({% for x in range(4) %}{{ loop.cycle('a', 'b') }}{% endfor %})J",
     R"J({})J",
     R"J(abab)J"},
    {R"J({% for a in [1, 2] %}{% for b in [3, 4] %}{{ a }}{{ b }}{{ loop.index }} {% endfor %}{% endfor %})J",
     R"J({})J",
     R"J(131 142 231 242 )J"},
    {R"J({% set x = 1 %}{% for i in [1, 2] %}{% set x = x + i %}{{ x }}{% endfor %}|{{ x }})J",
     R"J({})J",
     R"J(23|1)J"},
    {R"J({% set ns = namespace(total=0) %}{% for i in [1, 2, 3] %}{% set ns.total = ns.total + i %}{% endfor %}{{ ns.total }})J",
     R"J({})J",
     R"J(6)J"},
    {R"J({% for m in messages[::-1] %}{{ m.role[0] }}{% endfor %})J",
     R"J({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}], "d": {"b": 1, "a": 2}})J",
     R"J(aus)J"},
    {R"J({% set a, b = 'xy' %}{{ b }}{{ a }})J",
     R"J({})J",
     R"J(yx)J"},
    {R"J({% set s %}<{{ 1 + 1 }}>{% endset %}{{ s }}{{ s }})J",
     R"J({})J",
     R"J(<2><2>)J"},
    {R"J({% set s | upper | replace('A', '4') %}abc{% endset %}{{ s }})J",
     R"J({})J",
     R"J(4BC)J"},
    {R"J({% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Bo') }} {{ greet('Al', punct='?') }} {{ greet() }})J",
     R"J({})J",
     R"J(Hi Bo! Hi Al? Hi !)J"},
    {R"J({% macro outer() %}[{{ caller('x') }}]{% endmacro %}{% call(v) outer() %}got {{ v }}{% endcall %})J",
     R"J({})J",
     R"J([got x])J"},
    {R"J({% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(5) }})J",
     R"J({})J",
     R"J(54321)J"},
    {R"J({% filter upper %}shout {{ 'this' }}{% endfilter %})J",
     R"J({})J",
     R"J(SHOUT THIS)J"},
    {R"J({% with a = 1, b = 2 %}{{ a + b }}{% endwith %}[{{ a }}])J",
     R"J({})J",
     R"J(3[])J"},
    {R"J({% generation %}gen {{ 1 }}{% endgeneration %})J",
     R"J({})J",
     R"J(gen 1)J"},
    {R"J({{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 7.5 // 2 }} {{ 1 + 2 * 3 - 4 }})J",
     R"J({})J",
     R"J(3 -4 1 2 3.5 1024 0.5 3.0 3)J"},
    {R"J({{ 'a' ~ 1 ~ none ~ true }} {{ 'ab' * 3 }} {{ [1] + [2] }} {{ 'x' + 'y' }})J",
     R"J({})J",
     R"J(a1NoneTrue ababab [1, 2] xy)J"},
    {R"J({{ 1 < 2 < 3 }} {{ 2 < 1 < 3 }} {{ 1 == 1.0 }} {{ true == 1 }} {{ 'a' != 'b' }} {{ [1, 2] == [1, 2] }})J",
     R"J({})J",
     R"J(True False True True True True)J"},
    {R"J({{ 'b' in 'abc' }} {{ 'z' not in ['a'] }} {{ 'a' in d }} {{ 2 in [1, 2] }})J",
     R"J({"d": {"a": 1}})J",
     R"J(True True True True)J"},
    {R"J({{ 1 and 'x' }} {{ 0 or 'y' }} {{ none or false }} {{ not 0 }} {{ not none }})J",
     R"J({})J",
     R"J(x y False True True)J"},
    {R"J({{ 'yes' if 1 else 'no' }} {{ 'yes' if 0 else 'no' }} [{{ 'yes' if 0 }}])J",
     R"J({})J",
     R"J(yes no [])J"},
    {R"J({{ [1, 2, 3, 4, 5][1:4] }} {{ [1, 2, 3, 4, 5][::-2] }} {{ 'hello'[1:-1] }} {{ 'hello'[-3:] }} {{ [1, 2][5] }}|)J",
     R"J({})J",
     R"J([2, 3, 4] [5, 3, 1] ell llo |)J"},
    {R"J({{ {'a': 1, 'b': [true, none, 1.5, 'x']} }} {{ (1,) }} {{ () }} {{ "it's" }} {{ ['a"b', "c'd"] }})J",
     R"J({})J",
     R"J({'a': 1, 'b': [True, None, 1.5, 'x']} (1,) () it's ['a"b', "c'd"])J"},
    {R"J({{ 1.0 }} {{ 0.1 + 0.2 }} {{ 1e20 }} {{ 1e-5 }} {{ 123456789.0 }} {{ 2.5e-3 }} {{ -0.0 }} {{ 10 / 4 }})J",
     R"J({})J",
     R"J(1.0 0.30000000000000004 1e+20 1e-05 123456789.0 0.0025 -0.0 2.5)J"},
    {R"J({{ '\u00e9\t\x41\n' }}{{ "q\"q" }})J",
     R"J({})J",
     "é\tA\nq\"q"},
    {R"J({{ x }}|{{ none }}|{{ true }}|{{ false }}|{{ x is defined }}|{{ x is undefined }}|{{ x|length }})J",
     R"J({})J",
     R"J(|None|True|False|False|True|0)J"},
    {R"J({{ messages[0].content }}{{ messages[1]['role'] }}{{ messages|length }}{{ messages[-1].role }})J",
     R"J({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}], "d": {"b": 1, "a": 2}})J",
     R"J(Suser3assistant)J"},
    {R"J({{ d.missing is defined }}{{ d['missing'] is defined }}{{ d.get('missing', 'dflt') }}{{ d.get('b') }})J",
     R"J({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}], "d": {"b": 1, "a": 2}})J",
     R"J(FalseFalsedflt1)J"},
    {R"J({{ 3 is odd }}{{ 3 is even }}{{ 9 is divisibleby 3 }}{{ 9 is divisibleby(2) }}{{ none is none }}{{ 'a' is string }}{{ 1 is number }}{{ 1 is integer }}{{ 1.5 is float }}{{ true is boolean }}{{ true is true }}{{ 1 is true }}{{ false is false }}{{ {} is mapping }}{{ [] is sequence }}{{ 'x' is iterable }}{{ 1 is iterable }})J",
     R"J({})J",
     R"J(TrueFalseTrueFalseTrueTrueTrueTrueTrueTrueTrueFalseTrueTrueTrueTrueFalse)J"},
    {R"J({{ 'a' is in 'cat' }}{{ 1 is eq 1 }}{{ 1 is equalto 2 }}{{ 1 is ne 1 }}{{ 1 is lt 2 }}{{ 1 is gt 2 }}{{ 'AB' is upper }}{{ 'ab' is lower }}{{ x is not defined }})J",
     R"J({})J",
     R"J(TrueTrueFalseFalseTrueFalseTrueTrueTrue)J"},
    {R"J({{ '  pad  '|trim }}|{{ 'xxhixx'|trim('x') }}|{{ 'ab'|upper }}|{{ 'AB'|lower }}|{{ 'hello wORLD-foo (bar)'|title }}|{{ 'hELLO'|capitalize }})J",
     R"J({})J",
     R"J(pad|hi|AB|ab|Hello World-Foo (Bar)|Hello)J"},
    {R"J({{ 'aXbXc'|replace('X', '-') }} {{ 'aXbXc'|replace('X', '-', 1) }} {{ [1, 2, 3]|length }} {{ 'héllo'|count }} {{ d|length }})J",
     R"J({"d": {"a": 1}})J",
     R"J(a-b-c a-bXc 3 5 1)J"},
    {R"J({{ {'b': 1, 'a': [1, 'é']}|tojson }} {{ [1, {'x': none}]|tojson(indent=2) }} {{ 'q"\n'|tojson }} {{ {'b': 1, 'a': 2}|tojson(sort_keys=true) }} {{ [1,2]|tojson(separators=(',', ':')) }})J",
     R"J({})J",
     R"J({"b": 1, "a": [1, "é"]} [
  1,
  {
    "x": null
  }
] "q\"\n" {"a": 2, "b": 1} [1,2])J"},
    {R"J({{ 42|string }}{{ '12'|int + 1 }} {{ '3.9'|int }} {{ 'x'|int(7) }} {{ 3.9|int }} {{ '2.5'|float }} {{ 'x'|float }} {{ 2|float }})J",
     R"J({})J",
     R"J(4213 3 7 3 2.5 0.0 2.0)J"},
    {R"J({{ x|default('dflt') }} {{ ''|default('dflt') }} {{ ''|default('dflt', true) }} {{ 0|d('zero', boolean=true) }})J",
     R"J({})J",
     R"J(dflt  dflt zero)J"},
    {R"J({{ ['a', 'b']|join(', ') }} {{ [1, 2]|join }} {{ [{'n': 'x'}, {'n': 'y'}]|join('+', attribute='n') }})J",
     R"J({})J",
     R"J(a, b 12 x+y)J"},
    {R"J({{ [3, 1, 2]|first }}{{ [3, 1, 2]|last }}{{ 'abc'|first }}{{ []|first is defined }} {{ 'abc'|list }} {{ d|list }} {{ d|items|list }})J",
     R"J({"d": {"k": "v"}})J",
     R"J(32aFalse ['a', 'b', 'c'] ['k'] [('k', 'v')])J"},
    {R"J({{ messages|selectattr('role', 'equalto', 'user')|list|length }} {{ messages|rejectattr('role', 'eq', 'user')|map(attribute='role')|join(',') }} {{ messages|map(attribute='missing', default='?')|join }})J",
     R"J({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}], "d": {"b": 1, "a": 2}})J",
     R"J(1 system,assistant ???)J"},
    {R"J({{ [1, 2, 3, 4]|select('even')|list }} {{ [1, 2, 3, 4]|reject('even')|list }} {{ [0, 1, '', 'a']|select|list }} {{ ['a', 'b']|map('upper')|list }})J",
     R"J({})J",
     R"J([2, 4] [1, 3] [1, 'a'] ['A', 'B'])J"},
    {R"J({{ ['b', 'A', 'a', 'B']|unique|list }} {{ ['b', 'A', 'a']|sort }} {{ ['b', 'A', 'a']|sort(case_sensitive=true) }} {{ [3, 1, 2]|sort(reverse=true) }} {{ [{'k': 2}, {'k': 1}]|sort(attribute='k')|map(attribute='k')|list }})J",
     R"J({})J",
     R"J(['b', 'A'] ['A', 'a', 'b'] ['A', 'a', 'b'] [3, 2, 1] [1, 2])J"},
    {R"J({{ [1, 2, 3]|reverse|list }} {{ 'abc'|reverse }} {{ 'a
b

c'|indent(2) }}|{{ 'a
b'|indent(4, first=true) }}|{{ 'a

b'|indent('> ', blank=true) }})J",
     R"J({})J",
     R"J([3, 2, 1] cba a
  b

  c|    a
    b|a
> 
> b)J"},
    {R"J({{ 2.5|round }} {{ 3.5|round }} {{ 2.675|round(2) }} {{ 3.14159|round(2, 'floor') }} {{ 7|round }} {{ -3|abs }} {{ -2.5|abs }} {{ 'one two  three'|wordcount }})J",
     R"J({})J",
     R"J(2.0 4.0 2.67 3.14 7 3 2.5 3)J"},
    {R"J({{ [1, 2, 3, 4, 5]|batch(2)|list }} {{ [1, 2, 3]|batch(2, 0)|list }} {{ [1, 2, 3]|sum }} {{ [3, 9, 2]|max }} {{ ['b', 'A']|min }} {{ '<a href="x">&</a>'|e }} {{ 'x'|safe }})J",
     R"J({})J",
     R"J([[1, 2], [3, 4], [5]] [[1, 2], [3, 0]] 6 9 A &lt;a href=&#34;x&#34;&gt;&amp;&lt;/a&gt; x)J"},
    {R"J({{ {'b': 1, 'a': 2}|dictsort }} {{ {'b': 1, 'a': 2}|dictsort(by='value', reverse=true) }} {{ '%s=%d'|format('n', 3) }} {{ 'x'|center(5) }}|)J",
     R"J({})J",
     R"J([('a', 2), ('b', 1)] [('a', 2), ('b', 1)] n=3   x  |)J"},
    {R"J({{ 'abc'.startswith('ab') }}{{ 'abc'.endswith(('x', 'c')) }}{{ ' a b '.strip() }}|{{ 'xay'.lstrip('x') }}|{{ 'xay'.rstrip('y') }}|{{ 'a,b,,c'.split(',') }}{{ ' a  b '.split() }}{{ 'a b c'.split(' ', 1) }}{{ 'a.b.c'.rsplit('.', 1) }})J",
     R"J({})J",
     R"J(TrueTruea b|ay|xa|['a', 'b', '', 'c']['a', 'b']['a', 'b c']['a.b', 'c'])J"},
    {R"J({{ 'Hello World'.upper() }}{{ 'Hello'.lower() }}{{ 'hello world'.title() }}{{ 'a-b'.replace('-', '+') }}{{ '{} and {x}'.format(1, x='y') }}{{ '{0}{0}'.format('z') }}{{ 'banana'.count('an') }}{{ 'abc'.find('c') }}{{ 'abc'.find('z') }}{{ '-'.join(['a', 'b']) }})J",
     R"J({})J",
     R"J(HELLO WORLDhelloHello Worlda+b1 and yzz22-1a-b)J"},
    {R"J({{ d.keys()|list }}{{ d.values()|list }}{{ d.items()|list }}{{ d.get('zz', 0) }}{{ [1, 2, 1].count(1) }}{{ [1, 2].index(2) }})J",
     R"J({"d": {"k": "v", "n": 1}})J",
     R"J(['k', 'n']['v', 1][('k', 'v'), ('n', 1)]021)J"},
    {R"J({{ 'a\nb'.splitlines() }}{{ '123'.isdigit() }}{{ 'ab'.isalpha() }}{{ '  '.isspace() }}{{ 'x'.zfill(3) }}{{ 'ab'.center(6, '*') }}{{ 'pre_x'.removeprefix('pre_') }})J",
     R"J({})J",
     R"J(['a', 'b']TrueTrueTrue00x**ab**x)J"},
    {R"J({{ 'héllo wörld'|upper }} {{ 'ÀÉÎ'|lower }} {{ 'straße'.upper() }} {{ '日本語'[1] }} {{ '日本語'|length }} {{ '🚀x'[::-1] }} {{ ['é', '日']|tojson }})J",
     R"J({})J",
     R"J(HÉLLO WÖRLD àéî STRASSE 本 3 x🚀 ["é", "日"])J"},
    {R"J({{ range(3)|list }}{{ range(1, 7, 2)|list }}{{ range(3, 0, -1)|list }}{{ dict(a=1)['a'] }}{{ namespace(v=3).v }})J",
     R"J({})J",
     R"J([0, 1, 2][1, 3, 5][3, 2, 1]13)J"},
    {R"J({% set j = joiner('; ') %}{% for x in 'ab' %}{{ j() }}{{ x }}{% endfor %})J",
     R"J({})J",
     R"J(a; b)J"},
    {R"J({% if 5|select('odd') %}T{% endif %}|{% if 0|select %}T{% else %}F{% endif %}|{{ [1, 2]|map('string')|list }})J",
     R"J({})J",
     R"J(T|T|['1', '2'])J"},
    {R"J({{ d.items() }} {{ d.keys() }} {{ d.values()|list }} {{ d.items() is sequence }})J",
     R"J({"d": {"a": 1}})J",
     R"J(dict_items([('a', 1)]) dict_keys(['a']) [1] False)J"},
    {R"J({{ ('a'|safe) + '<b>' }} {{ '<c>' + ('d'|safe) }} {{ 'x' ~ ('<y>'|e) }} {{ ['q'|e] }})J",
     R"J({})J",
     R"J(a&lt;b&gt; &lt;c&gt;d x&lt;y&gt; [Markup('q')])J"},
    {R"J({{ -2 ** 2 }} {{ (-2) ** 2 }} {{ -2 ** x }} {{ 2 ** -1 }})J",
     R"J({"x": 2})J",
     R"J(4 4 -4 0.5)J"},
    {R"J({{ '%s' % [1] }} {{ 'a' % {} }} {{ '%d%%' % 5 }})J",
     R"J({})J",
     R"J([1] a 5%)J"},
    {R"J({{ x is sequence }} {{ x is callable }} {{ [1] is lower }} {{ 'A'|reverse is upper }})J",
     R"J({})J",
     R"J(True True False True)J"},
};

// Expects `src` to throw E whose message contains every fragment.
template <class E>
void expect_error(const std::string& src, std::initializer_list<const char*> fragments, const std::string& ctx = "{}") {
  try {
    std::string out = render(src, ctx);
    ADD_FAILURE() << "no error for " << src << " (rendered " << out << ")";
  } catch (const E& e) {
    for (const char* f : fragments)
      EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << "'" << e.what() << "' lacks '" << f << "'";
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong error type for " << src << ": " << e.what();
  }
}

}  // namespace

TEST(Jinja, MatchesJinja2) {
  int n = 0;
  for (const Case& c : kCases) {
    try {
      EXPECT_EQ(render(c.tmpl, c.ctx), c.want) << "template: " << c.tmpl;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "template: " << c.tmpl << " threw " << e.what();
    }
    ++n;
  }
  EXPECT_GT(n, 60);
}

TEST(Jinja, WhitespaceControl) {
  // trim_blocks removes the newline after a block tag, lstrip_blocks the indentation before it
  EXPECT_EQ(render("{% if true %}\n  a\n{% endif %}\n"), "  a\n");
  EXPECT_EQ(render("    {% if true %}x{% endif %}"), "x");
  // but not before {{ }} and not after }}
  EXPECT_EQ(render("  {{ 'x' }}\n"), "  x");
  EXPECT_EQ(render("{{ 'x' }}\ny"), "x\ny");
  // '-' strips all whitespace (newlines included) on its side
  EXPECT_EQ(render("a \n\n {{- 'b' -}} \n\n c"), "abc");
  EXPECT_EQ(render("a\n  {%- if true -%}\n  b  \n  {%- endif -%}\n  c"), "abc");
  // '+' disables lstrip / trim for that tag
  EXPECT_EQ(render("  {%+ if true %}x{% endif %}"), "  x");
  EXPECT_EQ(render("{% if true +%}\nx{% endif %}"), "\nx");
  // one trailing newline of the template is dropped
  EXPECT_EQ(render("x\n"), "x");
  EXPECT_EQ(render("x\n\n"), "x\n");
}

TEST(Jinja, LoopVariablesAndScoping) {
  EXPECT_EQ(render("{% for x in [10, 20, 30] %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.first }}{{ loop.last }}{{ loop.length }} {% endfor %}"),
            "103TrueFalse3 212FalseFalse3 321FalseTrue3 ");
  EXPECT_EQ(render("{% for x in [1, 2, 3] %}{{ loop.previtem is defined }}{{ loop.nextitem|default('-') }}{% endfor %}"),
            "False2True3True-");
  // a `set` inside a loop does not leak out; a namespace attribute does
  EXPECT_EQ(render("{% set x = 0 %}{% set ns = namespace(x=0) %}{% for i in [1, 2] %}{% set x = i %}{% set ns.x = i %}{% endfor %}{{ x }}{{ ns.x }}"),
            "02");
  // loop over a dict gives keys; tuple unpacking over items()
  EXPECT_EQ(render("{% for k in d %}{{ k }}{% endfor %}{% for k, v in d.items() %}{{ v }}{% endfor %}", R"({"d": {"z": 1, "a": 2}})"),
            "za12");
}

TEST(Jinja, PythonValueSemantics) {
  EXPECT_EQ(render("{{ none }}|{{ true }}|{{ 1.0 }}|{{ 3 / 1 }}|{{ 10 // 3 }}|{{ [1, 'a', none] }}|{{ {'k': false} }}|{{ undefined_thing }}"),
            "None|True|1.0|3.0|3|[1, 'a', None]|{'k': False}|");
  EXPECT_EQ(render("{{ x }}", R"({"x": 1e100})"), "1e+100");
  EXPECT_EQ(render("{{ x }}|{{ x|tojson }}", R"({"x": 0.5})"), "0.5|0.5");
  EXPECT_EQ(render("{{ [] or 'empty' }} {{ '' or 'e' }} {{ 0.0 or 'z' }} {{ {} or 'd' }}"), "empty e z d");
  // attribute lookup falls through to items and back
  EXPECT_EQ(render("{{ m.role }}{{ m['role'] }}{{ m.items()|list|length }}", R"({"m": {"role": "user"}})"), "useruser1");
}

TEST(Jinja, TojsonMatchesTransformers) {
  // json.dumps(ensure_ascii=False), insertion order kept, ", " and ": " separators
  EXPECT_EQ(render("{{ x|tojson }}", R"({"x": {"b": [1, 2.5, "é\n", null, true], "a": {}}})"),
            R"({"b": [1, 2.5, "é\n", null, true], "a": {}})");
  EXPECT_EQ(render("{{ x|tojson(indent=2) }}", R"({"x": {"a": [1], "b": []}})"), "{\n  \"a\": [\n    1\n  ],\n  \"b\": []\n}");
  EXPECT_EQ(render("{{ '<tag>'|tojson }}"), "\"<tag>\"");
}

TEST(Jinja, ErrorsCarryTheLine) {
  expect_error<FormatError>("line one\n{{ x | xyz }}", {"chat_template line 2:", "unsupported filter 'xyz'"});
  expect_error<FormatError>("\n\n{% if x is frobbed %}{% endif %}", {"chat_template line 3:", "unsupported test 'frobbed'"});
  expect_error<FormatError>("{% for x in y %}\nno end", {"chat_template line 2:", "'endfor'"});
  expect_error<FormatError>("{% include 'x.jinja' %}", {"line 1", "unsupported tag 'include'"});
  expect_error<FormatError>("{{ 'unterminated }}", {"line 1", "string"});
  expect_error<FormatError>("{{ (1 }}", {"line 1"});
  expect_error<FormatError>("ok\n{% endif %}", {"line 2", "endif"});
  expect_error<FormatError>("{# never closed", {"line 1", "comment"});
  expect_error<DataError>("a\nb\n{{ raise_exception('Roles must alternate') }}", {"chat_template line 3:", "Roles must alternate"});
  expect_error<DataError>("\n{{ 'a' + 1 }}", {"line 2", "can only concatenate str"});
  expect_error<DataError>("{{ x.y }}", {"line 1", "'x' is undefined"});
  expect_error<DataError>("{{ m.content.strip() }}", {"has no attribute 'content'"}, R"({"m": {}})");
  expect_error<DataError>("{% for x in 5 %}{% endfor %}", {"not iterable"});
  expect_error<DataError>("{% set l = [] %}{{ l.append(1) }}", {"unsafe"});
  expect_error<DataError>("{{ 1 / 0 }}", {"division by zero"});
  expect_error<DataError>("{% set n = 1 %}{% set n.a = 2 %}", {"non-namespace"});
  expect_error<FormatError>("{{ 'x'.encode() }}", {"unsupported str method 'encode'"});
}

TEST(Jinja, NeverLoopsForeverOrBlowsTheStack) {
  expect_error<DataError>("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", {"recursion"});
  expect_error<DataError>("{{ range(100000000)|length }}", {"range() too large"});
  expect_error<DataError>("{{ 'x' * 1000000000 }}", {"too large"});
  std::string deep = std::string(5000, '(') + "1" + std::string(5000, ')');
  expect_error<FormatError>("{{ " + deep + " }}", {"nested too deeply"});
  std::string unary;
  for (int k = 0; k < 5000; ++k) unary += "not ";
  expect_error<FormatError>("{{ " + unary + "1 }}", {"nested too deeply"});
  std::string nested;
  for (int k = 0; k < 400; ++k) nested += "{% if true %}";
  expect_error<FormatError>(nested, {"nested too deeply"});
}

TEST(Jinja, GenerationBlockRendersItsBody) {
  EXPECT_EQ(render("{% for m in ms %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}[{{ m.content }}]{% endif %}{% endfor %}",
                   R"({"ms": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})"),
            "[q]a");
}

TEST(Jinja, StrftimeNowUsesTheFixedDate) {
  Template t("{{ strftime_now('%Y-%m-%d %H:%M') }}");
  jinja::RenderOptions o;
  std::tm tmv{};
  tmv.tm_year = 2024 - 1900;
  tmv.tm_mon = 6;
  tmv.tm_mday = 26;
  tmv.tm_hour = 9;
  tmv.tm_min = 5;
  o.now = tmv;
  EXPECT_EQ(t.render(Value::dict(), o), "2024-07-26 09:05");
}
