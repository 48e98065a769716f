// The worker supervisor behind `--nproc-per-node N` (SPEC §1): starts N workers on this machine, forwards
// preemption signals to them, and if one dies stops all the others within seconds, names the failing rank
// and returns non-zero, leaving no process behind.
#pragma once
#include <string>
#include <vector>

namespace am::dist {

struct SupervisorOptions {
  int nproc = 1;
  // "cuda": N forked copies of this binary (rank i uses GPU i, NCCL rendezvous at 127.0.0.1:<free port>).
  // "cpu":  N copies through mpirun, since the CPU collectives are MPI and MPI only connects processes that
  //         an MPI launcher started.
  std::string device = "cpu";
  // The command line each worker runs (argv[0] is only its displayed name; the binary is this one). The
  // workers see AUTOMODEL_SUPERVISED=1 and so never start workers of their own.
  std::vector<std::string> argv;
};

// Runs the workers to the end. 0 when every worker exits 0; 1 (after a one-line `error: worker rank R ...`
// on stderr) when any fails. Throws UsageError when the workers cannot be started (no mpirun, N < 1).
int run_workers(const SupervisorOptions& opt);

// Worker side, for any supervised process (no-ops without AUTOMODEL_SUPERVISED / AUTOMODEL_STATUS_DIR):
// worker_register() dies with its parent (PR_SET_PDEATHSIG) and writes $AUTOMODEL_STATUS_DIR/rank_<R>.pid,
// which is how the supervisor learns the pids of workers that mpirun started; call it first thing.
// worker_report_exit() writes rank_<R>.exit with the code the process is about to exit with, telling a
// normal exit from a kill.
void worker_register(int rank);
void worker_report_exit(int code);

}  // namespace am::dist
