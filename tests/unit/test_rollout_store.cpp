// The RolloutStore (rollout/rollout_store.h) on a real RocksDB in a temporary directory: records
// round-trip, keys sort numerically, rewrites are idempotent and conflicts write nothing, the
// read-only mode, clear errors for things that are not stores; and `rlhf db` on a store.
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/core.h>
#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <rocksdb/db.h>

#include "common/error.h"
#include "rollout/rollout_store.h"
#include "tests/test_support.h"

namespace rlhf {
namespace {

namespace fs = std::filesystem;
using Mode = RolloutStore::Mode;

v1::Prompt make_prompt(const std::string& run, uint64_t index) {
  v1::Prompt p;
  p.set_run_id(run);
  p.set_prompt_index(index);
  p.set_text(fmt::format("{}+{}=", index, index + 1));
  p.set_task("add");
  if (index % 2 == 0) p.set_reference(std::to_string(2 * index + 1));
  return p;
}

// Every field set, so a round trip that drops one shows; ground truth only on even samples.
v1::ScoredRollout make_scored(const std::string& run, uint64_t version, uint64_t prompt,
                              uint32_t sample, double reward = 0.5) {
  v1::ScoredRollout s;
  v1::Rollout& r = *s.mutable_rollout();
  r.set_run_id(run);
  r.set_policy_version(version);
  r.set_prompt_index(prompt);
  r.set_sample_index(sample);
  for (int t : {5, 17, 3}) r.add_prompt_tokens(t);
  for (int t : {9, 2}) r.add_response_tokens(t);
  r.add_logprobs(-0.25f);
  r.add_logprobs(-1.5f);
  r.set_text("12");
  r.set_finished(sample % 2 == 0);
  v1::RoutingTrace& routing = *r.mutable_routing();
  routing.set_n_layers(2);
  routing.set_n_tokens(4);
  routing.set_top_k(2);
  for (int i = 0; i < 16; ++i) routing.add_expert_ids((i * 7 + int(sample)) % 8);
  r.set_actor("127.0.0.1:7001");
  v1::Judgment& j = *s.mutable_judgment();
  j.set_valid(true);
  j.set_score(7.5);
  j.add_sample_scores(7);
  j.add_sample_scores(8);
  j.add_reasoning("expected 12; got 12; exact");
  j.add_reasoning("exact");
  j.set_invalid_samples(1);
  j.set_retries(2);
  if (sample % 2 == 0) s.set_ground_truth_score(10.0);
  s.set_reward(reward);
  return s;
}

bool same(const google::protobuf::Message& a, const google::protobuf::Message& b) {
  return google::protobuf::util::MessageDifferencer::Equals(a, b);
}

struct Key {
  std::string run;
  uint64_t version, prompt;
  uint32_t sample;
  bool operator==(const Key&) const = default;
};

Key key_of(const v1::ScoredRollout& s) {
  return {s.rollout().run_id(), s.rollout().policy_version(), s.rollout().prompt_index(),
          s.rollout().sample_index()};
}

std::vector<Key> scored_keys(const RolloutStore& store, const std::string& run) {
  std::vector<Key> keys;
  store.for_each_scored(run, [&](const v1::ScoredRollout& s) { keys.push_back(key_of(s)); });
  return keys;
}

// The documented key layout (rollout/rollout_store.h), written out independently of the store.
std::string sample_key(const std::string& run, uint64_t version, uint64_t prompt, uint32_t sample) {
  std::string key = run + '\0';
  for (int i = 7; i >= 0; --i) key.push_back(char(version >> (8 * i)));
  for (int i = 7; i >= 0; --i) key.push_back(char(prompt >> (8 * i)));
  for (int i = 3; i >= 0; --i) key.push_back(char(sample >> (8 * i)));
  return key;
}

// RocksDB opened directly, with every family of the store, to damage or inspect it as a test
// must (a foreign writer, a bad disk).
class RawDb {
 public:
  explicit RawDb(const std::string& path) {
    std::vector<rocksdb::ColumnFamilyDescriptor> families;
    for (const char* name : {"default", "prompts", "rollouts", "judgments", "evals", "meta"}) {
      families.emplace_back(name, rocksdb::ColumnFamilyOptions());
    }
    const rocksdb::Status s =
        rocksdb::DB::Open(rocksdb::DBOptions(), path, families, &handles_, &db_);
    if (!s.ok()) throw std::runtime_error(s.ToString());
  }
  ~RawDb() {
    for (auto* h : handles_) (void)db_->DestroyColumnFamilyHandle(h);
    delete db_;
  }
  rocksdb::ColumnFamilyHandle* family(const std::string& name) {
    for (auto* h : handles_) {
      if (h->GetName() == name) return h;
    }
    throw std::runtime_error("no family " + name);
  }
  void put(const std::string& cf, const std::string& key, const std::string& value) {
    ASSERT_TRUE(db_->Put(rocksdb::WriteOptions(), family(cf), key, value).ok());
  }
  void remove(const std::string& cf, const std::string& key) {
    ASSERT_TRUE(db_->Delete(rocksdb::WriteOptions(), family(cf), key).ok());
  }
  std::vector<std::string> keys(const std::string& cf) {
    std::vector<std::string> out;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), family(cf)));
    for (it->SeekToFirst(); it->Valid(); it->Next()) out.push_back(it->key().ToString());
    return out;
  }

 private:
  rocksdb::DB* db_ = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
};

class RolloutStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           (std::string("rlhf_store_") + info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name = "store") const { return (dir_ / name).string(); }

  fs::path dir_;
};

TEST_F(RolloutStoreTest, RoundTripsPromptsAndScoredRollouts) {
  auto store = RolloutStore::open(path(), Mode::kReadWrite);
  const std::vector<v1::Prompt> prompts = {make_prompt("r", 0), make_prompt("r", 1)};
  std::vector<v1::ScoredRollout> scored;
  for (uint64_t p = 0; p < 2; ++p) {
    for (uint32_t s = 0; s < 2; ++s) scored.push_back(make_scored("r", 3, p, s, 0.25 * (p + s)));
  }
  EXPECT_EQ(store->write_step(prompts, scored), 6u);

  for (const v1::Prompt& p : prompts) {
    const auto back = store->read_prompt("r", p.prompt_index());
    ASSERT_TRUE(back.has_value());
    EXPECT_TRUE(same(*back, p)) << back->DebugString();
  }
  EXPECT_FALSE(store->read_prompt("r", 1)->has_reference());  // optional stays absent
  EXPECT_FALSE(store->read_prompt("r", 2).has_value());

  const std::vector<v1::ScoredRollout> back = store->read_scored("r", 3, 0, 2);
  ASSERT_EQ(back.size(), scored.size());
  for (size_t i = 0; i < back.size(); ++i) EXPECT_TRUE(same(back[i], scored[i])) << i;
  EXPECT_TRUE(back[0].has_ground_truth_score());
  EXPECT_FALSE(back[1].has_ground_truth_score());
  EXPECT_EQ(back[3].rollout().routing().expert_ids_size(), 16);

  EXPECT_EQ(store->read_scored("r", 3, 1, 2).size(), 2u);
  EXPECT_TRUE(store->read_scored("r", 2, 0, 2).empty());  // another version
  EXPECT_TRUE(store->read_scored("r", 3, 2, 100).empty());
  EXPECT_TRUE(store->read_scored("other", 3, 0, 2).empty());
}

TEST_F(RolloutStoreTest, KeysSortNumericallyAndRunsStayApart) {
  auto store = RolloutStore::open(path(), Mode::kReadWrite);
  std::vector<v1::ScoredRollout> scored;
  // Written out of order; "a" is a prefix of "ab", which must not leak into "a".
  for (const std::string run : {"b", "ab", "a"}) {
    for (uint64_t version : {300, 1, 0}) {
      for (uint64_t prompt : {256, 10, 2}) {
        for (uint32_t sample : {10u, 1u, 2u}) {
          scored.push_back(make_scored(run, version, prompt, sample));
        }
      }
    }
  }
  EXPECT_EQ(
      store->write_step({make_prompt("a", 256), make_prompt("a", 10), make_prompt("a", 2)}, scored),
      3u + scored.size());

  std::vector<Key> expected;
  for (uint64_t version : {0, 1, 300}) {
    for (uint64_t prompt : {2, 10, 256}) {
      for (uint32_t sample : {1u, 2u, 10u}) expected.push_back({"a", version, prompt, sample});
    }
  }
  EXPECT_EQ(scored_keys(*store, "a"), expected);

  std::vector<Key> all = scored_keys(*store, "");
  ASSERT_EQ(all.size(), scored.size());
  EXPECT_EQ(all.front().run, "a");
  EXPECT_EQ(all[27].run, "ab");
  EXPECT_EQ(all.back().run, "b");

  std::vector<uint64_t> prompts;
  for (const auto& s : store->read_scored("a", 1, 2, 11)) {
    prompts.push_back(s.rollout().prompt_index());
  }
  EXPECT_EQ(prompts, (std::vector<uint64_t>{2, 2, 2, 10, 10, 10}));

  std::vector<uint64_t> prompt_order;
  store->for_each_prompt("a",
                         [&](const v1::Prompt& p) { prompt_order.push_back(p.prompt_index()); });
  EXPECT_EQ(prompt_order, (std::vector<uint64_t>{2, 10, 256}));

  // The bytes on disk are the documented layout: run, NUL, big-endian version, prompt, sample.
  store.reset();
  RawDb raw(path());
  const std::vector<std::string> keys = raw.keys("rollouts");
  EXPECT_EQ(keys.front(), sample_key("a", 0, 2, 1));
  EXPECT_EQ(keys.back(), sample_key("b", 300, 256, 10));
}

TEST_F(RolloutStoreTest, IdempotentRewriteWritesNothing) {
  auto store = RolloutStore::open(path(), Mode::kReadWrite);
  const std::vector<v1::Prompt> prompts = {make_prompt("r", 0)};
  const std::vector<v1::ScoredRollout> scored = {make_scored("r", 0, 0, 0),
                                                 make_scored("r", 0, 0, 1)};
  EXPECT_EQ(store->write_step(prompts, scored), 3u);
  EXPECT_EQ(store->write_step(prompts, scored), 0u);
  // A step replayed with one more record writes just that one; a record twice in a step is one.
  std::vector<v1::ScoredRollout> more = scored;
  more.push_back(make_scored("r", 0, 0, 2));
  more.push_back(make_scored("r", 0, 0, 2));
  EXPECT_EQ(store->write_step(prompts, more), 1u);
  EXPECT_EQ(store->read_scored("r", 0, 0, 1).size(), 3u);
}

TEST_F(RolloutStoreTest, ConflictingRewriteThrowsAndWritesNothing) {
  auto store = RolloutStore::open(path(), Mode::kReadWrite);
  ASSERT_EQ(store->write_step({make_prompt("r", 0)}, {make_scored("r", 4, 0, 1, 0.5)}), 2u);

  // New prompt, new rollout, and one rollout whose judgment differs from the stored one.
  const std::vector<v1::Prompt> prompts = {make_prompt("r", 1)};
  const std::vector<v1::ScoredRollout> scored = {make_scored("r", 4, 1, 0),
                                                 make_scored("r", 4, 0, 1, 0.75)};
  const std::string error = error_of([&] { store->write_step(prompts, scored); });
  EXPECT_NE(error.find("judgments key (run 'r', version 4, prompt 0, sample 1)"), std::string::npos)
      << error;
  EXPECT_NE(error.find("different record"), std::string::npos) << error;
  EXPECT_FALSE(store->read_prompt("r", 1).has_value());
  EXPECT_EQ(scored_keys(*store, "r"), (std::vector<Key>{{"r", 4, 0, 1}}));
  EXPECT_DOUBLE_EQ(store->read_scored("r", 4, 0, 1).at(0).reward(), 0.5);

  // A different prompt text under a stored key, and a key twice in one step with two records.
  v1::Prompt changed = make_prompt("r", 0);
  changed.set_text("something else");
  EXPECT_NE(
      error_of([&] { store->write_step({changed}, {}); }).find("prompts key (run 'r', prompt 0)"),
      std::string::npos);
  v1::ScoredRollout other = make_scored("r", 5, 0, 0);
  other.mutable_rollout()->set_text("13");
  const std::string twice = error_of([&] {
    store->write_step({}, {make_scored("r", 5, 0, 0), other});
  });
  EXPECT_NE(twice.find("rollouts key (run 'r', version 5, prompt 0, sample 0)"), std::string::npos)
      << twice;
  EXPECT_EQ(scored_keys(*store, "r").size(), 1u);
}

TEST_F(RolloutStoreTest, ReopenKeepsEverything) {
  v1::LearnerCursor cursor;
  cursor.set_run_id("r");
  cursor.set_step(7);
  cursor.set_next_prompt_index(64);
  cursor.set_checkpoint("runs/r/step7.safetensors");
  {
    auto store = RolloutStore::open(path(), Mode::kReadWrite);
    store->write_step({make_prompt("r", 0)}, {make_scored("r", 0, 0, 0)});
    store->put_cursor(cursor);
  }
  auto store = RolloutStore::open(path(), Mode::kReadWrite);
  EXPECT_TRUE(same(*store->read_prompt("r", 0), make_prompt("r", 0)));
  EXPECT_TRUE(same(store->read_scored("r", 0, 0, 1).at(0), make_scored("r", 0, 0, 0)));
  EXPECT_TRUE(same(*store->cursor("r"), cursor));
  EXPECT_EQ(store->write_step({make_prompt("r", 0)}, {make_scored("r", 0, 0, 0)}), 0u);
}

TEST_F(RolloutStoreTest, ReadOnlyOpenSeesDataBesideAWriterAndRefusesWrites) {
  auto writer = RolloutStore::open(path(), Mode::kReadWrite);
  writer->write_step({make_prompt("r", 0)}, {make_scored("r", 0, 0, 0)});

  auto reader = RolloutStore::open(path(), Mode::kReadOnly);
  EXPECT_EQ(reader->read_scored("r", 0, 0, 1).size(), 1u);
  EXPECT_TRUE(reader->read_prompt("r", 0).has_value());
  const std::string error = error_of([&] { reader->write_step({make_prompt("r", 1)}, {}); });
  EXPECT_NE(error.find("is open read-only"), std::string::npos) << error;
  EXPECT_NE(error.find(path()), std::string::npos) << error;
  v1::LearnerCursor cursor;
  cursor.set_run_id("r");
  EXPECT_NE(error_of([&] { reader->put_cursor(cursor); }).find("read-only"), std::string::npos);
  EXPECT_NE(error_of([&] { reader->write_evals({}); }).find("read-only"), std::string::npos);

  // One writer at a time: a second read-write open meets RocksDB's LOCK.
  const std::string locked = error_of([&] { RolloutStore::open(path(), Mode::kReadWrite); });
  EXPECT_NE(locked.find("already open read-write"), std::string::npos) << locked;
  EXPECT_NE(locked.find("LOCK held"), std::string::npos) << locked;
}

TEST_F(RolloutStoreTest, PathsThatAreNotStoresFailClearly) {
  const std::string missing = path("missing");
  const std::string e1 = error_of([&] { RolloutStore::open(missing, Mode::kReadOnly); });
  EXPECT_NE(e1.find("'" + missing + "' does not exist"), std::string::npos) << e1;
  EXPECT_FALSE(fs::exists(missing));  // a read-only open creates nothing

  fs::create_directories(path("empty"));
  const std::string e2 = error_of([&] { RolloutStore::open(path("empty"), Mode::kReadOnly); });
  EXPECT_NE(e2.find("not a RocksDB database"), std::string::npos) << e2;

  fs::create_directories(path("stuff"));
  std::ofstream(path("stuff") + "/notes.txt") << "hello\n";
  const std::string e3 = error_of([&] { RolloutStore::open(path("stuff"), Mode::kReadWrite); });
  EXPECT_NE(e3.find("'" + path("stuff") + "': not a RocksDB database"), std::string::npos) << e3;
  EXPECT_FALSE(fs::exists(path("stuff") + "/CURRENT"));  // nothing was created in it

  std::ofstream(path("file")) << "x";
  EXPECT_NE(
      error_of([&] { RolloutStore::open(path("file"), Mode::kReadOnly); }).find("not a directory"),
      std::string::npos);

  // A RocksDB database of someone else's.
  {
    rocksdb::Options options;
    options.create_if_missing = true;
    rocksdb::DB* db = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(options, path("plain"), &db).ok());
    delete db;
  }
  const std::string e4 = error_of([&] { RolloutStore::open(path("plain"), Mode::kReadWrite); });
  EXPECT_NE(e4.find("not a rollout store (no column family 'prompts')"), std::string::npos) << e4;

  // A store whose schema is not this one's.
  RolloutStore::open(path(), Mode::kReadWrite).reset();
  RawDb(path()).put("meta", "schema", "rlhf-store-v0");
  const std::string e5 = error_of([&] { RolloutStore::open(path(), Mode::kReadOnly); });
  EXPECT_NE(e5.find("schema 'rlhf-store-v0', expected 'rlhf-store-v1'"), std::string::npos) << e5;

  // An empty directory is where a new store may go.
  EXPECT_NO_THROW(RolloutStore::open(path("empty"), Mode::kReadWrite));
  EXPECT_NO_THROW(RolloutStore::open(path("new/nested"), Mode::kReadWrite));
}

TEST_F(RolloutStoreTest, DamageIsReportedWithTheKey) {
  RolloutStore::open(path(), Mode::kReadWrite)
      ->write_step({}, {make_scored("r", 1, 2, 0), make_scored("r", 1, 2, 1)});
  {
    RawDb raw(path());
    raw.remove("rollouts", sample_key("r", 1, 2, 1));
    raw.put("judgments", sample_key("r", 1, 2, 0), "\xff\xff not a protobuf");
  }
  auto store = RolloutStore::open(path(), Mode::kReadOnly);
  const std::string error = error_of([&] { store->read_scored("r", 1, 2, 3); });
  EXPECT_NE(error.find(
                "judgments key (run 'r', version 1, prompt 2, sample 0): the value does not parse"),
            std::string::npos)
      << error;
  {
    store.reset();
    RawDb raw(path());
    raw.put("judgments", sample_key("r", 1, 2, 0), "");  // an empty message parses
  }
  store = RolloutStore::open(path(), Mode::kReadOnly);
  const std::string missing =
      error_of([&] { store->for_each_scored("r", [](const v1::ScoredRollout&) {}); });
  EXPECT_NE(missing.find("judgments key (run 'r', version 1, prompt 2, sample 1) has no rollout"),
            std::string::npos)
      << missing;
}

TEST_F(RolloutStoreTest, CursorPutAndGet) {
  auto store = RolloutStore::open(path(), Mode::kReadWrite);
  EXPECT_FALSE(store->cursor("r").has_value());
  v1::LearnerCursor cursor;
  cursor.set_run_id("r");
  cursor.set_step(1);
  cursor.set_next_prompt_index(8);
  store->put_cursor(cursor);
  cursor.set_step(2);
  cursor.set_next_prompt_index(16);
  store->put_cursor(cursor);  // replaces
  EXPECT_TRUE(same(*store->cursor("r"), cursor));
  v1::LearnerCursor other;
  other.set_run_id("q");
  store->put_cursor(other);
  std::vector<std::string> runs;
  store->for_each_cursor([&](const v1::LearnerCursor& c) { runs.push_back(c.run_id()); });
  EXPECT_EQ(runs, (std::vector<std::string>{"q", "r"}));
}

TEST_F(RolloutStoreTest, EvalsAreIdempotentAndGroupedById) {
  auto store = RolloutStore::open(path(), Mode::kReadWrite);
  std::vector<v1::EvalRecord> records;
  for (const std::string id : {"e2", "e1"}) {
    for (uint64_t p : {12, 3}) {
      v1::EvalRecord r;
      r.set_eval_id(id);
      r.set_prompt_index(p);
      r.set_prompt("1+1=");
      r.set_response_a("2");
      r.set_response_b("3");
      r.set_verdict("A");
      r.set_preference_a(0.9);
      r.add_reasoning("A is exact");
      records.push_back(r);
    }
  }
  EXPECT_EQ(store->write_evals(records), 4u);
  EXPECT_EQ(store->write_evals(records), 0u);
  std::vector<v1::EvalRecord> changed = {records[0]};
  changed[0].set_verdict("B");
  EXPECT_NE(error_of([&] { store->write_evals(changed); }).find("evals key (eval 'e2', prompt 12)"),
            std::string::npos);

  std::vector<uint64_t> e1;
  store->for_each_eval("e1", [&](const v1::EvalRecord& r) {
    EXPECT_EQ(r.eval_id(), "e1");
    e1.push_back(r.prompt_index());
  });
  EXPECT_EQ(e1, (std::vector<uint64_t>{3, 12}));
  int all = 0;
  store->for_each_eval("", [&](const v1::EvalRecord& r) {
    EXPECT_EQ(r.verdict(), "A");
    ++all;
  });
  EXPECT_EQ(all, 4);
}

TEST_F(RolloutStoreTest, StatsCountAndAverage) {
  auto store = RolloutStore::open(path(), Mode::kReadWrite);
  // Run "a": versions 2 and 5, rewards 0, 1, 2, 3; ground truth (10) on the even samples.
  store->write_step({make_prompt("a", 0), make_prompt("a", 1)},
                    {make_scored("a", 2, 0, 0, 0.0), make_scored("a", 2, 0, 1, 1.0),
                     make_scored("a", 5, 1, 0, 2.0), make_scored("a", 5, 1, 1, 3.0)});
  v1::ScoredRollout low = make_scored("b", 7, 0, 2, -1.0);
  low.set_ground_truth_score(4.0);
  store->write_step({make_prompt("b", 0)}, {low});
  v1::LearnerCursor cursor;
  cursor.set_run_id("a");
  store->put_cursor(cursor);
  v1::EvalRecord eval;
  eval.set_eval_id("e");
  store->write_evals({eval});

  const RolloutStore::Stats stats = store->stats();
  EXPECT_EQ(stats.path, path());
  ASSERT_EQ(stats.runs.size(), 2u);
  const RolloutStore::RunStats& a = stats.runs[0];
  EXPECT_EQ(a.run_id, "a");
  EXPECT_EQ(a.prompts, 2u);
  EXPECT_EQ(a.rollouts, 4u);
  EXPECT_EQ(a.judgments, 4u);
  EXPECT_EQ(a.min_version, 2u);
  EXPECT_EQ(a.max_version, 5u);
  EXPECT_DOUBLE_EQ(a.mean_reward, 1.5);
  EXPECT_EQ(a.with_ground_truth, 2u);
  EXPECT_DOUBLE_EQ(a.mean_ground_truth, 10.0);
  const RolloutStore::RunStats& b = stats.runs[1];
  EXPECT_EQ(b.run_id, "b");
  EXPECT_EQ(b.min_version, 7u);
  EXPECT_EQ(b.max_version, 7u);
  EXPECT_DOUBLE_EQ(b.mean_reward, -1.0);
  EXPECT_DOUBLE_EQ(b.mean_ground_truth, 4.0);
  EXPECT_EQ(stats.evals, 1u);
  EXPECT_EQ(stats.cursors, 1u);
}

TEST_F(RolloutStoreTest, BadRunIdsAreRejected) {
  auto store = RolloutStore::open(path(), Mode::kReadWrite);
  const std::string nul("a\0b", 3);
  const std::string error = error_of([&] { store->write_step({make_prompt(nul, 0)}, {}); });
  EXPECT_NE(error.find("run_id 'a\\x00b': must be 1..128 bytes without NUL"), std::string::npos)
      << error;
  EXPECT_NE(error_of([&] { store->write_step({}, {make_scored("", 0, 0, 0)}); }).find("run_id"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { store->read_scored(std::string(129, 'x'), 0, 0, 1); }).find("got 129 bytes"),
      std::string::npos);
  v1::LearnerCursor cursor;
  EXPECT_NE(error_of([&] { store->put_cursor(cursor); }).find("run_id"), std::string::npos);
  v1::ScoredRollout no_rollout = make_scored("r", 0, 0, 0);
  no_rollout.clear_rollout();
  EXPECT_NE(error_of([&] { store->write_step({}, {no_rollout}); }).find("without its rollout"),
            std::string::npos);
  EXPECT_NO_THROW(store->read_scored(std::string(128, 'x'), 0, 0, 1));
}

TEST_F(RolloutStoreTest, ConcurrentWritersEachLandOnce) {
  auto store = RolloutStore::open(path(), Mode::kReadWrite);
  // Four threads write the same 8 steps: each record is new for exactly one of them.
  std::array<size_t, 4> written{};
  std::vector<std::thread> threads;
  for (size_t t = 0; t < written.size(); ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t step = 0; step < 8; ++step) {
        written[t] +=
            store->write_step({make_prompt("r", step)},
                              {make_scored("r", step, step, 0), make_scored("r", step, step, 1)});
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(written[0] + written[1] + written[2] + written[3], 8u * 3u);
  EXPECT_EQ(scored_keys(*store, "r").size(), 16u);
}

// ---- `rlhf db` -------------------------------------------------------------------------------

struct CliResult {
  int exit_code = -1;
  std::string out, err;
};

CliResult run_rlhf(const std::string& args, const fs::path& scratch) {
  const fs::path err_file = scratch / "stderr.txt";
  const std::string command = std::string(RLHF_BINARY) + " " + args + " 2> " + err_file.string();
  CliResult result;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) return result;
  std::array<char, 4096> buffer{};
  for (size_t n; (n = std::fread(buffer.data(), 1, buffer.size(), pipe)) > 0;) {
    result.out.append(buffer.data(), n);
  }
  const int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  std::stringstream text;
  text << in.rdbuf();
  result.err = text.str();
  return result;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

TEST_F(RolloutStoreTest, DbStatsAndExportCommands) {
  // The store stays open read-write, as the learner's would: the tools read beside it.
  auto store = RolloutStore::open(path(), Mode::kReadWrite);
  store->write_step({make_prompt("r1", 0), make_prompt("r1", 1)},
                    {make_scored("r1", 0, 0, 0, 1.0), make_scored("r1", 0, 0, 1, 3.0),
                     make_scored("r1", 1, 1, 0, 2.0)});
  store->write_step({make_prompt("r2", 0)},
                    {make_scored("r2", 4, 0, 0), make_scored("r2", 4, 0, 1)});
  v1::LearnerCursor cursor;
  cursor.set_run_id("r1");
  cursor.set_step(2);
  store->put_cursor(cursor);

  const CliResult stats = run_rlhf("db stats --json --db " + path(), dir_);
  ASSERT_EQ(stats.exit_code, 0) << stats.err;
  const auto json = nlohmann::json::parse(lines_of(stats.out).back());
  EXPECT_EQ(json["path"], path());
  ASSERT_EQ(json["runs"].size(), 2u);
  EXPECT_EQ(json["runs"][0]["run_id"], "r1");
  EXPECT_EQ(json["runs"][0]["prompts"], 2);
  EXPECT_EQ(json["runs"][0]["rollouts"], 3);
  EXPECT_EQ(json["runs"][0]["judgments"], 3);
  EXPECT_EQ(json["runs"][0]["min_version"], 0);
  EXPECT_EQ(json["runs"][0]["max_version"], 1);
  EXPECT_DOUBLE_EQ(json["runs"][0]["mean_reward"].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(json["runs"][0]["mean_ground_truth"].get<double>(), 10.0);
  EXPECT_EQ(json["runs"][1]["max_version"], 4);
  EXPECT_EQ(json["evals"], 0);
  EXPECT_EQ(json["cursors"], 1);
  EXPECT_NE(stats.out.find("r1"), std::string::npos);

  const CliResult all = run_rlhf("db export --db " + path(), dir_);
  ASSERT_EQ(all.exit_code, 0) << all.err;
  const std::vector<std::string> lines = lines_of(all.out);
  ASSERT_EQ(lines.size(), 5u);
  const auto first = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(first["rollout"]["run_id"], "r1");
  EXPECT_EQ(first["rollout"]["sample_index"], 0);  // defaults printed too
  EXPECT_EQ(first["judgment"]["reasoning"].size(), 2u);
  EXPECT_NE(all.err.find("5 records (scored)"), std::string::npos) << all.err;

  const std::string out = (dir_ / "prompts.jsonl").string();
  const CliResult prompts =
      run_rlhf("db export --kind prompts --run r1 --out " + out + " --db " + path(), dir_);
  ASSERT_EQ(prompts.exit_code, 0) << prompts.err;
  std::ifstream file(out);
  std::stringstream text;
  text << file.rdbuf();
  const std::vector<std::string> prompt_lines = lines_of(text.str());
  ASSERT_EQ(prompt_lines.size(), 2u);
  EXPECT_EQ(nlohmann::json::parse(prompt_lines[1])["text"], "1+2=");

  const CliResult cursors = run_rlhf("db export --kind cursors --db " + path(), dir_);
  EXPECT_EQ(lines_of(cursors.out).size(), 1u);

  const std::string missing = path("nope");
  const CliResult bad = run_rlhf("db stats --db " + missing, dir_);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_EQ(bad.err, "rlhf: error: rollout store '" + missing + "' does not exist\n");
  EXPECT_EQ(run_rlhf("db export --db " + (dir_ / "prompts.jsonl").string(), dir_).exit_code, 1);
}

}  // namespace
}  // namespace rlhf
