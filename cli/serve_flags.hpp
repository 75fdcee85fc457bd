// `cluster serve` flags that override model.yaml keys: each key under its own name with dashes
// (`--max-num-seqs`) or underscores (`--max_num_seqs`), and vLLM's spelling where it means the
// same (`--tensor-parallel-size`, `--num-gpu-blocks-override`, `--enable-prefix-caching`, ...).
#pragma once

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

namespace troupe::cli {

struct deployment_flags {
  // model.yaml key ("max_num_seqs", "parallel.tensor", "http.threads") -> the flag's value text.
  std::map<std::string, std::optional<std::string>> values;
  bool enable_prefix_caching = false, no_enable_prefix_caching = false;
  bool enable_expert_parallel = false; // vLLM's flag: parallel.expert = 0 (tensor)

  // The keys given, with their values and the flag that set them (for error messages).
  struct override {
    std::string key, value, flag;
  };
  std::vector<override> given() const;
};

// Registers every flag on `cmd`; `flags` must outlive parsing.
void add_deployment_flags(CLI::App* cmd, deployment_flags& flags);

} // namespace troupe::cli
