#pragma once
// The learner service: rlhf.v1.LearnerService (proto/rlhf/v1/learner.proto) over a running
// RlTrainer, with the standard health service and reflection. Status, Checkpoint and Stop
// control the run; GetWeights streams the current policy version, so an actor that starts (or
// restarts) after the learner can catch up on its own.
//
// These are a handful of control calls per run, and Checkpoint waits for the training step in
// progress to end; the synchronous gRPC API (one pool thread per call in flight) fits that
// better than the callback API the data-path services use. gRPC stays out of this header.
#include <memory>
#include <string>

#include "learner/rl_trainer.h"

namespace rlhf {

class LearnerServer {
 public:
  // Starts serving at once on `listen_address` (host:port; port 0 picks a free one, see
  // port()). rlhf::Error when it cannot bind. `trainer` must outlive the server.
  explicit LearnerServer(RlTrainer& trainer, std::string listen_address = "127.0.0.1:0");
  ~LearnerServer();  // shutdown()
  LearnerServer(const LearnerServer&) = delete;
  LearnerServer& operator=(const LearnerServer&) = delete;

  int port() const;
  // Health turns NOT_SERVING and the server stops; calls in flight are cancelled.
  void shutdown();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace rlhf
