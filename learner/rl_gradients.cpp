#include "learner/rl_gradients.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/error.h"

namespace rlhf {

RlGradientStats rl_accumulate_gradients(Transformer<float>& policy,
                                        Transformer<float>& reference,
                                        std::span<const RlRollout> rollouts, int max_batch,
                                        int32_t pad, const RlObjectiveConfig& objective) {
  RLHF_CHECK(max_batch >= 1, "max_batch {}", max_batch);
  const int V = policy.config().vocab_size;
  RlGradientStats stats;
  int64_t total_tokens = 0;
  size_t longest_response = 0;
  for (size_t i = 0; i < rollouts.size(); ++i) {
    const RlRollout& ro = rollouts[i];
    // They come from an actor over RPC, or from the store: a malformed one is an error, never
    // a read past its arrays.
    if (ro.prompt.empty() || ro.actor_logprobs.size() != ro.response.size()) {
      fail("rollout {} of the step has {} prompt tokens, {} response tokens and {} logprobs; "
           "it needs a prompt and one logprob per response token",
           i, ro.prompt.size(), ro.response.size(), ro.actor_logprobs.size());
    }
    total_tokens += int64_t(ro.response.size());
    longest_response = std::max(longest_response, ro.response.size());
  }
  policy.zero_grads();
  if (total_tokens == 0) return stats;

  // One rollout's response rows of the last forward's logits, on the host.
  std::vector<float> rows(longest_response * size_t(V));
  auto response_rows = [&](Transformer<float>& model, const float* logits, size_t r, int T,
                           const RlRollout& ro) {
    const size_t first = r * size_t(T) + ro.prompt.size() - 1;
    model.ops().copy_to_host(rows.data(), logits + first * size_t(V),
                             sizeof(float) * ro.response.size() * size_t(V));
    return rows.data();
  };

  for (size_t chunk = 0; chunk < rollouts.size(); chunk += size_t(max_batch)) {
    const size_t count = std::min(rollouts.size() - chunk, size_t(max_batch));
    const std::span<const RlRollout> part = rollouts.subspan(chunk, count);
    // Inputs are prompt + response without the last token; the target at position t is token
    // t + 1, so response token j is predicted at position prompt_size - 1 + j.
    int T = 0;
    for (const RlRollout& ro : part) {
      T = std::max(T, int(ro.prompt.size() + ro.response.size()) - 1);
    }
    TokenBatch batch;
    batch.batch = int(count);
    batch.seq_len = T;
    batch.tokens.assign(count * size_t(T), pad);
    batch.targets.assign(count * size_t(T), pad);
    batch.weights.assign(count * size_t(T), 0.0f);
    for (size_t r = 0; r < count; ++r) {
      std::vector<int32_t> seq(part[r].prompt.begin(), part[r].prompt.end());
      seq.insert(seq.end(), part[r].response.begin(), part[r].response.end());
      for (size_t t = 0; t + 1 < seq.size(); ++t) {
        batch.tokens[r * size_t(T) + t] = seq[t];
        batch.targets[r * size_t(T) + t] = seq[t + 1];
      }
    }
    // log p under the reference, then under the policy (whose logits stay valid until its
    // next forward, which is the forward_backward below).
    std::vector<double> ref_logp(count * size_t(T), 0.0);
    const float* ref_logits = reference.forward(batch.tokens.data(), int(count), T);
    for (size_t r = 0; r < count; ++r) {
      const RlRollout& ro = part[r];
      if (ro.response.empty()) continue;
      const float* host = response_rows(reference, ref_logits, r, T, ro);
      const size_t first = r * size_t(T) + ro.prompt.size() - 1;
      for (size_t j = 0; j < ro.response.size(); ++j) {
        ref_logp[first + j] =
            token_logprob(std::span<const float>(host + j * size_t(V), size_t(V)),
                          batch.targets[first + j])
                .logprob;
      }
    }
    const float* logits = policy.forward(batch.tokens.data(), int(count), T);
    for (size_t r = 0; r < count; ++r) {
      const RlRollout& ro = part[r];
      if (ro.response.empty()) continue;
      const float* host = response_rows(policy, logits, r, T, ro);
      const size_t first = r * size_t(T) + ro.prompt.size() - 1;
      for (size_t j = 0; j < ro.response.size(); ++j) {
        const size_t pos = first + j;
        const TokenLogprob lp = token_logprob(
            std::span<const float>(host + j * size_t(V), size_t(V)), batch.targets[pos]);
        const RlTokenTerm term = rl_token_term(ro.advantage, lp.logprob, ro.actor_logprobs[j],
                                               ref_logp[pos], objective);
        batch.weights[pos] = float(term.weight / double(total_tokens));
        stats.loss += term.loss / double(total_tokens);
        stats.kl_sum += term.kl;
        stats.entropy_sum += lp.entropy;
        const double mismatch = std::abs(lp.logprob - ro.actor_logprobs[j]);
        stats.mismatch_sum += mismatch;
        stats.mismatch_max = std::max(stats.mismatch_max, mismatch);
        stats.clipped += term.clipped;
        ++stats.tokens;
      }
    }
    policy.forward_backward(batch);
  }
  return stats;
}

}  // namespace rlhf
