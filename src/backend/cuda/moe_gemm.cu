// Grouped linear for MoE experts (contract in src/ops/moe_ops.h, entry points in moe.h).
//
// Row-major [R, C] is column-major [C, R] (leading dimension C), as in linear.cu. For expert e with rows
// r0 = offsets[e] .. r0 + m_e of x [M, K], weights w[e] [Nout, K], y [M, Nout]:
//   forward  y_e (Nout x m_e)  = op_T(w_e) (Nout x K) * x_e (K x m_e)       m=Nout n=m_e k=K     beta 0 (1)
//   dx       dx_e (K x m_e)    = w_e (K x Nout) * dy_e (Nout x m_e)          m=K    n=m_e k=Nout  beta 0 (1)
//   dw       dw_e (K x Nout)  += x_e (K x m_e) * op_T(dy_e) (m_e x Nout)    m=K    n=Nout k=m_e  beta 1 (fp32)
// One cublasGemmGroupedBatchedEx call per product covers every expert with rows: one group (of one problem)
// per expert, sizes from the host counts, the device arrays of A/B/C pointers built on the device from the
// offsets by a one-warp kernel (no host-to-device copy). The per-expert fallback issues one cuBLASLt GEMM per
// expert through gemm.h.
// Padded: every expert's first Mpad rows are copied into a zero-padded scratch [E, Mpad, C] (one block per
// padded row), one cublasGemmStridedBatchedEx covers all E experts, and the rows of y / dx are copied back to the
// compact layout. dW: x and dy both padded with zero rows (which add exactly nothing), then one strided-batched
// GEMM with bf16 A/B, fp32 C, beta = 1 straight into dw [E, Nout, K]. Mpad is the largest count rounded up, or a
// cap given in the options: the rows of the experts beyond it (the overflow) then run through the grouped /
// per-expert path with the row offset `shift` = Mpad (see choose_pad).
// LinearOut (core/linear_out.h) on y / dx: its alpha is every y / dx GEMM's alpha, accumulate their beta = 1 (the
// padded path first pads the old y / dx rows into the scratch the strided GEMM reads as C).
// Persistent (GroupedGemm::Persistent, or Auto with AM_MOE_GEMM=persistent): one launch of the persistent grouped
// GEMM of moe_grouped_gemm.cu per product, scheduled on the device from the offsets, before any host count is
// looked at (no counts_from, no sync); products it does not take (not bf16, widths not multiples of 8, misaligned)
// run as Auto.
#include <cublas_v2.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/moe.h"
#include "backend/cuda/moe_grouped_gemm.h"

namespace am::cuda {
namespace {

// ptr = base + e * expert_stride + offsets[e] * row_stride (bytes)
struct PtrRule {
  const char* base;
  int64_t expert_stride, row_stride;
};

// Writes the pointers of the experts with rows (beyond shift), in expert order, to a[g], b[g], c[g] (g = rank among them).
// shift: rows skipped at the start of every expert (the padded path's overflow rows start at row Mpad).
__global__ void build_ptrs_kernel(const int32_t* __restrict__ offsets, int e, int shift, PtrRule ra, PtrRule rb,
                                  PtrRule rc, const void** a, const void** b, void** c) {
  const int lane = threadIdx.x;
  int g0 = 0;
  for (int base = 0; base < e; base += 32) {
    const int ex = base + lane;
    const int r0 = ex < e ? offsets[ex] + shift : 0;
    const bool nz = ex < e && offsets[ex + 1] > r0;
    const unsigned mask = __ballot_sync(0xffffffffu, nz);
    if (nz) {
      const int g = g0 + __popc(mask & ((1u << lane) - 1u));
      a[g] = ra.base + ex * ra.expert_stride + static_cast<int64_t>(r0) * ra.row_stride;
      b[g] = rb.base + ex * rb.expert_stride + static_cast<int64_t>(r0) * rb.row_stride;
      c[g] = const_cast<char*>(rc.base) + ex * rc.expert_stride + static_cast<int64_t>(r0) * rc.row_stride;
    }
    g0 += __popc(mask);
  }
}

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    default: throw ShapeError(std::string("cuda grouped_linear: unsupported dtype ") + dtype_name(t));
  }
}

const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    default: return "cuBLAS error";
  }
}

// One cuBLAS handle per context (the context itself only holds a cuBLASLt handle), on the context's stream and
// workspace (stream-ordered, so sharing the workspace with cuBLASLt is safe).
cublasHandle_t cublas_handle(CudaContext& ctx) {
  static std::mutex mu;
  static std::unordered_map<const CudaContext*, cublasHandle_t> handles;
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles.find(&ctx);
  if (it == handles.end()) {
    ctx.make_current();
    cublasHandle_t h = nullptr;
    AM_CUDA_CHECK(cublasCreate(&h));
    AM_CUDA_CHECK(cublasSetStream(h, ctx.stream()));
    AM_CUDA_CHECK(cublasSetWorkspace(h, ctx.workspace(), ctx.workspace_bytes()));
    it = handles.emplace(&ctx, h).first;
  }
  return it->second;
}

// Set once the grouped call has reported a dtype combination unsupported: Auto then uses the per-expert loop.
std::atomic<bool> g_grouped_unsupported_f32c{false}, g_grouped_unsupported_lowc{false};

// One product over all experts with rows: m/n/k of -1 stand for the expert's row count; leading dimensions
// are the same for every expert.
struct GroupedGemm1 {
  bool ta, tb;
  int m, n, k;  // -1 where the value is the expert's row count
  int lda, ldb, ldc;
  PtrRule ra, rb, rc;
  DType ab_type, c_type;
  float beta;
  float alpha = 1.f;
};

std::vector<int64_t> counts_from(const Tensor& offsets, int64_t e, const std::vector<int64_t>* host_counts,
                                 CudaContext& ctx) {
  if (host_counts) return *host_counts;
  std::vector<int32_t> off(static_cast<size_t>(e + 1));
  AM_CUDA_CHECK(cudaMemcpyAsync(off.data(), offsets.raw(), off.size() * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                ctx.stream()));
  AM_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()));
  std::vector<int64_t> c(static_cast<size_t>(e));
  for (int64_t j = 0; j < e; ++j) c[static_cast<size_t>(j)] = off[j + 1] - off[j];
  return c;
}

// Returns false when cuBLAS reports the combination unsupported (and allow_fallback), true when done.
// counts: the rows of each expert from row `shift` on (0 for experts with no more rows).
bool run_grouped(const char* op, const GroupedGemm1& p, const Tensor& offsets, const std::vector<int64_t>& counts,
                 int shift, CudaContext& ctx, bool allow_fallback) {
  const int64_t e = static_cast<int64_t>(counts.size());
  std::vector<int> ms, ns, ks, ldas, ldbs, ldcs, sizes;
  std::vector<cublasOperation_t> tas, tbs;
  std::vector<float> alphas, betas;
  for (int64_t j = 0; j < e; ++j) {
    const int rows = static_cast<int>(counts[static_cast<size_t>(j)]);
    if (rows == 0) continue;
    ms.push_back(p.m < 0 ? rows : p.m);
    ns.push_back(p.n < 0 ? rows : p.n);
    ks.push_back(p.k < 0 ? rows : p.k);
    ldas.push_back(p.lda);
    ldbs.push_back(p.ldb);
    ldcs.push_back(p.ldc);
    sizes.push_back(1);
    tas.push_back(p.ta ? CUBLAS_OP_T : CUBLAS_OP_N);
    tbs.push_back(p.tb ? CUBLAS_OP_T : CUBLAS_OP_N);
    alphas.push_back(p.alpha);
    betas.push_back(p.beta);
  }
  const int groups = static_cast<int>(ms.size());
  if (groups == 0) return true;
  Tensor ptrs = empty({3 * std::max<int64_t>(e, 1)}, DType::I64, ctx);
  auto** a = reinterpret_cast<const void**>(ptrs.raw());
  auto** b = a + e;
  auto** c = reinterpret_cast<void**>(const_cast<void**>(reinterpret_cast<const void**>(a + 2 * e)));
  build_ptrs_kernel<<<1, 32, 0, ctx.stream()>>>(offsets.data<int32_t>(), static_cast<int>(e), shift, p.ra, p.rb, p.rc,
                                                a, b, c);
  AM_CUDA_CHECK_LAUNCH();
  cublasHandle_t h = cublas_handle(ctx);
  AM_CUDA_CHECK(cublasSetStream(h, ctx.stream()));
  const cublasStatus_t st = cublasGemmGroupedBatchedEx(
      h, tas.data(), tbs.data(), ms.data(), ns.data(), ks.data(), alphas.data(), reinterpret_cast<const void* const*>(a),
      cuda_type(p.ab_type), ldas.data(), reinterpret_cast<const void* const*>(b), cuda_type(p.ab_type), ldbs.data(),
      betas.data(), reinterpret_cast<void* const*>(c), cuda_type(p.c_type), ldcs.data(), groups, sizes.data(),
      CUBLAS_COMPUTE_32F);
  if (st == CUBLAS_STATUS_SUCCESS) return true;
  if (allow_fallback && (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE)) return false;
  throw DeviceError(std::string("cuda op ") + op + ": cublasGemmGroupedBatchedEx failed (" + cublas_status_name(st) +
                    ", A/B " + dtype_name(p.ab_type) + ", C " + dtype_name(p.c_type) + ", " +
                    std::to_string(groups) + " groups)");
}

// ---------------- padded (strided-batched) path ----------------
// Padded row p = e * mpad + r of the scratch [E, mpad, row]: expert e's row r (compact row offsets[e] + r) when
// r < min(count_e, mpad), else zeros (an expert's rows from mpad on are the overflow, run apart). One block per
// padded row; T is the widest unit that divides the row and both bases.
template <typename T>
__global__ void pad_rows_kernel(const T* __restrict__ src, const int32_t* __restrict__ offsets, int mpad,
                                int64_t units, T* __restrict__ dst) {
  const int64_t p = blockIdx.x;
  const int e = static_cast<int>(p / mpad), r = static_cast<int>(p % mpad);
  const int32_t r0 = offsets[e], cnt = min(offsets[e + 1] - r0, mpad);  // rows from mpad on: overflow
  T* d = dst + p * units;
  if (r < cnt) {
    const T* s = src + (static_cast<int64_t>(r0) + r) * units;
    for (int64_t i = threadIdx.x; i < units; i += blockDim.x) d[i] = s[i];
  } else {
    const T z{};
    for (int64_t i = threadIdx.x; i < units; i += blockDim.x) d[i] = z;
  }
}
// The inverse for the rows that exist: compact row offsets[e] + r = padded row e * mpad + r (r < min(count_e, mpad)).
template <typename T>
__global__ void unpad_rows_kernel(const T* __restrict__ src, const int32_t* __restrict__ offsets, int mpad,
                                  int64_t units, T* __restrict__ dst) {
  const int64_t p = blockIdx.x;
  const int e = static_cast<int>(p / mpad), r = static_cast<int>(p % mpad);
  const int32_t r0 = offsets[e], cnt = min(offsets[e + 1] - r0, mpad);  // rows from mpad on: overflow
  if (r >= cnt) return;
  const T* s = src + p * units;
  T* d = dst + (static_cast<int64_t>(r0) + r) * units;
  for (int64_t i = threadIdx.x; i < units; i += blockDim.x) d[i] = s[i];
}

template <typename T>
void launch_rows(bool pad, const void* src, const int32_t* offsets, int64_t e, int mpad, int64_t row_bytes, void* dst,
                 cudaStream_t st) {
  const int64_t units = row_bytes / static_cast<int64_t>(sizeof(T));
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (units + 31) / 32 * 32)));
  const unsigned grid = static_cast<unsigned>(e * mpad);
  if (pad)
    pad_rows_kernel<T><<<grid, threads, 0, st>>>(static_cast<const T*>(src), offsets, mpad, units, static_cast<T*>(dst));
  else
    unpad_rows_kernel<T><<<grid, threads, 0, st>>>(static_cast<const T*>(src), offsets, mpad, units,
                                                   static_cast<T*>(dst));
  AM_CUDA_CHECK_LAUNCH();
}

// pad: compact src [M, row] -> dst [E, mpad, row]; !pad: padded src -> compact dst (rows that exist).
void copy_rows(bool pad, const void* src, const Tensor& offsets, int64_t e, int mpad, int64_t row_bytes, void* dst,
               CudaContext& ctx) {
  if (e == 0 || mpad == 0 || row_bytes == 0) return;
  const uint64_t a = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                     static_cast<uint64_t>(row_bytes);
  const int32_t* off = offsets.data<int32_t>();
  if (a % 16 == 0) launch_rows<uint4>(pad, src, off, e, mpad, row_bytes, dst, ctx.stream());
  else if (a % 8 == 0) launch_rows<uint2>(pad, src, off, e, mpad, row_bytes, dst, ctx.stream());
  else if (a % 4 == 0) launch_rows<uint32_t>(pad, src, off, e, mpad, row_bytes, dst, ctx.stream());
  else launch_rows<uint16_t>(pad, src, off, e, mpad, row_bytes, dst, ctx.stream());
}

int64_t round_rows(int64_t r) {
  const int64_t g = r >= 64 ? 64 : 8;
  return (r + g - 1) / g * g;
}
// Rows per expert in the padded scratch, 0 for "not padded". Forced Padded: opt.pad_rows (a cap below the largest
// count leaves overflow rows, run apart), else the largest count rounded up (to 64, to 8 below 64 rows). Auto: the
// largest count rounded up when E * Mpad <= 1.5 M (balanced routing), else 0 (the grouped / per-expert path).
// Auto does not cap: a capped scratch measured slower than the grouped path on the skewed W2 routing (cap 896,
// docs/moe_kernels.md), and no moderately skewed case where it would pay has been measured yet.
int64_t choose_pad(const std::vector<int64_t>& counts, int64_t m, const GroupedLinearOptions& opt) {
  const int64_t e = static_cast<int64_t>(counts.size());
  if (e == 0 || m == 0) return 0;
  const int64_t full = round_rows(*std::max_element(counts.begin(), counts.end()));
  if (opt.impl == GroupedGemm::Padded) return opt.pad_rows > 0 ? opt.pad_rows : full;
  if (opt.impl != GroupedGemm::Auto) return 0;
  return 2 * e * full <= 3 * m ? full : 0;
}

// AM_MOE_GEMM_LOG=1: one line per call (first 64 calls) on stderr with the routing statistics and the path taken.
void log_call(const char* op, const std::vector<int64_t>& counts, int64_t m, int64_t mpad) {
  static const bool on = [] {
    const char* v = std::getenv("AM_MOE_GEMM_LOG");
    return v && *v && *v != '0';
  }();
  static std::atomic<int> n{0};
  if (!on || n.fetch_add(1) >= 64) return;
  int64_t mx = 0, nz = 0, over = 0, over_e = 0;
  for (int64_t c : counts) {
    mx = std::max(mx, c);
    nz += c > 0;
    if (mpad > 0 && c > mpad) over += c - mpad, ++over_e;
  }
  const int64_t e = static_cast<int64_t>(counts.size());
  std::fprintf(stderr,
               "%s: E=%lld M=%lld max=%lld mean=%lld nonzero=%lld -> %s Mpad=%lld (%.2fx) overflow %lld rows in %lld "
               "experts\n",
               op, (long long)e, (long long)m, (long long)mx, (long long)(e ? m / e : 0), (long long)nz,
               mpad ? "padded" : "grouped/per-expert", (long long)mpad, m ? double(mpad * e) / double(m) : 0.0,
               (long long)over, (long long)over_e);
}

// One strided-batched GEMM over all E experts (column-major, cuBLAS convention; strides in elements).
struct StridedGemm {
  bool ta, tb;
  int m, n, k;
  const void* a;
  int lda;
  int64_t sa;
  const void* b;
  int ldb;
  int64_t sb;
  void* c;
  int ldc;
  int64_t sc;
  DType ab_type, c_type;
  float beta;
  int batch;
  float alpha = 1.f;
};
void run_strided(const char* op, const StridedGemm& g, CudaContext& ctx) {
  cublasHandle_t h = cublas_handle(ctx);
  AM_CUDA_CHECK(cublasSetStream(h, ctx.stream()));
  const cublasStatus_t st = cublasGemmStridedBatchedEx(
      h, g.ta ? CUBLAS_OP_T : CUBLAS_OP_N, g.tb ? CUBLAS_OP_T : CUBLAS_OP_N, g.m, g.n, g.k, &g.alpha, g.a,
      cuda_type(g.ab_type), g.lda, g.sa, g.b, cuda_type(g.ab_type), g.ldb, g.sb, &g.beta, g.c, cuda_type(g.c_type),
      g.ldc, g.sc, g.batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS)
    throw DeviceError(std::string("cuda op ") + op + ": cublasGemmStridedBatchedEx failed (" + cublas_status_name(st) +
                      ", A/B " + dtype_name(g.ab_type) + ", C " + dtype_name(g.c_type) + ", m " + std::to_string(g.m) +
                      " n " + std::to_string(g.n) + " k " + std::to_string(g.k) + ", batch " +
                      std::to_string(g.batch) + ")");
}

// Which products Auto runs as one grouped call (the rest: per-expert cuBLASLt GEMMs); from the W2 measurements
// in docs/moe_kernels.md.
enum class Product { Fwd, Dx, Dw };
bool auto_grouped(Product pr) { return pr != Product::Dw; }

// The experts' rows from row `shift` on (all rows: shift 0; the padded path's overflow: shift Mpad) with the
// grouped API or per-expert GEMMs (impl Auto: per product, the faster at the W2 shape).
void run_product(const char* op, Product pr, const GroupedGemm1& p, const Tensor& offsets,
                 const std::vector<int64_t>& counts, CudaContext& ctx, GroupedGemm impl, int64_t shift = 0) {
  std::vector<int64_t> rest(counts.size());
  bool any = false;
  for (size_t j = 0; j < counts.size(); ++j) any |= (rest[j] = std::max<int64_t>(0, counts[j] - shift)) > 0;
  if (!any) return;
  std::atomic<bool>& unsupported = p.c_type == DType::F32 && p.ab_type != DType::F32 ? g_grouped_unsupported_f32c
                                                                                     : g_grouped_unsupported_lowc;
  const bool want_grouped = impl == GroupedGemm::Grouped || (impl != GroupedGemm::PerExpert && auto_grouped(pr));
  if (want_grouped && !unsupported.load()) {
    if (run_grouped(op, p, offsets, rest, static_cast<int>(shift), ctx, true)) return;
    unsupported.store(true);  // e.g. bf16 A/B with fp32 C (the dW product): not offered by cuBLAS 13.1
  }
  // Per-expert cuBLASLt GEMMs.
  int64_t r0 = 0;
  for (size_t j = 0; j < counts.size(); ++j) {
    const int64_t rows = rest[j];
    if (rows > 0) {
      GemmDesc g;
      g.trans_a = p.ta;
      g.trans_b = p.tb;
      g.m = p.m < 0 ? rows : p.m;
      g.n = p.n < 0 ? rows : p.n;
      g.k = p.k < 0 ? rows : p.k;
      const int64_t ej = static_cast<int64_t>(j), rs = r0 + shift;
      g.a = p.ra.base + ej * p.ra.expert_stride + rs * p.ra.row_stride;
      g.a_type = p.ab_type;
      g.lda = p.lda;
      g.b = p.rb.base + ej * p.rb.expert_stride + rs * p.rb.row_stride;
      g.b_type = p.ab_type;
      g.ldb = p.ldb;
      g.d = const_cast<char*>(p.rc.base) + ej * p.rc.expert_stride + rs * p.rc.row_stride;
      g.d_type = p.c_type;
      g.ldd = p.ldc;
      g.alpha = p.alpha;
      g.beta = p.beta;
      gemm(ctx, g);
    }
    r0 += counts[j];
  }
}

struct GDims {
  int64_t e, m, k, nout;
};

// The persistent path asked for (explicitly, or Auto under AM_MOE_GEMM=persistent).
bool want_persistent(const GroupedLinearOptions& opt) {
  return opt.impl == GroupedGemm::Persistent || (opt.impl == GroupedGemm::Auto && grouped_linear_persistent_default());
}
// The options the cuBLAS paths run with: a Persistent request the kernel does not take runs as Auto.
GroupedLinearOptions cublas_options(const GroupedLinearOptions& opt) {
  GroupedLinearOptions o = opt;
  if (o.impl == GroupedGemm::Persistent) o.impl = GroupedGemm::Auto;
  return o;
}
PersistentGroupedArgs persistent_args(const Tensor& x, const Tensor& w, const Tensor& offsets, const GDims& d) {
  PersistentGroupedArgs a;
  a.offsets = offsets.data<int32_t>();
  a.e = d.e;
  a.rows = d.m;
  a.k = d.k;
  a.n = d.nout;
  a.x = x.raw();
  a.w = w.raw();
  return a;
}
void log_persistent(const char* op, const GDims& d) {
  static const bool on = [] {
    const char* v = std::getenv("AM_MOE_GEMM_LOG");
    return v && *v && *v != '0';
  }();
  static std::atomic<int> n{0};
  if (!on || n.fetch_add(1) >= 64) return;
  std::fprintf(stderr, "%s: E=%lld M=%lld K=%lld Nout=%lld -> persistent (device-side schedule, no host counts)\n", op,
               (long long)d.e, (long long)d.m, (long long)d.k, (long long)d.nout);
}
GDims check(const char* op, const Tensor& x, const Tensor& w, const Tensor& offsets, const char* y_name,
            const Tensor& y, const std::vector<int64_t>* host_counts) {
  need_cuda(op, "x", x);
  need_cuda(op, "w", w);
  need_cuda(op, "offsets", offsets);
  need_cuda(op, y_name, y);
  need_dtype(op, "offsets", offsets, DType::I32);
  if (x.dtype() != DType::BF16 && x.dtype() != DType::F32 && x.dtype() != DType::F16)
    op_error(op, describe("x", x) + ": expected bf16 (or fp32 / fp16)");
  if (w.dtype() != x.dtype()) op_error(op, describe("w", w) + ": expected the dtype of " + describe("x", x));
  if (y.dtype() != x.dtype()) op_error(op, describe(y_name, y) + ": expected the dtype of " + describe("x", x));
  if (w.ndim() != 3) op_error(op, describe("w", w) + ": expected [E, Nout, K]");
  const int64_t e = w.dim(0), nout = w.dim(1), k = w.dim(2);
  if (x.ndim() < 2 || x.dim(-1) != k) op_error(op, describe("x", x) + ": expected [M, K = " + std::to_string(k) + "]");
  const int64_t m = k ? x.numel() / k : 0;
  if (y.ndim() < 2 || y.dim(-1) != nout || y.numel() != m * nout)
    op_error(op, describe(y_name, y) + ": expected [M = " + std::to_string(m) + ", Nout = " + std::to_string(nout) + "]");
  if (offsets.numel() != e + 1) op_error(op, describe("offsets", offsets) + ": expected E + 1 elements");
  if (host_counts && static_cast<int64_t>(host_counts->size()) != e)
    op_error(op, "host_counts must have E = " + std::to_string(e) + " entries");
  return {e, m, k, nout};
}

}  // namespace

bool grouped_linear_persistent_default() {
  const char* v = std::getenv("AM_MOE_GEMM");
  if (!v || !*v) return false;
  if (std::strcmp(v, "persistent") == 0) return true;
  static std::atomic<bool> warned{false};
  if (!warned.exchange(true))
    std::fprintf(stderr, "warning: AM_MOE_GEMM=%s is not a known value (persistent); the default grouped GEMMs run\n",
                 v);
  return false;
}

void grouped_linear_fwd(const Tensor& x, const Tensor& w, const Tensor& offsets, Tensor& y,
                        const std::vector<int64_t>* host_counts, CudaContext& ctx, const GroupedLinearOptions& opt_in,
                        const LinearOut& yo) {
  const char* op = "grouped_linear_fwd";
  const GDims d = check(op, x, w, offsets, "y", y, host_counts);
  if (d.m == 0 || d.nout == 0) return;
  if (d.k == 0) {  // an empty product: y = 0, or y unchanged when accumulating
    if (!yo.accumulate) zero_(y, ctx);
    return;
  }
  if (want_persistent(opt_in)) {
    PersistentGroupedArgs a = persistent_args(x, w, offsets, d);
    a.out = y.raw();
    a.out_type = y.dtype();
    a.alpha = yo.alpha;
    a.beta = yo.accumulate ? 1.f : 0.f;
    if (persistent_grouped_supported(a, x.dtype())) {
      log_persistent(op, d);
      persistent_grouped_fwd(a, ctx);
      return;
    }
  }
  const GroupedLinearOptions opt = cublas_options(opt_in);
  const std::vector<int64_t> counts = counts_from(offsets, d.e, host_counts, ctx);
  const int64_t es = static_cast<int64_t>(dtype_size(x.dtype()));
  GroupedGemm1 p;
  p.ta = true;
  p.tb = false;
  p.m = static_cast<int>(d.nout);
  p.n = -1;
  p.k = static_cast<int>(d.k);
  p.lda = static_cast<int>(d.k);
  p.ldb = static_cast<int>(d.k);
  p.ldc = static_cast<int>(d.nout);
  p.ra = {static_cast<const char*>(w.raw()), d.nout * d.k * es, 0};
  p.rb = {static_cast<const char*>(x.raw()), 0, d.k * es};
  p.rc = {static_cast<const char*>(y.raw()), 0, d.nout * es};
  p.ab_type = x.dtype();
  p.c_type = y.dtype();
  p.beta = yo.accumulate ? 1.f : 0.f;  // accumulate: C = D = y
  p.alpha = yo.alpha;
  const int64_t mpad = choose_pad(counts, d.m, opt);
  log_call(op, counts, d.m, mpad);
  if (mpad == 0) {
    run_product(op, Product::Fwd, p, offsets, counts, ctx, opt.impl);
    return;
  }
  const int mp = static_cast<int>(mpad), kk = static_cast<int>(d.k), no = static_cast<int>(d.nout);
  Tensor xp = empty({d.e, mpad, d.k}, x.dtype(), ctx), yp = empty({d.e, mpad, d.nout}, y.dtype(), ctx);
  copy_rows(true, x.raw(), offsets, d.e, mp, d.k * es, xp.raw(), ctx);
  // Accumulating: the old rows of y go into the scratch, which the GEMM reads as C (beta = 1).
  if (yo.accumulate) copy_rows(true, y.raw(), offsets, d.e, mp, d.nout * es, yp.raw(), ctx);
  // yp_e (Nout x mpad) = alpha op_T(w_e) (Nout x K) * xp_e (K x mpad) (+ yp_e)
  run_strided(op, {true, false, no, mp, kk, w.raw(), kk, d.nout * d.k, xp.raw(), kk, mpad * d.k, yp.raw(), no,
                   mpad * d.nout, x.dtype(), y.dtype(), p.beta, static_cast<int>(d.e), yo.alpha},
              ctx);
  copy_rows(false, yp.raw(), offsets, d.e, mp, d.nout * es, y.raw(), ctx);
  run_product(op, Product::Fwd, p, offsets, counts, ctx, GroupedGemm::Auto, mpad);  // overflow rows, if any
}

void grouped_linear_bwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& dy, Tensor* dx,
                        Tensor& dw, const std::vector<int64_t>* host_counts, CudaContext& ctx,
                        const GroupedLinearOptions& opt_in, const LinearOut& dxo) {
  const char* op = "grouped_linear_bwd";
  const GDims d = check(op, x, w, offsets, "dy", dy, host_counts);
  const bool want_dw = dw.defined();  // undefined: frozen experts, no dW GEMMs
  if (want_dw) {
    need_cuda(op, "dw", dw);
    need_dtype(op, "dw", dw, DType::F32);
    if (dw.shape() != w.shape()) op_error(op, describe("dw", dw) + ": expected the shape of " + describe("w", w));
  }
  if (dx) {
    need_cuda(op, "dx", *dx);
    if (dx->dtype() != x.dtype() || dx->numel() != x.numel())
      op_error(op, describe("dx", *dx) + ": expected the shape and dtype of " + describe("x", x));
  }
  if (d.m == 0 || d.k == 0 || (!dx && !want_dw)) return;
  if (d.nout == 0) {  // an empty product: dx = 0, or dx unchanged when accumulating
    if (dx && !dxo.accumulate) zero_(*dx, ctx);
    return;
  }
  if (want_persistent(opt_in)) {
    PersistentGroupedArgs ax = persistent_args(x, w, offsets, d), aw = ax;
    ax.dy = aw.dy = dy.raw();
    ax.out = dx ? dx->raw() : nullptr;
    ax.out_type = dx ? dx->dtype() : x.dtype();
    ax.alpha = dxo.alpha;
    ax.beta = dxo.accumulate ? 1.f : 0.f;
    aw.out = want_dw ? dw.raw() : nullptr;
    aw.out_type = DType::F32;
    const bool ok_dx = !dx || persistent_grouped_supported(ax, x.dtype()),
               ok_dw = !want_dw || persistent_grouped_supported(aw, x.dtype());
    if (ok_dx && ok_dw) {
      log_persistent(op, d);
      if (want_dw) persistent_grouped_dw(aw, ctx);  // first: dx may be written over x (as on the padded path)
      if (dx) persistent_grouped_dx(ax, ctx);
      return;
    }
  }
  const GroupedLinearOptions opt = cublas_options(opt_in);
  const std::vector<int64_t> counts = counts_from(offsets, d.e, host_counts, ctx);
  const int64_t es = static_cast<int64_t>(dtype_size(x.dtype()));
  GroupedGemm1 px;  // dx
  px.ta = false;
  px.tb = false;
  px.m = static_cast<int>(d.k);
  px.n = -1;
  px.k = static_cast<int>(d.nout);
  px.lda = static_cast<int>(d.k);
  px.ldb = static_cast<int>(d.nout);
  px.ldc = static_cast<int>(d.k);
  px.ra = {static_cast<const char*>(w.raw()), d.nout * d.k * es, 0};
  px.rb = {static_cast<const char*>(dy.raw()), 0, d.nout * es};
  px.rc = {static_cast<const char*>(dx ? dx->raw() : nullptr), 0, d.k * es};
  px.ab_type = x.dtype();
  px.c_type = x.dtype();
  px.beta = dxo.accumulate ? 1.f : 0.f;  // accumulate: C = D = dx
  px.alpha = dxo.alpha;
  GroupedGemm1 pw;  // dw
  pw.ta = false;
  pw.tb = true;
  pw.m = static_cast<int>(d.k);
  pw.n = static_cast<int>(d.nout);
  pw.k = -1;
  pw.lda = static_cast<int>(d.k);
  pw.ldb = static_cast<int>(d.nout);
  pw.ldc = static_cast<int>(d.k);
  pw.ra = {static_cast<const char*>(x.raw()), 0, d.k * es};
  pw.rb = {static_cast<const char*>(dy.raw()), 0, d.nout * es};
  pw.rc = {static_cast<const char*>(want_dw ? dw.raw() : nullptr), d.nout * d.k * static_cast<int64_t>(sizeof(float)),
           0};
  pw.ab_type = x.dtype();
  pw.c_type = DType::F32;
  pw.beta = 1.f;
  const int64_t mpad = choose_pad(counts, d.m, opt);
  log_call(op, counts, d.m, mpad);
  if (mpad == 0) {
    if (dx) run_product(op, Product::Dx, px, offsets, counts, ctx, opt.impl);
    if (want_dw) run_product(op, Product::Dw, pw, offsets, counts, ctx, opt.impl);
    return;
  }
  const int mp = static_cast<int>(mpad), kk = static_cast<int>(d.k), no = static_cast<int>(d.nout),
            ne = static_cast<int>(d.e);
  // Zero padding rows in both operands: they add exactly 0 to dw (an expert without rows: dw[e] += 0).
  // Frozen experts: x is not padded (xp is only dx's scratch then).
  Tensor xp = empty({d.e, mpad, d.k}, x.dtype(), ctx), dyp = empty({d.e, mpad, d.nout}, dy.dtype(), ctx);
  copy_rows(true, dy.raw(), offsets, d.e, mp, d.nout * es, dyp.raw(), ctx);
  if (want_dw) {
    copy_rows(true, x.raw(), offsets, d.e, mp, d.k * es, xp.raw(), ctx);
    // dw_e (K x Nout) += xp_e (K x mpad) * op_T(dyp_e) (mpad x Nout), fp32 C
    run_strided(op, {false, true, kk, no, mp, xp.raw(), kk, mpad * d.k, dyp.raw(), no, mpad * d.nout, dw.raw(), kk,
                     d.nout * d.k, x.dtype(), DType::F32, 1.f, ne},
                ctx);
    run_product(op, Product::Dw, pw, offsets, counts, ctx, GroupedGemm::Auto, mpad);  // overflow rows, if any
  }
  if (dx) {
    // dxp_e (K x mpad) = alpha w_e (K x Nout) * dyp_e (Nout x mpad) (+ dxp_e), written over xp (read by the dw GEMM
    // before, in stream order). Accumulating: the old rows of dx are padded into xp first, read as C (beta = 1).
    if (dxo.accumulate) copy_rows(true, dx->raw(), offsets, d.e, mp, d.k * es, xp.raw(), ctx);
    run_strided(op, {false, false, kk, mp, no, w.raw(), kk, d.nout * d.k, dyp.raw(), no, mpad * d.nout, xp.raw(), kk,
                     mpad * d.k, x.dtype(), dx->dtype(), px.beta, ne, dxo.alpha},
                ctx);
    copy_rows(false, xp.raw(), offsets, d.e, mp, d.k * es, dx->raw(), ctx);
    run_product(op, Product::Dx, px, offsets, counts, ctx, GroupedGemm::Auto, mpad);  // overflow rows, if any
  }
}

}  // namespace am::cuda
