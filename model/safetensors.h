#pragma once
// The safetensors file format, F32 only: checkpoints, optimizer state and weight exports.
//
//   [8 bytes: header length N, little-endian u64]
//   [N bytes: JSON {"name": {"dtype":"F32","shape":[...],"data_offsets":[begin,end]}, ...,
//              "__metadata__": {"key": "value", ...}}, padded with spaces]
//   [data section: raw little-endian tensor bytes; offsets are relative to its start]
//
// Files we write pad the header so the data section starts 8-byte aligned. Files we read are
// validated completely when opened (every offset against the file size, no overlaps), so a
// truncated or corrupt checkpoint is an rlhf::Error naming the file and the problem before any
// weight is touched; it never crashes and never yields garbage.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace rlhf {

class ParamLayout;

// The element types we store: F32 for weights, U8 for packed FP4 codes and scales.
enum class SafetensorsDtype { kF32, kU8 };

struct SafetensorsTensorRef {
  std::string name;
  std::vector<int64_t> shape;  // row-major; [] is a scalar
  const void* data;            // numel(shape) elements; may be null only when numel is 0
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
};

// Writes atomically: the bytes go to `path + ".tmp"`, which is fsynced and renamed over `path`
// (and the directory fsynced), so a crash leaves either the old file or the complete new one.
// Tensors are stored in the given order. Names must be unique, non-empty and not "__metadata__".
void safetensors_write(const std::string& path, const std::vector<SafetensorsTensorRef>& tensors,
                       const std::map<std::string, std::string>& metadata);

// An open safetensors file. The header is parsed and validated by the constructor; tensor data
// is read on demand with pread, straight into the caller's buffer.
class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;
  SafetensorsReader(SafetensorsReader&& other) noexcept;
  SafetensorsReader& operator=(SafetensorsReader&& other) noexcept;

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  // Throws rlhf::Error if there is no such tensor.
  std::vector<int64_t> shape(const std::string& name) const;
  std::vector<std::string> names() const;  // sorted
  // Copies a tensor into dst (numel(expected_shape) floats). The caller states the shape it
  // needs; a missing tensor or a different shape is an rlhf::Error.
  void read(const std::string& name, const std::vector<int64_t>& expected_shape, float* dst) const;
  // The same for a U8 tensor (packed FP4 codes and scales).
  void read_u8(const std::string& name, const std::vector<int64_t>& expected_shape,
               uint8_t* dst) const;
  SafetensorsDtype dtype(const std::string& name) const;
  // Bytes of a tensor's data, for reports such as `rlhf inspect`.
  uint64_t bytes(const std::string& name) const;

 private:
  struct Entry {
    std::vector<int64_t> shape;
    SafetensorsDtype dtype = SafetensorsDtype::kF32;
    uint64_t begin = 0;  // byte offsets into the data section, [begin, end)
    uint64_t end = 0;
  };
  const Entry& entry(const std::string& name) const;
  void close_file() noexcept;

  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0;  // file offset of the data section: 8 + header length
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Appends every tensor of `layout` (named prefix + tensor name), pointing into `base`.
void safetensors_add_layout(std::vector<SafetensorsTensorRef>& out, const ParamLayout& layout,
                            const float* base, const std::string& prefix);

// Fills `base` from the file: every tensor of `layout` must be present under prefix + name with
// exactly the layout's shape, and a tensor under `prefix` that the layout does not know is an
// error too (it means the checkpoint was written by a different model config). An empty prefix
// therefore claims every tensor in the file.
void safetensors_read_layout(const SafetensorsReader& reader, const ParamLayout& layout,
                             float* base, const std::string& prefix);

}  // namespace rlhf
