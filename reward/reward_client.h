#pragma once
// A client of rlhf.v1.RewardService (reward/reward_service.h) for the learner and the tools.
// Every call has a deadline; Score is idempotent for a seed, so transient failures
// (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED from a full queue) are retried with
// exponential backoff. Requests larger than the server's item limit are split, and the parts'
// results joined in order. Failures are rlhf::RpcError (common/rpc_error.h). gRPC stays out of
// this header.
#include <chrono>
#include <memory>
#include <string>

#include "rlhf/v1/reward.pb.h"

namespace rlhf {

struct RewardClientOptions {
  // Judging a full request on two CPU cores takes seconds; this bounds a stuck server.
  std::chrono::milliseconds deadline{300000};
  int max_attempts = 4;
  std::chrono::milliseconds initial_backoff{200};
  int max_items_per_call = 64;  // RewardServiceLimits::max_items of the server
};

class RewardClient {
 public:
  explicit RewardClient(std::string address, RewardClientOptions options = {});
  ~RewardClient();
  RewardClient(const RewardClient&) = delete;
  RewardClient& operator=(const RewardClient&) = delete;

  v1::ScoreResponse score(const v1::ScoreRequest& request);
  v1::CompareResponse compare(const v1::CompareRequest& request);
  // Split into parts of at most max_items_per_call items like score().
  v1::CompareBatchResponse compare_batch(const v1::CompareBatchRequest& request);
  // The server accepts a connection within `timeout` (a reachability probe for waiting on a
  // service that is starting).
  bool reachable(std::chrono::milliseconds timeout);
  const std::string& address() const { return address_; }

 private:
  class Impl;
  std::string address_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace rlhf
