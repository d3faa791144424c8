// The reward service end to end: a real (small, random) judge model saved and loaded as a
// checkpoint, a RewardServer on a loopback port, and real gRPC channels to it.
//
// A random model almost never writes a parseable "Score: N" / "Verdict: X" line before its
// token budget runs out, so its judgments are mostly INVALID; the tests check the shape and the
// bookkeeping of results (votes + invalid samples = k, retries bounded by the retry budget,
// no score without a vote), not their values.
#include <chrono>
#include <cmath>
#include <filesystem>
#include <future>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "common/error.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/checkpoint.h"
#include "model/tokenizer.h"
#include "reward/judge.h"
#include "reward/reward_service.h"
#include "rlhf/v1/reward.grpc.pb.h"
#include "tests/test_support.h"

namespace rlhf {
namespace {

namespace fs = std::filesystem;

// Generous: a call is a few hundred decode steps of a tiny model; a loaded CI machine must not
// turn that into a failure. A hung server still fails the test instead of hanging it.
constexpr auto kCallDeadline = std::chrono::seconds(60);
// VotingParams' default, which the service keeps: each INVALID sample is retried this often.
constexpr int kMaxRetries = VotingParams{}.max_retries;

void set_deadline(grpc::ClientContext& context) {
  context.set_deadline(std::chrono::system_clock::now() + kCallDeadline);
}

ModelConfig judge_model_config(const Tokenizer& tokenizer) {
  ModelConfig config;
  model_config_set_vocab(config, tokenizer);
  config.d_model = 32;
  config.n_layers = 2;
  config.n_heads = 2;
  config.n_kv_heads = 1;
  config.head_dim = 16;
  config.max_seq_len = 160;
  config.d_ff = 64;
  config.n_routed_experts = 4;
  config.d_expert = 32;
  return config;
}

// One judge model and server for the whole suite: built once, as `rlhf serve reward` builds
// them (checkpoint -> tokenizer named in it -> model -> Judge -> RewardServer).
struct ServedJudge {
  fs::path dir;
  CpuOps<float> ops;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Transformer<float>> model;
  std::unique_ptr<Judge> judge;
  std::unique_ptr<RewardServer> server;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::RewardService::Stub> stub;
};

std::shared_ptr<grpc::Channel> loopback_channel(int port) {
  return grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                             grpc::InsecureChannelCredentials());
}

// grpc.health.v1.Health/Check through a generic stub: Debian's libgrpc++ serves the health
// service but ships no client stubs for it, so the two one-field messages are written in the
// protobuf wire format by hand: HealthCheckRequest {string service = 1} and
// HealthCheckResponse {ServingStatus status = 1} (UNKNOWN 0, SERVING 1, NOT_SERVING 2).
constexpr int kHealthServing = 1;

grpc::Status health_check(grpc::Channel& channel, const std::string& service, int* serving_status) {
  std::string request;
  if (!service.empty()) {
    EXPECT_LT(service.size(), 128u);  // one-byte length varint
    request = std::string{char(0x0A), char(service.size())} + service;
  }
  grpc::Slice request_slice(request);
  grpc::ByteBuffer request_buffer(&request_slice, 1);
  grpc::ByteBuffer response_buffer;
  grpc::ClientContext context;
  set_deadline(context);
  grpc::GenericStub stub(std::shared_ptr<grpc::Channel>(&channel, [](grpc::Channel*) {}));
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request_buffer,
                 &response_buffer, [&done](grpc::Status status) { done.set_value(status); });
  const grpc::Status status = done.get_future().get();
  if (!status.ok()) return status;
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(response_buffer.Dump(&slices).ok());
  std::string response;
  for (const grpc::Slice& slice : slices) {
    response.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  if (response.empty()) {
    *serving_status = 0;  // proto3 leaves out a field at its default, UNKNOWN
  } else {
    EXPECT_EQ(response.size(), 2u);
    EXPECT_EQ(response[0], char(0x08));  // field 1, varint
    *serving_status = response.size() == 2 ? int(response[1]) : -1;
  }
  return status;
}

v1::ScoreItem score_item(const std::string& prompt, const std::string& response) {
  v1::ScoreItem item;
  item.set_prompt(prompt);
  item.set_response(response);
  return item;
}

v1::ScoreRequest good_score_request() {
  v1::ScoreRequest request;
  *request.add_items() = score_item("add 2 and 3", "5");
  v1::ScoreItem with_reference = score_item("reverse abc", "cba");
  with_reference.set_reference("cba");
  *request.add_items() = with_reference;
  request.set_k(2);
  request.set_temperature(1.0);
  request.set_seed(7);
  return request;
}

v1::CompareRequest good_compare_request() {
  v1::CompareRequest request;
  request.set_prompt("add 2 and 3");
  request.set_response_a("5");
  request.set_response_b("6");
  request.set_k(2);
  request.set_temperature(1.0);
  request.set_seed(11);
  request.set_both_orders(true);
  return request;
}

void expect_invalid_argument(const grpc::Status& status, const std::string& field,
                             const std::string& what) {
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
      << what << ": " << status.error_message();
  EXPECT_NE(status.error_message().find(field), std::string::npos)
      << what << ": the message should name '" << field << "': " << status.error_message();
}

void expect_result_bookkeeping(const v1::PointwiseResult& result, int k) {
  EXPECT_EQ(result.sample_scores_size() + result.invalid_samples(), k);
  EXPECT_EQ(result.reasoning_size(), result.sample_scores_size());
  EXPECT_EQ(result.valid(), result.sample_scores_size() > 0);
  // Every INVALID sample used its whole retry budget; no sample used more.
  EXPECT_GE(result.retries(), result.invalid_samples() * kMaxRetries);
  EXPECT_LE(result.retries(), k * kMaxRetries);
  if (!result.valid()) {
    EXPECT_EQ(result.score(), 0.0);
    return;
  }
  double sum = 0;
  for (int score : result.sample_scores()) {
    EXPECT_GE(score, 1);
    EXPECT_LE(score, 10);
    sum += score;
  }
  EXPECT_DOUBLE_EQ(result.score(), sum / result.sample_scores_size());
}

class RewardServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    served_ = std::make_unique<ServedJudge>();
    ServedJudge& s = *served_;
    s.dir = fs::temp_directory_path() / ("rlhf_reward_service_" + std::to_string(::getpid()));
    fs::create_directories(s.dir);
    const std::string path = (s.dir / "judge.safetensors").string();
    {
      const ByteTokenizer byte_tokenizer;
      Transformer<float> fresh(s.ops, judge_model_config(byte_tokenizer), 1,
                               judge_model_config(byte_tokenizer).max_seq_len);
      fresh.init_random(2024);
      checkpoint_save(path, fresh, byte_tokenizer.name());
    }
    s.tokenizer = make_tokenizer(checkpoint_read_info(path).tokenizer);
    constexpr int kMaxBatch = 4;
    s.model = checkpoint_load_model(path, s.ops, kMaxBatch);
    s.judge = std::make_unique<Judge>(*s.model, *s.tokenizer, kMaxBatch);
    s.server = std::make_unique<RewardServer>(*s.judge, "127.0.0.1:0");
    s.channel = loopback_channel(s.server->port());
    s.stub = v1::RewardService::NewStub(s.channel);
  }

  static void TearDownTestSuite() {
    if (!served_) return;
    served_->server->shutdown();
    fs::remove_all(served_->dir);
    served_.reset();
  }

  static grpc::Status score(const v1::ScoreRequest& request, v1::ScoreResponse* response) {
    grpc::ClientContext context;
    set_deadline(context);
    return served_->stub->Score(&context, request, response);
  }

  static grpc::Status compare(const v1::CompareRequest& request, v1::CompareResponse* response) {
    grpc::ClientContext context;
    set_deadline(context);
    return served_->stub->Compare(&context, request, response);
  }

  static std::unique_ptr<ServedJudge> served_;
};

std::unique_ptr<ServedJudge> RewardServiceTest::served_;

TEST_F(RewardServiceTest, ListensOnAnEphemeralLoopbackPort) {
  EXPECT_GT(served_->server->port(), 0);
  EXPECT_LT(served_->server->port(), 65536);
}

TEST_F(RewardServiceTest, ScoreReturnsOneResultPerItemWithItsBookkeeping) {
  const v1::ScoreRequest request = good_score_request();
  v1::ScoreResponse response;
  const grpc::Status status = score(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.results_size(), 2);
  for (const v1::PointwiseResult& result : response.results()) {
    expect_result_bookkeeping(result, request.k());
  }
}

TEST_F(RewardServiceTest, ScoreIsReproducibleForAGivenSeed) {
  const v1::ScoreRequest request = good_score_request();
  v1::ScoreResponse first, second;
  ASSERT_TRUE(score(request, &first).ok());
  ASSERT_TRUE(score(request, &second).ok());
  EXPECT_EQ(first.SerializeAsString(), second.SerializeAsString());
}

TEST_F(RewardServiceTest, ScoreWithKZeroTakesOneSample) {
  v1::ScoreRequest request = good_score_request();
  request.set_k(0);
  v1::ScoreResponse response;
  const grpc::Status status = score(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.results_size(), 2);
  for (const v1::PointwiseResult& result : response.results()) {
    expect_result_bookkeeping(result, 1);
  }
}

TEST_F(RewardServiceTest, CompareReturnsAVerdictOrInvalid) {
  const v1::CompareRequest request = good_compare_request();
  v1::CompareResponse response;
  const grpc::Status status = compare(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.votes_size() + response.invalid_samples(), request.k());
  EXPECT_EQ(response.reasoning_size(), response.votes_size());
  EXPECT_EQ(response.valid(), response.votes_size() > 0);
  EXPECT_GE(response.retries(), response.invalid_samples() * kMaxRetries);
  EXPECT_LE(response.retries(), request.k() * kMaxRetries);
  const std::set<std::string> verdicts = {"A", "B", "tie"};
  for (const std::string& vote : response.votes()) EXPECT_TRUE(verdicts.count(vote)) << vote;
  if (response.valid()) {
    EXPECT_TRUE(verdicts.count(response.verdict())) << response.verdict();
    EXPECT_GE(response.preference_a(), 0.0);
    EXPECT_LE(response.preference_a(), 1.0);
  } else {
    EXPECT_EQ(response.verdict(), "");  // no vote is no verdict, never a silent tie
  }
}

TEST_F(RewardServiceTest, MalformedRequestsAreRejectedNamingTheFieldAndServingGoesOn) {
  v1::ScoreResponse response;

  v1::ScoreRequest no_items = good_score_request();
  no_items.clear_items();
  expect_invalid_argument(score(no_items, &response), "items", "no items");

  v1::ScoreRequest too_many = good_score_request();
  too_many.clear_items();
  for (int i = 0; i < 65; ++i) *too_many.add_items() = score_item("add 1 and 1", "2");
  expect_invalid_argument(score(too_many, &response), "items", "65 items");

  v1::ScoreRequest k_too_large = good_score_request();
  k_too_large.set_k(33);
  expect_invalid_argument(score(k_too_large, &response), "k:", "k = 33");

  v1::ScoreRequest k_negative = good_score_request();
  k_negative.set_k(-1);
  expect_invalid_argument(score(k_negative, &response), "k:", "k = -1");

  v1::ScoreRequest empty_prompt = good_score_request();
  empty_prompt.mutable_items(0)->set_prompt("");
  expect_invalid_argument(score(empty_prompt, &response), "items[0].prompt", "empty prompt");

  v1::ScoreRequest long_response = good_score_request();
  long_response.mutable_items(1)->set_response(std::string(2000, 'x'));
  expect_invalid_argument(score(long_response, &response), "items[1].response",
                          "2000-byte response");

  v1::ScoreRequest long_reference = good_score_request();
  long_reference.mutable_items(1)->set_reference(std::string(1025, 'x'));
  expect_invalid_argument(score(long_reference, &response), "items[1].reference",
                          "1025-byte reference");

  // Within the byte limit, but the judge prompt outgrows the model's 160-token context.
  v1::ScoreRequest over_context = good_score_request();
  over_context.mutable_items(0)->set_response(std::string(200, 'x'));
  expect_invalid_argument(score(over_context, &response), "items[0]", "over the context");
  expect_invalid_argument(score(over_context, &response), "max_seq_len", "over the context");

  v1::ScoreRequest nan_temperature = good_score_request();
  nan_temperature.set_temperature(std::numeric_limits<double>::quiet_NaN());
  expect_invalid_argument(score(nan_temperature, &response), "temperature", "NaN temperature");

  v1::ScoreRequest negative_temperature = good_score_request();
  negative_temperature.set_temperature(-0.5);
  expect_invalid_argument(score(negative_temperature, &response), "temperature",
                          "negative temperature");

  v1::CompareResponse compare_response;
  v1::CompareRequest empty_b = good_compare_request();
  empty_b.set_response_b("");
  expect_invalid_argument(compare(empty_b, &compare_response), "response_b", "empty response_b");

  v1::CompareRequest compare_over_context = good_compare_request();
  compare_over_context.set_response_a(std::string(100, 'x'));
  compare_over_context.set_response_b(std::string(100, 'y'));
  expect_invalid_argument(compare(compare_over_context, &compare_response), "max_seq_len",
                          "pairwise over the context");

  v1::CompareRequest infinite_temperature = good_compare_request();
  infinite_temperature.set_temperature(std::numeric_limits<double>::infinity());
  expect_invalid_argument(compare(infinite_temperature, &compare_response), "temperature",
                          "infinite temperature");

  // The server keeps serving after all of that.
  v1::ScoreRequest good = good_score_request();
  good.set_k(1);
  v1::ScoreResponse good_response;
  const grpc::Status status = score(good, &good_response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(good_response.results_size(), 2);
  for (const v1::PointwiseResult& result : good_response.results()) {
    expect_result_bookkeeping(result, 1);
  }
}

TEST_F(RewardServiceTest, HealthServiceReportsServing) {
  int serving_status = -1;
  grpc::Status status = health_check(*served_->channel, "", &serving_status);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(serving_status, kHealthServing);

  serving_status = -1;
  status = health_check(*served_->channel, "rlhf.v1.RewardService", &serving_status);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(serving_status, kHealthServing);

  // A service this server does not run is unknown to its health service.
  status = health_check(*served_->channel, "rlhf.v1.NoSuchService", &serving_status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << status.error_message();
}

TEST_F(RewardServiceTest, ShutdownStopsServingAndWaitReturns) {
  // A second server on the same judge; it judges nothing here, so the judge is never used
  // from two servers at once.
  RewardServer second(*served_->judge, "127.0.0.1:0");
  ASSERT_NE(second.port(), served_->server->port());
  const std::shared_ptr<grpc::Channel> channel = loopback_channel(second.port());
  int serving_status = -1;
  ASSERT_TRUE(health_check(*channel, "rlhf.v1.RewardService", &serving_status).ok());
  EXPECT_EQ(serving_status, kHealthServing);

  std::thread stopper([&second] { second.shutdown(); });
  second.wait();
  stopper.join();
  second.shutdown();  // a second shutdown is harmless

  v1::ScoreResponse response;
  grpc::ClientContext context;
  set_deadline(context);
  const grpc::Status status =
      v1::RewardService::NewStub(channel)->Score(&context, good_score_request(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
}

// A small random judge model for one batch, for tests that need a Judge but no server.
struct RandomJudgeModel {
  ByteTokenizer tokenizer;
  CpuOps<float> ops;  // before the model, which frees its buffers through it
  std::unique_ptr<Transformer<float>> model;
  RandomJudgeModel() {
    const ModelConfig config = judge_model_config(tokenizer);
    model = std::make_unique<Transformer<float>>(ops, config, 1, config.max_seq_len);
    model->init_random(1);
  }
};

TEST(RewardServer, AnAddressThatCannotBeBoundIsAnError) {
  const RandomJudgeModel random;
  const ByteTokenizer& tokenizer = random.tokenizer;
  Transformer<float>& model = *random.model;
  Judge judge(model, tokenizer, 1);
  RewardServer first(judge, "127.0.0.1:0");
  // The port the first server holds.
  EXPECT_THROW((RewardServer{judge, "127.0.0.1:" + std::to_string(first.port())}), Error);
  EXPECT_THROW((RewardServer{judge, "not an address"}), Error);
}

// The prompt layout a judge was trained with travels in its checkpoint's metadata: absent means
// the line layout, a bad value is an error naming the file and the key, and the service checks
// requests against the judge's own layout.
TEST(RewardServer, AJudgeCheckpointCarriesItsPromptLayout) {
  const RandomJudgeModel random;
  const ByteTokenizer& tokenizer = random.tokenizer;
  Transformer<float>& model = *random.model;
  const fs::path dir =
      fs::temp_directory_path() / ("rlhf_judge_layout_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string plain = (dir / "plain.safetensors").string();
  const std::string columns = (dir / "columns.safetensors").string();
  const std::string bad = (dir / "bad.safetensors").string();
  checkpoint_save(plain, model, tokenizer.name());
  checkpoint_save(columns, model, tokenizer.name(), nullptr, nullptr, nullptr,
                  {{kJudgeColumnsKey, "10"}});
  checkpoint_save(bad, model, tokenizer.name(), nullptr, nullptr, nullptr,
                  {{kJudgeColumnsKey, "10 columns"}});
  const std::string tagged = (dir / "tagged.safetensors").string();
  const std::string two = (dir / "two.safetensors").string();
  checkpoint_save(tagged, model, tokenizer.name(), nullptr, nullptr, nullptr,
                  judge_layout_annotations(kJudgeTaggedLayout));
  checkpoint_save(two, model, tokenizer.name(), nullptr, nullptr, nullptr,
                  {{kJudgeColumnsKey, "10"}, {kJudgeLayoutKey, "tagged"}});
  EXPECT_EQ(judge_layout_of(checkpoint_read_info(plain), plain), kJudgeLinesLayout);
  EXPECT_EQ(judge_layout_of(checkpoint_read_info(columns), columns), 10);
  EXPECT_EQ(judge_layout_of(checkpoint_read_info(tagged), tagged), kJudgeTaggedLayout);
  const std::string error = error_of([&] { judge_layout_of(checkpoint_read_info(bad), bad); });
  EXPECT_NE(error.find(bad), std::string::npos) << error;
  EXPECT_NE(error.find(kJudgeColumnsKey), std::string::npos) << error;
  const std::string both = error_of([&] { judge_layout_of(checkpoint_read_info(two), two); });
  EXPECT_NE(both.find(kJudgeLayoutKey), std::string::npos) << both;
  EXPECT_EQ(judge_layout_name(kJudgeTaggedLayout), "tagged layout");
  const std::string split = (dir / "split.safetensors").string();
  checkpoint_save(split, model, tokenizer.name(), nullptr, nullptr, nullptr,
                  judge_layout_annotations(kJudgeSplitPairLayout));
  EXPECT_EQ(judge_layout_of(checkpoint_read_info(split), split), kJudgeSplitPairLayout);
  EXPECT_EQ(judge_layout_name(kJudgeSplitPairLayout), "tagged layout, split pairs");

  // A request fits the context or not by the prompt the judge will really see: a long task
  // fits in the line layout and, with a reference, not in columns of 64.
  Judge line_judge(model, tokenizer, 1);
  Judge column_judge(model, tokenizer, 1, kMaxJudgeColumns);
  const RewardServiceLimits limits;
  const PairwiseRequest request{std::string(40, 'q'), "1", "2", std::string("3")};
  EXPECT_EQ(error_of([&] { check_pairwise_request(request, "", line_judge, limits); }), "");
  const std::string too_long =
      error_of([&] { check_pairwise_request(request, "", column_judge, limits); });
  EXPECT_NE(too_long.find("prompt"), std::string::npos) << too_long;
  // The split pair layout counts its prompt and side B's line.
  // (A task of 130 characters: 156 tokens with the two lines, 163 with 140.)
  Judge split_judge(model, tokenizer, 1, kJudgeSplitPairLayout);
  const PairwiseRequest fits{std::string(130, 'q'), "2", "3", std::string("2")};
  EXPECT_EQ(error_of([&] { check_pairwise_request(fits, "", split_judge, limits); }), "");
  const PairwiseRequest too_long_split{std::string(140, 'q'), "2", "3", std::string("2")};
  EXPECT_NE(error_of([&] { check_pairwise_request(too_long_split, "", split_judge, limits); }),
            "");
  fs::remove_all(dir);
}

// A split pair judge answers every request: pairs with a reference by separate sides (the
// default) or in two turns, pairs without one in the line layout; every sample votes or is
// counted INVALID, and a seed reproduces it.
TEST(RewardServer, ASplitPairJudgeComparesWithAndWithoutAReference) {
  const RandomJudgeModel random;
  Judge judge(*random.model, random.tokenizer, 1, kJudgeSplitPairLayout);
  const std::vector<PairwiseRequest> requests = {
      {"60+3=", "93", "63", std::string("63")},
      {"rev abc", "cba", "abc", std::nullopt},
      {"sort 3 1 2", "1 2 3", "3 2 1", std::string("1 2 3")}};
  for (const auto& [separate_sides, from_scores] :
       {std::pair{true, true}, std::pair{true, false}, std::pair{false, false}}) {
    SCOPED_TRACE(pair_judging_name(kJudgeSplitPairLayout, true, separate_sides, from_scores));
    VotingParams params;
    params.k = 3;
    params.temperature = 1.0;
    params.max_retries = 1;
    params.max_new_tokens = 12;
    params.seed = 4;
    params.separate_sides = separate_sides;
    params.verdict_from_scores = from_scores;
    const std::vector<PairwiseJudgment> first = judge.compare(requests, params);
    const std::vector<PairwiseJudgment> again = judge.compare(requests, params);
    ASSERT_EQ(first.size(), requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      const PairwiseJudgment& j = first[i];
      EXPECT_EQ(int(j.votes.size()) + j.invalid_samples, params.k) << i;
      EXPECT_EQ(j.reasoning.size(), j.votes.size()) << i;
      EXPECT_EQ(j.valid, !j.votes.empty()) << i;
      EXPECT_GE(j.retries, j.invalid_samples * params.max_retries) << i;
      EXPECT_LE(j.retries, params.k * params.max_retries) << i;
      EXPECT_EQ(j.votes, again[i].votes) << i;
      EXPECT_EQ(j.retries, again[i].retries) << i;
    }
  }
  EXPECT_EQ(pair_judging_name(kJudgeSplitPairLayout, true, true, true),
            "separate sides, verdict from scores");
  EXPECT_EQ(pair_judging_name(kJudgeSplitPairLayout, true, true, false), "separate sides");
  EXPECT_EQ(pair_judging_name(kJudgeSplitPairLayout, true, false, true), "two turns");
  EXPECT_EQ(pair_judging_name(kJudgeSplitPairLayout, false, true, true), "one prompt");
  EXPECT_EQ(pair_judging_name(kJudgeTaggedLayout, true, true, true), "one prompt");
}

}  // namespace
}  // namespace rlhf
