#pragma once
// Batched generation with a KV cache: the actor's rollout engine on top of Transformer<float>.
//
//   prompts -> one padded prefill per chunk of <= max_batch prompts -> sample -> decode one
//   token per step for every unfinished sequence (KV cache) -> sample -> ... -> Generation
//
// Results do not depend on how prompts are batched: every sequence samples from its own Rng,
// seeded by mix_seed(params.seed, its index in the prompt list), and right-padding never
// reaches a real position (causal attention reads only positions <= its own; each sequence's
// decode overwrites its pad K/V before anything attends to it). docs/generation.md has the
// user-facing definitions of the sampling parameters, logprobs and routing traces.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/rng.h"
#include "model/tokenizer.h"
#include "model/transformer.h"

namespace rlhf {

struct SamplingParams {
  double temperature = 1.0;  // logits / temperature; 0 = greedy (argmax, lowest id on ties)
  int top_k = 0;             // keep the k most probable tokens; 0 = off
  double top_p = 1.0;        // then the smallest most-probable set with mass >= top_p; 1 = off
  int max_new_tokens = 32;   // generated tokens per sequence, eos included
  uint64_t seed = 0;         // sequence i samples from Rng(mix_seed(seed, i))
  bool stop_at_eos = true;   // false: eos is an ordinary token and generation goes on
  int32_t stop_token = -1;   // >= 0: also stop after this token (finished = true, kept in text)

  // Throws rlhf::Error naming the first bad field.
  void validate() const;
};

struct Generation {
  std::vector<int32_t> prompt_tokens;
  // Generated tokens, including the eos that ended the sequence (if any).
  std::vector<int32_t> tokens;
  // logprobs[i] = log softmax(logits / T)[tokens[i]] over the FULL vocabulary, before top-k /
  // top-p truncation (T = 1 for greedy). That is the probability of the token under the
  // policy's temperature-scaled distribution, which is what a learner recomputes from its own
  // logits; the truncated sampler's probability is not (it depends on the sampling knobs).
  std::vector<float> logprobs;
  std::string text;  // tokenizer.decode(tokens): the response without special tokens
  // True when the sequence ended by producing eos (stop_at_eos); false when it stopped at
  // max_new_tokens or at the model's max_seq_len.
  bool finished = false;
  // The expert choices of every MoE layer for every position the model PROCESSED, in position
  // order: the sequence prompt_tokens + tokens without its last token (the last generated token
  // is never fed back). n_tokens = prompt_tokens.size() + tokens.size() - 1. A learner that
  // runs forward(seq, 1, n_tokens, nullptr, nullptr, record, &routing) over exactly that
  // sequence replays the actor's routing; its logits at positions prompt_size - 1 + i score
  // tokens[i].
  RoutingTrace routing;

  // prompt_tokens + tokens without the last token: the sequence `routing` covers.
  std::vector<int32_t> processed_tokens() const;
};

// Teacher-forced log-probabilities through the backend's log_softmax_gather:
// result[i] = log softmax(logits[i] / temperature)[targets[i]], i < targets.size(). `logits`
// [n, V] is in the backend's memory (a forward's output); `targets` and the result are on the
// host. The targets and the result pass through two small backend buffers allocated per call.
std::vector<float> gather_logprobs(Ops<float>& ops, const float* logits,
                                   std::span<const int32_t> targets, int vocab,
                                   double temperature = 1.0);

// Draws one token from a row of logits (host memory). Holds its scratch so sampling allocates
// nothing after the first call with a given vocabulary size.
//
// The candidate set: all tokens by probability (descending, lower id first on ties); top_k
// keeps the first k; top_p then keeps the shortest prefix whose mass, renormalized over what
// top_k kept, reaches top_p (at least one token). The draw is proportional to the
// temperature-scaled probabilities within that set. Greedy (temperature 0) ignores top_k/top_p.
class TokenSampler {
 public:
  // Returns the token; *logprob receives log softmax(logits / T)[token] (T = 1 when greedy).
  // Non-finite logits are an rlhf::Error (a diverged model must not produce rollouts).
  int32_t sample(std::span<const float> logits, const SamplingParams& params, Rng& rng,
                 double* logprob);

 private:
  std::vector<double> probs_;    // [V] softmax(logits / T)
  std::vector<int32_t> order_;   // [V] candidate ids, most probable first once sorted
};

// Not thread-safe: it drives one model's activations and owns per-call scratch.
class Generator {
 public:
  // `model` must have been constructed with max_batch >= max_batch here and max_seq >=
  // config.max_seq_len (its activations are sized once; the prefill of a chunk uses
  // chunk x longest-prompt rows). `tokenizer` must match the model's vocabulary.
  Generator(Transformer<float>& model, const Tokenizer& tokenizer, int max_batch);

  // One Generation per prompt, in order. Every prompt needs 1 <= size < config.max_seq_len
  // and tokens inside the vocabulary (rlhf::Error otherwise). Prompts beyond max_batch are
  // generated in successive chunks with one KV cache allocated per call.
  std::vector<Generation> generate(const std::vector<std::vector<int32_t>>& prompts,
                                   const SamplingParams& params);
  // Wraps each text with format_prompt (bos, prompt-marker, text, response-marker).
  std::vector<Generation> generate_text(const std::vector<std::string>& prompts,
                                        const SamplingParams& params);

  int max_batch() const { return max_batch_; }

 private:
  // Per-sequence state of the chunk being generated.
  struct Sequence {
    Generation* out = nullptr;
    Rng rng;
    // Routing staged token-major ([processed token][moe layer][k]) because tokens arrive one
    // at a time; transposed into the layer-major RoutingTrace when the sequence ends.
    std::vector<int32_t> routing;
    bool done = false;
  };

  void generate_chunk(std::span<Generation> out, size_t first_index,
                      const SamplingParams& params, KvCache<float>& cache);
  // Samples the next token of `seq` from a logits row (host memory) and applies the stop rules.
  void take_token(Sequence& seq, const float* host_logits, const SamplingParams& params);
  // Appends token `row` of the last forward's trace to seq's staged routing.
  void stage_routing(Sequence& seq, int row);
  void finish_routing(Sequence& seq);

  Transformer<float>& model_;
  const Tokenizer& tokenizer_;
  int max_batch_;
  int n_moe_layers_, top_k_, vocab_;
  int32_t eos_, pad_;

  // Scratch reused across steps and calls (sized on first use).
  TokenSampler sampler_;
  RoutingTrace step_trace_;            // routing of the last forward
  std::vector<Sequence> seqs_;         // [chunk]
  std::vector<int> slot_seq_;          // [active] decode slot -> sequence of the chunk
  std::vector<int32_t> step_tokens_;   // [chunk * longest prompt] forward input
  std::vector<int32_t> step_start_;    // [chunk] position of each slot's new token
  std::vector<float> host_logits_;     // [max_batch, V] the rows a step samples from, on the host
};

}  // namespace rlhf
