#include "reward/reward_client.h"

#include <algorithm>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include "common/rpc_error.h"
#include "rlhf/v1/reward.grpc.pb.h"

namespace rlhf {

class RewardClient::Impl {
 public:
  Impl(const std::string& address, RewardClientOptions options)
      : target_("reward " + address), options_(options),
        channel_(grpc::CreateChannel(address, grpc::InsecureChannelCredentials())),
        stub_(v1::RewardService::NewStub(channel_)) {}

  // Runs `call` (one RPC on a fresh context) until it succeeds, fails for a reason that is
  // about the request, or runs out of attempts.
  template <typename Call>
  void with_retries(const char* method, Call call) {
    std::chrono::milliseconds backoff = options_.initial_backoff;
    for (int attempt = 1;; ++attempt) {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + options_.deadline);
      const grpc::Status status = call(context);
      if (status.ok()) return;
      const int code = int(status.error_code());
      const bool transient = code == RpcError::kUnavailable ||
                             code == RpcError::kDeadlineExceeded ||
                             code == RpcError::kResourceExhausted;
      if (!transient || attempt >= options_.max_attempts)
        throw RpcError(target_, method, code, status.error_message());
      spdlog::warn("{}: {} failed ({}: {}); retry {}/{} in {} ms", target_, method,
                   rpc_code_name(code), status.error_message(), attempt,
                   options_.max_attempts - 1, backoff.count());
      std::this_thread::sleep_for(backoff);
      backoff *= 2;
    }
  }

  std::string target_;
  RewardClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::RewardService::Stub> stub_;
};

RewardClient::RewardClient(std::string address, RewardClientOptions options)
    : address_(std::move(address)), impl_(std::make_unique<Impl>(address_, options)) {}

RewardClient::~RewardClient() = default;

namespace {

// Sends a batch request (ScoreRequest, CompareBatchRequest) in parts of at most `limit` items
// and joins the parts' results in order. Each part judges its items with its own seed stream
// (seed + index of its first item): a split request answers like separate requests would,
// deterministically. An empty request goes out as is, so the server's INVALID_ARGUMENT
// reaches the caller.
template <typename Request, typename Response, typename Call>
Response call_in_parts(const Request& request, int limit, Call call) {
  Response joined;
  for (int first = 0; first < request.items_size() || first == 0; first += limit) {
    Request part = request;
    part.clear_items();
    for (int i = first; i < std::min(request.items_size(), first + limit); ++i)
      *part.add_items() = request.items(i);
    part.set_seed(request.seed() + uint64_t(first));
    Response response = call(part);
    for (auto& result : *response.mutable_results()) *joined.add_results() = std::move(result);
    if (request.items_size() == 0) break;
  }
  return joined;
}

}  // namespace

v1::ScoreResponse RewardClient::score(const v1::ScoreRequest& request) {
  return call_in_parts<v1::ScoreRequest, v1::ScoreResponse>(
      request, impl_->options_.max_items_per_call, [&](const v1::ScoreRequest& part) {
        v1::ScoreResponse response;
        impl_->with_retries("Score", [&](grpc::ClientContext& context) {
          response.Clear();
          return impl_->stub_->Score(&context, part, &response);
        });
        return response;
      });
}

v1::CompareResponse RewardClient::compare(const v1::CompareRequest& request) {
  v1::CompareResponse response;
  impl_->with_retries("Compare", [&](grpc::ClientContext& context) {
    response.Clear();
    return impl_->stub_->Compare(&context, request, &response);
  });
  return response;
}

v1::CompareBatchResponse RewardClient::compare_batch(const v1::CompareBatchRequest& request) {
  return call_in_parts<v1::CompareBatchRequest, v1::CompareBatchResponse>(
      request, impl_->options_.max_items_per_call, [&](const v1::CompareBatchRequest& part) {
        v1::CompareBatchResponse response;
        impl_->with_retries("CompareBatch", [&](grpc::ClientContext& context) {
          response.Clear();
          return impl_->stub_->CompareBatch(&context, part, &response);
        });
        return response;
      });
}

bool RewardClient::reachable(std::chrono::milliseconds timeout) {
  return impl_->channel_->WaitForConnected(std::chrono::system_clock::now() + timeout);
}

}  // namespace rlhf
