// cuDNN 9 fused attention (SDPA) for the flash attention forward and backward, built through cuDNN's backend
// graph API (cudnn_graph.h; no cudnn-frontend). ops::attention_fwd/bwd (src/ops/ops_cuda.cpp) take it when
// cudnn_attention_supports(p) says yes and the execution plan for the shape builds: by default (AM_ATTENTION unset
// or "auto") from a shape's third call on and for a bounded number of shapes (fixed-shape training), with
// AM_ATTENTION=cudnn for every shape, never with AM_ATTENTION=flash; otherwise the engine's own kernels run.
//
// Same contract as cuda::attention_fwd/bwd (attention.h) for what it takes:
//   q [B, T, nh, D], k/v [B, T, nkv, D], out/dout/dq [B, T, nh, D], dk/dv [B, T, nkv, D]: bf16, contiguous, CUDA
//   lse [B, nh, T] fp32: natural-log logsumexp of the scaled scores (cuDNN's softmax "stats" are exactly that:
//   rowmax + log(rowsum(exp(s - rowmax))), laid out [B, nh, T, 1]), so a cuDNN forward pairs with the engine's
//   backward and the other way round.
//   dq, dk, dv are assigned. Causal always (key j visible to query i iff j <= i), GQA (nkv divides nh), head dim
//   64 or 128, optional sliding window (i - j < window). Not taken (supports() says no, the caller runs its own
//   kernels): segment ids, sinks, soft-capping, Dv != D, other dtypes / head dims.
//
// How (cudnn_attention.cpp): the operation graph is the "flash fused attention" pattern cuDNN's runtime
// fusion engines recognise: matmul(Q, K^T) -> x scale -> causal (and window) mask as GEN_INDEX / CMP /
// BINARY_SELECT pointwise ops -> softmax as MAX / SUB / EXP / ADD-reduction / DIV with stats = max + log(sum)
// -> matmul(P, V); the backward graph recomputes P = exp(scale * Q K^T - stats) under the same mask, and
// dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)) * scale, dK = dS^T Q, dQ = dS K (through an fp32
// accumulator in the workspace). GQA heads are reduced inside the graph. Execution plans (engine chosen by
// cuDNN's heuristics, mode A, first that finalises) are cached per (device, pass, B, T, nh, nkv, D, window);
// a call after the first only builds a variant pack and calls cudnnBackendExecute. One cudnnHandle per
// (device, stream).
//
// libcudnn.so.9 is loaded at run time (dlopen; the device machines get it from pip nvidia-cudnn through
// tools/device_env.sh), so binaries start and run without it: supports() is then false. Compiled only when the
// build found cudnn.h (CMake defines AM_WITH_CUDNN); otherwise the inline stubs below say no to everything.
#pragma once
#include <cstddef>
#include <string>

#include "core/attn_params.h"
#include "core/tensor.h"

struct CUstream_st;  // = cudaStream_t

namespace am::cuda {

struct CudnnPlanStats {
  int64_t plans = 0;
  double seconds = 0;
};

#ifdef AM_WITH_CUDNN
inline constexpr bool kCudnnAttentionCompiled = true;

// libcudnn loaded (9.x, run-time version >= 9.0) and a CUDA device present; else false with the reason in *why.
bool cudnn_attention_available(std::string* why = nullptr);

// True when the cuDNN path takes p with tensors of `dtype` (see the list above) and the library is available.
// Says nothing about whether the plan for the shape builds: the *_workspace functions do that.
bool cudnn_attention_supports(const AttnParams& p, DType dtype, std::string* why = nullptr);

// Builds (or finds) the execution plan for p and returns the scratch the call needs in *bytes (the engine's
// workspace, plus for the backward an fp32 dQ accumulator B*nh*T*D and the rowsum(dO * O) rows B*nh*T).
// False when the plan cannot be built (the first failure is logged once; the reason is kept, see
// cudnn_attention_last_error()); nothing is thrown.
// `stream`: the stream the calls will run on (a cuDNN handle is made for it if none exists yet).
bool cudnn_attention_fwd_workspace(const AttnParams& p, size_t* bytes, CUstream_st* stream = nullptr);
bool cudnn_attention_bwd_workspace(const AttnParams& p, size_t* bytes, CUstream_st* stream = nullptr);

// Run on `stream` (nullptr: the legacy default stream). workspace: at least the *_workspace bytes, 16-byte
// aligned, or nullptr to take it stream-ordered from cudaMallocAsync. Returns false, having queued nothing,
// when the plan does not build or cuDNN refuses to execute (the caller then runs its own kernels); throws
// DeviceError for inconsistent tensors (shapes, dtypes, host memory), as attention_fwd/bwd do.
bool cudnn_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                         Tensor& lse, CUstream_st* stream = nullptr, void* workspace = nullptr,
                         size_t workspace_bytes = 0);
bool cudnn_attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                         const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv,
                         CUstream_st* stream = nullptr, void* workspace = nullptr, size_t workspace_bytes = 0);

// The last reason a plan build or an execution failed ("" if none): for tests and benchmarks.
std::string cudnn_attention_last_error();
// Plans built (or attempted) in this process and the host seconds their builds took (NVRTC compiles included).
CudnnPlanStats cudnn_attention_plan_stats();
// cudnnGetVersion() of the loaded library (e.g. 91900), 0 when not loaded.
size_t cudnn_attention_runtime_version();

#else
inline constexpr bool kCudnnAttentionCompiled = false;
inline bool cudnn_attention_available(std::string* why = nullptr) {
  if (why) *why = "built without cuDNN (cudnn.h not found at configure time)";
  return false;
}
inline bool cudnn_attention_supports(const AttnParams&, DType, std::string* why = nullptr) {
  return cudnn_attention_available(why);
}
inline bool cudnn_attention_fwd_workspace(const AttnParams&, size_t*, CUstream_st* = nullptr) { return false; }
inline bool cudnn_attention_bwd_workspace(const AttnParams&, size_t*, CUstream_st* = nullptr) { return false; }
inline bool cudnn_attention_fwd(const Tensor&, const Tensor&, const Tensor&, const AttnParams&, Tensor&, Tensor&,
                                CUstream_st* = nullptr, void* = nullptr, size_t = 0) {
  return false;
}
inline bool cudnn_attention_bwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const Tensor&, const AttnParams&, Tensor&, Tensor&, Tensor&, CUstream_st* = nullptr,
                                void* = nullptr, size_t = 0) {
  return false;
}
inline std::string cudnn_attention_last_error() { return "built without cuDNN"; }
inline CudnnPlanStats cudnn_attention_plan_stats() { return {}; }
inline size_t cudnn_attention_runtime_version() { return 0; }
#endif

}  // namespace am::cuda
