// NCCL engine: CUDA tensors on the device of cuda::default_context(). Every op runs on the engine's own
// (non-blocking) communication stream, ordered against the compute stream (the context's stream) by
// events, never by a host sync on the hot path:
//
//   compute: ... ─record(ready)──────────────────────── wait(done) ─ ...   (sync op, or Work::wait())
//   comm:          wait(ready) ─ ncclXxx ─ record(done) ┘
//
// Until wait(), an async op may still read its input and write its output: the caller must not touch
// either on the compute stream before wait(). The Work keeps both tensors alive until then (the caching
// allocator hands a freed block to the compute stream at once; after wait() that reuse is ordered after
// the collective). Host-value ops (counts, loss scalars) copy through a small device buffer and
// synchronise the communication stream; they are per-step, not per-layer.
#include <string>

#include "core/error.h"
#include "dist/communicator.h"

#ifdef AM_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "backend/cuda/context.h"
#include "backend/cuda/cuda_check.h"
#include "dist/rendezvous.h"
#endif

namespace am::dist {

#ifndef AM_WITH_NCCL

bool built_with_nccl() { return false; }
std::unique_ptr<Communicator> make_nccl_world(int, int, int, bool, const std::string&, int, double) {
  throw DeviceError("this build has no NCCL (it needs the CUDA toolkit with nccl.h and libnccl at configure "
                    "time); CPU ranks can use the MPI engine");
}

#else

bool built_with_nccl() { return true; }

namespace {

[[noreturn]] void throw_nccl(ncclResult_t r, ncclComm_t comm, const char* call, const char* file, int line) {
  std::string f = file;
  if (auto s = f.rfind('/'); s != std::string::npos) f = f.substr(s + 1);
  const char* last = ncclGetLastError(comm);
  throw DeviceError(std::string("NCCL error '") + ncclGetErrorString(r) + "' in " + call + " at " + f + ":" +
                    std::to_string(line) + (last && *last ? std::string(": ") + last : std::string()));
}
inline void nccl_check(ncclResult_t r, ncclComm_t comm, const char* call, const char* file, int line) {
  if (r != ncclSuccess) throw_nccl(r, comm, call, file, line);
}
// AM_NCCL_CHECK(comm, ncclAllReduce(...)): comm (may be nullptr) feeds ncclGetLastError.
#define AM_NCCL_CHECK(comm, call) ::am::dist::nccl_check((call), (comm), #call, __FILE__, __LINE__)

ncclDataType_t nccl_type(DType t, const char* op) {
  switch (t) {
    case DType::F32: return ncclFloat32;
    case DType::BF16: return ncclBfloat16;
    case DType::I32: return ncclInt32;
    case DType::I64: return ncclInt64;
    default: throw DeviceError(std::string("NCCL communicator ") + op + ": dtype " + dtype_name(t) + " is not supported");
  }
}
ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::Sum ? ncclSum : ncclMax; }

// Reusable events (timing off: cheapest to record). Shared by the communicator and its Works, so a Work
// that outlives its communicator can still hand its event back.
class EventPool {
 public:
  ~EventPool() {
    for (cudaEvent_t e : free_) cudaEventDestroy(e);
  }
  cudaEvent_t get() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (!free_.empty()) {
        cudaEvent_t e = free_.back();
        free_.pop_back();
        return e;
      }
    }
    cudaEvent_t e;
    AM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return e;
  }
  // Safe as soon as every cudaStreamWaitEvent on `e` was enqueued: a wait captures the event's
  // state at the call, so re-recording later does not disturb it.
  void put(cudaEvent_t e) {
    std::lock_guard<std::mutex> lk(mu_);
    free_.push_back(e);
  }

 private:
  std::mutex mu_;
  std::vector<cudaEvent_t> free_;
};

// wait(): the compute stream waits for `done` (recorded on the comm stream after the NCCL call).
class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<EventPool> pool, cudaEvent_t done, cudaStream_t compute, Tensor a, Tensor b)
      : pool_(std::move(pool)), done_(done), compute_(compute), a_(std::move(a)), b_(std::move(b)) {}
  ~NcclWork() override {
    if (done_) {  // never waited: order the compute stream anyway, so freed buffers are not reused early
      cudaStreamWaitEvent(compute_, done_, 0);
      pool_->put(done_);
    }
  }
  void wait() override {
    if (!done_) return;
    AM_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
    pool_->put(done_);
    done_ = nullptr;
    a_ = Tensor();
    b_ = Tensor();
  }

 private:
  std::shared_ptr<EventPool> pool_;
  cudaEvent_t done_;
  cudaStream_t compute_;
  Tensor a_, b_;
};

class NcclComm final : public Communicator {
 public:
  // Takes ownership of `comm` (already initialised for this rank).
  explicit NcclComm(ncclComm_t comm) : comm_(comm), ctx_(cuda::default_context()) {
    try {
      ctx_.make_current();
      AM_NCCL_CHECK(comm_, ncclCommUserRank(comm_, &rank_));
      AM_NCCL_CHECK(comm_, ncclCommCount(comm_, &size_));
      AM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      pool_ = std::make_shared<EventPool>();
      AM_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    } catch (...) {  // the destructor will not run: release what we own
      if (stream_) cudaStreamDestroy(stream_);
      ncclCommDestroy(comm_);
      throw;
    }
  }
  // Never throws: finalise (flush pending work) then destroy; after abort() the comm is gone already.
  ~NcclComm() override {
    cudaSetDevice(ctx_.device());
    if (comm_) {
      ncclCommFinalize(comm_);
      ncclCommDestroy(comm_);
    }
    if (stream_) {
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
    }
    if (ready_) cudaEventDestroy(ready_);
    if (scratch_) cudaFree(scratch_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  void all_reduce(Tensor& t, ReduceOp op) override {
    check_dev(t, "all_reduce");
    begin();
    AM_NCCL_CHECK(comm_, ncclAllReduce(t.raw(), t.raw(), static_cast<size_t>(t.numel()), nccl_type(t.dtype(), "all_reduce"),
                                       nccl_op(op), comm_, stream_));
    end(false, t, Tensor())->wait();
  }

  WorkPtr all_reduce_async(Tensor& t, ReduceOp op) override {
    check_dev(t, "all_reduce");
    begin();
    AM_NCCL_CHECK(comm_, ncclAllReduce(t.raw(), t.raw(), static_cast<size_t>(t.numel()), nccl_type(t.dtype(), "all_reduce"),
                                       nccl_op(op), comm_, stream_));
    return end(true, t, Tensor());
  }

  // in [size * n] -> out [n]
  WorkPtr reduce_scatter(const Tensor& in, Tensor& out, bool async) override {
    check_pair(in, out, in.numel(), out.numel() * size_, "reduce_scatter");
    begin();
    AM_NCCL_CHECK(comm_, ncclReduceScatter(in.raw(), out.raw(), static_cast<size_t>(out.numel()),
                                           nccl_type(in.dtype(), "reduce_scatter"), ncclSum, comm_, stream_));
    return end(async, in, out);
  }

  // in [n] -> out [size * n]
  WorkPtr all_gather(const Tensor& in, Tensor& out, bool async) override {
    check_pair(in, out, in.numel() * size_, out.numel(), "all_gather");
    begin();
    AM_NCCL_CHECK(comm_, ncclAllGather(in.raw(), out.raw(), static_cast<size_t>(in.numel()),
                                       nccl_type(in.dtype(), "all_gather"), comm_, stream_));
    return end(async, in, out);
  }

  // One group of ncclSend/ncclRecv, one pair per peer with rows (zero-row peers are skipped).
  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, Tensor& recv,
                    const std::vector<int64_t>& recv_rows) override {
    check_dev(send, "all_to_all_v");
    check_dev(recv, "all_to_all_v");
    if (send.dtype() != recv.dtype() || send.ndim() < 1 || recv.ndim() < 1)
      throw ShapeError("NCCL communicator all_to_all_v: send " + shape_str(send.shape()) + " and recv " +
                       shape_str(recv.shape()) + " must be at least 1-D with one dtype");
    Shape srow(send.shape().begin() + 1, send.shape().end()), rrow(recv.shape().begin() + 1, recv.shape().end());
    const int64_t row = shape_numel(srow);
    if (row != shape_numel(rrow))
      throw ShapeError("NCCL communicator all_to_all_v: send rows " + shape_str(srow) + " and recv rows " +
                       shape_str(rrow) + " differ in size");
    check_counts(send_rows, send.dim(0), "send");
    check_counts(recv_rows, recv.dim(0), "recv");
    const ncclDataType_t ty = nccl_type(send.dtype(), "all_to_all_v");
    const size_t row_bytes = static_cast<size_t>(row) * dtype_size(send.dtype());
    auto* sp = static_cast<char*>(send.raw());
    auto* rp = static_cast<char*>(recv.raw());
    begin();
    AM_NCCL_CHECK(comm_, ncclGroupStart());
    size_t soff = 0, roff = 0;
    for (int p = 0; p < size_; ++p) {
      if (send_rows[p] > 0)
        AM_NCCL_CHECK(comm_, ncclSend(sp + soff * row_bytes, static_cast<size_t>(send_rows[p] * row), ty, p, comm_, stream_));
      if (recv_rows[p] > 0)
        AM_NCCL_CHECK(comm_, ncclRecv(rp + roff * row_bytes, static_cast<size_t>(recv_rows[p] * row), ty, p, comm_, stream_));
      soff += static_cast<size_t>(send_rows[p]);
      roff += static_cast<size_t>(recv_rows[p]);
    }
    AM_NCCL_CHECK(comm_, ncclGroupEnd());
    end(false, send, recv)->wait();
  }

  void broadcast(Tensor& t, int root) override {
    check_dev(t, "broadcast");
    if (root < 0 || root >= size_)
      throw UsageError("NCCL communicator: root " + std::to_string(root) + " outside world size " + std::to_string(size_));
    begin();
    AM_NCCL_CHECK(comm_, ncclBroadcast(t.raw(), t.raw(), static_cast<size_t>(t.numel()), nccl_type(t.dtype(), "broadcast"),
                                       root, comm_, stream_));
    end(false, t, Tensor())->wait();
  }

  // Host barrier: an all-reduce of one int, then wait for it on the host.
  void barrier() override {
    ctx_.make_current();
    void* d = scratch(sizeof(int32_t));
    AM_CUDA_CHECK(cudaMemsetAsync(d, 0, sizeof(int32_t), stream_));
    AM_NCCL_CHECK(comm_, ncclAllReduce(d, d, 1, ncclInt32, ncclSum, comm_, stream_));
    sync_host();
  }

  void all_reduce_host(double* v, size_t n, ReduceOp op) override { host_reduce(v, n, sizeof(double), ncclFloat64, op); }
  void all_reduce_host(int64_t* v, size_t n, ReduceOp op) override { host_reduce(v, n, sizeof(int64_t), ncclInt64, op); }

  // send [size * n] -> recv [size * n] via one group of send/recv (self included).
  void all_to_all_host(const int64_t* send, int64_t* recv, size_t n) override {
    if (!n) return;
    ctx_.make_current();
    const size_t block = n * sizeof(int64_t), total = block * static_cast<size_t>(size_);
    auto* d = static_cast<char*>(scratch(2 * total));
    AM_CUDA_CHECK(cudaMemcpyAsync(d, send, total, cudaMemcpyHostToDevice, stream_));
    AM_NCCL_CHECK(comm_, ncclGroupStart());
    for (int p = 0; p < size_; ++p) {
      AM_NCCL_CHECK(comm_, ncclSend(d + p * block, n, ncclInt64, p, comm_, stream_));
      AM_NCCL_CHECK(comm_, ncclRecv(d + total + p * block, n, ncclInt64, p, comm_, stream_));
    }
    AM_NCCL_CHECK(comm_, ncclGroupEnd());
    AM_CUDA_CHECK(cudaMemcpyAsync(recv, d + total, total, cudaMemcpyDeviceToHost, stream_));
    sync_host();
  }

  void all_gather_host(const int64_t* in, int64_t* out, size_t n) override {
    if (!n) return;
    ctx_.make_current();
    const size_t block = n * sizeof(int64_t);
    auto* d = static_cast<char*>(scratch(block * (1 + static_cast<size_t>(size_))));
    AM_CUDA_CHECK(cudaMemcpyAsync(d, in, block, cudaMemcpyHostToDevice, stream_));
    AM_NCCL_CHECK(comm_, ncclAllGather(d, d + block, n, ncclInt64, comm_, stream_));
    AM_CUDA_CHECK(cudaMemcpyAsync(out, d + block, block * size_, cudaMemcpyDeviceToHost, stream_));
    sync_host();
  }

  // Collective over this communicator; a negative color opts out (NCCL_SPLIT_NOCOLOR) and gets nullptr.
  // nullptr config: the child inherits the parent's (blocking) config.
  std::unique_ptr<Communicator> split(int color, int key) override {
    ctx_.make_current();
    ncclComm_t sub = nullptr;
    AM_NCCL_CHECK(comm_, ncclCommSplit(comm_, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &sub, nullptr));
    if (!sub) return nullptr;
    return std::make_unique<NcclComm>(sub);
  }

  void abort() noexcept override {
    if (comm_) ncclCommAbort(comm_);
    comm_ = nullptr;
  }

 private:
  void check_dev(const Tensor& t, const char* op) const {
    if (!t.defined() || t.device() != DeviceType::CUDA)
      throw DeviceError(std::string("NCCL communicator ") + op + ": tensors must be CUDA tensors (host values go "
                        "through the *_host ops; CPU ranks use the MPI engine)");
    if (!comm_) throw DeviceError(std::string("NCCL communicator ") + op + ": the communicator was aborted");
  }
  void check_pair(const Tensor& in, const Tensor& out, int64_t got, int64_t want, const char* op) const {
    check_dev(in, op);
    check_dev(out, op);
    if (in.dtype() != out.dtype() || got != want)
      throw ShapeError(std::string("NCCL communicator ") + op + ": in " + shape_str(in.shape()) + " " +
                       dtype_name(in.dtype()) + " and out " + shape_str(out.shape()) + " " + dtype_name(out.dtype()) +
                       " do not match for world size " + std::to_string(size_));
  }
  void check_counts(const std::vector<int64_t>& rows, int64_t have, const char* which) const {
    if (static_cast<int>(rows.size()) != size_)
      throw ShapeError(std::string("NCCL communicator all_to_all_v: ") + which + "_rows has " +
                       std::to_string(rows.size()) + " entries for world size " + std::to_string(size_));
    int64_t sum = 0;
    for (int64_t r : rows) {
      if (r < 0) throw ShapeError(std::string("NCCL communicator all_to_all_v: negative ") + which + " row count");
      sum += r;
    }
    if (sum != have)
      throw ShapeError(std::string("NCCL communicator all_to_all_v: ") + which + "_rows sum to " + std::to_string(sum) +
                       " but the " + which + " tensor has " + std::to_string(have) + " rows");
  }

  // The comm stream waits for everything already enqueued on the compute stream (the op's inputs).
  void begin() {
    ctx_.make_current();
    AM_CUDA_CHECK(cudaEventRecord(ready_, ctx_.stream()));
    AM_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));  // captured now: ready_ may be re-recorded
  }
  // Records `done` on the comm stream; a sync op waits at once (compute stream after comm, no host sync).
  WorkPtr end(bool async, const Tensor& a, const Tensor& b) {
    cudaEvent_t done = pool_->get();
    AM_CUDA_CHECK(cudaEventRecord(done, stream_));
    auto w = std::make_shared<NcclWork>(pool_, done, ctx_.stream(), a, b);
    if (!async) w->wait();
    return w;
  }

  // Device staging buffer for host ops (grows, never shrinks; used only on the comm stream).
  void* scratch(size_t bytes) {
    if (bytes > scratch_bytes_) {
      if (scratch_) {
        AM_CUDA_CHECK(cudaStreamSynchronize(stream_));
        AM_CUDA_CHECK(cudaFree(scratch_));
        scratch_ = nullptr;
      }
      size_t want = std::max<size_t>(bytes, 4096);
      AM_CUDA_CHECK(cudaMalloc(&scratch_, want));
      scratch_bytes_ = want;
    }
    return scratch_;
  }

  void host_reduce(void* v, size_t n, size_t elem, ncclDataType_t ty, ReduceOp op) {
    if (!n) return;
    ctx_.make_current();
    void* d = scratch(n * elem);
    AM_CUDA_CHECK(cudaMemcpyAsync(d, v, n * elem, cudaMemcpyHostToDevice, stream_));
    AM_NCCL_CHECK(comm_, ncclAllReduce(d, d, n, ty, nccl_op(op), comm_, stream_));
    AM_CUDA_CHECK(cudaMemcpyAsync(v, d, n * elem, cudaMemcpyDeviceToHost, stream_));
    sync_host();
  }

  // Host wait for the comm stream, then surface an asynchronous NCCL failure (peer died, network error).
  void sync_host() {
    AM_CUDA_CHECK(cudaStreamSynchronize(stream_));
    ncclResult_t async_err = ncclSuccess;
    AM_NCCL_CHECK(comm_, ncclCommGetAsyncError(comm_, &async_err));
    if (async_err != ncclSuccess) throw_nccl(async_err, comm_, "an asynchronous NCCL operation", __FILE__, __LINE__);
  }

  ncclComm_t comm_ = nullptr;
  cuda::CudaContext& ctx_;  // compute stream and device
  int rank_ = 0, size_ = 1;
  cudaStream_t stream_ = nullptr;  // communication stream
  cudaEvent_t ready_ = nullptr;    // "inputs are ready" marker on the compute stream
  std::shared_ptr<EventPool> pool_;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_world(int rank, int world, int device, bool use_mpi,
                                              const std::string& master_addr, int port, double timeout_s) {
  if (world < 1 || rank < 0 || rank >= world)
    throw UsageError("make_nccl_world: rank " + std::to_string(rank) + " outside world size " + std::to_string(world));
  // The caller normally chose the device already (cuda::set_default_device); this is a no-op then, and
  // throws if the default context lives on another device.
  cuda::set_default_device(device);
  auto& ctx = cuda::default_context();
  ctx.make_current();

  ncclUniqueId id{};
  if (rank == 0) AM_NCCL_CHECK(nullptr, ncclGetUniqueId(&id));
  if (use_mpi) {
    auto mpi = make_mpi_world();
    if (mpi->rank() != rank || mpi->size() != world)
      throw UsageError("make_nccl_world: MPI says rank " + std::to_string(mpi->rank()) + " of " +
                       std::to_string(mpi->size()) + ", the launcher said rank " + std::to_string(rank) + " of " +
                       std::to_string(world));
    static_assert(sizeof(ncclUniqueId) % sizeof(int32_t) == 0);
    Tensor t = Tensor::wrap(&id, {static_cast<int64_t>(sizeof id / sizeof(int32_t))}, DType::I32, nullptr);
    mpi->broadcast(t, 0);
  } else {
    rendezvous_broadcast(master_addr, port, rank, world, &id, sizeof id, timeout_s);
  }

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 1;
  ncclComm_t comm = nullptr;
  AM_NCCL_CHECK(nullptr, ncclCommInitRankConfig(&comm, world, id, rank, &config));
  return std::make_unique<NcclComm>(comm);
}

#endif  // AM_WITH_NCCL

}  // namespace am::dist
