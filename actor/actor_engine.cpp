#include "actor/actor_engine.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <sstream>
#include <unordered_set>
#include <utility>

#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/utf8.h"
#include "common/rng.h"
#include "kernels/backend.h"

namespace rlhf {

// One servable version: its own backend instance, model and Generator. Only the worker thread
// generates with it; apply_weights builds the next one on its own thread.
struct ActorEngine::Policy {
  uint64_t version = 0;
  std::unique_ptr<Ops<float>> ops;  // declared first: the model frees its buffers through it
  std::unique_ptr<Transformer<float>> model;
  std::unique_ptr<Generator> generator;
};

namespace {

using Seconds = std::chrono::duration<double>;

// The config keys that only steer training (initialization, the router-bias step, the balance
// loss coefficient) may differ between the learner's config and the actor's; everything else
// defines the function the actor computes and the tensors it loads.
std::string architecture_yaml(ModelConfig config) {
  config.init_std = 0;
  config.bias_update_rate = 0;
  config.seq_balance_loss = 0;
  return config.to_yaml();
}

// The first line where two YAML texts differ, as "served 'x: 1', payload 'x: 2'".
std::string first_difference(const std::string& served, const std::string& payload) {
  std::istringstream a(served), b(payload);
  std::string line_a, line_b;
  for (;;) {
    const bool more_a = bool(std::getline(a, line_a));
    const bool more_b = bool(std::getline(b, line_b));
    if (!more_a && !more_b) return "no difference";
    if (!more_a) line_a = "<end>";
    if (!more_b) line_b = "<end>";
    if (line_a != line_b) return fmt::format("served '{}', payload '{}'", line_a, line_b);
  }
}

// ActorEngine::generate's sink: collects the responses for a waiting caller.
class CollectingSink final : public GenerateSink {
 public:
  bool cancelled() override { return false; }
  void result(v1::GenerateResponse response) override { responses_.push_back(std::move(response)); }
  void finish(const GenerateOutcome& outcome) override {
    // Notified under the lock: the waiter, which owns this sink, cannot return (and destroy
    // it) before the worker has released the lock, its last touch of the sink.
    std::lock_guard<std::mutex> lock(mutex_);
    outcome_ = outcome;
    finished_ = true;
    done_.notify_all();
  }

  std::vector<v1::GenerateResponse> wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return finished_; });
    if (outcome_.code != GenerateOutcome::Code::kOk) throw Error(outcome_.message);
    return std::move(responses_);
  }

 private:
  std::vector<v1::GenerateResponse> responses_;  // touched by the worker only until finish()
  std::mutex mutex_;
  std::condition_variable done_;
  bool finished_ = false;
  GenerateOutcome outcome_;
};

void fill_rollout(const Generation& g, const v1::GenerateRequest& request, uint64_t prompt_index,
                  uint32_t sample, uint64_t version, const std::string& address,
                  v1::Rollout& rollout) {
  rollout.set_prompt_index(prompt_index);
  rollout.set_sample_index(sample);
  rollout.set_policy_version(version);
  rollout.mutable_prompt_tokens()->Add(g.prompt_tokens.begin(), g.prompt_tokens.end());
  rollout.mutable_response_tokens()->Add(g.tokens.begin(), g.tokens.end());
  rollout.mutable_logprobs()->Add(g.logprobs.begin(), g.logprobs.end());
  rollout.set_text(valid_utf8(g.text));
  rollout.set_finished(g.finished);
  rollout.set_actor(address);
  if (request.want_routing()) {
    v1::RoutingTrace& trace = *rollout.mutable_routing();
    trace.set_n_layers(g.routing.n_layers);
    trace.set_n_tokens(g.routing.n_tokens);
    trace.set_top_k(g.routing.top_k);
    trace.mutable_expert_ids()->Add(g.routing.expert_ids.begin(), g.routing.expert_ids.end());
  }
}

}  // namespace

ActorEngine::ActorEngine(const std::string& checkpoint_path, ActorEngineOptions options)
    : options_(std::move(options)) {
  if (options_.max_batch < 1) fail("actor: max_batch must be >= 1, got {}", options_.max_batch);
  if (options_.max_round_sequences < 1) {
    fail("actor: max_round_sequences must be >= 1, got {}", options_.max_round_sequences);
  }
  if (!options_.make_ops) {
    check_float_backend(options_.device);  // before the checkpoint: the clearer error first
    options_.make_ops = [device = options_.device] { return make_float_ops(device); };
  }
  const CheckpointContents info = checkpoint_read_info(checkpoint_path);
  config_ = info.config;
  tokenizer_name_ = info.tokenizer;
  tokenizer_ = make_tokenizer(info.tokenizer);
  policy_ = build_policy(
      info,
      [&checkpoint_path](Ops<float>& ops, int max_batch) {
        return checkpoint_load_model(checkpoint_path, ops, max_batch);
      },
      options_.initial_version);
  worker_ = std::thread([this] { run(); });
}

ActorEngine::~ActorEngine() {
  {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    stopping_ = true;
  }
  queue_changed_.notify_all();
  if (worker_.joinable()) worker_.join();
}

std::shared_ptr<ActorEngine::Policy> ActorEngine::build_policy(
    const CheckpointContents& info,
    const std::function<std::unique_ptr<Transformer<float>>(Ops<float>&, int)>& load,
    uint64_t version) const {
  auto policy = std::make_shared<Policy>();
  policy->version = version;
  policy->ops = options_.make_ops();
  if (info.expert_format) {
    if (!options_.expert_format) {
      fail("the checkpoint's experts are packed in {} but this actor serves float experts "
           "(expert format none)",
           fp4_format_name(*info.expert_format));
    }
    if (*info.expert_format != *options_.expert_format) {
      fail("the checkpoint's experts are packed in {} but this actor serves {} (FP4 codes "
           "cannot be re-quantized to another format without loss; send float weights)",
           fp4_format_name(*info.expert_format), fp4_format_name(*options_.expert_format));
    }
    policy->model = load(*policy->ops, options_.max_batch);
  } else if (options_.expert_format) {
    // Quantized once per version with the one FP4 quantizer, the same function the learner's
    // QAT forward computes, and then served from the packed codes. The float model only lives
    // through the packing (activations for one sequence).
    std::string packed;
    {
      const std::unique_ptr<Transformer<float>> float_model = load(*policy->ops, 1);
      packed = serialize_policy(*float_model, tokenizer_name_, options_.expert_format);
    }
    policy->model = load_policy(packed, *policy->ops, options_.max_batch);
  } else {
    policy->model = load(*policy->ops, options_.max_batch);
  }
  policy->generator = std::make_unique<Generator>(*policy->model, *tokenizer_, options_.max_batch);
  return policy;
}

void ActorEngine::check_same_architecture(const CheckpointContents& info) const {
  if (info.tokenizer != tokenizer_name_) {
    fail("weight payload: tokenizer '{}' differs from the served model's '{}'", info.tokenizer,
         tokenizer_name_);
  }
  const std::string served = architecture_yaml(config_);
  const std::string offered = architecture_yaml(info.config);
  if (served != offered) {
    fail("weight payload: the model config differs from the served model's architecture: {}",
         first_difference(served, offered));
  }
}

std::string ActorEngine::expert_format_name() const {
  return options_.expert_format ? fp4_format_name(*options_.expert_format) : "fp32";
}

uint64_t ActorEngine::version() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return policy_->version;
}

void ActorEngine::set_address(const std::string& address) {
  std::lock_guard<std::mutex> lock(mutex_);
  address_ = address;
}

void ActorEngine::check_request(const v1::GenerateRequest& request,
                                const GenerateRequestLimits& limits) const {
  if (request.prompts_size() == 0) fail("prompts: must hold at least one prompt");
  if (request.prompts_size() > limits.max_prompts) {
    fail("prompts: {} prompts, the limit is {} per request", request.prompts_size(),
         limits.max_prompts);
  }
  if (request.n() < 1 || request.n() > limits.max_n) {
    fail("n: must be in 1..{}, got {}", limits.max_n, request.n());
  }
  const int context = config_.max_seq_len;
  if (request.max_new_tokens() < 1 || request.max_new_tokens() > context) {
    fail("max_new_tokens: must be in 1..{} (the model's context, max_seq_len), got {}", context,
         request.max_new_tokens());
  }
  if (!std::isfinite(request.temperature()) || request.temperature() < 0) {
    fail("temperature: must be finite and >= 0 (0 = greedy), got {}", request.temperature());
  }
  if (request.top_k() < 0) fail("top_k: must be >= 0 (0 = off), got {}", request.top_k());
  // Written so that NaN fails too.
  if (!(request.top_p() >= 0 && request.top_p() <= 1)) {
    fail("top_p: must be in (0, 1] (0 means 1), got {}", request.top_p());
  }
  std::unordered_set<uint64_t> seen;
  for (int i = 0; i < request.prompts_size(); ++i) {
    const v1::GenerateRequest::PromptItem& prompt = request.prompts(i);
    if (prompt.text().empty()) fail("prompts[{}].text: must not be empty", i);
    if (prompt.text().size() > size_t(limits.max_text_bytes)) {
      fail("prompts[{}].text: {} bytes, the limit is {}", i, prompt.text().size(),
           limits.max_text_bytes);
    }
    // At least one position must remain for a generated token.
    const size_t tokens = format_prompt(*tokenizer_, prompt.text()).size();
    if (tokens >= size_t(context)) {
      fail("prompts[{}].text: {} tokens as a prompt, the model's context (max_seq_len) is {}; "
           "shorten it",
           i, tokens, context);
    }
    // Rollouts are keyed by prompt index, and a repeated index would repeat its samples.
    if (!seen.insert(prompt.prompt_index()).second) {
      fail("prompts[{}].prompt_index: {} appears more than once in the request", i,
           prompt.prompt_index());
    }
  }
}

bool ActorEngine::submit(v1::GenerateRequest request, GenerateSink* sink) {
  {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    if (stopping_) return false;
    queue_.push_back(Job{std::move(request), sink});
  }
  queue_changed_.notify_one();
  return true;
}

std::vector<v1::GenerateResponse> ActorEngine::generate(const v1::GenerateRequest& request,
                                                       const GenerateRequestLimits& limits) {
  check_request(request, limits);
  CollectingSink sink;
  if (!submit(request, &sink)) fail("actor: the engine is shutting down");
  return sink.wait();
}

uint64_t ActorEngine::apply_weights(const WeightPayload& payload) {
  std::lock_guard<std::mutex> update_lock(update_mutex_);
  const auto start = std::chrono::steady_clock::now();
  const uint64_t served = version();
  try {
    // Only apply_weights changes the version and it runs one at a time, so the version checked
    // here is still the served one at the swap below.
    if (payload.version <= served) {
      throw StaleVersionError(
          fmt::format("stale version {}, serving {}", payload.version, served));
    }
    if (payload.format != kCheckpointFormat) {
      fail("weight payload: format '{}' is not supported (expected '{}')", payload.format,
           kCheckpointFormat);
    }
    const CheckpointContents info = read_policy_info(payload.bytes);
    check_same_architecture(info);
    std::shared_ptr<Policy> next = build_policy(
        info,
        [&payload](Ops<float>& ops, int max_batch) {
          return load_policy(payload.bytes, ops, max_batch);
        },
        payload.version);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      policy_.swap(next);
      ++updates_applied_;
    }
    // `next` now holds the previous version: freed here, or by the round still using it.
  } catch (const Error& e) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++updates_rejected_;
    }
    spdlog::warn("actor: weight update to version {} rejected, still serving version {}: {}",
                 payload.version, served, e.what());
    throw;
  }
  spdlog::info("actor: weight update applied: now serving version {} (was {}; {} bytes, {}, "
               "loaded in {:.2f} s)",
               payload.version, served, payload.bytes.size(), expert_format_name(),
               Seconds(std::chrono::steady_clock::now() - start).count());
  return payload.version;
}

void ActorEngine::reject_update(const std::string& reason) {
  uint64_t served;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++updates_rejected_;
    served = policy_->version;
  }
  spdlog::warn("actor: weight update rejected, still serving version {}: {}", served, reason);
}

v1::ActorStatus ActorEngine::status() const {
  v1::ActorStatus status;
  status.set_expert_format(expert_format_name());
  std::lock_guard<std::mutex> lock(mutex_);
  status.set_version(policy_->version);
  status.set_requests_served(requests_served_);
  status.set_tokens_generated(tokens_generated_);
  status.set_tokens_per_second(busy_seconds_ > 0 ? double(tokens_generated_) / busy_seconds_ : 0);
  status.set_weight_updates_applied(updates_applied_);
  status.set_weight_updates_rejected(updates_rejected_);
  return status;
}

void ActorEngine::run() {
  std::vector<Job> round;
  for (;;) {
    round.clear();
    {
      std::unique_lock<std::mutex> lock(queue_mutex_);
      queue_changed_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and everything queued has been answered
      int64_t sequences = 0;
      while (!queue_.empty()) {
        const v1::GenerateRequest& next = queue_.front().request;
        const int64_t cost = int64_t(next.prompts_size()) * std::max(1, next.n());
        if (!round.empty() && sequences + cost > options_.max_round_sequences) break;
        sequences += cost;
        round.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
    }
    run_round(round);
  }
}

void ActorEngine::run_round(std::vector<Job>& round) {
  // One snapshot for the whole round: a swap during it affects the next round only.
  std::shared_ptr<Policy> policy;
  std::string address;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    policy = policy_;
    address = address_;
  }
  for (Job& job : round) {
    const auto start = std::chrono::steady_clock::now();
    int64_t tokens = 0;
    GenerateOutcome outcome;
    try {
      outcome = run_job(*policy, job, address, &tokens);
    } catch (const std::exception& e) {
      // Requests are checked before they are queued, so what the Generator still refuses is
      // the actor's fault, e.g. non-finite logits from a diverged policy: not the caller's.
      spdlog::error("actor: generation on version {} failed: {}", policy->version, e.what());
      outcome = {GenerateOutcome::Code::kInternal,
                 fmt::format("generation on version {} failed: {}", policy->version, e.what())};
    }
    {
      // Before finish(): a caller that sees its stream end then sees it counted in Status.
      std::lock_guard<std::mutex> lock(mutex_);
      tokens_generated_ += uint64_t(tokens);
      busy_seconds_ += Seconds(std::chrono::steady_clock::now() - start).count();
      if (outcome.code == GenerateOutcome::Code::kOk) ++requests_served_;
    }
    job.sink->finish(outcome);
  }
}

GenerateOutcome ActorEngine::run_job(Policy& policy, const Job& job, const std::string& address,
                                     int64_t* tokens) {
  const v1::GenerateRequest& request = job.request;
  if (request.expect_version() != 0 && request.expect_version() != policy.version) {
    return {GenerateOutcome::Code::kFailedPrecondition,
            fmt::format("expect_version {}: this actor serves version {}",
                        request.expect_version(), policy.version)};
  }
  SamplingParams params;
  params.temperature = request.temperature();
  params.top_k = request.top_k();
  params.top_p = request.top_p() == 0 ? 1.0 : request.top_p();  // proto3's unset 0 means off
  params.max_new_tokens = request.max_new_tokens();
  std::vector<std::vector<int32_t>> copies;
  for (const v1::GenerateRequest::PromptItem& prompt : request.prompts()) {
    if (job.sink->cancelled()) {
      return {GenerateOutcome::Code::kCancelled, "the caller cancelled the request"};
    }
    // The seed rule (actor.proto): sample s of prompt p is sequence s of a Generator call
    // seeded with mix_seed(request.seed, p).
    params.seed = mix_seed(request.seed(), prompt.prompt_index());
    copies.assign(size_t(request.n()), format_prompt(*tokenizer_, prompt.text()));
    const std::vector<Generation> generations = policy.generator->generate(copies, params);
    v1::GenerateResponse response;
    response.set_prompt_index(prompt.prompt_index());
    for (size_t s = 0; s < generations.size(); ++s) {
      fill_rollout(generations[s], request, prompt.prompt_index(), uint32_t(s), policy.version,
                   address, *response.add_rollouts());
      *tokens += int64_t(generations[s].tokens.size());
    }
    job.sink->result(std::move(response));
  }
  return {};
}

}  // namespace rlhf
