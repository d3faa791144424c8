#include "model/checkpoint.h"

#include <vector>

#include "common/error.h"
#include "common/yaml_reader.h"
#include "model/safetensors.h"

namespace rlhf {

namespace {

int64_t parse_int(const std::map<std::string, std::string>& meta, const std::string& key,
                  const std::string& path) {
  auto it = meta.find(key);
  if (it == meta.end()) fail("checkpoint '{}': metadata key '{}' is missing", path, key);
  try {
    size_t used = 0;
    const int64_t value = std::stoll(it->second, &used);
    if (used != it->second.size() || value < 0) throw std::invalid_argument("");
    return value;
  } catch (const std::exception&) {
    fail("checkpoint '{}': metadata '{}' is not a non-negative integer: '{}'", path, key,
         it->second);
  }
}

std::vector<float> host_copy(Ops<float>& ops, const float* src, int64_t n) {
  std::vector<float> host(static_cast<size_t>(n));
  if (n) ops.copy_to_host(host.data(), src, sizeof(float) * size_t(n));
  return host;
}

}  // namespace

void checkpoint_save(const std::string& path, Transformer<float>& model,
                     const std::string& tokenizer, const float* adam_m, const float* adam_v,
                     const TrainingState* state) {
  Ops<float>& ops = model.ops();
  const ParamLayout& layout = model.layout();
  const ParamLayout& buffers = model.buffer_layout();
  const std::vector<float> params = host_copy(ops, model.params(), layout.total());
  const std::vector<float> buffer_values = host_copy(ops, model.buffers(), buffers.total());
  std::vector<SafetensorsTensorRef> tensors;
  safetensors_add_layout(tensors, layout, params.data(), "model.");
  safetensors_add_layout(tensors, buffers, buffer_values.data(), "buffer.");
  std::vector<float> m, v;
  if (adam_m && adam_v) {
    m = host_copy(ops, adam_m, layout.total());
    v = host_copy(ops, adam_v, layout.total());
    safetensors_add_layout(tensors, layout, m.data(), "optim.m.");
    safetensors_add_layout(tensors, layout, v.data(), "optim.v.");
  }
  std::map<std::string, std::string> meta = {
      {"format", kCheckpointFormat},
      {"model_config", model.config().to_yaml()},
      {"tokenizer", tokenizer},
  };
  if (state) {
    meta["step"] = std::to_string(state->step);
    meta["data_position"] = std::to_string(state->data_position);
    meta["rng_state"] = state->rng_state;
    meta["run_config"] = state->run_config;
  }
  safetensors_write(path, tensors, meta);
}

CheckpointContents checkpoint_read_info(const std::string& path) {
  const SafetensorsReader reader(path);
  const auto& meta = reader.metadata();
  auto it = meta.find("format");
  if (it == meta.end() || it->second != kCheckpointFormat) {
    fail("checkpoint '{}': not an rlhf checkpoint (metadata 'format' is '{}', expected '{}')",
         path, it == meta.end() ? "<missing>" : it->second, kCheckpointFormat);
  }
  CheckpointContents contents;
  contents.metadata = meta;
  auto config_it = meta.find("model_config");
  if (config_it == meta.end()) fail("checkpoint '{}': metadata 'model_config' is missing", path);
  YamlSection section(yaml_load_string(config_it->second, "checkpoint '" + path + "' model_config"),
                      "model");
  contents.config = ModelConfig::read(section);
  auto tok = meta.find("tokenizer");
  if (tok == meta.end()) fail("checkpoint '{}': metadata 'tokenizer' is missing", path);
  contents.tokenizer = tok->second;
  if (meta.count("step")) {
    TrainingState state;
    state.step = parse_int(meta, "step", path);
    state.data_position = parse_int(meta, "data_position", path);
    auto rng = meta.find("rng_state");
    if (rng == meta.end()) fail("checkpoint '{}': metadata 'rng_state' is missing", path);
    state.rng_state = rng->second;
    auto run = meta.find("run_config");
    if (run != meta.end()) state.run_config = run->second;
    contents.training = state;
  }
  return contents;
}

void checkpoint_load_weights(const std::string& path, Transformer<float>& model) {
  const SafetensorsReader reader(path);
  std::vector<float> params(static_cast<size_t>(model.layout().total()));
  std::vector<float> buffers(static_cast<size_t>(model.buffer_layout().total()));
  safetensors_read_layout(reader, model.layout(), params.data(), "model.");
  safetensors_read_layout(reader, model.buffer_layout(), buffers.data(), "buffer.");
  model.ops().copy_from_host(model.params(), params.data(), sizeof(float) * params.size());
  model.ops().copy_from_host(model.buffers(), buffers.data(), sizeof(float) * buffers.size());
}

void checkpoint_load_moments(const std::string& path, const ParamLayout& layout, float* adam_m,
                             float* adam_v, Ops<float>& ops) {
  const SafetensorsReader reader(path);
  std::vector<float> m(static_cast<size_t>(layout.total())), v(m.size());
  safetensors_read_layout(reader, layout, m.data(), "optim.m.");
  safetensors_read_layout(reader, layout, v.data(), "optim.v.");
  ops.copy_from_host(adam_m, m.data(), sizeof(float) * m.size());
  ops.copy_from_host(adam_v, v.data(), sizeof(float) * v.size());
}

}  // namespace rlhf
