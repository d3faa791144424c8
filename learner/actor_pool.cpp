#include "learner/actor_pool.h"

#include <future>
#include <thread>

#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/rpc_error.h"

namespace rlhf {

ActorPool::ActorPool(const std::vector<std::string>& addresses, ActorPoolOptions options)
    : options_(options) {
  if (addresses.empty()) fail("the learner needs at least one actor address");
  // The pool does its own failover; a client retrying a dead actor would only delay it.
  options_.client.max_attempts = 1;
  for (const std::string& address : addresses)
    actors_.push_back(Actor{address, std::make_unique<ActorClient>(address, options_.client), true});
}

ActorPool::~ActorPool() = default;

std::vector<std::string> ActorPool::up() const {
  std::lock_guard lock(mutex_);
  std::vector<std::string> out;
  for (const Actor& a : actors_)
    if (a.up) out.push_back(a.address);
  return out;
}

bool ActorPool::catch_up(Actor& actor) {
  try {
    const v1::ActorStatus status = actor.client->status();
    if (current_ && status.version() < current_->version) {
      spdlog::debug("actor {}: serves version {}, sending version {}", actor.address,
                   status.version(), current_->version);
      actor.client->update_weights(*current_);
    } else if (current_ && status.version() > current_->version) {
      // A learner restarted from an older checkpoint redoes steps from the store; it needs
      // fresh samples only from versions the actor already has (see RlTrainer).
      spdlog::info("actor {}: serves version {}, ahead of the learner's {}", actor.address,
                   status.version(), current_->version);
    }
    std::lock_guard lock(mutex_);
    actor.up = true;
    return true;
  } catch (const RpcError& e) {
    if (!e.transient()) throw;
    std::lock_guard lock(mutex_);
    if (actor.up) spdlog::warn("actor {} is down: {}", actor.address, e.what());
    actor.up = false;
    return false;
  }
}

void ActorPool::probe_down_actors() {
  for (Actor& actor : actors_) {
    bool down;
    {
      std::lock_guard lock(mutex_);
      down = !actor.up;
    }
    if (down && actor.client->healthy(options_.probe_timeout) && catch_up(actor))
      spdlog::info("actor {} is back", actor.address);
  }
}

void ActorPool::publish(const WeightPayload& payload) {
  current_ = std::make_shared<const WeightPayload>(payload);
  for (Actor& actor : actors_) {
    bool up;
    {
      std::lock_guard lock(mutex_);
      up = actor.up;
    }
    if (up) catch_up(actor);  // a down actor gets the version when it comes back
  }
}

std::vector<v1::GenerateResponse> ActorPool::generate(const v1::GenerateRequest& request) {
  std::vector<v1::GenerateResponse> results;
  std::vector<int> pending(size_t(request.prompts_size()));
  for (int i = 0; i < request.prompts_size(); ++i) pending[size_t(i)] = i;
  const auto wait_start = std::chrono::steady_clock::now();
  auto last_wait_log = wait_start - std::chrono::hours(1);
  int version_refusals = 0;
  while (!pending.empty()) {
    probe_down_actors();
    std::vector<Actor*> up_actors;
    {
      std::lock_guard lock(mutex_);
      for (Actor& a : actors_)
        if (a.up) up_actors.push_back(&a);
    }
    if (up_actors.empty()) {
      const auto now = std::chrono::steady_clock::now();
      if (now - wait_start > options_.wait_for_actors) {
        fail("no actor reachable for {} s (tried {} actor(s)); giving up",
             options_.wait_for_actors.count(), actors_.size());
      }
      if (now - last_wait_log > std::chrono::seconds(5)) {
        std::string names;
        for (const Actor& a : actors_) names += (names.empty() ? "" : ", ") + a.address;
        spdlog::warn("waiting for actors: none of [{}] is reachable", names);
        last_wait_log = now;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      continue;
    }
    // Contiguous shares, one per actor that is up.
    std::vector<std::vector<int>> shares(up_actors.size());
    for (size_t i = 0; i < pending.size(); ++i)
      shares[i * up_actors.size() / pending.size()].push_back(pending[i]);
    std::vector<std::future<std::vector<v1::GenerateResponse>>> futures;
    for (size_t a = 0; a < up_actors.size(); ++a) {
      v1::GenerateRequest part = request;
      part.clear_prompts();
      for (int i : shares[a]) *part.add_prompts() = request.prompts(i);
      futures.push_back(std::async(std::launch::async, [client = up_actors[a]->client.get(),
                                                        part = std::move(part)] {
        return part.prompts_size() ? client->generate(part) : std::vector<v1::GenerateResponse>{};
      }));
    }
    pending.clear();
    for (size_t a = 0; a < up_actors.size(); ++a) {
      try {
        for (v1::GenerateResponse& r : futures[a].get()) results.push_back(std::move(r));
      } catch (const RpcError& e) {
        if (e.code() == RpcError::kFailedPrecondition) {
          // Serves another version (e.g. it restarted from its checkpoint): catch it up and
          // give its prompts out again.
          spdlog::warn("actor {}: {}; catching it up", up_actors[a]->address, e.detail());
          if (++version_refusals > 3 * int(actors_.size())) {
            fail("actor {} keeps refusing version {}: {} (was it started from another "
                 "checkpoint than rl.policy?)",
                 up_actors[a]->address, request.expect_version(), e.detail());
          }
          catch_up(*up_actors[a]);
        } else if (e.transient()) {
          std::lock_guard lock(mutex_);
          up_actors[a]->up = false;
          spdlog::warn("actor {} failed ({}); its {} prompt(s) go to the other actors",
                       up_actors[a]->address, e.what(), shares[a].size());
        } else {
          throw;
        }
        pending.insert(pending.end(), shares[a].begin(), shares[a].end());
      }
    }
  }
  return results;
}

}  // namespace rlhf
