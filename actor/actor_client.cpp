#include "actor/actor_client.h"

#include <algorithm>
#include <future>
#include <optional>
#include <thread>
#include <utility>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include "rlhf/v1/actor.grpc.pb.h"
#include "rlhf/v1/learner.grpc.pb.h"

namespace rlhf {
namespace {

// common/rpc_error.h keeps gRPC out and names the canonical codes by number.
static_assert(int(grpc::StatusCode::CANCELLED) == RpcError::kCancelled);
static_assert(int(grpc::StatusCode::INVALID_ARGUMENT) == RpcError::kInvalidArgument);
static_assert(int(grpc::StatusCode::DEADLINE_EXCEEDED) == RpcError::kDeadlineExceeded);
static_assert(int(grpc::StatusCode::RESOURCE_EXHAUSTED) == RpcError::kResourceExhausted);
static_assert(int(grpc::StatusCode::FAILED_PRECONDITION) == RpcError::kFailedPrecondition);
static_assert(int(grpc::StatusCode::UNAVAILABLE) == RpcError::kUnavailable);

// gRPC's reconnect backoff after a failed connection grows to 120 s by default, and while it
// waits every call fails at once with UNAVAILABLE. Capped, a restarted actor or learner is
// found within a few of our retries.
constexpr std::chrono::milliseconds kMaxReconnectBackoff = std::chrono::seconds(5);

std::shared_ptr<grpc::Channel> make_channel(const std::string& address,
                                            const ActorClientOptions& options) {
  grpc::ChannelArguments args;
  // A response carries n rollouts with their routing traces; for a real model that outgrows
  // gRPC's default 4 MiB receive limit.
  args.SetMaxReceiveMessageSize(-1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
              int(std::clamp<int64_t>(options.initial_backoff.count(), 1,
                                      kMaxReconnectBackoff.count())));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, int(kMaxReconnectBackoff.count()));
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

void set_deadline(grpc::ClientContext& context, std::chrono::milliseconds deadline) {
  context.set_deadline(std::chrono::system_clock::now() + deadline);
}

const ActorClientOptions& checked_options(const ActorClientOptions& options) {
  if (options.max_attempts < 1) {
    fail("actor client: max_attempts must be >= 1, got {}", options.max_attempts);
  }
  if (options.deadline.count() <= 0) fail("actor client: the deadline must be positive");
  if (options.initial_backoff.count() < 0) fail("actor client: initial_backoff must be >= 0");
  return options;
}

// grpc.health.v1 messages in the protobuf wire format, by hand: Debian's libgrpc++ serves the
// health service but ships no client stubs for it. HealthCheckRequest {string service = 1},
// HealthCheckResponse {ServingStatus status = 1} with SERVING = 1.
std::string health_check_request(const std::string& service) {
  RLHF_CHECK(service.size() < 128, "one-byte length varint");
  return std::string{char(0x0A), char(service.size())} + service;
}

bool health_response_serving(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) return false;
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return bytes == std::string{char(0x08), char(0x01)};  // field 1 (varint) = SERVING
}

}  // namespace

class ActorClient::Impl {
 public:
  Impl(std::string address, const ActorClientOptions& options)
      : address_(std::move(address)), target_("actor " + address_),
        options_(checked_options(options)), channel_(make_channel(address_, options_)),
        stub_(v1::ActorService::NewStub(channel_)) {}

  const std::string& address() const { return address_; }

  std::vector<v1::GenerateResponse> generate(const v1::GenerateRequest& request) {
    return with_retries([&] {
      grpc::ClientContext context;
      set_deadline(context, options_.deadline);
      std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
          stub_->Generate(&context, request);
      std::vector<v1::GenerateResponse> responses;
      v1::GenerateResponse response;
      while (reader->Read(&response)) responses.push_back(std::move(response));
      check("Generate", reader->Finish());
      return responses;
    });
  }

  uint64_t update_weights(const WeightPayload& payload) {
    grpc::ClientContext context;
    set_deadline(context, options_.deadline);
    v1::UpdateWeightsResponse response;
    std::unique_ptr<grpc::ClientWriter<v1::WeightChunk>> writer =
        stub_->UpdateWeights(&context, &response);
    // Chunk by chunk, so a large payload is never copied into messages all at once. A failed
    // write means the actor ended the call early (a stale version is refused at the first
    // chunk); Finish() says why.
    const size_t n = weight_chunk_count(payload);
    for (size_t i = 0; i < n; ++i) {
      if (!writer->Write(make_weight_chunk(payload, i))) break;
    }
    writer->WritesDone();
    check("UpdateWeights", writer->Finish());
    return response.version();
  }

  v1::ActorStatus status() {
    return with_retries([&] {
      grpc::ClientContext context;
      set_deadline(context, options_.deadline);
      v1::ActorStatus status;
      check("Status", stub_->Status(&context, v1::ActorStatusRequest(), &status));
      return status;
    });
  }

  bool healthy(std::chrono::milliseconds timeout) {
    const std::string request_bytes = health_check_request("rlhf.v1.ActorService");
    grpc::Slice request_slice(request_bytes);
    grpc::ByteBuffer request(&request_slice, 1);
    grpc::ByteBuffer response;
    grpc::ClientContext context;
    set_deadline(context, timeout);
    // Shared with the completion callback, which may still be returning from set_value when
    // get() wakes us.
    auto done = std::make_shared<std::promise<grpc::Status>>();
    grpc::GenericStub stub(channel_);
    stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request,
                   &response, [done](grpc::Status status) { done->set_value(std::move(status)); });
    const grpc::Status status = done->get_future().get();
    return status.ok() && health_response_serving(response);
  }

 private:
  void check(const char* method, const grpc::Status& status) const {
    if (!status.ok()) {
      throw RpcError(target_, method, int(status.error_code()), status.error_message());
    }
  }

  // Runs `attempt` until it succeeds, fails with a non-transient code, or max_attempts ran out;
  // the waits between attempts double from initial_backoff.
  template <typename Attempt>
  auto with_retries(const Attempt& attempt) -> decltype(attempt()) {
    std::chrono::milliseconds backoff = options_.initial_backoff;
    for (int tries = 1;; ++tries) {
      try {
        return attempt();
      } catch (const RpcError& e) {
        if (!e.transient() || tries >= options_.max_attempts) throw;
        spdlog::debug("{} (attempt {} of {}; retrying in {} ms)", e.what(), tries,
                      options_.max_attempts, backoff.count());
      }
      std::this_thread::sleep_for(backoff);
      backoff *= 2;
    }
  }

  const std::string address_;
  const std::string target_;
  const ActorClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::ActorService::Stub> stub_;
};

ActorClient::ActorClient(std::string address, ActorClientOptions options)
    : impl_(std::make_unique<Impl>(std::move(address), options)) {}

ActorClient::~ActorClient() = default;

const std::string& ActorClient::address() const { return impl_->address(); }

std::vector<v1::GenerateResponse> ActorClient::generate(const v1::GenerateRequest& request) {
  return impl_->generate(request);
}

uint64_t ActorClient::update_weights(const WeightPayload& payload) {
  return impl_->update_weights(payload);
}

v1::ActorStatus ActorClient::status() { return impl_->status(); }

bool ActorClient::healthy(std::chrono::milliseconds timeout) { return impl_->healthy(timeout); }

WeightPayload fetch_learner_weights(const std::string& learner_address,
                                    std::chrono::milliseconds wait, ActorClientOptions options) {
  checked_options(options);
  const std::string target = "learner " + learner_address;
  const std::shared_ptr<grpc::Channel> channel = make_channel(learner_address, options);
  const std::unique_ptr<v1::LearnerService::Stub> stub = v1::LearnerService::NewStub(channel);
  const auto give_up = std::chrono::steady_clock::now() + wait;
  std::chrono::milliseconds backoff = options.initial_backoff;
  for (;;) {
    grpc::ClientContext context;
    set_deadline(context, options.deadline);
    std::unique_ptr<grpc::ClientReader<v1::WeightChunk>> reader =
        stub->GetWeights(&context, v1::GetWeightsRequest());
    WeightAssembler assembler;
    std::optional<Error> stream_error;
    v1::WeightChunk chunk;
    while (reader->Read(&chunk)) {
      try {
        assembler.add(chunk);
      } catch (const Error& e) {
        stream_error = e;
        context.TryCancel();  // nothing more of this stream is wanted
        break;
      }
    }
    const grpc::Status status = reader->Finish();
    if (stream_error) throw *stream_error;
    if (status.ok()) return assembler.finish();
    const RpcError error(target, "GetWeights", int(status.error_code()), status.error_message());
    if (!error.transient() || std::chrono::steady_clock::now() + backoff > give_up) throw error;
    spdlog::info("waiting for learner at {} ({}; next try in {} ms)", learner_address,
                 rpc_code_name(error.code()), backoff.count());
    std::this_thread::sleep_for(backoff);
    backoff = std::clamp<std::chrono::milliseconds>(backoff * 2, std::chrono::milliseconds(1),
                                                    kMaxReconnectBackoff);
  }
}

}  // namespace rlhf
