// MPI engine: host tensors over Open MPI / MPICH (C API), so CPU ranks (CI's 2-rank tests) run the same
// sharding and dispatch code as NCCL ranks. One MPI call per collective; async variants hold the
// MPI_Request in their Work (wait() = MPI_Wait). Only the main thread calls MPI (MPI_THREAD_FUNNELED).
// bf16 reductions use a user MPI_Op that adds (or maxes) in fp32 and rounds back, as NCCL does per step.
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "core/error.h"
#include "dist/communicator.h"

#ifdef AM_WITH_MPI
#include <mpi.h>
#endif

namespace am::dist {

#ifndef AM_WITH_MPI

bool built_with_mpi() { return false; }
std::unique_ptr<Communicator> make_mpi_world() {
  throw DeviceError("this build has no MPI (configured with -DAM_WITH_MPI=OFF): install libopenmpi-dev "
                    "(make setup) and rebuild, or run on one process");
}

#else

bool built_with_mpi() { return true; }

namespace {

// Turns an MPI return code into DeviceError naming the call (the communicators return errors instead
// of aborting: MPI_ERRORS_RETURN).
void mpi_check(int rc, const char* call, const char* file, int line) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  MPI_Error_string(rc, text, &len);
  std::string f = file;
  if (auto s = f.rfind('/'); s != std::string::npos) f = f.substr(s + 1);
  throw DeviceError(std::string("MPI error '") + text + "' in " + call + " at " + f + ":" + std::to_string(line));
}
#define AM_MPI_CHECK(call) ::am::dist::mpi_check((call), #call, __FILE__, __LINE__)

// ---- bf16 reductions: element-wise in fp32, rounded back to bf16 (round to nearest even) ----
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}
void bf16_max(void* in, void* inout, int* len, MPI_Datatype*) {
  auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i)
    if (bf16_to_f32(a[i]) > bf16_to_f32(b[i])) b[i] = a[i];
}
MPI_Op g_bf16_sum = MPI_OP_NULL, g_bf16_max = MPI_OP_NULL;
bool g_we_initialised = false;

void finalize_at_exit() {
  if (!g_we_initialised) return;  // whoever initialised MPI finalises it
  int fin = 0;
  MPI_Finalized(&fin);
  if (fin) return;
  if (g_bf16_sum != MPI_OP_NULL) MPI_Op_free(&g_bf16_sum);
  if (g_bf16_max != MPI_OP_NULL) MPI_Op_free(&g_bf16_max);
  MPI_Finalize();
}

// Any sign of an MPI launcher in the environment (Open MPI, MPICH/Hydra, Slurm's PMI2 / PMIx).
bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"})
    if (std::getenv(v)) return true;
  return false;
}
// World size another launcher (torchrun, our supervisor, srun without PMI) asked for; 1 if none.
int env_world() {
  for (const char* v : {"WORLD_SIZE", "SLURM_NTASKS"})
    if (const char* s = std::getenv(v)) return std::atoi(s);
  return 1;
}

void ensure_init() {
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) {
    if (!launched_by_mpi() && env_world() > 1)
      throw UsageError("the MPI engine needs an MPI launcher (mpirun -np N, or srun --mpi=pmix), but this "
                       "process was started without one while the environment asks for " +
                       std::to_string(env_world()) + " ranks; use the NCCL engine with the TCP rendezvous, or mpirun");
    int provided = 0;
    AM_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided));
    if (provided < MPI_THREAD_FUNNELED)
      throw DeviceError("MPI_Init_thread: the MPI library gave thread level " + std::to_string(provided) +
                        ", below MPI_THREAD_FUNNELED");
    g_we_initialised = true;
    std::atexit(finalize_at_exit);
  }
  if (g_bf16_sum == MPI_OP_NULL) {
    AM_MPI_CHECK(MPI_Op_create(&bf16_sum, /*commute=*/1, &g_bf16_sum));
    AM_MPI_CHECK(MPI_Op_create(&bf16_max, /*commute=*/1, &g_bf16_max));
  }
}

MPI_Datatype mpi_type(DType t, const char* op) {
  switch (t) {
    case DType::F32: return MPI_FLOAT;
    case DType::BF16: return MPI_UINT16_T;  // plain bytes; reductions use the bf16 user ops
    case DType::I32: return MPI_INT32_T;
    case DType::I64: return MPI_INT64_T;
    default: throw DeviceError(std::string("MPI communicator ") + op + ": dtype " + dtype_name(t) + " is not supported");
  }
}

MPI_Op mpi_op(ReduceOp op, DType t) {
  if (t == DType::BF16) return op == ReduceOp::Sum ? g_bf16_sum : g_bf16_max;
  return op == ReduceOp::Sum ? MPI_SUM : MPI_MAX;
}

int to_int(int64_t n, const char* op) {
  if (n < 0 || n > std::numeric_limits<int>::max())
    throw DeviceError(std::string("MPI communicator ") + op + ": " + std::to_string(n) +
                      " elements do not fit MPI's int counts (split the tensor)");
  return static_cast<int>(n);
}

void check_host(const Tensor& t, const char* op) {
  if (!t.defined() || t.device() != DeviceType::CPU)
    throw DeviceError(std::string("MPI communicator ") + op + ": tensors must be defined host tensors "
                      "(the MPI engine is not CUDA-aware; use the NCCL engine for GPU tensors)");
}

// An MPI non-blocking collective. Holds the tensors so their storage outlives the operation even if the
// caller drops them; waits in the destructor if nobody did (MPI must not write freed memory).
class MpiWork final : public Work {
 public:
  MpiWork(MPI_Request r, Tensor in, Tensor out) : req_(r), in_(std::move(in)), out_(std::move(out)) {}
  ~MpiWork() override {
    int fin = 0;
    MPI_Finalized(&fin);
    if (req_ != MPI_REQUEST_NULL && !fin) MPI_Wait(&req_, MPI_STATUS_IGNORE);
  }
  void wait() override {
    if (req_ != MPI_REQUEST_NULL) AM_MPI_CHECK(MPI_Wait(&req_, MPI_STATUS_IGNORE));  // sets req_ to NULL
    in_ = Tensor();
    out_ = Tensor();
  }

 private:
  MPI_Request req_;
  Tensor in_, out_;
};

class DoneWork final : public Work {
 public:
  void wait() override {}
};

class MpiComm final : public Communicator {
 public:
  // owned: a communicator from MPI_Comm_split, freed with this object (MPI_COMM_WORLD is not).
  MpiComm(MPI_Comm c, bool owned) : comm_(c), owned_(owned) {
    AM_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    AM_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    AM_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  ~MpiComm() override {
    int fin = 0;
    MPI_Finalized(&fin);
    if (owned_ && !fin) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  void all_reduce(Tensor& t, ReduceOp op) override {
    check_host(t, "all_reduce");
    AM_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, t.raw(), to_int(t.numel(), "all_reduce"),
                               mpi_type(t.dtype(), "all_reduce"), mpi_op(op, t.dtype()), comm_));
  }

  WorkPtr all_reduce_async(Tensor& t, ReduceOp op) override {
    check_host(t, "all_reduce");
    MPI_Request r;
    AM_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, t.raw(), to_int(t.numel(), "all_reduce"), mpi_type(t.dtype(), "all_reduce"),
                                mpi_op(op, t.dtype()), comm_, &r));
    return std::make_shared<MpiWork>(r, t, Tensor());
  }

  // in [size * n] -> out [n]
  WorkPtr reduce_scatter(const Tensor& in, Tensor& out, bool async) override {
    check_pair(in, out, in.numel(), out.numel() * size_, "reduce_scatter");
    int n = to_int(out.numel(), "reduce_scatter");
    MPI_Datatype ty = mpi_type(in.dtype(), "reduce_scatter");
    MPI_Op op = mpi_op(ReduceOp::Sum, in.dtype());
    if (!async) {
      AM_MPI_CHECK(MPI_Reduce_scatter_block(in.raw(), out.raw(), n, ty, op, comm_));
      return std::make_shared<DoneWork>();
    }
    MPI_Request r;
    AM_MPI_CHECK(MPI_Ireduce_scatter_block(in.raw(), out.raw(), n, ty, op, comm_, &r));
    return std::make_shared<MpiWork>(r, in, out);
  }

  // in [n] -> out [size * n]
  WorkPtr all_gather(const Tensor& in, Tensor& out, bool async) override {
    check_pair(in, out, in.numel() * size_, out.numel(), "all_gather");
    int n = to_int(in.numel(), "all_gather");
    MPI_Datatype ty = mpi_type(in.dtype(), "all_gather");
    if (!async) {
      AM_MPI_CHECK(MPI_Allgather(in.raw(), n, ty, out.raw(), n, ty, comm_));
      return std::make_shared<DoneWork>();
    }
    MPI_Request r;
    AM_MPI_CHECK(MPI_Iallgather(in.raw(), n, ty, out.raw(), n, ty, comm_, &r));
    return std::make_shared<MpiWork>(r, in, out);
  }

  // send [sum(send_rows), ...] -> recv [sum(recv_rows), ...], rows of row_elems elements.
  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, Tensor& recv,
                    const std::vector<int64_t>& recv_rows) override {
    check_host(send, "all_to_all_v");
    check_host(recv, "all_to_all_v");
    if (send.dtype() != recv.dtype() || send.ndim() < 1 || recv.ndim() < 1)
      throw ShapeError("MPI communicator all_to_all_v: send " + shape_str(send.shape()) + " and recv " +
                       shape_str(recv.shape()) + " must be at least 1-D with one dtype");
    // Elements per row from the shape, not numel / dim(0): well defined when this rank has 0 rows.
    Shape srow(send.shape().begin() + 1, send.shape().end()), rrow(recv.shape().begin() + 1, recv.shape().end());
    int64_t row = shape_numel(srow);
    if (row != shape_numel(rrow))
      throw ShapeError("MPI communicator all_to_all_v: send rows " + shape_str(srow) + " and recv rows " +
                       shape_str(rrow) + " differ in size");
    std::vector<int> sc, sd, rc, rd;
    fill_counts(send_rows, send.dim(0), row, sc, sd, "send");
    fill_counts(recv_rows, recv.dim(0), row, rc, rd, "recv");
    MPI_Datatype ty = mpi_type(send.dtype(), "all_to_all_v");
    AM_MPI_CHECK(MPI_Alltoallv(send.raw(), sc.data(), sd.data(), ty, recv.raw(), rc.data(), rd.data(), ty, comm_));
  }

  void broadcast(Tensor& t, int root) override {
    check_host(t, "broadcast");
    check_root(root);
    AM_MPI_CHECK(MPI_Bcast(t.raw(), to_int(t.numel(), "broadcast"), mpi_type(t.dtype(), "broadcast"), root, comm_));
  }

  void barrier() override { AM_MPI_CHECK(MPI_Barrier(comm_)); }

  void all_reduce_host(double* v, size_t n, ReduceOp op) override {
    AM_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, v, to_int(static_cast<int64_t>(n), "all_reduce_host"), MPI_DOUBLE,
                               op == ReduceOp::Sum ? MPI_SUM : MPI_MAX, comm_));
  }
  void all_reduce_host(int64_t* v, size_t n, ReduceOp op) override {
    AM_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, v, to_int(static_cast<int64_t>(n), "all_reduce_host"), MPI_INT64_T,
                               op == ReduceOp::Sum ? MPI_SUM : MPI_MAX, comm_));
  }
  void all_to_all_host(const int64_t* send, int64_t* recv, size_t n) override {
    int k = to_int(static_cast<int64_t>(n), "all_to_all_host");
    AM_MPI_CHECK(MPI_Alltoall(send, k, MPI_INT64_T, recv, k, MPI_INT64_T, comm_));
  }
  void all_gather_host(const int64_t* in, int64_t* out, size_t n) override {
    int k = to_int(static_cast<int64_t>(n), "all_gather_host");
    AM_MPI_CHECK(MPI_Allgather(in, k, MPI_INT64_T, out, k, MPI_INT64_T, comm_));
  }

  // A negative color opts this rank out (MPI_UNDEFINED): it gets nullptr.
  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm sub = MPI_COMM_NULL;
    AM_MPI_CHECK(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &sub));
    if (sub == MPI_COMM_NULL) return nullptr;
    return std::make_unique<MpiComm>(sub, true);
  }

  void abort() noexcept override { MPI_Abort(comm_, 1); }

 private:
  void check_pair(const Tensor& in, const Tensor& out, int64_t got, int64_t want, const char* op) const {
    check_host(in, op);
    check_host(out, op);
    if (in.dtype() != out.dtype() || got != want)
      throw ShapeError(std::string("MPI communicator ") + op + ": in " + shape_str(in.shape()) + " " +
                       dtype_name(in.dtype()) + " and out " + shape_str(out.shape()) + " " + dtype_name(out.dtype()) +
                       " do not match for world size " + std::to_string(size_));
  }
  void check_root(int root) const {
    if (root < 0 || root >= size_)
      throw UsageError("MPI communicator: root " + std::to_string(root) + " outside world size " + std::to_string(size_));
  }
  // Per-peer element counts and displacements from row counts; they must sum to the tensor's rows.
  void fill_counts(const std::vector<int64_t>& rows, int64_t have, int64_t row, std::vector<int>& cnt,
                   std::vector<int>& disp, const char* which) const {
    if (static_cast<int>(rows.size()) != size_)
      throw ShapeError(std::string("MPI communicator all_to_all_v: ") + which + "_rows has " +
                       std::to_string(rows.size()) + " entries for world size " + std::to_string(size_));
    int64_t off = 0;
    for (int64_t r : rows) {
      if (r < 0) throw ShapeError(std::string("MPI communicator all_to_all_v: negative ") + which + " row count");
      cnt.push_back(to_int(r * row, "all_to_all_v"));
      disp.push_back(to_int(off * row, "all_to_all_v"));
      off += r;
    }
    if (off != have)
      throw ShapeError(std::string("MPI communicator all_to_all_v: ") + which + "_rows sum to " + std::to_string(off) +
                       " but the " + which + " tensor has " + std::to_string(have) + " rows");
  }

  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_world() {
  ensure_init();
  return std::make_unique<MpiComm>(MPI_COMM_WORLD, false);
}

#endif  // AM_WITH_MPI

}  // namespace am::dist
