// The RL loop as services, end to end on loopback: real ActorServers and a RewardServer, the
// learner (RlTrainer behind ActorPool and the reward client, or `rlhf serve learner` as a
// process), and the RocksDB store.
//
// The policy is a tiny model given a short SFT in SetUpTestSuite, so its answers get varied
// partial credit from the task graders: the runs here use `reward: ground_truth` so that GRPO
// groups have a spread to learn from without a trained judge (the judge path has its own test,
// with a judge that is mostly INVALID, which is what an untrained one is).
//
// Reliability items of the RL issue covered here: kill -9 of the learner and --resume (no lost
// and no duplicated scored rollouts, the same final weights as an uninterrupted run), an actor
// that dies (the learner goes on with the other) and comes back (it pulls the current weights
// from the learner at start).
#include <chrono>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "actor/actor_client.h"
#include "actor/actor_engine.h"
#include "actor/actor_service.h"
#include "common/error.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/actor_pool.h"
#include "learner/learner_service.h"
#include "learner/rl_trainer.h"
#include "learner/sft.h"
#include "model/checkpoint.h"
#include "model/safetensors.h"
#include "reward/judge.h"
#include "reward/reward_client.h"
#include "reward/reward_service.h"
#include "rollout/rollout_store.h"
#include "tools/child_process.h"

namespace rlhf {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr int kPrompts = 4;
constexpr int kSamples = 4;

std::string tiny_config(int64_t rl_steps, const std::string& policy, const std::string& reward) {
  return fmt::format(R"(
model:
  tokenizer: byte
  d_model: 32
  n_layers: 2
  n_heads: 2
  n_kv_heads: 1
  head_dim: 16
  max_seq_len: 48
  n_dense_layers: 1
  d_ff: 64
  n_routed_experts: 4
  n_shared_experts: 1
  top_k: 2
  d_expert: 32
tasks:
  seed: 1
  families: [add, sort, reverse, count]
sft:
  steps: 150
  batch_size: 16
  eval_examples: 16
  eval_batch: 16
  checkpoint_every: 150
  optimizer: {{lr: 0.01, warmup_steps: 10}}
sampling:
  temperature: 1.0
  max_new_tokens: 12
  seed: 3
fp4:
  format: mxfp4
  qat_start_step: 0
rl:
  policy: {}
  steps: {}
  prompts_per_step: {}
  samples_per_prompt: {}
  reward: {}
  checkpoint_every: 1
  eval_examples: 16
  optimizer: {{lr: 0.001}}
runtime:
  threads: 1
)",
                     policy, rl_steps, kPrompts, kSamples, reward);
}

std::vector<nlohmann::json> read_metrics(const fs::path& file) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

// The RL workdir's policy weights (model.* tensors only), for bitwise comparisons.
std::vector<float> policy_weights(const fs::path& checkpoint) {
  CpuOps<float> ops;
  auto model = checkpoint_load_model(checkpoint.string(), ops, 1);
  return std::vector<float>(model->params(), model->params() + model->layout().total());
}

class RlLoopTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = fs::path(::testing::TempDir()) / fmt::format("rlhf-rl-loop-{}", ::getpid());
    fs::remove_all(root_);
    fs::create_directories(root_);
    // A short SFT gives a policy whose answers are partly right: varied rewards per group.
    const RunConfig sft_config = RunConfig::load_string(tiny_config(1, "unused", "ground_truth"), "test");
    SftTrainer sft(sft_config, (root_ / "sft").string(), false);
    sft.train();
    policy_ = (root_ / "sft" / "policy.safetensors").string();
    CpuOps<float> ops;
    checkpoint_save(policy_, sft.model(), "byte");
  }
  static void TearDownTestSuite() { fs::remove_all(root_); }

  RunConfig config(int64_t steps, const std::string& reward = "ground_truth") const {
    return RunConfig::load_string(tiny_config(steps, policy_, reward), "test");
  }
  fs::path write_config(const std::string& name, int64_t steps) const {
    const fs::path path = root_ / name;
    std::ofstream(path) << tiny_config(steps, policy_, "ground_truth");
    return path;
  }
  static ActorEngineOptions engine_options() {
    ActorEngineOptions o;
    o.max_batch = 16;
    o.expert_format = Fp4Format::mxfp4;
    return o;
  }

  static fs::path root_;
  static std::string policy_;
};

fs::path RlLoopTest::root_;
std::string RlLoopTest::policy_;

// A reward service on a (random) judge model, for runs that never call it and for the judge
// path's bookkeeping test.
struct JudgeService {
  explicit JudgeService(const std::string& checkpoint)
      : tokenizer(make_tokenizer("byte")), model(load_with_judge_context(checkpoint, ops)),
        judge(*model, *tokenizer, 8), server(judge) {}
  // The policy's weights with room for judge prompts and reasoning: the context length only
  // sizes activations (RoPE has no learned positions), so the same tensors load.
  static std::unique_ptr<Transformer<float>> load_with_judge_context(const std::string& checkpoint,
                                                                     CpuOps<float>& ops) {
    ModelConfig config = checkpoint_read_info(checkpoint).config;
    config.max_seq_len = 256;
    auto model = std::make_unique<Transformer<float>>(ops, config, 8, config.max_seq_len);
    checkpoint_load_weights(checkpoint, *model);
    return model;
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(server.port()); }
  CpuOps<float> ops;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Transformer<float>> model;
  Judge judge;
  RewardServer server;
};

class ServiceScorer : public RolloutScorer {
 public:
  explicit ServiceScorer(const std::string& address) : client_(address) {}
  v1::ScoreResponse score(const v1::ScoreRequest& request) override { return client_.score(request); }

 private:
  RewardClient client_;
};

TEST_F(RlLoopTest, TrainsStoresEveryRolloutAndPublishesEachVersion) {
  ActorEngine engine(policy_, engine_options());
  ActorServer actor(engine);
  const std::string actor_address = "127.0.0.1:" + std::to_string(actor.port());
  JudgeService judge(policy_);
  ActorPool pool({actor_address});
  ServiceScorer scorer(judge.address());
  const fs::path workdir = root_ / "rl-basic";
  const int64_t steps = 3;
  {
    RlTrainer trainer(config(steps), workdir.string(), false, pool, scorer);
    const std::vector<float> start(trainer.policy().params(),
                                   trainer.policy().params() + trainer.policy().layout().total());
    trainer.train();
    EXPECT_EQ(trainer.steps_done(), steps);
    const std::vector<float> end(trainer.policy().params(),
                                 trainer.policy().params() + trainer.policy().layout().total());
    EXPECT_NE(start, end) << "three GRPO steps with varied rewards must change the policy";
    // Every version's rollouts are in the store, generated by exactly that version.
    for (int64_t v = 0; v < steps; ++v) {
      const auto scored = trainer.store().read_scored(trainer.run_id(), uint64_t(v),
                                                      uint64_t(v * kPrompts), uint64_t((v + 1) * kPrompts));
      ASSERT_EQ(scored.size(), size_t(kPrompts * kSamples)) << "version " << v;
      for (const auto& s : scored) {
        EXPECT_EQ(s.rollout().policy_version(), uint64_t(v));
        EXPECT_EQ(s.rollout().logprobs_size(), s.rollout().response_tokens_size());
        EXPECT_GT(s.rollout().routing().expert_ids_size(), 0);
        ASSERT_TRUE(s.has_ground_truth_score());
        EXPECT_EQ(s.reward(), s.ground_truth_score());
      }
    }
    const auto cursor = trainer.store().cursor(trainer.run_id());
    ASSERT_TRUE(cursor.has_value());
    EXPECT_EQ(cursor->step(), uint64_t(steps));
  }
  // The actor serves the last version the learner published.
  ActorClient client(actor_address);
  EXPECT_EQ(client.status().version(), uint64_t(steps));
  const auto metrics = read_metrics(workdir / "metrics.jsonl");
  ASSERT_EQ(metrics.size(), size_t(steps));
  for (size_t i = 0; i < metrics.size(); ++i) {
    EXPECT_EQ(metrics[i]["step"].get<int64_t>(), int64_t(i + 1));
    // The learner's QAT forward and the actor's packed FP4 forward compute the same function,
    // so before the update the two logprobs of a token agree to float rounding; 1e-3 nats is
    // far above that (~1e-6 measured) and far below any real mismatch (a stale or differently
    // quantized policy is off by 1e-2 and more).
    EXPECT_LT(metrics[i]["logprob_mismatch"].get<double>(), 1e-3) << "step " << i + 1;
    EXPECT_EQ(metrics[i]["stale_skipped"].get<int64_t>(), 0);
    EXPECT_FALSE(metrics[i]["from_store"].get<bool>());
  }
}

TEST_F(RlLoopTest, JudgeRewardsAreStoredWithTheirBookkeeping) {
  ActorEngine engine(policy_, engine_options());
  ActorServer actor(engine);
  JudgeService judge(policy_);  // a policy, not a judge: its outputs are mostly INVALID
  ActorPool pool({"127.0.0.1:" + std::to_string(actor.port())});
  ServiceScorer scorer(judge.address());
  RlTrainer trainer(config(1, "judge"), (root_ / "rl-judge").string(), false, pool, scorer);
  trainer.train();
  size_t count = 0;
  trainer.store().for_each_scored(trainer.run_id(), [&](const v1::ScoredRollout& s) {
    ++count;
    const v1::Judgment& j = s.judgment();
    if (s.rollout().text().empty()) {
      EXPECT_FALSE(j.valid());  // nothing to judge: never sent, never given a score
      return;
    }
    EXPECT_EQ(j.sample_scores_size() + j.invalid_samples(), 1) << "k = 1: one vote or one INVALID";
    EXPECT_EQ(j.valid(), j.sample_scores_size() > 0);
    EXPECT_EQ(j.reasoning_size(), j.sample_scores_size());
    if (j.valid()) {
      EXPECT_EQ(s.reward(), j.score());
    }
  });
  EXPECT_EQ(count, size_t(kPrompts * kSamples));
}

TEST_F(RlLoopTest, KilledLearnerResumesWithoutLosingOrRepeatingRollouts) {
  ActorEngine engine(policy_, engine_options());
  ActorServer actor(engine);
  const std::string actor_address = "127.0.0.1:" + std::to_string(actor.port());
  JudgeService judge(policy_);
  const int64_t steps = 12;
  const fs::path config_path = write_config("kill.yaml", steps);
  const fs::path workdir = root_ / "rl-kill";
  auto learner_args = [&](bool resume) {
    std::vector<std::string> args = {RLHF_BINARY, "serve", "learner", "--config", config_path.string(),
                                     "--workdir", workdir.string(), "--actors", actor_address,
                                     "--reward", judge.address(), "--listen", "127.0.0.1:0"};
    if (resume) args.push_back("--resume");
    return args;
  };
  {
    cli::ChildProcess learner("learner", learner_args(false));
    learner.wait_for_address(60s);
    // Kill it in the middle of the run, hard.
    const auto deadline = std::chrono::steady_clock::now() + 120s;
    while (read_metrics(workdir / "metrics.jsonl").size() < 3) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "the learner made no progress";
      std::this_thread::sleep_for(20ms);
    }
    learner.kill_now();
    EXPECT_EQ(learner.wait(), 128 + SIGKILL);
  }
  {
    cli::ChildProcess learner("learner", learner_args(true));
    EXPECT_EQ(learner.wait(), 0) << "the resumed learner must finish the run";
  }
  // An uninterrupted run of the same config, for comparison (its own actor: the first one
  // has moved on to version 6).
  ActorEngine engine2(policy_, engine_options());
  ActorServer actor2(engine2);
  ActorPool pool({"127.0.0.1:" + std::to_string(actor2.port())});
  ServiceScorer scorer(judge.address());
  const fs::path clean = root_ / "rl-clean";
  {
    RlTrainer trainer(config(steps), clean.string(), false, pool, scorer);
    trainer.train();
  }
  auto store = RolloutStore::open((workdir / "store").string(), RolloutStore::Mode::kReadOnly);
  std::set<std::tuple<uint64_t, uint64_t, uint32_t>> keys;
  size_t count = 0;
  store->for_each_scored("", [&](const v1::ScoredRollout& s) {
    ++count;
    keys.insert({s.rollout().policy_version(), s.rollout().prompt_index(), s.rollout().sample_index()});
    EXPECT_EQ(s.rollout().prompt_index() / kPrompts, s.rollout().policy_version())
        << "step v samples prompts v*P .. v*P+P-1 with version v";
  });
  EXPECT_EQ(count, size_t(steps * kPrompts * kSamples)) << "no scored rollout lost or duplicated";
  EXPECT_EQ(keys.size(), count);
  const auto metrics = read_metrics(workdir / "metrics.jsonl");
  ASSERT_EQ(metrics.size(), size_t(steps)) << "one metrics line per step after the resume";
  for (size_t i = 0; i < metrics.size(); ++i) EXPECT_EQ(metrics[i]["step"].get<int64_t>(), int64_t(i + 1));
  // Training is deterministic and the store gives back exactly what was sampled, so the
  // interrupted run ends with the same weights as the uninterrupted one.
  EXPECT_EQ(policy_weights(workdir / "checkpoint.safetensors"),
            policy_weights(clean / "checkpoint.safetensors"));
}

TEST_F(RlLoopTest, LearnerGoesOnWhenAnActorDiesAndTheActorCatchesUpWhenItReturns) {
  // Actor A in-process; actor B a process we can kill -9 and start again on the same port.
  ActorEngine engine(policy_, engine_options());
  ActorServer actor_a(engine);
  const std::string a_address = "127.0.0.1:" + std::to_string(actor_a.port());
  auto start_b = [&](const std::string& listen, const std::string& learner) {
    std::vector<std::string> args = {RLHF_BINARY, "serve", "actor", "--checkpoint", policy_,
                                     "--listen", listen, "--expert-format", "mxfp4", "--threads", "1"};
    if (!learner.empty()) args.insert(args.end(), {"--learner", learner});
    return std::make_unique<cli::ChildProcess>("actor-b", args);
  };
  auto actor_b = start_b("127.0.0.1:0", "");
  const std::string b_address = actor_b->wait_for_address(60s);
  JudgeService judge(policy_);
  ActorPool pool({a_address, b_address});
  ServiceScorer scorer(judge.address());
  RlTrainer trainer(config(100000), (root_ / "rl-actor-dies").string(), false, pool, scorer);
  LearnerServer learner_server(trainer);
  const std::string learner_address = "127.0.0.1:" + std::to_string(learner_server.port());
  std::thread training([&] { trainer.train(); });
  auto wait_for_step = [&](int64_t step) {
    const auto deadline = std::chrono::steady_clock::now() + 120s;
    while (trainer.status().step < step) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "stuck before step " << step;
      std::this_thread::sleep_for(10ms);
    }
  };
  wait_for_step(2);
  actor_b->kill_now();
  actor_b->wait();
  const int64_t killed_at = trainer.status().step;
  wait_for_step(killed_at + 3);  // the learner goes on with actor A alone
  EXPECT_EQ(pool.up(), std::vector<std::string>{a_address});
  // B returns on its old address and pulls the current weights from the learner at start.
  actor_b = start_b(b_address, learner_address);
  actor_b->wait_for_address(60s);
  ActorClient b_client(b_address);
  const uint64_t b_version_at_start = b_client.status().version();
  EXPECT_GE(b_version_at_start, uint64_t(killed_at + 3))
      << "the returning actor must start on the learner's current version, not version 0";
  const int64_t back_at = trainer.status().step;
  wait_for_step(back_at + 3);
  trainer.stop();
  training.join();
  EXPECT_EQ(pool.up().size(), 2u) << "the learner uses the returning actor again";
  const v1::ActorStatus b_status = b_client.status();
  EXPECT_GT(b_status.requests_served(), 0u);
  EXPECT_EQ(b_status.version(), uint64_t(trainer.steps_done()));
}


TEST_F(RlLoopTest, CollectStoresWithoutTrainingAndContinuesFromItsCursor) {
  ActorEngine engine(policy_, engine_options());
  ActorServer actor(engine);
  JudgeService judge(policy_);
  const fs::path config_path = write_config("collect.yaml", 2);
  const fs::path store_path = root_ / "collect-store";
  auto run_collect = [&](int steps) {
    cli::ChildProcess collect(
        "collect", {RLHF_BINARY, "collect", "--config", config_path.string(), "--actors",
                    "127.0.0.1:" + std::to_string(actor.port()), "--reward", judge.address(),
                    "--store", store_path.string(), "--run", "c1", "--steps",
                    std::to_string(steps)});
    return collect.wait();
  };
  ASSERT_EQ(run_collect(2), 0);
  ASSERT_EQ(run_collect(3), 0);  // continues at step 2: one more step
  auto store = RolloutStore::open(store_path.string(), RolloutStore::Mode::kReadOnly);
  size_t count = 0;
  std::set<uint64_t> prompts;
  store->for_each_scored("c1", [&](const v1::ScoredRollout& s) {
    ++count;
    prompts.insert(s.rollout().prompt_index());
    EXPECT_EQ(s.rollout().policy_version(), 0u) << "collect trains nothing";
    EXPECT_TRUE(s.has_ground_truth_score());
  });
  EXPECT_EQ(count, size_t(3 * kPrompts * kSamples));
  EXPECT_EQ(prompts.size(), size_t(3 * kPrompts));
  const auto cursor = store->cursor("c1");
  ASSERT_TRUE(cursor.has_value());
  EXPECT_EQ(cursor->step(), 3u);
}


TEST_F(RlLoopTest, UpStartsTheServicesAsProcessesAndRunsTheLoop) {
  // Ground-truth rewards and no judging: `up` starts no reward service, one actor and the
  // learner, runs two steps, and the learner's --json line comes out on up's stdout.
  const fs::path config_path = root_ / "up.yaml";
  std::string yaml = tiny_config(2, policy_, "ground_truth");
  const size_t at = yaml.find("  checkpoint_every: 1\n");
  ASSERT_NE(at, std::string::npos);
  yaml.insert(at, "  judge_rollouts: false\n");
  std::ofstream(config_path, std::ios::trunc) << yaml;
  const fs::path workdir = root_ / "rl-up";
  const std::string command = std::string(RLHF_BINARY) + " up --config " + config_path.string() +
                              " --workdir " + workdir.string() + " --json 2>" +
                              (root_ / "up.err").string();
  FILE* pipe = ::popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out, last_line;
  char buffer[4096];
  while (fgets(buffer, sizeof(buffer), pipe)) out += buffer;
  const int status = ::pclose(pipe);
  ASSERT_EQ(WEXITSTATUS(status), 0) << out;
  std::stringstream lines(out);
  for (std::string line; std::getline(lines, line);)
    if (!line.empty()) last_line = line;
  const auto summary = nlohmann::json::parse(last_line);
  EXPECT_EQ(summary["steps"].get<int64_t>(), 2);
  EXPECT_EQ(summary["rollouts_stored"].get<int64_t>(), 2 * kPrompts * kSamples);
  for (const char* key : {"sft_mean_score", "rl_mean_score", "mean_score_gain_stderr", "wall_s"})
    EXPECT_TRUE(summary.contains(key)) << key;
  EXPECT_TRUE(fs::exists(workdir / "policy.safetensors"));
  EXPECT_EQ(read_metrics(workdir / "metrics.jsonl").size(), 2u);
}

// A program that cannot be run is an error naming it, before any fork: a failed exec in the child
// could only say "exec failed".
TEST(ChildProcess, AProgramThatCannotRunIsAnErrorNamingIt) {
  try {
    cli::ChildProcess child("reward", {"/nonexistent/rlhf", "serve", "reward"});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("reward: cannot run /nonexistent/rlhf: No such file"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace rlhf

