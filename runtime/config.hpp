// model.yaml: what `cluster serve` deploys (model, limits, HTTP endpoint, parallel layout, device).
// Parsed by the serve command; the head's placement checks tensor x pipeline against the model.
// Parsing reads the file and blocks on that I/O only. Every error names the key, and the
// line/column where YAML knows it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/error.hpp"

namespace troupe {

// parallel: in model.yaml: how many ranks of each kind (engine/backend/shard.hpp has the per-rank
// layout).
struct parallel_size {
  int32_t tensor = 1;
  int32_t pipeline = 1;
  int32_t replicas = 1;
  // MoE models: the tensor ranks form `expert` groups, each holding whole experts and slicing
  // them over its tensor/expert ranks; 0 = tensor (whole experts on every rank).
  int32_t expert = 0;
};

// http: in model.yaml: the HTTP front end's pool and connection limits, each with a clear HTTP
// answer when exceeded (http/http_server.hpp enforces them).
struct http_limits {
  int32_t threads = 2;                        // io_context threads for every connection
  int32_t max_connections = 4096;             // open connections; beyond: 503, then close
  uint32_t max_header_bytes = 16 * 1024;      // request line + headers; beyond: 431
  uint64_t max_body_bytes = 16 * 1024 * 1024; // beyond: 413, before the body is read
  double read_timeout_s = 30;                 // one request, first byte to last; beyond: 408
  double idle_timeout_s = 75;  // a keep-alive connection between requests; beyond: closed
  double write_timeout_s = 30; // one write making no progress (a client not reading): closed
};

// disaggregation: in model.yaml: prefill/decode groups (xPyD, design.md §6). Each group has its
// own parallel sizes and KV block size; the prompt's KV moves from a prefill replica to a decode
// replica over `provider`, within `timeout_s`.
struct kv_group {
  parallel_size parallel;
  int32_t block_size = 0; // 0 = the deployment's block_size
};
struct disaggregation_config {
  bool enabled = false; // the section is present
  kv_group prefill, decode;
  std::string provider = "auto"; // auto | local | tcp | verbs | efa | socket
  double timeout_s = 10;         // a handoff's deadline, from the decode side's reservation
  // Prompts with fewer tokens not in the decode replica's prefix cache than this are prefilled
  // on the decode replica (no handoff); 0 = always hand off.
  int32_t min_prefill_tokens = 0;
  // When the prefill side or the transfer fails: prefill on the decode replica ("decode") or
  // end the request with the error ("fail").
  std::string on_prefill_failure = "decode";
  // KV moved through host memory: auto (when the provider cannot register the GPU memory the KV
  // is in) | always | never (refuse such a provider); room for this many tokens per rank and
  // side (0 = twice max_model_len). Handoffs wait for room; prompts larger than it are prefilled
  // on the decode replica.
  std::string staging = "auto";
  int32_t staging_tokens = 0;
};

struct deployment_config {
  std::string model;             // HF folder or .gguf file (required)
  std::string served_model_name; // the API's model name; default: model path's stem
  std::string dtype = "auto";    // auto | float32 | bfloat16 | float16
  std::string device = "auto";   // auto (cuda where a usable GPU is, else cpu) | cpu | cuda
  int32_t max_model_len =
      0; // context limit; 0 = the model's max_position_embeddings, capped at 4096
  int32_t max_num_seqs = 64;
  int32_t max_num_batched_tokens = 2048;
  int32_t max_waiting = 1024;          // queued requests beyond this get 503
  double gpu_memory_utilization = 0.9; // (0, 1]: share of GPU memory for weights + KV (cuda)
  int32_t block_size = 16;             // KV block size in tokens
  int32_t num_kv_blocks = 0;           // 0 = derived: max_num_seqs full contexts, capped (cpu)
  bool prefix_caching = true;
  uint64_t seed = 0; // seeds requests that bring none
  std::string host = "127.0.0.1";
  int32_t port = 8000;              // 0 = any free port (printed)
  std::string api_key;              // non-empty: every route needs "Authorization: Bearer <key>"
  bool open_health_metrics = false; // with api_key: /health and /metrics answer without it
  double log_stats_interval_s = 10; // the serving stats log line every this many s; 0: none
  parallel_size parallel;
  http_limits http;
  disaggregation_config disaggregation;
};

// One group of a deployment's replicas: its sizes and KV block size, and its part in
// prefill/decode disaggregation ("" when the deployment is not disaggregated).
struct replica_group {
  std::string role; // "" | "decode" | "prefill"
  parallel_size parallel;
  int32_t block_size = 16;
};
// The groups of `c` in replica order: `parallel` alone, or the decode group then the prefill
// group (replicas [0, decode.replicas) decode, the rest prefill).
std::vector<replica_group> replica_groups(const deployment_config& c);
// The index of replica `replica`'s group in `groups` (the last group past the end).
size_t group_index(const std::vector<replica_group>& groups, int32_t replica);

// The valid top-level keys, in documentation order.
const std::vector<std::string_view>& deployment_keys();

// Parses YAML text; `what` names the source in errors (e.g. the file path). Unknown keys are
// rejected naming the closest valid key; values are range-checked (layouts are checked against
// the model by the head's placement; `--block` serves one replica of one rank only).
expected<deployment_config> parse_deployment(std::string_view yaml_text, std::string_view what);
expected<deployment_config> load_deployment(const std::filesystem::path& file);

// Levenshtein distance, for "did you mean" suggestions.
size_t edit_distance(std::string_view a, std::string_view b);

} // namespace troupe
