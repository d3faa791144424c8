#include "model/generate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/error.h"

namespace rlhf {

void SamplingParams::validate() const {
  if (!(temperature >= 0.0) || !std::isfinite(temperature)) {
    fail("sampling.temperature must be >= 0 (0 = greedy), got {}", temperature);
  }
  if (top_k < 0) fail("sampling.top_k must be >= 0 (0 = off), got {}", top_k);
  if (!(top_p > 0.0 && top_p <= 1.0)) fail("sampling.top_p must be in (0, 1], got {}", top_p);
  if (max_new_tokens < 1) fail("sampling.max_new_tokens must be >= 1, got {}", max_new_tokens);
  if (stop_token < -1) fail("sampling.stop_token must be -1 (off) or a token id, got {}", stop_token);
}

std::vector<int32_t> Generation::processed_tokens() const {
  std::vector<int32_t> seq(prompt_tokens);
  if (!tokens.empty()) seq.insert(seq.end(), tokens.begin(), tokens.end() - 1);
  return seq;
}

std::vector<float> gather_logprobs(Ops<float>& ops, const float* logits,
                                   std::span<const int32_t> targets, int vocab,
                                   double temperature) {
  const int64_t n = int64_t(targets.size());
  if (n == 0) return {};
  Buffer<int32_t, Ops<float>> device_targets(ops, n);
  Buffer<float, Ops<float>> device_logprobs(ops, n);
  device_targets.from_host(targets.data(), n);
  ops.log_softmax_gather(device_logprobs.data(), logits, device_targets.data(), int(n), vocab,
                         temperature);
  return device_logprobs.to_host();
}

// ---------------------------------------------------------------- sampling

int32_t TokenSampler::sample(std::span<const float> logits, const SamplingParams& params,
                             Rng& rng, double* logprob) {
  const int V = static_cast<int>(logits.size());
  RLHF_CHECK(V > 0, "empty logits row");
  const bool greedy = params.temperature == 0.0;
  const double inv_temp = greedy ? 1.0 : 1.0 / params.temperature;

  // Softmax in double: with a small temperature, logits / T spans a range where float exp
  // would lose the tail that top-p and the logprob need.
  int32_t argmax = 0;
  for (int v = 0; v < V; ++v) {
    if (!std::isfinite(logits[v])) fail("non-finite logit {} at token {}", logits[v], v);
    if (logits[v] > logits[argmax]) argmax = v;  // strict: the lowest id wins ties
  }
  const double z_max = logits[argmax] * inv_temp;
  probs_.resize(size_t(V));
  double sum = 0;
  for (int v = 0; v < V; ++v) {
    probs_[v] = std::exp(logits[v] * inv_temp - z_max);
    sum += probs_[v];
  }
  const double log_sum = std::log(sum);
  auto token_logprob = [&](int32_t token) { return logits[token] * inv_temp - z_max - log_sum; };
  if (greedy) {
    *logprob = token_logprob(argmax);
    return argmax;
  }
  for (double& p : probs_) p /= sum;

  // Inverse-CDF draw over `n` candidates; `at(i)` is the i-th candidate's id. The mass is
  // summed in the same order as the walk, so u < mass reaches a candidate unless rounding
  // puts u exactly at the end; then the last candidate with nonzero probability is taken.
  auto draw = [&](int n, auto at) {
    double mass = 0;
    for (int i = 0; i < n; ++i) mass += probs_[at(i)];
    const double u = rng.uniform() * mass;
    double acc = 0;
    int32_t last_positive = at(0);
    for (int i = 0; i < n; ++i) {
      const int32_t id = at(i);
      if (probs_[id] <= 0) continue;
      acc += probs_[id];
      last_positive = id;
      if (u < acc) return id;
    }
    return last_positive;
  };

  const bool use_top_k = params.top_k > 0 && params.top_k < V;
  const bool use_top_p = params.top_p < 1.0;
  int32_t token;
  if (!use_top_k && !use_top_p) {
    token = draw(V, [](int i) { return int32_t(i); });
  } else {
    // Order by logit (the same order as probability, without exp's rounding creating false
    // ties), lower id first on ties, so top_k = 1 picks exactly the greedy token.
    order_.resize(size_t(V));
    std::iota(order_.begin(), order_.end(), 0);
    auto before = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    int n_keep = V;
    if (use_top_k) {
      n_keep = params.top_k;
      std::partial_sort(order_.begin(), order_.begin() + n_keep, order_.end(), before);
    } else {
      std::sort(order_.begin(), order_.end(), before);
    }
    if (use_top_p) {
      double mass = 0;
      for (int i = 0; i < n_keep; ++i) mass += probs_[order_[i]];
      const double target = params.top_p * mass;
      double cum = 0;
      for (int i = 0; i < n_keep; ++i) {
        cum += probs_[order_[i]];
        if (cum >= target) {
          n_keep = i + 1;
          break;
        }
      }
    }
    token = draw(n_keep, [&](int i) { return order_[i]; });
  }
  *logprob = token_logprob(token);
  return token;
}

// ---------------------------------------------------------------- generator

Generator::Generator(Transformer<float>& model, const Tokenizer& tokenizer, int max_batch)
    : model_(model), tokenizer_(tokenizer), max_batch_(max_batch),
      n_moe_layers_(model.config().n_moe_layers()), top_k_(model.config().top_k),
      vocab_(model.config().vocab_size), eos_(tokenizer.special(SpecialToken::kEos)),
      pad_(tokenizer.special(SpecialToken::kPad)) {
  if (max_batch < 1) fail("generator max_batch must be >= 1, got {}", max_batch);
  if (tokenizer.vocab_size() != vocab_) {
    fail("generator: tokenizer '{}' has {} tokens but the model's vocab_size is {}",
         tokenizer.name(), tokenizer.vocab_size(), vocab_);
  }
  // Prefill runs the whole batch of prompts at once, so the model's activations must hold
  // max_batch sequences of up to max_seq_len tokens.
  if (model.max_batch() < max_batch || model.max_seq() < model.config().max_seq_len) {
    fail("generator: the model's activations hold {} x {} tokens but generating needs {} x {} "
         "(batch x model.max_seq_len)",
         model.max_batch(), model.max_seq(), max_batch, model.config().max_seq_len);
  }
}

std::vector<Generation> Generator::generate_text(const std::vector<std::string>& prompts,
                                                 const SamplingParams& params) {
  std::vector<std::vector<int32_t>> tokens;
  tokens.reserve(prompts.size());
  for (const std::string& p : prompts) tokens.push_back(format_prompt(tokenizer_, p));
  return generate(tokens, params);
}

std::vector<Generation> Generator::generate(const std::vector<std::vector<int32_t>>& prompts,
                                            const SamplingParams& params) {
  params.validate();
  const int max_seq = model_.config().max_seq_len;
  size_t longest = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int32_t>& p = prompts[i];
    if (p.empty()) fail("prompt {} is empty", i);
    // At least one position must remain for a generated token.
    if (p.size() >= size_t(max_seq)) {
      fail("prompt {} has {} tokens; model.max_seq_len {} leaves no room to generate", i,
           p.size(), max_seq);
    }
    for (int32_t t : p) {
      if (t < 0 || t >= vocab_) fail("prompt {} has token {} outside the vocabulary", i, t);
    }
    longest = std::max(longest, p.size());
  }
  std::vector<Generation> out(prompts.size());
  if (prompts.empty()) return out;

  // The cache holds every processed position: the padded prefill (longest) and the decoded
  // tokens, of which the last generated one is never processed.
  const int capacity =
      std::min<int64_t>(int64_t(longest) + params.max_new_tokens - 1, max_seq - 1);
  const int cache_batch = std::min<int>(max_batch_, int(prompts.size()));
  KvCache<float> cache(model_.ops(), model_.config(), cache_batch, capacity);

  for (size_t first = 0; first < prompts.size(); first += size_t(max_batch_)) {
    const size_t n = std::min(prompts.size() - first, size_t(max_batch_));
    for (size_t b = 0; b < n; ++b) out[first + b].prompt_tokens = prompts[first + b];
    generate_chunk(std::span<Generation>(out).subspan(first, n), first, params, cache);
  }
  return out;
}

void Generator::generate_chunk(std::span<Generation> out, size_t first_index,
                               const SamplingParams& params, KvCache<float>& cache) {
  const ModelConfig& config = model_.config();
  const int B = int(out.size());
  size_t longest = 0;
  for (const Generation& g : out) longest = std::max(longest, g.prompt_tokens.size());
  const int L = int(longest);
  const int64_t routing_row = int64_t(n_moe_layers_) * top_k_;

  // Everything a sequence will hold is reserved here, so the decode loop only appends.
  seqs_.resize(size_t(B));
  for (int b = 0; b < B; ++b) {
    Sequence& s = seqs_[b];
    Generation& g = out[b];
    s.out = &g;
    s.rng.reseed(mix_seed(params.seed, first_index + size_t(b)));
    s.done = false;
    const int64_t prompt = int64_t(g.prompt_tokens.size());
    const int64_t max_new = std::min<int64_t>(params.max_new_tokens, config.max_seq_len - prompt);
    g.tokens.clear();
    g.tokens.reserve(size_t(max_new));
    g.logprobs.clear();
    g.logprobs.reserve(size_t(max_new));
    g.finished = false;
    s.routing.clear();
    s.routing.reserve(size_t((prompt + max_new - 1) * routing_row));
  }

  // Prefill: every prompt right-padded to the longest. Causal attention keeps the pads out of
  // real positions, and each sequence's first decode step overwrites its pad K/V at its own
  // length before any query can read them.
  Ops<float>& ops = model_.ops();
  step_tokens_.assign(size_t(B) * L, pad_);
  step_start_.assign(size_t(B), 0);
  for (int b = 0; b < B; ++b) {
    std::copy(out[b].prompt_tokens.begin(), out[b].prompt_tokens.end(),
              step_tokens_.begin() + int64_t(b) * L);
  }
  const float* logits =
      model_.forward(step_tokens_.data(), B, L, &cache, step_start_.data(), &step_trace_);
  // The logits live in the backend's memory; the sampler reads them on the host. Only each
  // prompt's last row is needed, one copy per sequence (the rows are not contiguous).
  host_logits_.resize(size_t(max_batch_) * vocab_);
  const size_t row_bytes = sizeof(float) * size_t(vocab_);
  for (int b = 0; b < B; ++b) {
    const int prompt = int(out[b].prompt_tokens.size());
    ops.copy_to_host(host_logits_.data() + int64_t(b) * vocab_,
                     logits + (int64_t(b) * L + prompt - 1) * vocab_, row_bytes);
  }
  for (int b = 0; b < B; ++b) {
    const int prompt = int(out[b].prompt_tokens.size());
    for (int t = 0; t < prompt; ++t) stage_routing(seqs_[b], b * L + t);
    take_token(seqs_[b], host_logits_.data() + int64_t(b) * vocab_, params);
  }

  // Decode. Active sequences occupy cache slots 0..n_active-1; a finished one is replaced by
  // the last active slot (its cache rows copied over), so each step runs only the sequences
  // still generating and the batch shrinks as they end.
  slot_seq_.resize(size_t(B));
  std::iota(slot_seq_.begin(), slot_seq_.end(), 0);
  int n_active = B;
  const int64_t kv_row = config.kv_dim();
  auto processed = [&](int seq) {
    const Generation& g = *seqs_[seq].out;
    return int64_t(g.prompt_tokens.size() + g.tokens.size()) - 1;
  };
  auto compact = [&] {
    auto drop_done_tail = [&] {
      while (n_active > 0 && seqs_[slot_seq_[n_active - 1]].done) --n_active;
    };
    drop_done_tail();
    for (int i = 0; i < n_active; ++i) {
      if (!seqs_[slot_seq_[i]].done) continue;
      const int last = n_active - 1;  // not done: drop_done_tail ran
      const int64_t n = processed(slot_seq_[last]) * kv_row;
      const int64_t dst = int64_t(i) * cache.capacity() * kv_row;
      const int64_t src = int64_t(last) * cache.capacity() * kv_row;
      for (int l = 0; l < config.n_layers; ++l) {
        ops.copy(cache.k(l) + dst, cache.k(l) + src, n);
        ops.copy(cache.v(l) + dst, cache.v(l) + src, n);
      }
      slot_seq_[i] = slot_seq_[last];
      --n_active;
      drop_done_tail();
    }
  };
  compact();
  while (n_active > 0) {
    for (int i = 0; i < n_active; ++i) {
      const int seq = slot_seq_[i];
      step_tokens_[i] = seqs_[seq].out->tokens.back();
      step_start_[i] = int32_t(processed(seq));  // the position of that token
    }
    logits = model_.forward(step_tokens_.data(), n_active, 1, &cache, step_start_.data(),
                            &step_trace_);
    // Every row of a decode step is needed: one copy for the step.
    ops.copy_to_host(host_logits_.data(), logits, row_bytes * size_t(n_active));
    for (int i = 0; i < n_active; ++i) {
      Sequence& s = seqs_[slot_seq_[i]];
      stage_routing(s, i);
      take_token(s, host_logits_.data() + int64_t(i) * vocab_, params);
    }
    compact();
  }

  for (int b = 0; b < B; ++b) {
    finish_routing(seqs_[b]);
    out[b].text = tokenizer_.decode(out[b].tokens);
  }
}

void Generator::take_token(Sequence& seq, const float* host_logits,
                           const SamplingParams& params) {
  double logprob = 0;
  const int32_t token = sampler_.sample(std::span<const float>(host_logits, size_t(vocab_)),
                                        params, seq.rng, &logprob);
  Generation& g = *seq.out;
  g.tokens.push_back(token);
  g.logprobs.push_back(float(logprob));
  if ((params.stop_at_eos && token == eos_) || token == params.stop_token) {
    g.finished = true;
    seq.done = true;
  } else if (int(g.tokens.size()) >= params.max_new_tokens ||
             int64_t(g.prompt_tokens.size() + g.tokens.size()) >= model_.config().max_seq_len) {
    seq.done = true;
  }
}

void Generator::stage_routing(Sequence& seq, int row) {
  for (int m = 0; m < n_moe_layers_; ++m) {
    const int32_t* ids = step_trace_.layer(m) + int64_t(row) * top_k_;
    seq.routing.insert(seq.routing.end(), ids, ids + top_k_);
  }
}

void Generator::finish_routing(Sequence& seq) {
  Generation& g = *seq.out;
  const int n = int(g.prompt_tokens.size() + g.tokens.size()) - 1;
  const int64_t row = int64_t(n_moe_layers_) * top_k_;
  RLHF_CHECK(int64_t(seq.routing.size()) == n * row, "staged routing covers {} of {} tokens",
             row ? int64_t(seq.routing.size()) / row : 0, n);
  RoutingTrace& trace = g.routing;
  trace.n_layers = n_moe_layers_;
  trace.n_tokens = n;
  trace.top_k = top_k_;
  trace.expert_ids.resize(size_t(n) * row);
  for (int t = 0; t < n; ++t) {
    for (int m = 0; m < n_moe_layers_; ++m) {
      std::copy_n(seq.routing.data() + (int64_t(t) * n_moe_layers_ + m) * top_k_, top_k_,
                  trace.expert_ids.data() + (int64_t(m) * n + t) * top_k_);
    }
  }
}

}  // namespace rlhf
