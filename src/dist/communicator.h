// The one collective interface of the engine (DESIGN.md "Distributed"). Two real engines sit behind it:
//   MPI  (Open MPI) for host tensors: CPU ranks, CI's 2-rank tests, host scalars;
//   NCCL for CUDA tensors: its own stream, ordered after the compute stream by events, never a host sync
//        on the hot path (Work::wait() makes the compute stream wait for the communication stream);
// and a `self` engine for world 1 (every collective is the identity), so the sharded code paths also run
// on one rank. No hand-written collectives: every call maps to one MPI or NCCL call (or one group of
// ncclSend/ncclRecv for the all-to-all-v).
//
// Buffer conventions follow NCCL's: reduce_scatter in [size * n] -> out [n] (rank r gets the sum of every
// rank's block r); all_gather in [n] -> out [size * n] (block r is rank r's input). Tensors are contiguous,
// on the engine's device, float32 / bfloat16 / int32 / int64.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace am::dist {

enum class ReduceOp { Sum, Max };

// A collective in flight. wait(): MPI blocks until it completes; NCCL orders the compute stream after it
// (no host sync). Waiting twice is allowed.
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;
};
using WorkPtr = std::shared_ptr<Work>;

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;  // "self" | "mpi" | "nccl"

  // ---- tensor collectives (device = the engine's) ----
  virtual void all_reduce(Tensor& t, ReduceOp op = ReduceOp::Sum) = 0;  // in place
  // The same, returning before completion (ddp overlaps each layer's all-reduce with the next layer's backward);
  // `t` must stay untouched until wait(). The default completes before returning.
  virtual WorkPtr all_reduce_async(Tensor& t, ReduceOp op = ReduceOp::Sum);
  // Sum over ranks of block `rank` of `in` [size * n] into `out` [n]. async: returns before completion.
  virtual WorkPtr reduce_scatter(const Tensor& in, Tensor& out, bool async = false) = 0;
  // `in` [n] of every rank into `out` [size * n], rank order.
  virtual WorkPtr all_gather(const Tensor& in, Tensor& out, bool async = false) = 0;
  // Rows of row_elems = send.numel() / send.dim(0) elements. send_rows[r] consecutive rows of `send` (in
  // rank order) go to rank r; recv_rows[r] rows from rank r land consecutively in `recv`, in rank order.
  // Both count vectors have size() entries and must agree pairwise across ranks.
  virtual void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, Tensor& recv,
                            const std::vector<int64_t>& recv_rows) = 0;
  virtual void broadcast(Tensor& t, int root) = 0;
  virtual void barrier() = 0;

  // ---- host values (per-step scalars, counts; may synchronise the host, never on a per-layer path) ----
  virtual void all_reduce_host(double* v, size_t n, ReduceOp op = ReduceOp::Sum) = 0;
  virtual void all_reduce_host(int64_t* v, size_t n, ReduceOp op = ReduceOp::Sum) = 0;
  // send [size * n] int64 -> recv [size * n]: block r of send goes to rank r; block r of recv came from r.
  virtual void all_to_all_host(const int64_t* send, int64_t* recv, size_t n) = 0;
  // Every rank's `n` int64 into out [size * n].
  virtual void all_gather_host(const int64_t* in, int64_t* out, size_t n) = 0;

  // Sub-group (collective over this communicator, made once at start): ranks with the same color form a
  // group, ordered by key.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;
  // Stop every pending operation at once (error paths; then the process exits). Never throws.
  virtual void abort() noexcept {}
};

// A collective that completed before its call returned.
class CompletedWork final : public Work {
 public:
  void wait() override {}
};

inline WorkPtr Communicator::all_reduce_async(Tensor& t, ReduceOp op) {
  all_reduce(t, op);
  return std::make_shared<CompletedWork>();
}

// World 1: the identity engine for host or device tensors.
std::unique_ptr<Communicator> make_self_communicator();

// MPI_COMM_WORLD. Initialises MPI on first use (and finalises it at exit). Throws DeviceError when this
// build has no MPI, or UsageError when the process was not started by an MPI launcher but world > 1.
std::unique_ptr<Communicator> make_mpi_world();
bool built_with_mpi();

// NCCL world communicator for (rank, world) on CUDA device `device`: rank 0 makes the ncclUniqueId and
// hands it out over MPI when `use_mpi`, else over the TCP rendezvous at master_addr:port (dist/rendezvous.h).
std::unique_ptr<Communicator> make_nccl_world(int rank, int world, int device, bool use_mpi,
                                              const std::string& master_addr, int port, double timeout_s);
bool built_with_nccl();

}  // namespace am::dist
