#include "models/blocks/fused_proj.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ops/ops.h"

namespace am {

namespace {

std::atomic<int>& mode_flag() {
  static std::atomic<int> m{[] {
    const char* e = std::getenv("AM_FUSED_PROJ");
    if (e && (std::strcmp(e, "0") == 0 || std::strcmp(e, "false") == 0 || std::strcmp(e, "off") == 0))
      return static_cast<int>(FusedProjMode::Off);
    if (e && std::strcmp(e, "all") == 0) return static_cast<int>(FusedProjMode::All);
    if (e && (std::strcmp(e, "1") == 0 || std::strcmp(e, "cuda") == 0)) return static_cast<int>(FusedProjMode::Cuda);
    // Off by default until tests/gpu/test_cuda_fused_proj.cpp has passed on a GPU (docs/fused_projections.md).
    return static_cast<int>(FusedProjMode::Off);
  }()};
  return m;
}

// One [rows, trailing] view spanning `ts` when they lie back to back (same dtype, device, trailing dims);
// undefined otherwise. Every tensor must be defined.
Tensor span(const std::vector<const Tensor*>& ts) {
  const Tensor& f = *ts.front();
  Shape shape = f.shape();
  if (shape.empty()) return Tensor();
  int64_t rows = 0;
  const char* next = static_cast<const char*>(f.raw());
  for (const Tensor* t : ts) {
    if (t->dtype() != f.dtype() || t->device() != f.device() || t->ndim() != f.ndim() ||
        static_cast<const char*>(t->raw()) != next)
      return Tensor();
    for (int d = 1; d < f.ndim(); ++d)
      if (t->dim(d) != f.dim(d)) return Tensor();
    rows += t->dim(0);
    next += t->nbytes();
  }
  shape[0] = rows;
  return Tensor::wrap(f.raw(), shape, f.dtype(), nullptr, f.device());
}

// The span of one field of `ps` (all defined), or of none (all undefined: *out stays undefined). false: mixed,
// or defined but not back to back.
template <typename Field>
bool span_of(const std::vector<const Param*>& ps, Field field, Tensor* out) {
  size_t defined = 0;
  std::vector<const Tensor*> ts;
  for (const Param* p : ps) {
    const Tensor& t = field(*p);
    if (t.defined()) ++defined;
    ts.push_back(&t);
  }
  if (defined == 0) return true;
  if (defined != ps.size()) return false;
  *out = span(ts);
  return out->defined();
}

}  // namespace

FusedProjMode fused_proj_mode() { return static_cast<FusedProjMode>(mode_flag().load()); }
bool fused_proj_enabled() { return fused_proj_mode() != FusedProjMode::Off; }
void set_fused_proj_mode(FusedProjMode m) { mode_flag().store(static_cast<int>(m)); }

StackedProj stack_proj(std::initializer_list<const Param*> weights, std::initializer_list<const Param*> biases,
                       bool for_backward) {
  StackedProj s;
  const FusedProjMode mode = fused_proj_mode();
  if (mode == FusedProjMode::Off) return s;
  const std::vector<const Param*> ws(weights);
  std::vector<const Param*> bs;
  for (const Param* b : biases)
    if (b) bs.push_back(b);
  if (ws.size() < 2 || (!bs.empty() && bs.size() != ws.size())) return s;
  for (const Param* p : ws)
    if (!p || p->lora || p->nf4 || !p->work.defined() || p->work.ndim() != 2) return s;
  for (const Param* p : bs)
    if (p->lora || p->nf4 || !p->work.defined()) return s;
  if (!span_of(ws, [](const Param& p) -> const Tensor& { return p.work; }, &s.w) || !s.w.defined()) return s;
  if (s.w.device() == DeviceType::CPU && mode != FusedProjMode::All) return StackedProj{};
  if (!bs.empty() && (!span_of(bs, [](const Param& p) -> const Tensor& { return p.work; }, &s.b) || !s.b.defined()))
    return StackedProj{};
  if (for_backward) {
    if (!span_of(ws, [](const Param& p) -> const Tensor& { return p.grad; }, &s.dw)) return StackedProj{};
    if (!bs.empty() && !span_of(bs, [](const Param& p) -> const Tensor& { return p.grad; }, &s.db))
      return StackedProj{};
  }
  s.ok = true;
  return s;
}

void stacked_fwd(const StackedProj& s, const Tensor& x, Tensor& y) {
  ops::linear_fwd(x, s.w, s.b.defined() ? &s.b : nullptr, y);
}

void stacked_bwd(const StackedProj& s, const Tensor& x, const Tensor& dy, Tensor* dx) {
  Tensor dw = s.dw, db = s.db;
  ops::linear_bwd(x, s.w, dy, dx, dw, db.defined() ? &db : nullptr);
}

}  // namespace am
