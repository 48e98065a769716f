// Host side of the CUDA flash attention: argument checks, scratch memory, the segment-range table, and the
// bf16 -> fp32 widening of gpt_oss sinks. Kernels: attention_fwd.cu, attention_bwd.cu.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/attention_internal.h"
#include "core/error.h"

namespace am::cuda {

AttnTuning& attention_tuning() {
  static AttnTuning t;
  return t;
}

namespace attn {

void check_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();
  throw DeviceError(std::string("attention ") + what + ": CUDA error '" + cudaGetErrorString(e) + "' (" +
                    cudaGetErrorName(e) + ")");
}

bool is_sm90() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 9 && minor == 0;
}

namespace {

__global__ void seg_table_kernel(const int32_t* __restrict__ seg, int B, int T, int2* __restrict__ table, int ne) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(B) * ne) return;
  const int b = static_cast<int>(i / ne), e = static_cast<int>(i % ne);
  int lo = std::numeric_limits<int>::max(), hi = -1;
  const int t0 = e * kSegGran, t1 = min(T, t0 + kSegGran);
  for (int t = t0; t < t1; ++t) {
    const int s = seg[static_cast<int64_t>(b) * T + t];
    if (s >= 0) {
      lo = min(lo, s);
      hi = max(hi, s);
    }
  }
  table[i] = make_int2(lo, hi);
}

int seg_entries(int64_t T) { return static_cast<int>((T + kSegGran - 1) / kSegGran); }

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 132;
  }
  return n;
}

// Blocks per GQA group in the backward. Enough blocks to give every SM about three, else the group is
// split (each block then handles group / split query heads and adds its dK/dV with fp32 atomics).
int bwd_split(int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t D) {
  const int group = static_cast<int>(nh / nkv);
  const int forced = attention_tuning().bwd_split;
  if (forced > 0) {
    if (group % forced != 0)
      throw DeviceError("attention_bwd: AttnTuning::bwd_split = " + std::to_string(forced) +
                        " does not divide the GQA group " + std::to_string(group));
    return forced;
  }
  const int64_t bn = bwd_block_kv_rows(static_cast<int>(D), attention_tuning().bwd_variant);
  const int64_t base = B * nkv * ((T + bn - 1) / bn);
  const int64_t want = 3 * static_cast<int64_t>(sm_count());
  int split = 1;
  for (int s = 1; s <= group; ++s) {
    if (group % s != 0) continue;
    split = s;
    if (base * s >= want) break;
  }
  return split;
}

void check_raw(const AttnRawArgs& a, bool bwd) {
  const char* op = bwd ? "attention_bwd" : "attention_fwd";
  auto fail = [&](const std::string& m) { throw DeviceError(std::string(op) + " (CUDA): " + m); };
  if (a.batch < 0 || a.seq < 0 || a.n_heads <= 0 || a.n_kv_heads <= 0 || a.head_dim <= 0)
    fail("bad attention dimensions");
  if (a.n_heads % a.n_kv_heads != 0) fail("n_heads must be a multiple of n_kv_heads");
  const int64_t Dv = a.v_head_dim > 0 ? a.v_head_dim : a.head_dim;
  if (Dv != a.head_dim) {
    if (!(a.head_dim == 192 && Dv == 128))
      fail("head dims " + std::to_string(a.head_dim) + " / " + std::to_string(Dv) +
           " are not supported (a v head dim other than head_dim: only DeepSeek MLA's 192 / 128)");
    if (a.softcap > 0.f) fail("soft-capping with a v head dim other than head_dim is not supported");
  } else if (a.head_dim != 64 && a.head_dim != 128 && a.head_dim != 96 && a.head_dim != 256) {
    fail("head_dim " + std::to_string(a.head_dim) + " is not supported (64, 96, 128 and 256 are, and 192 / Dv 128)");
  }
  if (!(a.scale > 0.f) || !std::isfinite(a.scale)) fail("scale must be finite and positive");
  if (!(a.softcap >= 0.f) || !std::isfinite(a.softcap)) fail("softcap must be finite and >= 0 (0: off)");
  if (a.sliding_window < 0) fail("sliding_window must be >= 0");
  if (a.seq > (int64_t{1} << 30) || a.batch > 65535 || a.n_heads > (int64_t{1} << 20))
    fail("sizes beyond the kernels' index range");
  auto ptr16 = [&](const void* p, const char* name) {
    if (p == nullptr) fail(std::string(name) + " is null");
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail(std::string(name) + " must be 16-byte aligned");
  };
  auto rs8 = [&](int64_t rs, int64_t heads, const char* name, int64_t d) {
    if (rs % 8 != 0 || rs < heads * d)
      fail(std::string(name) + " row stride " + std::to_string(rs) + " must be a multiple of 8 and >= heads * " +
           (d == a.head_dim ? "D" : "Dv"));
  };
  auto ptr4 = [&](const void* p, const char* name) {
    if (reinterpret_cast<uintptr_t>(p) % 4 != 0) fail(std::string(name) + " must be 4-byte aligned (fp32)");
  };
  ptr4(a.sinks, "sinks");
  ptr4(a.dsinks, "dsinks");
  if (a.dsinks && !a.sinks) fail("dsinks given without sinks");
  ptr16(a.q, "q");
  ptr16(a.k, "k");
  ptr16(a.v, "v");
  ptr16(a.out, "out");
  if (a.lse == nullptr) fail("lse is null");
  rs8(a.q_rs, a.n_heads, "q", a.head_dim);
  rs8(a.k_rs, a.n_kv_heads, "k", a.head_dim);
  rs8(a.v_rs, a.n_kv_heads, "v", Dv);
  rs8(a.o_rs, a.n_heads, "out", Dv);
  if (bwd) {
    ptr16(a.dout, "dout");
    ptr16(a.dq, "dq");
    ptr16(a.dk, "dk");
    ptr16(a.dv, "dv");
    rs8(a.do_rs, a.n_heads, "dout", Dv);
    rs8(a.dq_rs, a.n_heads, "dq", a.head_dim);
    rs8(a.dk_rs, a.n_kv_heads, "dk", a.head_dim);
    rs8(a.dv_rs, a.n_kv_heads, "dv", Dv);
  }
}

size_t fwd_ws(const AttnRawArgs& a) {
  return a.segment_ids ? align_up(static_cast<size_t>(a.batch) * seg_entries(a.seq) * sizeof(int2)) : 0;
}

struct BwdLayout {
  size_t dq = 0, dsum = 0, dkv = 0, dvv = 0, tab = 0, total = 0;
  int split = 1;
};
// Dv: the v head dim (= D except DeepSeek MLA); dk_acc is D wide, dv_acc Dv wide (only when split > 1).
BwdLayout bwd_layout(int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t D, int64_t Dv, bool seg) {
  BwdLayout l;
  l.split = bwd_split(B, T, nh, nkv, D);
  l.dq = align_up(static_cast<size_t>(B * T * nh * D) * sizeof(float));
  l.dsum = align_up(static_cast<size_t>(B * nh * T) * sizeof(float));
  l.dkv = l.split > 1 ? align_up(static_cast<size_t>(B * T * nkv * D) * sizeof(float)) : 0;
  l.dvv = l.split > 1 ? align_up(static_cast<size_t>(B * T * nkv * Dv) * sizeof(float)) : 0;
  l.tab = seg ? align_up(static_cast<size_t>(B) * seg_entries(T) * sizeof(int2)) : 0;
  l.total = l.dq + l.dsum + l.dkv + l.dvv + l.tab;
  return l;
}

// Scratch memory: the caller's, or stream-ordered from the driver's pool for this call.
class Scratch {
 public:
  Scratch(size_t need, void* given, size_t given_bytes, cudaStream_t st, const char* op) : st_(st) {
    if (need == 0) return;
    if (given) {
      if (given_bytes < need)
        throw DeviceError(std::string(op) + " (CUDA): workspace of " + std::to_string(given_bytes) +
                          " bytes, need " + std::to_string(need));
      p_ = given;
    } else {
      check_cuda(cudaMallocAsync(&p_, need, st), "allocating scratch");
      owned_ = true;
    }
  }
  ~Scratch() {
    if (owned_) cudaFreeAsync(p_, st_);
  }
  char* get() const { return static_cast<char*>(p_); }

 private:
  void* p_ = nullptr;
  bool owned_ = false;
  cudaStream_t st_;
};

}  // namespace

void launch_seg_table(const int32_t* seg, int B, int T, int2* table, int ne, cudaStream_t st) {
  const int64_t n = static_cast<int64_t>(B) * ne;
  if (n == 0) return;
  seg_table_kernel<<<static_cast<unsigned>((n + 127) / 128), 128, 0, st>>>(seg, B, T, table, ne);
  check_cuda(cudaGetLastError(), "segment table launch");
}

namespace {
// bf16 sinks (the model's CUDA working copy) -> fp32 for the kernels' `const float* sinks`. n = nh.
__global__ void widen_sinks_kernel(const bf16* __restrict__ src, float* __restrict__ dst, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = __bfloat162float(src[i]);
}
}  // namespace

}  // namespace attn

// ---------------- raw entry points ----------------

void attention_fwd_raw(const AttnRawArgs& a, CUstream_st* stream, void* workspace, size_t workspace_bytes) {
  attn::check_raw(a, false);
  if (a.batch == 0 || a.seq == 0) return;
  cudaStream_t st = stream;
  attn::Scratch ws(attn::fwd_ws(a), workspace, workspace_bytes, st, "attention_fwd");
  const int ne = attn::seg_entries(a.seq);
  int2* tab = nullptr;
  if (a.segment_ids) {
    tab = reinterpret_cast<int2*>(ws.get());
    attn::launch_seg_table(a.segment_ids, static_cast<int>(a.batch), static_cast<int>(a.seq), tab, ne, st);
  }
  attn::launch_fwd(a, tab, ne, attention_tuning().fwd_variant, st);
}

void attention_bwd_raw(const AttnRawArgs& a, CUstream_st* stream, void* workspace, size_t workspace_bytes) {
  attn::check_raw(a, true);
  if (a.batch == 0 || a.seq == 0) return;
  cudaStream_t st = stream;
  const attn::BwdLayout L = attn::bwd_layout(a.batch, a.seq, a.n_heads, a.n_kv_heads, a.head_dim,
                                             a.v_head_dim > 0 ? a.v_head_dim : a.head_dim, a.segment_ids != nullptr);
  attn::Scratch ws(L.total, workspace, workspace_bytes, st, "attention_bwd");
  char* p = ws.get();
  attn::BwdWork w;
  w.dq_acc = reinterpret_cast<float*>(p);
  p += L.dq;
  w.dsum = reinterpret_cast<float*>(p);
  p += L.dsum;
  if (L.split > 1) {
    w.dk_acc = reinterpret_cast<float*>(p);
    p += L.dkv;
    w.dv_acc = reinterpret_cast<float*>(p);
    p += L.dvv;
  }
  w.split = L.split;
  w.ne = attn::seg_entries(a.seq);
  if (a.segment_ids) {
    int2* tab = reinterpret_cast<int2*>(p);
    attn::launch_seg_table(a.segment_ids, static_cast<int>(a.batch), static_cast<int>(a.seq), tab, w.ne, st);
    w.segtab = tab;
  }
  attn::launch_bwd(a, w, attention_tuning().bwd_variant, st);
}

// ---------------- Tensor entry points ----------------

namespace {

void need(bool ok, const char* op, const std::string& m) {
  if (!ok) throw DeviceError(std::string(op) + " (CUDA): " + m);
}

void check_t(const char* op, const char* name, const Tensor& t, DType dt, int64_t numel, int64_t heads, int64_t D) {
  need(t.defined(), op, std::string(name) + " is undefined");
  need(t.device() == DeviceType::CUDA, op, std::string(name) + " must be a CUDA tensor");
  need(t.dtype() == dt, op, std::string(name) + " must be " + dtype_name(dt) + ", got " + dtype_name(t.dtype()));
  if (heads > 0)
    need(t.ndim() >= 3 && t.dim(-1) == D && t.dim(-2) == heads && t.numel() == numel, op,
         std::string(name) + " has shape " + shape_str(t.shape()) + ", expected [B, T, " + std::to_string(heads) +
             ", " + std::to_string(D) + "] with B * T * heads * D = " + std::to_string(numel));
  else
    need(t.numel() == numel, op,
         std::string(name) + " has shape " + shape_str(t.shape()) + ", expected " + std::to_string(numel) +
             " elements");
}

// Sinks [nh] on the device, fp32 or bf16 (bf16 is widened into the workspace: sink_ws_bytes).
void check_sinks_t(const char* op, const AttnParams& p) {
  if (!p.sinks) return;
  const Tensor& s = *p.sinks;
  need(s.defined(), op, "sinks is undefined");
  need(s.device() == DeviceType::CUDA, op, "sinks must be a CUDA tensor");
  need(s.dtype() == DType::F32 || s.dtype() == DType::BF16, op,
       std::string("sinks must be float32 or bfloat16, got ") + dtype_name(s.dtype()));
  need(s.numel() == p.n_heads, op,
       "sinks has shape " + shape_str(s.shape()) + ", expected [" + std::to_string(p.n_heads) + "]");
}

size_t sink_ws_bytes(const AttnParams& p) {
  return p.sinks && p.sinks->dtype() == DType::BF16 ? attn::align_up(static_cast<size_t>(p.n_heads) * sizeof(float))
                                                    : 0;
}

// The fp32 sink pointer the kernels take: the tensor itself, or its bf16 values widened into `buf` (sink_ws_bytes
// of scratch) on `st`.
const float* sinks_f32(const AttnParams& p, void* buf, cudaStream_t st) {
  if (!p.sinks) return nullptr;
  if (p.sinks->dtype() == DType::F32) return p.sinks->data<float>();
  float* dst = static_cast<float*>(buf);
  const int n = static_cast<int>(p.n_heads);
  attn::widen_sinks_kernel<<<(n + 255) / 256, 256, 0, st>>>(static_cast<const attn::bf16*>(p.sinks->raw()), dst, n);
  attn::check_cuda(cudaGetLastError(), "sink widening launch");
  return dst;
}

AttnRawArgs to_raw(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                   const Tensor& lse, const AttnParams& p) {
  const int64_t B = p.batch, T = p.seq, nh = p.n_heads, nkv = p.n_kv_heads, D = p.head_dim, Dv = p.dv();
  // What these kernels do not implement must not be dropped silently (attention_generic.h does it).
  check_sinks_t(op, p);
  need(Dv == D || (D == 192 && Dv == 128), op,
       "a v head dim other than head_dim is supported by the flash kernels only as 192 / 128 (DeepSeek MLA)");
  check_t(op, "q", q, DType::BF16, B * T * nh * D, nh, D);
  check_t(op, "k", k, DType::BF16, B * T * nkv * D, nkv, D);
  check_t(op, "v", v, DType::BF16, B * T * nkv * Dv, nkv, Dv);
  check_t(op, "out", out, DType::BF16, B * T * nh * Dv, nh, Dv);
  check_t(op, "lse", lse, DType::F32, B * nh * T, 0, D);
  if (p.segment_ids) check_t(op, "segment_ids", *p.segment_ids, DType::I32, B * T, 0, D);
  AttnRawArgs a;
  a.q = q.raw();
  a.k = k.raw();
  a.v = v.raw();
  a.out = out.raw();
  a.lse = lse.data<float>();
  a.segment_ids = p.segment_ids ? p.segment_ids->data<int32_t>() : nullptr;
  a.q_rs = nh * D;
  a.k_rs = nkv * D;
  a.v_rs = nkv * Dv;
  a.o_rs = nh * Dv;
  a.do_rs = nh * Dv;
  a.dq_rs = nh * D;
  a.dk_rs = nkv * D;
  a.dv_rs = nkv * Dv;
  a.v_head_dim = Dv == D ? 0 : Dv;
  a.batch = B;
  a.seq = T;
  a.n_heads = nh;
  a.n_kv_heads = nkv;
  a.head_dim = D;
  a.sliding_window = p.sliding_window;
  a.scale = p.scale;
  a.softcap = p.softcap > 0.f ? p.softcap : 0.f;  // as the CPU reference: <= 0 is off
  return a;
}

AttnRawArgs raw_dims(const AttnParams& p) {
  AttnRawArgs a;
  a.batch = p.batch;
  a.seq = p.seq;
  a.n_heads = p.n_heads;
  a.n_kv_heads = p.n_kv_heads;
  a.head_dim = p.head_dim;
  a.segment_ids = p.segment_ids ? static_cast<const int32_t*>(p.segment_ids->raw()) : nullptr;
  return a;
}

size_t raw_bwd_ws(const AttnParams& p) {
  if (p.n_kv_heads <= 0 || p.n_heads % p.n_kv_heads != 0) return 0;
  return attn::bwd_layout(p.batch, p.seq, p.n_heads, p.n_kv_heads, p.head_dim, p.dv(), p.segment_ids != nullptr)
      .total;
}

}  // namespace

// Workspace of the Tensor entry points: the raw call's scratch first, then (bf16 sinks only) nh fp32 sinks.
size_t attention_fwd_workspace_bytes(const AttnParams& p) { return attn::fwd_ws(raw_dims(p)) + sink_ws_bytes(p); }

size_t attention_bwd_workspace_bytes(const AttnParams& p) { return raw_bwd_ws(p) + sink_ws_bytes(p); }

void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                   Tensor& lse, CUstream_st* stream, void* workspace, size_t workspace_bytes) {
  const char* op = "attention_fwd";
  need(p.batch >= 0 && p.seq >= 0 && p.n_heads > 0 && p.n_kv_heads > 0 && p.head_dim > 0, op, "bad dimensions");
  AttnRawArgs a = to_raw(op, q, k, v, out, lse, p);
  attn::check_raw(a, false);
  if (a.batch == 0 || a.seq == 0) return;
  const size_t raw_need = attn::fwd_ws(a);
  attn::Scratch ws(raw_need + sink_ws_bytes(p), workspace, workspace_bytes, stream, op);
  a.sinks = sinks_f32(p, ws.get() + raw_need, stream);
  attention_fwd_raw(a, stream, raw_need ? ws.get() : nullptr, raw_need);
}

void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv, Tensor* dsinks,
                   CUstream_st* stream, void* workspace, size_t workspace_bytes) {
  const char* op = "attention_bwd";
  need(p.batch >= 0 && p.seq >= 0 && p.n_heads > 0 && p.n_kv_heads > 0 && p.head_dim > 0, op, "bad dimensions");
  AttnRawArgs a = to_raw(op, q, k, v, out, lse, p);
  const int64_t B = p.batch, T = p.seq, nh = p.n_heads, nkv = p.n_kv_heads, D = p.head_dim, Dv = p.dv();
  check_t(op, "dout", dout, DType::BF16, B * T * nh * Dv, nh, Dv);
  check_t(op, "dq", dq, DType::BF16, B * T * nh * D, nh, D);
  check_t(op, "dk", dk, DType::BF16, B * T * nkv * D, nkv, D);
  check_t(op, "dv", dv, DType::BF16, B * T * nkv * Dv, nkv, Dv);
  const bool want_dsinks = dsinks && dsinks->defined();
  if (want_dsinks) {
    need(p.sinks != nullptr, op, "dsinks given without p.sinks");
    check_t(op, "dsinks", *dsinks, DType::F32, nh, 0, D);
  }
  a.dout = dout.raw();
  a.dq = dq.raw();
  a.dk = dk.raw();
  a.dv = dv.raw();
  attn::check_raw(a, true);
  if (a.batch == 0 || a.seq == 0) return;
  const size_t raw_need = raw_bwd_ws(p);
  // The sinks matter to the backward only through dsinks (lse already holds them): widen them only then.
  attn::Scratch ws(raw_need + (want_dsinks ? sink_ws_bytes(p) : 0), workspace, workspace_bytes, stream, op);
  if (want_dsinks) {
    a.sinks = sinks_f32(p, ws.get() + raw_need, stream);
    a.dsinks = dsinks->data<float>();
  }
  attention_bwd_raw(a, stream, raw_need ? ws.get() : nullptr, raw_need);
}

}  // namespace am::cuda
