#include "model/checkpoint.h"

#include <algorithm>
#include <vector>

#include "common/error.h"
#include "kernels/fp4/fp4.h"
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
                     const TrainingState* state,
                     const std::map<std::string, std::string>& annotations) {
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
  for (const auto& [key, value] : annotations) {
    RLHF_CHECK(meta.emplace(key, value).second, "checkpoint annotation '{}' is a reserved key",
               key);
  }
  safetensors_write(path, tensors, meta);
}

void checkpoint_save_packed(const std::string& path, Transformer<float>& model,
                            const std::string& tokenizer, Fp4Format format) {
  if (model.packed_format()) fail("checkpoint_save_packed: the model is packed already");
  Ops<float>& ops = model.ops();
  const ModelConfig& config = model.config();
  const ParamLayout packed_layout = ParamLayout::parameters(config, true);
  const std::vector<float> params = host_copy(ops, model.params(), model.layout().total());
  const std::vector<float> buffer_values =
      host_copy(ops, model.buffers(), model.buffer_layout().total());
  // The non-expert tensors, gathered into the packed layout's order.
  std::vector<float> dense(static_cast<size_t>(packed_layout.total()));
  for (const TensorSpec& t : packed_layout.tensors()) {
    const TensorSpec& src = model.layout().find(t.name);
    std::copy_n(params.begin() + src.offset, t.numel, dense.begin() + t.offset);
  }
  std::vector<SafetensorsTensorRef> tensors;
  safetensors_add_layout(tensors, packed_layout, dense.data(), "model.");
  safetensors_add_layout(tensors, model.buffer_layout(), buffer_values.data(), "buffer.");
  std::vector<Fp4Tensor> packed;  // kept alive until written
  packed.reserve(model.expert_matrices().size());
  for (const ExpertMatrixSpec& m : model.expert_matrices()) {
    const TensorSpec& src = model.layout().find(m.name);
    packed.push_back(fp4_quantize(params.data() + src.offset, m.rows, m.cols, format, m.name));
    const Fp4Tensor& t = packed.back();
    const int64_t block = fp4_block_size(format);
    tensors.push_back({"fp4." + m.name + ".codes", {m.rows, m.cols / 2}, t.codes.data(),
                       SafetensorsDtype::kU8});
    tensors.push_back({"fp4." + m.name + ".scales", {m.rows, m.cols / block}, t.scales.data(),
                       SafetensorsDtype::kU8});
    tensors.push_back({"fp4." + m.name + ".global_scale", {1}, &t.global_scale});
  }
  safetensors_write(path, tensors,
                    {{"format", kCheckpointFormat},
                     {"model_config", config.to_yaml()},
                     {"tokenizer", tokenizer},
                     {"expert_format", fp4_format_name(format)}});
}

std::unique_ptr<Transformer<float>> checkpoint_load_model(const std::string& path,
                                                          Ops<float>& ops, int max_batch) {
  const CheckpointContents info = checkpoint_read_info(path);
  auto model = std::make_unique<Transformer<float>>(ops, info.config, max_batch,
                                                    info.config.max_seq_len, info.expert_format);
  checkpoint_load_weights(path, *model);
  return model;
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
  auto expert_format = meta.find("expert_format");
  if (expert_format != meta.end()) {
    try {
      contents.expert_format = fp4_format_from_name(expert_format->second);
    } catch (const Error& e) {
      fail("checkpoint '{}': metadata 'expert_format': {}", path, e.what());
    }
  }
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
  const auto meta = reader.metadata().find("expert_format");
  const std::string file_format = meta == reader.metadata().end() ? "float" : meta->second;
  const std::string model_format =
      model.packed_format() ? fp4_format_name(*model.packed_format()) : "float";
  if (file_format != model_format) {
    fail("checkpoint '{}' keeps its experts as {} but the model was built for {} experts", path,
         file_format, model_format);
  }
  std::vector<float> params(static_cast<size_t>(model.layout().total()));
  std::vector<float> buffers(static_cast<size_t>(model.buffer_layout().total()));
  safetensors_read_layout(reader, model.layout(), params.data(), "model.");
  safetensors_read_layout(reader, model.buffer_layout(), buffers.data(), "buffer.");
  model.ops().copy_from_host(model.params(), params.data(), sizeof(float) * params.size());
  model.ops().copy_from_host(model.buffers(), buffers.data(), sizeof(float) * buffers.size());
  if (model.packed_format()) {
    const Fp4Format format = *model.packed_format();
    const int64_t block = fp4_block_size(format);
    for (const ExpertMatrixSpec& m : model.expert_matrices()) {
      Fp4Tensor t;
      t.format = format;
      t.rows = m.rows;
      t.cols = m.cols;
      t.codes.resize(static_cast<size_t>(m.rows * m.cols / 2));
      t.scales.resize(static_cast<size_t>(m.rows * m.cols / block));
      reader.read_u8("fp4." + m.name + ".codes", {m.rows, m.cols / 2}, t.codes.data());
      reader.read_u8("fp4." + m.name + ".scales", {m.rows, m.cols / block}, t.scales.data());
      reader.read("fp4." + m.name + ".global_scale", {1}, &t.global_scale);
      model.set_packed_expert(m.name, t);
    }
  }
  model.params_changed();
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
