#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <utility>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/json_record.h"
#include "model/param_layout.h"

namespace rlhf {

// The data section is the in-memory bytes of the floats; the format says little-endian.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes little-endian");
static_assert(sizeof(float) == 4);

namespace {

// The reference implementation refuses headers above 100 MB; so do we, before allocating.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr uint64_t kLengthBytes = 8;

std::string shape_text(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ","));
}

[[noreturn]] void fail_shape(const std::string& file, const std::string& name,
                             const std::vector<int64_t>& have, const std::vector<int64_t>& need) {
  fail("checkpoint '{}': tensor '{}' has shape {} but the model config needs {}", file, name,
       shape_text(have), shape_text(need));
}

const char* dtype_name(SafetensorsDtype dtype) {
  return dtype == SafetensorsDtype::kF32 ? "F32" : "U8";
}
uint64_t dtype_size(SafetensorsDtype dtype) { return dtype == SafetensorsDtype::kF32 ? 4 : 1; }

// Bytes of a tensor of this shape and dtype, or false if a dimension is negative or the size
// overflows (a corrupt header must not turn into a huge or wrapped-around read).
bool tensor_bytes(const std::vector<int64_t>& shape, SafetensorsDtype dtype, uint64_t* bytes) {
  uint64_t n = dtype_size(dtype);
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  *bytes = n;
  return true;
}

std::string errno_text() { return std::strerror(errno); }

void write_all(int fd, const void* data, size_t size, const std::string& file) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("cannot write checkpoint '{}': {}", file, errno_text());
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
}

// Reads exactly `size` bytes at `offset`. Returns false if the file ends first; an I/O error is
// an rlhf::Error.
bool pread_exact(int fd, void* dst, uint64_t size, uint64_t offset, const std::string& file) {
  char* p = static_cast<char*>(dst);
  while (size > 0) {
    const ssize_t n = ::pread(fd, p, size, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("cannot read checkpoint '{}': {}", file, errno_text());
    if (n == 0) return false;
    p += n;
    size -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return true;
}

// Makes the rename itself durable: without this a crash can lose the directory entry.
void fsync_parent_dir(const std::string& path) {
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  if (dir.empty()) dir = ".";
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    fail("cannot open directory '{}' to sync checkpoint '{}': {}", dir.string(), path,
         errno_text());
  }
  const int rc = ::fsync(fd);
  const std::string reason = rc != 0 ? errno_text() : "";
  ::close(fd);
  if (rc != 0) {
    fail("cannot sync directory '{}' of checkpoint '{}': {}", dir.string(), path, reason);
  }
}

}  // namespace

// ---- Writing ---------------------------------------------------------------------------------

void safetensors_write(const std::string& path, const std::vector<SafetensorsTensorRef>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const SafetensorsTensorRef& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__") {
      fail("cannot write checkpoint '{}': invalid tensor name '{}'", path, t.name);
    }
    if (header.contains(t.name)) {
      fail("cannot write checkpoint '{}': tensor '{}' appears twice", path, t.name);
    }
    uint64_t bytes = 0;
    if (!tensor_bytes(t.shape, t.dtype, &bytes)) {
      fail("cannot write checkpoint '{}': tensor '{}' has invalid shape {}", path, t.name,
           shape_text(t.shape));
    }
    RLHF_CHECK(t.data != nullptr || bytes == 0, "tensor '{}' has no data", t.name);
    header[t.name] = {
        {"dtype", dtype_name(t.dtype)}, {"shape", t.shape},
        {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }

  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // e.g. a name or value that is not UTF-8
    fail("cannot write checkpoint '{}': {}", path, e.what());
  }
  // Spaces after the JSON are allowed by the format; they make the data section 8-byte aligned
  // so the file can be memory-mapped and read as floats (or doubles) in place.
  header_text.append((8 - (kLengthBytes + header_text.size()) % 8) % 8, ' ');
  uint8_t length_bytes[kLengthBytes];
  const uint64_t header_len = header_text.size();
  std::memcpy(length_bytes, &header_len, sizeof(length_bytes));  // little-endian, asserted above

  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot create checkpoint '{}': {}", tmp, errno_text());
  try {
    write_all(fd, length_bytes, sizeof(length_bytes), tmp);
    write_all(fd, header_text.data(), header_text.size(), tmp);
    for (const SafetensorsTensorRef& t : tensors) {
      uint64_t bytes = 0;
      tensor_bytes(t.shape, t.dtype, &bytes);
      if (bytes > 0) write_all(fd, t.data, bytes, tmp);
    }
    if (::fsync(fd) != 0) fail("cannot sync checkpoint '{}': {}", tmp, errno_text());
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  // close() can report a deferred write error (e.g. on network filesystems).
  if (::close(fd) != 0) {
    const std::string reason = errno_text();
    ::unlink(tmp.c_str());
    fail("cannot write checkpoint '{}': {}", tmp, reason);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string reason = errno_text();
    ::unlink(tmp.c_str());
    fail("cannot rename '{}' to '{}': {}", tmp, path, reason);
  }
  fsync_parent_dir(path);
}

// ---- Reading ---------------------------------------------------------------------------------

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    if (errno == ENOENT) fail("checkpoint '{}' does not exist", path);
    fail("cannot open checkpoint '{}': {}", path, errno_text());
  }
  // From here on a failure must close the file: the destructor does not run for a constructor
  // that throws.
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) fail("cannot stat checkpoint '{}': {}", path, errno_text());
    if (!S_ISREG(st.st_mode)) fail("checkpoint '{}' is not a regular file", path);
    const uint64_t file_size = static_cast<uint64_t>(st.st_size);
    if (file_size < kLengthBytes) {
      fail(
          "checkpoint '{}' is not a safetensors file: it has {} bytes, fewer than the 8-byte "
          "header length",
          path, file_size);
    }

    uint64_t header_len = 0;  // little-endian on disk and in memory, asserted above
    if (!pread_exact(fd_, &header_len, kLengthBytes, 0, path)) {
      fail("checkpoint '{}' was truncated while reading its header", path);
    }
    if (header_len > file_size - kLengthBytes) {
      fail(
          "checkpoint '{}' is truncated or not a safetensors file: the header length is {} "
          "bytes but only {} bytes follow it",
          path, header_len, file_size - kLengthBytes);
    }
    if (header_len > kMaxHeaderBytes) {
      fail("checkpoint '{}': header length {} exceeds the limit of {} bytes", path, header_len,
           kMaxHeaderBytes);
    }
    std::string header_text(header_len, '\0');
    if (!pread_exact(fd_, header_text.data(), header_len, kLengthBytes, path)) {
      fail("checkpoint '{}' was truncated while reading its header", path);
    }
    data_start_ = kLengthBytes + header_len;
    const uint64_t data_size = file_size - data_start_;

    nlohmann::json header;
    std::string repeated_name;  // a tensor (or __metadata__) listed twice: one would be lost
    try {
      header = parse_json_record(header_text, repeated_name);
    } catch (const nlohmann::json::parse_error& e) {
      fail("checkpoint '{}': header is not valid JSON: {}", path, e.what());
    }
    if (!header.is_object()) fail("checkpoint '{}': header is not a JSON object", path);
    if (!repeated_name.empty()) {
      fail("checkpoint '{}': header lists '{}' twice", path, repeated_name);
    }

    for (const auto& [name, value] : header.items()) {
      if (name == "__metadata__") {
        if (!value.is_object()) fail("checkpoint '{}': __metadata__ is not a JSON object", path);
        for (const auto& [key, text] : value.items()) {
          if (!text.is_string()) {
            fail("checkpoint '{}': metadata '{}' is not a string", path, key);
          }
          metadata_[key] = text.get<std::string>();
        }
        continue;
      }
      if (!value.is_object()) fail("checkpoint '{}': tensor '{}' is not a JSON object", path, name);
      for (const char* field : {"dtype", "shape", "data_offsets"}) {
        if (!value.contains(field)) {
          fail("checkpoint '{}': tensor '{}' has no '{}'", path, name, field);
        }
      }
      const nlohmann::json& dtype = value["dtype"];
      if (!dtype.is_string())
        fail("checkpoint '{}': tensor '{}' has a non-string dtype", path, name);
      Entry entry;
      if (dtype.get<std::string>() == "F32") {
        entry.dtype = SafetensorsDtype::kF32;
      } else if (dtype.get<std::string>() == "U8") {
        entry.dtype = SafetensorsDtype::kU8;
      } else {
        fail("checkpoint '{}': tensor '{}' has dtype {}; only F32 and U8 are supported", path,
             name, dtype.get<std::string>());
      }
      const nlohmann::json& shape = value["shape"];
      if (!shape.is_array())
        fail("checkpoint '{}': tensor '{}' has a shape that is not a list", path, name);
      for (const nlohmann::json& dim : shape) {
        if (!dim.is_number_unsigned() || dim.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
          fail("checkpoint '{}': tensor '{}' has invalid shape {}", path, name, shape.dump());
        }
        entry.shape.push_back(dim.get<int64_t>());
      }
      uint64_t bytes = 0;
      if (!tensor_bytes(entry.shape, entry.dtype, &bytes)) {
        fail("checkpoint '{}': tensor '{}' has shape {} whose size overflows", path, name,
             shape_text(entry.shape));
      }

      const nlohmann::json& offsets = value["data_offsets"];
      if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
          !offsets[1].is_number_unsigned()) {
        fail(
            "checkpoint '{}': tensor '{}' has data_offsets {}; expected [begin, end] with "
            "non-negative integers",
            path, name, offsets.dump());
      }
      entry.begin = offsets[0].get<uint64_t>();
      entry.end = offsets[1].get<uint64_t>();
      if (entry.end < entry.begin || entry.end - entry.begin != bytes) {
        fail(
            "checkpoint '{}': tensor '{}' has data_offsets [{},{}) but shape {} of {} needs {} "
            "bytes",
            path, name, entry.begin, entry.end, shape_text(entry.shape), dtype_name(entry.dtype),
            bytes);
      }
      if (entry.end > data_size) {
        fail(
            "checkpoint '{}' is truncated: tensor '{}' needs bytes [{},{}) but the data section "
            "has {} bytes",
            path, name, entry.begin, entry.end, data_size);
      }
      entries_.emplace(name, std::move(entry));
    }

    // Two tensors sharing bytes would alias on read; no writer we accept produces that.
    std::vector<std::pair<const std::string*, const Entry*>> by_offset;
    for (const auto& [name, entry] : entries_) by_offset.emplace_back(&name, &entry);
    std::sort(by_offset.begin(), by_offset.end(), [](const auto& a, const auto& b) {
      return a.second->begin != b.second->begin ? a.second->begin < b.second->begin
                                                : a.second->end < b.second->end;
    });
    for (size_t i = 1; i < by_offset.size(); ++i) {
      const auto& [prev_name, prev] = by_offset[i - 1];
      const auto& [name, entry] = by_offset[i];
      if (entry->begin < prev->end) {
        fail("checkpoint '{}': tensors '{}' [{},{}) and '{}' [{},{}) overlap", path, *prev_name,
             prev->begin, prev->end, *name, entry->begin, entry->end);
      }
    }
  } catch (...) {
    close_file();
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() { close_file(); }

SafetensorsReader::SafetensorsReader(SafetensorsReader&& other) noexcept
    : path_(std::move(other.path_)),
      fd_(std::exchange(other.fd_, -1)),
      data_start_(other.data_start_),
      entries_(std::move(other.entries_)),
      metadata_(std::move(other.metadata_)) {}

SafetensorsReader& SafetensorsReader::operator=(SafetensorsReader&& other) noexcept {
  if (this != &other) {
    close_file();
    path_ = std::move(other.path_);
    fd_ = std::exchange(other.fd_, -1);
    data_start_ = other.data_start_;
    entries_ = std::move(other.entries_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

void SafetensorsReader::close_file() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

const SafetensorsReader::Entry& SafetensorsReader::entry(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) fail("checkpoint '{}' has no tensor '{}'", path_, name);
  return it->second;
}

std::vector<int64_t> SafetensorsReader::shape(const std::string& name) const {
  return entry(name).shape;
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& [name, entry] : entries_) out.push_back(name);
  return out;
}

SafetensorsDtype SafetensorsReader::dtype(const std::string& name) const {
  return entry(name).dtype;
}

uint64_t SafetensorsReader::bytes(const std::string& name) const {
  const Entry& e = entry(name);
  return e.end - e.begin;
}

void SafetensorsReader::read_u8(const std::string& name, const std::vector<int64_t>& expected_shape,
                                uint8_t* dst) const {
  const Entry& e = entry(name);
  if (e.dtype != SafetensorsDtype::kU8) {
    fail("checkpoint '{}': tensor '{}' has dtype {}, expected U8", path_, name, dtype_name(e.dtype));
  }
  if (e.shape != expected_shape) fail_shape(path_, name, e.shape, expected_shape);
  if (!pread_exact(fd_, dst, e.end - e.begin, data_start_ + e.begin, path_)) {
    fail("checkpoint '{}' was truncated while reading tensor '{}'", path_, name);
  }
}

void SafetensorsReader::read(const std::string& name, const std::vector<int64_t>& expected_shape,
                             float* dst) const {
  if (entry(name).dtype != SafetensorsDtype::kF32) {
    fail("checkpoint '{}': tensor '{}' has dtype {}, expected F32", path_, name,
         dtype_name(entry(name).dtype));
  }
  const Entry& e = entry(name);
  if (e.shape != expected_shape) fail_shape(path_, name, e.shape, expected_shape);
  // The size was checked when the file was opened, so running out of bytes means it shrank since.
  if (!pread_exact(fd_, dst, e.end - e.begin, data_start_ + e.begin, path_)) {
    fail("checkpoint '{}' was truncated while reading tensor '{}'", path_, name);
  }
}

// ---- Parameter layouts -----------------------------------------------------------------------

void safetensors_add_layout(std::vector<SafetensorsTensorRef>& out, const ParamLayout& layout,
                            const float* base, const std::string& prefix) {
  for (const TensorSpec& t : layout.tensors()) {
    out.push_back(SafetensorsTensorRef{prefix + t.name, t.shape, base + t.offset});
  }
}

void safetensors_read_layout(const SafetensorsReader& reader, const ParamLayout& layout,
                             float* base, const std::string& prefix) {
  // Everything is checked before the first tensor is copied, so a checkpoint of another model
  // is rejected without overwriting any weight.
  for (const std::string& name : reader.names()) {
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    if (!layout.find_or_null(std::string_view(name).substr(prefix.size()))) {
      fail("checkpoint '{}' has tensor '{}' that the model config does not have", reader.path(),
           name);
    }
  }
  for (const TensorSpec& t : layout.tensors()) {
    const std::string name = prefix + t.name;
    const std::vector<int64_t> shape = reader.shape(name);  // throws if missing
    if (shape != t.shape) fail_shape(reader.path(), name, shape, t.shape);
  }
  for (const TensorSpec& t : layout.tensors()) {
    reader.read(prefix + t.name, t.shape, base + t.offset);
  }
}

}  // namespace rlhf
