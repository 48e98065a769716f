// MLA column ops (contract in mla_ops.h): checks here, then the CPU reference (backend/cpu/mla_cols.cpp) or the
// CUDA kernels (backend/cuda/mla_cols.cu).
#include "ops/mla_ops.h"

#include <string>

#include "backend/cpu/mla_cols.h"
#include "core/error.h"
#include "ops/op_checks.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/mla_cols.h"
#endif

namespace am::ops {
namespace {

using detail::describe;
using detail::device_of;
using detail::shape_error;

struct ColDims {
  int64_t R, G, C, w;
};

ColDims check(const char* op, const Tensor& wide, int64_t col, bool interleave, const Tensor& narrow) {
  if (wide.ndim() != 2 && wide.ndim() != 3) shape_error(op, describe("wide", wide) + ": expected [R, C] or [R, G, C]");
  const ColDims d{wide.dim(0), wide.ndim() == 3 ? wide.dim(1) : 1, wide.dim(-1), narrow.ndim() >= 1 ? narrow.dim(-1) : 0};
  if (narrow.ndim() < 2 || d.w < 1 || narrow.numel() != d.R * d.w)
    shape_error(op, describe("narrow", narrow) + ": expected [R = " + std::to_string(d.R) + ", w] for " +
                        describe("wide", wide));
  if (col < 0 || col + d.w > d.C)
    shape_error(op, "columns [" + std::to_string(col) + ", " + std::to_string(col + d.w) + ") are outside the C = " +
                        std::to_string(d.C) + " columns of " + describe("wide", wide));
  if (interleave && d.w % 2 != 0)
    shape_error(op, describe("narrow", narrow) + ": an interleaved rope block needs an even width");
  if (wide.dtype() != narrow.dtype())
    shape_error(op, describe("wide", wide) + ", " + describe("narrow", narrow) + ": dtypes differ");
  return d;
}

void need_host_f32(const char* op, const Tensor& t, const char* name) {
  if (t.dtype() != DType::F32) shape_error(op, describe(name, t) + ": expected float32 (the CPU reference)");
}

}  // namespace

void mla_gather_cols(const Tensor& wide, int64_t col, bool interleave, Tensor& narrow) {
  const char* op = "mla_gather_cols";
  const DeviceType dev = device_of(op, {{"wide", &wide}, {"narrow", &narrow}});
  const ColDims d = check(op, wide, col, interleave, narrow);
  if (d.R == 0) return;
#ifdef AM_WITH_CUDA
  if (dev == DeviceType::CUDA) return cuda::mla_gather_cols(wide, col, interleave, narrow);
#endif
  if (dev != DeviceType::CPU) throw DeviceError(std::string("op ") + op + ": CUDA backend not built");
  need_host_f32(op, wide, "wide");
  cpu::mla_gather_cols(wide.f32(), d.R, d.G, d.C, col, interleave, d.w, narrow.f32());
}

void mla_scatter_cols(const Tensor& narrow, bool interleave, Tensor& wide, int64_t col) {
  const char* op = "mla_scatter_cols";
  const DeviceType dev = device_of(op, {{"narrow", &narrow}, {"wide", &wide}});
  const ColDims d = check(op, wide, col, interleave, narrow);
  if (d.R == 0) return;
#ifdef AM_WITH_CUDA
  if (dev == DeviceType::CUDA) return cuda::mla_scatter_cols(narrow, interleave, wide, col);
#endif
  if (dev != DeviceType::CPU) throw DeviceError(std::string("op ") + op + ": CUDA backend not built");
  need_host_f32(op, wide, "wide");
  cpu::mla_scatter_cols(narrow.f32(), d.R, d.w, interleave, wide.f32(), d.G, d.C, col);
}

}  // namespace am::ops
