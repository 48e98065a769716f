// World-1 engine: every collective is the identity, so the sharded code paths (reduce-scatter of
// gradients, all-gather of weights, all-to-all of tokens) also run, unchanged, on one rank. Out-of-place
// ops copy `in` to `out` when the buffers differ; device tensors are copied on the default CUDA context's
// stream, so the copy is ordered with compute exactly as an NCCL op followed by wait() would be.
#include <cstring>
#include <string>

#include "core/error.h"
#include "dist/communicator.h"

#ifdef AM_WITH_CUDA
#include "backend/cuda/context.h"
#include "backend/cuda/cuda_check.h"
#endif

namespace am::dist {
namespace {

// A finished op: the self engine completes everything before returning.
class DoneWork final : public Work {
 public:
  void wait() override {}
};

void check_same(const Tensor& a, const Tensor& b, const char* op) {
  if (a.numel() != b.numel() || a.dtype() != b.dtype() || a.device() != b.device())
    throw ShapeError(std::string("self communicator ") + op + ": in " + shape_str(a.shape()) + " " +
                     dtype_name(a.dtype()) + " and out " + shape_str(b.shape()) + " " + dtype_name(b.dtype()) +
                     " must have the same size, dtype and device (world size 1)");
}

// out <- in (same bytes), skipped when both view the same memory.
void copy(const Tensor& in, Tensor& out) {
  if (in.nbytes() == 0 || in.raw() == out.raw()) return;
  if (in.device() == DeviceType::CPU) {
    std::memcpy(out.raw(), in.raw(), in.nbytes());
    return;
  }
#ifdef AM_WITH_CUDA
  auto& ctx = cuda::default_context();
  AM_CUDA_CHECK(cudaMemcpyAsync(out.raw(), in.raw(), in.nbytes(), cudaMemcpyDeviceToDevice, ctx.stream()));
#else
  throw DeviceError("self communicator: a CUDA tensor in a build without CUDA");
#endif
}

class SelfComm final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "self"; }

  void all_reduce(Tensor&, ReduceOp) override {}
  WorkPtr reduce_scatter(const Tensor& in, Tensor& out, bool) override {
    check_same(in, out, "reduce_scatter");
    copy(in, out);
    return std::make_shared<DoneWork>();
  }
  WorkPtr all_gather(const Tensor& in, Tensor& out, bool) override {
    check_same(in, out, "all_gather");
    copy(in, out);
    return std::make_shared<DoneWork>();
  }
  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, Tensor& recv,
                    const std::vector<int64_t>& recv_rows) override {
    if (send_rows.size() != 1 || recv_rows.size() != 1 || send_rows[0] != recv_rows[0] ||
        (send.ndim() > 0 && send_rows[0] != send.dim(0)))
      throw ShapeError("self communicator all_to_all_v: world size 1 needs send_rows == recv_rows == {" +
                       std::to_string(send.ndim() > 0 ? send.dim(0) : 0) + "}");
    check_same(send, recv, "all_to_all_v");
    copy(send, recv);
  }
  void broadcast(Tensor&, int root) override {
    if (root != 0) throw UsageError("self communicator broadcast: root " + std::to_string(root) + " in world 1");
  }
  void barrier() override {}

  void all_reduce_host(double*, size_t, ReduceOp) override {}
  void all_reduce_host(int64_t*, size_t, ReduceOp) override {}
  void all_to_all_host(const int64_t* send, int64_t* recv, size_t n) override {
    if (send != recv && n) std::memmove(recv, send, n * sizeof(int64_t));
  }
  void all_gather_host(const int64_t* in, int64_t* out, size_t n) override {
    if (in != out && n) std::memmove(out, in, n * sizeof(int64_t));
  }

  // A negative color opts out (as NCCL_SPLIT_NOCOLOR / MPI_UNDEFINED): no group.
  std::unique_ptr<Communicator> split(int color, int) override {
    if (color < 0) return nullptr;
    return std::make_unique<SelfComm>();
  }
};

}  // namespace

std::unique_ptr<Communicator> make_self_communicator() { return std::make_unique<SelfComm>(); }

}  // namespace am::dist
