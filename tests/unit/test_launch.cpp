// dist::detect_launch: every launcher's variables, their precedence, the Slurm hostlist / tasks-per-node
// formats, and a UsageError naming the variable for every inconsistent setting.
#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <optional>
#include <string>

#include "core/error.h"
#include "dist/launch.h"

using namespace am;
using namespace am::dist;

namespace {

// Every variable detect_launch reads: cleared for each test and restored afterwards, so the tests do
// not depend on (or disturb) the environment they run in (CI under Slurm or mpirun, say).
const char* kVars[] = {"AUTOMODEL_SUPERVISED", "AUTOMODEL_RDZV_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                       "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
                       "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK",
                       "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "SLURM_PROCID", "SLURM_NTASKS",
                       "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_ID", "SLURM_NTASKS_PER_NODE",
                       "SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_NODELIST",
                       "SLURM_JOB_NODELIST", "SLURM_NODELIST"};

class Launch : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* v : kVars) {
      const char* old = std::getenv(v);
      saved_[v] = old ? std::optional<std::string>(old) : std::nullopt;
      unsetenv(v);
    }
  }
  void TearDown() override {
    for (auto& [k, v] : saved_) {
      if (v) setenv(k.c_str(), v->c_str(), 1);
      else unsetenv(k.c_str());
    }
  }
  void set(std::initializer_list<std::pair<const char*, const char*>> kv) {
    for (auto& [k, v] : kv) setenv(k, v, 1);
  }
  // The UsageError message of detect_launch(), "" if it did not throw.
  std::string error() {
    try {
      detect_launch();
    } catch (const UsageError& e) {
      return e.what();
    }
    return "";
  }

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

TEST_F(Launch, NoLauncherIsWorldOne) {
  auto li = detect_launch();
  EXPECT_EQ(li.rank, 0);
  EXPECT_EQ(li.world_size, 1);
  EXPECT_EQ(li.local_world_size, 1);
  EXPECT_EQ(li.launcher, "none");
  EXPECT_FALSE(li.mpi);
}

TEST_F(Launch, Torchrun) {
  set({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
       {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "29500"}});
  auto li = detect_launch();
  EXPECT_EQ(li.launcher, "torchrun");
  EXPECT_EQ(li.rank, 3);
  EXPECT_EQ(li.world_size, 8);
  EXPECT_EQ(li.local_rank, 1);
  EXPECT_EQ(li.local_world_size, 2);
  EXPECT_EQ(li.master_addr, "node7");
  EXPECT_EQ(li.master_port, 29501);  // torchrun's agent store holds MASTER_PORT
  EXPECT_FALSE(li.mpi);
  set({{"AUTOMODEL_RDZV_PORT", "40000"}});
  EXPECT_EQ(detect_launch().master_port, 40000);
}

TEST_F(Launch, TorchrunWorldOneNeedsNoMaster) {
  set({{"RANK", "0"}, {"WORLD_SIZE", "1"}});
  auto li = detect_launch();
  EXPECT_EQ(li.launcher, "torchrun");
  EXPECT_EQ(li.world_size, 1);
  EXPECT_EQ(li.master_addr, "");
}

TEST_F(Launch, OwnSupervisorForked) {
  set({{"AUTOMODEL_SUPERVISED", "1"}, {"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"},
       {"LOCAL_WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "41234"}});
  auto li = detect_launch();
  EXPECT_EQ(li.launcher, "automodel");
  EXPECT_EQ(li.rank, 1);
  EXPECT_EQ(li.local_rank, 1);
  EXPECT_EQ(li.master_port, 41234);  // nobody else holds it: no +1
  EXPECT_FALSE(li.mpi);
}

TEST_F(Launch, OwnSupervisorThroughMpirun) {
  set({{"AUTOMODEL_SUPERVISED", "1"}, {"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"},
       {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
  auto li = detect_launch();
  EXPECT_EQ(li.launcher, "automodel");
  EXPECT_TRUE(li.mpi);
  EXPECT_EQ(li.rank, 1);
  EXPECT_EQ(li.world_size, 2);
  EXPECT_EQ(li.master_addr, "");
}

TEST_F(Launch, SupervisedWithoutRankIsAnError) {
  set({{"AUTOMODEL_SUPERVISED", "1"}});
  EXPECT_NE(error().find("AUTOMODEL_SUPERVISED"), std::string::npos);
}

TEST_F(Launch, OpenMpi) {
  set({{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "6"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "2"},
       {"OMPI_COMM_WORLD_LOCAL_SIZE", "3"}});
  auto li = detect_launch();
  EXPECT_EQ(li.launcher, "mpirun");
  EXPECT_TRUE(li.mpi);
  EXPECT_EQ(li.rank, 5);
  EXPECT_EQ(li.world_size, 6);
  EXPECT_EQ(li.local_rank, 2);
  EXPECT_EQ(li.local_world_size, 3);
}

TEST_F(Launch, Mpich) {
  set({{"PMI_RANK", "1"}, {"PMI_SIZE", "4"}, {"MPI_LOCALRANKID", "1"}, {"MPI_LOCALNRANKS", "2"}});
  auto li = detect_launch();
  EXPECT_EQ(li.launcher, "mpirun");
  EXPECT_TRUE(li.mpi);
  EXPECT_EQ(li.rank, 1);
  EXPECT_EQ(li.world_size, 4);
  EXPECT_EQ(li.local_rank, 1);
  EXPECT_EQ(li.local_world_size, 2);
}

TEST_F(Launch, SlurmStep) {
  set({{"SLURM_PROCID", "9"}, {"SLURM_NTASKS", "16"}, {"SLURM_LOCALID", "1"}, {"SLURM_NODEID", "1"},
       {"SLURM_STEP_ID", "0"}, {"SLURM_STEP_TASKS_PER_NODE", "8(x2)"}, {"SLURM_STEP_NODELIST", "gpu[01-04,07],cpu5"}});
  auto li = detect_launch();
  EXPECT_EQ(li.launcher, "slurm");
  EXPECT_FALSE(li.mpi);
  EXPECT_EQ(li.rank, 9);
  EXPECT_EQ(li.world_size, 16);
  EXPECT_EQ(li.local_rank, 1);
  EXPECT_EQ(li.local_world_size, 8);
  EXPECT_EQ(li.master_addr, "gpu01");
  EXPECT_EQ(li.master_port, 29500);
  set({{"MASTER_ADDR", "head"}, {"MASTER_PORT", "1234"}});
  li = detect_launch();
  EXPECT_EQ(li.master_addr, "head");
  EXPECT_EQ(li.master_port, 1234);
}

TEST_F(Launch, SlurmTasksPerNodeFallbacks) {
  set({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_STEP_ID", "3"}, {"SLURM_NTASKS_PER_NODE", "2"},
       {"SLURM_JOB_NODELIST", "a1"}});
  EXPECT_EQ(detect_launch().local_world_size, 2);
  EXPECT_EQ(detect_launch().master_addr, "a1");
  set({{"SLURM_TASKS_PER_NODE", "4"}});  // preferred over SLURM_NTASKS_PER_NODE
  EXPECT_EQ(detect_launch().local_world_size, 4);
}

TEST_F(Launch, SlurmBatchScriptIsOneProcess) {
  // sbatch's script sees SLURM_* too, but no SLURM_STEP_ID: it is not a rank of the job.
  set({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "16"}, {"SLURM_JOB_NODELIST", "gpu[01-02]"}});
  auto li = detect_launch();
  EXPECT_EQ(li.launcher, "none");
  EXPECT_EQ(li.world_size, 1);
}

TEST_F(Launch, Precedence) {
  const std::pair<const char*, const char*> slurm[] = {{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"},
                                                       {"SLURM_STEP_ID", "0"}, {"SLURM_NODELIST", "n1"}};
  for (auto& kv : slurm) setenv(kv.first, kv.second, 1);
  EXPECT_EQ(detect_launch().launcher, "slurm");
  set({{"PMI_RANK", "0"}, {"PMI_SIZE", "3"}});
  EXPECT_EQ(detect_launch().world_size, 3);  // MPICH > Slurm
  set({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "4"}});
  EXPECT_EQ(detect_launch().world_size, 4);  // Open MPI > MPICH
  set({{"RANK", "0"}, {"WORLD_SIZE", "5"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "10"}});
  EXPECT_EQ(detect_launch().launcher, "torchrun");  // torchrun > MPI
  set({{"AUTOMODEL_SUPERVISED", "1"}});
  EXPECT_EQ(detect_launch().launcher, "automodel");
}

TEST_F(Launch, FirstHost) {
  EXPECT_EQ(first_host("gpu[01-04,07],cpu5"), "gpu01");
  EXPECT_EQ(first_host("node7"), "node7");
  EXPECT_EQ(first_host("a,b"), "a");
  EXPECT_EQ(first_host("gpu[7,1-3]"), "gpu7");
  EXPECT_EQ(first_host("rack[2-3]-node[010-012]"), "rack2-node010");
  EXPECT_THROW(first_host("gpu[01-04"), UsageError);
  EXPECT_THROW(first_host(""), UsageError);
}

TEST_F(Launch, TasksOnNode) {
  EXPECT_EQ(tasks_on_node("8", 0, "X"), 8);
  EXPECT_EQ(tasks_on_node("8(x2),4", 1, "X"), 8);
  EXPECT_EQ(tasks_on_node("8(x2),4", 2, "X"), 4);
  EXPECT_EQ(tasks_on_node("2,3(x3)", 3, "X"), 3);
  EXPECT_THROW(tasks_on_node("8(x2),4", 3, "X"), UsageError);
  EXPECT_THROW(tasks_on_node("8(2)", 0, "X"), UsageError);
}

TEST_F(Launch, ErrorMissingMasterAddr) {
  set({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "29500"}});
  EXPECT_NE(error().find("MASTER_ADDR"), std::string::npos);
}

TEST_F(Launch, ErrorMissingMasterPort) {
  set({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}});
  EXPECT_NE(error().find("MASTER_PORT"), std::string::npos);
}

TEST_F(Launch, ErrorNotAnInteger) {
  set({{"RANK", "zero"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}});
  EXPECT_NE(error().find("RANK='zero'"), std::string::npos);
  set({{"RANK", "0"}, {"WORLD_SIZE", "2x"}});
  EXPECT_NE(error().find("WORLD_SIZE='2x'"), std::string::npos);
  set({{"WORLD_SIZE", "2"}, {"MASTER_PORT", "http"}});
  EXPECT_NE(error().find("MASTER_PORT"), std::string::npos);
}

TEST_F(Launch, ErrorRankOutOfRange) {
  set({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}});
  EXPECT_NE(error().find("RANK=2"), std::string::npos);
  unsetenv("RANK");
  unsetenv("WORLD_SIZE");
  set({{"OMPI_COMM_WORLD_RANK", "4"}, {"OMPI_COMM_WORLD_SIZE", "4"}});
  EXPECT_NE(error().find("OMPI_COMM_WORLD_RANK=4"), std::string::npos);
}

TEST_F(Launch, ErrorLocalRankOutOfRange) {
  set({{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
       {"MASTER_PORT", "1"}});
  EXPECT_NE(error().find("LOCAL_RANK=2"), std::string::npos);
  set({{"LOCAL_RANK", "0"}, {"LOCAL_WORLD_SIZE", "0"}});
  EXPECT_NE(error().find("LOCAL_WORLD_SIZE=0"), std::string::npos);
}

TEST_F(Launch, ErrorSlurmLocalId) {
  set({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_STEP_ID", "0"}, {"SLURM_LOCALID", "2"},
       {"SLURM_STEP_TASKS_PER_NODE", "2(x2)"}, {"SLURM_NODELIST", "n[1-2]"}});
  EXPECT_NE(error().find("SLURM_LOCALID=2"), std::string::npos);
}

}  // namespace
