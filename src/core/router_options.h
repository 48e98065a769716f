// The options of DeepSeek's grouped routers (ops::moe_router_grouped_fwd / _bwd, whose contract is in
// src/ops/moe_ops.h). Here in core/, as AttnParams is, so that a backend (backend/cuda/moe_router_grouped.h) takes
// them without including ops/: ops/ is the one door from the models to the backends, never the other way round.
#pragma once
#include <cstdint>

namespace am {

struct GroupedRouterOptions {
  bool sigmoid = false;                                       // v3: sigmoid scores; v2: softmax
  enum class Group { None, Max, Top2Sum } group = Group::None;  // group-limited selection (v2 Max, v3 Top2Sum)
  int64_t n_group = 1, topk_group = 1;
  bool norm_topk_prob = false;
  float routed_scaling_factor = 1.f;
};

}  // namespace am
