#include "dist/data_parallel.h"

#include <algorithm>

#include "core/error.h"
#include "ops/device.h"
#include "ops/ops.h"

namespace am::dist {

Strategy parse_strategy(const std::string& s) {
  if (s == "fsdp2" || s == "fsdp" || s == "megatron_fsdp") return Strategy::Fsdp2;  // megatron_fsdp: warned at read
  if (s == "ddp") return Strategy::Ddp;
  throw UsageError("distributed.strategy: expected fsdp2 or ddp, got '" + s + "'");
}

Groups Groups::make(std::unique_ptr<Communicator> world, int ep_size) {
  Groups g;
  const int r = world->rank();
  // Both splits are collectives over the world: every rank makes them, in this order.
  g.ep = world->split(r / ep_size, r);
  g.ep_replica = world->split(r % ep_size, r);
  g.world = std::move(world);
  g.ep_size = ep_size;
  return g;
}

struct DataParallel::Bucket {
  std::string key;             // "<unit>/dense" | "<unit>/experts"
  Communicator* group = nullptr;
  bool sharded = false;        // fsdp2 over a group of more than one rank
  std::vector<Param*> params;
  std::vector<int64_t> off;    // flat offset of each parameter
  int64_t numel = 0, padded = 0, shard = 0;
  // fp32 mode / pure bf16 (bf16_: bf16 on CUDA, fp32 holding bf16 values on the host):
  Tensor master;               // [shard] (sharded) or [numel] (replicated: the params' values are views)
  Tensor grad;                 // fp32 / bf16, same size: the reduced gradient the optimizer reads
  Tensor work;                 // fp32 mode, CUDA, replicated: bf16 [numel] working copy (the params' work are views)
  Tensor full, full_work;      // sharded, while gathered: [padded] values (master's dtype), fp32 mode on CUDA
                               // also their bf16 working copy
  Tensor full_grad;            // fp32 [padded] gradient of one micro-batch's backward: sharded buckets, and
                               // every bucket in pure bf16 (the backward ops accumulate in fp32)
  Tensor rs_out;               // sharded, reduction in flight: its fp32 [shard] result, folded into grad after
  bool grad_assigned = false;  // this step's first reduction has written `grad`
  bool fold_assign = false;    // the reduction in flight is the step's first: it assigns grad instead of adding
  bool fold_full = false;      // pure bf16, replicated: full_grad is being all-reduced, to fold in when done
  WorkPtr gathering, reducing;
  bool gathered = false;
};

DataParallel::DataParallel(CausalLM& model, Groups& groups, Strategy strategy, const ExecContext& ex, bool pure_bf16)
    : model_(model), groups_(groups), strategy_(strategy), ex_(ex), bf16_(pure_bf16) {
  // Pure bf16: the parameter is bf16 on CUDA (no fp32 master, no separate working copy); the host computes in fp32.
  const DType vdt = bf16_ && ex.on_cuda() ? DType::BF16 : DType::F32;
  const DType gdt = bf16_ ? DType::BF16 : DType::F32;
  unit_params_ = model.param_units();
  units_.resize(unit_params_.size());
  for (size_t u = 0; u < unit_params_.size(); ++u) {
    for (int expert = 0; expert < 2; ++expert) {
      auto b = std::make_unique<Bucket>();
      for (Param* p : unit_params_[u])
        if (p->trainable && p->expert == (expert == 1)) b->params.push_back(p);
      if (b->params.empty()) continue;
      b->key = std::to_string(u) + (expert ? "/experts" : "/dense");
      b->group = expert ? groups.ep_replica.get() : groups.world.get();
      const int g = b->group->size();
      b->sharded = strategy == Strategy::Fsdp2 && g > 1;
      for (Param* p : b->params) {
        b->off.push_back(b->numel);
        b->numel += shape_numel(p->shape);
      }
      b->padded = b->sharded ? (b->numel + g - 1) / g * g : b->numel;
      b->shard = b->sharded ? b->padded / g : b->numel;
      // Pack the initial values into one flat buffer, then keep this rank's part. With the trainable values
      // still on the host (ParamStore::set_defer_trainable_to_device: the trainer's CUDA path) the packing is
      // done there and only what the rank keeps is uploaded: no GPU ever holds the whole model.
      const bool on_host = b->params.front()->value.device() == DeviceType::CPU;
      Tensor flat = on_host ? Tensor::zeros({b->padded}, DType::F32) : ex.zeros({b->padded}, DType::F32);
      for (size_t i = 0; i < b->params.size(); ++i) {
        Tensor dst = flat.slice_rows(b->off[i], b->off[i] + shape_numel(b->params[i]->shape));
        ops::copy_(dst, b->params[i]->value);
      }
      if (bf16_) ops::round_to_bf16_values_(flat);
      const int64_t lo = b->sharded ? b->group->rank() * b->shard : 0, hi = lo + b->shard;
      if (b->sharded) {
        b->master = ex.zeros({b->shard}, vdt);
        Tensor mine = flat.slice_rows(lo, hi);
        if (on_host) mine = ex.upload(mine);
        ops::copy_(b->master, mine);
        for (Param* p : b->params) p->value = p->grad = p->work = Tensor();  // until gathered
      } else if (bf16_) {
        // The values are the parameters (views); gradients exist only while backward runs (alloc_full_grad).
        if (on_host && ex.on_cuda()) flat = ex.upload(flat);
        if (vdt == DType::F32) {
          b->master = flat;
        } else {
          b->master = ex.empty({b->numel}, vdt);
          ops::copy_(b->master, flat);
        }
        b->grad = ex.zeros({b->numel}, gdt);
        for (size_t i = 0; i < b->params.size(); ++i) {
          Param* p = b->params[i];
          const int64_t a = b->off[i], e = a + shape_numel(p->shape);
          p->value = p->work = b->master.slice_rows(a, e).view(p->shape);
          p->grad = Tensor();
        }
      } else {
        b->master = on_host && ex.on_cuda() ? ex.upload(flat) : flat;
        b->grad = ex.zeros({b->numel}, DType::F32);
        if (ex.on_cuda()) {
          b->work = ex.empty({b->numel}, ex.act_dtype);
          ops::copy_(b->work, b->master);
        }
        for (size_t i = 0; i < b->params.size(); ++i) {
          Param* p = b->params[i];
          const int64_t a = b->off[i], e = a + shape_numel(p->shape);
          p->value = b->master.slice_rows(a, e).view(p->shape);
          p->grad = b->grad.slice_rows(a, e).view(p->shape);
          p->work = ex.on_cuda() ? b->work.slice_rows(a, e).view(p->shape) : p->value;
        }
      }
      if (b->sharded) b->grad = ex.zeros({b->shard}, gdt);
      StateSlot slot;
      slot.opt = OptSlot{b->key, &b->master, &b->grad, b->work.defined() ? &b->work : nullptr};
      slot.canonical = b->sharded || b->group->rank() == 0;
      for (size_t i = 0; i < b->params.size(); ++i) {
        const Param* p = b->params[i];
        const int64_t a = std::max(lo, b->off[i]), e = std::min(hi, b->off[i] + shape_numel(p->shape));
        if (a >= e) continue;
        slot.pieces.push_back({p->name, p->global_offset + (a - b->off[i]), p->global_offset + (e - b->off[i]), a - lo});
      }
      slots_.push_back(std::move(slot));
      units_[u].push_back(std::move(b));
    }
  }
  model.set_param_hooks(this);
}

DataParallel::~DataParallel() {
  model_.set_param_hooks(nullptr);
  for (auto& u : units_)
    for (auto& b : u) {
      if (b->gathering) b->gathering->wait();
      if (b->reducing) b->reducing->wait();
    }
}

std::vector<OptSlot> DataParallel::opt_slots() const {
  std::vector<OptSlot> out;
  for (auto& s : slots_) out.push_back(s.opt);
  return out;
}

// ---- working weights ----

void DataParallel::gather(Bucket& b, bool async) {
  if (!b.sharded || b.gathered || b.gathering) return;
  b.full = ex_.empty({b.padded}, b.master.dtype());  // pure bf16 on CUDA: half the traffic of fp32
  b.gathering = b.group->all_gather(b.master, b.full, async);
}

void DataParallel::finish_gather(Bucket& b) {
  if (!b.sharded || b.gathered) return;
  if (!b.gathering) gather(b, false);
  b.gathering->wait();
  b.gathering.reset();
  if (ex_.on_cuda() && !bf16_) {
    // The matmuls read bf16 working weights; the fp32 values stay for RMSNorm / embedding weights that the
    // fp32 residual stream reads (DecoderLM::wide_weight).
    b.full_work = ex_.empty({b.padded}, ex_.act_dtype);
    ops::copy_(b.full_work, b.full);
  }
  for (size_t i = 0; i < b.params.size(); ++i) {
    Param* p = b.params[i];
    const int64_t a = b.off[i], e = a + shape_numel(p->shape);
    p->value = b.full.slice_rows(a, e).view(p->shape);
    p->work = b.full_work.defined() ? b.full_work.slice_rows(a, e).view(p->shape) : p->value;
  }
  b.gathered = true;
}

void DataParallel::release(Bucket& b) {
  if (!b.sharded || !b.gathered) return;
  for (Param* p : b.params) p->value = p->work = Tensor();
  b.full = b.full_work = Tensor();
  b.gathered = false;
}

void DataParallel::gather_unit(int u) {
  for (auto& b : units_.at(static_cast<size_t>(u))) finish_gather(*b);
}

void DataParallel::release_unit(int u) {
  for (auto& b : units_.at(static_cast<size_t>(u))) release(*b);
}

void DataParallel::before_use(int unit, bool backward) {
  gather_unit(unit);
  // A sharded bucket's unsharded gradient exists only while its unit's backward writes it: the root's for the
  // whole micro-batch (the LM head's backward comes first, the embedding's last), a layer's from its backward
  // to its reduce-scatter. Not during validation (no step open).
  if (in_step_ && (backward || unit == 0))
    for (auto& b : units_[static_cast<size_t>(unit)]) alloc_full_grad(*b);
  // Prefetch the unit that runs next (forward: the next layer; backward: the previous one; the root is
  // used from the first op to the last, so it is never the one prefetched).
  const int next = backward ? unit - 1 : unit + 1;
  if (unit > 0 && next > 0 && next < num_units())
    for (auto& b : units_[static_cast<size_t>(next)]) gather(*b, true);
}

void DataParallel::after_forward(int unit) {
  // fsdp2 reshards after forward (ZeRO-3): backward gathers the layer again. The root stays gathered
  // through the whole micro-batch in training; a forward-only pass releases it at its end.
  release_unit(unit);
}

// ---- gradients ----

void DataParallel::begin_step() {
  finish_grads();
  in_step_ = true;
  for (auto& u : units_)
    for (auto& b : u) {
      ops::zero_(b->grad);
      b->grad_assigned = false;
    }
}

void DataParallel::alloc_full_grad(Bucket& b) {
  if (!(b.sharded || bf16_) || b.full_grad.defined()) return;
  if (b.reducing) wait_reduce(b);  // the previous micro-batch's reduction of this bucket still reads its buffer
  b.full_grad = ex_.zeros({b.padded}, DType::F32);
  for (size_t i = 0; i < b.params.size(); ++i)
    b.params[i]->grad = b.full_grad.slice_rows(b.off[i], b.off[i] + shape_numel(b.params[i]->shape)).view(b.params[i]->shape);
}

// Folds an fp32 reduced gradient into the rank's slice: the step's first assigns (pure bf16: one rounding),
// later ones add (pure bf16: acc + g in fp32, one rounding, as train/pure_bf16.h).
void DataParallel::fold(Bucket& b, const Tensor& reduced) {
  if (b.fold_assign) ops::copy_(b.grad, reduced);
  else ops::add_(b.grad, reduced);
}

void DataParallel::reduce(Bucket& b) {
  if (!b.sharded && !bf16_) {
    // ddp, fp32: the gradient accumulated in place in `grad` over the step's micro-batches; this is the step's
    // last backward. The all-reduce runs while the previous layer's backward computes (NCCL: on the communication
    // stream; MPI: nonblocking) and nothing writes `grad` again before finish_grads.
    if (b.group->size() == 1) return;
    if (reducing_ && reducing_ != &b) wait_reduce(*reducing_);
    b.reducing = b.group->all_reduce_async(b.grad, ReduceOp::Sum);
    reducing_ = &b;
    return;
  }
  // The unsharded fp32 gradient of this micro-batch (alloc_full_grad): reduced in fp32, then folded into the
  // rank's `grad` by wait_reduce (the step's first reduction assigns, later ones add).
  if (!b.full_grad.defined()) return;  // this micro-batch's backward did not reach the bucket
  b.fold_assign = !b.grad_assigned;
  b.grad_assigned = true;
  // At most one reduction in flight besides the newest: the previous bucket's unsharded gradient is freed once
  // its reduction is done, so only about two layers' full gradients exist at a time.
  if (reducing_ && reducing_ != &b) wait_reduce(*reducing_);
  if (b.sharded) {
    // fp32: the step's first reduce-scatter writes the slice itself; otherwise a temporary slice is folded in.
    Tensor* out = &b.grad;
    if (bf16_ || !b.fold_assign) {
      b.rs_out = ex_.empty({b.shard}, DType::F32);
      out = &b.rs_out;
    }
    b.reducing = b.group->reduce_scatter(b.full_grad, *out, /*async=*/true);
  } else {  // pure bf16, replicated: all-reduce the fp32 gradient itself, fold it when it lands
    if (b.group->size() > 1) b.reducing = b.group->all_reduce_async(b.full_grad, ReduceOp::Sum);
    b.fold_full = true;
  }
  if (b.reducing) reducing_ = &b;
  else wait_reduce(b);  // nothing in flight (a group of one): fold now
}

void DataParallel::wait_reduce(Bucket& b) {
  if (b.reducing) {
    b.reducing->wait();
    b.reducing.reset();
  }
  if (b.rs_out.defined()) {
    fold(b, b.rs_out);
    b.rs_out = Tensor();
  }
  if (b.fold_full) {  // pure bf16, replicated: the all-reduced fp32 gradient
    fold(b, b.full_grad);
    b.fold_full = false;
  }
  if (b.sharded || bf16_) {
    b.full_grad = Tensor();
    for (Param* p : b.params) p->grad = Tensor();
  }
  if (reducing_ == &b) reducing_ = nullptr;
}

void DataParallel::after_backward(int unit) {
  for (auto& b : units_.at(static_cast<size_t>(unit))) {
    // Replicated buckets (ddp) accumulate every micro-batch's gradient in place and all-reduce once, in the
    // step's last backward. Sharded ones (fsdp2) reduce-scatter after every backward and accumulate the
    // slices, as FSDP2 does by default: the unsharded gradient never outlives its micro-batch, so a step holds
    // about two layers' worth of it whatever the accumulation (the price: one reduce-scatter per micro-batch).
    // Pure bf16 reduces every bucket after every backward too (its gradient is kept in bf16; the fp32 sums
    // are reduced and rounded once per micro-batch, as one rank rounds once per micro-batch).
    if (sync_ || b->sharded || bf16_) reduce(*b);
    release(*b);
  }
}

void DataParallel::finish_grads() {
  for (auto& u : units_)
    for (auto& b : u)
      if (b->reducing || b->rs_out.defined() || ((b->sharded || bf16_) && b->full_grad.defined())) wait_reduce(*b);
  in_step_ = false;
}

double DataParallel::grad_sq_norm() const {
  double sq = 0.0;
  for (const StateSlot& s : slots_)
    if (s.canonical) sq += ops::sum_squares(*s.opt.grad);
  groups_.world->all_reduce_host(&sq, 1);
  return sq;
}

void DataParallel::round_values() {
  if (!bf16_) return;
  for (auto& u : units_)
    for (auto& b : u) ops::round_to_bf16_values_(b->master);
}

void DataParallel::scale_grads(float c) {
  for (const StateSlot& s : slots_) ops::scale_(*s.opt.grad, c);
}

}  // namespace am::dist
