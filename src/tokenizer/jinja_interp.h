// A Jinja2 interpreter for chat templates: renders like jinja2's ImmutableSandboxedEnvironment as
// transformers configures it (trim_blocks, lstrip_blocks, loopcontrols, `{% generation %}`, the
// globals raise_exception / strftime_now / namespace / range / dict / cycler / joiner, and
// transformers' `tojson`).
//
// Errors: syntax errors and constructs outside the supported subset throw am::FormatError, runtime
// errors (undefined values used where Python raises, type errors, raise_exception(msg)) throw
// am::DataError; every message starts with "<name> line N: ". Exceeding a limit (jinja_limits.h: nesting,
// steps, memory, value sizes) is a FormatError at parse time and a DataError while rendering; an
// integer result beyond 64 bits is a FormatError naming the operation. Nothing else escapes.
#pragma once
#include <ctime>
#include <optional>
#include <string>
#include <string_view>

#include "tokenizer/jinja_parser.h"
#include "tokenizer/jinja_value.h"

namespace am::jinja {

// What a render used of its budget (for tests and tuning).
struct RenderStats {
  uint64_t steps = 0;
  size_t peak_memory = 0;  // bytes
};

struct RenderOptions {
  // The "current time" strftime_now() formats; unset: the local time now.
  std::optional<std::tm> now;
  // Limits (never loop forever, never exhaust the stack or the memory; see jinja_limits.h): macro call
  // depth, output bytes, work steps and the memory of the values alive during the render.
  int max_call_depth = 100;
  size_t max_output = size_t(1) << 28;
  uint64_t max_steps = kMaxSteps;
  size_t max_memory = kMaxRenderMemory;
  size_t max_value_bytes = kMaxValueBytes;  // one string / list / dict
  // When set, receives the steps and peak memory of the render (also when it fails).
  RenderStats* stats = nullptr;
};

class Template {
 public:
  explicit Template(std::string_view source, std::string name = "chat_template");
  // `context` is a dict of the template's variables.
  std::string render(const Value& context, const RenderOptions& opts = {}) const;
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  Body body_;
};

}  // namespace am::jinja
