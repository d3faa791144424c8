#pragma once
// Clients of the actor's side of the RL loop: ActorClient (rlhf.v1.ActorService, used by the
// learner's driver, the collector and evaluation) and fetch_learner_weights
// (LearnerService.GetWeights, used by an actor that starts or restarts, to catch up).
//
// Every call has a deadline. Failures are RpcError (common/rpc_error.h) carrying the gRPC status
// code, so a caller can tell an actor that is down or slow (UNAVAILABLE, DEADLINE_EXCEEDED) from
// one that refused the request (INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED).
// This header keeps gRPC out of its includers.
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "actor/weight_transfer.h"
#include "common/rpc_error.h"
#include "rlhf/v1/actor.pb.h"

namespace rlhf {

struct ActorClientOptions {
  // Per attempt, for every call.
  std::chrono::milliseconds deadline = std::chrono::seconds(120);
  // Attempts of an idempotent call (generate, status) that failed with UNAVAILABLE or
  // DEADLINE_EXCEEDED; the waits between them double from initial_backoff.
  int max_attempts = 3;
  std::chrono::milliseconds initial_backoff = std::chrono::milliseconds(200);
};

class ActorClient {
 public:
  // Connects lazily: constructing never fails for an actor that is down.
  explicit ActorClient(std::string address, ActorClientOptions options = {});
  ~ActorClient();
  ActorClient(const ActorClient&) = delete;
  ActorClient& operator=(const ActorClient&) = delete;

  const std::string& address() const;

  // One response per prompt (the whole stream). Generate is idempotent for a seed and policy
  // version, so it is retried on UNAVAILABLE / DEADLINE_EXCEEDED; a retry starts the stream
  // over. Pin the version with request.expect_version if a retry must not land on a newer one.
  std::vector<v1::GenerateResponse> generate(const v1::GenerateRequest& request);

  // Streams `payload` in chunks; returns the version the actor now serves. Never retried: the
  // caller decides (resending is safe, an actor that already applied the version answers
  // FAILED_PRECONDITION "stale version N, serving N").
  uint64_t update_weights(const WeightPayload& payload);

  // Retried like generate.
  v1::ActorStatus status();

  // grpc.health.v1.Health/Check for rlhf.v1.ActorService: true only for SERVING within
  // `timeout`; false for anything else (down, not serving, timed out). Never throws.
  bool healthy(std::chrono::milliseconds timeout);

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

// The learner's current policy, from LearnerService.GetWeights at `learner_address`, checked
// like an upload (size, CRC-32C). While the learner is unreachable (UNAVAILABLE,
// DEADLINE_EXCEEDED) it retries with backoff from options.initial_backoff (doubling, at most
// 5 s), logging "waiting for learner at ADDR", until `wait` has passed; then, and on any other
// failure, RpcError ("learner ADDR: GetWeights failed: ..."). rlhf::Error when the stream does
// not check.
WeightPayload fetch_learner_weights(const std::string& learner_address,
                                    std::chrono::milliseconds wait,
                                    ActorClientOptions options = {});

}  // namespace rlhf
