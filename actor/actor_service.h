#pragma once
// The actor service: an ActorEngine (actor/actor_engine.h) behind gRPC, rlhf.v1.ActorService
// (proto/rlhf/v1/actor.proto), with the standard health service and server reflection on.
//
// Generate: the request is checked on gRPC's thread (a malformed one gets INVALID_ARGUMENT
// naming the field; expect_version other than the served version FAILED_PRECONDITION) and
// queued for the engine's worker, which streams one GenerateResponse per prompt.
// UpdateWeights: chunks are assembled and checked as they arrive (WeightAssembler); a stale
// version is refused at the first chunk (FAILED_PRECONDITION: "stale version N, serving M"); a
// size or CRC-32C mismatch, an unreadable checkpoint or another architecture is
// INVALID_ARGUMENT; a cancelled upload is dropped. Only a fully verified payload is loaded, on
// a thread of its own while generation goes on, and swapped in (ActorEngine::apply_weights).
// Status: ActorStatus counters. This header keeps gRPC out of its includers.
#include <cstdint>
#include <memory>
#include <string>

#include "actor/actor_engine.h"

namespace rlhf {

struct ActorServiceLimits {
  int max_prompts = 256;       // Generate: prompts per request
  int max_n = 64;              // Generate: samples per prompt
  int max_text_bytes = 1024;   // Generate: each prompt's text
  int max_queued = 256;        // Generate calls waiting or running; beyond it RESOURCE_EXHAUSTED
  uint64_t max_weight_bytes = 1ull << 30;  // UpdateWeights: the payload's total_bytes
};

class ActorServer {
 public:
  // Starts serving at once and tells `engine` its address (for Rollout.actor). `listen_address`
  // is host:port; port 0 picks a free port (see port()). The default listens on loopback only.
  // rlhf::Error when the address cannot be bound. `engine` must outlive the server.
  explicit ActorServer(ActorEngine& engine, std::string listen_address = "127.0.0.1:0",
                       ActorServiceLimits limits = {});
  ~ActorServer();  // shutdown()
  ActorServer(const ActorServer&) = delete;
  ActorServer& operator=(const ActorServer&) = delete;

  // The port actually bound (the chosen one when the address asked for port 0).
  int port() const;
  // Blocks until shutdown() has finished.
  void wait();
  // Health turns NOT_SERVING, new calls are refused, queued Generate calls are cancelled (the
  // prompt being generated is finished), a weight update being loaded completes and one still
  // waiting to load is dropped. Safe to call more than once and from any thread.
  void shutdown();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace rlhf
