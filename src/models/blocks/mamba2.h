// Nemotron-H's Mamba2 mixer (HF NemotronHMamba2Mixer, its torch_forward path), on the CPU and on CUDA:
//   proj = x Win^T (+b)                          [N, Din + Cd + nh]   Din = nh * P, Cd = Din + 2 G S
//   z, xBC, dt_raw = split(proj, [Din, Cd, nh])  (HF: gate, hidden_states_B_C, dt; the leading d_mlp is 0)
//   xBC = silu(causal depthwise conv1d(xBC; conv1d.weight [Cd, 1, K], conv1d.bias [Cd]))
//   xs, B, C = split(xBC, [Din, G S, G S])
//   dt = max(softplus(dt_raw + dt_bias), time_step_min)  (the torch path's clamp) [N, nh]
//   A = -exp(A_log)                                                           [nh]
//   y = selective scan (ops/mamba2_ops.h) + D * xs                            [N, Din]
//   out = out_proj( RMSNorm_grouped(y * silu(z)) * norm.weight )             [N, H]  (groups of Din / G)
// Dtypes: the activations (proj and its splits, the conv, the scan's inputs and output, the gated norm) are in the
// ExecContext's activation dtype: fp32 on the CPU (the torch path's .float() casts are identities there), bf16 on
// CUDA with fp32 math inside every kernel. dt, A and the norm's rstd are fp32 on both, and the small weights (conv,
// dt_bias, A_log, D, norm) are read from their fp32 master copies. Packing: the conv window and the scan state
// restart at every segment boundary (AttnParams::segment_ids). The scan's per-step states are not kept: its
// backward recomputes them (on CUDA without storing them at all, backend/cuda/mamba2.h).
#pragma once
#include <string>

#include "io/model_config.h"
#include "models/exec.h"
#include "models/params.h"

namespace am {

struct Mamba2Weights {
  Param *in_proj = nullptr, *in_bias = nullptr;    // [Din + Cd + nh, H], [..]
  Param *conv_w = nullptr, *conv_b = nullptr;      // [Cd, 1, K], [Cd]
  Param *dt_bias = nullptr, *A_log = nullptr, *D = nullptr;  // [nh] each
  Param* norm = nullptr;                           // [Din]
  Param *out_proj = nullptr, *out_bias = nullptr;  // [H, Din], [H]
};

struct Mamba2Saved {
  Tensor x;        // [N, H] block input
  Tensor xbc_in;   // [N, Cd] conv input
  Tensor conv_pre; // [B, T, Cd] before silu
  Tensor dt_in;    // [N, nh] fp32 dt_raw + dt_bias
  Tensor dt;       // [N, nh] fp32 after softplus / clamp
  Tensor A;        // [nh] fp32
  Tensor xs, Bm, Cm, z;  // [N, Din], [N, G S], [N, G S], [N, Din]
  Tensor y;        // [N, Din] scan output
  Tensor rstd;     // [N * G] fp32
  Tensor g;        // [N, Din] gated norm output (out_proj input)
};

// prefix: "model.layers.{i}.mixer." (registered in NemotronHMamba2Mixer's state_dict order); `hub` is the
// same prefix with the hub's names ("backbone.layers.{i}.mixer."), set as each parameter's first layout.
Mamba2Weights register_mamba2(ParamStore& ps, const std::string& prefix, const std::string& hub, const io::ModelConfig& cfg);
// x [N, H] (N = B * T), seg [B, T] or nullptr. Returns [N, H].
Tensor mamba2_forward(const ExecContext& ex, const Mamba2Weights& w, const io::ModelConfig& cfg, const Tensor& x, int64_t B,
                      int64_t T, const Tensor* seg, Mamba2Saved* s);
Tensor mamba2_backward(const ExecContext& ex, const Mamba2Weights& w, const io::ModelConfig& cfg, const Mamba2Saved& s,
                       int64_t B, int64_t T, const Tensor* seg, const Tensor& dy);

// ---- incremental decode (automodel generate), one sequence; CPU only for now ----
// What a Mamba2 layer carries from one step to the next (HF's cache_params conv_states / recurrent_states):
struct Mamba2State {
  Tensor conv;  // [K - 1, Cd] the conv inputs (xBC before the conv) of the last K - 1 tokens, oldest first, in the
                // activation dtype; zeros before the sequence starts (= the conv's left zero padding). Undefined when K = 1.
  Tensor ssm;   // [nh, P, S] fp32: the scan state after the last token (zeros before the first)
};
// The empty state (no token seen) on ex's device.
Mamba2State mamba2_initial_state(const ExecContext& ex, const io::ModelConfig& cfg);
// x [n, H]: the next n >= 1 tokens of the sequence st has seen so far. Returns [n, H], each row what mamba2_forward
// computes for that position of the whole sequence, and advances st past the n tokens. The projections, the dt / A
// chain, the gated norm and the conv are the training ops (the conv over the window [st.conv; new inputs] of K - 1 + n
// rows, whose zero rows add exact zeros); the scan is ops::mamba_ssm_scan_carry. Throws DeviceError on CUDA (no state-carrying
// scan kernel there: generate recomputes instead).
Tensor mamba2_forward_cached(const ExecContext& ex, const Mamba2Weights& w, const io::ModelConfig& cfg, const Tensor& x,
                             Mamba2State& st);

// Adds `hub + suffix` as the first checkpoint layout of p (whose name is prefix + suffix).
void add_hub_layout(Param& p, const std::string& hub_name);

}  // namespace am
