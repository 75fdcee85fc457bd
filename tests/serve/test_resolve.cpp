// serve::resolve: a deployment refused or resolved from model.yaml and the model's config alone,
// before anything loads (device, dtype, layouts per group, context length and KV pool).
#include <doctest/doctest.h>

#include "actors/serving/resolve.hpp"

using namespace troupe;

namespace {

engine::model_config model() {
  engine::model_config m;
  m.vocab_size = 1000;
  m.hidden_size = 256;
  m.intermediate_size = 512;
  m.num_layers = 4;
  m.num_heads = 8;
  m.num_kv_heads = 2;
  m.head_dim = 32;
  m.max_position_embeddings = 2048;
  return m;
}

deployment_config parse(const char* yaml) {
  auto c = parse_deployment(yaml, "m.yaml");
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  return *c;
}

void refused(const char* yaml, std::string_view auto_device, const char* says) {
  auto r = serve::resolve(parse(yaml), model(), auto_device);
  REQUIRE_FALSE(r.has_value());
  CHECK_MESSAGE(r.error().message().find(says) != std::string::npos, r.error().message());
}

} // namespace

TEST_CASE("resolve: device auto, dtype against the device, context and KV pool") {
  auto r = serve::resolve(parse("model: /m\n"), model(), "cpu");
  REQUIRE(r.has_value());
  CHECK(r->config.device == "cpu");
  REQUIRE(r->groups.size() == 1);
  CHECK(r->groups[0].group.role.empty());
  CHECK(r->groups[0].kv.max_model_len == 2048); // the model's limit (under the 4096 cap)
  CHECK(r->groups[0].kv.num_blocks >= 2048 / 16);
  CHECK(r->model.num_heads == 8);

  auto gpu = serve::resolve(parse("model: /m\ndtype: bfloat16\n"), model(), "cuda");
  REQUIRE(gpu.has_value());
  CHECK(gpu->config.device == "cuda");
  // An explicit device is kept whatever auto would have chosen.
  auto cpu = serve::resolve(parse("model: /m\ndevice: cpu\n"), model(), "cuda");
  REQUIRE(cpu.has_value());
  CHECK(cpu->config.device == "cpu");

  refused("model: /m\ndtype: float16\n", "cuda", "the CUDA backend computes in bfloat16");
  refused("model: /m\ndevice: cpu\ndtype: bfloat16\n", "cuda",
          "the CPU backend computes in float32");
  refused("model: /m\nmax_model_len: 4096\n", "cpu",
          "max_model_len 4096 exceeds the model's max_position_embeddings 2048");
  refused("model: /m\nmax_model_len: 1024\nnum_kv_blocks: 10\n", "cpu",
          "num_kv_blocks 10 cannot hold one context of max_model_len 1024");
}

TEST_CASE("resolve: layouts against the model, per group, with the group named") {
  auto ok =
      serve::resolve(parse("model: /m\nparallel: {tensor: 2, pipeline: 4}\n"), model(), "cpu");
  CHECK_MESSAGE(ok.has_value(), (ok ? "" : ok.error().to_string()));
  refused("model: /m\nparallel: {tensor: 3}\n", "cpu", "not divisible by tensor=3");
  refused("model: /m\nparallel: {pipeline: 8}\n", "cpu", "pipeline=8");

  // Disaggregated: each group its own layout and block size, so its own KV plan.
  auto d = serve::resolve(parse(R"(
model: /m
max_model_len: 1000
disaggregation:
  prefill: {replicas: 1, tensor: 2, block_size: 32}
  decode: {replicas: 2}
)"),
                          model(), "cpu");
  REQUIRE_MESSAGE(d.has_value(), (d ? "" : d.error().to_string()));
  REQUIRE(d->groups.size() == 2);
  CHECK(d->groups[0].group.role == "decode");
  CHECK(d->groups[1].group.role == "prefill");
  CHECK(d->groups[0].kv.max_model_len == 1000);
  CHECK(d->groups[1].kv.max_model_len == 1000);
  // One context: 63 blocks of 16 tokens, 32 of 32; the pools hold max_num_seqs of them.
  CHECK(d->groups[0].kv.num_blocks % 63 == 0);
  CHECK(d->groups[1].kv.num_blocks % 32 == 0);
  refused(R"(
model: /m
disaggregation:
  prefill: {replicas: 1, tensor: 3}
  decode: {replicas: 1}
)",
          "cpu", "the prefill group: ");
}
