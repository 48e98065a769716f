// Multi-tensor kernels of the optimizer step: the gradient sum of squares (for the norm and clipping)
// and the fused AdamW update.
//
// Multi-tensor launch: the tensor list is cut into chunks of kChunk elements; each CUDA block handles one
// chunk. A launch carries, by value in its parameter struct (< 4 KB), up to kMaxTensors tensor descriptors
// and kMaxBlocks (tensor, chunk) entries, so a 1.24B-parameter model needs ~40 launches of 512 blocks and no
// host-to-device copies. Every element is touched by exactly one thread: no atomics.
//
// AdamW arithmetic is am::Optimizer's (src/train/optimizer.cpp) operation by operation, with explicit
// round-to-nearest intrinsics so that nvcc cannot contract a*b+c into an FMA: the fp32 results are
// bit-identical to the CPU optimizer. Bias corrections are computed on the host in double, as torch does.
// Bytes per parameter: read w, g, m, v (16) + write w, m, v (12) + bf16 copy (2) = 30 -> 37 GB for 1.24B
// parameters, ~11 ms at 3.3 TB/s.
#include <algorithm>
#include <cmath>

#include "backend/cpu/adamw_bf16.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"

namespace am::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kMaxBlocks = 512;
constexpr int kTensorBits = 6;     // block entry = chunk << 6 | tensor
constexpr int kMaxTensors = 1 << kTensorBits;

// ---------------- sum of squares ----------------

struct SumSqArgs {
  const void* ptr[kMaxTensors];
  int64_t n[kMaxTensors];
  uint8_t dtype[kMaxTensors];  // DType
  uint8_t vec_ok[kMaxTensors];
  uint32_t block[kMaxBlocks];
  int64_t partial_offset;  // index of this launch's first block in `partial`
};
static_assert(sizeof(SumSqArgs) < 4000, "kernel parameters must stay under 4 KB");

// One term of a chunk's sum of squares, written as an explicit FMA so that the fused AdamW below (which takes the
// same sums as it reads the gradients, optimizer_in_bwd) adds exactly what this kernel adds, element for element.
__device__ __forceinline__ float sumsq_acc(float acc, float f) { return fmaf(f, f, acc); }

template <typename T>
__device__ float chunk_sumsq(const T* p, int64_t begin, int64_t end, bool vec_ok) {
  constexpr int V = 16 / sizeof(T);
  float acc = 0.f;
  if (vec_ok) {
    // begin is a multiple of kChunk (hence of V); the tail below handles end % V.
    const int64_t vend = begin + (end - begin) / V * V;
    for (int64_t i = begin + threadIdx.x * static_cast<int64_t>(V); i < vend; i += kThreads * V) {
      const Vec<T, V> v = load_vec<T, V>(p + i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc = sumsq_acc(acc, to_f(v.v[k]));
      }
    }
    begin = vend;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) acc = sumsq_acc(acc, to_f(p[i]));
  return acc;
}

__global__ void __launch_bounds__(kThreads) sumsq_kernel(SumSqArgs a, float* __restrict__ partial) {
  __shared__ float scratch[32];
  const uint32_t e = a.block[blockIdx.x];
  const int t = e & (kMaxTensors - 1);
  const int64_t chunk = e >> kTensorBits;
  const int64_t begin = chunk * kChunk, end = min(a.n[t], begin + kChunk);
  float acc = 0.f;
  switch (static_cast<DType>(a.dtype[t])) {
    case DType::F32: acc = chunk_sumsq(static_cast<const float*>(a.ptr[t]), begin, end, a.vec_ok[t]); break;
    case DType::BF16: acc = chunk_sumsq(static_cast<const bf16*>(a.ptr[t]), begin, end, a.vec_ok[t]); break;
    default: acc = chunk_sumsq(static_cast<const fp16*>(a.ptr[t]), begin, end, a.vec_ok[t]); break;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[a.partial_offset + blockIdx.x] = acc;
}

// *out = sum of partial[0..n) in double, fixed order (one block).
__global__ void __launch_bounds__(1024) reduce_partials_kernel(const float* __restrict__ partial, int64_t n,
                                                               double* __restrict__ out) {
  __shared__ double sh[1024];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += static_cast<double>(partial[i]);
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = sh[0];
}

__global__ void clip_coef_kernel(const double* __restrict__ sumsq, double max_norm, float* __restrict__ coef) {
  const double norm = sqrt(*sumsq);
  const double c = max_norm / (norm + 1e-6);
  *coef = static_cast<float>(c < 1.0 ? c : 1.0);
}

// ---------------- AdamW ----------------

// 64 tensors x 50 bytes + 2 KB of block entries would exceed 4 KB: AdamW launches carry at most 32 tensors.
constexpr int kAdamMaxTensors = 32;
struct AdamArgsSmall {
  float* w[kAdamMaxTensors];
  const float* g[kAdamMaxTensors];
  float* m[kAdamMaxTensors];
  float* v[kAdamMaxTensors];
  void* work[kAdamMaxTensors];
  int64_t n[kAdamMaxTensors];
  uint8_t work_dtype[kAdamMaxTensors];  // DType, or 255: no working copy
  uint8_t vec_ok[kAdamMaxTensors];
  uint32_t block[kMaxBlocks];
  // Non-null: each block also writes its chunk's gradient sum of squares (before grad_scale) to
  // partial[partial_offset + blockIdx.x], exactly as sumsq_kernel would (same chunks, same order per thread).
  float* partial;
  int64_t partial_offset;
};
static_assert(sizeof(AdamArgsSmall) + 64 < 4000, "kernel parameters must stay under 4 KB");

struct AdamScalars {
  float omb1, b2, omb2, step_size, bc2_sqrt, eps, decay, wd, grad_scale;
  int has_wd, decoupled;
  const float* d_grad_scale;
};

// One element, exactly as the CPU loop (see the file comment).
__device__ __forceinline__ void adam_elem(float& w, float g, float& m, float& v, const AdamScalars& s,
                                          float scale) {
  float gi = g;
  if (scale != 1.f) gi = __fmul_rn(gi, scale);
  if (s.has_wd) {
    if (s.decoupled) w = __fmul_rn(w, s.decay);
    else gi = __fadd_rn(gi, __fmul_rn(s.wd, w));
  }
  m = __fadd_rn(m, __fmul_rn(s.omb1, __fsub_rn(gi, m)));
  v = __fadd_rn(__fmul_rn(v, s.b2), __fmul_rn(__fmul_rn(s.omb2, gi), gi));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), s.eps);
  w = __fadd_rn(w, __fmul_rn(-s.step_size, __fdiv_rn(m, denom)));
}

// sq: also adds the gradients' squares to acc (chunk_sumsq's order when the grad is 16-byte aligned: vec_ok).
template <typename TW>
__device__ void adam_chunk(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                           float* __restrict__ v, TW* __restrict__ work, int64_t begin, int64_t end, bool vec_ok,
                           const AdamScalars& s, float scale, bool sq, float& acc) {
  if (vec_ok) {
    const int64_t vend = begin + (end - begin) / 4 * 4;
    for (int64_t i = begin + threadIdx.x * 4; i < vend; i += kThreads * 4) {
      float4 wv = *reinterpret_cast<const float4*>(w + i);
      const float4 gv = *reinterpret_cast<const float4*>(g + i);
      float4 mv = *reinterpret_cast<const float4*>(m + i);
      float4 vv = *reinterpret_cast<const float4*>(v + i);
      if (sq) acc = sumsq_acc(sumsq_acc(sumsq_acc(sumsq_acc(acc, gv.x), gv.y), gv.z), gv.w);
      adam_elem(wv.x, gv.x, mv.x, vv.x, s, scale);
      adam_elem(wv.y, gv.y, mv.y, vv.y, s, scale);
      adam_elem(wv.z, gv.z, mv.z, vv.z, s, scale);
      adam_elem(wv.w, gv.w, mv.w, vv.w, s, scale);
      *reinterpret_cast<float4*>(w + i) = wv;
      *reinterpret_cast<float4*>(m + i) = mv;
      *reinterpret_cast<float4*>(v + i) = vv;
      if (work) {
        Vec<TW, 4> o;
        o.v[0] = from_f<TW>(wv.x);
        o.v[1] = from_f<TW>(wv.y);
        o.v[2] = from_f<TW>(wv.z);
        o.v[3] = from_f<TW>(wv.w);
        store_vec<TW, 4>(work + i, o);
      }
    }
    begin = vend;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    float wv = w[i], mv = m[i], vv = v[i];
    if (sq) acc = sumsq_acc(acc, g[i]);
    adam_elem(wv, g[i], mv, vv, s, scale);
    w[i] = wv;
    m[i] = mv;
    v[i] = vv;
    if (work) work[i] = from_f<TW>(wv);
  }
}

__global__ void __launch_bounds__(kThreads) adamw_kernel(AdamArgsSmall a, AdamScalars s) {
  const uint32_t e = a.block[blockIdx.x];
  const int t = e & (kMaxTensors - 1);
  const int64_t chunk = e >> kTensorBits;
  const int64_t begin = chunk * kChunk, end = min(a.n[t], begin + kChunk);
  const float scale = s.d_grad_scale ? s.grad_scale * *s.d_grad_scale : s.grad_scale;
  const bool sq = a.partial != nullptr;
  float acc = 0.f;
  switch (a.work_dtype[t]) {
    case static_cast<uint8_t>(DType::BF16):
      adam_chunk(a.w[t], a.g[t], a.m[t], a.v[t], static_cast<bf16*>(a.work[t]), begin, end, a.vec_ok[t], s, scale,
                 sq, acc);
      break;
    case static_cast<uint8_t>(DType::F16):
      adam_chunk(a.w[t], a.g[t], a.m[t], a.v[t], static_cast<fp16*>(a.work[t]), begin, end, a.vec_ok[t], s, scale,
                 sq, acc);
      break;
    case static_cast<uint8_t>(DType::F32):
      adam_chunk(a.w[t], a.g[t], a.m[t], a.v[t], static_cast<float*>(a.work[t]), begin, end, a.vec_ok[t], s, scale,
                 sq, acc);
      break;
    default:
      adam_chunk(a.w[t], a.g[t], a.m[t], a.v[t], static_cast<bf16*>(nullptr), begin, end, a.vec_ok[t], s, scale, sq,
                 acc);
      break;
  }
  if (sq) {  // uniform per launch: every thread of the block reaches block_sum
    __shared__ float scratch[32];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) a.partial[a.partial_offset + blockIdx.x] = acc;
  }
}

// ---------------- AdamW over bf16 parameters, gradients and state ----------------
// Memory-bound (8 bytes read, 6 written per parameter): 16-byte loads of 8 bf16 per thread where the four tensors
// are aligned (one element per thread measured 39 ms per W2 step, ~4.5x its bandwidth floor), one at a time
// otherwise and for the tail. The element index (stochastic rounding's stream) is the same either way.
// optimizer_in_bwd reads its fp32 gradient scratch directly (g_f32): each gradient is rounded to bf16 as it is
// loaded, exactly what a copy_ into a bf16 buffer would give, so no bf16 gradient buffer and no copy pass (8 of the
// 24 bytes per parameter of copy + sum of squares + update); the sum of squares of the rounded gradients and the
// clip coefficient (rounded to bf16 as a scale_ pass would) ride along too.
struct AdamBf16Args {
  bf16* w[kAdamMaxTensors];
  const void* g[kAdamMaxTensors];  // bf16, or fp32 where g_f32
  bf16* m[kAdamMaxTensors];
  bf16* v[kAdamMaxTensors];
  uint64_t salt[kAdamMaxTensors];
  int64_t n[kAdamMaxTensors];
  uint8_t vec_ok[kAdamMaxTensors];
  uint8_t g_f32[kAdamMaxTensors];
  uint32_t block[kMaxBlocks];
  float* partial;  // as AdamArgsSmall::partial (the sums of the bf16-rounded gradients, before grad_scale)
  int64_t partial_offset;
  float grad_scale;  // != 1: g = bf16(g * grad_scale) before the update (ops::scale_ on a bf16 tensor)
};
static_assert(sizeof(AdamBf16Args) + 96 < 4000, "kernel parameters must stay under 4 KB");

__device__ __forceinline__ float bf_load(const bf16* p, int64_t i) { return __bfloat162float(p[i]); }
// x is a bf16 value held in fp32 (adamw_bf16 rounded it): the conversion is exact.
__device__ __forceinline__ void bf_store(bf16* p, int64_t i, float x) { p[i] = __float2bfloat16_rn(x); }
__device__ __forceinline__ float bf_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
// Gradient element i of tensor t as the bf16 update reads it (rounded to bf16 if stored as fp32).
__device__ __forceinline__ float bf_grad(const AdamBf16Args& a, int t, int64_t i) {
  return a.g_f32[t] ? bf_round(static_cast<const float*>(a.g[t])[i]) : bf_load(static_cast<const bf16*>(a.g[t]), i);
}

__global__ void __launch_bounds__(kThreads) adamw_bf16_kernel(AdamBf16Args a, adamw_bf16::Scalars s, uint64_t seed,
                                                              int64_t step) {
  const uint32_t e = a.block[blockIdx.x];
  const int t = e & (kMaxTensors - 1);
  const int64_t chunk = e >> kTensorBits;
  int64_t begin = chunk * kChunk;
  const int64_t end = min(a.n[t], begin + kChunk);
  const bool sq = a.partial != nullptr, scaled = a.grad_scale != 1.f;
  float acc = 0.f;
  if (a.vec_ok[t]) {
    const int64_t vend = begin + (end - begin) / 8 * 8;
    for (int64_t i = begin + threadIdx.x * 8; i < vend; i += kThreads * 8) {
      uint4 wv = *reinterpret_cast<const uint4*>(a.w[t] + i);
      float g8[8];
      if (a.g_f32[t]) {
        const float4 lo = *reinterpret_cast<const float4*>(static_cast<const float*>(a.g[t]) + i);
        const float4 hi = *reinterpret_cast<const float4*>(static_cast<const float*>(a.g[t]) + i + 4);
        g8[0] = bf_round(lo.x), g8[1] = bf_round(lo.y), g8[2] = bf_round(lo.z), g8[3] = bf_round(lo.w);
        g8[4] = bf_round(hi.x), g8[5] = bf_round(hi.y), g8[6] = bf_round(hi.z), g8[7] = bf_round(hi.w);
      } else {
        const uint4 gv = *reinterpret_cast<const uint4*>(static_cast<const bf16*>(a.g[t]) + i);
        const bf16* gb = reinterpret_cast<const bf16*>(&gv);
#pragma unroll
        for (int k = 0; k < 8; ++k) g8[k] = __bfloat162float(gb[k]);
      }
      uint4 mv = *reinterpret_cast<const uint4*>(a.m[t] + i);
      uint4 vv = *reinterpret_cast<const uint4*>(a.v[t] + i);
      bf16* w8 = reinterpret_cast<bf16*>(&wv);
      bf16* m8 = reinterpret_cast<bf16*>(&mv);
      bf16* v8 = reinterpret_cast<bf16*>(&vv);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if (sq) acc = sumsq_acc(acc, g8[k]);
        const float g = scaled ? bf_round(__fmul_rn(g8[k], a.grad_scale)) : g8[k];
        float w = __bfloat162float(w8[k]), m = __bfloat162float(m8[k]), v = __bfloat162float(v8[k]);
        const uint32_t rnd = s.stochastic ? adamw_bf16::sr_bits(seed, a.salt[t], step, i + k) : 0u;
        adamw_bf16::step(w, g, m, v, s, rnd);
        w8[k] = __float2bfloat16_rn(w);
        m8[k] = __float2bfloat16_rn(m);
        v8[k] = __float2bfloat16_rn(v);
      }
      *reinterpret_cast<uint4*>(a.w[t] + i) = wv;
      *reinterpret_cast<uint4*>(a.m[t] + i) = mv;
      *reinterpret_cast<uint4*>(a.v[t] + i) = vv;
    }
    begin = vend;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float gr = bf_grad(a, t, i);
    if (sq) acc = sumsq_acc(acc, gr);
    const float g = scaled ? bf_round(__fmul_rn(gr, a.grad_scale)) : gr;
    float w = bf_load(a.w[t], i), m = bf_load(a.m[t], i), v = bf_load(a.v[t], i);
    const uint32_t rnd = s.stochastic ? adamw_bf16::sr_bits(seed, a.salt[t], step, i) : 0u;
    adamw_bf16::step(w, g, m, v, s, rnd);
    bf_store(a.w[t], i, w);
    bf_store(a.m[t], i, m);
    bf_store(a.v[t], i, v);
  }
  if (sq) {  // uniform per launch: every thread of the block reaches block_sum
    __shared__ float scratch[32];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) a.partial[a.partial_offset + blockIdx.x] = acc;
  }
}

// Walks tensors x chunks and calls add_tensor(i) when tensor i enters the current launch (returns its slot)
// and flush(n_blocks) when a launch is full; `blocks` receives the packed entries.
template <typename AddTensor, typename Flush>
void plan_launches(const std::vector<int64_t>& sizes, int max_tensors, uint32_t* blocks, AddTensor&& add_tensor,
                   Flush&& flush) {
  int nb = 0, nt = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t chunks = (sizes[i] + kChunk - 1) / kChunk;
    if (chunks == 0) continue;
    int slot = -1;
    for (int64_t c = 0; c < chunks; ++c) {
      if (slot < 0) {
        if (nt == max_tensors) {
          flush(nb);
          nb = nt = 0;
        }
        slot = add_tensor(static_cast<int>(i), nt++);
      }
      blocks[nb++] = static_cast<uint32_t>(c << kTensorBits) | static_cast<uint32_t>(slot);
      if (nb == kMaxBlocks) {
        flush(nb);
        nb = nt = 0;
        slot = -1;  // the tensor must be re-registered in the next launch
      }
    }
  }
  if (nb) flush(nb);
}

int64_t total_chunks(const std::vector<int64_t>& sizes) {
  int64_t c = 0;
  for (int64_t n : sizes) c += (n + kChunk - 1) / kChunk;
  return c;
}

// The fused optimizers' per-block partial sums (one per chunk; undefined when no sum is asked for or no chunk).
Tensor sumsq_partials(int64_t nchunks, const double* d_sumsq, CudaContext& ctx) {
  return d_sumsq && nchunks > 0 ? Tensor::empty({nchunks}, DType::F32, ctx.allocator()) : Tensor();
}

// The fused optimizers' sum of squares: their per-block partials reduced into *d_sumsq (no tensors: 0).
void finish_sumsq(const Tensor& partial, int64_t nchunks, double* d_sumsq, CudaContext& ctx) {
  if (!d_sumsq) return;
  if (nchunks == 0) {
    AM_CUDA_CHECK(cudaMemsetAsync(d_sumsq, 0, sizeof(double), ctx.stream()));
    return;
  }
  reduce_partials_kernel<<<1, 1024, 0, ctx.stream()>>>(partial.data<float>(), nchunks, d_sumsq);
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void sum_squares_multi_async(const std::vector<const Tensor*>& tensors, double* d_out, CudaContext& ctx) {
  const char* op = "sum_squares";
  if (!d_out) op_error(op, "d_out is null");
  std::vector<int64_t> sizes;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor* t = tensors[i];
    if (!t) op_error(op, "null tensor at index " + std::to_string(i));
    need_cuda(op, "tensor", *t);
    need_float(op, "tensor", *t);
    if (static_cast<uint64_t>(t->numel()) / kChunk >= (1ull << (32 - kTensorBits)))
      op_error(op, describe("tensor", *t) + ": too many elements for one tensor");
    sizes.push_back(t->numel());
  }
  const int64_t nchunks = total_chunks(sizes);
  if (nchunks == 0) {
    AM_CUDA_CHECK(cudaMemsetAsync(d_out, 0, sizeof(double), ctx.stream()));
    return;
  }
  Tensor partial = Tensor::empty({nchunks}, DType::F32, ctx.allocator());
  SumSqArgs a{};
  a.partial_offset = 0;
  plan_launches(
      sizes, kMaxTensors, a.block,
      [&](int i, int slot) {
        const Tensor* t = tensors[i];
        a.ptr[slot] = t->raw();
        a.n[slot] = t->numel();
        a.dtype[slot] = static_cast<uint8_t>(t->dtype());
        a.vec_ok[slot] = aligned_to(t->raw(), 16);
        return slot;
      },
      [&](int nb) {
        sumsq_kernel<<<nb, kThreads, 0, ctx.stream()>>>(a, partial.data<float>());
        AM_CUDA_CHECK_LAUNCH();
        a.partial_offset += nb;
      });
  reduce_partials_kernel<<<1, 1024, 0, ctx.stream()>>>(partial.data<float>(), nchunks, d_out);
  AM_CUDA_CHECK_LAUNCH();
}

double sum_squares_multi(const std::vector<const Tensor*>& tensors, CudaContext& ctx) {
  double* acc = alloc_device_scalar(ctx);
  struct Free {
    double* p;
    CudaContext& c;
    ~Free() { free_device_scalar(p, c); }
  } guard{acc, ctx};
  sum_squares_multi_async(tensors, acc, ctx);
  return read_device_scalar(acc, ctx);
}

double sum_squares(const Tensor& a, CudaContext& ctx) { return sum_squares_multi({&a}, ctx); }

void clip_coef_async(const double* d_sumsq, double max_norm, float* d_coef, CudaContext& ctx) {
  clip_coef_kernel<<<1, 1, 0, ctx.stream()>>>(d_sumsq, max_norm, d_coef);
  AM_CUDA_CHECK_LAUNCH();
}

void adamw_step(const std::vector<AdamWTensors>& params, const AdamWConfig& cfg, CudaContext& ctx) {
  const char* op = "adamw_step";
  if (cfg.step < 1) op_error(op, "step must be >= 1 (the step being taken)");
  std::vector<int64_t> sizes;
  for (const AdamWTensors& p : params) {
    if (!p.master || !p.grad || !p.exp_avg || !p.exp_avg_sq) op_error(op, "null tensor in the parameter list");
    for (auto [name, t] : {std::pair<const char*, const Tensor*>{"master", p.master},
                           {"grad", p.grad},
                           {"exp_avg", p.exp_avg},
                           {"exp_avg_sq", p.exp_avg_sq}}) {
      need_cuda(op, name, *t);
      need_dtype(op, name, *t, DType::F32);
      if (t->numel() != p.master->numel())
        op_error(op, describe(name, *t) + ": expected the element count of " + describe("master", *p.master));
    }
    if (p.working) {
      need_cuda(op, "working", *p.working);
      need_float(op, "working", *p.working);
      if (p.working->numel() != p.master->numel())
        op_error(op, describe("working", *p.working) + ": expected the element count of " + describe("master", *p.master));
    }
    sizes.push_back(p.master->numel());
  }
  // Scalars as the CPU optimizer rounds them (from doubles, as torch passes Python floats).
  AdamScalars s{};
  s.b2 = static_cast<float>(cfg.beta2);
  s.omb1 = static_cast<float>(1.0 - cfg.beta1);
  s.omb2 = static_cast<float>(1.0 - cfg.beta2);
  const double bc1 = 1.0 - std::pow(cfg.beta1, static_cast<double>(cfg.step));
  const double bc2 = 1.0 - std::pow(cfg.beta2, static_cast<double>(cfg.step));
  s.step_size = static_cast<float>(cfg.lr / bc1);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(cfg.eps);
  s.decay = static_cast<float>(1.0 - cfg.lr * cfg.weight_decay);
  s.wd = static_cast<float>(cfg.weight_decay);
  s.has_wd = cfg.weight_decay != 0.0;
  s.decoupled = cfg.decoupled;
  s.grad_scale = cfg.grad_scale;
  s.d_grad_scale = cfg.d_grad_scale;

  AdamArgsSmall a{};
  // The fused sum of squares: per-block partials as sum_squares_multi_async makes them, then its final reduction.
  const int64_t nchunks = total_chunks(sizes);
  Tensor partial = sumsq_partials(nchunks, cfg.d_sumsq, ctx);
  a.partial = partial.defined() ? partial.data<float>() : nullptr;
  a.partial_offset = 0;
  plan_launches(
      sizes, kAdamMaxTensors, a.block,
      [&](int i, int slot) {
        const AdamWTensors& p = params[i];
        a.w[slot] = p.master->data<float>();
        a.g[slot] = p.grad->data<float>();
        a.m[slot] = p.exp_avg->data<float>();
        a.v[slot] = p.exp_avg_sq->data<float>();
        a.work[slot] = p.working ? p.working->raw() : nullptr;
        a.work_dtype[slot] = p.working ? static_cast<uint8_t>(p.working->dtype()) : 255;
        a.n[slot] = p.master->numel();
        bool ok = aligned_to(a.w[slot], 16) && aligned_to(a.g[slot], 16) && aligned_to(a.m[slot], 16) &&
                  aligned_to(a.v[slot], 16);
        if (p.working) ok = ok && aligned_to(a.work[slot], 4 * dtype_size(p.working->dtype()));
        a.vec_ok[slot] = ok;
        return slot;
      },
      [&](int nb) {
        adamw_kernel<<<nb, kThreads, 0, ctx.stream()>>>(a, s);
        AM_CUDA_CHECK_LAUNCH();
        a.partial_offset += nb;
      });
  finish_sumsq(partial, nchunks, cfg.d_sumsq, ctx);
}

void adamw_bf16_step(const std::vector<AdamWBf16Tensors>& params, const AdamWBf16Hyper& h, const AdamWFused& f,
                     CudaContext& ctx) {
  const char* op = "adamw_bf16_step";
  std::vector<int64_t> sizes;
  for (const AdamWBf16Tensors& p : params) {
    for (auto [name, t] : {std::pair<const char*, const Tensor*>{"value", p.value},
                           {"grad", p.grad},
                           {"exp_avg", p.exp_avg},
                           {"exp_avg_sq", p.exp_avg_sq}}) {
      need_cuda(op, name, *t);
      if (t == p.grad && t->dtype() == DType::F32) continue;  // fp32 gradients are rounded to bf16 as they are read
      need_dtype(op, name, *t, DType::BF16);
    }
    for (auto [name, t] : {std::pair<const char*, const Tensor*>{"grad", p.grad},
                           {"exp_avg", p.exp_avg},
                           {"exp_avg_sq", p.exp_avg_sq}})
      if (t->numel() != p.value->numel())
        op_error(op, describe(name, *t) + ": expected the element count of " + describe("value", *p.value));
    if (static_cast<uint64_t>(p.value->numel()) / kChunk >= (1ull << (32 - kTensorBits)))
      op_error(op, describe("value", *p.value) + ": too many elements for one tensor");
    sizes.push_back(p.value->numel());
  }
  const adamw_bf16::Scalars s =
      adamw_bf16::scalars_of(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.step, h.decoupled, h.stochastic);
  AdamBf16Args a{};
  const int64_t nchunks = total_chunks(sizes);
  Tensor partial = sumsq_partials(nchunks, f.d_sumsq, ctx);
  a.partial = partial.defined() ? partial.data<float>() : nullptr;
  a.partial_offset = 0;
  a.grad_scale = f.grad_scale;
  plan_launches(
      sizes, kAdamMaxTensors, a.block,
      [&](int i, int slot) {
        const AdamWBf16Tensors& p = params[i];
        a.w[slot] = p.value->data<bf16>();
        a.g[slot] = p.grad->raw();
        a.g_f32[slot] = p.grad->dtype() == DType::F32;
        a.m[slot] = p.exp_avg->data<bf16>();
        a.v[slot] = p.exp_avg_sq->data<bf16>();
        a.salt[slot] = p.salt;
        a.n[slot] = p.value->numel();
        a.vec_ok[slot] = aligned_to(a.w[slot], 16) && aligned_to(a.g[slot], 16) && aligned_to(a.m[slot], 16) &&
                         aligned_to(a.v[slot], 16);
        return slot;
      },
      [&](int nb) {
        adamw_bf16_kernel<<<nb, kThreads, 0, ctx.stream()>>>(a, s, h.seed, h.step);
        AM_CUDA_CHECK_LAUNCH();
        a.partial_offset += nb;
      });
  finish_sumsq(partial, nchunks, f.d_sumsq, ctx);
}

}  // namespace am::cuda
