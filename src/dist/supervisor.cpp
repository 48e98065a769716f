// Worker supervisor (`--nproc-per-node N`). Goals, in order: never hang, never leave a process behind,
// name the rank that failed.
//   cuda: the workers are our children; waitpid() tells exactly who died and how.
//   cpu:  mpirun starts them (MPI connects only processes an MPI launcher started), so they are our
//         grandchildren. Each writes rank_<R>.pid / rank_<R>.exit in a status directory; we watch the pids
//         with pidfds, which wake us the moment a worker dies, before mpirun has torn down the others, so
//         the first death we see is the one that caused the failure.
// Children run in their own process group: a terminal's Ctrl-C reaches only us, and we forward it once
// (mpirun would abort the whole job on SIGINT instead of letting the workers checkpoint).
#include "dist/supervisor.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include "core/error.h"

extern char** environ;

namespace am::dist {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

// ---------------------------------------------------------------- worker side
int g_worker_rank = -1;

void write_atomic(const fs::path& p, const std::string& text) {
  fs::path tmp = p;
  tmp += ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << text << "\n";
    if (!f) throw IoError("cannot write " + tmp.string());
  }
  fs::rename(tmp, p);  // the supervisor never reads a half-written file
}

fs::path status_file(const char* dir, int rank, const char* ext) {
  return fs::path(dir) / ("rank_" + std::to_string(rank) + "." + ext);
}

// ---------------------------------------------------------------- supervisor side
volatile sig_atomic_t g_sigint = 0, g_sigterm = 0, g_sigusr1 = 0;

void on_signal(int sig) {
  if (sig == SIGINT) g_sigint = g_sigint + 1;
  if (sig == SIGTERM || sig == SIGHUP) g_sigterm = g_sigterm + 1;  // a closed terminal stops the job as SIGTERM does
  if (sig == SIGUSR1) g_sigusr1 = g_sigusr1 + 1;
}
void on_sigchld(int) {}  // only interrupts poll(); SIG_IGN would make the kernel reap our children

// Installs our handlers for the lifetime of a run and restores the previous ones.
class SignalScope {
 public:
  SignalScope() {
    g_sigint = 0;
    g_sigterm = 0;
    g_sigusr1 = 0;
    const int sigs[] = {SIGINT, SIGTERM, SIGUSR1, SIGCHLD, SIGHUP};
    for (int i = 0; i < 5; ++i) {
      struct sigaction sa {};
      sa.sa_handler = sigs[i] == SIGCHLD ? on_sigchld : on_signal;
      sigemptyset(&sa.sa_mask);
      sigaction(sigs[i], &sa, &old_[i]);
    }
  }
  ~SignalScope() {
    const int sigs[] = {SIGINT, SIGTERM, SIGUSR1, SIGCHLD, SIGHUP};
    for (int i = 0; i < 5; ++i) sigaction(sigs[i], &old_[i], nullptr);
  }

 private:
  struct sigaction old_[5];
};

std::string signal_text(int sig) {
  const char* abbrev = sigabbrev_np(sig);
  return std::to_string(sig) + (abbrev ? std::string(" (SIG") + abbrev + ")" : std::string());
}

// Alive and not a zombie: an exited worker stays a zombie until mpirun reaps it.
bool alive(pid_t pid) {
  if (pid <= 0 || kill(pid, 0) != 0) return false;
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(f, line)) return false;
  auto p = line.rfind(')');
  return p == std::string::npos || p + 2 >= line.size() || (line[p + 2] != 'Z' && line[p + 2] != 'X');
}

int pidfd_open(pid_t pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
#else
  return -1;  // fall back to polling every 100 ms
#endif
}

std::string find_on_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::stringstream ss(path ? path : "/usr/local/bin:/usr/bin:/bin");
  std::string d;
  while (std::getline(ss, d, ':')) {
    fs::path p = fs::path(d.empty() ? "." : d) / name;
    if (access(p.c_str(), X_OK) == 0) return p.string();
  }
  return "";
}

std::string self_exe() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  if (ec) throw Error("cannot resolve /proc/self/exe: " + ec.message());
  return p.string();
}

// A port free right now on 127.0.0.1 (the kernel picks it); rank 0 binds it again moments later.
int free_tcp_port() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw Error(std::string("socket: ") + std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  int rc = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  if (rc == 0) rc = getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  if (rc != 0) throw Error(std::string("cannot find a free TCP port on 127.0.0.1: ") + std::strerror(errno));
  return ntohs(a.sin_port);
}

// Environment as KEY=VALUE strings, edited before fork (the child may only call async-signal-safe code:
// OpenBLAS/OpenMP threads exist in this process).
struct Env {
  std::vector<std::string> kv;
  Env() {
    for (char** e = environ; *e; ++e) kv.emplace_back(*e);
  }
  bool has(const std::string& k) const {
    for (auto& s : kv)
      if (s.compare(0, k.size() + 1, k + "=") == 0) return true;
    return false;
  }
  void unset(const std::string& k) {
    std::erase_if(kv, [&](const std::string& s) { return s.compare(0, k.size() + 1, k + "=") == 0; });
  }
  void set(const std::string& k, const std::string& v) {
    unset(k);
    kv.push_back(k + "=" + v);
  }
};

pid_t spawn(const std::string& exe, const std::vector<std::string>& args, const Env& env) {
  std::vector<char*> av, ev;
  for (auto& s : args) av.push_back(const_cast<char*>(s.c_str()));
  av.push_back(nullptr);
  for (auto& s : env.kv) ev.push_back(const_cast<char*>(s.c_str()));
  ev.push_back(nullptr);
  const pid_t parent = getpid();
  std::fflush(nullptr);  // or buffered output would be written twice
  pid_t pid = fork();
  if (pid < 0) throw Error(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // survives exec: if the supervisor is killed, so are we
    if (getppid() != parent) _exit(1);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    for (int s : {SIGINT, SIGTERM, SIGUSR1, SIGCHLD, SIGPIPE, SIGHUP}) signal(s, SIG_DFL);
    execve(exe.c_str(), av.data(), ev.data());
    const char msg[] = "error: cannot execute the worker binary\n";
    [[maybe_unused]] auto n = write(2, msg, sizeof(msg) - 1);
    _exit(127);
  }
  setpgid(pid, pid);  // also from here, so the group exists before we ever signal it
  return pid;
}

struct Worker {
  pid_t pid = -1;   // -1: not known yet (mpirun has not started it, or it has not registered)
  int pidfd = -1;
  bool exited = false;
};

struct Failure {
  int rank = -1;    // -1: no rank known (mpirun failed before every worker registered)
  pid_t pid = -1;
  int status = -1;  // exit status, or -1
  int signal = 0;   // killing signal, or 0
};

class Job {
 public:
  explicit Job(const SupervisorOptions& o) : o_(o), w_(o.nproc) {}
  ~Job() {
    for (auto& w : w_)
      if (w.pidfd >= 0) close(w.pidfd);
    std::error_code ec;
    if (own_dir_) fs::remove_all(dir_, ec);
  }
  int run();

 private:
  void start();
  void discover();                 // mpi: pid files of workers that registered since the last look
  bool reap(bool block);           // our children; true when all of them are gone
  void reap_all(double seconds);   // every child and adopted orphan, for at most `seconds`
  void check_registered();         // mpi: workers that vanished, and their exit files
  void forward(int sig);
  void stop();                     // SIGTERM, SIGKILL after 3 s, reap everything
  void note_failure(const Failure& f) {
    if (!failure_) failure_ = f;
  }
  int report();

  const SupervisorOptions& o_;
  std::vector<Worker> w_;
  bool mpi_ = false;
  pid_t mpirun_ = -1;
  bool mpirun_done_ = false;
  bool no_children_ = false;
  int mpirun_status_ = 0;  // raw waitpid status
  std::string dir_;
  bool own_dir_ = false;
  std::optional<Failure> failure_;
  std::vector<int> forwarded_;  // every signal forwarded so far, in order (replayed to late-registering workers)
};

void Job::start() {
  mpi_ = o_.device != "cuda";
  if (const char* d = std::getenv("AUTOMODEL_STATUS_DIR"); d && *d) {
    dir_ = d;
    fs::create_directories(dir_);
    for (int r = 0; r < o_.nproc; ++r)
      for (const char* ext : {"pid", "exit"}) fs::remove(status_file(dir_.c_str(), r, ext));
  } else {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/automodel-workers-XXXXXX";
    if (!mkdtemp(templ.data())) throw IoError("cannot create a status directory " + templ + ": " + std::strerror(errno));
    dir_ = templ;
    own_dir_ = true;
  }

  Env env;
  // A worker must find its rank only in what we set: drop what another launcher left behind.
  for (const char* k : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                        "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
                        "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"})
    env.unset(k);
  env.set("AUTOMODEL_SUPERVISED", "1");
  env.set("AUTOMODEL_STATUS_DIR", dir_);
  const std::string exe = self_exe();
  const std::string n = std::to_string(o_.nproc);

  if (!mpi_) {
    // NVLink SHARP multicast needs fabric-manager state a container rarely has; off unless asked for.
    if (!env.has("NCCL_NVLS_ENABLE")) env.set("NCCL_NVLS_ENABLE", "0");
    env.set("WORLD_SIZE", n);
    env.set("LOCAL_WORLD_SIZE", n);
    env.set("MASTER_ADDR", "127.0.0.1");
    env.set("MASTER_PORT", std::to_string(free_tcp_port()));
    for (int r = 0; r < o_.nproc; ++r) {
      env.set("RANK", std::to_string(r));
      env.set("LOCAL_RANK", std::to_string(r));  // rank r uses GPU r
      w_[r].pid = spawn(exe, o_.argv, env);
    }
    return;
  }

  const std::string mpirun = find_on_path("mpirun");
  if (mpirun.empty())
    throw UsageError("--nproc-per-node " + n + " on CPU starts the workers through mpirun, which is not on PATH: "
                     "install Open MPI (`make setup`, or apt-get install openmpi-bin) or use device: cuda");
  // N workers share the cores: without this each would start one OpenMP thread per core.
  if (!env.has("OMP_NUM_THREADS")) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    env.set("OMP_NUM_THREADS", std::to_string(std::max(1L, cores / o_.nproc)));
  }
  std::vector<std::string> args = {mpirun, "-np", n, "--oversubscribe", "--bind-to", "none"};
  if (geteuid() == 0) args.push_back("--allow-run-as-root");
  // vader's CMA single-copy needs ptrace rights that containers usually withhold.
  for (const char* a : {"--mca", "btl", "self,vader", "--mca", "btl_vader_single_copy_mechanism", "none"}) args.push_back(a);
  for (const char* k : {"AUTOMODEL_SUPERVISED", "AUTOMODEL_STATUS_DIR", "OMP_NUM_THREADS"}) {
    args.push_back("-x");
    args.push_back(k);
  }
  args.push_back(exe);
  args.insert(args.end(), o_.argv.begin() + (o_.argv.empty() ? 0 : 1), o_.argv.end());
  mpirun_ = spawn(mpirun, args, env);
}

void Job::discover() {
  for (int r = 0; r < o_.nproc; ++r) {
    auto& w = w_[r];
    if (w.pid > 0) continue;
    std::ifstream f(status_file(dir_.c_str(), r, "pid"));
    long pid = 0;
    if (!(f >> pid) || pid <= 0) continue;
    w.pid = static_cast<pid_t>(pid);
    w.pidfd = pidfd_open(w.pid);  // -1 when it is already gone: check_registered() sees it
    // A stop / preemption signal forwarded before this worker registered reaches it now (it armed its
    // handlers before writing its pid file), so none is lost to a slow start.
    for (int sig : forwarded_) kill(w.pid, sig);
  }
}

bool Job::reap(bool block) {
  for (;;) {
    int st = 0;
    pid_t pid = waitpid(-1, &st, block ? 0 : WNOHANG);
    no_children_ = pid < 0 && errno == ECHILD;
    if (pid <= 0) break;  // 0: none exited now
    if (pid == mpirun_) {
      mpirun_done_ = true;
      mpirun_status_ = st;
      continue;
    }
    for (int r = 0; r < o_.nproc; ++r)
      if (!mpi_ && w_[r].pid == pid && !w_[r].exited) {
        w_[r].exited = true;
        if (WIFSIGNALED(st)) note_failure({r, pid, -1, WTERMSIG(st)});
        else if (WIFEXITED(st) && WEXITSTATUS(st) != 0) note_failure({r, pid, WEXITSTATUS(st), 0});
      }
  }
  if (mpi_) return mpirun_done_;
  for (auto& w : w_)
    if (!w.exited) return false;
  return true;
}

void Job::reap_all(double seconds) {
  const auto t0 = Clock::now();
  for (;;) {
    reap(false);
    if (no_children_) return;
    if (Clock::now() - t0 > std::chrono::duration<double>(seconds)) {
      if (mpi_) kill(-mpirun_, SIGKILL);
      return;  // never hang: what is left is SIGKILLed and gets reaped by init
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void Job::check_registered() {
  for (int r = 0; r < o_.nproc; ++r) {
    auto& w = w_[r];
    if (w.pid <= 0 || w.exited || alive(w.pid)) continue;
    w.exited = true;
    std::ifstream f(status_file(dir_.c_str(), r, "exit"));
    int code = 0;
    if (f >> code) {
      if (code != 0) note_failure({r, w.pid, code, 0});
    } else {
      note_failure({r, w.pid, -1, 0});  // killed: which signal, only mpirun's status can tell
    }
  }
}

void Job::forward(int sig) {
  forwarded_.push_back(sig);
  for (auto& w : w_)
    if (w.pid > 0 && !w.exited) kill(w.pid, sig);
}

void Job::stop() {
  // Workers first, mpirun never: it aborts the job by itself once a worker died, and a signal during that
  // abort crashes it (Open MPI 4: PMIx_Finalize segfault); its exit status is also what names the signal
  // that killed a worker it started. A worker blocked in a collective with a dead peer ignores SIGTERM
  // (it stops only at a step boundary): SIGKILL after 3 s.
  std::vector<bool> termed(w_.size(), false);
  auto gone = [&] {
    bool all = reap(false);
    for (auto& w : w_)
      if (w.pid > 0 && !w.exited) all = false;
    return all;
  };
  auto wait_until = [&](double seconds, bool term) {
    const auto t0 = Clock::now();
    while (Clock::now() - t0 < std::chrono::duration<double>(seconds) && g_sigint < 2) {
      if (mpi_) {
        discover();
        check_registered();
      }
      for (size_t r = 0; term && r < w_.size(); ++r)  // also reaches workers that registered only now
        if (w_[r].pid > 0 && !w_[r].exited && !termed[r]) {
          kill(w_[r].pid, SIGTERM);
          termed[r] = true;
        }
      if (gone()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return gone();
  };
  if (wait_until(3.0, true)) {
    // Every worker is dead, but a worker mpirun left unreaped is our child now (we are its subreaper): a
    // zombie we do not reap outlives the job wherever PID 1 does not reap (containers, CI).
    reap_all(3.0);
    return;
  }
  for (auto& w : w_)
    if (w.pid > 0 && !w.exited) {
      kill(w.pid, SIGKILL);
      if (!mpi_) kill(-w.pid, SIGKILL);  // anything a cuda worker started in its own process group
    }
  if (mpi_ && !wait_until(2.0, false) && !mpirun_done_) {
    kill(-mpirun_, SIGKILL);  // mpirun and whatever it started that is still in its group
    kill(mpirun_, SIGKILL);
  }
  reap_all(3.0);
  // mpirun's workers die of PDEATHSIG or the group kill: wait (bounded) until they really are gone.
  const auto t1 = Clock::now();
  while (mpi_ && Clock::now() - t1 < std::chrono::seconds(2)) {
    bool any = false;
    for (auto& w : w_)
      if (w.pid > 0 && alive(w.pid)) {
        kill(w.pid, SIGKILL);
        any = true;
      }
    if (!any) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

int Job::report() {
  Failure f = *failure_;
  // Under mpirun a worker that left no exit file was killed; mpirun exits with 128 + that signal.
  if (mpi_ && f.status < 0 && f.signal == 0 && WIFEXITED(mpirun_status_) && WEXITSTATUS(mpirun_status_) > 128)
    f.signal = WEXITSTATUS(mpirun_status_) - 128;
  std::string how = f.signal ? "was killed by signal " + signal_text(f.signal)
                    : f.status >= 0 ? "exited with status " + std::to_string(f.status)
                                    : "died without reporting an exit status (killed)";
  if (f.rank >= 0)
    std::fprintf(stderr, "error: worker rank %d (pid %d) %s; stopped the other workers\n", f.rank, static_cast<int>(f.pid),
                 how.c_str());
  else
    std::fprintf(stderr, "error: mpirun %s and no worker reported a failure of its own; stopped the job\n",
                 WIFSIGNALED(mpirun_status_) ? ("was killed by signal " + signal_text(WTERMSIG(mpirun_status_))).c_str()
                                             : ("exited with status " + std::to_string(WEXITSTATUS(mpirun_status_))).c_str());
  // A worker that stopped on a usage or recipe error (exit 2) makes the job's exit status 2 too (SPEC §1).
  return f.status == 2 ? 2 : 1;
}

int Job::run() {
  SignalScope signals;
  // Workers whose mpirun exits before reaping them become our children instead of init's: we reap them,
  // and no zombie outlives the job.
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  struct ResetSubreaper {
    ~ResetSubreaper() { prctl(PR_SET_CHILD_SUBREAPER, 0); }
  } reset_subreaper;
  start();
  int seen_int = 0, seen_term = 0, seen_usr1 = 0;
  for (;;) {
    // Preemption (Slurm's USR1, SIGTERM) and Ctrl-C go to every worker, which checkpoints and exits 0.
    while (seen_term < g_sigterm) ++seen_term, forward(SIGTERM);
    while (seen_usr1 < g_sigusr1) ++seen_usr1, forward(SIGUSR1);
    if (g_sigint >= 2) {
      std::fprintf(stderr, "error: interrupted twice: killing the workers\n");
      stop();
      return 1;
    }
    if (seen_int < g_sigint) ++seen_int, forward(SIGINT);

    if (mpi_) discover();
    bool done = reap(false);
    if (mpi_) check_registered();
    if (failure_) break;
    if (done) {
      if (!mpi_ || (WIFEXITED(mpirun_status_) && WEXITSTATUS(mpirun_status_) == 0)) {
        reap_all(3.0);  // anything mpirun left to us (see stop())
        return 0;
      }
      check_registered();  // mpirun failed: did a worker say why?
      if (!failure_) note_failure({});
      break;
    }
    std::vector<pollfd> fds;
    for (auto& w : w_)
      if (w.pidfd >= 0 && !w.exited) fds.push_back({w.pidfd, POLLIN, 0});
    poll(fds.data(), fds.size(), 100);  // a pidfd, SIGCHLD or a forwarded signal wakes us early
  }
  stop();
  return report();
}

}  // namespace

int run_workers(const SupervisorOptions& opt) {
  if (opt.nproc < 1) throw UsageError("--nproc-per-node " + std::to_string(opt.nproc) + ": must be >= 1");
  if (opt.device != "cpu" && opt.device != "cuda")
    throw UsageError("run_workers: device must be cpu or cuda, got '" + opt.device + "'");
  Job job(opt);
  int rc = job.run();
  return rc;
}

void worker_register(int rank) {
  g_worker_rank = rank;
  if (const char* s = std::getenv("AUTOMODEL_SUPERVISED"); s && *s && std::strcmp(s, "0") != 0)
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // mpirun's children: never outlive it
  const char* dir = std::getenv("AUTOMODEL_STATUS_DIR");
  if (!dir || !*dir) return;
  write_atomic(status_file(dir, rank, "pid"), std::to_string(getpid()));
}

void worker_report_exit(int code) {
  const char* dir = std::getenv("AUTOMODEL_STATUS_DIR");
  if (g_worker_rank < 0 || !dir || !*dir) return;
  try {
    write_atomic(status_file(dir, g_worker_rank, "exit"), std::to_string(code));
  } catch (const std::exception&) {
    // exiting anyway; the supervisor will report the worker as killed rather than hang
  }
}

}  // namespace am::dist
