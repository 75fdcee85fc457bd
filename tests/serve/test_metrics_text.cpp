// /metrics text (http/metrics.hpp) and the JSON log format (runtime/log.hpp) without a server:
// every sample labelled model_name, both names of a family, what one request record adds.
#include <sstream>

#include <doctest/doctest.h>

#include "http/metrics.hpp"
#include "runtime/log.hpp"

using namespace troupe;
using namespace troupe::serve;

namespace {

// The value of the sample line that starts with `prefix` ("name{labels}"), or -1.
double sample(const std::string& text, const std::string& prefix) {
  const auto at = text.find("\n" + prefix + " ");
  if (at == std::string::npos)
    return -1;
  const auto v = at + 1 + prefix.size() + 1;
  return std::stod(text.substr(v, text.find('\n', v) - v));
}

} // namespace

TEST_CASE("metrics: every sample carries model_name and troupe and vLLM names agree") {
  serve_metrics m;
  m.count_request(200);
  m.prompt_tokens += 10;
  m.generation_tokens += 5;
  m.ttft.observe(0.2);
  m.record({.finish_reason = "length",
            .prompt_tokens = 10,
            .generation_tokens = 5,
            .max_tokens = 5,
            .e2e = 1.0,
            .ttft = 0.2,
            .queue = 0.05});
  m.record({.finish_reason = "abort", .prompt_tokens = 3, .e2e = 0.1});
  engine_gauges g{.running = 2, .waiting = 1, .kv_blocks_used = 4, .kv_blocks_total = 16};
  g.prefix_hit_tokens = 7;
  const auto text = metrics_text(g, m, "org/m\"x");
  std::istringstream lines(text);
  std::string line;
  int samples = 0;
  while (std::getline(lines, line)) {
    if (line.empty() || line[0] == '#')
      continue;
    ++samples;
    CHECK_MESSAGE(line.find("{model_name=\"org/m\\\"x\"") != std::string::npos, line);
  }
  CHECK(samples > 100);
  const std::string l = "{model_name=\"org/m\\\"x\"";
  CHECK(sample(text, "vllm:num_requests_running" + l + "}") == 2);
  CHECK(sample(text, "troupe_num_requests_waiting" + l + "}") == 1);
  CHECK(sample(text, "vllm:kv_cache_usage_perc" + l + "}") == doctest::Approx(0.25));
  CHECK(sample(text, "vllm:gpu_cache_usage_perc" + l + "}") == doctest::Approx(0.25));
  CHECK(sample(text, "vllm:prefix_cache_queries_total" + l + "}") == 10);
  CHECK(sample(text, "vllm:prefix_cache_hits_total" + l + "}") == 7);
  CHECK(sample(text, "vllm:request_success_total" + l + ",finished_reason=\"length\"}") == 1);
  CHECK(sample(text, "troupe_request_success_total" + l + ",finished_reason=\"abort\"}") == 1);
  CHECK(sample(text, "vllm:request_success_total" + l + ",finished_reason=\"stop\"}") == 0);
  CHECK(sample(text, "troupe_requests_total" + l + ",status=\"200\"}") == 1);
  // One request with a first token: TPOT (1.0 - 0.2) / 4, queue 0.05, prefill 0.15, decode 0.8.
  CHECK(sample(text, "vllm:request_time_per_output_token_seconds_sum" + l + "}") ==
        doctest::Approx(0.2));
  CHECK(sample(text, "vllm:request_queue_time_seconds_sum" + l + "}") == doctest::Approx(0.05));
  CHECK(sample(text, "vllm:request_prefill_time_seconds_sum" + l + "}") == doctest::Approx(0.15));
  CHECK(sample(text, "vllm:request_decode_time_seconds_sum" + l + "}") == doctest::Approx(0.8));
  CHECK(sample(text, "vllm:e2e_request_latency_seconds_count" + l + "}") == 2);
  CHECK(sample(text, "vllm:request_prompt_tokens_bucket" + l + ",le=\"10\"}") == 2);
  CHECK(sample(text, "vllm:request_prompt_tokens_bucket" + l + ",le=\"2\"}") == 0);
  CHECK(sample(text, "vllm:time_to_first_token_seconds_count" + l + "}") == 1);
}

TEST_CASE("log: JSON lines quote what the message holds") {
  CHECK(log::json_quote("a \"b\"\\\n\t\x01") == "\"a \\\"b\\\"\\\\\\n\\t\\u0001\"");
  CHECK(log::set_format("json"));
  CHECK(log::current_format() == log::format::json);
  CHECK_FALSE(log::set_format("yaml"));
  CHECK(log::set_format("text"));
  CHECK(log::current_format() == log::format::text);
}
