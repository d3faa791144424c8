#pragma once
// The learner's view of its actors: a RolloutSampler over ActorClients (actor/actor_client.h).
//
// generate() spreads a request's prompts over the actors that are up and runs the parts
// concurrently. An actor that fails with a transient error (down, too slow) is marked down
// and its prompts go to the others; with none up, the pool waits with a log line every few
// seconds and probes them, up to a limit. An actor that comes back is brought to the current
// policy version (UpdateWeights) before it gets work again, and so is an actor that answers
// FAILED_PRECONDITION because it serves another version. Samples do not depend on which actor
// made them (the actor's seed rule), so failover changes timing, not results.
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "actor/actor_client.h"
#include "learner/rl_trainer.h"

namespace rlhf {

struct ActorPoolOptions {
  // How long generate() waits for at least one actor before giving up with an error.
  std::chrono::seconds wait_for_actors{600};
  std::chrono::milliseconds probe_timeout{1000};
  ActorClientOptions client;
};

class ActorPool : public RolloutSampler {
 public:
  explicit ActorPool(const std::vector<std::string>& addresses, ActorPoolOptions options = {});
  ~ActorPool() override;

  std::vector<v1::GenerateResponse> generate(const v1::GenerateRequest& request) override;
  void publish(const WeightPayload& payload) override;

  // Actors currently marked up, for logs and tests.
  std::vector<std::string> up() const;

 private:
  struct Actor {
    std::string address;
    std::unique_ptr<ActorClient> client;
    bool up = true;
  };
  // Brings one actor to the current version; false (and marked down) if it cannot be reached.
  bool catch_up(Actor& actor);
  // Probes the actors marked down; those that answer are caught up and marked up.
  void probe_down_actors();

  ActorPoolOptions options_;
  std::vector<Actor> actors_;
  std::shared_ptr<const WeightPayload> current_;
  mutable std::mutex mutex_;  // guards the up flags (generate's worker threads mark actors down)
};

}  // namespace rlhf
