// Launchers shared between attention.cu (API, checks, workspace) and the kernel files. Internal.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "backend/cuda/attention.h"

namespace am::cuda::attn {

// Throws am::DeviceError "attention <what>: CUDA error ..." when e is not cudaSuccess.
void check_cuda(cudaError_t e, const char* what);

// True when the current device is compute capability 9.0 (H100/H200): the sm_90a (wgmma) kernels run there.
bool is_sm90();

// Segment-range table: for each batch row and each kSegGran-row span, the (min, max) of the
// non-negative segment ids ([B][ne], ne = ceil(T / kSegGran)). Lets kernels skip whole tiles whose
// query and key spans share no segment (packed documents).
void launch_seg_table(const int32_t* seg, int B, int T, int2* table, int ne, cudaStream_t st);

void launch_fwd(const AttnRawArgs& a, const int2* segtab, int ne, int variant, cudaStream_t st);

struct BwdWork {
  float* dq_acc = nullptr;  // [B, T, nh, D] fp32, zeroed by the pre-pass
  float* dsum = nullptr;    // [B, nh, T] rowsum(dout * out)
  float* dk_acc = nullptr;  // [B, T, nkv, D] fp32, only when split > 1 (zeroed by the launcher)
  float* dv_acc = nullptr;
  const int2* segtab = nullptr;
  int ne = 0;
  int split = 1;
};
void launch_bwd(const AttnRawArgs& a, const BwdWork& w, int variant, cudaStream_t st);

// Kernel rows per kv block of the backward variant (for the split heuristic); variant 0 = auto.
int resolve_bwd_variant(int head_dim, int variant);
int bwd_block_kv_rows(int head_dim, int variant);

}  // namespace am::cuda::attn
