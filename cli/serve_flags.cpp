#include "cli/serve_flags.hpp"

#include <algorithm>

#include "cli/cluster_commands.hpp"

namespace troupe::cli {

namespace {

struct flag_spec {
  const char* key;     // model.yaml key, "section.key" for nested ones
  const char* aliases; // CLI11 names besides --KEY-WITH-DASHES and --KEY_WITH_UNDERSCORES
  const char* help;
};

// In model.yaml's documentation order (README: model.yaml).
const flag_spec specs[] = {
    {"served_model_name", "", "The name clients send as `model`"},
    {"dtype", "", "auto | float32 | bfloat16 | float16"},
    {"device", "", "auto (cuda where a usable GPU is, else cpu) | cpu | cuda"},
    {"max_model_len", "", "Context limit (prompt + output) in tokens"},
    {"max_num_seqs", "", "Sequences running in one batch"},
    {"max_num_batched_tokens", "", "Tokens fed per engine step"},
    {"max_waiting", "", "Queued requests per replica; beyond them 503"},
    {"gpu_memory_utilization", "", "Share of GPU memory for weights, workspace and KV cache"},
    {"block_size", "", "KV cache block size in tokens"},
    {"num_kv_blocks", "--num-gpu-blocks-override", "KV pool size in blocks (0: derived)"},
    {"prefix_caching", "", "true | false: reuse the KV blocks of shared prompt prefixes"},
    {"seed", "", "Seed for requests that bring none"},
    {"host", "", "HTTP listen address"},
    {"port", "", "HTTP port (0: any free port)"},
    {"api_key", "", "Every route but the open ones needs Authorization: Bearer KEY"},
    {"open_health_metrics", "", "true | false: /health and /metrics without the API key"},
    {"log_stats_interval_s", "", "Seconds between serving stats log lines (0: none)"},
    {"parallel.tensor", "--tensor-parallel-size", "Tensor ranks per pipeline stage"},
    {"parallel.pipeline", "--pipeline-parallel-size", "Pipeline stages per replica"},
    {"parallel.replicas", "--data-parallel-size", "Independent replicas behind the endpoint"},
    {"parallel.expert", "--expert-parallel-size",
     "MoE: expert groups among the tensor ranks, each holding whole experts (0: tensor)"},
    {"http.threads", "", "HTTP io threads"},
    {"http.max_connections", "", "Open HTTP connections; beyond them 503"},
    {"http.max_header_bytes", "", "Request line + headers; beyond them 431"},
    {"http.max_body_bytes", "", "Request body; beyond it 413"},
    {"http.read_timeout_s", "", "Seconds to receive one request; beyond them 408"},
    {"http.idle_timeout_s", "", "Seconds an idle keep-alive connection stays open"},
    {"http.write_timeout_s", "", "Seconds a write may make no progress"},
};

// "parallel.tensor" -> "tensor", "http.threads" -> "http-threads", else the key itself.
std::string flag_stem(std::string key) {
  if (key.rfind("parallel.", 0) == 0)
    key = key.substr(9);
  std::replace(key.begin(), key.end(), '.', '_');
  return key;
}

std::string dashes(std::string s) {
  std::replace(s.begin(), s.end(), '_', '-');
  return s;
}

} // namespace

void add_deployment_flags(CLI::App* cmd, deployment_flags& flags) {
  for (const auto& s : specs) {
    const std::string stem = flag_stem(s.key);
    std::string names = "--" + dashes(stem);
    if (stem.find('_') != std::string::npos)
      names += ",--" + stem;
    if (*s.aliases)
      names += std::string(",") + s.aliases;
    auto& slot = flags.values[s.key];
    auto* opt = cmd->add_option(names, slot, std::string(s.help) + " (model.yaml: " + s.key + ")");
    if (std::string(s.key) == "api_key")
      add_secret_file_option(cmd, "api-key", slot);
    if (std::string(s.key) == "parallel.expert")
      cmd->add_flag("--enable-expert-parallel", flags.enable_expert_parallel,
                    "MoE: whole experts on every tensor rank (same as --expert-parallel-size 0)")
          ->excludes(opt);
  }
  auto* on = cmd->add_flag("--enable-prefix-caching", flags.enable_prefix_caching,
                           "Same as --prefix-caching true");
  auto* off = cmd->add_flag("--no-enable-prefix-caching", flags.no_enable_prefix_caching,
                            "Same as --prefix-caching false");
  on->excludes(off);
}

std::vector<deployment_flags::override> deployment_flags::given() const {
  std::vector<override> out;
  for (const auto& s : specs) {
    auto it = values.find(s.key);
    if (it != values.end() && it->second)
      out.push_back({s.key, *it->second, "--" + dashes(flag_stem(s.key))});
  }
  if (enable_prefix_caching)
    out.push_back({"prefix_caching", "true", "--enable-prefix-caching"});
  if (no_enable_prefix_caching)
    out.push_back({"prefix_caching", "false", "--no-enable-prefix-caching"});
  if (enable_expert_parallel)
    out.push_back({"parallel.expert", "0", "--enable-expert-parallel"});
  return out;
}

} // namespace troupe::cli
