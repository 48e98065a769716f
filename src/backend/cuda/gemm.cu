#include "backend/cuda/gemm.h"

#include <cublasLt.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "core/error.h"

namespace am::cuda {
namespace {

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    default: throw ShapeError(std::string("cuda gemm: unsupported dtype ") + dtype_name(t));
  }
}

// Largest power of two <= 16 dividing the address: cuBLASLt picks vectorised kernels by alignment, so a
// plan chosen for aligned pointers must not be reused for a misaligned view.
uint32_t align_of(const void* p) {
  auto v = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 16;
  while (a > 1 && (v % a) != 0) a >>= 1;
  return a;
}

struct Key {
  int64_t m, n, k, lda, ldb, ldd;
  uint8_t ta, tb, at, bt, dt, biast, has_bias, beta_zero;
  uint32_t align_a, align_b, align_d, align_bias;
  bool operator==(const Key& o) const { return std::memcmp(this, &o, sizeof(Key)) == 0; }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    // FNV-1a over the bytes (the struct is zero-initialised before filling, so padding is stable).
    const auto* p = reinterpret_cast<const unsigned char*>(&k);
    size_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(Key); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return h;
  }
};

struct Plan {
  bool ok = false;  // false: bias epilogue unsupported for this key (caller falls back)
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
  cublasLtMatmulAlgo_t algo{};
  void destroy() {
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (ld) cublasLtMatrixLayoutDestroy(ld);
    desc = nullptr;
    la = lb = ld = nullptr;
  }
};

std::string gemm_str(const GemmDesc& g) {
  return std::string("m=") + std::to_string(g.m) + " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k) +
         " ta=" + std::to_string(g.trans_a) + " tb=" + std::to_string(g.trans_b) + " A " + dtype_name(g.a_type) +
         " B " + dtype_name(g.b_type) + " D " + dtype_name(g.d_type) + (g.bias ? " +bias" : "");
}

}  // namespace

struct GemmPlanCache::Impl {
  std::mutex mu;
  std::unordered_map<Key, Plan, KeyHash> plans;
  int tuned = 0;  // plans whose algorithm was chosen by timing (pick_algo)
  ~Impl() {
    for (auto& [k, p] : plans) p.destroy();
  }
};

GemmPlanCache::GemmPlanCache() : impl_(std::make_unique<Impl>()) {}
GemmPlanCache::~GemmPlanCache() = default;

namespace {

Key key_of(const GemmDesc& g) {
  Key key;
  std::memset(&key, 0, sizeof key);
  key.m = g.m;
  key.n = g.n;
  key.k = g.k;
  key.lda = g.lda;
  key.ldb = g.ldb;
  key.ldd = g.ldd;
  key.ta = g.trans_a;
  key.tb = g.trans_b;
  key.at = static_cast<uint8_t>(g.a_type);
  key.bt = static_cast<uint8_t>(g.b_type);
  key.dt = static_cast<uint8_t>(g.d_type);
  key.has_bias = g.bias != nullptr;
  key.biast = g.bias ? static_cast<uint8_t>(g.bias_type) : 0;
  key.beta_zero = g.beta == 0.f;
  key.align_a = align_of(g.a);
  key.align_b = align_of(g.b);
  key.align_d = align_of(g.d);
  key.align_bias = g.bias ? align_of(g.bias) : 0;
  return key;
}

constexpr int kMaxAlgos = 16;

// The descriptors of g and up to max_algos (<= kMaxAlgos) of the heuristic's algorithms, best-ranked first, into
// algos; returns how many (0 with a bias epilogue: unsupported, the caller falls back; else it throws). p.algo is
// left unset. (Plain arrays: nvcc 12's front end trips over a std::vector of the cuBLASLt structs here.)
int describe(CudaContext& ctx, const GemmDesc& g, const Key& key, Plan& p, int max_algos,
             cublasLtMatmulAlgo_t* algos) {
  AM_CUDA_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  AM_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  AM_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  if (g.bias) {
    cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    AM_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    int32_t bt = cuda_type(g.bias_type);
    AM_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt));
    // The pointer itself is set per call; heuristics only need its alignment.
    AM_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof g.bias));
  }
  // Stored (pre-op) shapes: op(A) is m x k, so A is k x m when transposed.
  const uint64_t ar = g.trans_a ? g.k : g.m, ac = g.trans_a ? g.m : g.k;
  const uint64_t br = g.trans_b ? g.n : g.k, bc = g.trans_b ? g.k : g.n;
  AM_CUDA_CHECK(cublasLtMatrixLayoutCreate(&p.la, cuda_type(g.a_type), ar, ac, g.lda));
  AM_CUDA_CHECK(cublasLtMatrixLayoutCreate(&p.lb, cuda_type(g.b_type), br, bc, g.ldb));
  AM_CUDA_CHECK(cublasLtMatrixLayoutCreate(&p.ld, cuda_type(g.d_type), g.m, g.n, g.ldd));

  cublasLtMatmulPreference_t pref = nullptr;
  AM_CUDA_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  size_t ws = ctx.workspace_bytes();
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_a, sizeof(uint32_t));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_b, sizeof(uint32_t));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_d, sizeof(uint32_t));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_d, sizeof(uint32_t));
  cublasLtMatmulHeuristicResult_t res[kMaxAlgos];
  std::memset(res, 0, sizeof res);
  int found = 0;
  const int want = max_algos < 1 ? 1 : (max_algos > kMaxAlgos ? kMaxAlgos : max_algos);
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(ctx.lt(), p.desc, p.la, p.lb, p.ld, p.ld, pref, want, res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  int n = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    for (int i = 0; i < found; ++i)
      if (res[i].state == CUBLAS_STATUS_SUCCESS) algos[n++] = res[i].algo;
  if (n == 0 && !g.bias)
    throw DeviceError("cuBLASLt has no algorithm for GEMM " + gemm_str(g) + " (status " + cublasLtGetStatusName(st) + ")");
  return n;
}

void run(CudaContext& ctx, const GemmDesc& g, const Plan& plan, const cublasLtMatmulAlgo_t& algo) {
  AM_CUDA_CHECK(cublasLtMatmul(ctx.lt(), plan.desc, &g.alpha, g.a, plan.la, g.b, plan.lb, &g.beta, g.d, plan.ld, g.d,
                               plan.ld, &algo, ctx.workspace(), ctx.workspace_bytes(), ctx.stream()));
}

// One 4-byte CUBLASLT_ALGO_CONFIG_* attribute of a (-1: not reported).
int config_attr(const cublasLtMatmulAlgo_t& a, cublasLtMatmulAlgoConfigAttributes_t which) {
  int32_t v = 0;
  size_t got = 0;
  return cublasLtMatmulAlgoConfigGetAttribute(&a, which, &v, sizeof v, &got) == CUBLAS_STATUS_SUCCESS ? v : -1;
}
int split_k_of(const cublasLtMatmulAlgo_t& a) { return config_attr(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM); }

// Mean ms of one run of algo on g (one warm-up, then `reps` runs between events; synchronises).
double time_algo(CudaContext& ctx, const GemmDesc& g, const Plan& p, const cublasLtMatmulAlgo_t& a, int reps) {
  cudaEvent_t e0, e1;
  AM_CUDA_CHECK(cudaEventCreate(&e0));
  AM_CUDA_CHECK(cudaEventCreate(&e1));
  run(ctx, g, p, a);
  AM_CUDA_CHECK(cudaEventRecord(e0, ctx.stream()));
  for (int r = 0; r < reps; ++r) run(ctx, g, p, a);
  AM_CUDA_CHECK(cudaEventRecord(e1, ctx.stream()));
  AM_CUDA_CHECK(cudaEventSynchronize(e1));
  float ms = 0;
  AM_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return ms / reps;
}

// Plan-time tuning (AM_GEMM_TUNE unset or 1; 0: the heuristic's first algorithm always). cuBLASLt's first pick is
// not always its fastest: at W1's GEMMs the fastest of its first 8 candidates saves 2.4 ms a step (3% of the GEMM
// time; am_gpu_microbench gemm_algos, docs/performance.md), down_proj's dx 17% alone. A new plan of a large enough
// GEMM (>= 2^32 multiply-adds, so not the many small shapes of dynamic padding) times those candidates once on the
// call's own buffers and keeps the fastest when it beats the first by 3% or more (a near tie keeps the first, so
// timing noise cannot flip the choice from run to run). Only beta = 0 without a bias: running a candidate then just
// rewrites D, which the real call rewrites again; an accumulating GEMM would add into D once per run. Only
// candidates without split-K: they accumulate each output over k in the same order as the first pick (the survey
// found their outputs bit-identical), so tuning changes the time, not the numbers. At most 64 plans per context.
bool tune_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("AM_GEMM_TUNE");
    return !(e && std::string(e) == "0");
  }();
  return on;
}
constexpr int kTuneCandidates = 8;
constexpr int kTunePlans = 64;
constexpr double kTuneMinMacs = 4294967296.0;  // 2^32

cublasLtMatmulAlgo_t pick_algo(CudaContext& ctx, const GemmDesc& g, const Plan& p, const cublasLtMatmulAlgo_t* algos,
                               int n) {
  int best = 0;
  const double first = time_algo(ctx, g, p, algos[0], 3);
  double best_ms = first;
  for (int i = 1; i < n; ++i) {
    const int sk = split_k_of(algos[i]);
    if (sk > 1 || sk < 0) continue;
    const double ms = time_algo(ctx, g, p, algos[i], 3);
    if (ms < best_ms) best_ms = ms, best = i;
  }
  return best_ms <= 0.97 * first ? algos[best] : algos[0];
}

}  // namespace

bool gemm(CudaContext& ctx, const GemmDesc& g) {
  if (g.m == 0 || g.n == 0) return true;
  if (g.k == 0) {
    // Empty reduction: D = beta * D. Only beta 0 (clear) and 1 (no-op) occur in this code base.
    if (g.beta == 0.f)
      AM_CUDA_CHECK(cudaMemset2DAsync(g.d, static_cast<size_t>(g.ldd) * dtype_size(g.d_type), 0,
                                      static_cast<size_t>(g.m) * dtype_size(g.d_type), static_cast<size_t>(g.n),
                                      ctx.stream()));
    else if (g.beta != 1.f)
      throw ShapeError("cuda gemm: k = 0 with beta other than 0 or 1 is not supported");
    return g.bias == nullptr;
  }
  const Key key = key_of(g);
  auto& impl = ctx.gemm_plans().impl();
  Plan* plan = nullptr;
  {
    std::lock_guard<std::mutex> lk(impl.mu);
    auto it = impl.plans.find(key);
    if (it != impl.plans.end()) plan = &it->second;
  }
  if (!plan) {
    Plan p;
    try {
      const double macs = static_cast<double>(g.m) * static_cast<double>(g.n) * static_cast<double>(g.k);
      bool tune = tune_enabled() && g.beta == 0.f && !g.bias && macs >= kTuneMinMacs;
      if (tune) {
        std::lock_guard<std::mutex> lk(impl.mu);
        tune = impl.tuned < kTunePlans;
        impl.tuned += tune;
      }
      cublasLtMatmulAlgo_t algos[kMaxAlgos];
      const int n = describe(ctx, g, key, p, tune ? kTuneCandidates : 1, algos);
      if (n > 0) {
        p.algo = tune && n > 1 && split_k_of(algos[0]) <= 1 ? pick_algo(ctx, g, p, algos, n) : algos[0];
        p.ok = true;
      }
    } catch (...) {
      p.destroy();
      throw;
    }
    std::lock_guard<std::mutex> lk(impl.mu);
    auto [it, inserted] = impl.plans.emplace(key, p);
    if (!inserted) p.destroy();  // another thread won the race
    plan = &it->second;
  }
  if (!plan->ok) return false;
  if (g.bias)
    AM_CUDA_CHECK(
        cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof g.bias));
  run(ctx, g, *plan, plan->algo);
  return true;
}

std::vector<GemmCandidate> gemm_candidates(CudaContext& ctx, const GemmDesc& g, int max_algos, int reps) {
  std::vector<GemmCandidate> out;
  if (g.m == 0 || g.n == 0 || g.k == 0) return out;
  Plan p;
  try {
    cublasLtMatmulAlgo_t algos[kMaxAlgos];
    const int n = describe(ctx, g, key_of(g), p, max_algos, algos);
    for (int i = 0; i < n; ++i) {
      const cublasLtMatmulAlgo_t& a = algos[i];
      GemmCandidate c;
      c.id = config_attr(a, CUBLASLT_ALGO_CONFIG_ID);
      c.tile = config_attr(a, CUBLASLT_ALGO_CONFIG_TILE_ID);
      c.splitk = split_k_of(a);
      c.reduction = config_attr(a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME);  // a uint32 attribute; its values fit
      c.ms = time_algo(ctx, g, p, a, std::max(reps, 1));
      out.push_back(c);
    }
  } catch (...) {
    p.destroy();
    throw;
  }
  p.destroy();
  return out;
}

}  // namespace am::cuda
