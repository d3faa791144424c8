#pragma once
// The reward service: a Judge (reward/judge.h) behind gRPC, rlhf.v1.RewardService
// (proto/rlhf/v1/reward.proto), with the standard health service and server reflection on.
//
// Requests are checked before they reach the judge; a malformed one is answered with
// INVALID_ARGUMENT naming the bad field, and the server goes on serving. Judging runs on one
// worker thread that owns the judge (Judge is not thread-safe), in arrival order; gRPC's own
// threads only check requests and queue them, so a bad request is answered at once even while
// the judge is busy. This header keeps gRPC out of its includers.
#include <memory>
#include <string>

#include "reward/judge.h"

namespace rlhf {

struct RewardServiceLimits {
  int max_items = 64;             // Score and CompareBatch: items per request
  int max_text_bytes = 1024;      // each prompt, response and reference
  int max_queued_requests = 256;  // waiting for the judge; beyond it RESOURCE_EXHAUSTED
};

// The checks a Compare or CompareBatch pair gets before it is queued for the judge: non-empty
// prompt and responses, every text within limits.max_text_bytes, and a judge prompt that fits
// the judge model's context. rlhf::Error naming the field, prefixed by `field` ("" for Compare,
// "items[3]." for CompareBatch). Callers that batch pairs use it to keep one bad pair from
// failing a whole request.
void check_pairwise_request(const PairwiseRequest& request, const std::string& field,
                            const Judge& judge, const RewardServiceLimits& limits);

class RewardServer {
 public:
  // Starts serving at once. `listen_address` is host:port; port 0 picks a free port (see
  // port()). The default listens on loopback only. rlhf::Error when the address cannot be
  // bound. `judge` must outlive the server.
  explicit RewardServer(Judge& judge, std::string listen_address = "127.0.0.1:0",
                        RewardServiceLimits limits = {});
  ~RewardServer();  // shutdown()
  RewardServer(const RewardServer&) = delete;
  RewardServer& operator=(const RewardServer&) = delete;

  // The port actually bound (the chosen one when the address asked for port 0).
  int port() const;
  // Blocks until shutdown() has finished.
  void wait();
  // Health turns NOT_SERVING, new calls are refused, calls still waiting for the judge are
  // cancelled, the one being judged is finished. Safe to call more than once and from any
  // thread (e.g. a signal-handling thread while another one is in wait()).
  void shutdown();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace rlhf
