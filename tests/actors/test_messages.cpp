// Step plans cross process boundaries to worker ranks: every sampling parameter survives CAF's
// binary serialization (a field missing from inspect() would reach the workers as its default).
#include <doctest/doctest.h>

#include <caf/binary_deserializer.hpp>
#include <caf/binary_serializer.hpp>

#include "actors/messages.hpp"

using namespace troupe;

TEST_CASE("messages: a step plan's sampling parameters survive serialization") {
  step_plan plan;
  plan.step = 9;
  seq_step s;
  s.id = 3;
  s.tokens = {1, 2};
  s.sampling.temperature = 0.5f;
  s.sampling.top_k = 7;
  s.sampling.logprobs = 2;
  s.sampling.bias_tokens = {4, 17};
  s.sampling.bias_values = {-100.0f, 2.5f};
  s.sampling.min_tokens = 3;
  s.sampling.ignore_eos = true;
  s.banned_tokens = {5};
  plan.seqs.push_back(s);
  std::vector<char> buf;
  caf::binary_serializer sink{nullptr, buf};
  REQUIRE(!sink(plan));
  step_plan back;
  caf::binary_deserializer source{nullptr, buf};
  REQUIRE(!source(back));
  REQUIRE(back.seqs.size() == 1);
  const auto& b = back.seqs[0].sampling;
  CHECK(b.temperature == 0.5f);
  CHECK(b.top_k == 7);
  CHECK(b.logprobs == 2);
  CHECK(b.bias_tokens == s.sampling.bias_tokens);
  CHECK(b.bias_values == s.sampling.bias_values);
  CHECK(b.min_tokens == 3);
  CHECK(b.ignore_eos);
  CHECK(back.seqs[0].banned_tokens == s.banned_tokens);
}

TEST_CASE("messages: a rank's load progress survives serialization") {
  msg::rank_progress p{.deployment = "m",
                       .role = "prefill",
                       .replica = 1,
                       .rank = 3,
                       .tp_rank = 1,
                       .pp_rank = 1,
                       .node_id = "w2",
                       .bytes = 5'000'000'000,
                       .total = 9'000'000'000,
                       .elapsed_s = 2.5,
                       .done = true};
  std::vector<char> buf;
  caf::binary_serializer sink{nullptr, buf};
  REQUIRE(!sink(p));
  msg::rank_progress b;
  caf::binary_deserializer source{nullptr, buf};
  REQUIRE(!source(b));
  CHECK(b.deployment == "m");
  CHECK(b.role == "prefill");
  CHECK(b.replica == 1);
  CHECK(b.rank == 3);
  CHECK(b.tp_rank == 1);
  CHECK(b.pp_rank == 1);
  CHECK(b.node_id == "w2");
  CHECK(b.bytes == 5'000'000'000);
  CHECK(b.total == 9'000'000'000);
  CHECK(b.elapsed_s == 2.5);
  CHECK(b.done);
}
