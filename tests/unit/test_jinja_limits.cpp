// Chat templates come from model repositories, which are untrusted: whatever a template (or the data
// rendered through it) does, the interpreter must stop it with a typed error (am::FormatError at parse
// time, am::DataError while rendering) within seconds -- never a signal (SIGFPE, SIGSEGV from a stack
// overflow), a hang or unbounded memory. The limits are in src/tokenizer/jinja_limits.h. Every case
// below is a reproducer of such a failure (long inputs are generated in code); each asserts the error
// type, what the message names, and a time bound generous for a slow 2-core CI machine (3 s of CPU
// time, 10 s of wall-clock time: a loaded machine slows the wall clock, not the work).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <time.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/jinja_interp.h"

using namespace am;
using am::jinja::RenderOptions;
using am::jinja::Template;
using am::jinja::Value;

namespace {

// Every case must end within kSeconds of CPU time (of this thread: a busy CI machine does not count)
// and, generously, kWallSeconds of wall-clock time.
// Under AddressSanitizer (make test-asan) everything runs ~15x slower: the bounds scale with it.
#if defined(__SANITIZE_ADDRESS__)
constexpr double kSlowdown = 20.0;
#else
constexpr double kSlowdown = 1.0;
#endif
constexpr double kSeconds = 3.0 * kSlowdown;
constexpr double kWallSeconds = 10.0 * kSlowdown;

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Measures one case: EXPECTs its CPU and wall-clock time to be within the bounds.
class Timer {
 public:
  explicit Timer(std::string what) : what_(std::move(what)), wall0_(Clock::now()), cpu0_(thread_cpu_seconds()) {}
  ~Timer() {
    EXPECT_LT(thread_cpu_seconds() - cpu0_, kSeconds) << "CPU time of " << what_;
    EXPECT_LT(since(wall0_), kWallSeconds) << "wall-clock time of " << what_;
  }

 private:
  std::string what_;
  Clock::time_point wall0_;
  double cpu0_;
};

std::string render(const std::string& src, const Value& ctx, const RenderOptions& opts = {}) {
  Template t(src, "chat_template");
  return t.render(ctx, opts);
}

std::string render(const std::string& src, const std::string& ctx_json = "{}", const RenderOptions& opts = {}) {
  return render(src, Value::from_json(nlohmann::ordered_json::parse(ctx_json)), opts);
}

std::string head(const std::string& s) { return s.size() > 120 ? s.substr(0, 120) + "..." : s; }

// Renders `src` and expects an error of type E whose message contains every fragment, within kSeconds.
template <class E>
void expect_limit(const std::string& src, std::initializer_list<const char*> fragments, const std::string& ctx = "{}",
                  const RenderOptions& opts = {}) {
  Timer timer(head(src));
  try {
    std::string out = render(src, ctx, opts);
    ADD_FAILURE() << "no error for " << head(src) << " (rendered " << head(out) << ")";
  } catch (const E& e) {
    for (const char* f : fragments)
      EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << "'" << e.what() << "' lacks '" << f << "'";
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong error type for " << head(src) << ": " << e.what();
  }
}

// Renders `src` and expects `want`, within kSeconds.
void expect_renders(const std::string& src, const std::string& want, const std::string& ctx = "{}",
                    const RenderOptions& opts = {}) {
  Timer timer(head(src));
  try {
    EXPECT_EQ(render(src, ctx, opts), want) << head(src);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "error for " << head(src) << ": " << e.what();
  }
}

std::string repeat(const std::string& s, int n) {
  std::string out;
  out.reserve(s.size() * static_cast<size_t>(n));
  for (int k = 0; k < n; ++k) out += s;
  return out;
}

const std::string kMin = "(-9223372036854775807 - 1)";  // INT64_MIN (the literal alone is too large)

}  // namespace

// ------------------------------------------------------------------ integers

TEST(JinjaLimits, IntegerOverflowIsAnErrorNamingTheOperation) {
  // INT64_MIN // -1 and INT64_MIN % -1 used to kill the process with SIGFPE.
  expect_limit<FormatError>("{{ " + kMin + " // -1 }}", {"line 1", "integer overflow in '//'"});
  expect_renders("{{ " + kMin + " % -1 }}", "0");  // Python: 0, which fits
  expect_renders("{{ " + kMin + " // 1 }} {{ 7 // -1 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 % -3 }}",
                 "-9223372036854775808 -7 -4 2 -2");
  expect_limit<FormatError>("{{ 9223372036854775807 + 1 }}", {"integer overflow in '+'"});
  expect_limit<FormatError>("{{ " + kMin + " - 1 }}", {"integer overflow in '-'"});
  expect_limit<FormatError>("{{ 3037000500 * 3037000500 }}", {"integer overflow in '*'"});
  expect_limit<FormatError>("{{ " + kMin + " * -1 }}", {"integer overflow in '*'"});
  expect_limit<FormatError>("{{ 2 ** 63 }}", {"integer overflow in '**'"});
  expect_limit<FormatError>("{{ 3 ** 9223372036854775807 }}", {"integer overflow in '**'"});
  expect_limit<FormatError>("{{ -" + kMin + " }}", {"integer overflow in 'unary -'"});
  expect_limit<FormatError>("{{ " + kMin + "|abs }}", {"integer overflow in 'abs'"});
  expect_limit<FormatError>("{{ [9223372036854775807, 1]|sum }}", {"integer overflow in '+'"});
  expect_limit<FormatError>("{{ 0x1FFFFFFFFFFFFFFFF }}", {"integer literal too large"});
  expect_limit<FormatError>("{{ 1e300|int }}", {"integer overflow"});
  expect_renders("{{ (-2) ** 63 }} {{ 2 ** 62 }} {{ (-1) ** 9223372036854775807 }} {{ 0 ** 0 }} {{ 2 ** -1 }}",
                 "-9223372036854775808 4611686018427387904 -1 1 0.5");
  expect_renders("{{ 9223372036854775807 - 1 + 1 }} {{ " + kMin + " + 0 }}",
                 "9223372036854775807 -9223372036854775808");
}

TEST(JinjaLimits, DivisionByZeroIsADataError) {
  for (const char* op : {"//", "%", "/"})
    for (const char* rhs : {"0", "0.0", "false"})
      expect_limit<DataError>(std::string("{{ 7 ") + op + " " + rhs + " }}", {"line 1"});
  expect_limit<DataError>("{{ 7 // 0 }}", {"integer division or modulo by zero"});
  expect_limit<DataError>("{{ 7 % 0 }}", {"integer modulo by zero"});
  expect_limit<DataError>("{{ 7 / 0 }}", {"division by zero"});
  expect_limit<DataError>("{{ 7.5 % 0 }}", {"float modulo"});
  expect_limit<DataError>("{{ 7.5 // 0 }}", {"float floor division by zero"});
  expect_limit<DataError>("{{ 0 ** -1 }}", {"negative power"});
}

TEST(JinjaLimits, HugeCountsAndStepsAreBoundedNotUndefined) {
  expect_renders("{{ range(9223372036854775806, 9223372036854775807, 10)|list }}", "[9223372036854775806]");
  expect_renders("{{ range(" + kMin + ", " + kMin + " + 3)|list|length }} {{ range(0, -10, " + kMin + ")|list }}",
                 "3 [0]");
  expect_limit<DataError>("{{ range(" + kMin + ", 9223372036854775807)|length }}", {"range() too large"});
  expect_renders("{{ [1, 2, 3][::9223372036854775807] }} {{ [1, 2, 3][::" + kMin + "] }} {{ 'abc'[1::9223372036854775807] }}",
                 "[1] [3] b");
  expect_renders("[{{ '' * 9223372036854775807 }}] {{ [] * 9223372036854775807 }} {{ 'ab' * -5 }}[]", "[] [] []");
  expect_limit<DataError>("{{ 'ab' * 9223372036854775807 }}", {"string too large"});
  expect_limit<DataError>("{{ [1, 2] * 4611686018427387904 }}", {"list too large"});
  expect_limit<DataError>("{{ '%999999999999d' % 1 }}", {"format width too large"});
  expect_limit<DataError>("{{ '%.99999999999f' % 1.5 }}", {"format precision too large"});
  expect_limit<DataError>("{{ '{:>99999999999999999999999}'.format(1) }}", {"format width too large"});
  expect_limit<DataError>("{{ '{:.99999}'.format(1.5) }}", {"format precision too large"});
  expect_limit<DataError>("{{ 'a'|center(1000000000000) }}", {"too large"});
  expect_limit<DataError>("{{ 'a'.ljust(1000000000000) }}", {"too large"});
  expect_limit<DataError>("{{ 'a\\nb'|indent(1000000000000) }}", {"too large"});
  expect_renders("{{ 'a'|indent(1000000000000) }}", "a");  // only the lines after the first are indented
  expect_limit<DataError>("{{ [1]|batch(1000000000000, 0)|list }}", {"too large"});
  expect_renders("{{ []|batch(1000000000000, 0)|list }}", "[]");
  expect_renders("{{ '%600d' % 1 }}", std::string(599, ' ') + "1");  // used to be cut at 511 bytes
}

// ------------------------------------------------------------------ nesting (the stack)

TEST(JinjaLimits, LongChainsAreRejectedAtParseTime) {
  const int n = 100000;
  std::string filters = "'a'" + repeat("|upper", n);
  std::string attrs = "x" + repeat(".x", n);
  std::string items = "x" + repeat("[0]", n);
  std::string calls = "f" + repeat("()", n);
  std::string concat = "'a'" + repeat(" ~ 'a'", n);
  std::string plus = "1" + repeat(" + 1", n);
  std::string ors = "x" + repeat(" or x", n);
  std::string cond = "1" + repeat(" if x else 1", n);
  std::string tests = "x" + repeat(" is defined", 3);  // `is` does not chain: a syntax error, not a deep tree
  for (const std::string& e : {filters, attrs, items, calls, concat, plus, ors, cond})
    expect_limit<FormatError>("{{ " + e + " }}", {"line 1", "nested too deeply"});
  expect_limit<FormatError>("{% set y = " + concat + " %}", {"nested too deeply"});
  expect_limit<FormatError>("{% filter " + repeat("upper|", n) + "upper %}x{% endfilter %}", {"nested too deeply"});
  expect_limit<FormatError>("{{ " + tests + " }}", {"line 1"});
  // A chain of a few hundred still works.
  expect_renders("{{ 'a'" + repeat("|upper", 300) + " }}", "A");
  expect_renders("{{ 1" + repeat(" + 1", 300) + " }}", "301");
  expect_renders("{{ 'a'" + repeat(".upper()", 150) + " }}", "A");
}

TEST(JinjaLimits, DeeplyNestedBracketsAndBlocksAreRejectedAtParseTime) {
  const int n = 200000;
  for (const std::string& e : {repeat("(", n) + "1" + repeat(")", n), repeat("[", n) + repeat("]", n),
                               repeat("{'a': ", n) + "1" + repeat("}", n), repeat("not ", n) + "1",
                               repeat("-", n) + "1", repeat("f(", n) + repeat(")", n), repeat("x[", n) + "0" + repeat("]", n)})
    expect_limit<FormatError>("{{ " + e + " }}", {"line 1", "nested too deeply"});
  expect_limit<FormatError>(repeat("{% if true %}", n) + repeat("{% endif %}", n), {"nested too deeply"});
  expect_limit<FormatError>(repeat("{% for x in y %}", n), {"nested too deeply"});
  expect_limit<FormatError>(repeat("{% macro m() %}", n), {"nested too deeply"});
}

TEST(JinjaLimits, DeeplyNestedDataIsAnErrorNotAStackOverflow) {
  // A messages value nested 200k deep, as a JSON document (nlohmann parses iteratively).
  const int n = 200000;
  {
    Timer timer("from_json of a document nested 200k deep");
    std::string doc = "{\"messages\": " + repeat("[", n) + repeat("]", n) + "}";
    try {
      Value v = Value::from_json(nlohmann::ordered_json::parse(doc));
      ADD_FAILURE() << "from_json accepted a value nested " << n << " deep";
    } catch (const DataError& e) {
      EXPECT_NE(std::string(e.what()).find("nested too deeply"), std::string::npos) << e.what();
    }
  }
  // 300 levels are fine, also for the recursive operations.
  std::string ok = "{\"m\": " + repeat("[", 300) + repeat("]", 300) + "}";
  std::string ctx = nlohmann::ordered_json::parse(ok).dump();
  expect_renders("{{ (m|string)|length }} {{ (m|tojson)|length }} {{ m == m }} {{ m < m }}", "600 600 True False", ctx);
}

TEST(JinjaLimits, ValuesBuiltDeepAtRunTime) {
  // A loop can nest lists 100k deep without recursion; destroying them must not recurse either, and
  // the operations that walk values stop at their depth limit.
  const std::string build = "{% set ns = namespace(l=[], m=[]) %}{% for i in range(100) %}{% for j in range(1000) %}"
                            "{% set ns.l = [ns.l] %}{% set ns.m = [ns.m] %}{% endfor %}{% endfor %}";
  expect_renders(build + "built", "built");
  expect_limit<DataError>(build + "{{ ns.l }}", {"line 1", "nested too deeply for str()"});
  expect_limit<DataError>(build + "{{ ns.l|tojson }}", {"nested too deeply for tojson"});
  expect_limit<DataError>(build + "{{ ns.l == ns.m }}", {"nested too deeply for =="});
  expect_limit<DataError>(build + "{{ ns.l < ns.m }}", {"nested too deeply"});
  expect_limit<DataError>(build + "{{ [ns.l, ns.m]|sort }}", {"nested too deeply"});
  expect_limit<DataError>(build + "{{ ns.l in [ns.m] }}", {"nested too deeply"});
  expect_renders(build + "{{ ns.l == ns.l }} {{ ns.l in [ns.l] }}", "True True");  // the same object
  // A 100k-long chain of namespaces (each points to the next, built front to back).
  expect_renders("{% set head = namespace(next=none) %}{% set ns = namespace(cur=head) %}"
                 "{% for i in range(100) %}{% for j in range(1000) %}{% set n = namespace(next=none) %}"
                 "{% set c = ns.cur %}{% set c.next = n %}{% set ns.cur = n %}{% endfor %}{% endfor %}done",
                 "done");
  // Reference cycles (namespaces are mutable) print as an error, and are not leaked.
  expect_limit<DataError>("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}", {"nested too deeply for str()"});
  expect_limit<DataError>("{% set ns = namespace() %}{% set ns.me = [ns] %}{{ ns.me|string }}", {"nested too deeply"});
  expect_renders("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns.me.me.me is defined }}", "True");
  // map('map', 'map', ...) nests filter calls.
  expect_limit<DataError>("{{ ['a']|map(" + repeat("'map', ", 5000) + "'string')|list }}", {"nested too deeply for map"});
}

TEST(JinjaLimits, RunTimeRecursionIsBounded) {
  // Each macro level evaluates a tall expression: the call depth limit alone would allow 100 x 350
  // levels of C++ recursion.
  std::string tall = "f(n - 1)" + repeat("|string", 350);
  expect_limit<DataError>("{% macro f(n) %}{% if n > 0 %}{{ " + tall + " }}{% endif %}{% endmacro %}{{ f(100) }}",
                          {"line 1", "nested too deeply at run time"});
  expect_limit<DataError>("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", {"maximum recursion depth"});
  expect_limit<DataError>("{% macro f() %}{% call f() %}x{% endcall %}{% endmacro %}{{ f() }}", {"recursion"});
  expect_limit<DataError>("{% macro f() %}{{ caller() }}{% endmacro %}{% macro g() %}{% call f() %}{{ g() }}{% endcall %}{% endmacro %}{{ g() }}",
                          {"recursion"});
}

// ------------------------------------------------------------------ work (time)

TEST(JinjaLimits, StepBudgetStopsEndlessLoops) {
  expect_limit<DataError>("{% for i in range(1000000) %}{% for j in range(1000000) %}{% endfor %}{% endfor %}",
                          {"line 1", "step limit exceeded"});
  expect_limit<DataError>("{% for i in range(1000000) %}{% for j in range(1000000) %}{{ '' }}{% endfor %}{% endfor %}",
                          {"step limit exceeded"});
  // Doubly recursive macro: depth 60 is allowed, 2^60 calls are not.
  expect_limit<DataError>(
      "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
      {"step limit exceeded"});
  // Work inside builtins counts too: scans of a long string, quadratic filters, big copies.
  expect_limit<DataError>(
      "{% set s = 'x' * 10000000 %}{% for i in range(1000000) %}{% if 'y' in s %}{% endif %}{% endfor %}",
      {"step limit exceeded"});
  expect_limit<DataError>("{% set s = 'x' * 10000000 %}{% for i in range(1000000) %}{{ s[-1] }}{% endfor %}",
                          {"step limit exceeded"});
  expect_renders("{% set s = 'x' * 10000000 %}{% for i in range(100000) %}{{ s[5] }}{% endfor %}",
                 std::string(100000, 'x'));  // s[k] walks k characters, not the whole string
  expect_limit<DataError>("{{ range(1000000)|unique|list|length }}", {"step limit exceeded"});
  expect_limit<DataError>(
      "{% set l = range(1000000)|list %}{% for i in range(1000000) %}{% if l == l[:] %}{% endif %}{% endfor %}",
      {"step limit exceeded"});
  expect_limit<DataError>("{% set l = range(1000000)|list %}{% for i in range(1000000) %}{{ l|length }}{% set x = l|sort %}{% endfor %}",
                          {"step limit exceeded"});
  expect_limit<DataError>("{{ ([[0]] * 100000)|sum(start=[])|length }}", {"step limit exceeded"});
  // The same limits, set lower by the caller.
  RenderOptions o;
  o.max_steps = 1000;
  expect_limit<DataError>("{% for i in range(100000) %}{% endfor %}", {"step limit exceeded (more than 1000 steps)"}, "{}", o);
}

// ------------------------------------------------------------------ memory

TEST(JinjaLimits, EveryValueIsLimitedTo256MiB) {
  // Doubling a list: 2^40 items used to reach 19 GB. (Inside a for loop `set` is loop-local in
  // Jinja, so the first form does not actually grow; the namespace form does.)
  expect_renders("{% set l = [1] %}{% for i in range(40) %}{% set l = l + l %}{% endfor %}{{ l|length }}", "1");
  expect_limit<DataError>(
      "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
      {"line 1", "list too large (the limit of one value is 256 MiB)"});
  // Refused before anything is allocated.
  expect_limit<DataError>("{{ [1] * 10**9 }}", {"list too large"});
  expect_limit<DataError>("{{ 'a' * 10**10 }}", {"string too large"});
  expect_limit<DataError>("{{ range(10**12)|list }}", {"range() too large"});
  expect_limit<DataError>("{% set s = 'b' * 140000000 %}{% set t = s ~ s %}", {"string too large"});
  expect_limit<DataError>("{% set s = 'b' * 140000000 %}{% set t = s + s %}", {"string too large"});
  expect_limit<DataError>("{% set s = 'x' * 268435455 %}{{ [s] }}", {"string too large"});  // the largest string
  // Sharing is free (copies of a string or list share it).
  expect_renders("{% set s = 'x' * 100000000 %}{% set l = [s] * 1000000 %}{{ l|length }}", "1000000");
}

TEST(JinjaLimits, EveryOperationChecksTheSizeOfWhatItBuilds) {
  // The same per-value limit, lowered to 1 MiB so that reaching it is quick.
  RenderOptions o;
  o.max_value_bytes = size_t(1) << 20;
  auto limit = [&](const std::string& src, const char* what) { expect_limit<DataError>(src, {"line 1", what}, "{}", o); };
  limit("{% set l = [1] %}" + repeat("{% set l = l + l %}", 40), "list too large");
  limit("{{ 'ab' * 1000000 }}", "string too large");
  limit("{{ [1, 2] * 1000000 }}", "list too large");
  limit("{{ ('ab' * 200000)|list|length }}", "list of the characters of a string too large");
  limit("{% for c in 'ab' * 200000 %}{% endfor %}", "too large");
  limit("{{ (',' * 1000000).split(',')|length }}", "list too large");
  limit("{{ ('a\\n' * 500000).splitlines()|length }}", "list too large");
  limit("{{ ('a ' * 500000).split()|length }}", "list too large");
  limit("{{ ('a' * 1000).replace('a', 'x' * 10000) }}", "string too large");
  limit("{{ ('a' * 1000).replace('', 'x' * 10000) }}", "string too large");
  limit("{{ ('{0}' * 100000).format('x' * 100) }}", "string too large");
  limit("{{ ('%s' * 2000) % (('x' * 1000,) * 2000) }}", "string too large");
  limit("{{ ('x' * 100)|indent(2000000, true) }}", "string too large");
  limit("{{ ('x\\n' * 1000)|indent(2000) }}", "string too large");
  limit("{{ 'x'|center(2000000) }}", "string too large");
  limit("{{ '{:>2000000}'.format(1) }}", "string too large");
  limit("{{ '%2000000d' % 1 }}", "string too large");
  limit("{{ 'x'.zfill(2000000) }}", "string too large");
  limit("{{ [1]|batch(200000, 0)|list }}", "list too large");
  limit("{{ (['x' * 1000] * 2000)|join(',') }}", "string too large");
  limit("{{ ['x' * 1000] * 2000 }}", "string too large");
  limit("{{ (['x' * 1000] * 2000)|tojson }}", "tojson result too large");
  limit("{{ [[[[[1, 2]]]]]|tojson(indent='x' * 100000) }}", "tojson result too large");
  limit("{% set s = 'x' * 1048575 %}{{ 'ab' ~ s }}", "string too large");
  limit("{% set s = 'x' * 1048575 %}{{ '%s%s' % ('ab', s) }}", "string too large");
  limit("{% set s = 'x' * 1048575 %}{{ ('ab', s)|string }}", "string too large");
  expect_renders("{{ ('x' * 100)|indent(2000000) }}|{{ 'x'|indent(100) }}", std::string(100, 'x') + "|x", "{}", o);
  nlohmann::ordered_json d = nlohmann::ordered_json::object();
  for (int k = 0; k < 10000; ++k) d["k" + std::to_string(k)] = k;
  expect_limit<DataError>("{{ dict(d)|length }}", {"line 1", "dict too large"}, nlohmann::ordered_json{{"d", d}}.dump(), o);
  // The output has its own limit (256 MiB by default).
  RenderOptions small;
  small.max_output = size_t(1) << 20;
  expect_limit<DataError>("{% for i in range(1000000) %}{{ 'x' * 1000 }}{% endfor %}",
                          {"rendered output exceeds the size limit"}, "{}", small);
}

TEST(JinjaLimits, AllValuesOfARenderShareOneMemoryBudget) {
  // Many values, each under the 256 MiB limit: their total is limited (1 GiB by default; lowered here
  // to keep the test fast).
  RenderOptions o;
  o.max_memory = size_t(64) << 20;
  expect_limit<DataError>(
      "{% set ns = namespace(l=[]) %}{% set s = 'x' * 4000000 %}{% for i in range(1000) %}"
      "{% set ns.l = ns.l + [s ~ i] %}{% endfor %}",
      {"line 1", "memory limit exceeded"}, "{}", o);
  expect_limit<DataError>("{% set ns = namespace() %}{% for i in range(1000000) %}{% set ns.l = range(1000000)|list %}"
                          "{% set ns.m = ns.l|reverse|list %}{% endfor %}",
                          {"limit"}, "{}", o);
  // The same program within the budget renders, and the budget is per render.
  Template t("{% set ns = namespace(l=[]) %}{% set s = 'x' * 4000000 %}{% for i in range(5) %}"
             "{% set ns.l = ns.l + [s ~ i] %}{% endfor %}{{ ns.l|length }}");
  for (int k = 0; k < 20; ++k) EXPECT_EQ(t.render(Value::dict(), o), "5");
}

// ------------------------------------------------------------------ real templates

// The corpus of real chat templates (tests/fixtures/chat_templates) over its test conversations,
// scaled up: the budgets must leave a wide margin for real use, here conversations 50x longer.
TEST(JinjaLimits, RealTemplatesStayFarBelowTheLimits) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(AM_SOURCE_DIR) / "tests" / "fixtures" / "chat_templates";
  auto slurp = [](const fs::path& p) {
    std::ifstream f(p, std::ios::binary);
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
  };
  using ojson = nlohmann::ordered_json;
  std::vector<std::pair<std::string, ojson>> templates;  // source, special tokens
  ojson corpus = ojson::parse(slurp(dir / "corpus.json"));
  for (auto it = corpus.begin(); it != corpus.end(); ++it)
    templates.emplace_back(it.value()["template"].get<std::string>(), it.value()["special_tokens"]);
  ojson named = ojson::parse(slurp(dir / "templates.json"));
  for (auto it = named.begin(); it != named.end(); ++it)
    templates.emplace_back(slurp(dir / it.value()["file"].get<std::string>()), it.value()["special_tokens"]);
  std::vector<ojson> convs;
  {
    std::ifstream f(dir / "conversations.jsonl");
    std::string line;
    while (std::getline(f, line))
      if (!line.empty()) convs.push_back(ojson::parse(line));
  }
  ASSERT_GE(templates.size(), 100u);
  ASSERT_FALSE(convs.empty());

  uint64_t max_steps = 0;
  size_t max_memory = 0;
  int renders = 0;
  for (const auto& [src, special] : templates) {
    Template t(src);
    for (const auto& c : convs) {
      // The conversation's turns repeated 50 times (keeping a leading system turn first).
      ojson msgs = ojson::array();
      const ojson& m = c["messages"];
      size_t first = (!m.empty() && m[0].value("role", "") == "system") ? 1 : 0;
      if (first) msgs.push_back(m[0]);
      for (int k = 0; k < 50; ++k)
        for (size_t i = first; i < m.size(); ++i) msgs.push_back(m[i]);
      ojson ctx = special.is_object() ? special : ojson::object();
      ctx["messages"] = msgs;
      ctx["add_generation_prompt"] = true;
      if (c.contains("tools")) ctx["tools"] = c["tools"];
      if (c.contains("kwargs"))
        for (auto it = c["kwargs"].begin(); it != c["kwargs"].end(); ++it) ctx[it.key()] = it.value();
      jinja::RenderStats stats;
      RenderOptions o;
      o.stats = &stats;
      std::tm now{};
      now.tm_year = 125;
      o.now = now;
      try {
        t.render(Value::from_json(ctx), o);
      } catch (const DataError&) {
        // raise_exception() of templates that reject a conversation shape
      }
      max_steps = std::max(max_steps, stats.steps);
      max_memory = std::max(max_memory, stats.peak_memory);
      ++renders;
    }
  }
  std::printf("[jinja limits] %d renders of %zu real templates (conversations x50): at most %llu steps (limit %llu), "
              "%zu KiB of values (limit %zu KiB)\n",
              renders, templates.size(), static_cast<unsigned long long>(max_steps),
              static_cast<unsigned long long>(jinja::kMaxSteps), max_memory >> 10, jinja::kMaxRenderMemory >> 10);
  EXPECT_LT(max_steps, jinja::kMaxSteps / 20);
  EXPECT_LT(max_memory, jinja::kMaxRenderMemory / 100);
}

// ------------------------------------------------------------------ fuzz

namespace {

// Random token soup biased towards template syntax, so that a fair share of the templates parse and
// run: loops, ranges, huge numbers, filters, macros, namespaces.
std::string random_template(std::mt19937_64& rng) {
  static const char* kTokens[] = {
      "{{ ", " }}", "{% ", " %}", "{%- ", " -%}", "for ", " in ", "endfor", "if ", "elif ", "else", "endif", "set ",
      " = ", "macro ", "endmacro", "call ", "endcall", "filter ", "endfilter", "x", "y", "ns", "ns.a", "loop.index",
      "m(", "f(", ")", "(", "[", "]", "{", "}", ",", ":", ".", "|", "~", "+", "-", "*", "/", "//", "%", "**", "==",
      "<", "not ", " and ", " or ", " is ", "defined", "range(", "namespace(a=", "0", "1", "2", "-1", "10",
      "1000000", "9223372036854775807", "(-9223372036854775807 - 1)", "1.5", "1e308", "'a'", "'%s'", "'{}'",
      "\"b\"", "''", "none", "true", "upper", "length", "list", "join", "tojson", "string", "sort", "unique",
      "reverse", "map(", "select", "first", "sum", "batch(", "center(", "indent(", "replace(", "format(", "int",
      "abs", "items", "dictsort", "split(", "strip()", "title", "messages", "message", "message.content",
      "message['role']", "raise_exception(", "caller()", "varargs", "text ", "\n", " "};
  const size_t n_tokens = sizeof(kTokens) / sizeof(kTokens[0]);
  std::uniform_int_distribution<size_t> pick(0, n_tokens - 1);
  std::uniform_int_distribution<int> len(1, 60);
  std::string s;
  int n = len(rng);
  for (int k = 0; k < n; ++k) s += kTokens[pick(rng)];
  return s;
}

// Random well-formed templates from a small grammar: most of them parse, so this exercises evaluation
// (extreme numbers, every operator, filters with random arguments, loops, recursive macros).
class TemplateGen {
 public:
  explicit TemplateGen(std::mt19937_64& rng) : rng_(rng) {}

  std::string tmpl() {
    std::string s = "{% set ns = namespace(a=1, l=[]) %}";
    int n = 1 + pick(4);
    for (int k = 0; k < n; ++k) s += stmt(3);
    return s;
  }

 private:
  std::mt19937_64& rng_;
  int pick(int n) { return static_cast<int>(rng_() % static_cast<uint64_t>(n)); }
  template <size_t N>
  const char* one(const char* const (&xs)[N]) { return xs[pick(static_cast<int>(N))]; }

  std::string expr(int d) {
    static const char* const kAtoms[] = {
        "0", "1", "2", "-1", "7", "255", "2147483648", "9223372036854775807", "(-9223372036854775807 - 1)",
        "10 ** 18", "0.0", "-0.0", "1.5", "1e308", "''", "'a'", "'ab'", "'%s'", "'{}'", "'héllo'", "none", "true",
        "x", "y", "ns.a", "ns.l", "messages", "i", "loop.index", "m", "range(3)", "namespace(a=2)", "[]", "{}"};
    static const char* const kOps[] = {" + ", " - ", " * ", " / ", " // ", " % ", " ** ", " ~ ", " == ", " < ",
                                       " in ", " and ", " or ", " != ", " >= "};
    static const char* const kFilters[] = {
        "upper", "length", "list", "string", "tojson", "sort", "unique", "reverse", "first", "last", "sum", "int",
        "abs", "trim", "title", "items", "join(', ')", "map('string')", "select", "batch(2)", "center(9)",
        "indent(2)", "replace('a', 'bb')", "format(1)", "default(0)", "dictsort", "min", "max", "wordcount",
        "round(2)", "float", "e", "safe", "tojson(indent=2)", "batch(3, 0)", "map(attribute='role')",
        "selectattr('role')", "join", "attr('a')", "count", "capitalize", "lower", "unique(attribute='a')"};
    if (d <= 0) return one(kAtoms);
    switch (pick(12)) {
      case 0: case 1: return one(kAtoms);
      case 2: return expr(d - 1) + one(kOps) + expr(d - 1);
      case 3: return expr(d - 1) + "|" + one(kFilters);
      case 4: return "[" + expr(d - 1) + ", " + expr(d - 1) + "]";
      case 5: return "{'k': " + expr(d - 1) + ", 'a': " + expr(d - 1) + "}";
      case 6: return "(" + expr(d - 1) + ")[" + expr(d - 1) + "]";
      case 7: return "(" + expr(d - 1) + ")[" + expr(d - 1) + ":" + expr(d - 1) + ":" + expr(d - 1) + "]";
      case 8: return "range(" + expr(d - 1) + ", " + expr(d - 1) + ")";
      case 9: return expr(d - 1) + " if " + expr(d - 1) + " else " + expr(d - 1);
      case 10: return "(" + expr(d - 1) + ")." + one({"upper()", "split(',')", "ljust(5)", "zfill(4)", "count('a')",
                                                       "startswith('a')", "items()", "get('k')", "role", "a"});
      default: return "-" + expr(d - 1);
    }
  }

  std::string stmt(int d) {
    if (d <= 0) return "{{ " + expr(2) + " }}";
    switch (pick(9)) {
      case 0: case 1: return "{{ " + expr(3) + " }}";
      case 2: return "{% set x = " + expr(3) + " %}";
      case 3: return "{% set ns.a = " + expr(3) + " %}{% set ns.l = ns.l + [ns.a] %}";
      case 4: return "{% for i in " + expr(2) + " %}" + stmt(d - 1) + stmt(d - 1) + "{% endfor %}";
      case 5: return "{% if " + expr(2) + " %}" + stmt(d - 1) + "{% else %}" + stmt(d - 1) + "{% endif %}";
      case 6:
        return "{% macro m(n) %}" + stmt(d - 1) + "{% if n > 0 %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}"
               "{{ m(" + expr(1) + ") }}";
      case 7: return "{% filter upper %}" + stmt(d - 1) + "{% endfilter %}";
      default: return "text ";
    }
  }
};

std::string random_bytes(std::mt19937_64& rng) {
  static const char kAlphabet[] = "{}%#-+()[]|.,:~*/'\"<>=! \nabxyz019_\\";
  std::uniform_int_distribution<size_t> pick(0, sizeof(kAlphabet) - 2);
  std::uniform_int_distribution<int> len(0, 80);
  std::string s;
  int n = len(rng);
  for (int k = 0; k < n; ++k) s += kAlphabet[pick(rng)];
  return s;
}

// Either renders or throws am::Error; anything else (another exception type) fails the test, and a
// crash or hang fails the whole binary.
void render_or_error(const std::string& src, const Value& ctx, const RenderOptions& opts, int& rendered, int& errors) {
  try {
    Template t(src, "fuzz");
    t.render(ctx, opts);
    ++rendered;
  } catch (const am::Error&) {
    ++errors;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "non-am::Error exception " << e.what() << " for template:\n" << src;
  }
}

}  // namespace

TEST(JinjaLimits, RandomTemplatesRenderOrThrowTypedErrors) {
  Value ctx = Value::from_json(nlohmann::ordered_json::parse(
      R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [1, {"a": null}]}],
          "x": [1, 2, 3], "y": {"k": "v"}})"));
  RenderOptions o;
  o.max_steps = 200000;            // keep every case fast; the limits themselves are tested above
  o.max_memory = size_t(64) << 20;
  std::mt19937_64 rng(20240726);
  int rendered = 0, errors = 0;
  auto t0 = Clock::now();
  for (int k = 0; k < 4000; ++k) render_or_error(random_template(rng), ctx, o, rendered, errors);
  for (int k = 0; k < 2000; ++k) render_or_error(random_bytes(rng), ctx, o, rendered, errors);
  TemplateGen gen(rng);
  for (int k = 0; k < 3000; ++k) render_or_error(gen.tmpl(), ctx, o, rendered, errors);
  // Mutations of a real-looking template: delete / duplicate / swap random spans.
  const std::string base =
      "{% set ns = namespace(n=0) %}{% for message in messages %}{% if message['role'] == 'user' %}"
      "{{ '<|user|>' ~ message['content'] | string | trim }}{% set ns.n = ns.n + 1 %}{% elif loop.last %}"
      "{{ message.content|tojson }}{% endif %}{% endfor %}{{ ns.n * 2 ** 10 }}{{ x|map('string')|join(',') }}";
  for (int k = 0; k < 2000; ++k) {
    std::string s = base;
    std::uniform_int_distribution<size_t> at(0, s.size() - 1);
    for (int m = 0; m < 3; ++m) {
      size_t a = at(rng), b = at(rng);
      if (a > b) std::swap(a, b);
      switch (rng() % 3) {
        case 0: s.erase(a, b - a); break;
        case 1: s.insert(a, s.substr(a, std::min<size_t>(b - a, 200))); break;
        default: std::swap(s[a], s[b]); break;
      }
      if (s.empty()) s = "x";
      at = std::uniform_int_distribution<size_t>(0, s.size() - 1);
    }
    render_or_error(s, ctx, o, rendered, errors);
  }
  std::printf("[jinja limits] fuzz: %d templates rendered, %d threw am::Error\n", rendered, errors);
  EXPECT_GT(rendered, 100);
  EXPECT_GT(errors, 100);
  EXPECT_LT(since(t0), 60.0);
}
