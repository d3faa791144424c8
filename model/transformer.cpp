#include "model/transformer.h"

#include <algorithm>
#include <cmath>

#include <fmt/core.h>

#include "common/error.h"
#include "common/rng.h"

namespace rlhf {

template <typename T>
ModelWeights<T> ModelWeights<T>::view(const ModelConfig& c, const ParamLayout& layout, T* base) {
  auto at = [&](const std::string& name) { return base + layout.find(name).offset; };
  auto maybe = [&](const std::string& name) -> T* {
    const TensorSpec* spec = layout.find_or_null(name);
    return spec ? base + spec->offset : nullptr;
  };
  ModelWeights w;
  w.embed = at("embed");
  w.final_norm = at("final_norm");
  w.lm_head = at("lm_head");
  w.layers.resize(c.n_layers);
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string p = fmt::format("layers.{}.", i);
    LayerWeights<T>& l = w.layers[i];
    l.attn_norm = at(p + "attn_norm");
    l.wq = at(p + "wq");
    l.wk = at(p + "wk");
    l.wv = at(p + "wv");
    l.wo = at(p + "wo");
    l.ffn_norm = at(p + "ffn_norm");
    if (!c.is_moe_layer(i)) {
      l.ffn_gate = at(p + "ffn.w_gate");
      l.ffn_up = at(p + "ffn.w_up");
      l.ffn_down = at(p + "ffn.w_down");
      continue;
    }
    l.router = at(p + "router");
    // Absent without shared experts, and in a model whose experts are packed FP4.
    l.shared_gate = maybe(p + "shared.w_gate");
    l.shared_up = maybe(p + "shared.w_up");
    l.shared_down = maybe(p + "shared.w_down");
    l.expert_gate = maybe(p + "experts.w_gate");
    l.expert_up = maybe(p + "experts.w_up");
    l.expert_down = maybe(p + "experts.w_down");
  }
  return w;
}

template <typename T>
KvCache<T>::KvCache(Ops<T>& ops, const ModelConfig& c, int batch, int capacity)
    : batch_(batch), capacity_(capacity),
      layer_stride_(int64_t(batch) * capacity * c.kv_dim()),
      k_(ops, layer_stride_ * c.n_layers), v_(ops, layer_stride_ * c.n_layers) {}

template <typename T>
Transformer<T>::Transformer(Ops<T>& ops, const ModelConfig& config, int max_batch, int max_seq,
                            std::optional<Fp4Format> packed_experts)
    : ops_(ops), config_(config),
      layout_(ParamLayout::parameters(config, packed_experts.has_value())),
      buffer_layout_(ParamLayout::buffers(config)), max_tokens_(max_batch * max_seq),
      max_batch_(max_batch), max_seq_(max_seq), params_(ops, layout_.total()),
      grads_(ops, layout_.total()), buffers_(ops, std::max<int64_t>(1, buffer_layout_.total())) {
  config_.validate();
  RLHF_CHECK(max_batch > 0 && max_seq > 0, "empty activation shape");
  weights_ = ModelWeights<T>::view(config_, layout_, params_.data());
  grad_views_ = ModelWeights<T>::view(config_, layout_, grads_.data());
  for (int i = config_.n_dense_layers; i < config_.n_layers; ++i) {
    router_bias_.push_back(buffers_.data() +
                           buffer_layout_.find(fmt::format("layers.{}.router_bias", i)).offset);
  }
  ops_.fill(grads_.data(), T(0), grads_.size());
  ops_.fill(buffers_.data(), T(0), buffers_.size());
  allocate_activations();

  expert_matrices_ = ParamLayout::expert_matrices(config_);
  if (!packed_experts) return;
  packed_format_ = packed_experts;
  const int block = fp4_block_size(*packed_experts);
  int64_t code_bytes = 0, scale_bytes = 0;
  for (const ExpertMatrixSpec& m : expert_matrices_) {
    if (m.cols % block != 0) {
      fail("{} experts need every expert matrix's reduction dimension to be a multiple of {}; "
           "'{}' has {}",
           fp4_format_name(*packed_experts), block, m.name, m.cols);
    }
    code_bytes += m.rows * m.cols / 2;
    scale_bytes += m.rows * m.cols / block;
  }
  packed_codes_ = Buffer<uint8_t, Ops<T>>(ops_, std::max<int64_t>(1, code_bytes));
  packed_scales_ = Buffer<uint8_t, Ops<T>>(ops_, std::max<int64_t>(1, scale_bytes));
  int64_t code_at = 0, scale_at = 0;
  for (const ExpertMatrixSpec& m : expert_matrices_) {
    // "layers.<i>.<kind>": find the layer and which of its six matrices this is.
    const size_t dot = m.name.find('.', 7);
    const int layer = std::stoi(m.name.substr(7, dot - 7));
    const std::string kind = m.name.substr(dot + 1);
    LayerWeights<T>& l = weights_.layers[layer];
    PackedFp4Matrix* slot = kind == "shared.w_gate"    ? &l.packed_shared_gate
                            : kind == "shared.w_up"    ? &l.packed_shared_up
                            : kind == "shared.w_down"  ? &l.packed_shared_down
                            : kind == "experts.w_gate" ? &l.packed_expert_gate
                            : kind == "experts.w_up"   ? &l.packed_expert_up
                                                       : &l.packed_expert_down;
    *slot = PackedFp4Matrix{*packed_experts, m.rows, m.cols, packed_codes_.data() + code_at,
                            packed_scales_.data() + scale_at, 1.0f};
    packed_slots_.push_back(slot);
    code_at += m.rows * m.cols / 2;
    scale_at += m.rows * m.cols / block;
  }
}

template <typename T>
void Transformer<T>::set_packed_expert(const std::string& name, const Fp4Tensor& packed) {
  if (!packed_format_) fail("set_packed_expert: this model keeps its experts in float");
  for (size_t i = 0; i < expert_matrices_.size(); ++i) {
    if (expert_matrices_[i].name != name) continue;
    PackedFp4Matrix& slot = *packed_slots_[i];
    if (packed.format != slot.format || packed.rows != slot.rows || packed.cols != slot.cols) {
      fail("packed expert '{}' is {} [{}, {}] but the model needs {} [{}, {}]", name,
           fp4_format_name(packed.format), packed.rows, packed.cols, fp4_format_name(slot.format),
           slot.rows, slot.cols);
    }
    const int block = fp4_block_size(packed.format);
    if (int64_t(packed.codes.size()) != packed.rows * packed.cols / 2 ||
        int64_t(packed.scales.size()) != packed.rows * packed.cols / block) {
      fail("packed expert '{}' has {} code bytes and {} scales; [{}, {}] needs {} and {}", name,
           packed.codes.size(), packed.scales.size(), packed.rows, packed.cols,
           packed.rows * packed.cols / 2, packed.rows * packed.cols / block);
    }
    // A NaN scale would decode a whole block to NaN: refuse it here, with its position.
    for (size_t b = 0; b < packed.scales.size(); ++b) {
      const uint8_t code = packed.scales[b];
      const bool nan = packed.format == Fp4Format::mxfp4 ? code == 0xff : (code & 0x7f) == 0x7f;
      if (nan) fail("packed expert '{}' has a NaN block scale at block {}", name, b);
    }
    if (!(packed.global_scale > 0) || !std::isfinite(packed.global_scale)) {
      fail("packed expert '{}' has global scale {}; it must be finite and positive", name,
           packed.global_scale);
    }
    ops_.copy_from_host(const_cast<uint8_t*>(slot.codes), packed.codes.data(), packed.codes.size());
    ops_.copy_from_host(const_cast<uint8_t*>(slot.scales), packed.scales.data(),
                        packed.scales.size());
    slot.global_scale = packed.global_scale;
    return;
  }
  fail("the model has no expert matrix named '{}'", name);
}

template <typename T>
void Transformer<T>::set_qat(std::optional<Fp4Format> format, bool clipped_ste) {
  if (format && packed_format_) fail("QAT needs float master weights; this model is packed");
  qat_format_ = format;
  qat_clipped_ = clipped_ste;
  qat_stale_ = true;
  if (!format) return;
  const int block = fp4_block_size(*format);
  for (const ExpertMatrixSpec& m : expert_matrices_) {
    if (m.cols % block != 0) {
      fail("{} QAT needs every expert matrix's reduction dimension to be a multiple of {}; "
           "'{}' has {}",
           fp4_format_name(*format), block, m.name, m.cols);
    }
  }
  if (qat_params_.size() == 0) {
    // Same offsets as params_ so one layout addresses both; only expert regions are used.
    qat_params_ = Buffer<T, Ops<T>>(ops_, layout_.total());
    qat_saturated_ = Buffer<uint8_t, Ops<T>>(ops_, layout_.total());
    ops_.copy(qat_params_.data(), params_.data(), layout_.total());
  }
  weights_qat_ = weights_;
  const ModelWeights<T> shadow = ModelWeights<T>::view(config_, layout_, qat_params_.data());
  for (size_t i = 0; i < weights_qat_.layers.size(); ++i) {
    LayerWeights<T>& l = weights_qat_.layers[i];
    const LayerWeights<T>& q = shadow.layers[i];
    l.shared_gate = q.shared_gate;
    l.shared_up = q.shared_up;
    l.shared_down = q.shared_down;
    l.expert_gate = q.expert_gate;
    l.expert_up = q.expert_up;
    l.expert_down = q.expert_down;
  }
}

template <typename T>
void Transformer<T>::refresh_qat() {
  for (const ExpertMatrixSpec& m : expert_matrices_) {
    const int64_t offset = layout_.find(m.name).offset;
    ops_.fp4_fake_quantize(qat_params_.data() + offset,
                           qat_clipped_ ? qat_saturated_.data() + offset : nullptr,
                           params_.data() + offset, m.rows, m.cols, *qat_format_);
  }
  qat_stale_ = false;
}

template <typename T>
void Transformer<T>::allocate_activations() {
  const ModelConfig& c = config_;
  const int64_t N = max_tokens_, D = c.d_model, E = c.n_routed_experts, K = c.top_k;
  const int64_t NK = N * K, Fe = c.d_expert, shared = int64_t(c.n_shared_experts) * Fe;
  const int64_t ffn_width = std::max<int64_t>(c.d_ff, shared);
  const int64_t hidden_scratch = N * std::max<int64_t>(ffn_width, K * Fe);

  // Two passes over the same plan: the first counts, the second hands out pointers. Each
  // piece is rounded to 16 elements to keep rows of different tensors off shared lines.
  auto plan = [&](T* base, int32_t* ibase, int64_t& total, int64_t& itotal) {
    total = itotal = 0;
    auto take = [&](int64_t n) {
      T* p = base ? base + total : nullptr;
      total += (n + 15) / 16 * 16;
      return p;
    };
    auto take_index = [&](int64_t n) {
      int32_t* p = ibase ? ibase + itotal : nullptr;
      itotal += (n + 15) / 16 * 16;
      return p;
    };
    layer_acts_.assign(c.n_layers, LayerActs{});
    for (int l = 0; l < c.n_layers; ++l) {
      LayerActs& a = layer_acts_[l];
      a.x_in = take(N * D);
      a.attn_in = take(N * D);
      a.attn_rstd = take(N);
      a.q = take(N * c.q_dim());
      a.k = take(N * c.kv_dim());
      a.v = take(N * c.kv_dim());
      a.attn_out = take(N * c.q_dim());
      a.lse = take(N * c.n_heads);
      a.x_mid = take(N * D);
      a.ffn_in = take(N * D);
      a.ffn_rstd = take(N);
      const int64_t width = c.is_moe_layer(l) ? shared : c.d_ff;
      a.gate = take(N * width);
      a.up = take(N * width);
      a.h = take(N * width);
      if (!c.is_moe_layer(l)) continue;
      a.scores = take(N * E);
      a.gates = take(NK);
      a.xe = take(NK * D);
      a.e_gate = take(NK * Fe);
      a.e_up = take(NK * Fe);
      a.e_h = take(NK * Fe);
      a.ye = take(NK * D);
      a.routing.expert_ids = take_index(NK);
      a.routing.offsets = take_index(E + 1);
      a.routing.sorted_token = take_index(NK);
      a.routing.sorted_choice = take_index(NK);
      a.routing.slot = take_index(NK);
    }
    resid_final_ = take(N * D);
    final_in_ = take(N * D);
    final_rstd_ = take(N);
    logits_ = take(N * c.vocab_size);
    loss_weights_ = take(N);
    d_resid_ = take(N * D);
    d_norm_ = take(N * D);
    d_q_ = take(N * c.q_dim());
    d_k_ = take(N * c.kv_dim());
    d_v_ = take(N * c.kv_dim());
    d_attn_ = take(N * c.q_dim());
    d_gate_ = take(hidden_scratch);
    d_up_ = take(hidden_scratch);
    d_h_ = take(hidden_scratch);
    d_xe_ = take(NK * D);
    d_ye_ = take(NK * D);
    d_scores_ = take(N * E);
    d_gates_ = take(NK);
    router_logits_ = take(N * E);
    tokens_ = take_index(N);
    targets_ = take_index(N);
    positions_ = take_index(N);
    start_ = take_index(max_batch_);
  };
  int64_t total = 0, itotal = 0;
  plan(nullptr, nullptr, total, itotal);
  act_ = Buffer<T, Ops<T>>(ops_, total);
  act_index_ = Buffer<int32_t, Ops<T>>(ops_, itotal);
  plan(act_.data(), act_index_.data(), total, itotal);
  ops_.fill(act_.data(), T(0), total);
  clamp_counts_ = Buffer<int64_t, Ops<T>>(ops_, 2 * int64_t(c.n_layers));
}

template <typename T>
void Transformer<T>::init_random(uint64_t seed) {
  // Normal(0, init_std) for matrices; output projections (wo, w_down) scaled down by
  // sqrt(2 n_layers) so the residual stream's variance does not grow with depth (GPT-2).
  Rng rng(seed);
  std::vector<T> host(size_t(layout_.total()));
  const double std = config_.init_std;
  const double out_std = std / std::sqrt(2.0 * config_.n_layers);
  for (const TensorSpec& t : layout_.tensors()) {
    const bool is_norm = t.name.find("norm") != std::string::npos;
    const bool is_output = t.name.ends_with("wo") || t.name.ends_with("w_down");
    for (int64_t i = 0; i < t.numel; ++i) {
      host[t.offset + i] = is_norm ? T(1) : T(rng.normal() * (is_output ? out_std : std));
    }
  }
  params_.from_host(host.data(), layout_.total());
  ops_.fill(buffers_.data(), T(0), buffers_.size());
  params_changed();
}

template <typename T>
void Transformer<T>::zero_grads() {
  ops_.fill(grads_.data(), T(0), grads_.size());
}

template <typename T>
const T* Transformer<T>::forward(const int32_t* tokens, int batch, int n_new, KvCache<T>* cache,
                                 const int32_t* start, RoutingTrace* record,
                                 const RoutingTrace* replay) {
  const ModelConfig& c = config_;
  const int N = batch * n_new;
  RLHF_CHECK(batch <= max_batch_ && N <= max_tokens_ && n_new > 0,
             "batch {}x{} exceeds the activation capacity {}x{}", batch, n_new, max_batch_,
             max_seq_);
  RLHF_CHECK(cache || n_new <= max_seq_, "sequence of {} exceeds {}", n_new, max_seq_);
  cur_batch_ = batch;
  cur_seq_ = n_new;

  std::vector<int32_t>& host_start = host_start_;
  std::vector<int32_t>& host_positions = host_positions_;
  host_start.assign(batch, 0);
  host_positions.resize(N);
  for (int b = 0; b < batch; ++b) {
    if (cache) {
      host_start[b] = start ? start[b] : 0;
      // Checked here, on the host copy: the GPU backend's cache write does not read start back.
      if (host_start[b] < 0 || int64_t(host_start[b]) + n_new > cache->capacity()) {
        fail("KV cache overflow: sequence {} starts at {} with {} new tokens, capacity {}", b,
             host_start[b], n_new, cache->capacity());
      }
    }
    for (int t = 0; t < n_new; ++t) host_positions[b * n_new + t] = host_start[b] + t;
  }
  for (int i = 0; i < N; ++i) {
    RLHF_CHECK(tokens[i] >= 0 && tokens[i] < c.vocab_size, "token {} outside the vocabulary",
               tokens[i]);
  }
  ops_.copy_from_host(tokens_, tokens, sizeof(int32_t) * N);
  ops_.copy_from_host(positions_, host_positions.data(), sizeof(int32_t) * N);
  ops_.copy_from_host(start_, host_start.data(), sizeof(int32_t) * batch);

  if (record) {
    record->n_layers = c.n_moe_layers();
    record->n_tokens = N;
    record->top_k = c.top_k;
    record->expert_ids.assign(size_t(c.n_moe_layers()) * N * c.top_k, 0);
  }
  if (replay && (replay->n_layers != c.n_moe_layers() || replay->n_tokens != N ||
                 replay->top_k != c.top_k ||
                 replay->expert_ids.size() != size_t(c.n_moe_layers()) * N * c.top_k)) {
    fail("routing trace covers {} MoE layers x {} tokens x top-{} but this forward has {} x {} "
         "x top-{}",
         replay->n_layers, replay->n_tokens, replay->top_k, c.n_moe_layers(), N, c.top_k);
  }
  stats_.expert_load.resize(c.n_moe_layers());
  for (auto& layer : stats_.expert_load) layer.assign(c.n_routed_experts, 0);
  stats_.clamp.assign(c.n_layers, ClampCounts{});
  stats_.tokens = N;
  stats_.router_flips.assign(selection_router_on_ && !replay ? c.n_moe_layers() : 0, 0);
  host_clamp_counts_.assign(size_t(clamp_counts_.size()), 0);
  clamp_counts_.from_host(host_clamp_counts_.data(), clamp_counts_.size());
  stats_on_device_ = true;

  if (qat_format_ && qat_stale_) refresh_qat();
  // A decode step reads everything it needs from the buffers just written, so it can run as a
  // recording. Not with a replayed trace or a selection router: those copy to and from the host
  // between the layers.
  if (cache && n_new == 1 && !replay && !selection_router_on_ && record_decode_steps_ &&
      ops_.can_record()) {
    run_recorded_decode_step(batch, *cache);
  } else {
    run_layers(batch, n_new, cache, replay);
  }
  // The routing is read back after the whole forward is queued, one copy per MoE layer.
  if (record) {
    for (int m = 0; m < c.n_moe_layers(); ++m) {
      ops_.copy_to_host(record->expert_ids.data() + size_t(m) * N * c.top_k,
                        layer_acts_[c.n_dense_layers + m].routing.expert_ids,
                        sizeof(int32_t) * N * c.top_k);
    }
  }

  // Model FLOPs: 2 per multiply-add of every matmul, attention counted over the keys each
  // query actually reads (causal), routed experts over the rows they actually receive.
  const int D = c.d_model;
  double flops = 0;
  const double n = N;
  const double attn_keys = [&] {
    double keys = 0;
    for (int b = 0; b < batch; ++b) {
      for (int t = 0; t < n_new; ++t) keys += host_start[b] + t + 1;
    }
    return keys;
  }();
  for (int l = 0; l < c.n_layers; ++l) {
    flops += 2 * n * D * (2.0 * c.q_dim() + 2.0 * c.kv_dim());
    flops += 2 * 2 * attn_keys * c.n_heads * c.head_dim;
    if (!c.is_moe_layer(l)) {
      flops += 2 * n * D * 3.0 * c.d_ff;
    } else {
      flops += 2 * n * D * c.n_routed_experts;
      flops += 2 * n * D * 3.0 * c.n_shared_experts * c.d_expert;
      flops += 2 * n * c.top_k * D * 3.0 * c.d_expert;
    }
  }
  flops += 2 * n * D * c.vocab_size;
  last_forward_flops_ = flops;
  return logits_;
}

template <typename T>
void Transformer<T>::run_layers(int batch, int n_new, KvCache<T>* cache,
                                const RoutingTrace* replay) {
  const ModelConfig& c = config_;
  const int N = batch * n_new, D = c.d_model;
  for (ClampCounts& counts : stats_.clamp) counts.total = 0;
  const ModelWeights<T>& W = active_weights();
  ops_.embedding_forward(layer_acts_[0].x_in, tokens_, W.embed, N, D);
  LayerActs& first = layer_acts_[0];
  ops_.rmsnorm_forward(first.attn_in, first.attn_rstd, first.x_in, W.layers[0].attn_norm, N, D,
                       c.norm_eps);
  for (int l = 0; l < c.n_layers; ++l) {
    attention_block(l, batch, n_new, cache);
    ffn_block(l, N, replay);  // ends with the next layer's attention norm, or the final norm
  }
  ops_.matmul_forward(logits_, final_in_, W.lm_head, N, c.vocab_size, D, false);
}

template <typename T>
size_t Transformer<T>::recorded_decode_steps() const {
  return size_t(std::count_if(recorded_steps_.begin(), recorded_steps_.end(),
                              [](const auto& entry) { return entry.second.recording != nullptr; }));
}

template <typename T>
void Transformer<T>::run_recorded_decode_step(int batch, KvCache<T>& cache) {
  // Everything the recording holds besides the model's own buffers: the cache's memory and
  // shape, the rows, and which weights the forward reads (QAT's copy or the master weights).
  const DecodeStepKey key{batch, reinterpret_cast<uintptr_t>(cache.k(0)),
                          reinterpret_cast<uintptr_t>(cache.v(0)), cache.capacity(),
                          cache.batch(), qat_format_.has_value()};
  auto found = recorded_steps_.find(key);
  if (found != recorded_steps_.end()) {
    RecordedStep& step = found->second;
    if (step.recording && step.recording->replay()) {
      for (size_t l = 0; l < stats_.clamp.size(); ++l) {
        stats_.clamp[l].total = step.clamp_totals[l];
      }
      return;
    }
    if (step.refusals >= kMaxRecordingRefusals) {
      run_layers(batch, 1, &cache, nullptr);
      return;
    }
  } else if (recorded_steps_.size() >= kMaxRecordedSteps) {
    recorded_steps_.clear();  // shapes of calls long gone, most likely
  }
  RecordedStep& step = recorded_steps_[key];
  step.recording.reset();
  ops_.begin_recording();
  try {
    run_layers(batch, 1, &cache, nullptr);
    step.recording = ops_.end_recording();
  } catch (const OpNotRecordable&) {
    // An op of this step waits for the device (the backend ended the recording; nothing ran).
    // The first refusal can be a one-off, the scratch growing to this shape; after the second
    // this shape runs unrecorded for good.
    ++step.refusals;
    run_layers(batch, 1, &cache, nullptr);
    return;
  } catch (...) {
    ops_.end_recording();  // close the capture before the error goes on
    throw;
  }
  step.clamp_totals.resize(stats_.clamp.size());
  for (size_t l = 0; l < stats_.clamp.size(); ++l) step.clamp_totals[l] = stats_.clamp[l].total;
  // Recording ran nothing: this replay is the step itself.
  RLHF_CHECK(step.recording->replay(), "a decode step's recording is stale right after it");
}

template <typename T>
const ForwardStats& Transformer<T>::last_stats() const {
  if (!stats_on_device_) return stats_;
  // One read per MoE layer's offsets and one for the clamp counts, only when someone asks: a
  // decode loop never does, so its forwards run without waiting for the device.
  const ModelConfig& c = config_;
  const int E = c.n_routed_experts;
  std::vector<int32_t> offsets(size_t(E) + 1);
  for (int m = 0; m < c.n_moe_layers(); ++m) {
    ops_.copy_to_host(offsets.data(), layer_acts_[c.n_dense_layers + m].routing.offsets,
                      sizeof(int32_t) * offsets.size());
    for (int e = 0; e < E; ++e) stats_.expert_load[m][e] = offsets[e + 1] - offsets[e];
  }
  host_clamp_counts_ = clamp_counts_.to_host();
  for (int l = 0; l < c.n_layers; ++l) {
    stats_.clamp[l].gate = host_clamp_counts_[2 * l];
    stats_.clamp[l].linear = host_clamp_counts_[2 * l + 1];
  }
  stats_on_device_ = false;
  return stats_;
}

template <typename T>
void Transformer<T>::attention_block(int l, int batch, int n_new, KvCache<T>* cache) {
  const ModelConfig& c = config_;
  const int N = batch * n_new, D = c.d_model;
  LayerActs& a = layer_acts_[l];
  const LayerWeights<T>& w = active_weights().layers[l];
  // a.attn_in (the norm of a.x_in) comes from the block before.
  const Projection qkv[] = {
      {a.q, w.wq, c.q_dim()}, {a.k, w.wk, c.kv_dim()}, {a.v, w.wv, c.kv_dim()}};
  ops_.matmul_forward_projections(a.attn_in, N, D, qkv);
  ops_.rope_forward_qk(a.q, a.k, positions_, N, c.n_heads, c.n_kv_heads, c.head_dim,
                       c.rope_theta);
  AttentionShape shape{batch, n_new, n_new, c.n_heads, c.n_kv_heads, c.head_dim, start_};
  if (cache) {
    shape.capacity = cache->capacity();
    ops_.kv_cache_write_kv(cache->k(l), cache->v(l), a.k, a.v, shape);
    ops_.attention_forward(a.attn_out, nullptr, a.q, cache->k(l), cache->v(l), shape);
  } else {
    ops_.attention_forward(a.attn_out, a.lse, a.q, a.k, a.v, shape);
  }
  // x_mid = x_in + the attention's output; the FFN's norm of it, and the copy of it that the
  // FFN adds its output to (the next layer's x_in).
  T* ffn_out = l + 1 < c.n_layers ? layer_acts_[l + 1].x_in : resid_final_;
  ops_.matmul_residual_rmsnorm_forward(a.x_mid, a.x_in, a.attn_out, w.wo, N, D, c.q_dim(),
                                       {a.ffn_in, a.ffn_rstd, w.ffn_norm, c.norm_eps, ffn_out});
}

template <typename T>
typename Ops<T>::NormAfter Transformer<T>::norm_after_ffn(int l) {
  const ModelConfig& c = config_;
  if (l + 1 < c.n_layers) {
    LayerActs& next = layer_acts_[l + 1];
    return {next.attn_in, next.attn_rstd, active_weights().layers[l + 1].attn_norm, c.norm_eps};
  }
  return {final_in_, final_rstd_, active_weights().final_norm, c.norm_eps};
}

template <typename T>
void Transformer<T>::ffn_block(int l, int N, const RoutingTrace* replay) {
  const ModelConfig& c = config_;
  const int D = c.d_model;
  LayerActs& a = layer_acts_[l];
  const LayerWeights<T>& w = active_weights().layers[l];
  // out holds a copy of x_mid and a.ffn_in its norm (attention_block); out += the FFN's output.
  T* out = l + 1 < c.n_layers ? layer_acts_[l + 1].x_in : resid_final_;
  const typename Ops<T>::NormAfter after = norm_after_ffn(l);
  // The clamp counts accumulate in backend memory (read when last_stats() is asked); the
  // number of units looked at is known here.
  int64_t* clamp_counts = clamp_counts_.data() + 2 * l;
  auto swiglu = [&](T* h, const T* gate, const T* up, int64_t n) {
    ops_.swiglu_forward(h, gate, up, n, c.clamp, clamp_counts);
    stats_.clamp[l].total += n;
  };
  // out (+)= in . W^T for a weight held in float, or in packed FP4 when `packed` is given.
  auto matmul = [&](T* dst, const T* in, const T* weight, const PackedFp4Matrix* packed, int M,
                    int n_out, int n_in, bool accumulate) {
    if (packed) {
      ops_.fp4_matmul_forward(dst, in, *packed, M, accumulate);
    } else {
      ops_.matmul_forward(dst, in, weight, M, n_out, n_in, accumulate);
    }
  };
  // The shared experts: out += SwiGLU(ffn_in) through one weight triple of hidden width F;
  // `gate_up_done`: a.gate and a.up already hold the first two products.
  auto dense_swiglu = [&](const T* wg, const T* wu, const T* wd, int F,
                          const PackedFp4Matrix* pg, const PackedFp4Matrix* pu,
                          const PackedFp4Matrix* pd, bool gate_up_done) {
    if (!gate_up_done) {
      matmul(a.gate, a.ffn_in, wg, pg, N, F, D, false);
      matmul(a.up, a.ffn_in, wu, pu, N, F, D, false);
    }
    swiglu(a.h, a.gate, a.up, int64_t(N) * F);
    matmul(out, a.h, wd, pd, N, D, F, true);
  };
  if (!c.is_moe_layer(l)) {
    // A dense layer's weights are never packed: its down product ends the layer together with
    // the norm after it.
    const Projection gate_up[] = {{a.gate, w.ffn_gate, c.d_ff}, {a.up, w.ffn_up, c.d_ff}};
    ops_.matmul_forward_projections(a.ffn_in, N, D, gate_up);
    swiglu(a.h, a.gate, a.up, int64_t(N) * c.d_ff);
    ops_.matmul_residual_rmsnorm_forward(out, out, a.h, w.ffn_down, N, D, c.d_ff, after);
    return;
  }
  const bool packed = packed_format_.has_value();
  const int m = l - c.n_dense_layers, E = c.n_routed_experts, K = c.top_k, Fe = c.d_expert;
  MoeRouting& r = a.routing;
  r.n_tokens = N;
  r.top_k = K;
  r.n_experts = E;
  // The router and, held in float, the shared expert's gate and up all read ffn_in: one call.
  const int shared_width = c.n_shared_experts * Fe;
  const bool shared_gate_up_here = c.n_shared_experts > 0 && !packed;
  if (shared_gate_up_here) {
    const Projection projections[] = {{router_logits_, w.router, E},
                                      {a.gate, w.shared_gate, shared_width},
                                      {a.up, w.shared_up, shared_width}};
    ops_.matmul_forward_projections(a.ffn_in, N, D, projections);
  } else {
    ops_.matmul_forward(router_logits_, a.ffn_in, w.router, N, E, D, false);
  }
  if (replay) {
    for (int64_t i = 0; i < int64_t(N) * K; ++i) {
      const int32_t id = replay->layer(m)[i];
      if (id < 0 || id >= E) fail("routing trace names expert {} but the model has {}", id, E);
    }
    ops_.copy_from_host(r.expert_ids, replay->layer(m), sizeof(int32_t) * N * K);
  } else if (selection_router_on_) {
    select_with_selection_router(m, N);
  }
  // The shared experts do not depend on the routing. Packed, their three products run in a
  // side branch that may overlap the routed experts' launches: it writes a.gate, a.up, a.h and
  // adds to out; the routed path writes the routing, a.xe, a.e_*, a.ye and reads ffn_in, and
  // combine, which adds to out too, comes after the join. On an H100 that took 3 to 8% off a
  // packed decode step; held in float (gate and up already done above, only SwiGLU and down
  // left to overlap), a branch made the step 1 to 5% slower, so it runs in order (docs/perf.md).
  const bool shared_in_branch = c.n_shared_experts > 0 && !shared_gate_up_here;
  if (shared_in_branch) ops_.side_branch_begin();
  if (c.n_shared_experts > 0) {
    dense_swiglu(w.shared_gate, w.shared_up, w.shared_down, shared_width,
                 packed ? &w.packed_shared_gate : nullptr, packed ? &w.packed_shared_up : nullptr,
                 packed ? &w.packed_shared_down : nullptr, shared_gate_up_here);
  }
  if (shared_in_branch) ops_.side_branch_end();
  // With a replayed trace or a selection router, r.expert_ids is already chosen: the latest
  // router only supplies the scores and gates (and so its gradient).
  ops_.router_forward(a.scores, a.gates, r, router_logits_, router_bias_[m], c.route_scale,
                      replay != nullptr || selection_router_on_);
  const int64_t rows = int64_t(N) * K;
  ops_.moe_dispatch_forward(a.xe, a.ffn_in, r, D);
  if (packed) {
    const Fp4GroupedProjection gate_up[] = {{a.e_gate, &w.packed_expert_gate},
                                            {a.e_up, &w.packed_expert_up}};
    ops_.fp4_grouped_matmul_forward_projections(a.xe, r.offsets, E, int(rows), gate_up);
  } else {
    const GroupedProjection gate_up[] = {{a.e_gate, w.expert_gate}, {a.e_up, w.expert_up}};
    ops_.grouped_matmul_forward_projections(a.xe, r.offsets, E, int(rows), Fe, D, gate_up);
  }
  swiglu(a.e_h, a.e_gate, a.e_up, rows * Fe);
  if (packed) {
    ops_.fp4_grouped_matmul_forward(a.ye, a.e_h, w.packed_expert_down, r.offsets, E,
                                    int(rows));
  } else {
    ops_.grouped_matmul_forward(a.ye, a.e_h, w.expert_down, r.offsets, E, int(rows), D, Fe);
  }
  if (shared_in_branch) ops_.side_branch_join();
  ops_.moe_combine_rmsnorm_forward(out, a.ye, a.gates, r, D, after);
}

template <typename T>
double Transformer<T>::forward_backward(const TokenBatch& batch, const RoutingTrace* replay) {
  const int N = batch.batch * batch.seq_len;
  RLHF_CHECK(int64_t(batch.tokens.size()) == N && int64_t(batch.targets.size()) == N &&
                 int64_t(batch.weights.size()) == N,
             "TokenBatch arrays disagree with its shape");
  for (int i = 0; i < N; ++i) {
    RLHF_CHECK(batch.targets[i] >= 0 && batch.targets[i] < config_.vocab_size,
               "target {} outside the vocabulary", batch.targets[i]);
  }
  if (packed_format_) {
    fail("this model holds packed FP4 experts and runs inference only; train the float model "
         "(with QAT) instead");
  }
  forward(batch.tokens.data(), batch.batch, batch.seq_len, nullptr, nullptr, nullptr, replay);
  ops_.copy_from_host(targets_, batch.targets.data(), sizeof(int32_t) * N);
  std::vector<T> weights(batch.weights.begin(), batch.weights.end());
  ops_.copy_from_host(loss_weights_, weights.data(), sizeof(T) * N);
  return backward(batch.batch, batch.seq_len);
}

template <typename T>
double Transformer<T>::backward(int batch, int seq_len) {
  const ModelConfig& c = config_;
  const int N = batch * seq_len, D = c.d_model, V = c.vocab_size;
  const int E = c.n_routed_experts, K = c.top_k, Fe = c.d_expert;
  const int64_t ND = int64_t(N) * D;
  // With QAT the input gradients flow through the quantized weights the forward used, and the
  // weight gradients land on the float masters: the straight-through estimator.
  const ModelWeights<T>& W = active_weights();
  const ModelWeights<T>& G = grad_views_;

  double loss = ops_.cross_entropy_forward_backward(logits_, logits_, targets_, loss_weights_, N, V);
  T* dlogits = logits_;
  ops_.matmul_backward(d_norm_, G.lm_head, dlogits, final_in_, W.lm_head, N, V, D, false);
  ops_.fill(d_resid_, T(0), ND);
  ops_.rmsnorm_backward(d_resid_, G.final_norm, d_norm_, resid_final_, W.final_norm,
                        final_rstd_, N, D);

  for (int l = c.n_layers - 1; l >= 0; --l) {
    LayerActs& a = layer_acts_[l];
    const LayerWeights<T>& w = W.layers[l];
    const LayerWeights<T>& g = G.layers[l];
    // --- FFN block: d_resid_ is dL/d(layer output); d_norm_ collects dL/d(ffn_in).
    auto dense_swiglu_backward = [&](const T* wg, const T* wu, const T* wd, T* dwg, T* dwu,
                                     T* dwd, int F, bool accumulate) {
      ops_.matmul_backward(d_h_, dwd, d_resid_, a.h, wd, N, D, F, false);
      ops_.swiglu_backward(d_gate_, d_up_, d_h_, a.gate, a.up, int64_t(N) * F, c.clamp);
      ops_.matmul_backward(d_norm_, dwg, d_gate_, a.ffn_in, wg, N, F, D, accumulate);
      ops_.matmul_backward(d_norm_, dwu, d_up_, a.ffn_in, wu, N, F, D, true);
    };
    if (!c.is_moe_layer(l)) {
      dense_swiglu_backward(w.ffn_gate, w.ffn_up, w.ffn_down, g.ffn_gate, g.ffn_up, g.ffn_down,
                            c.d_ff, false);
    } else {
      const MoeRouting& r = a.routing;
      const int64_t rows = int64_t(N) * K;
      if (c.n_shared_experts > 0) {
        dense_swiglu_backward(w.shared_gate, w.shared_up, w.shared_down, g.shared_gate,
                              g.shared_up, g.shared_down, c.n_shared_experts * Fe, false);
      } else {
        ops_.fill(d_norm_, T(0), ND);
      }
      ops_.moe_combine_backward(d_ye_, d_gates_, d_resid_, a.ye, a.gates, r, D);
      ops_.grouped_matmul_backward(d_h_, g.expert_down, d_ye_, a.e_h, w.expert_down, r.offsets,
                                   E, D, Fe, false);
      ops_.swiglu_backward(d_gate_, d_up_, d_h_, a.e_gate, a.e_up, rows * Fe, c.clamp);
      ops_.grouped_matmul_backward(d_xe_, g.expert_gate, d_gate_, a.xe, w.expert_gate,
                                   r.offsets, E, Fe, D, false);
      ops_.grouped_matmul_backward(d_xe_, g.expert_up, d_up_, a.xe, w.expert_up, r.offsets, E,
                                   Fe, D, true);
      ops_.moe_dispatch_backward(d_norm_, d_xe_, r, D);
      ops_.router_backward(d_scores_, d_gates_, a.scores, a.gates, r, c.route_scale);
      if (c.seq_balance_loss > 0) {
        loss += ops_.seq_balance_loss(d_scores_, a.scores, r, seq_len, c.seq_balance_loss,
                                      double(batch));
      }
      ops_.matmul_backward(d_norm_, g.router, d_scores_, a.ffn_in, w.router, N, E, D, true);
    }
    // The residual passes d_resid_ through unchanged; the norm adds the FFN path's share.
    ops_.rmsnorm_backward(d_resid_, g.ffn_norm, d_norm_, a.x_mid, w.ffn_norm, a.ffn_rstd, N, D);

    // --- attention block
    AttentionShape shape{batch, seq_len, seq_len, c.n_heads, c.n_kv_heads, c.head_dim, start_};
    ops_.matmul_backward(d_attn_, g.wo, d_resid_, a.attn_out, w.wo, N, D, c.q_dim(), false);
    ops_.attention_backward(d_q_, d_k_, d_v_, d_attn_, a.attn_out, a.lse, a.q, a.k, a.v, shape);
    ops_.rope_backward(d_q_, positions_, N, c.n_heads, c.head_dim, c.rope_theta);
    ops_.rope_backward(d_k_, positions_, N, c.n_kv_heads, c.head_dim, c.rope_theta);
    ops_.matmul_backward(d_norm_, g.wq, d_q_, a.attn_in, w.wq, N, c.q_dim(), D, false);
    ops_.matmul_backward(d_norm_, g.wk, d_k_, a.attn_in, w.wk, N, c.kv_dim(), D, true);
    ops_.matmul_backward(d_norm_, g.wv, d_v_, a.attn_in, w.wv, N, c.kv_dim(), D, true);
    ops_.rmsnorm_backward(d_resid_, g.attn_norm, d_norm_, a.x_in, w.attn_norm, a.attn_rstd, N,
                          D);
  }
  ops_.embedding_backward(G.embed, d_resid_, tokens_, N, D, V);
  if (qat_format_ && qat_clipped_) {
    for (const ExpertMatrixSpec& m : expert_matrices_) {
      const TensorSpec& t = layout_.find(m.name);
      ops_.zero_where(grads_.data() + t.offset, qat_saturated_.data() + t.offset, t.numel);
    }
  }
  return loss;
}

// Anticipatory routing's selection for MoE layer `m`: top-k of the selection router's
// affinities (plus its own balance bias) into routing.expert_ids, and the flip count against
// what the latest router (logits already in router_logits_) would have chosen. The backward
// scratch d_scores_ / d_gates_ is free during a forward and holds the throwaway values.
template <typename T>
void Transformer<T>::select_with_selection_router(int m, int N) {
  const ModelConfig& c = config_;
  const int E = c.n_routed_experts, K = c.top_k, D = c.d_model;
  LayerActs& a = layer_acts_[c.n_dense_layers + m];
  MoeRouting& r = a.routing;
  const T* snapshot = selection_router_.data() + int64_t(m) * E * (D + 1);
  const size_t ids_bytes = sizeof(int32_t) * size_t(N) * K;
  host_selected_.resize(size_t(N) * K);
  host_latest_.resize(size_t(N) * K);
  // What the latest router would pick (for the flip rate only).
  ops_.router_forward(a.scores, d_gates_, r, router_logits_, router_bias_[m], c.route_scale,
                      false);
  ops_.copy_to_host(host_latest_.data(), r.expert_ids, ids_bytes);
  // What the snapshot picks: this is the selection used.
  ops_.matmul_forward(d_scores_, a.ffn_in, snapshot, N, E, D, false);
  ops_.router_forward(a.scores, d_gates_, r, d_scores_, snapshot + int64_t(E) * D,
                      c.route_scale, false);
  ops_.copy_to_host(host_selected_.data(), r.expert_ids, ids_bytes);
  int64_t flips = 0;
  for (int t = 0; t < N; ++t) {
    int32_t* sel = host_selected_.data() + size_t(t) * K;
    int32_t* lat = host_latest_.data() + size_t(t) * K;
    // Host copies: sorting them leaves the device's choice order alone.
    std::sort(sel, sel + K);
    std::sort(lat, lat + K);
    flips += std::equal(sel, sel + K, lat) ? 0 : 1;
  }
  stats_.router_flips[m] += flips;
}

template <typename T>
std::vector<T> Transformer<T>::router_state() const {
  const ModelConfig& c = config_;
  const int64_t E = c.n_routed_experts, D = c.d_model;
  std::vector<T> state(size_t(c.n_moe_layers() * E * (D + 1)));
  for (int m = 0; m < c.n_moe_layers(); ++m) {
    T* dst = state.data() + m * E * (D + 1);
    ops_.copy_to_host(dst, weights_.layers[c.n_dense_layers + m].router, sizeof(T) * E * D);
    ops_.copy_to_host(dst + E * D, router_bias_[m], sizeof(T) * E);
  }
  return state;
}

template <typename T>
void Transformer<T>::set_selection_router(const std::vector<T>& state) {
  const ModelConfig& c = config_;
  const int64_t size = int64_t(c.n_moe_layers()) * c.n_routed_experts * (c.d_model + 1);
  if (int64_t(state.size()) != size) {
    fail("selection router holds {} values but this model's routers have {}", state.size(), size);
  }
  if (selection_router_.size() != size) selection_router_ = Buffer<T, Ops<T>>(ops_, size);
  selection_router_.from_host(state.data(), size);
  selection_router_on_ = true;
}

template <typename T>
void Transformer<T>::update_router_bias() {
  const ModelConfig& c = config_;
  const ForwardStats& stats = last_stats();
  if (c.bias_update_rate == 0 || stats.expert_load.empty()) return;
  std::vector<T> bias(c.n_routed_experts);
  for (int m = 0; m < c.n_moe_layers(); ++m) {
    const auto& load = stats.expert_load[m];
    double mean = 0;
    for (int64_t x : load) mean += double(x);
    mean /= double(load.size());
    ops_.copy_to_host(bias.data(), router_bias_[m], sizeof(T) * bias.size());
    for (int e = 0; e < c.n_routed_experts; ++e) {
      const double diff = mean - double(load[e]);
      const double step = diff > 0 ? 1.0 : diff < 0 ? -1.0 : 0.0;
      bias[e] += T(c.bias_update_rate * step);
    }
    ops_.copy_from_host(router_bias_[m], bias.data(), sizeof(T) * bias.size());
  }
}

template struct ModelWeights<float>;
template struct ModelWeights<double>;
template class KvCache<float>;
template class KvCache<double>;
template class Transformer<float>;
template class Transformer<double>;

}  // namespace rlhf
