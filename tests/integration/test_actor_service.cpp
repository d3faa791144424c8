// The actor service end to end: a real (small, random) policy checkpoint, an ActorEngine that
// packs its experts into MXFP4 as `rlhf serve actor` does by default, an ActorServer on a
// loopback port, and real gRPC channels to it (raw stubs, ActorClient, and the `rlhf` binary).
//
// The suite shares one server; weight updates move its version forward, so every test reads the
// version it starts from instead of assuming one.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <condition_variable>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/stubs/common.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "actor/actor_client.h"
#include "actor/actor_engine.h"
#include "actor/actor_service.h"
#include "actor/weight_transfer.h"
#include "common/error.h"
#include "common/rng.h"
#include "common/rpc_error.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/checkpoint.h"
#include "model/generate.h"
#include "model/tokenizer.h"
#include "rlhf/v1/actor.grpc.pb.h"
#include "rlhf/v1/learner.grpc.pb.h"
#include "tests/test_support.h"

extern char** environ;

namespace rlhf {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;

// Generous: a call is a few dozen decode steps of a tiny model; a loaded CI machine must not
// turn that into a failure. A hung server still fails the test instead of hanging it.
constexpr auto kCallDeadline = std::chrono::seconds(60);
constexpr int kMaxBatch = 4;
constexpr Fp4Format kServedFormat = Fp4Format::mxfp4;

void set_deadline(grpc::ClientContext& context) {
  context.set_deadline(std::chrono::system_clock::now() + kCallDeadline);
}

ModelConfig policy_config() {
  return actor_policy_config();
}

// A float policy with random weights, as bytes (what a learner sends).
std::string random_policy_bytes(uint64_t seed, ModelConfig config = policy_config()) {
  CpuOps<float> ops;
  Transformer<float> model(ops, config, 1, config.max_seq_len);
  model.init_random(seed);
  return serialize_policy(model, "byte", std::nullopt);
}

WeightPayload payload_of(uint64_t version, std::string bytes) {
  WeightPayload payload;
  payload.version = version;
  payload.bytes = std::move(bytes);
  return payload;
}

std::string address_of(int port) { return "127.0.0.1:" + std::to_string(port); }

// A fresh directory of this test process, for checkpoints.
fs::path scratch_dir(const std::string& name) {
  const fs::path dir =
      fs::temp_directory_path() / ("rlhf_actor_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::shared_ptr<grpc::Channel> loopback_channel(int port) {
  return grpc::CreateChannel(address_of(port), grpc::InsecureChannelCredentials());
}

v1::GenerateRequest good_request() {
  v1::GenerateRequest request;
  auto* a = request.add_prompts();
  a->set_prompt_index(5);
  a->set_text("add 2 and 3");
  auto* b = request.add_prompts();
  b->set_prompt_index(9);
  b->set_text("reverse abc");
  request.set_n(3);
  request.set_temperature(1.0);
  request.set_max_new_tokens(8);
  request.set_seed(1234);
  request.set_want_routing(true);
  return request;
}

// A port on which nothing listens: bound (so no one else takes it) but never listening, so
// connections to it are refused. Closed when the holder goes away.
class DeadPort {
 public:
  DeadPort() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    socklen_t len = sizeof(addr);
    EXPECT_EQ(::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    port_ = ntohs(addr.sin_port);
  }
  ~DeadPort() { ::close(fd_); }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
};

// LearnerService.GetWeights, streaming fixed chunks: the learner side of an actor's catch-up.
class FakeLearner final : public v1::LearnerService::Service {
 public:
  explicit FakeLearner(std::vector<v1::WeightChunk> chunks) : chunks_(std::move(chunks)) {}
  grpc::Status GetWeights(grpc::ServerContext* /*context*/,
                          const v1::GetWeightsRequest* /*request*/,
                          grpc::ServerWriter<v1::WeightChunk>* writer) override {
    for (const v1::WeightChunk& chunk : chunks_) {
      if (!writer->Write(chunk)) break;
    }
    return grpc::Status::OK;
  }

 private:
  std::vector<v1::WeightChunk> chunks_;
};

struct FakeLearnerServer {
  explicit FakeLearnerServer(std::vector<v1::WeightChunk> chunks) : service(std::move(chunks)) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    server = builder.BuildAndStart();
    EXPECT_TRUE(server && port > 0);
  }
  ~FakeLearnerServer() { server->Shutdown(std::chrono::system_clock::now()); }
  FakeLearner service;
  int port = 0;
  std::unique_ptr<grpc::Server> server;
};

// One checkpoint, engine and server for the whole suite, built as `rlhf serve actor` builds
// them (checkpoint -> ActorEngine with MXFP4 experts -> ActorServer).
struct ServedActor {
  fs::path dir;
  std::string checkpoint;
  std::unique_ptr<ActorEngine> engine;
  std::unique_ptr<ActorServer> server;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::ActorService::Stub> stub;
};

class ActorServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    served_ = std::make_unique<ServedActor>();
    ServedActor& s = *served_;
    s.dir = fs::temp_directory_path() / ("rlhf_actor_service_" + std::to_string(::getpid()));
    fs::create_directories(s.dir);
    s.checkpoint = (s.dir / "policy.safetensors").string();
    {
      CpuOps<float> ops;
      Transformer<float> fresh(ops, policy_config(), 1, policy_config().max_seq_len);
      fresh.init_random(2024);
      checkpoint_save(s.checkpoint, fresh, "byte");
    }
    ActorEngineOptions options;
    options.max_batch = kMaxBatch;
    options.expert_format = kServedFormat;
    s.engine = std::make_unique<ActorEngine>(s.checkpoint, options);
    s.server = std::make_unique<ActorServer>(*s.engine, "127.0.0.1:0");
    s.channel = loopback_channel(s.server->port());
    s.stub = v1::ActorService::NewStub(s.channel);
  }

  static void TearDownTestSuite() {
    if (!served_) return;
    served_->server->shutdown();
    served_->server.reset();
    served_->engine.reset();
    fs::remove_all(served_->dir);
    served_.reset();
  }

  static int port() { return served_->server->port(); }

  static grpc::Status generate(const v1::GenerateRequest& request,
                               std::vector<v1::GenerateResponse>* responses) {
    responses->clear();
    grpc::ClientContext context;
    set_deadline(context);
    auto reader = served_->stub->Generate(&context, request);
    v1::GenerateResponse response;
    while (reader->Read(&response)) responses->push_back(response);
    return reader->Finish();
  }

  static std::vector<v1::GenerateResponse> generate_ok(const v1::GenerateRequest& request) {
    std::vector<v1::GenerateResponse> responses;
    const grpc::Status status = generate(request, &responses);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return responses;
  }

  static grpc::Status upload(const std::vector<v1::WeightChunk>& chunks,
                             v1::UpdateWeightsResponse* response) {
    grpc::ClientContext context;
    set_deadline(context);
    auto writer = served_->stub->UpdateWeights(&context, response);
    for (const v1::WeightChunk& chunk : chunks) {
      if (!writer->Write(chunk)) break;  // the server ended the call; Finish says why
    }
    writer->WritesDone();
    return writer->Finish();
  }

  static v1::ActorStatus status() {
    v1::ActorStatus status;
    grpc::ClientContext context;
    set_deadline(context);
    const grpc::Status rpc = served_->stub->Status(&context, v1::ActorStatusRequest(), &status);
    EXPECT_TRUE(rpc.ok()) << rpc.error_message();
    return status;
  }

  // Applies a fresh random policy as the next version; returns that version.
  static uint64_t apply_new_version(uint64_t seed) {
    const uint64_t next = status().version() + 1;
    v1::UpdateWeightsResponse response;
    const grpc::Status rpc = upload(make_weight_chunks(payload_of(next, random_policy_bytes(seed))),
                                    &response);
    EXPECT_TRUE(rpc.ok()) << rpc.error_message();
    EXPECT_EQ(response.version(), next);
    return next;
  }

  static std::unique_ptr<ServedActor> served_;
};

std::unique_ptr<ServedActor> ActorServiceTest::served_;

std::string serialized(const std::vector<v1::GenerateResponse>& responses) {
  std::string out;
  for (const v1::GenerateResponse& r : responses) out += r.SerializeAsString();
  return out;
}

const v1::GenerateResponse* find_prompt(const std::vector<v1::GenerateResponse>& responses,
                                        uint64_t prompt_index) {
  for (const v1::GenerateResponse& r : responses) {
    if (r.prompt_index() == prompt_index) return &r;
  }
  return nullptr;
}

void expect_invalid_argument(const grpc::Status& status, const std::string& field,
                             const std::string& what) {
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
      << what << ": " << status.error_message();
  EXPECT_NE(status.error_message().find(field), std::string::npos)
      << what << ": the message should name '" << field << "': " << status.error_message();
}

// Awaits a condition on the server's Status (e.g. a counter moving) for up to 30 s.
bool await_status(const std::function<bool(const v1::ActorStatus&)>& condition,
                  const std::function<v1::ActorStatus()>& read) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < give_up) {
    if (condition(read())) return true;
    std::this_thread::sleep_for(milliseconds(10));
  }
  return false;
}

TEST_F(ActorServiceTest, GenerateReturnsNSamplesPerPromptWithTokensLogprobsAndVersion) {
  const v1::GenerateRequest request = good_request();
  const uint64_t version = status().version();
  const std::vector<v1::GenerateResponse> responses = generate_ok(request);
  ASSERT_EQ(responses.size(), 2u);
  const ByteTokenizer tokenizer;
  const int eos = tokenizer.special(SpecialToken::kEos);
  for (int p = 0; p < 2; ++p) {
    const v1::GenerateResponse& response = responses[p];
    EXPECT_EQ(response.prompt_index(), request.prompts(p).prompt_index());
    ASSERT_EQ(response.rollouts_size(), request.n());
    const std::vector<int32_t> prompt_tokens = format_prompt(tokenizer, request.prompts(p).text());
    for (int s = 0; s < request.n(); ++s) {
      const v1::Rollout& r = response.rollouts(s);
      EXPECT_EQ(r.prompt_index(), request.prompts(p).prompt_index());
      EXPECT_EQ(r.sample_index(), uint32_t(s));
      EXPECT_EQ(r.policy_version(), version);
      EXPECT_EQ(r.actor(), address_of(port()));
      EXPECT_EQ(std::vector<int32_t>(r.prompt_tokens().begin(), r.prompt_tokens().end()),
                prompt_tokens);
      const std::vector<int32_t> tokens(r.response_tokens().begin(), r.response_tokens().end());
      ASSERT_GE(tokens.size(), 1u);
      ASSERT_LE(tokens.size(), size_t(request.max_new_tokens()));
      ASSERT_EQ(r.logprobs_size(), int(tokens.size()));
      for (float logprob : r.logprobs()) {
        EXPECT_TRUE(std::isfinite(logprob));
        EXPECT_LE(logprob, 0.0f);
      }
      // The text is the decoded response, made valid UTF-8 (a random byte-level model emits
      // arbitrary bytes); protobuf's own validator is the independent judge.
      const std::string decoded = tokenizer.decode(tokens);
      EXPECT_TRUE(google::protobuf::internal::IsStructurallyValidUTF8(r.text()));
      if (google::protobuf::internal::IsStructurallyValidUTF8(decoded)) {
        EXPECT_EQ(r.text(), decoded);
      } else {
        EXPECT_NE(r.text().find("\xEF\xBF\xBD"), std::string::npos) << "U+FFFD expected";
      }
      EXPECT_EQ(r.finished(), tokens.back() == eos);
      if (!r.finished()) {
        EXPECT_EQ(int(tokens.size()), request.max_new_tokens());
      }
      // Routing over prompt + response without the last token; one MoE layer, top-2 of 4.
      const v1::RoutingTrace& trace = r.routing();
      EXPECT_EQ(trace.n_layers(), policy_config().n_moe_layers());
      EXPECT_EQ(trace.top_k(), policy_config().top_k);
      EXPECT_EQ(trace.n_tokens(), int(prompt_tokens.size() + tokens.size()) - 1);
      EXPECT_EQ(trace.expert_ids_size(), trace.n_layers() * trace.n_tokens() * trace.top_k());
      for (int32_t id : trace.expert_ids()) {
        EXPECT_GE(id, 0);
        EXPECT_LT(id, policy_config().n_routed_experts);
      }
    }
  }

  // Without want_routing no trace is sent.
  v1::GenerateRequest no_routing = good_request();
  no_routing.set_want_routing(false);
  for (const v1::GenerateResponse& response : generate_ok(no_routing)) {
    for (const v1::Rollout& r : response.rollouts()) EXPECT_FALSE(r.has_routing());
  }
}

TEST_F(ActorServiceTest, RolloutsFollowTheSeedRuleOnTheFp4Experts) {
  // A known policy, so the test can compute what the actor must return.
  const uint64_t next = status().version() + 1;
  const std::string bytes = random_policy_bytes(77);
  v1::UpdateWeightsResponse update;
  ASSERT_TRUE(upload(make_weight_chunks(payload_of(next, bytes)), &update).ok());

  // The actor's pipeline by hand: float payload -> MXFP4-packed policy -> Generator on n copies
  // of the prompt with seed mix_seed(request.seed, prompt_index).
  CpuOps<float> ops;
  std::string packed_bytes;
  {
    const auto float_model = load_policy(bytes, ops, 1);
    packed_bytes = serialize_policy(*float_model, "byte", kServedFormat);
  }
  const auto packed = load_policy(packed_bytes, ops, kMaxBatch);
  const auto unpacked = load_policy(bytes, ops, kMaxBatch);
  const ByteTokenizer tokenizer;
  Generator generator(*packed, tokenizer, kMaxBatch);
  Generator float_generator(*unpacked, tokenizer, kMaxBatch);

  const v1::GenerateRequest request = good_request();
  const std::vector<v1::GenerateResponse> responses = generate_ok(request);
  ASSERT_EQ(responses.size(), 2u);
  double float_difference = 0;
  for (int p = 0; p < 2; ++p) {
    SamplingParams params;
    params.temperature = request.temperature();
    params.max_new_tokens = request.max_new_tokens();
    params.seed = mix_seed(request.seed(), request.prompts(p).prompt_index());
    const std::vector<std::vector<int32_t>> copies(
        size_t(request.n()), format_prompt(tokenizer, request.prompts(p).text()));
    const std::vector<Generation> expected = generator.generate(copies, params);
    const std::vector<Generation> from_float = float_generator.generate(copies, params);
    ASSERT_EQ(responses[p].rollouts_size(), request.n());
    for (int s = 0; s < request.n(); ++s) {
      const v1::Rollout& r = responses[p].rollouts(s);
      EXPECT_EQ(r.policy_version(), next);
      EXPECT_EQ(std::vector<int32_t>(r.response_tokens().begin(), r.response_tokens().end()),
                expected[s].tokens)
          << "prompt " << p << " sample " << s;
      // Bitwise: the same packed weights, ops, shapes and random stream.
      EXPECT_EQ(std::vector<float>(r.logprobs().begin(), r.logprobs().end()),
                expected[s].logprobs)
          << "prompt " << p << " sample " << s;
      float_difference = std::max(
          float_difference, double(std::abs(r.logprobs(0) - from_float[s].logprobs[0])));
    }
  }
  // The check can fail: float experts give other logprobs than the FP4 ones served.
  EXPECT_GT(float_difference, 1e-4);
}

TEST_F(ActorServiceTest, GenerateIsReproducibleAndIndependentOfTheOtherPrompts) {
  const v1::GenerateRequest request = good_request();
  const std::vector<v1::GenerateResponse> first = generate_ok(request);
  const std::vector<v1::GenerateResponse> second = generate_ok(request);
  ASSERT_EQ(first.size(), 2u);
  EXPECT_EQ(serialized(first), serialized(second));

  // Prompt 9 alone, and among other prompts in another order: the same samples.
  v1::GenerateRequest alone = request;
  alone.mutable_prompts()->DeleteSubrange(0, 1);
  ASSERT_EQ(alone.prompts(0).prompt_index(), 9u);
  v1::GenerateRequest crowded = request;
  auto* extra = crowded.add_prompts();
  extra->set_prompt_index(13);
  extra->set_text("sort 3 1 2");
  crowded.mutable_prompts()->SwapElements(0, 2);
  const std::vector<v1::GenerateResponse> alone_responses = generate_ok(alone);
  const std::vector<v1::GenerateResponse> crowded_responses = generate_ok(crowded);
  ASSERT_EQ(alone_responses.size(), 1u);
  ASSERT_EQ(crowded_responses.size(), 3u);
  EXPECT_EQ(crowded_responses[0].prompt_index(), 13u);  // request order
  const v1::GenerateResponse* reference = find_prompt(first, 9);
  ASSERT_NE(reference, nullptr);
  EXPECT_EQ(alone_responses[0].SerializeAsString(), reference->SerializeAsString());
  ASSERT_NE(find_prompt(crowded_responses, 9), nullptr);
  EXPECT_EQ(find_prompt(crowded_responses, 9)->SerializeAsString(), reference->SerializeAsString());

  // The seed and the prompt index both pick the random stream, and so does the sample index.
  auto tokens_of = [](const v1::Rollout& r) {
    return std::vector<int32_t>(r.response_tokens().begin(), r.response_tokens().end());
  };
  v1::GenerateRequest other_seed = request;
  other_seed.set_seed(request.seed() + 1);
  v1::GenerateRequest other_index = request;
  other_index.mutable_prompts(1)->set_prompt_index(10);
  const auto reseeded = generate_ok(other_seed);
  const auto reindexed = generate_ok(other_index);
  int differ_seed = 0, differ_index = 0, differ_sample = 0;
  for (int s = 0; s < request.n(); ++s) {
    differ_seed += tokens_of(reseeded[1].rollouts(s)) != tokens_of(reference->rollouts(s));
    differ_index += tokens_of(reindexed[1].rollouts(s)) != tokens_of(reference->rollouts(s));
    differ_sample += tokens_of(reference->rollouts(s)) != tokens_of(reference->rollouts(0));
  }
  EXPECT_GT(differ_seed, 0);
  EXPECT_GT(differ_index, 0);
  EXPECT_GT(differ_sample, 0);
}

TEST_F(ActorServiceTest, ConcurrentGenerateCallsAreAllAnswered) {
  std::vector<v1::GenerateRequest> requests;
  for (int i = 0; i < 3; ++i) {
    v1::GenerateRequest request = good_request();
    request.set_seed(100 + uint64_t(i));
    requests.push_back(request);
  }
  // Answered alone first, then all at once: the same results (batching does not change them).
  std::vector<std::string> alone;
  for (const v1::GenerateRequest& request : requests) {
    alone.push_back(serialized(generate_ok(request)));
  }
  std::vector<std::future<std::pair<grpc::Status, std::vector<v1::GenerateResponse>>>> calls;
  for (const v1::GenerateRequest& request : requests) {
    calls.push_back(std::async(std::launch::async, [request] {
      std::vector<v1::GenerateResponse> responses;
      const grpc::Status status = generate(request, &responses);
      return std::make_pair(status, responses);
    }));
  }
  for (size_t i = 0; i < calls.size(); ++i) {
    const auto [rpc, responses] = calls[i].get();
    ASSERT_TRUE(rpc.ok()) << rpc.error_message();
    ASSERT_EQ(responses.size(), 2u);
    EXPECT_EQ(serialized(responses), alone[i]) << "request " << i;
  }
}

TEST_F(ActorServiceTest, UpdateWeightsAppliesANewVersion) {
  const v1::ActorStatus before = status();
  const v1::GenerateRequest request = good_request();
  const std::vector<v1::GenerateResponse> old_outputs = generate_ok(request);

  const uint64_t next = before.version() + 1;
  v1::UpdateWeightsResponse response;
  const grpc::Status rpc =
      upload(make_weight_chunks(payload_of(next, random_policy_bytes(555)), 16 * 1024), &response);
  ASSERT_TRUE(rpc.ok()) << rpc.error_message();
  EXPECT_EQ(response.version(), next);

  const v1::ActorStatus after = status();
  EXPECT_EQ(after.version(), next);
  EXPECT_EQ(after.weight_updates_applied(), before.weight_updates_applied() + 1);
  EXPECT_EQ(after.weight_updates_rejected(), before.weight_updates_rejected());
  EXPECT_EQ(after.expert_format(), "mxfp4");

  const std::vector<v1::GenerateResponse> new_outputs = generate_ok(request);
  ASSERT_EQ(new_outputs.size(), 2u);
  for (const v1::GenerateResponse& r : new_outputs) {
    for (const v1::Rollout& rollout : r.rollouts()) EXPECT_EQ(rollout.policy_version(), next);
  }
  // Other weights, other rollouts (same seed and prompts).
  int changed = 0;
  for (size_t p = 0; p < new_outputs.size(); ++p) {
    for (int s = 0; s < request.n(); ++s) {
      changed += new_outputs[p].rollouts(s).logprobs(0) != old_outputs[p].rollouts(s).logprobs(0);
    }
  }
  EXPECT_GT(changed, 0);
}

TEST_F(ActorServiceTest, ARequestRunsEntirelyOnOneVersionWhileUpdatesArrive) {
  // Many prompts per call, so that a swap landing between two prompts of one call (which must
  // not change the version that call runs on) is the likely case.
  v1::GenerateRequest request = good_request();
  for (int i = 0; i < 6; ++i) {
    auto* more = request.add_prompts();
    more->set_prompt_index(20 + uint64_t(i));
    more->set_text("sort " + std::to_string(i) + " 1 2");
  }
  const uint64_t old_version = status().version();
  const std::string old_outputs = serialized(generate_ok(request));

  // A caller generates in a loop while the update lands, until it has seen the new version.
  std::mutex mutex;
  std::condition_variable progress;
  std::vector<std::vector<v1::GenerateResponse>> seen;
  bool saw_new = false;
  std::thread caller([&] {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    for (;;) {
      std::vector<v1::GenerateResponse> responses = generate_ok(request);
      std::lock_guard<std::mutex> lock(mutex);
      if (responses.empty()) return;
      saw_new = saw_new || responses[0].rollouts(0).policy_version() != old_version;
      seen.push_back(std::move(responses));
      progress.notify_all();
      if (saw_new || std::chrono::steady_clock::now() > give_up) return;
    }
  });
  {
    // At least one call on the old version first, so the update lands mid-loop.
    std::unique_lock<std::mutex> lock(mutex);
    progress.wait(lock, [&] { return !seen.empty(); });
  }
  const uint64_t new_version = apply_new_version(1717);
  caller.join();
  ASSERT_TRUE(saw_new);
  const std::string new_outputs = serialized(generate_ok(request));
  ASSERT_NE(new_outputs, old_outputs);

  // Every call ran on one version from its first prompt to its last, and computed exactly what
  // that version computes alone.
  for (size_t call = 0; call < seen.size(); ++call) {
    const uint64_t version = seen[call][0].rollouts(0).policy_version();
    ASSERT_TRUE(version == old_version || version == new_version) << version;
    ASSERT_EQ(seen[call].size(), 8u);
    for (const v1::GenerateResponse& response : seen[call]) {
      for (const v1::Rollout& rollout : response.rollouts()) {
        EXPECT_EQ(rollout.policy_version(), version) << "call " << call;
      }
    }
    EXPECT_EQ(serialized(seen[call]), version == old_version ? old_outputs : new_outputs)
        << "call " << call;
  }
}

TEST_F(ActorServiceTest, ABadUpdateIsRejectedAndTheOldVersionKeepsServing) {
  const v1::GenerateRequest request = good_request();
  const std::vector<v1::GenerateResponse> outputs_before = generate_ok(request);
  const v1::ActorStatus before = status();
  const uint64_t next = before.version() + 1;
  const WeightPayload payload = payload_of(next, random_policy_bytes(666));
  v1::UpdateWeightsResponse response;

  std::vector<v1::WeightChunk> bad_crc = make_weight_chunks(payload, 8192);
  bad_crc[0].set_crc32c(bad_crc[0].crc32c() ^ 1u);
  expect_invalid_argument(upload(bad_crc, &response), "CRC-32C mismatch", "bad checksum");

  std::vector<v1::WeightChunk> flipped = make_weight_chunks(payload, 8192);
  (*flipped[1].mutable_data())[3] ^= 0x40;
  expect_invalid_argument(upload(flipped, &response), "CRC-32C mismatch", "a flipped bit");

  std::vector<v1::WeightChunk> short_stream = make_weight_chunks(payload, 8192);
  short_stream.pop_back();
  expect_invalid_argument(upload(short_stream, &response), "size mismatch", "a missing chunk");

  std::vector<v1::WeightChunk> no_header = make_weight_chunks(payload, 8192);
  no_header[0].clear_format();
  expect_invalid_argument(upload(no_header, &response), "no header", "no header");

  // Checksums fine, contents not a checkpoint.
  expect_invalid_argument(
      upload(make_weight_chunks(payload_of(next, "not a checkpoint")), &response),
      "weight payload", "garbage bytes");

  // A readable checkpoint of another architecture.
  ModelConfig wider = policy_config();
  wider.d_model = 64;
  expect_invalid_argument(
      upload(make_weight_chunks(payload_of(next, random_policy_bytes(1, wider))), &response),
      "d_model", "another architecture");

  const v1::ActorStatus after = status();
  EXPECT_EQ(after.version(), before.version());
  EXPECT_EQ(after.weight_updates_applied(), before.weight_updates_applied());
  EXPECT_EQ(after.weight_updates_rejected(), before.weight_updates_rejected() + 6);
  // Still the old weights: the very same rollouts.
  EXPECT_EQ(serialized(generate_ok(request)), serialized(outputs_before));

  // And the good payload of that version still applies afterwards.
  ASSERT_TRUE(upload(make_weight_chunks(payload), &response).ok());
  EXPECT_EQ(status().version(), next);
}

TEST_F(ActorServiceTest, AStaleVersionIsFailedPrecondition) {
  const uint64_t current = apply_new_version(888);  // so that a lower version exists too
  v1::UpdateWeightsResponse response;
  for (const uint64_t version : {current, current - 1}) {
    const grpc::Status rpc =
        upload(make_weight_chunks(payload_of(version, random_policy_bytes(889))), &response);
    EXPECT_EQ(rpc.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << rpc.error_message();
    const std::string expected = fmt::format("stale version {}, serving {}", version, current);
    EXPECT_NE(rpc.error_message().find(expected), std::string::npos) << rpc.error_message();
  }
  EXPECT_EQ(status().version(), current);
}

TEST_F(ActorServiceTest, AnUploadCancelledHalfwayIsNotApplied) {
  const v1::GenerateRequest request = good_request();
  const std::vector<v1::GenerateResponse> outputs_before = generate_ok(request);
  const v1::ActorStatus before = status();
  const WeightPayload payload = payload_of(before.version() + 1, random_policy_bytes(999));
  const size_t chunk_bytes = 4096;
  const size_t n = weight_chunk_count(payload, chunk_bytes);
  ASSERT_GE(n, 4u);
  {
    grpc::ClientContext context;
    set_deadline(context);
    v1::UpdateWeightsResponse response;
    auto writer = served_->stub->UpdateWeights(&context, &response);
    for (size_t i = 0; i < n / 2; ++i) {
      ASSERT_TRUE(writer->Write(make_weight_chunk(payload, i, chunk_bytes)));
    }
    context.TryCancel();
    EXPECT_EQ(writer->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // The server has dropped the upload once it counts it as rejected.
  ASSERT_TRUE(await_status(
      [&](const v1::ActorStatus& s) {
        return s.weight_updates_rejected() > before.weight_updates_rejected();
      },
      [] { return status(); }));
  const v1::ActorStatus after = status();
  EXPECT_EQ(after.version(), before.version());
  EXPECT_EQ(after.weight_updates_applied(), before.weight_updates_applied());
  EXPECT_EQ(serialized(generate_ok(request)), serialized(outputs_before));

  // The same version, sent whole, applies.
  v1::UpdateWeightsResponse response;
  ASSERT_TRUE(upload(make_weight_chunks(payload, chunk_bytes), &response).ok());
  EXPECT_EQ(status().version(), payload.version);
}

TEST_F(ActorServiceTest, MalformedRequestsAreRejectedNamingTheFieldAndServingGoesOn) {
  std::vector<v1::GenerateResponse> responses;
  auto check = [&](const std::function<void(v1::GenerateRequest&)>& spoil, const std::string& field,
                   const std::string& what) {
    v1::GenerateRequest request = good_request();
    spoil(request);
    const grpc::Status status = generate(request, &responses);
    expect_invalid_argument(status, field, what);
    EXPECT_TRUE(responses.empty()) << what;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  check([](auto& r) { r.clear_prompts(); }, "prompts", "no prompts");
  check([](auto& r) {
    for (int i = 0; i < 256; ++i) {
      auto* p = r.add_prompts();
      p->set_prompt_index(100 + uint64_t(i));
      p->set_text("x");
    }
  }, "prompts", "258 prompts");
  check([](auto& r) { r.set_n(0); }, "n:", "n = 0");
  check([](auto& r) { r.set_n(65); }, "n:", "n = 65");
  check([](auto& r) { r.set_max_new_tokens(0); }, "max_new_tokens", "max_new_tokens = 0");
  check([](auto& r) { r.set_max_new_tokens(65); }, "max_new_tokens",
        "max_new_tokens over the context");
  check([&](auto& r) { r.set_temperature(nan); }, "temperature", "NaN temperature");
  check([&](auto& r) { r.set_temperature(inf); }, "temperature", "infinite temperature");
  check([](auto& r) { r.set_temperature(-0.5); }, "temperature", "negative temperature");
  check([](auto& r) { r.set_top_p(1.5); }, "top_p", "top_p = 1.5");
  check([](auto& r) { r.set_top_p(-0.1); }, "top_p", "top_p = -0.1");
  check([&](auto& r) { r.set_top_p(nan); }, "top_p", "NaN top_p");
  check([](auto& r) { r.set_top_k(-1); }, "top_k", "top_k = -1");
  check([](auto& r) { r.mutable_prompts(1)->set_text(""); }, "prompts[1].text", "empty text");
  check([](auto& r) { r.mutable_prompts(0)->set_text(std::string(1025, 'x')); }, "prompts[0].text",
        "1025-byte text");
  // Within the byte limit, but the prompt alone fills the 64-token context.
  check([](auto& r) { r.mutable_prompts(1)->set_text(std::string(61, 'x')); }, "max_seq_len",
        "over the context");
  check([](auto& r) { r.mutable_prompts(1)->set_prompt_index(5); }, "prompts[1].prompt_index",
        "a repeated prompt index");

  // In process, the engine applies the same checks.
  v1::GenerateRequest bad = good_request();
  bad.set_n(0);
  try {
    served_->engine->generate(bad);
    ADD_FAILURE() << "the engine generated for n = 0";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("n:"), std::string::npos) << e.what();
  }

  // The server keeps serving, and the edge cases that are valid are served: top_p 0 (off),
  // top_k 0 (off), temperature 0 (greedy), the largest n and max_new_tokens.
  v1::GenerateRequest edge = good_request();
  edge.set_top_p(0);
  edge.set_top_k(0);
  edge.set_temperature(0);
  edge.set_n(64);
  edge.mutable_prompts()->DeleteSubrange(1, 1);
  edge.set_max_new_tokens(64);
  const std::vector<v1::GenerateResponse> edge_responses = generate_ok(edge);
  ASSERT_EQ(edge_responses.size(), 1u);
  ASSERT_EQ(edge_responses[0].rollouts_size(), 64);
  // Greedy: every sample is the same.
  for (const v1::Rollout& r : edge_responses[0].rollouts()) {
    EXPECT_EQ(r.text(), edge_responses[0].rollouts(0).text());
  }
  ASSERT_EQ(generate_ok(good_request()).size(), 2u);
}

TEST_F(ActorServiceTest, ExpectVersionOtherThanTheServedOneIsFailedPrecondition) {
  const uint64_t version = status().version();
  v1::GenerateRequest request = good_request();
  request.set_expect_version(version + 5);
  std::vector<v1::GenerateResponse> responses;
  const grpc::Status rpc = generate(request, &responses);
  EXPECT_EQ(rpc.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << rpc.error_message();
  EXPECT_NE(rpc.error_message().find("expect_version"), std::string::npos) << rpc.error_message();
  EXPECT_TRUE(responses.empty());

  if (version > 0) {  // 0 means "any version"
    request.set_expect_version(version);
    for (const v1::GenerateResponse& r : generate_ok(request)) {
      for (const v1::Rollout& rollout : r.rollouts()) EXPECT_EQ(rollout.policy_version(), version);
    }
  }
}

TEST_F(ActorServiceTest, StatusCountsRequestsAndTokens) {
  const v1::ActorStatus before = status();
  const std::vector<v1::GenerateResponse> responses = generate_ok(good_request());
  uint64_t tokens = 0;
  for (const v1::GenerateResponse& r : responses) {
    for (const v1::Rollout& rollout : r.rollouts()) {
      tokens += uint64_t(rollout.response_tokens_size());
    }
  }
  const v1::ActorStatus after = status();
  EXPECT_EQ(after.requests_served(), before.requests_served() + 1);
  EXPECT_EQ(after.tokens_generated(), before.tokens_generated() + tokens);
  EXPECT_GT(after.tokens_per_second(), 0);
  EXPECT_EQ(after.expert_format(), "mxfp4");
}

// ---- ActorClient

TEST_F(ActorServiceTest, ActorClientGeneratesUpdatesAndReportsStatus) {
  ActorClient client(address_of(port()));
  EXPECT_TRUE(client.healthy(milliseconds(5000)));
  const v1::GenerateRequest request = good_request();
  EXPECT_EQ(serialized(client.generate(request)), serialized(generate_ok(request)));

  const uint64_t next = client.status().version() + 1;
  EXPECT_EQ(client.update_weights(payload_of(next, random_policy_bytes(4242))), next);
  EXPECT_EQ(client.status().version(), next);

  // Refusals are RpcErrors with the code and the server's reason.
  try {
    client.update_weights(payload_of(next, random_policy_bytes(4243)));
    ADD_FAILURE() << "a stale update was accepted";
  } catch (const RpcError& e) {
    EXPECT_EQ(e.code(), RpcError::kFailedPrecondition);
    EXPECT_FALSE(e.transient());
    EXPECT_EQ(std::string(e.what()),
              fmt::format("actor {}: UpdateWeights failed: FAILED_PRECONDITION: stale version {}, "
                          "serving {}",
                          address_of(port()), next, next));
  }
  v1::GenerateRequest bad = request;
  bad.set_n(0);
  try {
    client.generate(bad);
    ADD_FAILURE() << "n = 0 was accepted";
  } catch (const RpcError& e) {
    EXPECT_EQ(e.code(), RpcError::kInvalidArgument);
    EXPECT_NE(e.detail().find("n:"), std::string::npos) << e.what();
  }
}

TEST(ActorClient, AnActorThatIsDownIsUnavailableAfterTheRetries) {
  const DeadPort dead;
  ActorClientOptions options;
  options.max_attempts = 3;
  options.initial_backoff = milliseconds(100);
  options.deadline = milliseconds(5000);
  ActorClient client(address_of(dead.port()), options);
  EXPECT_FALSE(client.healthy(milliseconds(1000)));

  const auto start = std::chrono::steady_clock::now();
  try {
    client.generate(good_request());
    ADD_FAILURE() << "generate against a dead port succeeded";
  } catch (const RpcError& e) {
    EXPECT_EQ(e.code(), RpcError::kUnavailable) << e.what();
    EXPECT_TRUE(e.transient());
    const std::string prefix =
        fmt::format("actor {}: Generate failed: UNAVAILABLE: ", address_of(dead.port()));
    EXPECT_EQ(std::string(e.what()).substr(0, prefix.size()), prefix) << e.what();
  }
  const auto took = std::chrono::steady_clock::now() - start;
  // Two waits between three attempts (100 + 200 ms) prove the retries; the bound proves they
  // end (connections to a closed loopback port are refused at once).
  EXPECT_GE(took, milliseconds(300));
  EXPECT_LT(took, std::chrono::seconds(10));

  try {
    client.status();
    ADD_FAILURE() << "status against a dead port succeeded";
  } catch (const RpcError& e) {
    EXPECT_EQ(e.code(), RpcError::kUnavailable) << e.what();
  }
  // An update is never retried: one attempt that fails at once, where a retry would first
  // wait the 100 + 200 ms of backoff.
  const auto update_start = std::chrono::steady_clock::now();
  try {
    client.update_weights(payload_of(1, "x"));
    ADD_FAILURE() << "update_weights against a dead port succeeded";
  } catch (const RpcError& e) {
    EXPECT_EQ(e.code(), RpcError::kUnavailable) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - update_start, milliseconds(300));
}

TEST_F(ActorServiceTest, HealthTurnsNotServingOnShutdown) {
  // A second server on the same engine; it serves nothing but health checks here.
  ActorServer second(*served_->engine, "127.0.0.1:0");
  ASSERT_NE(second.port(), port());
  ActorClient client(address_of(second.port()));
  EXPECT_TRUE(client.healthy(milliseconds(5000)));
  std::thread stopper([&second] { second.shutdown(); });
  second.wait();
  stopper.join();
  second.shutdown();  // harmless
  EXPECT_FALSE(client.healthy(milliseconds(1000)));
  // The first server goes on; the engine's address is the last one set (the second server's),
  // so restore it for the tests that check Rollout.actor.
  served_->engine->set_address(address_of(port()));
}

TEST(ActorServer, AnAddressThatCannotBeBoundIsAnError) {
  const fs::path dir = scratch_dir("bind");
  const std::string path = (dir / "policy.safetensors").string();
  {
    CpuOps<float> ops;
    Transformer<float> model(ops, policy_config(), 1, policy_config().max_seq_len);
    model.init_random(1);
    checkpoint_save(path, model, "byte");
  }
  ActorEngineOptions options;
  options.max_batch = 1;
  options.expert_format = std::nullopt;
  ActorEngine engine(path, options);
  EXPECT_EQ(engine.expert_format_name(), "fp32");
  ActorServer first(engine, "127.0.0.1:0");
  EXPECT_THROW((ActorServer{engine, address_of(first.port())}), Error);
  EXPECT_THROW((ActorServer{engine, "not an address"}), Error);

  // A packed checkpoint in another format than the one asked for is refused at start.
  const std::string packed = (dir / "packed.safetensors").string();
  {
    CpuOps<float> ops;
    Transformer<float> model(ops, policy_config(), 1, policy_config().max_seq_len);
    model.init_random(1);
    checkpoint_save_packed(packed, model, "byte", Fp4Format::nvfp4);
  }
  ActorEngineOptions mx;
  mx.expert_format = Fp4Format::mxfp4;
  try {
    ActorEngine wrong(packed, mx);
    ADD_FAILURE() << "an nvfp4 checkpoint was served as mxfp4";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nvfp4"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

// ---- Catching up from the learner

TEST(FetchLearnerWeights, PullsAndChecksTheLearnersPolicy) {
  const WeightPayload payload = payload_of(12, random_policy_bytes(31));
  FakeLearnerServer learner(make_weight_chunks(payload, 10000));
  const WeightPayload fetched =
      fetch_learner_weights(address_of(learner.port), milliseconds(5000));
  EXPECT_EQ(fetched.version, 12u);
  EXPECT_EQ(fetched.bytes, payload.bytes);

  std::vector<v1::WeightChunk> corrupted = make_weight_chunks(payload, 10000);
  (*corrupted.back().mutable_data())[0] ^= 1;
  FakeLearnerServer bad_learner(corrupted);
  try {
    fetch_learner_weights(address_of(bad_learner.port), milliseconds(5000));
    ADD_FAILURE() << "a corrupted stream was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CRC-32C mismatch"), std::string::npos) << e.what();
  }
}

TEST(FetchLearnerWeights, GivesUpOnALearnerThatStaysDown) {
  const DeadPort dead;
  ActorClientOptions options;
  options.initial_backoff = milliseconds(50);
  const auto start = std::chrono::steady_clock::now();
  try {
    fetch_learner_weights(address_of(dead.port()), milliseconds(400), options);
    ADD_FAILURE() << "fetched from a dead port";
  } catch (const RpcError& e) {
    EXPECT_EQ(e.code(), RpcError::kUnavailable);
    const std::string expected = "learner " + address_of(dead.port()) + ": GetWeights failed";
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
  }
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_GE(took, milliseconds(50 + 100));  // it waited and retried
  EXPECT_LT(took, std::chrono::seconds(10));
}

// ---- rlhf serve actor

// The `rlhf` binary as a child process with its stderr (the log) on a pipe.
class ServeProcess {
 public:
  explicit ServeProcess(const std::vector<std::string>& args) {
    int fds[2];
    EXPECT_EQ(::pipe(fds), 0);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 2);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    posix_spawn_file_actions_addclose(&actions, fds[1]);
    std::vector<std::string> argv_strings = {RLHF_BINARY};
    argv_strings.insert(argv_strings.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& s : argv_strings) argv.push_back(s.data());
    argv.push_back(nullptr);
    EXPECT_EQ(::posix_spawn(&pid_, RLHF_BINARY, &actions, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&actions);
    ::close(fds[1]);
    log_ = ::fdopen(fds[0], "r");
  }
  ~ServeProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      exit_code();
    }
    if (log_) std::fclose(log_);
  }

  // Reads log lines until one contains `marker`; returns it ("" at the end of the log).
  std::string await_line(const std::string& marker) {
    char* line = nullptr;
    size_t size = 0;
    std::string found;
    while (::getline(&line, &size, log_) > 0) {
      log_text_ += line;
      if (std::string(line).find(marker) != std::string::npos) {
        found = line;
        break;
      }
    }
    std::free(line);
    return found;
  }

  const std::string& log_text() const { return log_text_; }
  void signal(int sig) { ::kill(pid_, sig); }

  int exit_code() {
    // Drain the log so the child never blocks on a full pipe while exiting.
    await_line("\x01never");
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

 private:
  pid_t pid_ = -1;
  FILE* log_ = nullptr;
  std::string log_text_;
};

TEST(ServeActor, ServesTheLearnersVersionAndStopsOnSigterm) {
  const fs::path dir = scratch_dir("serve");
  const std::string checkpoint = (dir / "policy.safetensors").string();
  {
    CpuOps<float> ops;
    Transformer<float> model(ops, policy_config(), 1, policy_config().max_seq_len);
    model.init_random(3);
    checkpoint_save(checkpoint, model, "byte");
  }
  // A restarted actor catches up: the learner is at version 3.
  FakeLearnerServer learner(make_weight_chunks(payload_of(3, random_policy_bytes(33))));
  ServeProcess actor({"serve", "actor", "--checkpoint", checkpoint, "--listen", "127.0.0.1:0",
                      "--expert-format", "nvfp4", "--max-batch", "2", "--threads", "1",
                      "--learner", address_of(learner.port), "--learner-wait", "10"});
  const std::string line = actor.await_line("listening on ");
  ASSERT_FALSE(line.empty()) << actor.log_text();
  EXPECT_NE(line.find("actor service listening on 127.0.0.1:"), std::string::npos) << line;
  std::string address = line.substr(line.find("listening on ") + std::strlen("listening on "));
  while (!address.empty() && std::isspace(static_cast<unsigned char>(address.back()))) {
    address.pop_back();
  }

  ActorClient client(address);
  const v1::ActorStatus status = client.status();
  EXPECT_EQ(status.version(), 3u);
  EXPECT_EQ(status.expert_format(), "nvfp4");
  EXPECT_EQ(status.weight_updates_applied(), 1u);
  const std::vector<v1::GenerateResponse> responses = client.generate(good_request());
  ASSERT_EQ(responses.size(), 2u);
  EXPECT_EQ(responses[0].rollouts(0).policy_version(), 3u);
  EXPECT_EQ(responses[0].rollouts(0).actor(), address);

  actor.signal(SIGTERM);
  EXPECT_EQ(actor.exit_code(), 0) << actor.log_text();
  EXPECT_NE(actor.log_text().find("actor service stopped"), std::string::npos) << actor.log_text();
  fs::remove_all(dir);
}

TEST(ServeActor, AnUnreachableLearnerIsAOneLineError) {
  const fs::path dir = scratch_dir("serve_down");
  const std::string checkpoint = (dir / "policy.safetensors").string();
  {
    CpuOps<float> ops;
    Transformer<float> model(ops, policy_config(), 1, policy_config().max_seq_len);
    model.init_random(3);
    checkpoint_save(checkpoint, model, "byte");
  }
  const DeadPort dead;
  ServeProcess actor({"serve", "actor", "--checkpoint", checkpoint, "--listen", "127.0.0.1:0",
                      "--learner", address_of(dead.port()), "--learner-wait", "0"});
  EXPECT_EQ(actor.exit_code(), 1);
  EXPECT_NE(actor.log_text().find("rlhf: error: learner " + address_of(dead.port()) +
                                  ": GetWeights failed: UNAVAILABLE"),
            std::string::npos)
      << actor.log_text();
  EXPECT_EQ(actor.log_text().find("listening on"), std::string::npos) << actor.log_text();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace rlhf
