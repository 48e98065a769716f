// Where this process stands in a job, read from the launcher's environment (SPEC §1). Precedence, most
// explicit first: our own supervisor > torchrun > Open MPI > MPICH/Hydra > Slurm srun > one process.
// Every malformed or inconsistent value is a UsageError naming the variable: a job that starts with
// the wrong world size would hang in its first collective instead of failing here.
#include "dist/launch.h"

#include <algorithm>
#include <cstdlib>
#include <optional>

#include "core/error.h"

namespace am::dist {

namespace {

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  return std::string(v);
}

// Strict: "4x" or "" is an error, not 4 or 0 (std::stoi would accept the first).
int parse_int(const std::string& s, const std::string& what) {
  size_t pos = 0;
  long v = 0;
  try {
    v = std::stol(s, &pos);
  } catch (const std::exception&) {
    pos = 0;
  }
  if (pos == 0 || pos != s.size() || v < -(1L << 30) || v > (1L << 30))
    throw UsageError(what + "='" + s + "': expected an integer");
  return static_cast<int>(v);
}

std::optional<int> env_int(const char* name) {
  auto v = env(name);
  if (!v) return std::nullopt;
  return parse_int(*v, name);
}

int env_int_or(const char* name, int fallback) { return env_int(name).value_or(fallback); }

// Range checks shared by every launcher; `rv`, `wv`, ... name the variables this launcher read.
void validate(const LaunchInfo& li, const char* rv, const char* wv, const char* lrv, const char* lwv) {
  auto bad = [](const std::string& m) { throw UsageError(m); };
  if (li.world_size < 1) bad(std::string(wv) + "=" + std::to_string(li.world_size) + ": must be >= 1");
  if (li.rank < 0 || li.rank >= li.world_size)
    bad(std::string(rv) + "=" + std::to_string(li.rank) + ": must be in [0, " + wv + "=" + std::to_string(li.world_size) + ")");
  if (li.local_world_size < 1) bad(std::string(lwv) + "=" + std::to_string(li.local_world_size) + ": must be >= 1");
  if (li.local_rank < 0 || li.local_rank >= li.local_world_size)
    bad(std::string(lrv) + "=" + std::to_string(li.local_rank) + ": must be in [0, " + lwv + "=" +
        std::to_string(li.local_world_size) + ")");
  if (li.local_world_size > li.world_size)
    bad(std::string(lwv) + "=" + std::to_string(li.local_world_size) + ": larger than " + wv + "=" + std::to_string(li.world_size));
}

int check_port(int p, const std::string& what) {
  if (p < 1 || p > 65535) throw UsageError(what + "=" + std::to_string(p) + ": not a TCP port (1-65535)");
  return p;
}

// RANK/WORLD_SIZE/... as torchrun and our supervisor set them. A missing LOCAL_* means one node.
LaunchInfo from_torch_vars() {
  LaunchInfo li;
  li.rank = *env_int("RANK");
  li.world_size = *env_int("WORLD_SIZE");
  li.local_world_size = env_int_or("LOCAL_WORLD_SIZE", li.world_size);
  li.local_rank = env_int_or("LOCAL_RANK", li.rank % std::max(1, li.local_world_size));
  validate(li, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE");
  return li;
}

// Open MPI or MPICH/Hydra rank variables; nullopt when neither launched us.
std::optional<LaunchInfo> from_mpi_vars() {
  struct Vars {
    const char *rank, *size, *local_rank, *local_size;
  };
  for (const Vars& v : {Vars{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"},
                        Vars{"PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"}}) {
    if (!env(v.rank) || !env(v.size)) continue;
    LaunchInfo li;
    li.mpi = true;
    li.rank = *env_int(v.rank);
    li.world_size = *env_int(v.size);
    li.local_world_size = env_int_or(v.local_size, li.world_size);
    li.local_rank = env_int_or(v.local_rank, li.rank % std::max(1, li.local_world_size));
    validate(li, v.rank, v.size, v.local_rank, v.local_size);
    return li;
  }
  return std::nullopt;
}

void require_master(const LaunchInfo& li, const char* who) {
  if (li.world_size <= 1 || li.mpi) return;
  for (const char* v : {"MASTER_ADDR", "MASTER_PORT"})
    if (!env(v))
      throw UsageError(std::string(v) + " is not set, but WORLD_SIZE=" + std::to_string(li.world_size) + " (" + who +
                       " launch): the ranks need it to find each other");
}

}  // namespace

std::string first_host(const std::string& hostlist) {
  // First item at bracket depth 0 ("gpu[01-04,07]" of "gpu[01-04,07],cpu5"), then, in each bracket
  // group, the text before the first ',' or '-': zero padding stays as Slurm writes it ("gpu01").
  std::string out;
  int depth = 0;
  bool first_in_group = false;
  for (size_t i = 0; i < hostlist.size(); ++i) {
    char c = hostlist[i];
    if (c == '[') {
      if (depth++) throw UsageError("hostlist '" + hostlist + "': nested '['");
      first_in_group = true;
      continue;
    }
    if (c == ']') {
      if (!depth--) throw UsageError("hostlist '" + hostlist + "': unbalanced ']'");
      continue;
    }
    if (depth == 0 && (c == ',' || c == ' ')) break;
    if (depth > 0) {
      if (c == ',' || c == '-') first_in_group = false;
      if (first_in_group) out += c;
      continue;
    }
    out += c;
  }
  if (depth != 0) throw UsageError("hostlist '" + hostlist + "': unbalanced '['");
  if (out.empty()) throw UsageError("hostlist '" + hostlist + "': no host");
  return out;
}

int tasks_on_node(const std::string& spec, int node, const std::string& what) {
  // "8(x2),4": 8 tasks on nodes 0-1, 4 on node 2.
  int seen = 0;
  size_t i = 0;
  while (i < spec.size()) {
    size_t end = spec.find(',', i);
    if (end == std::string::npos) end = spec.size();
    std::string item = spec.substr(i, end - i);
    int count = 1;
    size_t par = item.find('(');
    if (par != std::string::npos) {
      if (item.size() < par + 4 || item.compare(par, 2, "(x") != 0 || item.back() != ')')
        throw UsageError(what + "='" + spec + "': expected a list like 8(x2),4");
      count = parse_int(item.substr(par + 2, item.size() - par - 3), what);
      item = item.substr(0, par);
    }
    int tasks = parse_int(item, what);
    if (node < seen + count) return tasks;
    seen += count;
    i = end + 1;
  }
  throw UsageError(what + "='" + spec + "': no entry for node " + std::to_string(node));
}

LaunchInfo detect_launch() {
  // 1. Our own supervisor (`--nproc-per-node`): RANK... for GPU workers it forked itself; for CPU workers
  // it went through mpirun (MPI only connects processes an MPI launcher started) and the OMPI variables
  // give the rank. It binds nothing at MASTER_PORT, so the rendezvous uses that port as is.
  if (auto s = env("AUTOMODEL_SUPERVISED"); s && *s != "0") {
    LaunchInfo li;
    if (env("RANK") && env("WORLD_SIZE")) {
      li = from_torch_vars();
    } else if (auto m = from_mpi_vars()) {
      li = *m;
    } else {
      throw UsageError("AUTOMODEL_SUPERVISED is set, but neither RANK/WORLD_SIZE nor OMPI_COMM_WORLD_RANK/SIZE is "
                       "(unset AUTOMODEL_SUPERVISED to start workers with --nproc-per-node)");
    }
    li.launcher = "automodel";
    require_master(li, "automodel supervisor");
    if (!li.mpi && li.world_size > 1) {
      li.master_addr = *env("MASTER_ADDR");
      li.master_port = check_port(*env_int("MASTER_PORT"), "MASTER_PORT");
    }
    return li;
  }

  // 2. torchrun. Its agent already serves a TCPStore at MASTER_ADDR:MASTER_PORT
  // (TORCHELASTIC_USE_AGENT_STORE=True; workers are only its clients), so binding that port would fail on
  // the master node. Our rendezvous listens on rank 0 at AUTOMODEL_RDZV_PORT, else MASTER_PORT+1, which
  // must be free on the MASTER_ADDR host (it is in torchrun's defaults, 29500 -> 29501).
  if (env("RANK") && env("WORLD_SIZE")) {
    LaunchInfo li = from_torch_vars();
    li.launcher = "torchrun";
    if (li.world_size > 1) {
      require_master(li, "torchrun");
      li.master_addr = *env("MASTER_ADDR");
      int mp = check_port(*env_int("MASTER_PORT"), "MASTER_PORT");
      if (env("AUTOMODEL_RDZV_PORT"))
        li.master_port = check_port(*env_int("AUTOMODEL_RDZV_PORT"), "AUTOMODEL_RDZV_PORT");
      else
        li.master_port = check_port(mp + 1, "MASTER_PORT+1 (set AUTOMODEL_RDZV_PORT)");
    }
    return li;
  }

  // 3-4. mpirun (Open MPI, then MPICH/Hydra): MPI_Init finds the peers, no address needed.
  if (auto m = from_mpi_vars()) {
    m->launcher = "mpirun";
    return *m;
  }

  // 5. Slurm srun: only inside a job step (SLURM_STEP_ID). The sbatch batch script also sees SLURM_* but is
  // a single process that must not wait for peers.
  if (env("SLURM_PROCID") && env("SLURM_NTASKS") && env("SLURM_STEP_ID")) {
    LaunchInfo li;
    li.launcher = "slurm";
    li.rank = *env_int("SLURM_PROCID");
    li.world_size = *env_int("SLURM_NTASKS");
    li.local_rank = env_int_or("SLURM_LOCALID", 0);
    const int node = env_int_or("SLURM_NODEID", 0);
    // The step's own layout first: the job's may differ when srun asks for fewer tasks.
    const char* per_node = "SLURM_NTASKS";  // no per-node variable: one node
    li.local_world_size = li.world_size;
    for (const char* v : {"SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"})
      if (env(v)) {
        per_node = v;
        li.local_world_size = tasks_on_node(*env(v), node, v);
        break;
      }
    validate(li, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", per_node);
    if (li.world_size > 1) {
      if (auto a = env("MASTER_ADDR")) {
        li.master_addr = *a;
      } else {
        const char* var = env("SLURM_STEP_NODELIST") ? "SLURM_STEP_NODELIST"
                          : env("SLURM_JOB_NODELIST") ? "SLURM_JOB_NODELIST"
                          : env("SLURM_NODELIST")     ? "SLURM_NODELIST"
                                                      : nullptr;
        if (!var)
          throw UsageError("MASTER_ADDR is not set and neither is SLURM_STEP_NODELIST, SLURM_JOB_NODELIST or "
                           "SLURM_NODELIST (Slurm launch, SLURM_NTASKS=" + std::to_string(li.world_size) + ")");
        li.master_addr = first_host(*env(var));
      }
      li.master_port = check_port(env_int_or("MASTER_PORT", 29500), "MASTER_PORT");
    }
    return li;
  }

  return LaunchInfo{};
}

}  // namespace am::dist
