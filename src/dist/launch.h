// Where this process stands in a job (SPEC §1 "Launching on several GPUs or machines"), from the
// environment of whichever launcher started it, and the worker supervisor behind `--nproc-per-node`.
#pragma once
#include <string>
#include <vector>

namespace am::dist {

struct LaunchInfo {
  int rank = 0, world_size = 1;
  int local_rank = 0, local_world_size = 1;
  std::string master_addr;  // rendezvous host ("" when not needed: world 1, or MPI)
  int master_port = 0;      // the port our TCP rendezvous uses (not torchrun's store port; see launch.cpp)
  std::string launcher = "none";  // none | automodel | torchrun | slurm | mpirun
  bool mpi = false;         // started by an MPI launcher: MPI_Init finds the peers
};

// Reads torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), our own
// supervisor (the same variables plus AUTOMODEL_SUPERVISED), Slurm srun (SLURM_PROCID, SLURM_NTASKS,
// SLURM_LOCALID, SLURM_NODELIST, ...) and Open MPI / MPICH (OMPI_COMM_WORLD_*, PMI_RANK / PMI_SIZE).
// No launcher: world 1. Inconsistent or incomplete settings throw UsageError naming the variable (exit 2).
LaunchInfo detect_launch();

// Helpers of detect_launch, public for the tests.
// First host of a Slurm compressed hostlist: "gpu[01-04,07],cpu5" -> "gpu01". UsageError if malformed.
std::string first_host(const std::string& hostlist);
// Tasks on node `node` (0-based) of a Slurm per-node list "8(x2),4"; `what` names the variable in errors.
int tasks_on_node(const std::string& spec, int node, const std::string& what);

}  // namespace am::dist
