#pragma once
// Prompts as JSON lines, one task record per line:
//   {"task": "add", "prompt": "37+85=", "reference": "122"}
// Used to pin an evaluation set, or to bring prompts from elsewhere. Format: docs/tasks.md.
#include <string>
#include <vector>

#include "rollout/task_suite.h"

namespace rlhf {

// Reads every record; blank lines are skipped. Any bad line is an rlhf::Error naming
// "file:line" and the problem (not JSON, not an object, missing or unknown key, a value that is
// not a string, unknown task). With `validate_with`, each record must also be well formed for its
// family: the prompt parses and the reference agrees with it.
std::vector<TaskExample> read_prompts_jsonl(const std::string& path,
                                            const TaskSuite* validate_with);

// Writes atomically: a temporary file beside `path`, flushed to disk, then renamed over it, so a
// reader sees the old file or the new one, never half of one. Throws rlhf::Error on I/O failure.
void write_prompts_jsonl(const std::string& path, const std::vector<TaskExample>& examples);

}  // namespace rlhf
