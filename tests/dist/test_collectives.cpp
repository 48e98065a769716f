// The MPI engine's collectives on real ranks (mpirun -np 2 in CI; written for any world size) against a
// serial reference that every rank computes from the same seeds, plus the world-1 self engine.
// Inputs are integer-valued so float sums are exact whatever order MPI reduces in.
#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "dist_test_env.h"

namespace am::dist {
namespace {

using test::world;

// Rank r's value at index i: distinct per (r, i), small integers (exact in fp32 and, < 256, in bf16).
float val(int r, int64_t i) { return static_cast<float>((r * 37 + i * 11) % 101 - 50); }

Tensor f32_of(const std::vector<float>& v) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::F32);
  std::copy(v.begin(), v.end(), t.data<float>());
  return t;
}

TEST(DistMpi, WorldIsMpi) {
  EXPECT_EQ(world().backend(), "mpi");
  EXPECT_GE(world().size(), 1);
  EXPECT_LT(world().rank(), world().size());
  EXPECT_TRUE(built_with_mpi());
}

TEST(DistMpi, AllReduceF32SumAndMax) {
  const int W = world().size(), r = world().rank();
  const int64_t n = 1003;
  Tensor s = Tensor::empty({n}, DType::F32), m = Tensor::empty({n}, DType::F32);
  for (int64_t i = 0; i < n; ++i) s.data<float>()[i] = m.data<float>()[i] = val(r, i);
  world().all_reduce(s, ReduceOp::Sum);
  world().all_reduce(m, ReduceOp::Max);
  for (int64_t i = 0; i < n; ++i) {
    float sum = 0, mx = -1e30f;
    for (int q = 0; q < W; ++q) sum += val(q, i), mx = std::max(mx, val(q, i));
    ASSERT_EQ(s.data<float>()[i], sum) << i;
    ASSERT_EQ(m.data<float>()[i], mx) << i;
  }
}

TEST(DistMpi, AllReduceIntegers) {
  const int W = world().size(), r = world().rank();
  Tensor a = Tensor::empty({3}, DType::I64);
  a.data<int64_t>()[0] = (int64_t(1) << 40) + r;  // beyond int32
  a.data<int64_t>()[1] = -r;
  a.data<int64_t>()[2] = 7;
  world().all_reduce(a);
  EXPECT_EQ(a.data<int64_t>()[0], W * (int64_t(1) << 40) + int64_t(W) * (W - 1) / 2);
  EXPECT_EQ(a.data<int64_t>()[1], -int64_t(W) * (W - 1) / 2);
  EXPECT_EQ(a.data<int64_t>()[2], 7 * W);
  Tensor b = Tensor::empty({2}, DType::I32);
  b.data<int32_t>()[0] = r;
  b.data<int32_t>()[1] = -r;
  world().all_reduce(b, ReduceOp::Max);
  EXPECT_EQ(b.data<int32_t>()[0], W - 1);
  EXPECT_EQ(b.data<int32_t>()[1], 0);
}

TEST(DistMpi, AllReduceBf16AddsInFp32) {
  const int W = world().size(), r = world().rank();
  Tensor t = Tensor::empty({64}, DType::BF16), m = Tensor::empty({64}, DType::BF16);
  for (int i = 0; i < 64; ++i) {
    t.data<uint16_t>()[i] = f32_to_bf16(static_cast<float>(i + r));
    m.data<uint16_t>()[i] = f32_to_bf16(val(r, i));
  }
  world().all_reduce(t);
  world().all_reduce(m, ReduceOp::Max);
  for (int i = 0; i < 64; ++i) {
    float mx = -1e30f;
    for (int q = 0; q < W; ++q) mx = std::max(mx, val(q, i));
    EXPECT_EQ(bf16_to_f32(t.data<uint16_t>()[i]), static_cast<float>(W * i + W * (W - 1) / 2)) << i;
    EXPECT_EQ(bf16_to_f32(m.data<uint16_t>()[i]), mx) << i;
  }
}

// The nonblocking all-reduce (ddp's per-layer overlap): the same sums as the blocking one, fp32 and bf16 (its
// user op), two in flight at once, each waited for (twice allowed).
TEST(DistMpi, AllReduceAsyncMatchesBlocking) {
  const int W = world().size(), r = world().rank();
  const int64_t n = 1003;
  Tensor a = Tensor::empty({n}, DType::F32), b = Tensor::empty({n}, DType::F32), c = Tensor::empty({64}, DType::BF16);
  for (int64_t i = 0; i < n; ++i) a.data<float>()[i] = b.data<float>()[i] = val(r, i);
  for (int i = 0; i < 64; ++i) c.data<uint16_t>()[i] = f32_to_bf16(static_cast<float>(i + r));
  world().all_reduce(a);
  WorkPtr wb = world().all_reduce_async(b), wc = world().all_reduce_async(c);
  wc->wait();
  wb->wait();
  wb->wait();
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(b.data<float>()[i], a.data<float>()[i]) << i;
  for (int i = 0; i < 64; ++i)
    EXPECT_EQ(bf16_to_f32(c.data<uint16_t>()[i]), static_cast<float>(W * i + W * (W - 1) / 2)) << i;
}

// in [W * n] -> out [n]: out[i] = sum_q in_q[r * n + i]
TEST(DistMpi, ReduceScatterSyncAndAsync) {
  const int W = world().size(), r = world().rank();
  for (int64_t n : {int64_t(1), int64_t(257), int64_t(0)}) {
    Tensor in = Tensor::empty({W * n}, DType::F32);
    for (int64_t j = 0; j < W * n; ++j) in.data<float>()[j] = val(r, j);
    Tensor out_sync = Tensor::empty({n}, DType::F32), out_async = Tensor::empty({n}, DType::F32);
    world().reduce_scatter(in, out_sync)->wait();
    WorkPtr w = world().reduce_scatter(in, out_async, /*async=*/true);
    w->wait();
    w->wait();  // waiting twice is allowed
    for (int64_t i = 0; i < n; ++i) {
      float want = 0;
      for (int q = 0; q < W; ++q) want += val(q, r * n + i);
      ASSERT_EQ(out_sync.data<float>()[i], want) << n << " " << i;
      ASSERT_EQ(out_async.data<float>()[i], want) << n << " " << i;
    }
  }
}

// in [n] -> out [W * n], block q = rank q's input
TEST(DistMpi, AllGatherSyncAndAsyncEveryDtype) {
  const int W = world().size(), r = world().rank();
  const int64_t n = 129;
  Tensor f = Tensor::empty({n}, DType::F32), b = Tensor::empty({n}, DType::BF16), l = Tensor::empty({n}, DType::I64);
  for (int64_t i = 0; i < n; ++i) {
    f.data<float>()[i] = val(r, i);
    b.data<uint16_t>()[i] = f32_to_bf16(val(r, i));
    l.data<int64_t>()[i] = (int64_t(r) << 33) + i;
  }
  Tensor fo = Tensor::empty({W * n}, DType::F32), bo = Tensor::empty({W, n}, DType::BF16),
         lo = Tensor::empty({W * n}, DType::I64), fa = Tensor::empty({W * n}, DType::F32);
  world().all_gather(f, fo);
  world().all_gather(b, bo);
  // Two async ops in flight, waited out of order.
  WorkPtr w1 = world().all_gather(l, lo, true);
  WorkPtr w2 = world().all_gather(f, fa, true);
  w2->wait();
  w1->wait();
  for (int q = 0; q < W; ++q)
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(fo.data<float>()[q * n + i], val(q, i));
      ASSERT_EQ(fa.data<float>()[q * n + i], val(q, i));
      ASSERT_EQ(bf16_to_f32(bo.data<uint16_t>()[q * n + i]), val(q, i));
      ASSERT_EQ(lo.data<int64_t>()[q * n + i], (int64_t(q) << 33) + i);
    }
}

TEST(DistMpi, AsyncWorkDroppedWithoutWaitStillCompletes) {
  const int W = world().size(), r = world().rank();
  Tensor in = Tensor::empty({4}, DType::I32), out = Tensor::empty({4 * W}, DType::I32);
  for (int i = 0; i < 4; ++i) in.data<int32_t>()[i] = r * 4 + i;
  world().all_gather(in, out, true).reset();  // the Work's destructor waits
  for (int i = 0; i < 4 * W; ++i) EXPECT_EQ(out.data<int32_t>()[i], i);
}

// Counts C[s][d] (rows rank s sends to rank d) from a seed every rank shares, with zeros and a rank that
// sends nothing at all in some trials. Row element (s, d, k, c) carries its origin so misplacement shows.
TEST(DistMpi, AllToAllVUnevenAndZeroCounts) {
  const int W = world().size(), r = world().rank();
  const int64_t cols = 3;
  auto code = [](int s, int d, int64_t k, int64_t c) { return float(s * 100000 + d * 10000 + k * 10 + c); };
  for (int trial = 0; trial < 25; ++trial) {
    std::mt19937 rng(1234 + trial);
    std::vector<std::vector<int64_t>> C(W, std::vector<int64_t>(W));
    for (auto& row : C)
      for (auto& c : row) c = (rng() % 3 == 0) ? 0 : static_cast<int64_t>(rng() % 7);
    if (trial % 5 == 0) std::fill(C[trial % W].begin(), C[trial % W].end(), 0);  // one rank sends nothing
    std::vector<int64_t> send_rows(W), recv_rows(W);
    for (int q = 0; q < W; ++q) send_rows[q] = C[r][q], recv_rows[q] = C[q][r];
    int64_t ns = std::accumulate(send_rows.begin(), send_rows.end(), int64_t(0));
    int64_t nr = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t(0));
    Tensor send = Tensor::empty({ns, cols}, DType::F32), recv = Tensor::empty({nr, cols}, DType::F32);
    int64_t row = 0;
    for (int d = 0; d < W; ++d)
      for (int64_t k = 0; k < C[r][d]; ++k, ++row)
        for (int64_t c = 0; c < cols; ++c) send.data<float>()[row * cols + c] = code(r, d, k, c);
    world().all_to_all_v(send, send_rows, recv, recv_rows);
    row = 0;
    for (int s = 0; s < W; ++s)
      for (int64_t k = 0; k < C[s][r]; ++k, ++row)
        for (int64_t c = 0; c < cols; ++c)
          ASSERT_EQ(recv.data<float>()[row * cols + c], code(s, r, k, c)) << "trial " << trial;
  }
}

TEST(DistMpi, AllToAllVBf16AndBadCountsAreShapeErrors) {
  const int W = world().size(), r = world().rank();
  // Every rank sends one 2-element row to every rank.
  Tensor send = Tensor::empty({W, 2}, DType::BF16), recv = Tensor::empty({W, 2}, DType::BF16);
  for (int d = 0; d < W; ++d)
    for (int c = 0; c < 2; ++c) send.data<uint16_t>()[d * 2 + c] = f32_to_bf16(float(r * 10 + d + c));
  std::vector<int64_t> ones(W, 1);
  world().all_to_all_v(send, ones, recv, ones);
  for (int s = 0; s < W; ++s)
    for (int c = 0; c < 2; ++c) EXPECT_EQ(bf16_to_f32(recv.data<uint16_t>()[s * 2 + c]), float(s * 10 + r + c));
  // Checked locally before any MPI call, identically on every rank: nobody is left waiting.
  std::vector<int64_t> too_many(W, 2);
  EXPECT_THROW(world().all_to_all_v(send, too_many, recv, ones), ShapeError);
  EXPECT_THROW(world().all_to_all_v(send, std::vector<int64_t>(W + 1, 0), recv, ones), ShapeError);
}

TEST(DistMpi, BroadcastFromEveryRoot) {
  const int W = world().size(), r = world().rank();
  for (int root = 0; root < W; ++root) {
    Tensor t = Tensor::empty({5}, DType::F32);
    for (int i = 0; i < 5; ++i) t.data<float>()[i] = float(r * 10 + i);
    world().broadcast(t, root);
    for (int i = 0; i < 5; ++i) EXPECT_EQ(t.data<float>()[i], float(root * 10 + i));
  }
  Tensor t = Tensor::empty({1}, DType::F32);
  EXPECT_THROW(world().broadcast(t, W), UsageError);
  world().barrier();
}

TEST(DistMpi, SplitIntoSingletonsAndBack) {
  const int W = world().size(), r = world().rank();
  // color = rank: W groups of one.
  auto solo = world().split(r, 0);
  ASSERT_NE(solo, nullptr);
  EXPECT_EQ(solo->size(), 1);
  EXPECT_EQ(solo->rank(), 0);
  Tensor t = f32_of({float(r), 1.f});
  solo->all_reduce(t);
  EXPECT_EQ(t.data<float>()[0], float(r));
  int64_t h = r + 1;
  solo->all_reduce_host(&h, 1);
  EXPECT_EQ(h, r + 1);
  // One group, ordered by key = -rank: ranks reversed.
  auto rev = world().split(0, -r);
  ASSERT_NE(rev, nullptr);
  EXPECT_EQ(rev->size(), W);
  EXPECT_EQ(rev->rank(), W - 1 - r);
  int64_t g[64] = {0};
  int64_t mine = r;
  rev->all_gather_host(&mine, g, 1);
  for (int q = 0; q < W; ++q) EXPECT_EQ(g[q], W - 1 - q);
  // Back on the world after using the sub-groups.
  world().all_reduce(t);
  EXPECT_EQ(t.data<float>()[1], float(W));
  // A negative color opts out.
  auto some = world().split(r == 0 ? -1 : 0, r);
  EXPECT_EQ(some == nullptr, r == 0);
  if (some) EXPECT_EQ(some->size(), W - 1);
}

TEST(DistMpi, HostReductionsAndExchanges) {
  const int W = world().size(), r = world().rank();
  double d[2] = {0.5 * r, -double(r)};
  world().all_reduce_host(d, 2);
  EXPECT_DOUBLE_EQ(d[0], 0.25 * W * (W - 1));
  double dm[1] = {double(r) + 0.25};
  world().all_reduce_host(dm, 1, ReduceOp::Max);
  EXPECT_DOUBLE_EQ(dm[0], W - 0.75);
  int64_t im[2] = {r, -(int64_t(1) << 50) * r};
  world().all_reduce_host(im, 2, ReduceOp::Max);
  EXPECT_EQ(im[0], W - 1);
  EXPECT_EQ(im[1], 0);

  // all_to_all_host: block d of rank s's send (n = 2) = {s, d}; block s of recv came from rank s.
  std::vector<int64_t> send(2 * W), recv(2 * W, -1);
  for (int q = 0; q < W; ++q) send[2 * q] = r, send[2 * q + 1] = q;
  world().all_to_all_host(send.data(), recv.data(), 2);
  for (int s = 0; s < W; ++s) {
    EXPECT_EQ(recv[2 * s], s);
    EXPECT_EQ(recv[2 * s + 1], r);
  }
  std::vector<int64_t> in = {r, 100 + r, 200 + r}, out(3 * W);
  world().all_gather_host(in.data(), out.data(), 3);
  for (int s = 0; s < W; ++s)
    for (int k = 0; k < 3; ++k) EXPECT_EQ(out[3 * s + k], 100 * k + s);
}

TEST(DistMpi, RejectsDeviceMismatchAndUnsupportedDtype) {
  Tensor h = Tensor::empty({4}, DType::F16);
  EXPECT_THROW(world().all_reduce(h), DeviceError);
  Tensor a = Tensor::empty({3}, DType::F32), b = Tensor::empty({3}, DType::F32);
  if (world().size() > 1) EXPECT_THROW(world().reduce_scatter(a, b), ShapeError);  // in must be [size * 3]
}

// ---- world-1 engine ----
TEST(DistSelf, EveryOpIsTheIdentity) {
  auto s = make_self_communicator();
  EXPECT_EQ(s->backend(), "self");
  EXPECT_EQ(s->size(), 1);
  EXPECT_EQ(s->rank(), 0);
  Tensor t = f32_of({1, 2, 3});
  s->all_reduce(t);
  s->broadcast(t, 0);
  EXPECT_EQ(t.data<float>()[2], 3.f);
  Tensor o = Tensor::zeros({3}, DType::F32);
  s->reduce_scatter(t, o)->wait();
  EXPECT_EQ(o.data<float>()[1], 2.f);
  Tensor g = Tensor::zeros({3}, DType::F32);
  s->all_gather(t, g, true)->wait();
  EXPECT_EQ(g.data<float>()[0], 1.f);
  Tensor rows = Tensor::empty({2, 2}, DType::BF16), got = Tensor::zeros({2, 2}, DType::BF16);
  for (int i = 0; i < 4; ++i) rows.data<uint16_t>()[i] = f32_to_bf16(float(i));
  s->all_to_all_v(rows, {2}, got, {2});
  EXPECT_EQ(bf16_to_f32(got.data<uint16_t>()[3]), 3.f);
  EXPECT_THROW(s->all_to_all_v(rows, {1}, got, {1}), ShapeError);
  EXPECT_THROW(s->reduce_scatter(t, rows), ShapeError);
  double d = 2.5;
  s->all_reduce_host(&d, 1, ReduceOp::Max);
  EXPECT_EQ(d, 2.5);
  int64_t in[2] = {4, 5}, out[2] = {0, 0};
  s->all_to_all_host(in, out, 2);
  EXPECT_EQ(out[1], 5);
  out[0] = out[1] = 0;
  s->all_gather_host(in, out, 2);
  EXPECT_EQ(out[0], 4);
  s->barrier();
  auto sub = s->split(3, 0);
  ASSERT_NE(sub, nullptr);
  EXPECT_EQ(sub->backend(), "self");
  EXPECT_EQ(s->split(-1, 0), nullptr);
}

TEST(DistNccl, ReportsWhetherBuiltWithIt) {
#ifdef AM_WITH_NCCL
  EXPECT_TRUE(built_with_nccl());
#else
  EXPECT_FALSE(built_with_nccl());
  EXPECT_THROW(make_nccl_world(0, 1, 0, false, "", 0, 1.0), DeviceError);
#endif
}

}  // namespace
}  // namespace am::dist
