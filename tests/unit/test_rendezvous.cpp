// TCP rendezvous (dist/rendezvous.h) between forked processes on 127.0.0.1: the blob reaches every
// rank whatever order they start in; a missing peer, a wrong world size or a duplicate rank fail fast
// with messages that name the address, the rank and how many joined.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "dist/rendezvous.h"

namespace am::dist {
namespace {

struct Outcome {
  int code = -1;    // 0 ok, 1 DeviceError, 2 UsageError, 3 wrong blob, 4 other
  std::string msg;  // the exception text
};

// Runs body() in a child process; the child reports through a pipe and _exits (never returns into
// GoogleTest).
struct Child {
  pid_t pid = -1;
  int fd = -1;
};
Child spawn(const std::function<void()>& body, int delay_ms = 0) {
  int p[2];
  EXPECT_EQ(::pipe(p), 0);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(p[0]);
    if (delay_ms) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    int code = 0;
    std::string msg;
    try {
      body();
    } catch (const UsageError& e) {
      code = 2, msg = e.what();
    } catch (const DeviceError& e) {
      code = 1, msg = e.what();
    } catch (const std::exception& e) {
      code = std::strcmp(e.what(), "wrong blob") == 0 ? 3 : 4, msg = e.what();
    }
    if (!msg.empty() && ::write(p[1], msg.data(), msg.size()) < 0) code = 4;
    ::_exit(code);
  }
  ::close(p[1]);
  return {pid, p[0]};
}
Outcome reap(const Child& c) {
  Outcome o;
  char buf[4096];
  ssize_t k;
  while ((k = ::read(c.fd, buf, sizeof buf)) > 0) o.msg.append(buf, static_cast<size_t>(k));
  ::close(c.fd);
  int st = 0;
  ::waitpid(c.pid, &st, 0);
  o.code = WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st);
  return o;
}

std::vector<uint8_t> pattern() {
  std::vector<uint8_t> b(128);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(i * 7 + 3);
  return b;
}

// One rank: rank 0 sends pattern(), the others check they received it.
std::function<void()> rank_body(int port, int rank, int world, double timeout_s) {
  return [=] {
    std::vector<uint8_t> b = rank == 0 ? pattern() : std::vector<uint8_t>(128, 0);
    rendezvous_broadcast("127.0.0.1", port, rank, world, b.data(), b.size(), timeout_s);
    if (b != pattern()) throw std::runtime_error("wrong blob");
  };
}

TEST(Rendezvous, BlobReachesEveryRankInAnyStartOrder) {
  for (int world : {2, 3}) {
    int port = pick_free_port();
    std::vector<Child> kids;
    // Clients first (they retry until rank 0 listens), rank 0 last and late.
    for (int r = world - 1; r >= 1; --r) kids.push_back(spawn(rank_body(port, r, world, 20.0)));
    kids.push_back(spawn(rank_body(port, 0, world, 20.0), 300));
    for (auto& k : kids) {
      Outcome o = reap(k);
      EXPECT_EQ(o.code, 0) << "world " << world << ": " << o.msg;
    }
  }
}

TEST(Rendezvous, HostnameResolves) {
  int port = pick_free_port();
  Child c = spawn([=] {
    std::vector<uint8_t> b(128, 0);
    rendezvous_broadcast("localhost", port, 1, 2, b.data(), b.size(), 20.0);
    if (b != pattern()) throw std::runtime_error("wrong blob");
  });
  auto b = pattern();
  rendezvous_broadcast("localhost", port, 0, 2, b.data(), b.size(), 20.0);
  Outcome o = reap(c);
  EXPECT_EQ(o.code, 0) << o.msg;
}

TEST(Rendezvous, MissingPeerTimesOutNamingAddressAndCount) {
  int port = pick_free_port();
  auto t0 = std::chrono::steady_clock::now();
  Child r0 = spawn(rank_body(port, 0, 3, 1.5));
  Child r1 = spawn(rank_body(port, 1, 3, 1.5));  // rank 2 never comes
  Outcome o0 = reap(r0), o1 = reap(r1);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(secs, 10.0);
  const std::string at = "127.0.0.1:" + std::to_string(port);
  EXPECT_EQ(o0.code, 1) << o0.msg;
  EXPECT_NE(o0.msg.find(at), std::string::npos) << o0.msg;
  EXPECT_NE(o0.msg.find("rank 0"), std::string::npos) << o0.msg;
  EXPECT_NE(o0.msg.find("2 of 3 ranks joined"), std::string::npos) << o0.msg;
  EXPECT_NE(o0.msg.find("missing ranks: 2"), std::string::npos) << o0.msg;
  EXPECT_EQ(o1.code, 1) << o1.msg;  // told by rank 0, or timed out itself
  EXPECT_NE(o1.msg.find("rank 1 of 3"), std::string::npos) << o1.msg;
}

TEST(Rendezvous, NoRankZeroTimesOut) {
  int port = pick_free_port();
  std::vector<uint8_t> b(128);
  auto t0 = std::chrono::steady_clock::now();
  try {
    rendezvous_broadcast("127.0.0.1", port, 1, 2, b.data(), b.size(), 1.0);
    FAIL() << "expected a timeout";
  } catch (const DeviceError& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("127.0.0.1:" + std::to_string(port)), std::string::npos) << m;
    EXPECT_NE(m.find("rank 1 of 2"), std::string::npos) << m;
    EXPECT_NE(m.find("could not reach rank 0"), std::string::npos) << m;
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
}

TEST(Rendezvous, WrongWorldSizeIsAnError) {
  int port = pick_free_port();
  Child r0 = spawn(rank_body(port, 0, 2, 10.0));
  Child r1 = spawn(rank_body(port, 1, 3, 10.0));
  Outcome o0 = reap(r0), o1 = reap(r1);
  EXPECT_EQ(o0.code, 2) << o0.msg;
  EXPECT_NE(o0.msg.find("world size 3 but rank 0 with 2"), std::string::npos) << o0.msg;
  EXPECT_EQ(o1.code, 2) << o1.msg;
  EXPECT_NE(o1.msg.find("rank 0 reports"), std::string::npos) << o1.msg;
}

TEST(Rendezvous, DuplicateRankIsAnError) {
  int port = pick_free_port();
  Child r0 = spawn(rank_body(port, 0, 3, 10.0));
  Child a = spawn(rank_body(port, 1, 3, 10.0));
  Child b = spawn(rank_body(port, 1, 3, 10.0));
  Outcome o0 = reap(r0), oa = reap(a), ob = reap(b);
  EXPECT_EQ(o0.code, 2) << o0.msg;
  EXPECT_NE(o0.msg.find("rank 1 joined twice"), std::string::npos) << o0.msg;
  EXPECT_EQ(oa.code, 2) << oa.msg;
  EXPECT_EQ(ob.code, 2) << ob.msg;
}

TEST(Rendezvous, WorldOneAndBadArguments) {
  std::vector<uint8_t> b(4, 9);
  rendezvous_broadcast("", 0, 0, 1, b.data(), b.size(), 0.1);  // nothing to exchange
  EXPECT_EQ(b[0], 9);
  EXPECT_THROW(rendezvous_broadcast("127.0.0.1", 1234, 2, 2, b.data(), b.size(), 0.1), UsageError);
  EXPECT_THROW(rendezvous_broadcast("127.0.0.1", 0, 1, 2, b.data(), b.size(), 0.1), UsageError);
  EXPECT_THROW(rendezvous_broadcast("", 1234, 1, 2, b.data(), b.size(), 0.1), UsageError);
}

}  // namespace
}  // namespace am::dist
