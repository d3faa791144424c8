#pragma once
// Policy weights as bytes and as a stream of chunks (proto/rlhf/v1/weights.proto): the one
// implementation that the learner (sending, LearnerService.GetWeights) and the actor (receiving,
// ActorService.UpdateWeights; pulling at start) both use.
//
//   Transformer --serialize_policy--> bytes (a checkpoint file's content) --make_weight_chunks-->
//   [header + data, data, ...] --gRPC--> WeightAssembler::add ... finish (size, CRC-32C)
//   --> bytes --load_policy--> Transformer
//
// The bytes are exactly a policy checkpoint file (model/checkpoint.h, format
// "rlhf-checkpoint-v1"), float or with packed FP4 experts, without optimizer state, so anything
// that reads checkpoints reads a payload written to disk. This header keeps gRPC out of its
// includers; the chunk message is plain protobuf.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/fp4/fp4.h"
#include "model/checkpoint.h"
#include "model/transformer.h"
#include "rlhf/v1/weights.pb.h"

namespace rlhf {

// One policy version as bytes.
struct WeightPayload {
  uint64_t version = 0;  // the learner's step count when the weights were taken
  std::string format = kCheckpointFormat;
  std::string bytes;     // a policy checkpoint file's content
};

// The bytes of a policy checkpoint of `model`: packed FP4 experts when `pack` is set
// (checkpoint_save_packed), else float weights without optimizer state (checkpoint_save).
// Written through a temporary file under $TMPDIR (else /tmp) that is removed afterwards.
std::string serialize_policy(Transformer<float>& model, const std::string& tokenizer,
                             std::optional<Fp4Format> pack);

// The header of the checkpoint those bytes hold (config, tokenizer, expert format), without
// loading any weight. rlhf::Error ("weight payload: ...") when the bytes are not a checkpoint.
CheckpointContents read_policy_info(const std::string& bytes);

// Builds and loads the model those bytes describe (float or packed experts), with activations
// for batches of up to max_batch sequences of the config's max_seq_len. rlhf::Error
// ("weight payload: ...") on anything unreadable.
std::unique_ptr<Transformer<float>> load_policy(const std::string& bytes, Ops<float>& ops,
                                                int max_batch);

// The chunks of a payload: the first carries the header (version, total_bytes, crc32c,
// format), every chunk carries the next chunk_bytes (or fewer, in the last) of data. There is
// always at least one chunk, so an empty payload still sends its header.
size_t weight_chunk_count(const WeightPayload& payload, size_t chunk_bytes = 1 << 20);
// Chunk `index` alone, so a sender can stream a large payload without copying all of it into
// messages first. The header's CRC-32C is computed when index is 0.
v1::WeightChunk make_weight_chunk(const WeightPayload& payload, size_t index,
                                  size_t chunk_bytes = 1 << 20);
std::vector<v1::WeightChunk> make_weight_chunks(const WeightPayload& payload,
                                                size_t chunk_bytes = 1 << 20);

// Reassembles one stream of chunks and checks it. A header is recognized by its non-empty
// `format` (proto3 cannot tell a zero version or size from an absent one); header fields of later
// chunks are ignored. Not thread-safe: one assembler per stream.
class WeightAssembler {
 public:
  // Payloads announcing more than max_bytes are refused before any data is buffered.
  explicit WeightAssembler(uint64_t max_bytes = 1ull << 30);

  // rlhf::Error when the first chunk has no header, the format is not kCheckpointFormat,
  // total_bytes exceeds max_bytes, or the data runs past total_bytes.
  void add(const v1::WeightChunk& chunk);
  // The first chunk's header, once add() has taken it.
  bool has_header() const { return has_header_; }
  uint64_t version() const { return payload_.version; }
  uint64_t received_bytes() const { return payload_.bytes.size(); }
  // The verified payload. rlhf::Error when no chunk arrived, when fewer bytes than total_bytes
  // arrived, or when their CRC-32C is not the header's; the message gives both values. The
  // assembler is spent afterwards.
  WeightPayload finish();

 private:
  uint64_t max_bytes_;
  bool has_header_ = false;
  bool finished_ = false;
  uint64_t total_bytes_ = 0;
  uint32_t expected_crc_ = 0;
  uint32_t crc_ = 0;  // of the bytes received so far
  WeightPayload payload_;
};

}  // namespace rlhf
