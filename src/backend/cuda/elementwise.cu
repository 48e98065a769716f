// Tensor helpers (to_device / to_host / zero_ / fill_) and the elementwise ops add_, scale_, copy_, dropout_.
// Memory-bound: each thread moves one 16-byte vector per tensor where every pointer is aligned
// (VEC = 8 for 2-byte dtypes, 4 otherwise), with a grid-stride loop and a scalar tail.
#include <cstring>

#include "backend/cpu/dropout_mask.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"

namespace am::cuda {
namespace {

constexpr int kThreads = 256;

// Grid for a grid-stride loop over `items`: enough blocks to fill the GPU several times over.
unsigned stride_grid(const CudaContext& ctx, int64_t items) {
  return grid_for(items, kThreads, static_cast<int64_t>(ctx.sm_count()) * 16);
}

template <typename TA, typename TB, int VEC>
__global__ void add_kernel(TA* __restrict__ a, const TB* __restrict__ b, int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec; i += stride) {
    Vec<TA, VEC> va = load_vec<TA, VEC>(a + i * VEC);
    const Vec<TB, VEC> vb = load_vec<TB, VEC>(b + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) va.v[j] = from_f<TA>(to_f(va.v[j]) + to_f(vb.v[j]));
    store_vec<TA, VEC>(a + i * VEC, va);
  }
  for (int64_t i = nvec * VEC + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    a[i] = from_f<TA>(to_f(a[i]) + to_f(b[i]));
}

template <typename T, int VEC>
__global__ void scale_kernel(T* __restrict__ a, float s, int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec; i += stride) {
    Vec<T, VEC> va = load_vec<T, VEC>(a + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) va.v[j] = from_f<T>(to_f(va.v[j]) * s);
    store_vec<T, VEC>(a + i * VEC, va);
  }
  for (int64_t i = nvec * VEC + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    a[i] = from_f<T>(to_f(a[i]) * s);
}

template <typename T>
__global__ void add_scalar_kernel(T* __restrict__ a, float s, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    a[i] = from_f<T>(to_f(a[i]) + s);
}

// a[i] = keep(seed, i) ? a[i] * scale : 0 with the host's mask (backend/cpu/dropout_mask.h): the hash of the
// flat element index, so the mask does not depend on the launch shape or the vector width.
template <typename T, int VEC>
__global__ void dropout_kernel(T* __restrict__ a, float p, float scale, uint64_t seed, int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec; i += stride) {
    Vec<T, VEC> va = load_vec<T, VEC>(a + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const bool k = dropout_mask::keep(seed, static_cast<uint64_t>(i * VEC + j), p);
      va.v[j] = from_f<T>(k ? __fmul_rn(to_f(va.v[j]), scale) : 0.f);
    }
    store_vec<T, VEC>(a + i * VEC, va);
  }
  for (int64_t i = nvec * VEC + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const bool k = dropout_mask::keep(seed, static_cast<uint64_t>(i), p);
    a[i] = from_f<T>(k ? __fmul_rn(to_f(a[i]), scale) : 0.f);
  }
}

template <typename TD, typename TS, int VEC>
__global__ void convert_kernel(TD* __restrict__ d, const TS* __restrict__ s, int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec; i += stride) {
    const Vec<TS, VEC> vs = load_vec<TS, VEC>(s + i * VEC);
    Vec<TD, VEC> vd;
#pragma unroll
    for (int j = 0; j < VEC; ++j) vd.v[j] = from_f<TD>(to_f(vs.v[j]));
    store_vec<TD, VEC>(d + i * VEC, vd);
  }
  for (int64_t i = nvec * VEC + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    d[i] = from_f<TD>(to_f(s[i]));
}

template <typename T, int VEC>
__global__ void fill_kernel(T* __restrict__ a, float value, int64_t n) {
  const T v = from_f<T>(value);
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  Vec<T, VEC> vv;
#pragma unroll
  for (int j = 0; j < VEC; ++j) vv.v[j] = v;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec; i += stride)
    store_vec<T, VEC>(a + i * VEC, vv);
  for (int64_t i = nvec * VEC + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    a[i] = v;
}

// 16-byte vectors when every pointer allows it; scalar otherwise (views at odd offsets).
template <typename TA, typename TB>
constexpr int vec_width() {
  return (sizeof(TA) == 2 && sizeof(TB) == 2) ? 8 : 4;
}

}  // namespace

// ---------------- tensors ----------------

Tensor empty(const Shape& shape, DType dtype, CudaContext& ctx) {
  return Tensor::empty(shape, dtype, ctx.allocator());
}

Tensor to_device(const Tensor& host, Allocator& alloc, CudaContext& ctx) {
  if (!host.defined()) op_error("to_device", "undefined tensor");
  if (host.device() != DeviceType::CPU) op_error("to_device", describe("host", host) + " is not a host tensor");
  if (alloc.device_type() != DeviceType::CUDA) op_error("to_device", "the allocator is not a CUDA allocator");
  ctx.make_current();
  Tensor d = Tensor::empty(host.shape(), host.dtype(), alloc);
  if (host.nbytes())
    AM_CUDA_CHECK(cudaMemcpyAsync(d.raw(), host.raw(), host.nbytes(), cudaMemcpyHostToDevice, ctx.stream()));
  ctx.synchronize();  // the host buffer may be freed as soon as we return
  return d;
}

Tensor to_device(const Tensor& host, CudaContext& ctx) { return to_device(host, ctx.allocator(), ctx); }

Tensor to_host(const Tensor& dev, CudaContext& ctx) {
  need_cuda("to_host", "dev", dev);
  ctx.make_current();
  Tensor h = Tensor::empty(dev.shape(), dev.dtype());
  if (dev.nbytes())
    AM_CUDA_CHECK(cudaMemcpyAsync(h.raw(), dev.raw(), dev.nbytes(), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  return h;
}

void zero_(Tensor& t, CudaContext& ctx) {
  need_cuda("zero_", "t", t);
  if (t.nbytes()) AM_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0, t.nbytes(), ctx.stream()));
}

void fill_(Tensor& t, float value, CudaContext& ctx) {
  need_cuda("fill_", "t", t);
  need_float("fill_", "t", t);
  const int64_t n = t.numel();
  if (n == 0) return;
  AM_DISPATCH_FLOAT(t.dtype(), "fill_", T, {
    T* p = t.data<T>();
    constexpr int V = vec_width<T, T>();
    if (aligned_to(p, sizeof(T) * V))
      fill_kernel<T, V><<<stride_grid(ctx, n / V + 1), kThreads, 0, ctx.stream()>>>(p, value, n);
    else
      fill_kernel<T, 1><<<stride_grid(ctx, n), kThreads, 0, ctx.stream()>>>(p, value, n);
  });
  AM_CUDA_CHECK_LAUNCH();
}

// ---------------- elementwise ----------------

void add_(Tensor& a, const Tensor& b, CudaContext& ctx) {
  const char* op = "add_";
  need_cuda(op, "a", a);
  need_cuda(op, "b", b);
  need_float(op, "a", a);
  need_float(op, "b", b);
  if (a.numel() != b.numel()) op_error(op, describe("a", a) + ", " + describe("b", b) + ": element counts differ");
  const int64_t n = a.numel();
  if (n == 0) return;
  AM_DISPATCH_FLOAT(a.dtype(), op, TA, {
    AM_DISPATCH_FLOAT(b.dtype(), op, TB, {
      TA* pa = a.data<TA>();
      const TB* pb = b.data<TB>();
      constexpr int V = vec_width<TA, TB>();
      if (aligned_to(pa, sizeof(TA) * V) && aligned_to(pb, sizeof(TB) * V))
        add_kernel<TA, TB, V><<<stride_grid(ctx, n / V + 1), kThreads, 0, ctx.stream()>>>(pa, pb, n);
      else
        add_kernel<TA, TB, 1><<<stride_grid(ctx, n), kThreads, 0, ctx.stream()>>>(pa, pb, n);
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void scale_(Tensor& a, float s, CudaContext& ctx) {
  const char* op = "scale_";
  need_cuda(op, "a", a);
  need_float(op, "a", a);
  const int64_t n = a.numel();
  if (n == 0) return;
  AM_DISPATCH_FLOAT(a.dtype(), op, T, {
    T* p = a.data<T>();
    constexpr int V = vec_width<T, T>();
    if (aligned_to(p, sizeof(T) * V))
      scale_kernel<T, V><<<stride_grid(ctx, n / V + 1), kThreads, 0, ctx.stream()>>>(p, s, n);
    else
      scale_kernel<T, 1><<<stride_grid(ctx, n), kThreads, 0, ctx.stream()>>>(p, s, n);
  });
  AM_CUDA_CHECK_LAUNCH();
}

// Tiny tensors only (norm weights): one element per thread, no vectors.
void add_scalar_(Tensor& a, float s, CudaContext& ctx) {
  const char* op = "add_scalar_";
  need_cuda(op, "a", a);
  need_float(op, "a", a);
  const int64_t n = a.numel();
  if (n == 0) return;
  AM_DISPATCH_FLOAT(a.dtype(), op, T, {
    add_scalar_kernel<T><<<stride_grid(ctx, n), kThreads, 0, ctx.stream()>>>(a.data<T>(), s, n);
  });
  AM_CUDA_CHECK_LAUNCH();
}

void copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t bytes_per_row, int64_t rows,
             CudaContext& ctx) {
  if (rows == 0 || bytes_per_row == 0) return;
  AM_CUDA_CHECK(cudaMemcpy2DAsync(dst, static_cast<size_t>(dst_pitch), src, static_cast<size_t>(src_pitch),
                                  static_cast<size_t>(bytes_per_row), static_cast<size_t>(rows),
                                  cudaMemcpyDeviceToDevice, ctx.stream()));
}

void copy_(Tensor& dst, const Tensor& src, CudaContext& ctx) {
  const char* op = "copy_";
  need_cuda(op, "dst", dst);
  need_cuda(op, "src", src);
  if (dst.numel() != src.numel())
    op_error(op, describe("dst", dst) + ", " + describe("src", src) + ": element counts differ");
  const int64_t n = dst.numel();
  if (n == 0 || dst.raw() == src.raw()) return;
  if (dst.dtype() == src.dtype()) {
    AM_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), dst.nbytes(), cudaMemcpyDeviceToDevice, ctx.stream()));
    return;
  }
  need_float(op, "dst", dst);
  need_float(op, "src", src);
  AM_DISPATCH_FLOAT(dst.dtype(), op, TD, {
    AM_DISPATCH_FLOAT(src.dtype(), op, TS, {
      TD* pd = dst.data<TD>();
      const TS* ps = src.data<TS>();
      constexpr int V = vec_width<TD, TS>();
      if (aligned_to(pd, sizeof(TD) * V) && aligned_to(ps, sizeof(TS) * V))
        convert_kernel<TD, TS, V><<<stride_grid(ctx, n / V + 1), kThreads, 0, ctx.stream()>>>(pd, ps, n);
      else
        convert_kernel<TD, TS, 1><<<stride_grid(ctx, n), kThreads, 0, ctx.stream()>>>(pd, ps, n);
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void dropout_(Tensor& x, float p, uint64_t seed, CudaContext& ctx) {
  const char* op = "dropout_";
  need_cuda(op, "x", x);
  if (!(p >= 0.f && p < 1.f))
    throw UsageError(std::string("cuda op ") + op + ": dropout probability p = " + std::to_string(p) +
                     " must be in [0, 1)");
  need_float(op, "x", x);
  const int64_t n = x.numel();
  if (p == 0.f || n == 0) return;
  const float scale = 1.0f / (1.0f - p);  // fp32, as the CPU reference computes it (src/ops/ops.cpp)
  AM_DISPATCH_FLOAT(x.dtype(), op, T, {
    T* px = x.data<T>();
    constexpr int V = vec_width<T, T>();
    if (aligned_to(px, sizeof(T) * V))
      dropout_kernel<T, V><<<stride_grid(ctx, n / V + 1), kThreads, 0, ctx.stream()>>>(px, p, scale, seed, n);
    else
      dropout_kernel<T, 1><<<stride_grid(ctx, n), kThreads, 0, ctx.stream()>>>(px, p, scale, seed, n);
  });
  AM_CUDA_CHECK_LAUNCH();
}

// ---------------- device scalars ----------------

double* alloc_device_scalar(CudaContext& ctx) {
  auto* p = static_cast<double*>(ctx.allocator().allocate(sizeof(double)));
  AM_CUDA_CHECK(cudaMemsetAsync(p, 0, sizeof(double), ctx.stream()));
  return p;
}
void free_device_scalar(double* p, CudaContext& ctx) { ctx.allocator().deallocate(p, sizeof(double)); }
double read_device_scalar(const double* p, CudaContext& ctx) {
  double h = 0;
  AM_CUDA_CHECK(cudaMemcpyAsync(&h, p, sizeof h, cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  return h;
}
void zero_device_scalar(double* p, CudaContext& ctx) {
  AM_CUDA_CHECK(cudaMemsetAsync(p, 0, sizeof(double), ctx.stream()));
}

}  // namespace am::cuda
