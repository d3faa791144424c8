#pragma once
// Checkpoints are one safetensors file:
//   model.<name>     every trainable tensor (ParamLayout::parameters)
//   buffer.<name>    non-trainable state (router balancing bias)
//   optim.m.<name>, optim.v.<name>   AdamW moments (training checkpoints only)
//   fp4.<name>.codes / .scales / .global_scale   packed FP4 expert matrices (U8, U8, F32[1])
//                    in a packed policy, which then has no model.<name> for expert weights
// and string metadata: format, model config (YAML), tokenizer name, and for training
// checkpoints the step, data position and RNG state, so a resumed run continues exactly.
// Files are written atomically (temp file + rename): a crash never leaves a torn checkpoint.
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "model/config.h"
#include "model/transformer.h"

namespace rlhf {

constexpr const char* kCheckpointFormat = "rlhf-checkpoint-v1";

// Where a training run stands; everything besides weights and moments that exact resume needs.
struct TrainingState {
  int64_t step = 0;            // optimizer steps completed
  int64_t data_position = 0;   // examples consumed from the data stream
  std::string rng_state;       // Rng::serialize() of the trainer's RNG
  std::string run_config;      // the YAML the run was started with (informational)
};

struct CheckpointContents {
  ModelConfig config;
  std::string tokenizer;
  std::optional<Fp4Format> expert_format;     // set in a packed FP4 policy
  std::optional<TrainingState> training;      // present in training checkpoints
  std::map<std::string, std::string> metadata;
};

// Saves weights and buffers; with moments (m, v: flat, parameter layout) and a state it is a
// training checkpoint. `annotations` are string metadata of the caller's own (a judge's prompt
// layout, reward/judge.h); they must not use the keys this file writes itself.
void checkpoint_save(const std::string& path, Transformer<float>& model,
                     const std::string& tokenizer, const float* adam_m = nullptr,
                     const float* adam_v = nullptr, const TrainingState* state = nullptr,
                     const std::map<std::string, std::string>& annotations = {});

// Saves a policy whose experts are packed in `format`, quantized from the model's float master
// weights: the values QAT's forward computes with, now stored in 4.25 (MXFP4) or 4.5 (NVFP4)
// bits per expert parameter.
void checkpoint_save_packed(const std::string& path, Transformer<float>& model,
                            const std::string& tokenizer, Fp4Format format);

// Reads and validates the header and metadata (config, tokenizer, training state).
CheckpointContents checkpoint_read_info(const std::string& path);

// Loads weights and buffers into a model built from checkpoint_read_info(path).config; every
// tensor must be present with the exact shape. Errors name the file and the tensor.
void checkpoint_load_weights(const std::string& path, Transformer<float>& model);

// Builds the model a checkpoint describes (packed or float experts) and loads it, with
// activations for batches of up to max_batch sequences of the config's max_seq_len.
std::unique_ptr<Transformer<float>> checkpoint_load_model(const std::string& path,
                                                          Ops<float>& ops, int max_batch);

// Loads the AdamW moments of a training checkpoint (flat, parameter layout).
void checkpoint_load_moments(const std::string& path, const ParamLayout& layout, float* adam_m,
                             float* adam_v, Ops<float>& ops);

}  // namespace rlhf
