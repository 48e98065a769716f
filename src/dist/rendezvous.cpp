// TCP rendezvous (see rendezvous.h for the protocol). Plain POSIX sockets, blocking I/O where every read
// or write is preceded by a poll() bounded by the one deadline of the call, so no wait can outlive it.
#include "dist/rendezvous.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"

namespace am::dist {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kMagic = 0x414d5256;  // "AMRV": tells our peers from a stray connection
constexpr uint32_t kVersion = 1;
// Message kinds after the hello (server -> client: blob or error; client -> server: ack; server: go).
constexpr uint32_t kBlob = 1, kErrDevice = 2, kErrUsage = 3, kAck = 4, kGo = 5;

struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& o) noexcept : fd(o.fd) { o.fd = -1; }
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd = o.fd;
      o.fd = -1;
    }
    return *this;
  }
  ~Fd() { reset(); }
  void reset() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
};

struct Deadline {
  Clock::time_point end;
  explicit Deadline(double s)
      : end(Clock::now() + std::chrono::microseconds(static_cast<int64_t>(std::max(0.0, s) * 1e6))) {}
  int remaining_ms() const {
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now()).count();
    return static_cast<int>(std::clamp<int64_t>(ms, 0, 1 << 30));
  }
  bool passed() const { return Clock::now() >= end; }
};

enum class Io { Ok, Timeout, Closed, Error };

// Waits until `fd` is ready for `events` or the deadline passes (EINTR restarts the wait).
Io wait_fd(int fd, short events, const Deadline& dl) {
  for (;;) {
    pollfd p{fd, events, 0};
    int r = ::poll(&p, 1, dl.remaining_ms());
    if (r > 0) return Io::Ok;  // readable, writable, or hung up: the following recv/send says which
    if (r == 0) return Io::Timeout;
    if (errno != EINTR) return Io::Error;
  }
}

Io send_all(int fd, const void* buf, size_t n, const Deadline& dl) {
  auto* p = static_cast<const char*>(buf);
  while (n > 0) {
    if (Io w = wait_fd(fd, POLLOUT, dl); w != Io::Ok) return w;
    ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);  // a closed peer gives EPIPE, not SIGPIPE
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return errno == EPIPE || errno == ECONNRESET ? Io::Closed : Io::Error;
    }
    p += k;
    n -= static_cast<size_t>(k);
  }
  return Io::Ok;
}

Io recv_all(int fd, void* buf, size_t n, const Deadline& dl) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    if (Io w = wait_fd(fd, POLLIN, dl); w != Io::Ok) return w;
    ssize_t k = ::recv(fd, p, n, 0);
    if (k == 0) return Io::Closed;
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return errno == ECONNRESET ? Io::Closed : Io::Error;
    }
    p += k;
    n -= static_cast<size_t>(k);
  }
  return Io::Ok;
}

// Big-endian fields, so mixed hosts agree on the wire.
void put32(std::vector<uint8_t>& b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(v >> s));
}
void put64(std::vector<uint8_t>& b, uint64_t v) {
  put32(b, static_cast<uint32_t>(v >> 32));
  put32(b, static_cast<uint32_t>(v));
}
uint32_t get32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}
uint64_t get64(const uint8_t* p) { return (uint64_t(get32(p)) << 32) | get32(p + 4); }

// hello: magic, version, rank, world, blob bytes (24 bytes).
constexpr size_t kHelloBytes = 24;
// header of every later message: magic, kind, payload bytes (16 bytes), then the payload.
constexpr size_t kHeaderBytes = 16;

std::vector<uint8_t> header(uint32_t kind, uint64_t len) {
  std::vector<uint8_t> b;
  put32(b, kMagic);
  put32(b, kind);
  put64(b, len);
  return b;
}

Io send_msg(int fd, uint32_t kind, const void* payload, size_t len, const Deadline& dl) {
  auto b = header(kind, len);
  b.insert(b.end(), static_cast<const uint8_t*>(payload), static_cast<const uint8_t*>(payload) + len);
  return send_all(fd, b.data(), b.size(), dl);
}

std::string where(const std::string& addr, int port) { return addr + ":" + std::to_string(port); }

std::string secs(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", s);
  return buf;
}

// Listening socket on every interface: IPv6 dual-stack when the host has IPv6, else IPv4. Binding the
// wildcard (not master_addr) is what torchrun does: master_addr may name an address of another
// interface, or resolve to 127.0.1.1 on rank 0's own host.
Fd listen_on(int port, int backlog, std::string* err) {
  for (int family : {AF_INET6, AF_INET}) {
    Fd s(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (s.fd < 0) continue;
    int one = 1, zero = 0;
    ::setsockopt(s.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);  // rebind right after a previous job
    int rc;
    if (family == AF_INET6) {
      ::setsockopt(s.fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
      sockaddr_in6 a{};
      a.sin6_family = AF_INET6;
      a.sin6_addr = in6addr_any;
      a.sin6_port = htons(static_cast<uint16_t>(port));
      rc = ::bind(s.fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    } else {
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_ANY);
      a.sin_port = htons(static_cast<uint16_t>(port));
      rc = ::bind(s.fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    }
    if (rc == 0 && ::listen(s.fd, std::max(backlog, 16)) == 0) return s;
    *err = std::strerror(errno);
    if (errno == EADDRINUSE) break;  // the port is taken on both families: no point trying IPv4
  }
  return Fd();
}

// One non-blocking connect attempt to each address of master_addr, bounded by `attempt_ms`.
Fd try_connect(const std::string& addr, int port, int attempt_ms, std::string* err) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  std::string service = std::to_string(port);
  if (int g = ::getaddrinfo(addr.c_str(), service.c_str(), &hints, &res); g != 0) {
    *err = std::string("cannot resolve '") + addr + "': " + gai_strerror(g);
    return Fd();
  }
  Fd out;
  for (addrinfo* ai = res; ai && out.fd < 0; ai = ai->ai_next) {
    Fd s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (s.fd < 0) {
      *err = std::strerror(errno);
      continue;
    }
    int flags = ::fcntl(s.fd, F_GETFL, 0);
    ::fcntl(s.fd, F_SETFL, flags | O_NONBLOCK);
    int rc = ::connect(s.fd, ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd p{s.fd, POLLOUT, 0};
      rc = ::poll(&p, 1, attempt_ms) == 1 ? 0 : -1;
      int so = ETIMEDOUT;
      socklen_t len = sizeof so;
      if (rc == 0) ::getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &so, &len);
      if (rc != 0 || so != 0) {
        errno = so;
        rc = -1;
      }
    }
    if (rc != 0) {
      *err = std::strerror(errno);
      continue;
    }
    ::fcntl(s.fd, F_SETFL, flags);  // back to blocking: every later call polls first
    int one = 1;
    ::setsockopt(s.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    out = std::move(s);
  }
  ::freeaddrinfo(res);
  return out;
}

// ---- rank 0 ----
void serve(const std::string& addr, int port, int world, void* blob, size_t bytes, double timeout_s) {
  Deadline dl(timeout_s);
  const std::string at = where(addr, port);
  std::string err;
  Fd lst = listen_on(port, world, &err);
  if (lst.fd < 0)
    throw DeviceError("rendezvous: rank 0 cannot listen on port " + std::to_string(port) + " (" + err +
                      "); is another job using MASTER_PORT " + std::to_string(port) + "?");

  std::vector<Fd> peers(static_cast<size_t>(world));  // peers[r]: rank r's connection (r >= 1)
  int joined = 1;                                     // rank 0 itself
  // Tells every connected rank why the rendezvous failed (so they fail now, not at their own
  // deadline), then throws on rank 0.
  auto fail = [&](uint32_t kind, const std::string& msg) {
    Deadline grace(0.5);
    for (auto& p : peers)
      if (p.fd >= 0) send_msg(p.fd, kind, msg.data(), msg.size(), grace);
    if (kind == kErrUsage) throw UsageError(msg);
    throw DeviceError(msg);
  };
  auto missing = [&] {
    std::string m;
    for (int r = 1; r < world; ++r)
      if (peers[r].fd < 0) m += (m.empty() ? "" : ", ") + std::to_string(r);
    return m;
  };
  auto timeout_msg = [&](const std::string& what) {
    return "rendezvous at " + at + " (rank 0 of " + std::to_string(world) + "): timed out after " +
           secs(timeout_s) + " " + what + " with " + std::to_string(joined) + " of " + std::to_string(world) +
           " ranks joined (missing ranks: " + missing() + ")";
  };

  while (joined < world) {
    Io w = wait_fd(lst.fd, POLLIN, dl);
    if (w == Io::Timeout) fail(kErrDevice, timeout_msg("waiting for ranks to connect"));
    if (w != Io::Ok) fail(kErrDevice, "rendezvous at " + at + ": poll failed: " + std::strerror(errno));
    Fd c(::accept4(lst.fd, nullptr, nullptr, SOCK_CLOEXEC));
    if (c.fd < 0) continue;  // the peer gave up between poll and accept
    uint8_t h[kHelloBytes];
    Io r = recv_all(c.fd, h, sizeof h, dl);
    if (r == Io::Timeout) fail(kErrDevice, timeout_msg("reading a rank's hello"));
    if (r != Io::Ok || get32(h) != kMagic) continue;  // a stray connection (port scanner, health check)
    uint32_t version = get32(h + 4);
    int rank = static_cast<int>(get32(h + 8)), their_world = static_cast<int>(get32(h + 12));
    uint64_t their_bytes = get64(h + 16);
    std::string bad;
    if (version != kVersion)
      bad = "rank " + std::to_string(rank) + " speaks rendezvous version " + std::to_string(version) +
            ", rank 0 version " + std::to_string(kVersion) + " (different automodel builds?)";
    else if (their_world != world)
      bad = "rank " + std::to_string(rank) + " was started with world size " + std::to_string(their_world) +
            " but rank 0 with " + std::to_string(world);
    else if (rank <= 0 || rank >= world)
      bad = "a process joined with rank " + std::to_string(rank) + ", outside 1.." + std::to_string(world - 1);
    else if (peers[rank].fd >= 0)
      bad = "rank " + std::to_string(rank) + " joined twice (two processes share one rank)";
    else if (their_bytes != bytes)
      bad = "rank " + std::to_string(rank) + " expects a " + std::to_string(their_bytes) + "-byte blob, rank 0 has " +
            std::to_string(bytes);
    if (!bad.empty()) {
      std::string msg = "rendezvous at " + at + ": " + bad;
      send_msg(c.fd, kErrUsage, msg.data(), msg.size(), Deadline(0.5));
      fail(kErrUsage, msg);
    }
    peers[rank] = std::move(c);
    ++joined;
  }

  // Everyone is here: hand out the blob, collect the acks, then release everyone at once.
  for (int r = 1; r < world; ++r)
    if (send_msg(peers[r].fd, kBlob, blob, bytes, dl) != Io::Ok)
      fail(kErrDevice, "rendezvous at " + at + ": rank " + std::to_string(r) + " dropped out before getting the blob");
  for (int r = 1; r < world; ++r) {
    uint8_t a[kHeaderBytes];
    Io io = recv_all(peers[r].fd, a, sizeof a, dl);
    if (io == Io::Timeout)
      fail(kErrDevice, "rendezvous at " + at + " (rank 0): timed out after " + secs(timeout_s) +
                           " waiting for rank " + std::to_string(r) + " to acknowledge the blob");
    if (io != Io::Ok || get32(a) != kMagic || get32(a + 4) != kAck)
      fail(kErrDevice, "rendezvous at " + at + ": rank " + std::to_string(r) + " dropped out before acknowledging");
  }
  for (int r = 1; r < world; ++r)
    if (send_msg(peers[r].fd, kGo, nullptr, 0, dl) != Io::Ok)
      throw DeviceError("rendezvous at " + at + ": rank " + std::to_string(r) + " dropped out at the final barrier");
}

// ---- ranks 1.. ----
void join(const std::string& addr, int port, int rank, int world, void* blob, size_t bytes, double timeout_s) {
  Deadline dl(timeout_s);
  const std::string who = "rendezvous at " + where(addr, port) + " (rank " + std::to_string(rank) + " of " +
                          std::to_string(world) + ")";
  // Rank 0 may start later than us: retry with exponential backoff (50 ms .. 1 s) until the deadline.
  Fd s;
  std::string err = "no attempt made";
  for (int backoff_ms = 50;;) {
    s = try_connect(addr, port, std::max(1, std::min(dl.remaining_ms(), 2000)), &err);
    if (s.fd >= 0) break;
    if (dl.passed())
      throw DeviceError(who + ": could not reach rank 0 within " + secs(timeout_s) + " (last error: " + err +
                        "); is rank 0 running and are MASTER_ADDR / MASTER_PORT right?");
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min(backoff_ms, dl.remaining_ms())));
    backoff_ms = std::min(backoff_ms * 2, 1000);
  }

  std::vector<uint8_t> hello;
  put32(hello, kMagic);
  put32(hello, kVersion);
  put32(hello, static_cast<uint32_t>(rank));
  put32(hello, static_cast<uint32_t>(world));
  put64(hello, bytes);
  if (send_all(s.fd, hello.data(), hello.size(), dl) != Io::Ok)
    throw DeviceError(who + ": rank 0 closed the connection before the hello was sent");

  // Reads one message of rank 0; an error message from rank 0 is rethrown here with its text.
  auto expect = [&](uint32_t kind, void* payload, size_t len, const char* waiting_for) {
    uint8_t h[kHeaderBytes];
    Io io = recv_all(s.fd, h, sizeof h, dl);
    if (io == Io::Timeout)
      throw DeviceError(who + ": connected to rank 0 but timed out after " + secs(timeout_s) + " waiting for " +
                        waiting_for + " (not every rank joined?)");
    if (io != Io::Ok)
      throw DeviceError(who + ": rank 0 closed the connection while we waited for " + waiting_for +
                        " (did rank 0 fail?)");
    if (get32(h) != kMagic)
      throw DeviceError(who + ": the process at that port does not speak the automodel rendezvous");
    uint32_t k = get32(h + 4);
    uint64_t n = get64(h + 8);
    if (k == kErrDevice || k == kErrUsage) {
      std::string msg(std::min<uint64_t>(n, 4096), '\0');
      recv_all(s.fd, msg.data(), msg.size(), Deadline(0.5));
      msg = who + ": rank 0 reports: " + msg;
      if (k == kErrUsage) throw UsageError(msg);
      throw DeviceError(msg);
    }
    if (k != kind || n != len) throw DeviceError(who + ": unexpected message from rank 0");
    if (len && recv_all(s.fd, payload, len, dl) != Io::Ok)
      throw DeviceError(who + ": the connection to rank 0 broke while receiving " + waiting_for);
  };
  expect(kBlob, blob, bytes, "the blob");
  auto ack = header(kAck, 0);
  if (send_all(s.fd, ack.data(), ack.size(), dl) != Io::Ok)
    throw DeviceError(who + ": rank 0 closed the connection before our acknowledgement");
  expect(kGo, nullptr, 0, "the final barrier");
}

}  // namespace

void rendezvous_broadcast(const std::string& master_addr, int port, int rank, int world, void* blob,
                          size_t bytes, double timeout_s) {
  if (world < 1 || rank < 0 || rank >= world)
    throw UsageError("rendezvous: rank " + std::to_string(rank) + " is outside world size " + std::to_string(world));
  if (world == 1) return;
  if (port <= 0 || port > 65535)
    throw UsageError("rendezvous: MASTER_PORT " + std::to_string(port) + " is not a TCP port (1..65535)");
  if (rank != 0 && master_addr.empty())
    throw UsageError("rendezvous: rank " + std::to_string(rank) + " needs MASTER_ADDR (rank 0's host)");
  if (rank == 0)
    serve(master_addr.empty() ? "0.0.0.0" : master_addr, port, world, blob, bytes, timeout_s);
  else
    join(master_addr, port, rank, world, blob, bytes, timeout_s);
}

int pick_free_port() {
  Fd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = 0;  // the kernel picks a free ephemeral port
  socklen_t len = sizeof a;
  if (s.fd < 0 || ::bind(s.fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(s.fd, reinterpret_cast<sockaddr*>(&a), &len) != 0)
    throw DeviceError(std::string("pick_free_port: ") + std::strerror(errno));
  return ntohs(a.sin_port);
}

}  // namespace am::dist
