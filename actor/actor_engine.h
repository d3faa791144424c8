#pragma once
// The actor's engine: the served policy (model + version), the one worker thread that generates
// with it, and the swap to a new version. ActorServer (actor/actor_service.h) puts it behind
// gRPC; anything in-process (tests, a single-process driver) can use it directly.
//
//   submit(request, sink) -> queue -> worker: take every queued request (up to a sequence
//   budget) -> snapshot the policy -> per request, per prompt: n samples decoded together ->
//   sink.result() per prompt -> sink.finish()
//   apply_weights(payload) -> check (newer, same architecture, readable) -> load beside the
//   served policy -> swap the pointer
//
// Versions: a request runs entirely on the policy snapshot its round took, and a rollout's
// policy_version is that snapshot's version, so the number and the weights can never disagree.
// A new version is loaded while the old one keeps generating; the swap is one pointer under a
// mutex, and the old model is freed when the last round using it ends.
//
// Seeds (the rule actor.proto states): sample s of the prompt with prompt_index p draws from
// Rng(mix_seed(mix_seed(request.seed, p), s)): the Generator is called with SamplingParams.seed
// = mix_seed(request.seed, p) on n copies of the prompt, so sample s is its sequence s. The n
// samples of a prompt are one Generator call of their own (never padded together with another
// prompt), so a sample is bitwise the same whichever other prompts, requests or actors share
// the batch, as long as n, the version and the actor's max_batch are the same.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "actor/weight_transfer.h"
#include "common/error.h"
#include "kernels/fp4/fp4.h"
#include "model/config.h"
#include "model/generate.h"
#include "model/tokenizer.h"
#include "rlhf/v1/actor.pb.h"

namespace rlhf {

struct ActorEngineOptions {
  // Sequences decoded together (the Generator's batch and the model's activation capacity).
  int max_batch = 16;
  // Sequences (prompts x n) one worker round takes from the queue; a round always takes at
  // least one request, however large.
  int64_t max_round_sequences = 1024;
  // Serve the experts packed in this FP4 format (a float checkpoint is quantized at load, so
  // rollouts come from the FP4 weights themselves); nullopt serves float experts.
  std::optional<Fp4Format> expert_format = Fp4Format::mxfp4;
  // The version of the checkpoint the engine starts from (0: the initial policy).
  uint64_t initial_version = 0;
  // The backend every loaded policy runs on, as runtime.device names it ("cpu" or "cuda";
  // kernels/backend.h). Ops are not thread-safe (kernels/cpu/cpu_ops.h), and a new version is
  // loaded while the old one generates, so every policy gets its own instance.
  std::string device = "cpu";
  // Makes those instances; empty: make_float_ops(device). Set only to inject a backend.
  std::function<std::unique_ptr<Ops<float>>()> make_ops;
};

// The size limits of one Generate request (ActorServiceLimits carries the service's).
struct GenerateRequestLimits {
  int max_prompts = 256;      // prompts per request
  int max_n = 64;             // samples per prompt
  int max_text_bytes = 1024;  // each prompt's text
};

// How a queued request ended, as the service maps it to a status code. (A malformed request
// never gets queued: check_request refuses it first.)
struct GenerateOutcome {
  enum class Code { kOk, kFailedPrecondition, kCancelled, kInternal };
  Code code = Code::kOk;
  std::string message;
};

// Where the worker delivers one request's results. Implemented by the service's stream
// reactor; the engine calls it only from the worker thread, and not at all after finish().
class GenerateSink {
 public:
  virtual ~GenerateSink() = default;
  // The caller gave up (deadline, cancel, shutdown): the remaining prompts are skipped.
  virtual bool cancelled() = 0;
  // One response per prompt, in request order, each as soon as its n samples are done.
  virtual void result(v1::GenerateResponse response) = 0;
  // The last call.
  virtual void finish(const GenerateOutcome& outcome) = 0;
};

// A weight update refused because its version is not newer than the served one
// (FAILED_PRECONDITION at the service edge; other update errors are plain rlhf::Error).
class StaleVersionError : public Error {
 public:
  using Error::Error;
};

class ActorEngine {
 public:
  // Loads the checkpoint at `checkpoint_path` (float or packed) and starts the worker thread.
  // rlhf::Error when the checkpoint is unreadable, or packed in a format other than
  // options.expert_format (FP4 codes cannot be re-quantized to another format losslessly).
  ActorEngine(const std::string& checkpoint_path, ActorEngineOptions options);
  // Finishes what is queued (each request runs unless its caller has gone), then stops.
  ~ActorEngine();
  ActorEngine(const ActorEngine&) = delete;
  ActorEngine& operator=(const ActorEngine&) = delete;

  // Fixed for the engine's life: an update must keep the architecture (same config).
  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  // "fp32", "mxfp4" or "nvfp4".
  std::string expert_format_name() const;
  uint64_t version() const;

  // Written into every rollout's `actor` field (the service sets its bound address).
  void set_address(const std::string& address);

  // rlhf::Error naming the first bad field of a request (the rules in actor.proto and
  // docs/actor.md; a prompt must leave room in the context for one generated token). Reads only
  // the config and the tokenizer, which never change, so any thread may call it at any time.
  void check_request(const v1::GenerateRequest& request,
                     const GenerateRequestLimits& limits) const;
  // Queues a request; its results go to `sink`, which must stay valid until sink.finish().
  // The request must have passed check_request; what the Generator still refuses (e.g.
  // non-finite logits from a diverged policy) ends as kInternal. The queue is not bounded here:
  // the service bounds the calls it accepts (ActorServiceLimits::max_queued). False, with
  // nothing queued, once the engine is being destroyed.
  bool submit(v1::GenerateRequest request, GenerateSink* sink);
  // check_request(), submit() and wait: the responses, or rlhf::Error with the reason.
  std::vector<v1::GenerateResponse> generate(const v1::GenerateRequest& request,
                                             const GenerateRequestLimits& limits = {});

  // Checks `payload` (a newer version, a readable checkpoint with this engine's tokenizer and
  // architecture, float or packed in the served format), loads it while the current version
  // keeps serving, and swaps it in. Returns the version now served. StaleVersionError when the
  // version is not newer, rlhf::Error for anything else; either way the served version stays.
  // Updates are applied one at a time; every outcome is counted and logged.
  uint64_t apply_weights(const WeightPayload& payload);
  // Counts and logs an update refused before it reached apply_weights (a stream that did not
  // check, a cancelled upload).
  void reject_update(const std::string& reason);

  // Counters for ActorService.Status.
  v1::ActorStatus status() const;

 private:
  struct Policy;
  struct Job {
    v1::GenerateRequest request;
    GenerateSink* sink = nullptr;
  };

  std::shared_ptr<Policy> build_policy(const CheckpointContents& info,
                                       const std::function<std::unique_ptr<Transformer<float>>(
                                           Ops<float>&, int)>& load,
                                       uint64_t version) const;
  void check_same_architecture(const CheckpointContents& info) const;
  void run();
  void run_round(std::vector<Job>& round);
  GenerateOutcome run_job(Policy& policy, const Job& job, const std::string& address,
                          int64_t* tokens);

  ActorEngineOptions options_;
  ModelConfig config_;
  std::string tokenizer_name_;
  std::unique_ptr<Tokenizer> tokenizer_;

  mutable std::mutex mutex_;  // guards everything below up to the worker's queue
  std::shared_ptr<Policy> policy_;
  std::string address_;
  uint64_t requests_served_ = 0;
  uint64_t tokens_generated_ = 0;
  double busy_seconds_ = 0;
  uint64_t updates_applied_ = 0;
  uint64_t updates_rejected_ = 0;

  std::mutex update_mutex_;  // one apply_weights at a time: check-then-swap stays atomic

  std::mutex queue_mutex_;
  std::condition_variable queue_changed_;
  std::deque<Job> queue_;
  bool stopping_ = false;
  std::thread worker_;  // last: it starts in the constructor
};

}  // namespace rlhf
