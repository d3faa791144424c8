// rlhf logits: the model's full-sequence logits for fixed token sequences, written as JSON, so
// another implementation of the architecture (tools/torch_reference/) can check its own
// against ours. Sequences come from a JSONL file, one object per line:
//   {"tokens": [256, 259, ...]}           raw token ids, used as given
//   {"prompt": "12+3=", "response": "15"}  format_example (the training layout, eos included)
//   {"prompt": "12+3="}                     format_prompt (what generation starts from)
// Each sequence runs alone (batch 1, no KV cache, no padding) through Transformer::forward.
#include <fstream>
#include <iostream>

#include <fmt/core.h>

#include "common/error.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/checkpoint.h"
#include "model/generate.h"
#include "model/tokenizer.h"
#include "tools/cli.h"

namespace rlhf::cli {

namespace {

std::vector<int32_t> sequence_from_record(const nlohmann::json& record, const Tokenizer& tokenizer,
                                          const std::string& where) {
  if (!record.is_object()) fail("{}: expected a JSON object", where);
  if (record.contains("tokens")) {
    if (record.contains("prompt") || record.contains("response")) {
      fail("{}: give either \"tokens\" or \"prompt\" (with an optional \"response\"), not both",
           where);
    }
    std::vector<int32_t> tokens;
    for (const auto& id : record.at("tokens")) {
      if (!id.is_number_integer()) fail("{}: \"tokens\" must be an array of integers", where);
      tokens.push_back(id.get<int32_t>());
    }
    return tokens;
  }
  if (!record.contains("prompt") || !record.at("prompt").is_string()) {
    fail("{}: needs \"tokens\" or a string \"prompt\"", where);
  }
  const std::string prompt = record.at("prompt").get<std::string>();
  if (!record.contains("response")) return format_prompt(tokenizer, prompt);
  if (!record.at("response").is_string()) fail("{}: \"response\" must be a string", where);
  return format_example(tokenizer, prompt, record.at("response").get<std::string>()).tokens;
}

std::vector<std::vector<int32_t>> read_sequences(const std::string& path,
                                                 const Tokenizer& tokenizer, int vocab,
                                                 int max_seq_len) {
  std::ifstream in(path);
  if (!in) fail("sequences file '{}' cannot be read", path);
  std::vector<std::vector<int32_t>> sequences;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = fmt::format("{}:{}", path, number);
    nlohmann::json record;
    try {
      record = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      fail("{}: not valid JSON ({})", where, e.what());
    }
    std::vector<int32_t> tokens = sequence_from_record(record, tokenizer, where);
    if (tokens.empty() || int(tokens.size()) > max_seq_len) {
      fail("{}: the sequence has {} tokens; the model takes 1 to {}", where, tokens.size(),
           max_seq_len);
    }
    for (int32_t id : tokens) {
      if (id < 0 || id >= vocab) {
        fail("{}: token {} is outside the vocabulary 0..{}", where, id, vocab - 1);
      }
    }
    sequences.push_back(std::move(tokens));
  }
  if (sequences.empty()) fail("sequences file '{}' holds no sequence", path);
  return sequences;
}

}  // namespace

void register_logits(CLI::App& app) {
  struct Options {
    CommonOptions common;
    std::string checkpoint;
    std::string sequences;
    std::string out;
    std::string device = "cpu";
    int threads = 0;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "logits", "write the model's logits for fixed sequences as JSON (for parity checks)");
  cmd->add_flag("--json", o->common.json, "print a machine-readable summary as the last line");
  cmd->add_option("--checkpoint", o->checkpoint, "checkpoint (.safetensors)")->required();
  cmd->add_option("--sequences", o->sequences,
                  "JSONL: {\"tokens\": [...]} or {\"prompt\", \"response\"?} per line")
      ->required();
  cmd->add_option("--out", o->out, "JSON file to write")->required();
  add_device_option(*cmd, o->device);
  cmd->add_option("--threads", o->threads, "CPU threads (0 = every core)");
  cmd->callback([o] {
    cpu_set_threads(o->threads);
    const CheckpointContents info = checkpoint_read_info(o->checkpoint);
    const auto tokenizer = make_tokenizer(info.tokenizer);
    const int V = info.config.vocab_size;
    const auto sequences =
        read_sequences(o->sequences, *tokenizer, V, info.config.max_seq_len);
    const std::unique_ptr<Ops<float>> ops = make_float_ops(o->device);
    const auto model = checkpoint_load_model(o->checkpoint, *ops, 1);

    nlohmann::json rows = nlohmann::json::array();
    for (const std::vector<int32_t>& tokens : sequences) {
      const int T = int(tokens.size());
      RoutingTrace routing;
      const float* logits = model->forward(tokens.data(), 1, T, nullptr, nullptr, &routing);
      // logprobs[i] = log softmax(logits[i])[tokens[i+1]], through the backend's
      // log_softmax_gather.
      const std::vector<float> logprobs = gather_logprobs(
          *ops, logits, std::span<const int32_t>(tokens).subspan(1), V);
      // The logits are in the backend's memory: one copy of all T rows.
      std::vector<float> host_logits(size_t(T) * V);
      ops->copy_to_host(host_logits.data(), logits, sizeof(float) * host_logits.size());
      nlohmann::json logit_rows = nlohmann::json::array();
      for (int t = 0; t < T; ++t) {
        const float* row = host_logits.data() + size_t(t) * V;
        logit_rows.push_back(std::vector<float>(row, row + V));
      }
      // [moe layer][position][k]: the experts our forward chose, so a mismatch in the other
      // implementation can be told apart as a routing flip rather than an arithmetic error.
      nlohmann::json experts = nlohmann::json::array();
      for (int m = 0; m < routing.n_layers; ++m) {
        const int32_t* ids = routing.layer(m);
        nlohmann::json layer = nlohmann::json::array();
        for (int t = 0; t < T; ++t) {
          layer.push_back(std::vector<int32_t>(ids + size_t(t) * routing.top_k,
                                               ids + size_t(t + 1) * routing.top_k));
        }
        experts.push_back(layer);
      }
      rows.push_back({{"tokens", tokens},
                      {"logits", logit_rows},
                      {"logprobs", logprobs},
                      {"expert_ids", experts}});
    }
    const nlohmann::json file = {{"checkpoint", o->checkpoint},
                                 {"vocab_size", V},
                                 {"n_moe_layers", info.config.n_moe_layers()},
                                 {"top_k", info.config.top_k},
                                 {"sequences", rows}};
    std::ofstream out(o->out);
    if (!out) fail("cannot write '{}'", o->out);
    out << file.dump() << "\n";
    if (!out.flush()) fail("writing '{}' failed", o->out);
    std::cout << fmt::format("{}: logits of {} sequences -> {}\n", o->checkpoint,
                             sequences.size(), o->out);
    print_json(o->common, {{"command", "logits"},
                           {"checkpoint", o->checkpoint},
                           {"sequences", sequences.size()},
                           {"out", o->out}});
  });
}

}  // namespace rlhf::cli
