// main() of am_dist_tests: makes the MPI world first, runs the tests on every rank, prints the full
// GoogleTest report on rank 0 and only failures (tagged with the rank) on the others, and exits non-zero
// on every rank when any rank failed.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>

#include "core/error.h"
#include "dist_test_env.h"

namespace am::dist::test {
namespace {

Communicator* g_world = nullptr;

// Replaces the default printer on ranks != 0: silent unless something fails.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::printf("[rank %d] %s:%d: Failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?", r.line_number(),
                r.message());
    std::fflush(stdout);
  }
  void OnTestEnd(const ::testing::TestInfo& t) override {
    if (t.result()->Failed()) {
      std::printf("[rank %d] FAILED %s.%s\n", rank_, t.test_suite_name(), t.name());
      std::fflush(stdout);
    }
  }

 private:
  int rank_;
};

}  // namespace

Communicator& world() { return *g_world; }

}  // namespace am::dist::test

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  std::unique_ptr<am::dist::Communicator> world;
  try {
    world = am::dist::make_mpi_world();
  } catch (const am::Error& e) {
    std::fprintf(stderr, "am_dist_tests: %s\n", e.what());
    return 1;
  }
  am::dist::test::g_world = world.get();
  const int rank = world->rank();
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new am::dist::test::FailurePrinter(rank));
  }
  int rc = RUN_ALL_TESTS();
  int64_t failed = rc != 0;
  world->all_reduce_host(&failed, 1, am::dist::ReduceOp::Max);
  if (rank == 0 && failed && rc == 0) std::printf("[dist] a test failed on another rank (see its [rank N] lines)\n");
  world.reset();  // before MPI_Finalize (atexit)
  return failed ? 1 : 0;
}
