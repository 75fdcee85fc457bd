// The scheduler-driven engine on the CPU backend and the golden models: many concurrent
// requests, with and without prefix caching and under forced preemption (a tiny KV pool), must
// produce exactly the greedy tokens each prompt gets alone (generate_greedy, one prompt at a
// time); seeded sampling with penalties must not depend on what else is in the batch. Also with
// two plans in flight (two scheduler lanes sharing one backend's KV pool, as pipelining runs).
#include <map>

#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/exec/local_executor.hpp"
#include "engine/generate.hpp"
#include "engine/scheduler/engine_loop.hpp"
#include "golden.hpp"
#include "pipelined_executor.hpp"

using namespace troupe;
using namespace troupe::engine;

namespace {

constexpr int32_t new_tokens = 24;

std::unique_ptr<cpu_backend> load(const std::filesystem::path& dir, kv_cache_options kv) {
  auto b = cpu_backend::load(dir, kv);
  REQUIRE_MESSAGE(b.has_value(), (b ? "" : b.error().to_string()));
  return std::move(*b);
}

// The golden prompts plus prompts that share prefixes with them (so the cache has work).
std::vector<std::vector<token_id>> prompts_of(const std::filesystem::path& dir) {
  auto out = test::golden_prompt_ids(dir);
  const auto& longest = out.back(); // 100 tokens
  REQUIRE(longest.size() >= 100);
  auto a = std::vector<token_id>(longest.begin(), longest.begin() + 40);
  a.insert(a.end(), out[1].begin(), out[1].end());
  auto b = std::vector<token_id>(longest.begin(), longest.begin() + 70);
  b.insert(b.end(), {5, 6, 7});
  out.push_back(a);
  out.push_back(b);
  return out;
}

struct run_result {
  std::map<seq_id, std::vector<token_id>> tokens;
  std::map<seq_id, finish_reason> finish;
  scheduler_stats stats;
  double hit_rate = 0;
};

run_result run_all(backend& model, scheduler_options o,
                   const std::vector<std::pair<std::vector<token_id>, sampling_params>>& reqs,
                   std::vector<seq_id>& ids, int32_t depth = 1, bool as_group = false,
                   bool ahead = false) {
  local_executor local(model);
  test::pipelined_executor exec(local, depth, ahead);
  o.vocab_size = model.config().vocab_size;
  o.eos_token_ids = model.config().eos_token_ids;
  engine_loop loop(o, exec);
  REQUIRE(loop.num_lanes() == static_cast<size_t>(depth));
  run_result r;
  ids.clear();
  if (as_group) { // the choices of one prompt (OpenAI n)
    std::vector<request> rs;
    for (const auto& [prompt, sp] : reqs)
      rs.push_back({.prompt = prompt, .sampling = sp});
    auto added = loop.add_group(std::move(rs));
    REQUIRE_MESSAGE(added.has_value(), (added ? "" : added.error().to_string()));
    ids = *added;
  }
  for (size_t i = 0; i < reqs.size() && !as_group; ++i) {
    auto id = loop.add_request({.prompt = reqs[i].first, .sampling = reqs[i].second});
    REQUIRE_MESSAGE(id.has_value(), (id ? "" : id.error().to_string()));
    ids.push_back(*id);
  }
  for (int i = 0; loop.has_unfinished(); ++i) {
    REQUIRE(i < 100000);
    auto out = loop.step();
    REQUIRE_MESSAGE(out.has_value(), (out ? "" : out.error().to_string()));
    for (const auto& o2 : *out) {
      if (o2.has_token)
        r.tokens[o2.id].push_back(o2.token);
      if (o2.finish != finish_reason::none)
        r.finish[o2.id] = o2.finish;
    }
    for (size_t l = 0; l < loop.num_lanes(); ++l) {
      auto c = loop.sched(l).check();
      REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
    }
  }
  CHECK(exec.conflicts == 0);
  if (ahead) {
    CHECK(exec.max_in_flight == 2);
    CHECK(exec.continued > 0);
  } else if (!as_group) { // a group stays in one lane: one plan in flight
    CHECK(exec.max_in_flight == static_cast<size_t>(depth));
  }
  r.stats = loop.stats();
  r.hit_rate = loop.usage().hit_rate();
  return r;
}

sampling_params greedy() {
  sampling_params p;
  p.temperature = 0;
  p.max_tokens = new_tokens;
  p.ignore_eos = true;
  return p;
}

void run_model(const std::string& name) {
  auto dir = test::golden_model(name);
  if (!dir)
    return;
  const auto prompts = prompts_of(*dir);
  std::vector<std::vector<token_id>> alone;
  {
    auto model = load(*dir, {.num_blocks = 64, .block_size = 16});
    for (const auto& p : prompts) {
      auto g = generate_greedy(*model, {p}, {.max_new_tokens = new_tokens});
      REQUIRE_MESSAGE(g.has_value(), (g ? "" : g.error().to_string()));
      alone.push_back(g->front().output);
    }
  }
  // Every prompt, and the two that share the longest one's prefix again, all at once.
  std::vector<std::pair<std::vector<token_id>, sampling_params>> reqs;
  std::vector<size_t> which;
  for (size_t i = 0; i < prompts.size(); ++i)
    which.push_back(i);
  which.push_back(prompts.size() - 2);
  which.push_back(prompts.size() - 1);
  for (size_t i : which)
    reqs.push_back({prompts[i], greedy()});

  struct config {
    const char* what;
    kv_cache_options kv;
    bool caching;
    int32_t budget;
    int32_t depth = 1;
    bool ahead = false;
  };
  for (const auto& c : {config{"prefix caching", {256, 16}, true, 64},
                        config{"no prefix caching", {256, 16}, false, 64},
                        config{"tiny pool, preemption", {48, 4}, true, 32},
                        config{"tiny pool, no caching", {48, 4}, false, 48},
                        config{"two lanes in flight, prefix caching", {256, 16}, true, 64, 2},
                        config{"two lanes in flight, preemption", {96, 4}, true, 32, 2},
                        config{"planned ahead, prefix caching", {256, 16}, true, 64, 1, true},
                        config{"planned ahead, preemption", {48, 4}, true, 32, 1, true}}) {
    CAPTURE(c.what);
    auto model = load(*dir, c.kv);
    std::vector<seq_id> ids;
    auto r = run_all(*model,
                     {.num_blocks = c.kv.num_blocks,
                      .block_size = c.kv.block_size,
                      .prefix_caching = c.caching,
                      .max_num_batched_tokens = c.budget,
                      .max_num_seqs = 16,
                      .max_model_len = 128},
                     reqs, ids, c.depth, false, c.ahead);
    for (size_t i = 0; i < ids.size(); ++i) {
      CAPTURE(i);
      CHECK(r.tokens[ids[i]] == alone[which[i]]);
      CHECK(r.finish[ids[i]] == finish_reason::length);
    }
    MESSAGE(std::string(c.what) << ": preemptions " << r.stats.preemptions << ", prefix-hit tokens "
                                << r.stats.prefix_hit_tokens);
    if (c.kv.num_blocks < 100)
      CHECK(r.stats.preemptions > 0);
    if (c.caching)
      CHECK(r.stats.prefix_hit_tokens > 0);
  }
}

} // namespace

TEST_CASE("engine loop tiny-qwen3: concurrent greedy equals alone (caching, preemption)") {
  run_model("tiny-qwen3");
}
TEST_CASE("engine loop tiny-qwen2: concurrent greedy equals alone (caching, preemption)") {
  run_model("tiny-qwen2");
}
TEST_CASE("engine loop tiny-llama: concurrent greedy equals alone (caching, preemption)") {
  run_model("tiny-llama");
}
TEST_CASE("engine loop tiny-qwen3-moe: concurrent greedy equals alone (caching, preemption)") {
  run_model("tiny-qwen3-moe");
}

TEST_CASE("engine loop tiny-qwen3: a seeded request samples the same tokens alone or batched") {
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  const auto prompts = prompts_of(*dir);
  sampling_params sp;
  sp.temperature = 0.8f;
  sp.top_k = 40;
  sp.top_p = 0.95f;
  sp.presence_penalty = 0.5f;
  sp.repetition_penalty = 1.1f;
  sp.has_seed = true;
  sp.seed = 2024;
  sp.max_tokens = 16;
  sp.ignore_eos = true;
  sp.logprobs = 2;
  const auto& target = prompts[prompts.size() - 1]; // shares 70 tokens with the longest prompt
  auto model = load(*dir, {.num_blocks = 128, .block_size = 16});
  scheduler_options o{.num_blocks = 128, .block_size = 16, .max_num_batched_tokens = 48};
  std::vector<seq_id> ids;
  auto solo = run_all(*model, o, {{target, sp}}, ids);
  const auto solo_tokens = solo.tokens[ids[0]];
  REQUIRE(solo_tokens.size() == 16);

  // Batched: others first (the longest prompt fills the prefix cache), unseeded neighbours.
  std::vector<std::pair<std::vector<token_id>, sampling_params>> reqs;
  auto other = sp;
  other.has_seed = false;
  for (const auto& p : prompts)
    reqs.push_back({p, other});
  reqs.push_back({target, sp});
  auto model2 = load(*dir, {.num_blocks = 128, .block_size = 16});
  auto batched = run_all(*model2, o, reqs, ids);
  CHECK(batched.tokens[ids.back()] == solo_tokens);
  CHECK(batched.stats.prefix_hit_tokens > 0);
  // Planned ahead: the penalties count the tokens the executor put in for previous_sample.
  auto model4 = load(*dir, {.num_blocks = 128, .block_size = 16});
  auto ahead = run_all(*model4, o, reqs, ids, 1, false, true);
  CHECK(ahead.tokens[ids.back()] == solo_tokens);
  for (size_t i = 0; i + 1 < ids.size(); ++i)
    CHECK(ahead.tokens[ids[i]] == batched.tokens[ids[i]]);
  // Different seed, different tokens (16 draws from top-40: equal by chance is negligible).
  sp.seed = 7;
  auto model3 = load(*dir, {.num_blocks = 128, .block_size = 16});
  auto reseeded = run_all(*model3, o, {{target, sp}}, ids);
  CHECK(reseeded.tokens[ids[0]] != solo_tokens);
}

TEST_CASE(
    "engine loop tiny-qwen3: n seeded choices share the prompt's KV and equal seeded singles") {
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  const auto prompts = prompts_of(*dir);
  const auto& target = prompts[prompts.size() - 3]; // the longest: 100 tokens
  REQUIRE(target.size() >= 100);
  const auto len = static_cast<int32_t>(target.size());
  sampling_params sp;
  sp.temperature = 0.8f;
  sp.top_k = 40;
  sp.presence_penalty = 0.5f; // penalties: a choice rebuilds them from the prompt it did not feed
  sp.repetition_penalty = 1.1f;
  sp.has_seed = true;
  sp.max_tokens = 16;
  sp.ignore_eos = true;
  std::vector<std::pair<std::vector<token_id>, sampling_params>> choices;
  std::vector<std::vector<token_id>> single;
  std::vector<seq_id> ids;
  for (uint64_t i = 0; i < 4; ++i) {
    sp.seed = 2024 + i;
    choices.push_back({target, sp});
    auto model = load(*dir, {.num_blocks = 64, .block_size = 16});
    auto r = run_all(*model, {.num_blocks = 64, .block_size = 16, .max_num_batched_tokens = 48},
                     {{target, sp}}, ids);
    single.push_back(r.tokens[ids[0]]);
    REQUIRE(single.back().size() == 16);
  }
  CHECK(single[0] != single[1]); // the seeds matter

  struct config {
    const char* what;
    kv_cache_options kv;
    bool caching;
    int32_t budget;
    int32_t depth = 1;
    bool ahead = false;
  };
  for (const auto& c :
       {config{"prefix caching", {128, 16}, true, 48},
        config{"no prefix caching", {128, 16}, false, 48},
        config{"no prefix caching, whole prompt in one step", {128, 16}, false, 256},
        config{"tiny pool, preemption", {36, 4}, false, 32},
        config{"tiny pool, preemption, caching", {36, 4}, true, 32},
        config{"two lanes in flight", {256, 16}, false, 64, 2},
        config{"planned ahead", {128, 16}, true, 48, 1, true}}) {
    CAPTURE(c.what);
    auto model = load(*dir, c.kv);
    auto r = run_all(*model,
                     {.num_blocks = c.kv.num_blocks,
                      .block_size = c.kv.block_size,
                      .prefix_caching = c.caching,
                      .max_num_batched_tokens = c.budget,
                      .max_num_seqs = 8,
                      .max_model_len = 128},
                     choices, ids, c.depth, true, c.ahead);
    REQUIRE(ids.size() == 4);
    for (seq_id id : ids) // one lane (ids are lane-strided)
      CHECK((id - 1) % static_cast<seq_id>(c.depth) == (ids[0] - 1) % static_cast<seq_id>(c.depth));
    for (size_t i = 0; i < 4; ++i) {
      CAPTURE(i);
      CHECK(r.tokens[ids[i]] == single[i]);
      CHECK(r.finish[ids[i]] == finish_reason::length);
    }
    MESSAGE(std::string(c.what) << ": shared prompt tokens " << r.stats.shared_prompt_tokens
                                << ", preemptions " << r.stats.preemptions);
    // The full blocks before the last prompt token's, which each other choice took.
    const auto shared = static_cast<uint64_t>((len - 1) / c.kv.block_size * c.kv.block_size);
    if (c.kv.num_blocks < 100) {
      CHECK(r.stats.preemptions > 0);
      CHECK(r.stats.shared_prompt_tokens >= 3 * shared);
    } else {
      CHECK(r.stats.shared_prompt_tokens == 3 * shared);
    }
  }
}

TEST_CASE("engine loop tiny-qwen3: cancelling mid-generation frees every block") {
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  const auto prompts = prompts_of(*dir);
  auto model = load(*dir, {.num_blocks = 64, .block_size = 16});
  local_executor exec(*model);
  engine_loop loop({.num_blocks = 64,
                    .block_size = 16,
                    .max_num_batched_tokens = 32,
                    .vocab_size = model->config().vocab_size},
                   exec);
  sampling_params sp;
  sp.frequency_penalty = 0.5f; // the sampler keeps per-sequence state to drop
  sp.max_tokens = 100;
  std::vector<seq_id> ids;
  for (const auto& p : prompts)
    ids.push_back(*loop.add_request({.prompt = p, .sampling = sp}));
  for (int i = 0; i < 6; ++i)
    REQUIRE(loop.step().has_value());
  REQUIRE(loop.cancel(ids[0]).has_value());
  REQUIRE(loop.step().has_value());
  for (size_t i = 1; i < ids.size(); ++i)
    REQUIRE(loop.cancel(ids[i]).has_value());
  auto out = loop.step(); // an empty plan that only names the finished sequences
  REQUIRE_MESSAGE(out.has_value(), (out ? "" : out.error().to_string()));
  CHECK(out->size() == ids.size() - 1);
  CHECK_FALSE(loop.has_unfinished());
  CHECK(loop.sched().pool().num_free() == 64);
}

// Prompt logprobs (vLLM prompt_logprobs, OpenAI echo with logprobs): the prompt position holding a
// token the model generated scores it as its sampling did (logprob, rank 1, the same top ids);
// every position is reported once and in order, whatever the chunking, and never from the prefix
// cache (cached positions have no logits), also for n choices of one prompt.
TEST_CASE("engine loop tiny-qwen3: prompt logprobs score generated tokens as sampling did") {
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  auto prompt = test::golden_prompt_ids(*dir).back();
  prompt.resize(37);
  auto model = load(*dir, {.num_blocks = 64, .block_size = 16});
  local_executor exec(*model);
  const auto& cfg = model->config();
  auto drain = [](engine_loop& loop) {
    std::map<seq_id, std::vector<request_output>> outs;
    for (int i = 0; loop.has_unfinished(); ++i) {
      REQUIRE(i < 10000);
      auto out = loop.step();
      REQUIRE_MESSAGE(out.has_value(), (out ? "" : out.error().to_string()));
      for (auto& o : *out)
        outs[o.id].push_back(std::move(o));
    }
    return outs;
  };

  // Greedy with logprobs: what the model generates after the prompt.
  scheduler_options o{.num_blocks = 64,
                      .block_size = 16,
                      .vocab_size = cfg.vocab_size,
                      .eos_token_ids = cfg.eos_token_ids};
  engine_loop first(o, exec);
  sampling_params g;
  g.temperature = 0;
  g.max_tokens = 6;
  g.ignore_eos = true;
  g.logprobs = 3;
  auto id = first.add_request({.prompt = prompt, .sampling = g});
  REQUIRE(id.has_value());
  auto gen = drain(first)[*id];
  REQUIRE(gen.size() == 6);

  // The prompt followed by five of them, scored: positions 37..41 hold the generated tokens.
  auto scored_prompt = prompt;
  for (size_t i = 0; i < 5; ++i)
    scored_prompt.push_back(gen[i].token);
  const auto n = static_cast<int32_t>(scored_prompt.size());
  sampling_params s = g;
  s.max_tokens = 1;
  s.logprobs = -1;
  s.prompt_logprobs = 3;
  for (int32_t rows : {5, 64})
    for (int32_t budget : {16, 2048})
      for (bool group : {false, true}) {
        CAPTURE(rows);
        CAPTURE(budget);
        CAPTURE(group);
        auto oo = o;
        oo.max_prompt_logprob_rows = rows;
        oo.max_num_batched_tokens = budget;
        oo.max_num_seqs = 8;
        engine_loop loop(oo, exec);
        // The plain prompt first: its full blocks land in the prefix cache.
        auto warm = loop.add_request({.prompt = scored_prompt, .sampling = g});
        REQUIRE(warm.has_value());
        drain(loop);
        const auto hits = loop.stats().prefix_hit_tokens;
        std::vector<seq_id> ids;
        if (group) {
          auto added = loop.add_group(
              {{.prompt = scored_prompt, .sampling = s}, {.prompt = scored_prompt, .sampling = s}});
          REQUIRE(added.has_value());
          ids = *added;
        } else {
          auto added = loop.add_request({.prompt = scored_prompt, .sampling = s});
          REQUIRE(added.has_value());
          ids = {*added};
        }
        auto outs = drain(loop);
        CHECK(loop.stats().prefix_hit_tokens == hits);
        for (seq_id sid : ids) {
          std::vector<position_logprobs> scored;
          int32_t tokens = 0;
          for (const auto& out : outs[sid]) {
            scored.insert(scored.end(), out.prompt_logprobs.begin(), out.prompt_logprobs.end());
            tokens += out.has_token;
            if (out.has_token)
              CHECK(out.token == gen[5].token);
          }
          CHECK(tokens == 1);
          REQUIRE(scored.size() == static_cast<size_t>(n - 1));
          for (int32_t p = 1; p < n; ++p) {
            const auto& e = scored[static_cast<size_t>(p - 1)];
            CHECK(e.position == p);
            CHECK(e.token == scored_prompt[static_cast<size_t>(p)]);
            CHECK(e.rank >= 1);
            CHECK(e.logprob <= 0.0f);
            REQUIRE(e.top_ids.size() == 3);
            CHECK(e.top_logprobs[0] >= e.logprob);
          }
          for (size_t i = 0; i < 5; ++i) {
            const auto& e = scored[prompt.size() - 1 + i];
            CHECK(e.token == gen[i].token);
            CHECK(e.rank == 1);
            CHECK(e.logprob == doctest::Approx(gen[i].logprob).epsilon(1e-3));
            CHECK(e.top_ids == gen[i].top_ids);
          }
        }
      }
}
