// Resource limits of the Jinja2 interpreter. Chat templates come from model repositories, which are
// untrusted: whatever a template (or the data rendered through it) does, parsing and rendering end
// within bounded time, stack and memory, with a typed error -- am::FormatError at parse time,
// am::DataError while rendering, "<name> line N: " first -- never a signal, a stack overflow or a hang.
// (Integer overflow is not a limit but a gap: Python's ints are unbounded, ours are 64-bit, so a result
// beyond int64 is a FormatError naming the operation, like other constructs outside the supported
// subset; division by zero is a DataError, as Python raises.)
//
//  - kMaxExprHeight (400): the height of one expression's syntax tree. Chains (`a|f|f|...`,
//    `x.y.y...`, `a ~ b ~ ...`) are parsed by loops, so this bounds the recursion of evaluating,
//    folding and destroying the tree; checked while parsing. Real templates stay below 30. (Nested
//    brackets, unary operators and blocks are bounded by the parser's own depth limit, 200.)
//  - kMaxNesting (1000): how deep evaluation may recurse at run time, expression levels + statement
//    levels + macro calls together (the macro call depth limit, 100, does not bound the stack by itself
//    when every macro level evaluates a tall expression). 1000 levels use about 1 MB of stack.
//  - kMaxValueDepth (400): nesting of values for the operations that walk them recursively (repr /
//    str(), ==, <, tojson, from_json, nested map filters). Values can be built deeper without recursion
//    (a loop wrapping a list in a list, a chain of namespaces); they are destroyed iteratively (see
//    ListData), and printing or comparing them fails cleanly. Model-repo JSON is limited to 256 levels.
//  - kMaxValueBytes (256 MiB, the limit strings always had): one string, or the slots of one list or
//    dict, estimated before the operation that would build it (`+`, `*`, `~`, `|list`, split, format
//    widths, ...), so an oversized value is refused before its memory is taken.
//  - kMaxRenderMemory (1 GiB): everything alive at once during one render (strings longer than 15
//    bytes -- shared, never copied -- and list / dict slots), so that many values under the per-value
//    limit cannot add up.
//  - kMaxSteps (20 million): the work of one render: one step per expression node and statement, 16
//    more per loop iteration, and work proportional to what builtins process (1 step per item, per 16
//    bytes decoded, per 64 bytes copied or searched), so that a step costs about the same time
//    whatever the template does (~50-100 ns): the budget is one or two seconds of work. The real
//    templates of tests/fixtures/chat_templates over conversations 50x longer than their test ones
//    (up to 551 messages) take at most 2.5% of it (test_jinja_limits.cpp checks); the costliest are
//    quadratic in the number of messages (Command-A's tool results: the limit is near 1300 messages).
//
// Each render has its own budget (RenderOptions can lower or raise it); the limits are checked with an
// increment and a compare, cheap enough that rendering real templates is as fast as before.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace am::jinja {

struct DictData;

constexpr int kMaxExprHeight = 400;
constexpr int kMaxNesting = 1000;
constexpr int kMaxValueDepth = 400;
constexpr size_t kMaxValueBytes = size_t(1) << 28;
constexpr size_t kMaxRenderMemory = size_t(1) << 30;
constexpr uint64_t kMaxSteps = 20'000'000;

namespace detail {
// Errors raised while evaluating; the interpreter adds the template name and line and turns them
// into am::DataError (Runtime, Raise, Limit) or am::FormatError (Unsupported). Limit errors are never
// deferred or swallowed (lazy filters defer Runtime errors only).
struct EvalError : std::runtime_error {
  enum class Kind { Runtime, Unsupported, Raise, Limit };
  Kind kind;
  EvalError(Kind k, const std::string& m) : std::runtime_error(m), kind(k) {}
};
[[noreturn]] void fail_limit(const std::string& msg);  // Limit
}  // namespace detail

// The budget of one render. Values created while it is installed (BudgetScope) are charged to it and
// credited back when destroyed.
struct RenderBudget {
  uint64_t steps = 0;
  uint64_t max_steps = kMaxSteps;
  size_t memory = 0;
  size_t peak_memory = 0;
  size_t max_memory = kMaxRenderMemory;
  size_t max_value_bytes = kMaxValueBytes;
  // namespace() / loop objects of this render: the only mutable values, hence the only way to build a
  // reference cycle; their attributes are dropped when the render ends so that cycles are not leaked.
  std::vector<std::weak_ptr<DictData>> namespaces;
  size_t namespaces_compact_at = 1024;
};

// Installs `b` as this thread's render budget for its lifetime (restores the previous one after).
class BudgetScope {
 public:
  explicit BudgetScope(RenderBudget& b);
  ~BudgetScope();
  BudgetScope(const BudgetScope&) = delete;
  BudgetScope& operator=(const BudgetScope&) = delete;

 private:
  RenderBudget& b_;
  RenderBudget* prev_;
};

namespace limits {

extern thread_local constinit RenderBudget* tl_budget;
extern thread_local constinit int tl_value_depth;

[[noreturn]] void steps_exceeded();

// Counts `n` steps of work against the current render's budget (nothing outside a render).
inline void tick(uint64_t n = 1) {
  RenderBudget* b = tl_budget;
  if (b && (b->steps += n) > b->max_steps) steps_exceeded();
}
// Work proportional to `bytes` bytes: processed one character at a time (decoding, case mapping,
// repr) -- or copied / searched in bulk (memcpy, memchr, memcmp), about 4x faster.
inline void tick_bytes(size_t bytes) { tick(1 + bytes / 16); }
inline void tick_copy(size_t bytes) { tick(1 + bytes / 64); }

// Charges `bytes` of memory to the current render (checking the render's memory limit); returns what
// was charged (0 outside a render), to be given back with credit().
size_t charge(size_t bytes);
void credit(size_t bytes) noexcept;

// Throws a Limit error when one value of `bytes` bytes would exceed the render's max_value_bytes
// (kMaxValueBytes outside a render). `what` names the value ("string", "list", "dict", ...).
void check_value_size(size_t bytes, const char* what);
// a * b, or SIZE_MAX on overflow (so that check_value_size rejects it).
inline size_t mul_size(size_t a, size_t b) {
  size_t r;
  return __builtin_mul_overflow(a, b, &r) ? SIZE_MAX : r;
}

// Recursion guard of the operations that walk values (repr, ==, <, tojson, from_json).
struct ValueDepthGuard {
  explicit ValueDepthGuard(const char* op) {
    if (++tl_value_depth > kMaxValueDepth) overflow(op);
  }
  ~ValueDepthGuard() { --tl_value_depth; }
  ValueDepthGuard(const ValueDepthGuard&) = delete;
  ValueDepthGuard& operator=(const ValueDepthGuard&) = delete;

 private:
  [[noreturn]] static void overflow(const char* op);
};

}  // namespace limits
}  // namespace am::jinja
