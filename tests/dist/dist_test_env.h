// Shared by every tests/dist/*.cpp: the MPI world that main() (tests/dist/main.cpp) creates before
// RUN_ALL_TESTS. The binary runs under mpirun (ctest `dist_mpi`, 2 ranks), every rank runs every test in
// the same order, so a test must issue the same collectives on every rank; prefer EXPECT_* to ASSERT_*
// between collectives (an early return on one rank leaves the others waiting in the next collective).
#pragma once
#include "dist/communicator.h"

namespace am::dist::test {

Communicator& world();

}  // namespace am::dist::test
