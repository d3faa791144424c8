#include "learner/run_config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/error.h"
#include "common/yaml_reader.h"
#include "model/tokenizer.h"
#include "reward/judge_format.h"

namespace rlhf {

namespace fs = std::filesystem;

namespace {

SftConfig read_sft(YamlSection& s) {
  SftConfig c;
  c.steps = s.get("steps", c.steps);
  c.batch_size = s.get("batch_size", c.batch_size);
  c.seed = s.get("seed", c.seed);
  c.eval_examples = s.get("eval_examples", c.eval_examples);
  c.eval_batch = s.get("eval_batch", c.eval_batch);
  c.checkpoint_every = s.get("checkpoint_every", c.checkpoint_every);
  c.length_buckets = s.get("length_buckets", c.length_buckets);
  YamlSection opt = s.section("optimizer");
  c.optimizer = OptimizerConfig::read(opt);
  s.finish();
  if (c.steps < 1) fail("{}: must be >= 1, got {}", s.key_path("steps"), c.steps);
  if (c.batch_size < 1) fail("{}: must be >= 1, got {}", s.key_path("batch_size"), c.batch_size);
  if (c.length_buckets < 1 || c.length_buckets > c.batch_size) {
    fail("{}: must be in 1..batch_size ({}), got {}", s.key_path("length_buckets"), c.batch_size,
         c.length_buckets);
  }
  if (c.eval_examples < 1) {
    fail("{}: must be >= 1, got {}", s.key_path("eval_examples"), c.eval_examples);
  }
  if (c.eval_batch < 1) fail("{}: must be >= 1, got {}", s.key_path("eval_batch"), c.eval_batch);
  if (c.checkpoint_every < 1) {
    fail("{}: must be >= 1, got {}", s.key_path("checkpoint_every"), c.checkpoint_every);
  }
  return c;
}

SamplingConfig read_sampling(YamlSection& s) {
  SamplingConfig c;
  c.temperature = s.get("temperature", c.temperature);
  c.top_k = s.get("top_k", c.top_k);
  c.top_p = s.get("top_p", c.top_p);
  c.max_new_tokens = s.get("max_new_tokens", c.max_new_tokens);
  c.seed = s.get("seed", c.seed);
  s.finish();
  if (!(c.temperature >= 0) || !std::isfinite(c.temperature)) {
    fail("{}: must be >= 0 (0 is greedy), got {}", s.key_path("temperature"), c.temperature);
  }
  if (c.top_k < 0) fail("{}: must be >= 0 (0 is off), got {}", s.key_path("top_k"), c.top_k);
  if (!(c.top_p > 0 && c.top_p <= 1)) fail("{}: must be in (0, 1], got {}", s.key_path("top_p"), c.top_p);
  if (c.max_new_tokens < 1) {
    fail("{}: must be >= 1, got {}", s.key_path("max_new_tokens"), c.max_new_tokens);
  }
  return c;
}

Fp4TrainConfig read_fp4(YamlSection& s, int64_t steps) {
  Fp4TrainConfig c;
  const std::string format = s.get<std::string>("format", "mxfp4");
  try {
    c.format = fp4_format_from_name(format);
  } catch (const Error& e) {
    fail("{}: {}", s.key_path("format"), e.what());
  }
  c.qat_start_step = s.get("qat_start_step", c.qat_start_step);
  const std::string ste = s.get<std::string>("ste", "plain");
  s.finish();
  if (ste != "plain" && ste != "clipped") {
    fail("{}: must be plain or clipped, got '{}'", s.key_path("ste"), ste);
  }
  c.clipped_ste = ste == "clipped";
  if (c.qat_start_step < -1 || c.qat_start_step >= steps) {
    fail("{}: must be -1 (off) or a step in 0..{} (sft.steps - 1), got {}",
         s.key_path("qat_start_step"), steps - 1, c.qat_start_step);
  }
  return c;
}

GrmConfig read_grm(YamlSection& s) {
  GrmConfig c;
  c.policy = s.get("policy", c.policy);
  c.data = s.get("data", c.data);
  c.prompts = s.get("prompts", c.prompts);
  c.policy_samples = s.get("policy_samples", c.policy_samples);
  c.pairwise_fraction = s.get("pairwise_fraction", c.pairwise_fraction);
  c.pairs_per_prompt = s.get("pairs_per_prompt", c.pairs_per_prompt);
  c.corrupted_per_prompt = s.get("corrupted_per_prompt", c.corrupted_per_prompt);
  c.mirror_pairs = s.get("mirror_pairs", c.mirror_pairs);
  c.tie_pair_fraction = s.get("tie_pair_fraction", c.tie_pair_fraction);
  c.judge_fraction = s.get("judge_fraction", c.judge_fraction);
  c.reasoning = s.get("reasoning", c.reasoning);
  c.with_reference = s.get("with_reference", c.with_reference);
  c.position_marks = s.get("position_marks", c.position_marks);
  c.aligned_marks = s.get("aligned_marks", c.aligned_marks);
  c.quote_response = s.get("quote_response", c.quote_response);
  c.prompt_labels = s.get("prompt_labels", c.prompt_labels);
  c.columns = s.get("columns", c.columns);
  c.tagged = s.get("tagged", c.tagged);
  c.split_pairs = s.get("split_pairs", c.split_pairs);
  c.scrambled_per_prompt = s.get("scrambled_per_prompt", c.scrambled_per_prompt);
  c.swapped_per_prompt = s.get("swapped_per_prompt", c.swapped_per_prompt);
  c.seed = s.get("seed", c.seed);
  s.finish();
  if (c.prompts < 1) fail("{}: must be >= 1, got {}", s.key_path("prompts"), c.prompts);
  if (c.policy_samples < 0 || c.policy_samples > 16) {
    fail("{}: must be in 0..16, got {}", s.key_path("policy_samples"), c.policy_samples);
  }
  if (!(c.tie_pair_fraction >= 0 && c.tie_pair_fraction <= 1)) {
    fail("{}: must be in [0, 1], got {}", s.key_path("tie_pair_fraction"), c.tie_pair_fraction);
  }
  if (c.pairs_per_prompt < 1 || c.pairs_per_prompt > 8) {
    fail("{}: must be in 1..8, got {}", s.key_path("pairs_per_prompt"), c.pairs_per_prompt);
  }
  if (c.corrupted_per_prompt < 0 || c.corrupted_per_prompt > 8) {
    fail("{}: must be in 0..8, got {}", s.key_path("corrupted_per_prompt"),
         c.corrupted_per_prompt);
  }
  if (!(c.pairwise_fraction >= 0 && c.pairwise_fraction <= 1)) {
    fail("{}: must be in [0, 1], got {}", s.key_path("pairwise_fraction"), c.pairwise_fraction);
  }
  if (!(c.judge_fraction > 0 && c.judge_fraction <= 1)) {
    fail("{}: must be in (0, 1], got {}", s.key_path("judge_fraction"), c.judge_fraction);
  }
  if (c.aligned_marks && c.position_marks) {
    fail("{}: two reasoning styles; turn off {}", s.key_path("aligned_marks"),
         s.key_path("position_marks"));
  }
  if (c.prompt_labels && !c.quote_response) {
    fail("{}: only with quoted responses; turn on {}", s.key_path("prompt_labels"),
         s.key_path("quote_response"));
  }
  if (c.quote_response && !c.aligned_marks) {
    fail("{}: only with the aligned reasoning; turn on {}", s.key_path("quote_response"),
         s.key_path("aligned_marks"));
  }
  if (c.columns != 0) {
    if (c.columns < 4 || c.columns > kMaxJudgeColumns) {
      fail("{}: must be 0 (off) or in 4..{}, got {}", s.key_path("columns"), kMaxJudgeColumns,
           c.columns);
    }
    if (!c.with_reference) {
      fail("{}: the column layout lines answers up with the reference; turn on {}",
           s.key_path("columns"), s.key_path("with_reference"));
    }
    if (c.aligned_marks || c.position_marks) {
      fail("{}: two reasoning styles; turn off {} and {}", s.key_path("columns"),
           s.key_path("aligned_marks"), s.key_path("position_marks"));
    }
  }
  if (c.scrambled_per_prompt < 0 || c.scrambled_per_prompt > 8) {
    fail("{}: must be in 0..8, got {}", s.key_path("scrambled_per_prompt"),
         c.scrambled_per_prompt);
  }
  if (c.swapped_per_prompt < 0 || c.swapped_per_prompt > 8) {
    fail("{}: must be in 0..8, got {}", s.key_path("swapped_per_prompt"), c.swapped_per_prompt);
  }
  if (c.tagged) {
    if (!c.with_reference) {
      fail("{}: the tagged layout lines answers up with the reference; turn on {}",
           s.key_path("tagged"), s.key_path("with_reference"));
    }
    if (c.aligned_marks || c.position_marks || c.columns != 0) {
      fail("{}: two reasoning styles; turn off {}, {} and {}", s.key_path("tagged"),
           s.key_path("aligned_marks"), s.key_path("position_marks"), s.key_path("columns"));
    }
  } else if (c.split_pairs) {
    fail("{}: the split pair layout is a form of the tagged layout; turn on {}",
         s.key_path("split_pairs"), s.key_path("tagged"));
  }
  if (c.split_pairs && !c.reasoning) {
    fail("{}: a split pair judgment is the reasoning about each side in turn; without reasoning "
         "({} false) turn it off",
         s.key_path("split_pairs"), s.key_path("reasoning"));
  }
  return c;
}

RlConfig read_rl(YamlSection& s) {
  RlConfig c;
  c.policy = s.get("policy", c.policy);
  c.judge = s.get("judge", c.judge);
  c.steps = s.get("steps", c.steps);
  c.prompts_per_step = s.get("prompts_per_step", c.prompts_per_step);
  c.samples_per_prompt = s.get("samples_per_prompt", c.samples_per_prompt);
  c.reward = s.get("reward", c.reward);
  c.judge_rollouts = s.get("judge_rollouts", c.judge_rollouts);
  c.judge_k = s.get("judge_k", c.judge_k);
  c.judge_temperature = s.get("judge_temperature", c.judge_temperature);
  c.judge_with_reference = s.get("judge_with_reference", c.judge_with_reference);
  c.objective.clip_eps = s.get("clip_eps", c.objective.clip_eps);
  c.objective.tis_cap = s.get("tis_cap", c.objective.tis_cap);
  c.objective.kl_coef = s.get("kl_coef", c.objective.kl_coef);
  c.objective.adv_eps = s.get("adv_eps", c.objective.adv_eps);
  c.max_lag = s.get("max_lag", c.max_lag);
  c.checkpoint_every = s.get("checkpoint_every", c.checkpoint_every);
  c.eval_examples = s.get("eval_examples", c.eval_examples);
  c.seed = s.get("seed", c.seed);
  // RL fine-tunes a trained policy: a small constant rate, no warmup to speak of.
  c.optimizer.lr = 2e-4;
  c.optimizer.warmup_steps = 5;
  c.optimizer.min_lr_ratio = 1.0;
  c.optimizer.weight_decay = 0.0;
  YamlSection optimizer = s.section("optimizer");
  c.optimizer = OptimizerConfig::read(optimizer, c.optimizer);
  s.finish();
  auto positive = [&](const char* key, int64_t value, int64_t max) {
    if (value < 1 || value > max) fail("{}: must be in 1..{}, got {}", s.key_path(key), max, value);
  };
  positive("steps", c.steps, 1000000);
  positive("prompts_per_step", c.prompts_per_step, 4096);
  positive("samples_per_prompt", c.samples_per_prompt, 64);
  positive("judge_k", c.judge_k, 32);
  positive("checkpoint_every", c.checkpoint_every, 1000000);
  positive("eval_examples", c.eval_examples, 1000000);
  if (c.samples_per_prompt < 2)
    fail("{}: GRPO compares samples of one prompt, so it needs >= 2, got {}",
         s.key_path("samples_per_prompt"), c.samples_per_prompt);
  if (c.reward != "judge" && c.reward != "ground_truth")
    fail("{}: must be judge or ground_truth, got '{}'", s.key_path("reward"), c.reward);
  if (!(c.judge_temperature >= 0) || !std::isfinite(c.judge_temperature))
    fail("{}: must be finite and >= 0, got {}", s.key_path("judge_temperature"), c.judge_temperature);
  if (c.max_lag < 0) fail("{}: must be >= 0, got {}", s.key_path("max_lag"), c.max_lag);
  c.objective.validate(s.path());
  return c;
}

RunConfig read_run(const YAML::Node& root, std::string source) {
  YamlSection top(root, "");
  RunConfig run;
  YamlSection model = top.section("model");
  run.model = ModelConfig::read(model);
  YamlSection tasks = top.section("tasks");
  run.tasks = TaskSuiteConfig::read(tasks);
  YamlSection sft = top.section("sft");
  run.sft = read_sft(sft);
  YamlSection sampling = top.section("sampling");
  run.sampling = read_sampling(sampling);
  YamlSection fp4 = top.section("fp4");
  run.fp4 = read_fp4(fp4, run.sft.steps);
  YamlSection stability = top.section("stability");
  run.stability = StabilityConfig::read(stability);
  YamlSection grm = top.section("grm");
  run.grm = read_grm(grm);
  YamlSection rl = top.section("rl");
  run.rl = read_rl(rl);
  YamlSection runtime = top.section("runtime");
  run.runtime.threads = runtime.get("threads", run.runtime.threads);
  run.runtime.device = runtime.get("device", run.runtime.device);
  runtime.finish();
  if (run.runtime.threads < 0) fail("runtime.threads: must be >= 0 (0 is every core)");
  if (run.runtime.device != "cpu" && run.runtime.device != "cuda")
    fail("runtime.device: '{}' is not a backend (cpu or cuda)", run.runtime.device);
  YamlSection demo = top.section("demo");
  run.demo.grm_config = demo.get("grm_config", run.demo.grm_config);
  run.demo.rl_config = demo.get("rl_config", run.demo.rl_config);
  demo.finish();
  top.finish();
  const auto tokenizer = make_tokenizer(run.model.tokenizer);
  model_config_set_vocab(run.model, *tokenizer);
  run.model.validate();
  run.source = std::move(source);
  return run;
}

}  // namespace

RunConfig RunConfig::load_file(const std::string& path) {
  const YAML::Node root = yaml_load_file(path);
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  try {
    RunConfig run = read_run(root, text.str());
    // Stage configs named relative to this file, so `--config configs/demo-gpu.yaml` works from
    // any working directory.
    const fs::path dir = fs::path(path).parent_path();
    for (std::string* stage : {&run.demo.grm_config, &run.demo.rl_config}) {
      if (!stage->empty() && fs::path(*stage).is_relative()) *stage = (dir / *stage).string();
    }
    return run;
  } catch (const Error& e) {
    fail("config '{}': {}", path, e.what());
  }
}

RunConfig RunConfig::load_string(const std::string& yaml, const std::string& what) {
  try {
    return read_run(yaml_load_string(yaml, what), yaml);
  } catch (const Error& e) {
    fail("{}: {}", what, e.what());
  }
}

}  // namespace rlhf
