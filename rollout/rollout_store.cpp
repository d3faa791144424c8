#include "rollout/rollout_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <map>
#include <optional>
#include <string_view>
#include <system_error>
#include <utility>

#include <fmt/core.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include "common/error.h"

namespace rlhf {

namespace {

namespace fs = std::filesystem;

constexpr const char* kSchemaKey = "schema";
constexpr const char* kSchema = "rlhf-store-v1";
constexpr const char* kCursorPrefix = "cursor/";
constexpr const char* kEvalSpecPrefix = "eval/";
constexpr size_t kMaxIdBytes = 128;

// Indexes RolloutStore::families_, in the order the store opens them.
enum Family : size_t { kPrompts, kRollouts, kJudgments, kEvals, kMeta, kFamilyCount };
constexpr std::array<const char*, kFamilyCount> kFamilyNames = {"prompts", "rollouts", "judgments",
                                                                "evals", "meta"};

// ---- keys ----------------------------------------------------------------------------------

// An id as an error message can show it: NUL and other control bytes escaped, long ones cut.
std::string printable(const std::string& id) {
  std::string out;
  for (char c : id.substr(0, 64)) {
    out += uint8_t(c) < 0x20 ? fmt::format("\\x{:02x}", uint8_t(c)) : std::string(1, c);
  }
  return id.size() > 64 ? out + "..." : out;
}

void check_id(const std::string& id, const char* what) {
  if (id.empty() || id.size() > kMaxIdBytes || id.find('\0') != std::string::npos) {
    fail("{} '{}': must be 1..{} bytes without NUL, got {} bytes", what, printable(id), kMaxIdBytes,
         id.size());
  }
}

void append_be(std::string& key, uint64_t value, int bytes) {
  for (int shift = 8 * (bytes - 1); shift >= 0; shift -= 8) key.push_back(char(value >> shift));
}

uint64_t read_be(const char* bytes, int n) {
  uint64_t value = 0;
  for (int i = 0; i < n; ++i) value = (value << 8) | uint8_t(bytes[i]);
  return value;
}

// The prefix every key of one run (or evaluation) starts with. The NUL cannot occur in an id,
// so the prefix of "a" is not a prefix of any key of "ab".
std::string id_prefix(const std::string& id) { return id + '\0'; }

// The first key past every key with id_prefix(id).
std::string id_prefix_end(const std::string& id) { return id + '\1'; }

std::string sample_key(const std::string& run, uint64_t version, uint64_t prompt, uint32_t sample) {
  std::string key = id_prefix(run);
  append_be(key, version, 8);
  append_be(key, prompt, 8);
  append_be(key, sample, 4);
  return key;
}

std::string prompt_key(const std::string& id, uint64_t prompt) {
  std::string key = id_prefix(id);
  append_be(key, prompt, 8);
  return key;
}

struct SampleKey {
  std::string run;
  uint64_t version = 0, prompt = 0;
  uint32_t sample = 0;
};

// The id part of any key, and where its fixed-width tail starts; nullopt when there is no NUL.
std::optional<std::pair<std::string, size_t>> split_id(std::string_view key) {
  const size_t nul = key.find('\0');
  if (nul == std::string_view::npos || nul == 0) return std::nullopt;
  return std::make_pair(std::string(key.substr(0, nul)), nul + 1);
}

std::optional<SampleKey> decode_sample_key(std::string_view key) {
  const auto id = split_id(key);
  if (!id || key.size() - id->second != 20) return std::nullopt;
  const char* tail = key.data() + id->second;
  return SampleKey{id->first, read_be(tail, 8), read_be(tail + 8, 8),
                   uint32_t(read_be(tail + 16, 4))};
}

std::optional<std::pair<std::string, uint64_t>> decode_prompt_key(std::string_view key) {
  const auto id = split_id(key);
  if (!id || key.size() - id->second != 8) return std::nullopt;
  return std::make_pair(id->first, read_be(key.data() + id->second, 8));
}

std::string hex(std::string_view bytes) {
  std::string out;
  for (char c : bytes) out += fmt::format("{:02x}", uint8_t(c));
  return out;
}

// "rollouts key (run 'r', version 3, prompt 10, sample 2)": errors name keys as people think of
// them; a key that does not decode (which only a foreign writer can produce) shows as hex.
std::string describe_key(Family family, std::string_view key) {
  switch (family) {
    case kRollouts:
    case kJudgments:
      if (const auto k = decode_sample_key(key)) {
        return fmt::format("{} key (run '{}', version {}, prompt {}, sample {})",
                           kFamilyNames[family], k->run, k->version, k->prompt, k->sample);
      }
      break;
    case kPrompts:
    case kEvals:
      if (const auto k = decode_prompt_key(key)) {
        return fmt::format("{} key ({} '{}', prompt {})", kFamilyNames[family],
                           family == kEvals ? "eval" : "run", k->first, k->second);
      }
      break;
    case kMeta:
      return fmt::format("meta key '{}'", key);
    case kFamilyCount:
      break;
  }
  return fmt::format("{} key 0x{} (malformed)", kFamilyNames[family], hex(key));
}

// ---- values --------------------------------------------------------------------------------

// Deterministic serialization, so that "the same record" is "the same bytes" and idempotent
// rewrites can be recognised by comparing bytes (map fields would otherwise be free to reorder).
std::string serialize(const google::protobuf::MessageLite& message) {
  std::string out;
  {
    google::protobuf::io::StringOutputStream stream(&out);
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    RLHF_CHECK(message.SerializeToCodedStream(&coded), "serializing {}", message.GetTypeName());
  }  // the CodedOutputStream trims `out` to its size when it goes away
  return out;
}

// The judgments family keeps a ScoredRollout without its rollout, which lives in `rollouts`.
std::string judgment_value(const v1::ScoredRollout& scored) {
  v1::ScoredRollout judgment;
  *judgment.mutable_judgment() = scored.judgment();
  if (scored.has_ground_truth_score()) judgment.set_ground_truth_score(scored.ground_truth_score());
  judgment.set_reward(scored.reward());
  return serialize(judgment);
}

std::string status_text(const rocksdb::Status& status) { return status.ToString(); }

// ---- opening -------------------------------------------------------------------------------

rocksdb::DBOptions db_options(RolloutStore::Mode mode) {
  rocksdb::DBOptions options;
  // Every open writes an info LOG and renames the last one; keep a handful, not RocksDB's 1000.
  options.keep_log_file_num = 4;
  // A read-only instance opens every table file up front. The learner's compactions may delete
  // files while a tool reads; an open descriptor keeps a deleted file readable, a lazily opened
  // one would be gone.
  if (mode == RolloutStore::Mode::kReadOnly) options.max_open_files = -1;
  return options;
}

std::vector<rocksdb::ColumnFamilyDescriptor> family_descriptors() {
  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  descriptors.emplace_back(rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions());
  for (const char* name : kFamilyNames) {
    descriptors.emplace_back(name, rocksdb::ColumnFamilyOptions());
  }
  return descriptors;
}

void close_db(rocksdb::DB* db, std::vector<rocksdb::ColumnFamilyHandle*>& handles) {
  // Destroying a handle fails only for DefaultColumnFamily()'s, which is never among these.
  for (rocksdb::ColumnFamilyHandle* handle : handles) (void)db->DestroyColumnFamilyHandle(handle);
  handles.clear();
  // Close() flushes nothing we need (every write was synced to the WAL) and its error cannot be
  // acted on in a destructor; deleting the DB releases it either way.
  (void)db->Close();
  delete db;
}

// fsync of a directory, so a rename inside it survives a power loss.
void sync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

// A new store is built beside `path` and renamed into place once it holds its schema, so a
// crash mid-creation leaves no half-made store at `path` for the next open to trip over.
void create_store(const std::string& path) {
  const fs::path target = fs::absolute(path);
  const fs::path parent = target.parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) {
    fail("rollout store '{}': cannot create directory '{}': {}", path, parent.string(),
         ec.message());
  }
  const fs::path building =
      parent / fmt::format(".{}.creating.{}", target.filename().string(), ::getpid());
  fs::remove_all(building, ec);

  rocksdb::DBOptions options = db_options(RolloutStore::Mode::kReadWrite);
  options.create_if_missing = true;
  options.create_missing_column_families = true;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* db = nullptr;
  rocksdb::Status status =
      rocksdb::DB::Open(options, building.string(), family_descriptors(), &handles, &db);
  if (!status.ok()) {
    fs::remove_all(building, ec);
    fail("rollout store '{}': cannot create: {}", path, status_text(status));
  }
  rocksdb::WriteOptions sync;
  sync.sync = true;
  status = db->Put(sync, handles[1 + kMeta], kSchemaKey, kSchema);
  close_db(db, handles);
  if (!status.ok()) {
    fs::remove_all(building, ec);
    fail("rollout store '{}': cannot write its schema: {}", path, status_text(status));
  }
  // rename(2) replaces an empty directory; a non-empty one means another process created the
  // store first, and then we open theirs.
  fs::rename(building, target, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove_all(building, ignored);
    if (!fs::exists(target / "CURRENT", ignored)) {
      fail("rollout store '{}': cannot create: {}", path, ec.message());
    }
    return;
  }
  sync_directory(parent);
}

bool is_empty_directory(const fs::path& path) {
  std::error_code ec;
  return fs::is_directory(path, ec) && fs::is_empty(path, ec) && !ec;
}

// Why `path` cannot be a RocksDB database, checked before RocksDB is asked: its own messages
// ("While opening a file for sequentially reading: .../CURRENT: No such file or directory") do
// not say what the user got wrong.
void check_is_database(const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) fail("rollout store '{}' does not exist", path);
  if (!fs::is_directory(st)) {
    fail("rollout store '{}': not a RocksDB database (not a directory)", path);
  }
  if (!fs::exists(fs::path(path) / "CURRENT", ec)) {
    fail("rollout store '{}': not a RocksDB database (no CURRENT file{})", path,
         is_empty_directory(path) ? ", the directory is empty" : "");
  }
}

// The families the database has must be exactly this schema's: RocksDB refuses a read-write open
// that leaves a family out, and a family we do not know means a store of another schema.
void check_families(const std::string& path) {
  std::vector<std::string> names;
  const rocksdb::Status status =
      rocksdb::DB::ListColumnFamilies(rocksdb::DBOptions(), path, &names);
  if (!status.ok()) {
    fail("rollout store '{}': not a readable RocksDB database: {}", path, status_text(status));
  }
  for (const char* wanted : kFamilyNames) {
    if (std::find(names.begin(), names.end(), wanted) == names.end()) {
      fail("rollout store '{}': a RocksDB database but not a rollout store (no column family '{}')",
           path, wanted);
    }
  }
  for (const std::string& name : names) {
    const bool known = name == rocksdb::kDefaultColumnFamilyName ||
                       std::find_if(kFamilyNames.begin(), kFamilyNames.end(),
                                    [&](const char* n) { return name == n; }) != kFamilyNames.end();
    if (!known) {
      fail("rollout store '{}': column family '{}' is not part of schema {}", path, name, kSchema);
    }
  }
}

// RocksDB's lock error is "IO error: While lock file: <path>/LOCK: Resource temporarily
// unavailable", or "lock hold by current process" when this process holds it.
std::string open_error(const std::string& path, const rocksdb::Status& status) {
  const std::string text = status_text(status);
  if (status.IsIOError() && text.find("LOCK") != std::string::npos) {
    if (text.find("current process") != std::string::npos) {
      return fmt::format("rollout store '{}': already open read-write in this process (LOCK held)",
                         path);
    }
    return fmt::format("rollout store '{}': already open read-write by another process (LOCK held)",
                       path);
  }
  return fmt::format("rollout store '{}': cannot open: {}", path, text);
}

// ---- reading -------------------------------------------------------------------------------

// One consistent view for reads that span two families (rollouts and judgments).
class Snapshot {
 public:
  explicit Snapshot(rocksdb::DB* db) : db_(db), snapshot_(db->GetSnapshot()) {}
  ~Snapshot() {
    if (snapshot_) db_->ReleaseSnapshot(snapshot_);
  }
  Snapshot(const Snapshot&) = delete;
  Snapshot& operator=(const Snapshot&) = delete;
  rocksdb::ReadOptions read_options(const rocksdb::Slice* upper_bound = nullptr) const {
    rocksdb::ReadOptions options;
    options.snapshot = snapshot_;
    options.iterate_upper_bound = upper_bound;
    return options;
  }

 private:
  rocksdb::DB* db_;
  const rocksdb::Snapshot* snapshot_;
};

}  // namespace

// ---- RolloutStore --------------------------------------------------------------------------

RolloutStore::RolloutStore(std::string path, Mode mode) : path_(std::move(path)), mode_(mode) {}

RolloutStore::~RolloutStore() {
  if (db_) close_db(db_.release(), families_);
}

std::unique_ptr<RolloutStore> RolloutStore::open(const std::string& path, Mode mode) {
  if (path.empty()) fail("rollout store: the path is empty");
  if (mode == Mode::kReadWrite) {
    std::error_code ec;
    if (!fs::exists(path, ec) || is_empty_directory(path)) create_store(path);
  }
  check_is_database(path);
  check_families(path);

  std::unique_ptr<RolloutStore> store(new RolloutStore(path, mode));
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* db = nullptr;
  const rocksdb::Status status =
      mode == Mode::kReadWrite
          ? rocksdb::DB::Open(db_options(mode), path, family_descriptors(), &handles, &db)
          : rocksdb::DB::OpenForReadOnly(db_options(mode), path, family_descriptors(), &handles,
                                         &db);
  if (!status.ok()) throw Error(open_error(path, status));
  store->db_.reset(db);
  // handles[0] is the default family, which holds no records: its handle goes right away, and
  // families_ lines up with the Family enum.
  store->families_.assign(handles.begin() + 1, handles.end());
  (void)db->DestroyColumnFamilyHandle(handles[0]);

  std::string schema;
  const rocksdb::Status read =
      db->Get(rocksdb::ReadOptions(), store->families_[kMeta], kSchemaKey, &schema);
  if (read.IsNotFound()) {
    fail("rollout store '{}': no schema recorded (meta key 'schema' is missing)", path);
  }
  if (!read.ok()) fail("rollout store '{}': cannot read its schema: {}", path, status_text(read));
  if (schema != kSchema) {
    fail("rollout store '{}': schema '{}', expected '{}'", path, schema, kSchema);
  }
  return store;
}

void RolloutStore::check_writable(const char* operation) const {
  if (mode_ == Mode::kReadOnly) {
    fail("rollout store '{}' is open read-only; {} needs it read-write", path_, operation);
  }
}

namespace {

// The records of one write, checked against the store before any is written: a record already
// stored byte for byte is dropped, a different one throws, and only when every record passed does
// the batch go to RocksDB.
class StagedWrite {
 public:
  StagedWrite(rocksdb::DB* db, const std::vector<rocksdb::ColumnFamilyHandle*>& families,
              const std::string& path)
      : db_(db), families_(families), path_(path) {}

  // True when the record is new (and goes into the batch).
  bool stage(Family family, const std::string& key, const std::string& value) {
    // A key twice in one write: the same record is one record, a different one a conflict.
    const auto [it, inserted] = staged_[family].emplace(key, value);
    if (!inserted) {
      if (it->second != value) {
        conflict(family, key, "is twice in this write with different records");
      }
      return false;
    }
    std::string stored;
    const rocksdb::Status status =
        db_->Get(rocksdb::ReadOptions(), families_[family], key, &stored);
    if (status.ok()) {
      if (stored != value) conflict(family, key, "already holds a different record");
      return false;
    }
    if (!status.IsNotFound()) {
      fail("rollout store '{}': reading {}: {}", path_, describe_key(family, key),
           status_text(status));
    }
    const rocksdb::Status put = batch_.Put(families_[family], key, value);
    if (!put.ok()) {
      fail("rollout store '{}': batching {}: {}", path_, describe_key(family, key),
           status_text(put));
    }
    return true;
  }

  void commit() {
    if (batch_.Count() == 0) return;
    rocksdb::WriteOptions options;
    options.sync = true;  // the learner moves its cursor past this step only once it is on disk
    const rocksdb::Status status = db_->Write(options, &batch_);
    if (!status.ok()) fail("rollout store '{}': write failed: {}", path_, status_text(status));
  }

 private:
  [[noreturn]] void conflict(Family family, const std::string& key, const char* what) {
    fail("rollout store '{}': {} {}; nothing of this write was stored", path_,
         describe_key(family, key), what);
  }

  rocksdb::DB* db_;
  const std::vector<rocksdb::ColumnFamilyHandle*>& families_;
  const std::string& path_;
  rocksdb::WriteBatch batch_;
  std::array<std::map<std::string, std::string>, kFamilyCount> staged_;
};

}  // namespace

size_t RolloutStore::write_step(const std::vector<v1::Prompt>& prompts,
                                const std::vector<v1::ScoredRollout>& scored) {
  check_writable("write_step");
  // Validate everything before staging, so a bad record fails the same way wherever it sits.
  for (const v1::Prompt& prompt : prompts) check_id(prompt.run_id(), "prompt run_id");
  for (const v1::ScoredRollout& s : scored) {
    if (!s.has_rollout()) fail("rollout store '{}': a scored rollout without its rollout", path_);
    check_id(s.rollout().run_id(), "rollout run_id");
  }
  const std::lock_guard<std::mutex> lock(write_mutex_);
  StagedWrite write(db_.get(), families_, path_);
  size_t written = 0;
  for (const v1::Prompt& prompt : prompts) {
    written += write.stage(kPrompts, prompt_key(prompt.run_id(), prompt.prompt_index()),
                           serialize(prompt));
  }
  for (const v1::ScoredRollout& s : scored) {
    const v1::Rollout& r = s.rollout();
    const std::string key =
        sample_key(r.run_id(), r.policy_version(), r.prompt_index(), r.sample_index());
    // Both halves are staged (not short-circuited), so a conflict in either is found.
    const bool new_rollout = write.stage(kRollouts, key, serialize(r));
    const bool new_judgment = write.stage(kJudgments, key, judgment_value(s));
    written += new_rollout || new_judgment;
  }
  write.commit();
  return written;
}

size_t RolloutStore::write_evals(const std::vector<v1::EvalRecord>& records) {
  check_writable("write_evals");
  for (const v1::EvalRecord& record : records) check_id(record.eval_id(), "eval_id");
  const std::lock_guard<std::mutex> lock(write_mutex_);
  StagedWrite write(db_.get(), families_, path_);
  size_t written = 0;
  for (const v1::EvalRecord& record : records) {
    written +=
        write.stage(kEvals, prompt_key(record.eval_id(), record.prompt_index()), serialize(record));
  }
  write.commit();
  return written;
}

void RolloutStore::put_eval_spec(const v1::EvalSpec& spec) {
  check_writable("put_eval_spec");
  check_id(spec.eval_id(), "eval_id");
  const std::lock_guard<std::mutex> lock(write_mutex_);
  StagedWrite write(db_.get(), families_, path_);
  write.stage(kMeta, kEvalSpecPrefix + spec.eval_id(), serialize(spec));
  write.commit();
}

void RolloutStore::put_cursor(const v1::LearnerCursor& cursor) {
  check_writable("put_cursor");
  check_id(cursor.run_id(), "cursor run_id");
  rocksdb::WriteOptions options;
  options.sync = true;
  const std::lock_guard<std::mutex> lock(write_mutex_);
  const rocksdb::Status status =
      db_->Put(options, families_[kMeta], kCursorPrefix + cursor.run_id(), serialize(cursor));
  if (!status.ok()) {
    fail("rollout store '{}': writing the cursor of run '{}': {}", path_, cursor.run_id(),
         status_text(status));
  }
}

namespace {

template <typename Message>
Message parse_value(const std::string& path, Family family, std::string_view key,
                    const rocksdb::Slice& value) {
  Message message;
  if (!message.ParseFromArray(value.data(), int(value.size()))) {
    fail("rollout store '{}': {}: the value does not parse as {}", path, describe_key(family, key),
         message.GetTypeName());
  }
  return message;
}

// The record under one key; nullopt when the key is absent.
template <typename Message>
std::optional<Message> read_record(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* handle,
                                   const std::string& path, Family family,
                                   const std::string& key) {
  std::string value;
  const rocksdb::Status status = db->Get(rocksdb::ReadOptions(), handle, key, &value);
  if (status.IsNotFound()) return std::nullopt;
  if (!status.ok()) {
    fail("rollout store '{}': reading {}: {}", path, describe_key(family, key),
         status_text(status));
  }
  return parse_value<Message>(path, family, key, value);
}

void check_iterator(const std::string& path, Family family, const rocksdb::Iterator& it) {
  if (!it.status().ok()) {
    fail("rollout store '{}': reading {}: {}", path, kFamilyNames[family],
         status_text(it.status()));
  }
}

// Walks `rollouts` and `judgments` side by side from `lower` (up to `upper`, when given) and
// hands each joined pair to `fn`. The two families are written in one batch, so a key in one of
// them without the other is damage, reported rather than skipped.
void join_scored(rocksdb::DB* db, const std::vector<rocksdb::ColumnFamilyHandle*>& families,
                 const std::string& path, const std::string& lower,
                 const std::optional<std::string>& upper,
                 const std::function<void(const v1::ScoredRollout&)>& fn) {
  const Snapshot snapshot(db);
  const rocksdb::Slice upper_slice(upper ? *upper : std::string_view());
  const rocksdb::ReadOptions options = snapshot.read_options(upper ? &upper_slice : nullptr);
  std::unique_ptr<rocksdb::Iterator> r(db->NewIterator(options, families[kRollouts]));
  std::unique_ptr<rocksdb::Iterator> j(db->NewIterator(options, families[kJudgments]));
  r->Seek(lower);
  j->Seek(lower);
  while (r->Valid() || j->Valid()) {
    const int order = !r->Valid() ? 1 : !j->Valid() ? -1 : r->key().compare(j->key());
    if (order < 0) {
      fail("rollout store '{}': {} has no judgment (store damaged)", path,
           describe_key(kRollouts, r->key().ToStringView()));
    }
    if (order > 0) {
      fail("rollout store '{}': {} has no rollout (store damaged)", path,
           describe_key(kJudgments, j->key().ToStringView()));
    }
    const std::string_view key = r->key().ToStringView();
    v1::ScoredRollout scored = parse_value<v1::ScoredRollout>(path, kJudgments, key, j->value());
    *scored.mutable_rollout() = parse_value<v1::Rollout>(path, kRollouts, key, r->value());
    fn(scored);
    r->Next();
    j->Next();
  }
  check_iterator(path, kRollouts, *r);
  check_iterator(path, kJudgments, *j);
}

// Every key of `family` in [lower, upper) (to the end when there is no upper), with its value,
// in key order.
void scan(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* handle, const std::string& path,
          Family family, const Snapshot& snapshot, const std::string& lower,
          const std::optional<std::string>& upper,
          const std::function<void(std::string_view key, const rocksdb::Slice& value)>& fn) {
  const rocksdb::Slice upper_slice(upper ? *upper : std::string_view());
  rocksdb::ReadOptions options = snapshot.read_options(upper ? &upper_slice : nullptr);
  // A scan reads each block once; caching it would only push out blocks that point reads reuse.
  options.fill_cache = false;
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(options, handle));
  for (it->Seek(lower); it->Valid(); it->Next()) fn(it->key().ToStringView(), it->value());
  check_iterator(path, family, *it);
}

// The [lower, upper) key range of one id, or of every key when the id is empty.
std::pair<std::string, std::optional<std::string>> id_range(const std::string& id,
                                                            const char* what) {
  if (id.empty()) return {std::string(), std::nullopt};
  check_id(id, what);
  return {id_prefix(id), id_prefix_end(id)};
}

}  // namespace

std::vector<v1::ScoredRollout> RolloutStore::read_scored(const std::string& run_id,
                                                         uint64_t policy_version,
                                                         uint64_t first_prompt,
                                                         uint64_t end_prompt) const {
  check_id(run_id, "run_id");
  std::vector<v1::ScoredRollout> out;
  if (end_prompt <= first_prompt) return out;
  join_scored(db_.get(), families_, path_, sample_key(run_id, policy_version, first_prompt, 0),
              sample_key(run_id, policy_version, end_prompt, 0),
              [&](const v1::ScoredRollout& scored) { out.push_back(scored); });
  return out;
}

void RolloutStore::for_each_scored(const std::string& run_id,
                                   const std::function<void(const v1::ScoredRollout&)>& fn) const {
  const auto [lower, upper] = id_range(run_id, "run_id");
  join_scored(db_.get(), families_, path_, lower, upper, fn);
}

std::optional<v1::Prompt> RolloutStore::read_prompt(const std::string& run_id,
                                                    uint64_t prompt_index) const {
  check_id(run_id, "run_id");
  return read_record<v1::Prompt>(db_.get(), families_[kPrompts], path_, kPrompts,
                                 prompt_key(run_id, prompt_index));
}

void RolloutStore::for_each_prompt(const std::string& run_id,
                                   const std::function<void(const v1::Prompt&)>& fn) const {
  const auto [lower, upper] = id_range(run_id, "run_id");
  scan(db_.get(), families_[kPrompts], path_, kPrompts, Snapshot(db_.get()), lower, upper,
       [&](std::string_view key, const rocksdb::Slice& value) {
         fn(parse_value<v1::Prompt>(path_, kPrompts, key, value));
       });
}

std::optional<v1::LearnerCursor> RolloutStore::cursor(const std::string& run_id) const {
  check_id(run_id, "run_id");
  return read_record<v1::LearnerCursor>(db_.get(), families_[kMeta], path_, kMeta,
                                        kCursorPrefix + run_id);
}

std::optional<v1::EvalSpec> RolloutStore::eval_spec(const std::string& eval_id) const {
  check_id(eval_id, "eval_id");
  return read_record<v1::EvalSpec>(db_.get(), families_[kMeta], path_, kMeta,
                                   kEvalSpecPrefix + eval_id);
}

void RolloutStore::for_each_cursor(const std::function<void(const v1::LearnerCursor&)>& fn) const {
  // '/' + 1 == '0': the first key past every "cursor/..." key.
  scan(db_.get(), families_[kMeta], path_, kMeta, Snapshot(db_.get()), kCursorPrefix,
       std::string("cursor0"), [&](std::string_view key, const rocksdb::Slice& value) {
         fn(parse_value<v1::LearnerCursor>(path_, kMeta, key, value));
       });
}

void RolloutStore::for_each_eval(const std::string& eval_id,
                                 const std::function<void(const v1::EvalRecord&)>& fn) const {
  const auto [lower, upper] = id_range(eval_id, "eval_id");
  scan(db_.get(), families_[kEvals], path_, kEvals, Snapshot(db_.get()), lower, upper,
       [&](std::string_view key, const rocksdb::Slice& value) {
         fn(parse_value<v1::EvalRecord>(path_, kEvals, key, value));
       });
}

RolloutStore::Stats RolloutStore::stats() const {
  struct Sums {
    RunStats run;
    double reward = 0, ground_truth = 0;
  };
  std::map<std::string, Sums> runs;
  auto run_of = [&](Family family, std::string_view key) -> Sums& {
    const auto id = split_id(key);
    if (!id) fail("rollout store '{}': {}", path_, describe_key(family, key));
    Sums& sums = runs[id->first];
    sums.run.run_id = id->first;
    return sums;
  };
  rocksdb::DB* db = db_.get();
  // One snapshot for every family, so the counts agree with each other while a learner writes.
  const Snapshot snapshot(db);
  const std::optional<std::string> all;
  scan(db, families_[kPrompts], path_, kPrompts, snapshot, "", all,
       [&](std::string_view key, const rocksdb::Slice&) { ++run_of(kPrompts, key).run.prompts; });
  scan(db, families_[kRollouts], path_, kRollouts, snapshot, "", all,
       [&](std::string_view key, const rocksdb::Slice&) {
         const auto k = decode_sample_key(key);
         if (!k) fail("rollout store '{}': {}", path_, describe_key(kRollouts, key));
         RunStats& run = run_of(kRollouts, key).run;
         run.min_version = run.rollouts == 0 ? k->version : std::min(run.min_version, k->version);
         run.max_version = run.rollouts == 0 ? k->version : std::max(run.max_version, k->version);
         ++run.rollouts;
       });
  scan(db, families_[kJudgments], path_, kJudgments, snapshot, "", all,
       [&](std::string_view key, const rocksdb::Slice& value) {
         const auto judgment = parse_value<v1::ScoredRollout>(path_, kJudgments, key, value);
         Sums& sums = run_of(kJudgments, key);
         ++sums.run.judgments;
         sums.reward += judgment.reward();
         if (judgment.has_ground_truth_score()) {
           ++sums.run.with_ground_truth;
           sums.ground_truth += judgment.ground_truth_score();
         }
       });

  Stats stats;
  stats.path = path_;
  for (auto& [id, sums] : runs) {
    RunStats run = sums.run;
    if (run.judgments) run.mean_reward = sums.reward / double(run.judgments);
    if (run.with_ground_truth) {
      run.mean_ground_truth = sums.ground_truth / double(run.with_ground_truth);
    }
    stats.runs.push_back(std::move(run));
  }
  scan(db, families_[kEvals], path_, kEvals, snapshot, "", all,
       [&](std::string_view, const rocksdb::Slice&) { ++stats.evals; });
  scan(db, families_[kMeta], path_, kMeta, snapshot, kCursorPrefix, std::string("cursor0"),
       [&](std::string_view, const rocksdb::Slice&) { ++stats.cursors; });
  for (rocksdb::ColumnFamilyHandle* handle : families_) {
    uint64_t bytes = 0;
    if (db->GetIntProperty(handle, "rocksdb.live-sst-files-size", &bytes)) {
      stats.live_sst_bytes += bytes;
    }
  }
  return stats;
}

}  // namespace rlhf
