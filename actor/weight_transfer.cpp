#include "actor/weight_transfer.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <utility>

#include "common/crc32c.h"
#include "common/error.h"

namespace rlhf {
namespace {

std::span<const std::byte> as_bytes(const std::string& s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

// The checkpoint code reads and writes files (pread, atomic rename), so payload bytes pass
// through one. mkstemp gives a name no other process or thread can race us for.
class TempCheckpointFile {
 public:
  TempCheckpointFile() {
    const std::filesystem::path dir = std::filesystem::temp_directory_path();
    path_ = (dir / "rlhf-weights-XXXXXX").string();
    fd_ = ::mkstemp(path_.data());
    if (fd_ < 0) {
      fail("weight payload: cannot create a temporary file in '{}': {}", dir.string(),
           std::strerror(errno));
    }
  }
  ~TempCheckpointFile() {
    close_fd();
    ::unlink(path_.c_str());
    // checkpoint_save writes `path.tmp` and renames it; a failed save can leave it behind.
    ::unlink((path_ + ".tmp").c_str());
  }
  TempCheckpointFile(const TempCheckpointFile&) = delete;
  TempCheckpointFile& operator=(const TempCheckpointFile&) = delete;

  const std::string& path() const { return path_; }

  void write_all(const std::string& bytes) {
    const char* at = bytes.data();
    size_t left = bytes.size();
    while (left > 0) {
      const ssize_t n = ::write(fd_, at, left);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) fail("weight payload: cannot write '{}': {}", path_, std::strerror(errno));
      at += n;
      left -= size_t(n);
    }
    close_fd();
  }

  // The save functions write under this name themselves (temp file + rename).
  void close_fd() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  std::string read_all() const {
    std::ifstream in(path_, std::ios::binary);
    if (!in) fail("weight payload: cannot read back '{}'", path_);
    const auto size = std::filesystem::file_size(path_);
    std::string bytes(size, '\0');
    in.read(bytes.data(), std::streamsize(size));
    if (!in) fail("weight payload: short read of '{}'", path_);
    return bytes;
  }

 private:
  std::string path_;
  int fd_ = -1;
};

// The checkpoint reader's errors name the file; for a payload that name is our temporary file,
// which means nothing to whoever sent the bytes.
[[noreturn]] void fail_payload(const Error& e, const std::string& temp_path) {
  std::string message = e.what();
  for (size_t at = message.find(temp_path); at != std::string::npos;
       at = message.find(temp_path, at)) {
    message.replace(at, temp_path.size(), "<payload>");
  }
  throw Error("weight payload: " + message);
}

}  // namespace

std::string serialize_policy(Transformer<float>& model, const std::string& tokenizer,
                             std::optional<Fp4Format> pack) {
  TempCheckpointFile file;
  file.close_fd();
  if (pack) {
    checkpoint_save_packed(file.path(), model, tokenizer, *pack);
  } else {
    checkpoint_save(file.path(), model, tokenizer);
  }
  return file.read_all();
}

CheckpointContents read_policy_info(const std::string& bytes) {
  TempCheckpointFile file;
  file.write_all(bytes);
  try {
    return checkpoint_read_info(file.path());
  } catch (const Error& e) {
    fail_payload(e, file.path());
  }
}

std::unique_ptr<Transformer<float>> load_policy(const std::string& bytes, Ops<float>& ops,
                                                int max_batch) {
  TempCheckpointFile file;
  file.write_all(bytes);
  try {
    return checkpoint_load_model(file.path(), ops, max_batch);
  } catch (const Error& e) {
    fail_payload(e, file.path());
  }
}

size_t weight_chunk_count(const WeightPayload& payload, size_t chunk_bytes) {
  RLHF_CHECK(chunk_bytes > 0, "chunk_bytes must be positive");
  return std::max<size_t>(1, (payload.bytes.size() + chunk_bytes - 1) / chunk_bytes);
}

v1::WeightChunk make_weight_chunk(const WeightPayload& payload, size_t index, size_t chunk_bytes) {
  RLHF_CHECK(index < weight_chunk_count(payload, chunk_bytes), "chunk {} of {}", index,
             weight_chunk_count(payload, chunk_bytes));
  v1::WeightChunk chunk;
  if (index == 0) {
    chunk.set_version(payload.version);
    chunk.set_total_bytes(payload.bytes.size());
    chunk.set_crc32c(crc32c(as_bytes(payload.bytes)));
    chunk.set_format(payload.format);
  }
  const size_t begin = index * chunk_bytes;
  chunk.set_data(payload.bytes.substr(begin, std::min(chunk_bytes, payload.bytes.size() - begin)));
  return chunk;
}

std::vector<v1::WeightChunk> make_weight_chunks(const WeightPayload& payload, size_t chunk_bytes) {
  std::vector<v1::WeightChunk> chunks;
  const size_t n = weight_chunk_count(payload, chunk_bytes);
  chunks.reserve(n);
  for (size_t i = 0; i < n; ++i) chunks.push_back(make_weight_chunk(payload, i, chunk_bytes));
  return chunks;
}

WeightAssembler::WeightAssembler(uint64_t max_bytes) : max_bytes_(max_bytes) {}

void WeightAssembler::add(const v1::WeightChunk& chunk) {
  RLHF_CHECK(!finished_, "WeightAssembler::add after finish()");
  if (!has_header_) {
    if (chunk.format().empty()) {
      fail("weight stream: the first chunk carries no header (its format is empty)");
    }
    if (chunk.format() != kCheckpointFormat) {
      fail("weight stream: format '{}' is not supported (expected '{}')", chunk.format(),
           kCheckpointFormat);
    }
    if (chunk.total_bytes() > max_bytes_) {
      fail("weight stream: total_bytes {} exceeds the limit of {} bytes", chunk.total_bytes(),
           max_bytes_);
    }
    has_header_ = true;
    total_bytes_ = chunk.total_bytes();
    expected_crc_ = chunk.crc32c();
    payload_.version = chunk.version();
    payload_.format = chunk.format();
    payload_.bytes.reserve(size_t(total_bytes_));
  }
  const uint64_t received = payload_.bytes.size();
  if (chunk.data().size() > total_bytes_ - received) {
    fail("weight stream: data runs past total_bytes {} (a chunk of {} bytes after {} received)",
         total_bytes_, chunk.data().size(), received);
  }
  crc_ = crc32c_extend(crc_, as_bytes(chunk.data()));
  payload_.bytes.append(chunk.data());
}

WeightPayload WeightAssembler::finish() {
  RLHF_CHECK(!finished_, "WeightAssembler::finish called twice");
  finished_ = true;
  if (!has_header_) fail("weight stream: no chunk received");
  if (payload_.bytes.size() != total_bytes_) {
    fail("weight stream: size mismatch: received {} bytes, the header's total_bytes is {}",
         payload_.bytes.size(), total_bytes_);
  }
  if (crc_ != expected_crc_) {
    fail("weight stream: CRC-32C mismatch: the received bytes have {:#010x}, the header's "
         "crc32c is {:#010x}",
         crc_, expected_crc_);
  }
  return std::move(payload_);
}

}  // namespace rlhf
