// SPEC §4 preemption: SIGTERM, SIGINT, SIGUSR1 (Slurm's warning) and SIGHUP make the run finish its current
// step, write a checkpoint and return normally; `restore_from: LATEST` then continues with exactly the numbers
// of the uninterrupted run (bitwise on CPU).
#include <gtest/gtest.h>

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "config/recipe.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace am;

namespace {

fs::path fixture() { return fs::path(AM_SOURCE_DIR) / "tests/fixtures/golden/llama_yarn_sched"; }

fs::path fresh(const std::string& name) {
  fs::path d = fs::path(AM_BINARY_DIR) / "test_out" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

int lines(const fs::path& p) {
  std::ifstream f(p);
  int n = 0;
  std::string l;
  while (std::getline(f, l)) ++n;
  return n;
}

// Long enough (16 steps over 4 epochs) that the signal, sent once 3 steps are logged, lands mid-run.
std::vector<std::string> recipe_overrides(const fs::path& ck) {
  return {"checkpoint.checkpoint_dir=" + ck.string(), "dataloader.shuffle=true", "step_scheduler.num_epochs=4",
          "step_scheduler.max_steps=16", "checkpoint.save_consolidated=false"};
}

class Preemption : public ::testing::TestWithParam<int> {};

TEST_P(Preemption, SignalSavesAndResumeGivesTheUninterruptedNumbers) {
  const int sig = GetParam();
  // Outside train() the signal must not kill the test binary if the sender thread is late: ignore it there
  // (train() installs its own handler and restores this one).
  struct sigaction quiet {}, old {};
  quiet.sa_handler = [](int) {};
  sigemptyset(&quiet.sa_mask);
  sigaction(sig, &quiet, &old);
  const fs::path a = fresh("preempt_straight_" + std::to_string(sig)), b = fresh("preempt_split_" + std::to_string(sig));
  std::vector<StepStats> straight, first, second;
  {
    Recipe r = Recipe::load((fixture() / "recipe.yaml").string(), recipe_overrides(a));
    straight = Trainer(r, {.quiet = true}).train();
  }
  ASSERT_EQ(straight.size(), 16u);
  {
    Recipe r = Recipe::load((fixture() / "recipe.yaml").string(), recipe_overrides(b));
    Trainer t(r, {.quiet = true});
    std::atomic<bool> done{false};
    std::thread sender([&] {
      while (!done && lines(b / "training.jsonl") < 3) std::this_thread::sleep_for(std::chrono::microseconds(200));
      if (!done) kill(getpid(), sig);
    });
    first = t.train();
    done = true;
    sender.join();
  }
  ASSERT_GE(first.size(), 3u);
  ASSERT_LT(first.size(), 16u) << "the signal did not stop the run";
  const size_t stopped = first.size();
  ASSERT_TRUE(fs::is_symlink(b / "LATEST"));
  EXPECT_EQ(fs::read_symlink(b / "LATEST").string(),
            "epoch_" + std::to_string((stopped - 1) / 4) + "_step_" + std::to_string(stopped));
  {
    auto ov = recipe_overrides(b);
    ov.push_back("checkpoint.restore_from=LATEST");
    Recipe r = Recipe::load((fixture() / "recipe.yaml").string(), ov);
    second = Trainer(r, {.quiet = true}).train();
  }
  ASSERT_EQ(stopped + second.size(), 16u);
  for (size_t i = 0; i < second.size(); ++i) {
    EXPECT_EQ(second[i].step, straight[stopped + i].step);
    EXPECT_EQ(second[i].loss, straight[stopped + i].loss) << "step " << second[i].step;
    EXPECT_EQ(second[i].grad_norm, straight[stopped + i].grad_norm) << "step " << second[i].step;
  }
  EXPECT_EQ(lines(b / "training.jsonl"), 16);
  sigaction(sig, &old, nullptr);
}

INSTANTIATE_TEST_SUITE_P(Signals, Preemption, ::testing::Values(SIGTERM, SIGINT, SIGUSR1, SIGHUP),
                         [](const auto& info) { return std::string(sigabbrev_np(info.param)); });

}  // namespace
