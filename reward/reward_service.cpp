#include "reward/reward_service.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/utf8.h"
#include "model/tokenizer.h"
#include "reward/judge_format.h"
#include "rlhf/v1/reward.grpc.pb.h"

namespace rlhf {
namespace {

constexpr const char* kRewardServiceName = "rlhf.v1.RewardService";

grpc::Status invalid_argument(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

// What a queued call does on the judge's thread: judge and fill the call's response. It may
// throw: rlhf::Error (bad input the checks did not catch) becomes INVALID_ARGUMENT, anything
// else INTERNAL.
using JudgeTask = std::function<void()>;

grpc::Status run_judge_task(const char* method, const JudgeTask& task) {
  try {
    task();
    return grpc::Status::OK;
  } catch (const Error& e) {
    return invalid_argument(e.what());
  } catch (const std::exception& e) {
    spdlog::error("reward service: {} failed: {}", method, e.what());
    return grpc::Status(grpc::StatusCode::INTERNAL, fmt::format("{} failed: {}", method, e.what()));
  }
}

// The one thread that runs the judge: the Judge (its model activations and Generator) is not
// thread-safe, so every call is judged here, one at a time, in arrival order. gRPC's callback
// threads must not block on a long generation either; they only queue work here.
class JudgeWorker {
 public:
  explicit JudgeWorker(size_t max_queued) : max_queued_(max_queued), thread_([this] { run(); }) {}
  ~JudgeWorker() { stop(); }

  // Queues a call; it is finished (reactor->Finish) on the worker thread. False, and nothing
  // queued, when max_queued calls already wait.
  bool submit(const char* method, grpc::CallbackServerContext* context,
              grpc::ServerUnaryReactor* reactor, JudgeTask task) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (queue_.size() >= max_queued_) return false;
      queue_.push_back(Job{method, context, reactor, std::move(task)});
    }
    wake_.notify_one();
    return true;
  }

  // Judges what is still queued, then ends the thread. Call after the server has stopped
  // taking calls (each queued call must still be finished, or the server's shutdown waits
  // for it forever).
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Job {
    const char* method;
    grpc::CallbackServerContext* context;
    grpc::ServerUnaryReactor* reactor;
    JudgeTask task;
  };

  void run() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      // A caller that gave up (deadline, cancel, server shutdown) gets no generation.
      if (job.context->IsCancelled()) {
        job.reactor->Finish(grpc::Status::CANCELLED);
        continue;
      }
      const auto start = std::chrono::steady_clock::now();
      const grpc::Status status = run_judge_task(job.method, job.task);
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      spdlog::debug("reward service: {} -> status {} in {:.3f} s", job.method,
                    int(status.error_code()), took.count());
      job.reactor->Finish(status);
    }
  }

  const size_t max_queued_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Job> queue_;
  bool stopping_ = false;
  std::thread thread_;  // last: it starts running in the constructor
};

// ---- Request checks: on gRPC's threads, before anything is queued; rlhf::Error naming the field.

void check_text(const std::string& field, const std::string& text, bool required,
                const RewardServiceLimits& limits) {
  if (required && text.empty()) fail("{}: must not be empty", field);
  if (text.size() > size_t(limits.max_text_bytes)) {
    fail("{}: {} bytes, the limit is {}", field, text.size(), limits.max_text_bytes);
  }
}

// The judge sees a judge turn of the model's sequence format; a prompt that fills the whole
// context would leave no room for even one generated token. Reads only the tokenizer and the
// model config, which never change, so it may run while the worker is judging.
void check_fits_context(const std::string& field, const std::string& judge_prompt,
                        const Judge& judge) {
  const size_t tokens =
      format_prompt(judge.tokenizer(), judge_prompt, SpecialToken::kJudge).size();
  const int context = judge.model_config().max_seq_len;
  if (tokens >= size_t(context)) {
    fail("{}: the judge prompt is {} tokens, the judge model's context (max_seq_len) is {}; "
         "shorten the texts",
         field, tokens, context);
  }
}

VotingParams voting_params_from(int32_t k, double temperature, uint64_t seed, bool swap_order) {
  // k = 0 is what a client that never set k sends (proto3 default): one sample.
  if (k < 0 || k > VotingParams::kMaxVotes) {
    fail("k: must be in 1..{} (0 means 1), got {}", VotingParams::kMaxVotes, k);
  }
  VotingParams params;
  params.k = k == 0 ? 1 : k;
  params.temperature = temperature;
  params.seed = seed;
  params.swap_order = swap_order;
  params.validate();  // temperature: finite and >= 0
  return params;
}

std::optional<std::string> optional_text(bool present, const std::string& text) {
  return present ? std::optional<std::string>(text) : std::nullopt;
}

std::vector<JudgeRequest> judge_requests_from(const v1::ScoreRequest& request, const Judge& judge,
                                              const RewardServiceLimits& limits) {
  if (request.items_size() == 0) fail("items: must hold at least one item");
  if (request.items_size() > limits.max_items) {
    fail("items: {} items, the limit is {} per request", request.items_size(), limits.max_items);
  }
  std::vector<JudgeRequest> requests;
  requests.reserve(size_t(request.items_size()));
  for (int i = 0; i < request.items_size(); ++i) {
    const v1::ScoreItem& item = request.items(i);
    const std::string field = fmt::format("items[{}]", i);
    check_text(field + ".prompt", item.prompt(), true, limits);
    check_text(field + ".response", item.response(), true, limits);
    check_text(field + ".reference", item.reference(), false, limits);
    JudgeRequest r{item.prompt(), item.response(),
                   optional_text(item.has_reference(), item.reference())};
    check_fits_context(
        field, pointwise_judge_prompt(r.prompt, r.response, r.reference, judge.layout()), judge);
    requests.push_back(std::move(r));
  }
  return requests;
}

template <typename PairMessage>  // v1::CompareRequest or v1::CompareItem
PairwiseRequest pairwise_request_from(const PairMessage& pair, const std::string& field,
                                      const Judge& judge, const RewardServiceLimits& limits) {
  PairwiseRequest r{pair.prompt(), pair.response_a(), pair.response_b(),
                    optional_text(pair.has_reference(), pair.reference())};
  check_pairwise_request(r, field, judge, limits);
  return r;
}

std::vector<PairwiseRequest> pairwise_requests_from(const v1::CompareBatchRequest& request,
                                                    const Judge& judge,
                                                    const RewardServiceLimits& limits) {
  if (request.items_size() == 0) fail("items: must hold at least one item");
  if (request.items_size() > limits.max_items) {
    fail("items: {} items, the limit is {} per request", request.items_size(), limits.max_items);
  }
  std::vector<PairwiseRequest> requests;
  requests.reserve(size_t(request.items_size()));
  for (int i = 0; i < request.items_size(); ++i) {
    requests.push_back(
        pairwise_request_from(request.items(i), fmt::format("items[{}].", i), judge, limits));
  }
  return requests;
}

void fill_pointwise_result(const PointwiseJudgment& judgment, v1::PointwiseResult& result) {
  result.set_valid(judgment.valid);
  result.set_score(judgment.valid ? judgment.score : 0.0);
  for (int score : judgment.sample_scores) result.add_sample_scores(score);
  // The judge writes bytes; a proto string must be UTF-8 (common/utf8.h).
  for (const std::string& reasoning : judgment.reasoning)
    result.add_reasoning(valid_utf8(reasoning));
  result.set_invalid_samples(judgment.invalid_samples);
  result.set_retries(judgment.retries);
}

void fill_compare_response(const PairwiseJudgment& judgment, v1::CompareResponse& response) {
  response.set_valid(judgment.valid);
  // Without a single vote there is no verdict: leave it empty rather than report a tie.
  if (judgment.valid) {
    response.set_verdict(verdict_name(judgment.verdict));
    response.set_preference_a(judgment.preference_a);
  }
  for (Verdict vote : judgment.votes) response.add_votes(verdict_name(vote));
  for (const std::string& reasoning : judgment.reasoning)
    response.add_reasoning(valid_utf8(reasoning));
  response.set_invalid_samples(judgment.invalid_samples);
  response.set_retries(judgment.retries);
}

// gRPC's callback API: each handler checks its request on the calling gRPC thread and either
// answers at once (bad request, full queue) or queues the judging on the JudgeWorker.
class RewardServiceImpl final : public v1::RewardService::CallbackService {
 public:
  RewardServiceImpl(Judge& judge, const RewardServiceLimits& limits, JudgeWorker& worker)
      : judge_(judge), limits_(limits), worker_(worker) {}

  grpc::ServerUnaryReactor* Score(grpc::CallbackServerContext* context,
                                  const v1::ScoreRequest* request,
                                  v1::ScoreResponse* response) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    std::vector<JudgeRequest> requests;
    VotingParams params;
    try {
      requests = judge_requests_from(*request, judge_, limits_);
      params = voting_params_from(request->k(), request->temperature(), request->seed(),
                                  /*swap_order=*/false);
    } catch (const Error& e) {
      reactor->Finish(invalid_argument(e.what()));
      return reactor;
    }
    enqueue("Score", context, reactor, [this, requests = std::move(requests), params, response] {
      for (const PointwiseJudgment& judgment : judge_.score(requests, params)) {
        fill_pointwise_result(judgment, *response->add_results());
      }
    });
    return reactor;
  }

  grpc::ServerUnaryReactor* Compare(grpc::CallbackServerContext* context,
                                    const v1::CompareRequest* request,
                                    v1::CompareResponse* response) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    std::vector<PairwiseRequest> requests;
    VotingParams params;
    try {
      requests.push_back(pairwise_request_from(*request, "", judge_, limits_));
      params = voting_params_from(request->k(), request->temperature(), request->seed(),
                                  /*swap_order=*/request->both_orders());
    } catch (const Error& e) {
      reactor->Finish(invalid_argument(e.what()));
      return reactor;
    }
    enqueue("Compare", context, reactor, [this, requests = std::move(requests), params, response] {
      const std::vector<PairwiseJudgment> judgments = judge_.compare(requests, params);
      RLHF_CHECK(judgments.size() == 1, "one pairwise request, {} judgments", judgments.size());
      fill_compare_response(judgments[0], *response);
    });
    return reactor;
  }

  grpc::ServerUnaryReactor* CompareBatch(grpc::CallbackServerContext* context,
                                         const v1::CompareBatchRequest* request,
                                         v1::CompareBatchResponse* response) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    std::vector<PairwiseRequest> requests;
    VotingParams params;
    try {
      requests = pairwise_requests_from(*request, judge_, limits_);
      params = voting_params_from(request->k(), request->temperature(), request->seed(),
                                  /*swap_order=*/request->both_orders());
    } catch (const Error& e) {
      reactor->Finish(invalid_argument(e.what()));
      return reactor;
    }
    enqueue("CompareBatch", context, reactor,
            [this, requests = std::move(requests), params, response] {
              for (const PairwiseJudgment& judgment : judge_.compare(requests, params)) {
                fill_compare_response(judgment, *response->add_results());
              }
            });
    return reactor;
  }

 private:
  void enqueue(const char* method, grpc::CallbackServerContext* context,
               grpc::ServerUnaryReactor* reactor, JudgeTask task) {
    if (!worker_.submit(method, context, reactor, std::move(task))) {
      reactor->Finish(grpc::Status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          fmt::format("{} calls already wait for the judge; retry later",
                      limits_.max_queued_requests)));
    }
  }

  Judge& judge_;
  const RewardServiceLimits limits_;
  JudgeWorker& worker_;
};

const RewardServiceLimits& checked_limits(const RewardServiceLimits& limits) {
  if (limits.max_items < 1) {
    fail("reward service: max_items must be >= 1, got {}", limits.max_items);
  }
  if (limits.max_text_bytes < 1) {
    fail("reward service: max_text_bytes must be >= 1, got {}", limits.max_text_bytes);
  }
  if (limits.max_queued_requests < 1) {
    fail("reward service: max_queued_requests must be >= 1, got {}", limits.max_queued_requests);
  }
  return limits;
}

}  // namespace

void check_pairwise_request(const PairwiseRequest& r, const std::string& field,
                            const Judge& judge, const RewardServiceLimits& limits) {
  check_text(field + "prompt", r.prompt, true, limits);
  check_text(field + "response_a", r.response_a, true, limits);
  check_text(field + "response_b", r.response_b, true, limits);
  check_text(field + "reference", r.reference.value_or(""), false, limits);
  // Swapping A and B (both_orders) does not change the length. A split pair's given text is
  // its prompt and side B's line.
  std::string given;
  if (judge.layout() == kJudgeSplitPairLayout && r.reference) {
    const SplitPairTurns turns =
        split_pair_turns(r.prompt, r.response_a, r.response_b, *r.reference);
    given = turns.prompt + "\n" + turns.b_line;
  } else {
    given = pairwise_judge_prompt(r.prompt, r.response_a, r.response_b, r.reference,
                                  judge.layout());
  }
  check_fits_context(field + "prompt + response_a + response_b + reference", given, judge);
}

class RewardServer::Impl {
 public:
  Impl(Judge& judge, const std::string& listen_address, const RewardServiceLimits& limits)
      : worker_(size_t(checked_limits(limits).max_queued_requests)),
        service_(judge, limits, worker_) {
    // Both are process-wide switches read when a server is built: grpc.health.v1.Health and
    // grpc.reflection.v1alpha.ServerReflection come up with this server.
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    grpc::ServerBuilder builder;
    // TLS and bearer tokens (DESIGN.md: optional) are not wired yet: plaintext, which is why
    // the default address is loopback.
    builder.AddListeningPort(listen_address, grpc::InsecureServerCredentials(), &port_);
    // gRPC binds with SO_REUSEPORT by default on Linux, so a second server on a taken port
    // would start and silently share its traffic; we want it to fail instead.
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    if (!server_ || port_ == 0) {
      fail("reward service: cannot listen on '{}' (malformed address, or the port is in use)",
           listen_address);
    }
    server_->GetHealthCheckService()->SetServingStatus(kRewardServiceName, true);
    server_->GetHealthCheckService()->SetServingStatus(true);
  }

  ~Impl() { shutdown(); }

  int port() const { return port_; }

  void wait() {
    std::unique_lock<std::mutex> lock(shutdown_mutex_);
    stopped_changed_.wait(lock, [this] { return stopped_; });
  }

  void shutdown() {
    // Held throughout: a second caller returns only once the first has finished.
    std::lock_guard<std::mutex> lock(shutdown_mutex_);
    if (stopped_ || !server_) return;
    server_->GetHealthCheckService()->Shutdown();  // every status NOT_SERVING
    // A deadline of now: calls still queued for the judge are cancelled at once (the worker
    // finishes them as CANCELLED) instead of being judged one by one before we can exit.
    // Shutdown returns when every call has been finished, which the worker keeps doing.
    server_->Shutdown(std::chrono::system_clock::now());
    worker_.stop();
    stopped_ = true;
    stopped_changed_.notify_all();
  }

 private:
  JudgeWorker worker_;
  RewardServiceImpl service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::mutex shutdown_mutex_;
  std::condition_variable stopped_changed_;
  bool stopped_ = false;
};

RewardServer::RewardServer(Judge& judge, std::string listen_address, RewardServiceLimits limits)
    : impl_(std::make_unique<Impl>(judge, listen_address, limits)) {}

RewardServer::~RewardServer() = default;

int RewardServer::port() const { return impl_->port(); }
void RewardServer::wait() { impl_->wait(); }
void RewardServer::shutdown() { impl_->shutdown(); }

}  // namespace rlhf
