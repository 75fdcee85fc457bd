// Tensor-, pipeline- and expert-parallel float32 CPU backend on the golden models: every rank a
// separate process, Gloo over loopback; greedy tokens equal tensor=1 and logits within 1e-4 on
// every rank, and each rank reads only its share of the expert weights. Also the layout
// rejections of engine/backend/shard.hpp.
#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <sstream>
#include <tuple>

#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/generate.hpp"
#include "golden.hpp"
#include "parallel/rank_processes.hpp"

using namespace troupe;
using namespace troupe::engine;
using namespace std::chrono_literals;

namespace {

const kv_cache_options kv{.num_blocks = 64, .block_size = 4};
const generate_options opts{.max_new_tokens = 12, .prefill_chunk = 5, .record_prompt_logits = true};

// A rank that is SIGKILLed at the start of its `die_at`-th forward step, as a crashed worker is.
class dying_backend final : public backend {
 public:
  dying_backend(backend& inner, int die_at) : inner_(inner), left_(die_at) {}
  const model_config& config() const override { return inner_.config(); }
  kv_cache_options kv_options() const override { return inner_.kv_options(); }
  kv_layout kv_memory() const override { return inner_.kv_memory(); }
  expected<void> forward(const step_plan& plan, forward_output& out) override {
    if (left_-- == 0)
      ::raise(SIGKILL);
    return inner_.forward(plan, out);
  }

 private:
  backend& inner_;
  int left_;
};

// Counts the floats read of MoE expert tensors (mlp.experts.*) on the way to the real store.
class counting_source final : public weight_source {
 public:
  explicit counting_source(const weight_source& inner) : inner_(inner) {}
  bool contains(std::string_view name) const override { return inner_.contains(name); }
  expected<std::vector<float>> load_f32(std::string_view name,
                                        std::vector<int64_t> shape) const override {
    return count(name, inner_.load_f32(name, std::move(shape)));
  }
  expected<std::vector<float>> load_f32_rows(std::string_view name, std::vector<int64_t> shape,
                                             int64_t b, int64_t e) const override {
    return count(name, inner_.load_f32_rows(name, std::move(shape), b, e));
  }
  expected<std::vector<float>> load_f32_cols(std::string_view name, std::vector<int64_t> shape,
                                             int64_t b, int64_t e) const override {
    return count(name, inner_.load_f32_cols(name, std::move(shape), b, e));
  }
  expected<uint64_t> read_bytes(const weight_slice& slice) const override {
    return inner_.read_bytes(slice);
  }
  int64_t expert_floats() const { return expert_floats_; }

 private:
  expected<std::vector<float>> count(std::string_view name,
                                     expected<std::vector<float>> got) const {
    if (got && name.find(".mlp.experts.") != std::string_view::npos)
      expert_floats_ += static_cast<int64_t>(got->size());
    return got;
  }
  const weight_source& inner_;
  mutable int64_t expert_floats_ = 0;
};

// One rank: join its tensor group (and the world group when pipelined), load its shard, generate.
// die_at >= 0: this rank is killed at that step (the others must fail within `timeout`).
int run_rank(const std::filesystem::path& model, parallel_layout lay,
             const std::vector<std::vector<token_id>>& prompts, const std::filesystem::path& dir,
             int die_at = -1, std::chrono::milliseconds timeout = 30s) {
  std::string result;
  auto fail = [&](const error& e) {
    result = "error: " + e.to_string();
    std::ofstream(dir / fmt::format("rank{}.txt", lay.world_rank())) << result;
    return 1;
  };
  auto store = comm::make_folder_store((dir / "store").string());
  auto tensor = comm::make_gloo_communicator(
      *store, lay.tp_rank, lay.tp_size,
      {.prefix = fmt::format("tp{}", lay.pp_rank), .timeout = timeout});
  if (!tensor)
    return fail(tensor.error());
  std::unique_ptr<comm::communicator> world;
  if (lay.pp_size > 1) {
    auto w = comm::make_gloo_communicator(*store, lay.world_rank(), lay.world_size(),
                                          {.prefix = "world", .timeout = timeout});
    if (!w)
      return fail(w.error());
    world = std::move(*w);
  }
  auto config = load_model_config(model);
  auto weights = weight_store::open(model);
  if (!config || !weights)
    return fail(config ? weights.error() : config.error());
  counting_source counted(*weights);
  auto backend = cpu_backend::create(*config, counted, kv, {lay, tensor->get(), world.get()});
  if (!backend)
    return fail(backend.error());
  dying_backend dying(**backend, die_at);
  auto gens = generate_greedy(dying, prompts, opts);
  if (!gens)
    return fail(gens.error());
  result = "ok";
  test::put_vector(result, std::vector<int64_t>{counted.expert_floats()});
  for (const auto& g : *gens) {
    test::put_vector(result, g.output);
    test::put_vector(result, g.prompt_argmax);
    test::put_vector(result, g.last_prompt_logits);
  }
  std::ofstream(dir / fmt::format("rank{}.txt", lay.world_rank()), std::ios::binary) << result;
  return 0;
}

// expert: parallel.expert (0: tensor).
void check_grid(const std::string& name, int tensor, int pipeline, int expert = 0) {
  auto dir = test::golden_model(name);
  if (!dir)
    return;
  auto prompts = test::golden_prompt_ids(*dir);
  auto reference = cpu_backend::load(*dir, kv);
  REQUIRE_MESSAGE(reference.has_value(), (reference ? "" : reference.error().to_string()));
  auto want = generate_greedy(**reference, prompts, opts);
  REQUIRE(want.has_value());

  auto outcomes = test::run_ranks(tensor * pipeline, [&](int r, const std::filesystem::path& d) {
    parallel_layout lay{.tp_rank = r % tensor,
                        .tp_size = tensor,
                        .pp_rank = r / tensor,
                        .pp_size = pipeline,
                        .ep_size = expert};
    return run_rank(*dir, lay, prompts, d);
  });
  auto config = load_model_config(*dir);
  REQUIRE(config.has_value());
  const auto& c = *config;
  for (size_t r = 0; r < outcomes.size(); ++r) {
    CAPTURE(r);
    const auto& msg = outcomes[r].message;
    REQUIRE_MESSAGE(outcomes[r].exit_code == 0, msg);
    REQUIRE(msg.substr(0, 2) == "ok");
    size_t at = 2;
    // Whichever way the experts are cut, a rank holds 1/tensor of its stage's expert weights.
    const auto stage = split_range(c.num_layers, pipeline, static_cast<int>(r) / tensor);
    int64_t all_experts = 0;
    for (int64_t l = stage.begin; l < stage.end; ++l)
      if (c.is_moe_layer(l))
        all_experts += c.num_experts * 3 * c.hidden_size * c.moe_intermediate_size;
    CHECK(test::take_vector<int64_t>(msg, at) == std::vector<int64_t>{all_experts / tensor});
    for (size_t i = 0; i < prompts.size(); ++i) {
      CAPTURE(i);
      CHECK(test::take_vector<token_id>(msg, at) == (*want)[i].output);
      CHECK(test::take_vector<token_id>(msg, at) == (*want)[i].prompt_argmax);
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

// tensor=2 on tiny-qwen2; rank 1 is SIGKILLed at its 4th step. Rank 0 must come back with an
// error naming the failed collective well within its 3-second timeout budget, not hang.
void check_rank_killed_mid_stream() {
  auto dir = test::golden_model("tiny-qwen2");
  if (!dir)
    return;
  auto prompts = test::golden_prompt_ids(*dir);
  auto outcomes = test::run_ranks(
      2,
      [&](int r, const std::filesystem::path& d) {
        auto start = std::chrono::steady_clock::now();
        int rc = run_rank(*dir, {.tp_rank = r, .tp_size = 2}, prompts, d, r == 1 ? 3 : -1, 3s);
        auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::steady_clock::now() - start)
                      .count();
        std::ofstream(d / fmt::format("rank{}.txt", r), std::ios::app) << " | took " << ms << " ms";
        return rc;
      },
      60s);
  INFO(outcomes[0].message);
  CHECK(outcomes[1].exit_code == -1); // killed
  CHECK(outcomes[0].exit_code == 1);  // generate failed, did not hang past the deadline
  CHECK(outcomes[0].message.starts_with("error: unavailable: gloo "));
}

model_config heads(int64_t q, int64_t kv) {
  model_config c;
  c.num_heads = q;
  c.num_kv_heads = kv;
  c.intermediate_size = 1024;
  c.num_layers = 4;
  c.vocab_size = 1000;
  return c;
}

std::string rejection(const model_config& c, int tensor, int pipeline, int expert = 0) {
  auto r = check_parallel_layout(c, tensor, pipeline, expert);
  return r ? "" : r.error().message();
}

} // namespace

TEST_CASE("tensor=2: tiny-qwen3 (tied, vocab-parallel lm_head)") {
  check_grid("tiny-qwen3", 2, 1);
}
TEST_CASE("tensor=4: tiny-qwen3 (kv heads replicated)") {
  check_grid("tiny-qwen3", 4, 1);
}
TEST_CASE("tensor=2: tiny-qwen2 (q/k/v bias)") {
  check_grid("tiny-qwen2", 2, 1);
}
TEST_CASE("tensor=4: tiny-qwen2") {
  check_grid("tiny-qwen2", 4, 1);
}
TEST_CASE("tensor=3: tiny-llama (uneven intermediate and vocab slices)") {
  check_grid("tiny-llama", 3, 1);
}
TEST_CASE("tensor=2: tiny-qwen3-moe (experts split across ranks)") {
  check_grid("tiny-qwen3-moe", 2, 1);
}
TEST_CASE("pipeline=2: tiny-llama (3 layers: stages of 2 and 1)") {
  check_grid("tiny-llama", 1, 2);
}
TEST_CASE("tensor=2 x pipeline=2: tiny-qwen2") {
  check_grid("tiny-qwen2", 2, 2);
}
TEST_CASE("tensor=2 x pipeline=2: tiny-qwen3-moe") {
  check_grid("tiny-qwen3-moe", 2, 2);
}
TEST_CASE("tensor=4 expert=4: tiny-qwen3-moe (two whole experts per rank)") {
  check_grid("tiny-qwen3-moe", 4, 1, 4);
}
TEST_CASE("tensor=2 expert=1: tiny-qwen3-moe (every expert sliced over both ranks)") {
  check_grid("tiny-qwen3-moe", 2, 1, 1);
}
TEST_CASE("tensor=4 expert=2: tiny-qwen3-moe (two groups of four experts, each sliced in two)") {
  check_grid("tiny-qwen3-moe", 4, 1, 2);
}
TEST_CASE("tensor=2 x pipeline=2 expert=1: tiny-qwen3-moe") {
  check_grid("tiny-qwen3-moe", 2, 2, 1);
}

TEST_CASE("tensor=2: a rank SIGKILLed mid-stream fails its peer within seconds, no hang") {
  check_rank_killed_mid_stream();
}

TEST_CASE("layout rejections name the model field and the parallel size") {
  CHECK(rejection(heads(40, 8), 3, 1) == "num_attention_heads=40 is not divisible by tensor=3");
  CHECK(rejection(heads(32, 6), 4, 1) == "num_key_value_heads=6 is not divisible by tensor=4");
  CHECK(rejection(heads(32, 4), 8, 1) == "");
  CHECK(rejection(heads(24, 3), 6, 1) == "");
  CHECK(rejection(heads(48, 3), 12, 1) == "");
  CHECK(rejection(heads(40, 5), 10, 1) == "");
  CHECK(rejection(heads(64, 8), 16, 1) == "");
  CHECK(rejection(heads(24, 4), 6, 1) ==
        "tensor=6 is not a multiple of num_key_value_heads=4 (kv heads are replicated only "
        "when each is shared by the same number of ranks)");
  CHECK(rejection(heads(8, 8), 1, 5) == "num_hidden_layers=4 is fewer than pipeline=5 stages");
  auto moe = heads(8, 8);
  moe.num_experts = 4;
  CHECK(rejection(moe, 8, 1) == "num_experts=4 is fewer than tensor=8: every rank needs an expert");
  CHECK(rejection(heads(8, 8), 0, 1) == "tensor=0 and pipeline=1 must both be at least 1");
  auto out_of_grid = plan_shard(heads(8, 8), {.tp_rank = 2, .tp_size = 2});
  REQUIRE_FALSE(out_of_grid.has_value());
  CHECK(out_of_grid.error().message() == "rank (tensor 2, pipeline 0) is outside a 2 x 1 grid");
}

TEST_CASE("expert layout rejections name the model field and the parallel sizes") {
  auto moe = heads(8, 8);
  moe.num_experts = 60;
  moe.moe_intermediate_size = 96;
  CHECK(rejection(moe, 8, 1) == "");    // expert = tensor: whole experts, 7 or 8 per rank
  CHECK(rejection(moe, 8, 1, 4) == ""); // 15 experts per group of 2 ranks, 48 rows each
  CHECK(rejection(moe, 8, 1, 1) == ""); // every expert in 8 slices of 12 rows
  CHECK(rejection(moe, 8, 1, 8) ==
        "num_experts=60 is not divisible by expert=8: every expert group holds the same number "
        "of whole experts");
  CHECK(rejection(moe, 8, 1, 3) ==
        "expert=3 does not divide tensor=8: the tensor ranks form expert groups of the same size");
  CHECK(rejection(moe, 2, 1, 4) ==
        "expert=4 does not divide tensor=2: the tensor ranks form expert groups of the same size");
  CHECK(rejection(moe, 4, 1, -1) == "expert=-1 must be at least 1 (or 0: tensor)");
  moe.moe_intermediate_size = 90;
  CHECK(rejection(moe, 8, 1, 2) ==
        "moe_intermediate_size=90 is not divisible by tensor/expert=4 (the ranks of an expert "
        "group slice each expert's intermediate dimension)");
  CHECK(rejection(heads(8, 8), 2, 1, 2) ==
        "expert=2 needs a mixture-of-experts model (this one has no experts)");
  CHECK(rejection(heads(8, 8), 2, 1, 1) == ""); // no expert parallelism: true of a dense model
}

TEST_CASE("shard plan: expert groups hold whole experts, their ranks slice them") {
  auto c = heads(8, 8);
  c.num_experts = 8;
  c.moe_intermediate_size = 48;
  auto at = [&](int rank, int tensor, int expert) {
    auto s = plan_shard(c, {.tp_rank = rank, .tp_size = tensor, .ep_size = expert});
    REQUIRE(s.has_value());
    return std::tuple{s->experts.begin, s->experts.end, s->expert_slice.begin, s->expert_slice.end};
  };
  using r = std::tuple<int64_t, int64_t, int64_t, int64_t>;
  CHECK(at(3, 4, 0) == r{6, 8, 0, 48});  // default: whole experts on every rank
  CHECK(at(3, 4, 4) == r{6, 8, 0, 48});  // the same, said explicitly
  CHECK(at(2, 4, 2) == r{4, 8, 0, 24});  // group 1 (ranks 2, 3): experts 4..7, first half
  CHECK(at(3, 4, 2) == r{4, 8, 24, 48}); // ... second half
  CHECK(at(1, 4, 1) == r{0, 8, 12, 24}); // one group: every expert, a quarter of each
}

TEST_CASE("shard plan: replicated kv heads and uneven splits") {
  auto c = heads(8, 2);
  c.vocab_size = 10;
  c.intermediate_size = 10;
  auto s = plan_shard(c, {.tp_rank = 3, .tp_size = 4, .pp_rank = 1, .pp_size = 3});
  REQUIRE(s.has_value());
  CHECK(s->heads.begin == 6);
  CHECK(s->heads.end == 8);
  CHECK(s->kv_heads.begin == 1); // ranks 2 and 3 share kv head 1
  CHECK(s->kv_heads.end == 2);
  CHECK(s->intermediate.begin == 8); // 10 over 4: 3, 3, 2, 2
  CHECK(s->intermediate.end == 10);
  CHECK(s->vocab_chunk == 3); // 10 over 4 padded to 3: the last rank holds one
  CHECK(s->vocab.begin == 9);
  CHECK(s->vocab.end == 10);
  CHECK(s->layers.begin == 2); // 4 layers over 3 stages: 2, 1, 1
  CHECK(s->layers.end == 3);
}
