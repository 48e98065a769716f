// Argument checks shared by the op front-ends (ops.cpp, moe_ops.cpp, gpt_oss_ops.cpp, mamba2_ops.cpp, ...): every
// error names the op and the offending tensors' shapes and dtypes. Also the route to the CUDA backend.
#pragma once
#include <initializer_list>
#include <string>

#include "core/error.h"
#include "core/tensor.h"
#include "ops/trace.h"

// In an op front-end with `const char* op` and `DeviceType dev` in scope: CUDA tensors return `call` (the
// backend kernel, queued on the context's stream) inside an NVTX range named after the op, so a GPU trace shows
// each op by its ops:: name; in a build without CUDA they are a DeviceError naming the op. Everything after the
// route is the CPU reference path.
#ifdef AM_WITH_CUDA
#define AM_OP_ROUTE_CUDA(call)                  \
  if (dev == ::am::DeviceType::CUDA) {          \
    ::am::ops::TraceRange am_op_range_(op);     \
    return call;                                \
  }
#else
#define AM_OP_ROUTE_CUDA(call)           \
  if (dev == ::am::DeviceType::CUDA)     \
  throw ::am::DeviceError(std::string("op ") + op + ": CUDA tensor given but the CUDA backend is not built")
#endif

namespace am::ops::detail {

// A named argument, for error messages.
struct Arg {
  const char* name;
  const Tensor* t;  // null: an optional argument that was not given
};

inline std::string describe(const char* name, const Tensor& t) {
  return std::string(name) + " " + shape_str(t.shape()) + " " + dtype_name(t.dtype());
}

[[noreturn]] inline void shape_error(const char* op, const std::string& msg) {
  throw ShapeError(std::string("op ") + op + ": " + msg);
}

// Checks that every given tensor is defined and that all live on one device; returns that device.
inline DeviceType device_of(const char* op, std::initializer_list<Arg> args) {
  const Arg* first = nullptr;
  for (const Arg& a : args) {
    if (!a.t) continue;
    if (!a.t->defined()) shape_error(op, std::string(a.name) + " is an undefined (empty) tensor");
    if (!first) {
      first = &a;
    } else if (a.t->device() != first->t->device()) {
      throw DeviceError(std::string("op ") + op + ": " + first->name + " is on " +
                        (first->t->device() == DeviceType::CPU ? "cpu" : "cuda") + " but " + a.name +
                        " is on " + (a.t->device() == DeviceType::CPU ? "cpu" : "cuda"));
    }
  }
  return first ? first->t->device() : DeviceType::CPU;
}

}  // namespace am::ops::detail
