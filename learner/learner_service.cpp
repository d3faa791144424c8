#include "learner/learner_service.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "rlhf/v1/learner.grpc.pb.h"

namespace rlhf {

namespace {

class LearnerServiceImpl final : public v1::LearnerService::Service {
 public:
  explicit LearnerServiceImpl(RlTrainer& trainer) : trainer_(trainer) {}

  grpc::Status Status(grpc::ServerContext*, const v1::LearnerStatusRequest*,
                      v1::LearnerStatus* reply) override {
    const RlStatus s = trainer_.status();
    reply->set_run_id(s.run_id);
    reply->set_step(uint64_t(s.step));
    reply->set_total_steps(uint64_t(s.total_steps));
    reply->set_version(uint64_t(s.step));
    reply->set_rollouts_stored(s.rollouts_stored);
    reply->set_last_reward_mean(s.last_reward_mean);
    reply->set_state(s.state);
    return grpc::Status::OK;
  }

  grpc::Status Checkpoint(grpc::ServerContext*, const v1::CheckpointRequest*,
                          v1::CheckpointResponse* reply) override {
    try {
      reply->set_path(trainer_.request_checkpoint());
      reply->set_step(uint64_t(trainer_.status().step));
      return grpc::Status::OK;
    } catch (const std::exception& e) {
      return {grpc::StatusCode::INTERNAL, e.what()};
    }
  }

  grpc::Status Stop(grpc::ServerContext*, const v1::StopRequest*,
                    v1::StopResponse* reply) override {
    spdlog::info("learner: Stop requested over gRPC; finishing the current step");
    trainer_.stop();
    reply->set_step(uint64_t(trainer_.status().step));
    return grpc::Status::OK;
  }

  grpc::Status GetWeights(grpc::ServerContext* context, const v1::GetWeightsRequest*,
                          grpc::ServerWriter<v1::WeightChunk>* writer) override {
    const std::shared_ptr<const WeightPayload> payload = trainer_.current_weights();
    if (!payload) {
      return {grpc::StatusCode::UNAVAILABLE,
              "the learner has not published a policy version yet; retry shortly"};
    }
    // One chunk at a time: the payload is not copied into messages all at once.
    const size_t chunks = weight_chunk_count(*payload);
    for (size_t i = 0; i < chunks; ++i) {
      if (context->IsCancelled() || !writer->Write(make_weight_chunk(*payload, i)))
        return {grpc::StatusCode::CANCELLED, "client went away"};
    }
    spdlog::info("learner: sent policy version {} ({} bytes) to {}", payload->version,
                 payload->bytes.size(), context->peer());
    return grpc::Status::OK;
  }

 private:
  RlTrainer& trainer_;
};

}  // namespace

class LearnerServer::Impl {
 public:
  Impl(RlTrainer& trainer, const std::string& address) : service_(trainer) {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    grpc::ServerBuilder builder;
    builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    if (!server_ || port_ == 0) fail("learner service: cannot listen on '{}'", address);
    server_->GetHealthCheckService()->SetServingStatus(true);
  }

  void shutdown() {
    std::lock_guard lock(mutex_);
    if (stopped_) return;
    stopped_ = true;
    server_->GetHealthCheckService()->SetServingStatus(false);
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  }

  LearnerServiceImpl service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::mutex mutex_;
  bool stopped_ = false;
};

LearnerServer::LearnerServer(RlTrainer& trainer, std::string listen_address)
    : impl_(std::make_unique<Impl>(trainer, listen_address)) {}

LearnerServer::~LearnerServer() { shutdown(); }

int LearnerServer::port() const { return impl_->port_; }

void LearnerServer::shutdown() { impl_->shutdown(); }

}  // namespace rlhf
