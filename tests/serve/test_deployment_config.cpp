// model.yaml parsing: defaults, every field, unknown keys with suggestions, malformed YAML with
// line/column, range checks, and the not-yet-supported parallel layouts.
#include <fstream>

#include <doctest/doctest.h>

#include "golden.hpp"
#include "runtime/config.hpp"

using namespace troupe;

TEST_CASE("model.yaml: minimal file gets defaults and a served name from the path") {
  auto c = parse_deployment("model: /models/SmolLM2-135M.gguf\n", "m.yaml");
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  CHECK(c->served_model_name == "SmolLM2-135M");
  CHECK(c->device == "auto");
  CHECK_FALSE(c->open_health_metrics);
  CHECK(c->port == 8000);
  CHECK(c->parallel.tensor == 1);
  auto d = parse_deployment("model: /models/tiny-qwen3/\n", "m.yaml");
  REQUIRE(d.has_value());
  CHECK(d->served_model_name == "tiny-qwen3");
}

TEST_CASE("model.yaml: every field is read") {
  auto c = parse_deployment(R"(
model: /m
served_model_name: tiny
dtype: float32
device: cpu
max_model_len: 512
max_num_seqs: 8
max_num_batched_tokens: 256
max_waiting: 10
gpu_memory_utilization: 0.5
block_size: 8
num_kv_blocks: 100
prefix_caching: false
seed: 7
host: 0.0.0.0
port: 0
api_key: secret
open_health_metrics: true
log_stats_interval_s: 2.5
parallel: {tensor: 1, pipeline: 1, replicas: 1}
)",
                            "m.yaml");
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  CHECK(c->served_model_name == "tiny");
  CHECK(c->dtype == "float32");
  CHECK(c->max_model_len == 512);
  CHECK(c->max_num_seqs == 8);
  CHECK(c->max_num_batched_tokens == 256);
  CHECK(c->max_waiting == 10);
  CHECK(c->gpu_memory_utilization == doctest::Approx(0.5));
  CHECK(c->block_size == 8);
  CHECK(c->num_kv_blocks == 100);
  CHECK(!c->prefix_caching);
  CHECK(c->seed == 7);
  CHECK(c->host == "0.0.0.0");
  CHECK(c->port == 0);
  CHECK(c->api_key == "secret");
  CHECK(c->open_health_metrics);
  CHECK(c->log_stats_interval_s == doctest::Approx(2.5));
  CHECK(deployment_keys().size() == 21);
}

TEST_CASE("model.yaml: unknown keys name the key and the closest valid one") {
  auto c = parse_deployment("model: /m\nmax_num_seq: 4\n", "m.yaml");
  REQUIRE(!c.has_value());
  CHECK(c.error().code() == errc::invalid_argument);
  CHECK(c.error().message() ==
        "m.yaml:2:1: unknown key 'max_num_seq' (did you mean 'max_num_seqs'?)");
  auto p = parse_deployment("model: /m\nparallel:\n  tensr: 1\n", "m.yaml");
  REQUIRE(!p.has_value());
  CHECK(p.error().message() ==
        "m.yaml:3:3: unknown key 'parallel.tensr' (did you mean 'parallel.tensor'?)");
  CHECK(edit_distance("kitten", "sitting") == 3);
  CHECK(edit_distance("", "abc") == 3);
}

TEST_CASE("model.yaml: malformed YAML reports line and column") {
  auto c = parse_deployment("model: /m\nport: [1, 2\n", "bad.yaml");
  REQUIRE(!c.has_value());
  CHECK(c.error().code() == errc::parse_error);
  CHECK(c.error().message().find("bad.yaml:") == 0);
  CHECK(c.error().message().find("malformed YAML") != std::string::npos);
  auto list = parse_deployment("- a\n- b\n", "list.yaml");
  REQUIRE(!list.has_value());
  CHECK(list.error().message().find("expected a mapping") != std::string::npos);
}

TEST_CASE("model.yaml: bad values name the key") {
  auto port = parse_deployment("model: /m\nport: eighty\n", "m.yaml");
  REQUIRE(!port.has_value());
  CHECK(port.error().message() == "m.yaml:2:7: 'port' has an invalid value 'eighty'");
  auto range = parse_deployment("model: /m\nport: 70000\n", "m.yaml");
  REQUIRE(!range.has_value());
  CHECK(range.error().message() == "m.yaml: 'port' must be in [0, 65535]");
  auto dev = parse_deployment("model: /m\ndevice: tpu\n", "m.yaml");
  REQUIRE(!dev.has_value());
  CHECK(dev.error().message().find("'device' must be auto, cpu or cuda") != std::string::npos);
  auto missing = parse_deployment("port: 1\n", "m.yaml");
  REQUIRE(!missing.has_value());
  CHECK(missing.error().message().find("'model' is required") != std::string::npos);
  auto util = parse_deployment("model: /m\ngpu_memory_utilization: 1.5\n", "m.yaml");
  REQUIRE(!util.has_value());
  CHECK(util.error().message().find("gpu_memory_utilization") != std::string::npos);
}

TEST_CASE("model.yaml: tensor x pipeline x replicas layouts parse, sizes below 1 are rejected") {
  auto t = parse_deployment("model: /m\nparallel: {tensor: 2, pipeline: 2}\n", "m.yaml");
  REQUIRE_MESSAGE(t.has_value(), (t ? "" : t.error().to_string()));
  CHECK(t->parallel.tensor == 2);
  CHECK(t->parallel.pipeline == 2);
  CHECK(t->parallel.replicas == 1);
  auto c = parse_deployment("model: /m\nparallel: {tensor: 2, replicas: 3}\n", "m.yaml");
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  CHECK(c->parallel.tensor == 2);
  CHECK(c->parallel.replicas == 3);
  auto r = parse_deployment("model: /m\nparallel: {replicas: 0}\n", "m.yaml");
  REQUIRE(!r.has_value());
  CHECK(r.error().message().find("'parallel' sizes must be >= 1") != std::string::npos);
}

TEST_CASE("model.yaml: parallel.expert defaults to 0 (tensor) and stays within the tensor ranks") {
  auto d = parse_deployment("model: /m\nparallel: {tensor: 4}\n", "m.yaml");
  REQUIRE(d.has_value());
  CHECK(d->parallel.expert == 0);
  auto e = parse_deployment("model: /m\nparallel: {tensor: 4, expert: 2}\n", "m.yaml");
  REQUIRE_MESSAGE(e.has_value(), (e ? "" : e.error().to_string()));
  CHECK(e->parallel.expert == 2);
  for (const char* bad : {"{tensor: 2, expert: 4}", "{expert: -1}"}) {
    CAPTURE(bad);
    auto r = parse_deployment(fmt::format("model: /m\nparallel: {}\n", bad), "m.yaml");
    REQUIRE(!r.has_value());
    CHECK(r.error().message() ==
          "m.yaml: 'parallel.expert' must be in [1, parallel.tensor] (0 = parallel.tensor)");
  }
  auto typo = parse_deployment("model: /m\nparallel: {experts: 2}\n", "m.yaml");
  REQUIRE(!typo.has_value());
  CHECK(typo.error().message().find("did you mean 'parallel.expert'?") != std::string::npos);
}

TEST_CASE("model.yaml: http limits have defaults, parse, and are range-checked by name") {
  auto d = parse_deployment("model: /m\n", "m.yaml");
  REQUIRE(d.has_value());
  CHECK(d->http.threads == 2);
  CHECK(d->http.max_connections == 4096);
  CHECK(d->http.max_header_bytes == 16384);
  CHECK(d->http.max_body_bytes == 16u << 20);
  auto c = parse_deployment(R"(
model: /m
http:
  threads: 3
  max_connections: 10
  max_header_bytes: 2048
  max_body_bytes: 4096
  read_timeout_s: 1.5
  idle_timeout_s: 2
  write_timeout_s: 3
)",
                            "m.yaml");
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  CHECK(c->http.threads == 3);
  CHECK(c->http.max_connections == 10);
  CHECK(c->http.max_header_bytes == 2048);
  CHECK(c->http.max_body_bytes == 4096);
  CHECK(c->http.read_timeout_s == doctest::Approx(1.5));
  CHECK(c->http.idle_timeout_s == doctest::Approx(2));
  CHECK(c->http.write_timeout_s == doctest::Approx(3));
  auto typo = parse_deployment("model: /m\nhttp:\n  max_conections: 4\n", "m.yaml");
  REQUIRE(!typo.has_value());
  CHECK(typo.error().message() ==
        "m.yaml:3:3: unknown key 'http.max_conections' (did you mean 'http.max_connections'?)");
  auto zero = parse_deployment("model: /m\nhttp: {read_timeout_s: 0}\n", "m.yaml");
  REQUIRE(!zero.has_value());
  CHECK(zero.error().message() == "m.yaml: 'http.read_timeout_s' must be in (0, 86400] seconds");
  auto threads = parse_deployment("model: /m\nhttp: {threads: 0}\n", "m.yaml");
  REQUIRE(!threads.has_value());
  CHECK(threads.error().message().find("'http.threads' must be in [1, 256]") != std::string::npos);
  auto scalar = parse_deployment("model: /m\nhttp: 5\n", "m.yaml");
  REQUIRE(!scalar.has_value());
  CHECK(scalar.error().message().find("'http' must be a mapping") != std::string::npos);
}

TEST_CASE("model.yaml: files resolve a relative model path against their folder") {
  test::temp_dir dir;
  std::ofstream(dir.path() / "model.yaml") << "model: weights/tiny\n";
  auto c = load_deployment(dir.path() / "model.yaml");
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  CHECK(c->model == (dir.path() / "weights/tiny").string());
  auto none = load_deployment(dir.path() / "absent.yaml");
  REQUIRE(!none.has_value());
  CHECK(none.error().code() == errc::not_found);
}

TEST_CASE("model.yaml: disaggregation groups parse, and impossible specs name the key") {
  auto c = parse_deployment(R"(
model: /m
disaggregation:
  prefill: {replicas: 1, tensor: 2, block_size: 32}
  decode: {replicas: 2}
  provider: tcp
  timeout_s: 5
  min_prefill_tokens: 64
  on_prefill_failure: fail
  staging: always
  staging_tokens: 8192
)",
                            "m.yaml");
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  const auto& d = c->disaggregation;
  CHECK(d.enabled);
  CHECK(d.prefill.parallel.tensor == 2);
  CHECK(d.prefill.parallel.replicas == 1);
  CHECK(d.prefill.block_size == 32);
  CHECK(d.decode.parallel.replicas == 2);
  CHECK(d.decode.block_size == 0);
  // Replicas in group order: the two decode replicas (the deployment's block size), then the
  // prefill replica (its own).
  const auto groups = replica_groups(*c);
  REQUIRE(groups.size() == 2);
  CHECK(groups[0].role == "decode");
  CHECK(groups[0].block_size == 16);
  CHECK(groups[1].role == "prefill");
  CHECK(groups[1].block_size == 32);
  CHECK(groups[1].parallel.tensor == 2);
  CHECK(group_index(groups, 0) == 0);
  CHECK(group_index(groups, 1) == 0);
  CHECK(group_index(groups, 2) == 1);
  CHECK(d.provider == "tcp");
  CHECK(d.timeout_s == 5);
  CHECK(d.min_prefill_tokens == 64);
  CHECK(d.on_prefill_failure == "fail");
  CHECK(d.staging == "always");
  CHECK(d.staging_tokens == 8192);
  CHECK_FALSE(parse_deployment("model: /m\n", "m.yaml")->disaggregation.enabled);

  auto refused = [](const char* yaml, const char* says) {
    auto r = parse_deployment(yaml, "m.yaml");
    REQUIRE_FALSE(r.has_value());
    CHECK_MESSAGE(r.error().message().find(says) != std::string::npos, r.error().message());
  };
  refused("model: /m\ndisaggregation: {prefil: {replicas: 1}}\n",
          "unknown key 'disaggregation.prefil' (did you mean 'disaggregation.prefill'?)");
  refused("model: /m\ndisaggregation: {decode: {replica: 1}}\n",
          "did you mean 'disaggregation.decode.replicas'");
  refused("model: /m\ndisaggregation: {provider: ucx}\n",
          "'disaggregation.provider' must be auto, local, tcp, verbs, efa or socket");
  refused("model: /m\ndisaggregation: {timeout_s: 0}\n", "'disaggregation.timeout_s'");
  refused("model: /m\ndisaggregation: {decode: {tensor: 0}}\n",
          "'disaggregation.decode' sizes must be >= 1");
  refused("model: /m\ndisaggregation: {on_prefill_failure: retry}\n", "must be decode or fail");
  refused("model: /m\ndisaggregation: {staging: sometimes}\n",
          "'disaggregation.staging' must be auto, always or never");
  refused("model: /m\ndisaggregation: {staging_tokens: -1}\n", "'disaggregation.staging_tokens'");
  refused("model: /m\nparallel: {replicas: 2}\ndisaggregation: {}\n",
          "'parallel' and 'disaggregation' exclude each other");
  refused("model: /m\ndisaggregation: [1, 2]\n", "'disaggregation' must be a mapping");
}

TEST_CASE("model.yaml: hostile files are errors: deep nesting, NaN, out-of-range numbers") {
  auto refused = [](const std::string& text, const char* in_message) {
    auto c = parse_deployment(text, "m.yaml");
    REQUIRE_FALSE(c.has_value());
    CHECK_MESSAGE(c.error().message().find(in_message) != std::string::npos, c.error().message());
  };
  // yaml-cpp's parser stops at its depth limit, before the stack does.
  refused("model: " + std::string(100000, '[') + std::string(100000, ']') + "\n", "m.yaml");
  std::string maps = "model: ";
  for (int i = 0; i < 100000; ++i)
    maps += "{a: ";
  refused(maps + "1" + std::string(100000, '}') + "\n", "m.yaml");
  std::string block = "model: x\nparallel:\n";
  for (int i = 1; i < 3000; ++i)
    block += std::string(i, ' ') + "-\n";
  refused(block, "m.yaml");
  refused("model: x\ngpu_memory_utilization: .nan\n", "'gpu_memory_utilization' must be in (0, 1]");
  refused("model: x\nlog_stats_interval_s: .inf\n", "'log_stats_interval_s' must be in");
  refused("model: x\nhttp: {read_timeout_s: .nan}\n", "'http.read_timeout_s' must be in");
  refused("model: x\nnum_kv_blocks: 1e9\n", "'num_kv_blocks' has an invalid value '1e9'");
  refused("model: x\nnum_kv_blocks: 99999999999\n", "'num_kv_blocks' has an invalid value");
  refused("model: x\nmax_model_len: -5\n", "'max_model_len' must be >= 0");
  refused("model: x\nseed: -1\n", "'seed' has an invalid value '-1'");
}
