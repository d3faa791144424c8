#include "actor/actor_service.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "rlhf/v1/actor.grpc.pb.h"

namespace rlhf {
namespace {

constexpr const char* kActorServiceName = "rlhf.v1.ActorService";

grpc::Status to_grpc_status(const GenerateOutcome& outcome) {
  switch (outcome.code) {
    case GenerateOutcome::Code::kOk:
      return grpc::Status::OK;
    case GenerateOutcome::Code::kFailedPrecondition:
      return {grpc::StatusCode::FAILED_PRECONDITION, outcome.message};
    case GenerateOutcome::Code::kCancelled:
      return {grpc::StatusCode::CANCELLED, outcome.message};
    case GenerateOutcome::Code::kInternal:
      break;
  }
  return {grpc::StatusCode::INTERNAL, outcome.message};
}

// A Generate call answered before it reaches the engine (bad request, full queue).
class RejectedGenerate final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  explicit RejectedGenerate(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

// One Generate call: the engine's worker hands it results (GenerateSink), this reactor writes
// them to the stream one at a time (gRPC allows one outstanding write). gRPC deletes the reactor
// after Finish, so Finish is called only once the worker is done with the sink (finish() was
// called) and no write is in flight, and nothing touches `this` after it. StartWrite and Finish
// are called outside the mutex: a completion may run on another thread at once.
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse>,
                              public GenerateSink {
 public:
  GenerateReactor(grpc::CallbackServerContext* context, std::atomic<int>& outstanding)
      : context_(context), outstanding_(outstanding) {}

  bool cancelled() override { return context_->IsCancelled(); }

  void result(v1::GenerateResponse response) override {
    const v1::GenerateResponse* write = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (client_gone_) return;
      // A deque keeps its elements in place as it grows: the one being written stays valid.
      pending_.push_back(std::move(response));
      if (!writing_) {
        writing_ = true;
        write = &pending_.front();
      }
    }
    if (write) StartWrite(write);
  }

  void finish(const GenerateOutcome& outcome) override {
    bool finish_now;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      status_ = to_grpc_status(outcome);
      finishing_ = true;
      finish_now = !writing_;
    }
    outstanding_.fetch_sub(1);
    if (finish_now) Finish(status_);
  }

  void OnWriteDone(bool ok) override {
    const v1::GenerateResponse* write = nullptr;
    bool finish_now = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pending_.pop_front();
      if (!ok) {  // the client went away: what is left has nowhere to go
        client_gone_ = true;
        pending_.clear();
        status_ = grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
      }
      if (!pending_.empty()) {
        write = &pending_.front();
      } else {
        writing_ = false;
        finish_now = finishing_;
      }
    }
    if (write) {
      StartWrite(write);
    } else if (finish_now) {
      Finish(status_);
    }
  }

  void OnDone() override { delete this; }

 private:
  grpc::CallbackServerContext* context_;
  std::atomic<int>& outstanding_;
  std::mutex mutex_;
  std::deque<v1::GenerateResponse> pending_;  // front: the write in flight
  bool writing_ = false;
  bool finishing_ = false;  // the worker called finish(): no more results
  bool client_gone_ = false;
  grpc::Status status_;
};

// Runs weight loads one at a time, off gRPC's threads (a load takes as long as reading the
// checkpoint; gRPC's callback threads must not block on it) and off the generation worker (which
// keeps serving the old version meanwhile).
class UpdateWorker {
 public:
  UpdateWorker() : thread_([this] { run(); }) {}
  ~UpdateWorker() { stop(); }

  void submit(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(task));
    }
    wake_.notify_one();
  }

  // Runs what is queued, then ends the thread. Call once the server has stopped taking calls.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::thread thread_;  // last: it starts running in the constructor
};

// One UpdateWeights call: reads and checks chunks as they arrive, then hands the verified
// payload to the UpdateWorker, which applies it and finishes the call.
class UpdateWeightsReactor final : public grpc::ServerReadReactor<v1::WeightChunk> {
 public:
  UpdateWeightsReactor(grpc::CallbackServerContext* context, v1::UpdateWeightsResponse* response,
                       ActorEngine& engine, UpdateWorker& updater, uint64_t max_bytes)
      : context_(context), response_(response), engine_(engine), updater_(updater),
        assembler_(max_bytes) {
    StartRead(&chunk_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      end_of_stream();
      return;
    }
    try {
      const bool first = !assembler_.has_header();
      assembler_.add(chunk_);
      // A stale version is refused before its bytes are received.
      const uint64_t served = engine_.version();
      if (first && assembler_.version() <= served) {
        reject(grpc::StatusCode::FAILED_PRECONDITION,
               fmt::format("stale version {}, serving {}", assembler_.version(), served));
        return;
      }
    } catch (const Error& e) {
      reject(grpc::StatusCode::INVALID_ARGUMENT, e.what());
      return;
    }
    StartRead(&chunk_);
  }

  void OnDone() override { delete this; }

 private:
  void reject(grpc::StatusCode code, const std::string& message) {
    engine_.reject_update(message);
    Finish(grpc::Status(code, message));
  }

  void end_of_stream() {
    // Reads end early for a client that cancelled; whatever arrived is dropped (a truncated
    // payload would fail its size check anyway).
    if (context_->IsCancelled()) {
      reject(grpc::StatusCode::CANCELLED, "the client cancelled the upload");
      return;
    }
    WeightPayload payload;
    try {
      payload = assembler_.finish();
    } catch (const Error& e) {
      reject(grpc::StatusCode::INVALID_ARGUMENT, e.what());
      return;
    }
    auto shared = std::make_shared<WeightPayload>(std::move(payload));
    updater_.submit([this, shared] { apply(*shared); });
  }

  void apply(const WeightPayload& payload) {
    // The server shutting down (or the client giving up) while the load waited.
    if (context_->IsCancelled()) {
      reject(grpc::StatusCode::CANCELLED, "the call was cancelled before the weights were loaded");
      return;
    }
    grpc::Status status;
    try {
      response_->set_version(engine_.apply_weights(payload));
    } catch (const StaleVersionError& e) {
      status = grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, e.what());
    } catch (const Error& e) {
      status = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, e.what());
    } catch (const std::exception& e) {
      // Not a verdict on the payload (e.g. out of memory); the served version stays.
      engine_.reject_update(e.what());
      status = grpc::Status(grpc::StatusCode::INTERNAL,
                            fmt::format("loading the weights failed: {}", e.what()));
    }
    Finish(status);
  }

  grpc::CallbackServerContext* context_;
  v1::UpdateWeightsResponse* response_;
  ActorEngine& engine_;
  UpdateWorker& updater_;
  WeightAssembler assembler_;
  v1::WeightChunk chunk_;
};

class ActorServiceImpl final : public v1::ActorService::CallbackService {
 public:
  ActorServiceImpl(ActorEngine& engine, const ActorServiceLimits& limits, UpdateWorker& updater)
      : engine_(engine), limits_(limits),
        request_limits_{limits.max_prompts, limits.max_n, limits.max_text_bytes},
        updater_(updater) {}

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override {
    try {
      engine_.check_request(*request, request_limits_);
    } catch (const Error& e) {
      return new RejectedGenerate(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, e.what()));
    }
    // Early answer; the worker checks again against the version the request actually runs on.
    const uint64_t served = engine_.version();
    if (request->expect_version() != 0 && request->expect_version() != served) {
      return new RejectedGenerate(grpc::Status(
          grpc::StatusCode::FAILED_PRECONDITION,
          fmt::format("expect_version {}: this actor serves version {}", request->expect_version(),
                      served)));
    }
    if (outstanding_.fetch_add(1) >= limits_.max_queued) {
      outstanding_.fetch_sub(1);
      return new RejectedGenerate(grpc::Status(
          grpc::StatusCode::RESOURCE_EXHAUSTED,
          fmt::format("{} Generate calls already wait; retry later", limits_.max_queued)));
    }
    auto* reactor = new GenerateReactor(context, outstanding_);
    if (!engine_.submit(*request, reactor)) {
      reactor->finish({GenerateOutcome::Code::kCancelled, "the actor is shutting down"});
    }
    return reactor;
  }

  grpc::ServerReadReactor<v1::WeightChunk>* UpdateWeights(
      grpc::CallbackServerContext* context, v1::UpdateWeightsResponse* response) override {
    return new UpdateWeightsReactor(context, response, engine_, updater_,
                                    limits_.max_weight_bytes);
  }

  grpc::ServerUnaryReactor* Status(grpc::CallbackServerContext* context,
                                   const v1::ActorStatusRequest* /*request*/,
                                   v1::ActorStatus* response) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    *response = engine_.status();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  ActorEngine& engine_;
  const ActorServiceLimits limits_;
  const GenerateRequestLimits request_limits_;
  UpdateWorker& updater_;
  std::atomic<int> outstanding_{0};  // Generate calls accepted and not yet finished
};

const ActorServiceLimits& checked_limits(const ActorServiceLimits& limits) {
  if (limits.max_prompts < 1) {
    fail("actor service: max_prompts must be >= 1, got {}", limits.max_prompts);
  }
  if (limits.max_n < 1) fail("actor service: max_n must be >= 1, got {}", limits.max_n);
  if (limits.max_text_bytes < 1) {
    fail("actor service: max_text_bytes must be >= 1, got {}", limits.max_text_bytes);
  }
  if (limits.max_queued < 1) {
    fail("actor service: max_queued must be >= 1, got {}", limits.max_queued);
  }
  return limits;
}

// "127.0.0.1:0" with port 50123 bound -> "127.0.0.1:50123".
std::string bound_address(const std::string& listen_address, int port) {
  return listen_address.substr(0, listen_address.rfind(':')) + ":" + std::to_string(port);
}

}  // namespace

class ActorServer::Impl {
 public:
  Impl(ActorEngine& engine, const std::string& listen_address, const ActorServiceLimits& limits)
      : service_(engine, checked_limits(limits), updater_) {
    // Process-wide switches read when a server is built: grpc.health.v1.Health and
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
      fail("actor service: cannot listen on '{}' (malformed address, or the port is in use)",
           listen_address);
    }
    engine.set_address(bound_address(listen_address, port_));
    server_->GetHealthCheckService()->SetServingStatus(kActorServiceName, true);
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
    // A deadline of now cancels every call still in progress; Shutdown returns once each has
    // been finished, which the engine's worker (Generate) and the update worker keep doing.
    server_->Shutdown(std::chrono::system_clock::now());
    updater_.stop();
    stopped_ = true;
    stopped_changed_.notify_all();
  }

 private:
  UpdateWorker updater_;
  ActorServiceImpl service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::mutex shutdown_mutex_;
  std::condition_variable stopped_changed_;
  bool stopped_ = false;
};

ActorServer::ActorServer(ActorEngine& engine, std::string listen_address, ActorServiceLimits limits)
    : impl_(std::make_unique<Impl>(engine, listen_address, limits)) {}

ActorServer::~ActorServer() = default;

int ActorServer::port() const { return impl_->port(); }
void ActorServer::wait() { impl_->wait(); }
void ActorServer::shutdown() { impl_->shutdown(); }

}  // namespace rlhf
