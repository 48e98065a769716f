// Data parallelism over flat per-layer buffers (DESIGN.md principle 5, "Distributed"), with two strategies:
//   fsdp2 (default): a rank owns a contiguous 1/g slice of each bucket's fp32 master weights, gradient and
//          optimizer state (g = the bucket's group size); the working weights of a layer are all-gathered
//          ahead of its use (the next layer is prefetched while this one computes) and released after it;
//          a layer's unsharded gradient is allocated when its backward starts and reduce-scattered into the
//          rank's slice as soon as that backward is done, in every micro-batch (the slices accumulate, as
//          FSDP2 does by default), while backward goes on with the layers still to run.
//   ddp:   every rank keeps everything; gradients accumulate in place over the micro-batches and are
//          all-reduced per layer in the step's last backward (DDP's no_sync).
// Either way gradients are reduced in fp32 and summed, not averaged: each rank's backward already carries
// 1 / (label tokens of the global batch).
//
// A unit (models/model.h ParamHooks: the root, then one per decoder layer) has up to two buckets:
//   dense   the unit's ordinary parameters, over the data-parallel group (every rank);
//   experts the unit's expert-parallel parameters ([E/ep, ...] per rank), over the ranks that hold the same
//           experts (rank % ep), whose gradients they sum (AutoModel's ep_shard dimension).
// Bucket layout: the parameters' elements back to back in registration order, padded to a multiple of the
// group size: [numel | pad], shard = padded / g, rank r owns [r * shard, (r + 1) * shard).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "models/model.h"
#include "train/optimizer.h"

namespace am::dist {

enum class Strategy { Fsdp2, Ddp };

// The communicators of a run, made once at start. With world W and ep_size E:
//   world      every rank (= the data-parallel group);
//   ep         ranks [b * E, (b + 1) * E) (contiguous: one node for E <= GPUs per node): tokens travel here;
//   ep_replica ranks with the same rank % E, which hold the same experts (W / E of them).
struct Groups {
  std::unique_ptr<Communicator> world, ep, ep_replica;
  int ep_size = 1;
  static Groups make(std::unique_ptr<Communicator> world, int ep_size);
};

// Part of one parameter's fp32 state that a slot holds: elements [begin, end) of the whole parameter
// (flattened, all experts), starting at element `at` of the slot. Checkpoints are written and read in
// these terms, so a checkpoint made with any world size / ep_size / strategy loads into any other.
struct StatePiece {
  std::string param;
  int64_t begin = 0, end = 0;
  int64_t at = 0;
};

struct StateSlot {
  OptSlot opt;                      // master values, gradient, working copy: what the optimizer updates
  std::vector<StatePiece> pieces;
  // This rank counts the slot in the global grad norm and writes it in checkpoints (replicated slots have
  // one canonical holder: the group's rank 0).
  bool canonical = true;
};

class DataParallel : public ParamHooks {
 public:
  // The model's parameters must already be on ex's device with their initial values; they become views
  // of the buckets (ddp) or are released until gathered (fsdp2).
  // pure_bf16 (model.dtype bfloat16, docs/precision.md): the buckets hold bf16 parameters (on the host fp32
  // storage holding bf16 values), bf16 gradients and, through the optimizer, bf16 state: 8 bytes per parameter
  // instead of 18, sharded as the fp32 state is. Backward writes a transient fp32 gradient per bucket (the ops
  // accumulate in fp32), which every micro-batch reduces in fp32 (reduce-scatter or all-reduce) and rounds into
  // the rank's bf16 gradient once; fsdp2 gathers the bf16 values.
  DataParallel(CausalLM& model, Groups& groups, Strategy strategy, const ExecContext& ex, bool pure_bf16 = false);
  ~DataParallel() override;

  Strategy strategy() const { return strategy_; }
  void begin_step();                       // zero the rank's gradients (fsdp2: unsharded ones come with backward)
  void set_sync(bool last_micro) { sync_ = last_micro; }  // ddp: all-reduce during this backward (fsdp2 always reduces)
  void finish_grads();                     // wait for every gradient reduction of the step
  double grad_sq_norm() const;             // sum of squares of the whole model's gradient (every rank)
  void scale_grads(float c);
  bool pure_bf16() const { return bf16_; }
  // Pure bf16 on the host: rounds the masters to bf16 values (after a checkpoint of an fp32 run was read in).
  void round_values();
  std::vector<OptSlot> opt_slots() const;
  const std::vector<StateSlot>& slots() const { return slots_; }
  // Makes the full values of unit u's parameters present (p.value / p.work) outside forward/backward
  // (checkpoint export), and releases them again.
  void gather_unit(int u);
  void release_unit(int u);
  int num_units() const { return static_cast<int>(units_.size()); }
  const std::vector<Param*>& unit_params(int u) const { return unit_params_.at(static_cast<size_t>(u)); }

  void before_use(int unit, bool backward) override;
  void after_forward(int unit) override;
  void after_backward(int unit) override;

 private:
  struct Bucket;
  void gather(Bucket& b, bool async);
  void finish_gather(Bucket& b);
  void release(Bucket& b);
  void alloc_full_grad(Bucket& b);  // sharded: the zeroed unsharded gradient, params' grads pointed at it
  void reduce(Bucket& b);
  void fold(Bucket& b, const Tensor& reduced);
  void wait_reduce(Bucket& b);

  CausalLM& model_;
  Groups& groups_;
  Strategy strategy_;
  ExecContext ex_;
  bool bf16_ = false;
  std::vector<std::vector<std::unique_ptr<Bucket>>> units_;  // per unit: dense, experts (either may be absent)
  std::vector<std::vector<Param*>> unit_params_;
  std::vector<StateSlot> slots_;
  bool sync_ = true;
  bool in_step_ = false;        // between begin_step and finish_grads: backward may allocate gradients
  Bucket* reducing_ = nullptr;  // the last bucket whose reduce-scatter is in flight (fsdp2)
};

Strategy parse_strategy(const std::string& s);  // "fsdp2" | "ddp"; UsageError otherwise

}  // namespace am::dist
