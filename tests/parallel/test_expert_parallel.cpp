// Expert parallelism with data-parallel tokens on CPU ranks (engine/backend/cpu/moe.hpp): every
// rank a separate process holding only its whole experts of the golden tiny-qwen3-moe, with its
// own tokens (uneven counts, none on some ranks); rows go to the experts' ranks and back by Gloo
// all-to-all. Each rank's output equals the MoE layer over every expert in one process (the path
// the golden tests check against Hugging Face). Then whole models on those ranks: attention
// data-parallel (each rank its own prompts and KV cache), experts shared by all-to-all, equal to
// one process generating each rank's prompts: in step by construction (prompts of the same
// lengths), and through lockstep executors with each rank scheduling its own requests.
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <thread>

#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/backend/cpu/moe.hpp"
#include "engine/exec/local_executor.hpp"
#include "engine/exec/lockstep_executor.hpp"
#include "engine/exec/threaded_executor.hpp"
#include "engine/generate.hpp"
#include "engine/model/model_config.hpp"
#include "engine/model/safetensors.hpp"
#include "engine/scheduler/engine_loop.hpp"
#include "golden.hpp"
#include "parallel/rank_processes.hpp"

using namespace troupe;
using namespace troupe::engine;
using namespace std::chrono_literals;

namespace {

struct moe_layer {
  cpu::moe_shape shape;
  std::vector<float> router;
  std::vector<std::vector<float>> gate, up, down; // experts [begin, end) of the model
  std::vector<cpu::expert_view> views;
};

// Layer `l`'s router and the whole experts [begin, end), read from the model folder.
expected<moe_layer> load_layer(const std::filesystem::path& dir, int64_t l, index_range experts) {
  auto config = load_model_config(dir);
  if (!config)
    return std::move(config).error();
  auto store = weight_store::open(dir);
  if (!store)
    return std::move(store).error();
  const auto& c = *config;
  const auto& w = *store;
  moe_layer m;
  const int64_t H = c.hidden_size, I = c.moe_intermediate_size;
  m.shape = {.hidden = H,
             .experts = c.num_experts,
             .top_k = c.num_experts_per_tok,
             .intermediate = I,
             .norm_topk_prob = c.norm_topk_prob};
  const std::string p = fmt::format("model.layers.{}.mlp.", l);
  TROUPE_ASSIGN(m.router, w.load_f32(p + "gate.weight", {c.num_experts, H}));
  for (int64_t e = experts.begin; e < experts.end; ++e) {
    const std::string ep = fmt::format("{}experts.{}.", p, e);
    TROUPE_ASSIGN(m.gate.emplace_back(), w.load_f32(ep + "gate_proj.weight", {I, H}));
    TROUPE_ASSIGN(m.up.emplace_back(), w.load_f32(ep + "up_proj.weight", {I, H}));
    TROUPE_ASSIGN(m.down.emplace_back(), w.load_f32(ep + "down_proj.weight", {H, I}));
  }
  for (size_t e = 0; e < m.gate.size(); ++e)
    m.views.push_back({m.gate[e].data(), m.up[e].data(), m.down[e].data()});
  return m;
}

// Hidden states of `n` tokens, the same in every process.
std::vector<float> tokens(int64_t n, int64_t hidden) {
  std::mt19937 gen(1234);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> h(static_cast<size_t>(n * hidden));
  for (auto& x : h)
    x = d(gen);
  return h;
}

// `counts[r]` tokens per rank, consecutive in the shared token list.
void check_ranks(const std::vector<int64_t>& counts) {
  auto dir = test::golden_model("tiny-qwen3-moe");
  if (!dir)
    return;
  const int P = static_cast<int>(counts.size());
  int64_t N = 0;
  for (auto n : counts)
    N += n;
  for (int64_t l : {0, 1}) {
    CAPTURE(l);
    auto all = load_layer(*dir, l, {0, 8});
    REQUIRE_MESSAGE(all.has_value(), (all ? "" : all.error().to_string()));
    const auto& s = all->shape;
    REQUIRE(s.experts == 8);
    const auto h = tokens(N, s.hidden);
    std::vector<int32_t> ids;
    std::vector<float> weights;
    cpu::moe_route(s, all->router.data(), h.data(), N, ids, weights);
    std::vector<float> want(h.size());
    cpu::moe_local(s, ids.data(), weights.data(), N, h.data(), 0, all->views, want.data());
    // The routing spreads the tokens: every rank's experts get some of them.
    for (int r = 0; r < P; ++r) {
      const auto range = split_range(s.experts, P, r);
      CHECK(std::any_of(ids.begin(), ids.end(), [&](int32_t e) { return range.contains(e); }));
    }

    auto outcomes = test::run_ranks(P, [&](int r, const std::filesystem::path& d) {
      std::string result;
      auto done = [&](int code) {
        std::ofstream(d / fmt::format("rank{}.txt", r), std::ios::binary) << result;
        return code;
      };
      auto store = comm::make_folder_store((d / "store").string());
      auto group = comm::make_gloo_communicator(*store, r, P, {.prefix = "ep", .timeout = 20s});
      auto mine = load_layer(*dir, l, split_range(8, P, r));
      if (!group || !mine) {
        result = "error: " + (group ? mine.error() : group.error()).to_string();
        return done(1);
      }
      int64_t first = 0;
      for (int q = 0; q < r; ++q)
        first += counts[static_cast<size_t>(q)];
      const int64_t n = counts[static_cast<size_t>(r)];
      std::vector<float> out(static_cast<size_t>(n * s.hidden), -1.0f);
      auto ok = cpu::moe_all_to_all(**group, mine->shape, mine->router.data(), mine->views,
                                    h.data() + first * s.hidden, n, out.data());
      if (!ok) {
        result = "error: " + ok.error().to_string();
        return done(1);
      }
      result = "ok";
      test::put_vector(result, out);
      return done(0);
    });
    int64_t first = 0;
    for (int r = 0; r < P; ++r) {
      CAPTURE(r);
      const auto& msg = outcomes[static_cast<size_t>(r)].message;
      REQUIRE_MESSAGE(outcomes[static_cast<size_t>(r)].exit_code == 0, msg);
      REQUIRE(msg.substr(0, 2) == "ok");
      size_t at = 2;
      auto got = test::take_vector<float>(msg, at);
      const int64_t n = counts[static_cast<size_t>(r)];
      REQUIRE(static_cast<int64_t>(got.size()) == n * s.hidden);
      double worst = 0;
      for (int64_t i = 0; i < n * s.hidden; ++i)
        worst = std::max(
            worst, static_cast<double>(std::abs(got[static_cast<size_t>(i)] -
                                                want[static_cast<size_t>(first * s.hidden + i)])));
      CHECK(worst <= 1e-5);
      first += n;
    }
  }
}

// Runs body(r, model, group) as rank r of P forked data-parallel ranks of the golden model in
// `dir`, each holding 1/P of the experts over a Gloo group; the text it returns (or its error)
// comes back as the rank's outcome message.
using dp_body =
    std::function<expected<std::string>(int r, cpu_backend& model, comm::communicator& group)>;
std::vector<test::rank_outcome> run_dp_ranks(int P, const std::filesystem::path& dir,
                                             const kv_cache_options& kv, const dp_body& body) {
  return test::run_ranks(P, [&](int r, const std::filesystem::path& d) {
    auto result = [&]() -> expected<std::string> {
      auto store = comm::make_folder_store((d / "store").string());
      auto group = comm::make_gloo_communicator(*store, r, P, {.prefix = "dp", .timeout = 30s});
      if (!group)
        return std::move(group).error();
      auto config = load_model_config(dir);
      auto weights = weight_store::open(dir);
      if (!config || !weights)
        return config ? std::move(weights).error() : std::move(config).error();
      auto model = cpu_backend::create(*config, *weights, kv, {.experts = group->get()});
      if (!model)
        return std::move(model).error();
      return body(r, **model, **group);
    }();
    std::ofstream(d / fmt::format("rank{}.txt", r), std::ios::binary)
        << (result ? *result : "error: " + result.error().to_string());
    return result ? 0 : 1;
  });
}

// Rank r's result text, which must start with "ok" (else the test case fails with it).
const std::string& ok_result(const std::vector<test::rank_outcome>& outcomes, int r) {
  const auto& o = outcomes.at(static_cast<size_t>(r));
  REQUIRE_MESSAGE(o.exit_code == 0, o.message);
  REQUIRE(o.message.substr(0, 2) == "ok");
  return o.message;
}

// Data-parallel attention over `P` forked ranks: rank r generates the golden prompts with their
// ids moved by r (the same lengths everywhere, so that every rank runs the same steps: the ranks
// must call forward() in lockstep), holding the whole attention and 1/P of the experts.
void check_data_parallel(int P) {
  auto dir = test::golden_model("tiny-qwen3-moe");
  if (!dir)
    return;
  const kv_cache_options kv{.num_blocks = 64, .block_size = 4};
  const generate_options opts{
      .max_new_tokens = 12, .prefill_chunk = 5, .record_prompt_logits = true};
  const auto base = test::golden_prompt_ids(*dir);
  auto prompts_of = [&](int r) {
    auto p = base;
    for (auto& q : p)
      for (auto& id : q)
        id = (id * (r + 1) + 7 * r) % 4096;
    return p;
  };
  auto outcomes = run_dp_ranks(P, *dir, kv, [&](int r, cpu_backend& model, comm::communicator&) {
    auto gens = generate_greedy(model, prompts_of(r), opts);
    if (!gens)
      return expected<std::string>(std::move(gens).error());
    std::string result = "ok";
    for (const auto& g : *gens) {
      test::put_vector(result, g.output);
      test::put_vector(result, g.last_prompt_logits);
    }
    return expected<std::string>(std::move(result));
  });
  auto reference = cpu_backend::load(*dir, kv);
  REQUIRE(reference.has_value());
  for (int r = 0; r < P; ++r) {
    CAPTURE(r);
    const auto& msg = ok_result(outcomes, r);
    auto want = generate_greedy(**reference, prompts_of(r), opts);
    REQUIRE(want.has_value());
    size_t at = 2;
    for (size_t i = 0; i < want->size(); ++i) {
      CAPTURE(i);
      CHECK(test::take_vector<token_id>(msg, at) == (*want)[i].output);
      auto logits = test::take_vector<float>(msg, at);
      REQUIRE(logits.size() == (*want)[i].last_prompt_logits.size());
      double worst = 0;
      for (size_t v = 0; v < logits.size(); ++v)
        worst = std::max(
            worst, static_cast<double>(std::abs(logits[v] - (*want)[i].last_prompt_logits[v])));
      CHECK(worst <= 1e-4);
    }
  }
}

// Data-parallel ranks that schedule on their own (lockstep_executor): rank r serves its own
// requests through an engine_loop over threaded_executor(lockstep_executor(local_executor)) -
// different prompt counts, lengths and output lengths per rank, the last rank idle for a while
// first - and each request's greedy tokens equal one process's with every expert.
void check_lockstep(int P) {
  auto dir = test::golden_model("tiny-qwen3-moe");
  if (!dir)
    return;
  const kv_cache_options kv{.num_blocks = 64, .block_size = 4};
  const auto base = test::golden_prompt_ids(*dir);
  struct job {
    std::vector<token_id> prompt;
    int32_t max_tokens = 0;
  };
  auto jobs_of = [&](int r) {
    std::vector<job> jobs;
    for (size_t i = static_cast<size_t>(r) % 2; i < base.size(); ++i) {
      auto p = base[i];
      for (auto& id : p)
        id = (id * (r + 1) + 7 * r) % 4096;
      jobs.push_back({p, 4 + 3 * r + static_cast<int32_t>(i)});
    }
    return jobs;
  };
  auto outcomes = run_dp_ranks(
      P, *dir, kv,
      [&](int r, cpu_backend& model, comm::communicator& group) -> expected<std::string> {
        auto lock = std::make_unique<lockstep_executor>(std::make_unique<local_executor>(model),
                                                        model, group);
        auto* rounds = lock.get();
        std::optional<engine_loop> loop; // goes after exec: plans in flight refer to it
        threaded_executor exec(std::move(lock));
        uint64_t idle_passes = 0;
        if (r == P - 1) { // idle at first: its thread joins the others' passes meanwhile
          for (int i = 0; i < 20000 && rounds->passes() == 0; ++i)
            std::this_thread::sleep_for(1ms);
          idle_passes = rounds->passes();
        }
        loop.emplace(scheduler_options{.num_blocks = kv.num_blocks,
                                       .block_size = kv.block_size,
                                       .max_num_batched_tokens = 24,
                                       .max_model_len = 160,
                                       .vocab_size = model.config().vocab_size},
                     exec);
        const auto jobs = jobs_of(r);
        std::map<seq_id, size_t> index;
        std::vector<std::vector<token_id>> got(jobs.size());
        for (size_t i = 0; i < jobs.size(); ++i) {
          sampling_params greedy;
          greedy.temperature = 0;
          greedy.max_tokens = jobs[i].max_tokens;
          greedy.ignore_eos = true;
          auto id = loop->add_request({.prompt = jobs[i].prompt, .sampling = greedy});
          if (!id)
            return std::move(id).error();
          index[*id] = i;
        }
        for (int i = 0; i < 2000 && loop->has_work(); ++i) {
          auto out = loop->step();
          if (!out)
            return std::move(out).error();
          for (const auto& o : *out)
            if (o.has_token)
              got[index[o.id]].push_back(o.token);
        }
        rounds->leave(); // then wait for the others, answering their rounds
        for (int i = 0; i < 60000 && !rounds->done() && !rounds->failed(); ++i)
          std::this_thread::sleep_for(1ms);
        if (!rounds->done() || rounds->failed())
          return error{errc::timeout, "the group never finished, or broke"};
        if (exec.execute(step_plan{}).has_value()) // nobody is left to meet
          return error{errc::internal, "a round ran after the group ended"};
        std::string result = "ok";
        test::put_vector(result, std::vector<uint64_t>{idle_passes});
        for (const auto& g : got)
          test::put_vector(result, g);
        return result;
      });
  auto reference = cpu_backend::load(*dir, kv);
  REQUIRE(reference.has_value());
  for (int r = 0; r < P; ++r) {
    CAPTURE(r);
    const auto& msg = ok_result(outcomes, r);
    size_t at = 2;
    const auto idle_passes = test::take_vector<uint64_t>(msg, at).at(0);
    if (r == P - 1) // the others' passes went on meanwhile, with this rank in them
      CHECK(idle_passes > 0);
    for (const auto& j : jobs_of(r)) {
      CAPTURE(j.prompt.size());
      auto want = generate_greedy(**reference, {j.prompt}, {.max_new_tokens = j.max_tokens});
      REQUIRE(want.has_value());
      CHECK(test::take_vector<token_id>(msg, at) == want->front().output);
    }
  }
}

} // namespace

TEST_CASE("data-parallel attention, experts by all-to-all: 2 ranks equal one process each") {
  check_data_parallel(2);
}
TEST_CASE("data-parallel attention, experts by all-to-all: 4 ranks equal one process each") {
  check_data_parallel(4);
}
TEST_CASE("data-parallel attention through lockstep executors: 2 ranks scheduling on their own "
          "equal one process") {
  check_lockstep(2);
}
TEST_CASE("data-parallel attention through lockstep executors: 3 ranks scheduling on their own "
          "equal one process") {
  check_lockstep(3);
}
TEST_CASE("data-parallel attention with tensor > 1 is refused") {
  auto dir = test::golden_model("tiny-qwen3-moe");
  if (!dir)
    return;
  auto config = load_model_config(*dir);
  auto weights = weight_store::open(*dir);
  REQUIRE((config && weights));
  auto one = comm::make_single_rank_communicator();
  auto b = cpu_backend::create(*config, *weights, {.num_blocks = 8, .block_size = 4},
                               {.layout = {.tp_size = 1, .pp_size = 2}, .experts = one.get()});
  REQUIRE_FALSE(b.has_value());
  CHECK(b.error().message() == "expert all-to-all over data-parallel attention needs tensor = "
                               "pipeline = 1 on each rank, not 1 x 2");
}

TEST_CASE("expert all-to-all: 2 ranks of 4 whole experts, uneven token counts") {
  check_ranks({5, 8});
}
TEST_CASE("expert all-to-all: 4 ranks of 2 experts, one rank without tokens") {
  check_ranks({1, 0, 7, 5});
}
TEST_CASE("expert all-to-all: 3 ranks holding 3, 3 and 2 experts") {
  check_ranks({0, 6, 9});
}

TEST_CASE("expert all-to-all: a rank given experts that are not its share is refused") {
  auto dir = test::golden_model("tiny-qwen3-moe");
  if (!dir)
    return;
  auto layer = load_layer(*dir, 0, {0, 3});
  REQUIRE(layer.has_value());
  auto one = comm::make_single_rank_communicator();
  std::vector<float> h(static_cast<size_t>(layer->shape.hidden)), out(h.size());
  auto r = cpu::moe_all_to_all(*one, layer->shape, layer->router.data(), layer->views, h.data(), 1,
                               out.data());
  REQUIRE_FALSE(r.has_value());
  CHECK(r.error().message() == "expert all-to-all: rank 0 of 1 holds experts [0, 8) but was "
                               "given 3");
}
