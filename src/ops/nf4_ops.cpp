// 4-bit op front door (contracts in nf4_ops.h): argument checks (ShapeError / DeviceError naming the op),
// then the CPU reference (backend/cpu/nf4.cpp) or the CUDA kernels (backend/cuda/nf4.cu).
#include "ops/nf4_ops.h"

#include <string>
#include <vector>

#include "backend/cpu/nf4.h"
#include "core/error.h"
#include "ops/op_checks.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/nf4.h"
#endif

namespace am::ops {
namespace {

using detail::describe;
using detail::shape_error;

cpu::Quant4Type cpu_type(Quant4Type t) { return t == Quant4Type::NF4 ? cpu::Quant4Type::NF4 : cpu::Quant4Type::FP4; }

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

[[noreturn]] void no_cuda(const char* op) {
  throw DeviceError(std::string("op ") + op + ": CUDA tensor given but the CUDA backend is not built");
}

Tensor dynamic_map_host() {
  Tensor m = Tensor::empty({256}, DType::F32);
  cpu::bnb_dynamic_map(m.f32());
  return m;
}

// Host: the fp32 absmax of every block (expanding a double-quantised one).
Tensor absmax_host(const Nf4Weight& w) {
  if (!w.nested) return w.absmax;
  Tensor a = Tensor::empty({w.nblocks()}, DType::F32);
  cpu::dequantize_absmax(w.nested->codes.data(), w.nblocks(), w.nested->absmax.f32(), w.nested->blocksize,
                         w.nested->map.f32(), w.nested->offset, a.f32());
  return a;
}

#ifdef AM_WITH_CUDA
Tensor move(const Tensor& t, DeviceType to) {
  if (!t.defined() || t.device() == to) return t;
  return to == DeviceType::CUDA ? cuda::to_device(t) : cuda::to_host(t);
}
#endif

}  // namespace

Nf4Weight nf4_quantize(const Tensor& w, const Nf4QuantizeOptions& opt) {
  const char* op = "nf4_quantize";
  if (!w.defined()) shape_error(op, "w is an undefined (empty) tensor");
  if (!is_float(w.dtype())) shape_error(op, describe("w", w) + ": expected a float tensor");
  if (w.numel() == 0) shape_error(op, describe("w", w) + ": nothing to quantise");
  const int64_t bs = opt.blocksize;
  if (bs < 32 || bs > 4096 || (bs & (bs - 1)))
    shape_error(op, "blocksize " + std::to_string(bs) + " is not one bitsandbytes supports (32, 64, ..., 4096)");
  if (opt.double_quant && opt.nested_blocksize <= 0)
    shape_error(op, "nested blocksize " + std::to_string(opt.nested_blocksize) + " must be positive");

  Nf4Weight q;
  q.shape = w.shape();
  q.blocksize = bs;
  q.type = opt.type;
  q.dtype = w.dtype();
  const int64_t n = w.numel(), nb = q.nblocks(), nb2 = (nb + opt.nested_blocksize - 1) / opt.nested_blocksize;

  if (w.device() == DeviceType::CPU) {
    q.packed = ByteTensor::empty((n + 1) / 2);
    Tensor absmax = Tensor::empty({nb}, DType::F32);
    cpu::quantize_4bit(w.raw(), w.dtype(), n, bs, cpu_type(opt.type), q.packed.data(), absmax.f32());
    if (!opt.double_quant) {
      q.absmax = absmax;
      return q;
    }
    Nf4Nested z;
    z.blocksize = opt.nested_blocksize;
    z.offset = cpu::mean_f32(absmax.f32(), nb);
    std::vector<float> centred(static_cast<size_t>(nb));
    for (int64_t i = 0; i < nb; ++i) centred[size_t(i)] = absmax.f32()[i] - z.offset;
    z.map = dynamic_map_host();
    z.codes = ByteTensor::empty(nb);
    z.absmax = Tensor::empty({nb2}, DType::F32);
    cpu::quantize_blockwise_8bit(centred.data(), nb, z.blocksize, z.map.f32(), z.codes.data(), z.absmax.f32());
    q.nested = std::move(z);
    return q;
  }
#ifdef AM_WITH_CUDA
  cuda::CudaContext& ctx = cuda::default_context();
  q.packed = ByteTensor::empty((n + 1) / 2, ctx.allocator());
  cuda::zero_(q.packed.words, ctx);
  Tensor absmax = cuda::empty({nb}, DType::F32, ctx);
  cuda::quantize_4bit(w.raw(), w.dtype(), n, bs, opt.type == Quant4Type::FP4, q.packed.data(), absmax.data<float>(),
                      ctx);
  if (!opt.double_quant) {
    q.absmax = absmax;
    return q;
  }
  Nf4Nested z;
  z.blocksize = opt.nested_blocksize;
  const Tensor host_absmax = cuda::to_host(absmax, ctx);  // the mean is taken on the host, as the CPU path does
  z.offset = cpu::mean_f32(host_absmax.f32(), nb);
  z.map = cuda::to_device(dynamic_map_host(), ctx);
  z.codes = ByteTensor::empty(nb, ctx.allocator());
  cuda::zero_(z.codes.words, ctx);
  z.absmax = cuda::empty({nb2}, DType::F32, ctx);
  cuda::quantize_blockwise_8bit(absmax.data<float>(), z.offset, nb, z.blocksize, z.map.data<float>(), z.codes.data(),
                                z.absmax.data<float>(), ctx);
  ctx.synchronize();  // `absmax` is freed on return
  q.nested = std::move(z);
  return q;
#else
  no_cuda(op);
#endif
}

void nf4_dequantize(const Nf4Weight& w, Tensor& out) {
  const char* op = "nf4_dequantize";
  check_nf4_weight(w, op);
  if (!out.defined()) shape_error(op, "out is an undefined (empty) tensor");
  if (!is_float(out.dtype())) shape_error(op, describe("out", out) + ": expected F32, BF16 or F16");
  if (out.numel() != w.numel())
    shape_error(op, describe("out", out) + ": the weight has shape " + shape_str(w.shape) + " (" +
                        std::to_string(w.numel()) + " elements)");
  if (out.device() != w.device())
    throw DeviceError(std::string("op ") + op + ": out and the 4-bit weight are on different devices");
  const int64_t n = w.numel();
  if (w.device() == DeviceType::CPU) {
    const Tensor a = absmax_host(w);
    cpu::dequantize_4bit(w.packed.data(), a.f32(), n, w.blocksize, cpu_type(w.type), out.raw(), out.dtype());
    return;
  }
#ifdef AM_WITH_CUDA
  cuda::Dequant4Args a{.packed = w.packed.data(), .n = n, .blocksize = w.blocksize, .fp4 = w.type == Quant4Type::FP4};
  if (w.nested) {
    a.codes = w.nested->codes.data();
    a.absmax2 = w.nested->absmax.data<float>();
    a.map = w.nested->map.data<float>();
    a.offset = w.nested->offset;
    a.blocksize2 = w.nested->blocksize;
  } else {
    a.absmax = w.absmax.data<float>();
  }
  cuda::dequantize_4bit(a, out.raw(), out.dtype());
#else
  no_cuda(op);
#endif
}

Tensor nf4_dequantize(const Nf4Weight& w, DType dtype) {
  if (w.device() != DeviceType::CPU)
    throw DeviceError("op nf4_dequantize: the 4-bit weight is on CUDA; pass an output tensor on the device");
  Tensor out = Tensor::empty(w.shape, dtype);
  nf4_dequantize(w, out);
  return out;
}

Tensor nf4_absmax(const Nf4Weight& w) {
  check_nf4_weight(w, "nf4_absmax");
  if (w.device() != DeviceType::CPU) return absmax_host(nf4_to_device(w, DeviceType::CPU));
  return absmax_host(w).clone();
}

Nf4Weight nf4_to_device(const Nf4Weight& w, DeviceType device) {
  check_nf4_weight(w, "nf4_to_device");
  if (w.device() == device) return w;
#ifdef AM_WITH_CUDA
  Nf4Weight r = w;
  r.packed.words = move(w.packed.words, device);
  r.absmax = move(w.absmax, device);
  if (w.nested) {
    r.nested->codes.words = move(w.nested->codes.words, device);
    r.nested->absmax = move(w.nested->absmax, device);
    r.nested->map = move(w.nested->map, device);
  }
  return r;
#else
  no_cuda("nf4_to_device");
#endif
}

}  // namespace am::ops
