// The one home-made piece of the distributed stack (DESIGN.md "Distributed"): a TCP exchange that hands a
// small blob (NCCL's 128-byte ncclUniqueId) from rank 0 to every rank when MPI is not there, as llm.c's
// tcp path and torchrun's store do. Protocol (docs/distributed_comm.md):
//   rank 0 listens on `port` (all interfaces, SO_REUSEADDR) and accepts world-1 connections;
//   every other rank connects to master_addr:port, retrying with backoff until the deadline, and sends
//     hello {magic, version, rank, world, blob bytes};
//   rank 0 rejects a duplicate rank, a rank out of range, a different world size or blob size (it tells
//     every connected rank why, then throws); once all world-1 ranks joined it sends each the blob;
//   each rank acks; after every ack rank 0 sends "go" (a barrier: nobody returns before all have the blob).
// Every wait is bounded by one deadline (timeout_s from the call); a timeout throws am::DeviceError naming
// master_addr:port, the rank and, on rank 0, how many ranks joined.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace am::dist {

// Collective over `world` processes. Rank 0 sends `blob` [bytes]; every other rank receives into it.
// world 1 returns at once. Throws DeviceError on timeout / protocol error, UsageError on bad arguments.
void rendezvous_broadcast(const std::string& master_addr, int port, int rank, int world, void* blob,
                          size_t bytes, double timeout_s);

// A TCP port that was free on this host a moment ago (bind to port 0, read it back, close): for tests and
// for a supervisor that starts every worker on one machine.
int pick_free_port();

}  // namespace am::dist
