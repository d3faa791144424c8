// rlhf generate: sample responses from a checkpoint, for prompts given on the command line or
// in a JSONL file ({"task", "prompt", "reference"} per line; graded when a reference is given).
#include <iostream>

#include <fmt/core.h>

#include "common/error.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/checkpoint.h"
#include "model/generate.h"
#include "model/tokenizer.h"
#include "rollout/prompt_jsonl.h"
#include "rollout/task_suite.h"
#include "tools/cli.h"

namespace rlhf::cli {

void register_generate(CLI::App& app) {
  struct Options {
    CommonOptions common;
    std::string checkpoint;
    std::vector<std::string> prompts;
    std::string prompts_file;
    double temperature = 0.0;
    int top_k = 0;
    double top_p = 1.0;
    int max_new_tokens = 24;
    uint64_t seed = 0;
    int batch = 32;
    std::string device = "cpu";
    int threads = 0;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("generate", "sample responses from a checkpoint");
  cmd->add_flag("--json", o->common.json, "print a machine-readable summary as the last line");
  cmd->add_option("--checkpoint", o->checkpoint, "policy checkpoint (.safetensors)")->required();
  cmd->add_option("--prompt", o->prompts, "a prompt (repeatable)");
  cmd->add_option("--prompts-file", o->prompts_file, "JSONL file of {task, prompt, reference}");
  cmd->add_option("--temperature", o->temperature, "0 = greedy (default)");
  cmd->add_option("--top-k", o->top_k, "keep the k most likely tokens (0 = off)");
  cmd->add_option("--top-p", o->top_p, "nucleus sampling mass (1 = off)");
  cmd->add_option("--max-new-tokens", o->max_new_tokens, "tokens to generate at most");
  cmd->add_option("--seed", o->seed, "sampling seed");
  cmd->add_option("--batch", o->batch, "prompts decoded together")->check(CLI::PositiveNumber);
  add_device_option(*cmd, o->device);
  cmd->add_option("--threads", o->threads, "CPU threads (0 = every core)");
  cmd->callback([o] {
    if (o->prompts.empty() && o->prompts_file.empty()) {
      fail("give at least one --prompt or a --prompts-file");
    }
    cpu_set_threads(o->threads);
    const CheckpointContents info = checkpoint_read_info(o->checkpoint);
    const auto tokenizer = make_tokenizer(info.tokenizer);
    const std::unique_ptr<Ops<float>> ops = make_float_ops(o->device);
    // A packed policy decodes directly on its FP4 experts.
    const auto loaded = checkpoint_load_model(o->checkpoint, *ops, o->batch);
    Transformer<float>& model = *loaded;

    std::vector<TaskExample> examples;
    for (const auto& p : o->prompts) examples.push_back(TaskExample{"", p, ""});
    const TaskSuite suite{TaskSuiteConfig{}};
    if (!o->prompts_file.empty()) {
      for (auto& e : read_prompts_jsonl(o->prompts_file, &suite)) examples.push_back(e);
    }
    SamplingParams params;
    params.temperature = o->temperature;
    params.top_k = o->top_k;
    params.top_p = o->top_p;
    params.max_new_tokens = o->max_new_tokens;
    params.seed = o->seed;
    params.validate();
    std::vector<std::string> prompts;
    for (const auto& e : examples) prompts.push_back(e.prompt);
    Generator generator(model, *tokenizer, o->batch);
    const std::vector<Generation> outputs = generator.generate_text(prompts, params);

    nlohmann::json results = nlohmann::json::array();
    double score_sum = 0;
    int graded = 0;
    for (size_t i = 0; i < outputs.size(); ++i) {
      const Generation& g = outputs[i];
      double mean_logprob = 0;
      for (float lp : g.logprobs) mean_logprob += lp / double(std::max<size_t>(1, g.logprobs.size()));
      nlohmann::json row = {{"prompt", examples[i].prompt},
                            {"response", g.text},
                            {"tokens", g.tokens.size()},
                            {"finished", g.finished},
                            {"mean_logprob", mean_logprob}};
      std::string grade_text;
      if (!examples[i].reference.empty()) {
        const Grade grade = suite.grade(examples[i], g.text);
        row["score"] = grade.score;
        score_sum += grade.score;
        ++graded;
        grade_text = fmt::format("  [{:g}/10: {}]", grade.score, grade.reason);
      }
      std::cout << fmt::format("{} -> {}{}\n", examples[i].prompt, g.text, grade_text);
      results.push_back(row);
    }
    nlohmann::json summary = {{"command", "generate"}, {"results", results}};
    if (graded) summary["mean_score"] = score_sum / graded;
    print_json(o->common, summary);
  });
}

}  // namespace rlhf::cli
