// The sharded CUDA backend and the device communicators (label `gpu`). Several ranks share the one
// GPU as forked processes talking through the host-staged communicator over Gloo (NCCL refuses two
// ranks on one GPU): tensor=2, pipeline=2 and tensor=2 x pipeline=2 on the golden models must
// match tensor=1 on the same GPU. NCCL itself runs at one rank. The parent process never touches
// CUDA (a forked child could not use it then): every GPU call happens in a child.
#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/backend/cuda/cuda_backend.hpp"
#include "engine/comm/device_communicator.hpp"
#include "engine/generate.hpp"
#include "golden.hpp"
#include "gpu/golden_check.hpp"
#include "gpu/gpu_test_util.hpp"
#include "parallel/rank_processes.hpp"

using namespace troupe;
using namespace troupe::engine;
using namespace std::chrono_literals;

namespace {

const generate_options opts{.max_new_tokens = 12, .prefill_chunk = 5, .record_prompt_logits = true};
const kv_cache_options kv{.num_blocks = 64, .block_size = 16};
const cuda_options base{
    .max_num_batched_tokens = 256, .max_num_seqs = 8, .max_logit_rows = 256, .max_model_len = 256};

// Greedy ids through cuda_backend::forward_greedy, presented as one-hot logits so that
// generate_greedy drives it (exercises the argmax broadcast from the last stage).
class greedy_only final : public backend {
 public:
  explicit greedy_only(cuda_backend& b) : b_(b) {}
  const model_config& config() const override { return b_.config(); }
  kv_cache_options kv_options() const override { return b_.kv_options(); }
  kv_layout kv_memory() const override { return b_.kv_memory(); }
  expected<void> forward(const step_plan& plan, forward_output& out) override {
    const int32_t rows = prepare_output(plan, b_.config().vocab_size, out);
    TROUPE_TRY_VOID(b_.forward_greedy(plan, ids_));
    if (static_cast<int32_t>(ids_.size()) != rows)
      return make_error(errc::internal, "forward_greedy: {} ids for {} rows", ids_.size(), rows);
    for (int32_t r = 0; r < rows; ++r)
      out.logits[static_cast<size_t>(r) * b_.config().vocab_size + ids_[r]] = 1.0f;
    return {};
  }

 private:
  cuda_backend& b_;
  std::vector<token_id> ids_;
};

struct rank_result {
  std::vector<generation> gens;           // forward(): outputs, last prompt logits
  std::vector<std::vector<token_id>> ids; // forward_greedy(): outputs
};

int write_result(const std::filesystem::path& dir, int rank, const std::string& text) {
  std::ofstream(dir / fmt::format("rank{}.txt", rank), std::ios::binary) << text;
  return text.starts_with("ok") || text.starts_with("SKIP") ? 0 : 1;
}

// A rank's communicators: Gloo groups on the host staged from the device, or NCCL (one GPU per
// rank: NCCL refuses two ranks on one GPU).
struct rank_comms {
  std::unique_ptr<comm::communicator> host_tp, host_world;
  std::unique_ptr<comm::device_communicator> tp, world;
};

expected<std::unique_ptr<comm::device_communicator>>
group(comm::rendezvous_store& store, int rank, int size, const std::string& prefix, bool nccl,
      int device, std::unique_ptr<comm::communicator>& host) {
  if (nccl)
    return comm::make_nccl_communicator(store, rank, size,
                                        {.device = device, .prefix = prefix, .timeout = 60s});
  TROUPE_ASSIGN(
      host, comm::make_gloo_communicator(store, rank, size, {.prefix = prefix, .timeout = 60s}));
  return comm::make_host_staged_communicator(*host);
}

expected<void> join(comm::rendezvous_store& store, const parallel_layout& lay, bool nccl,
                    rank_comms& c) {
  const int device = nccl ? lay.world_rank() : 0;
  if (lay.tp_size > 1)
    TROUPE_ASSIGN(c.tp, group(store, lay.tp_rank, lay.tp_size, fmt::format("tp{}", lay.pp_rank),
                              nccl, device, c.host_tp));
  if (lay.pp_size > 1)
    TROUPE_ASSIGN(c.world, group(store, lay.world_rank(), lay.world_size(), "world", nccl, device,
                                 c.host_world));
  return {};
}

// Why this rank cannot run, or empty: no GPU, or (NCCL) fewer GPUs than ranks.
std::string skip_reason(const parallel_layout& lay, bool nccl) {
  if (auto why = cuda_unavailable_reason(); !why.empty())
    return why;
  int gpus = 0;
  if (nccl && (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus < lay.world_size()))
    return fmt::format("NCCL tensor={} x pipeline={} needs {} GPUs (one per rank), found {}",
                       lay.tp_size, lay.pp_size, lay.world_size(), gpus);
  return {};
}

// One rank in a child process: its communicators, its shard on the GPU, greedy generation twice
// (logits, then greedy ids). tensor = pipeline = 1 is the reference, without communicators.
int run_rank(const std::filesystem::path& model, parallel_layout lay,
             const std::vector<std::vector<token_id>>& prompts, const std::filesystem::path& dir,
             bool nccl = false) {
  const int r = lay.world_rank();
  auto fail = [&](const error& e) { return write_result(dir, r, "error: " + e.to_string()); };
  if (auto why = skip_reason(lay, nccl); !why.empty())
    return write_result(dir, r, "SKIP: " + why);
  auto store = comm::make_folder_store((dir / "store").string());
  rank_comms comms;
  if (auto joined = join(*store, lay, nccl, comms); !joined)
    return fail(joined.error());
  cuda_options o = base;
  o.device = nccl ? r : 0;
  o.layout = lay;
  o.tensor = comms.tp.get();
  o.world = comms.world.get();
  auto config = load_model_config(model);
  auto weights = weight_store::open(model);
  if (!config || !weights)
    return fail(config ? weights.error() : config.error());
  auto gpu = make_cuda_backend(*config, &*weights, kv, o);
  if (!gpu)
    return fail(gpu.error());
  auto gens = generate_greedy(**gpu, prompts, opts);
  if (!gens)
    return fail(gens.error());
  greedy_only greedy(**gpu);
  auto ids = generate_greedy(greedy, prompts, {.max_new_tokens = 12, .prefill_chunk = 5});
  if (!ids)
    return fail(ids.error());
  std::string out = "ok";
  for (size_t i = 0; i < prompts.size(); ++i) {
    test::put_vector(out, (*gens)[i].output);
    test::put_vector(out, (*gens)[i].last_prompt_logits);
    test::put_vector(out, (*ids)[i].output);
  }
  return write_result(dir, r, out);
}

rank_result parse(const std::string& msg, size_t prompts) {
  rank_result res;
  size_t at = 2;
  for (size_t i = 0; i < prompts; ++i) {
    generation g;
    g.output = test::take_vector<token_id>(msg, at);
    g.last_prompt_logits = test::take_vector<float>(msg, at);
    res.gens.push_back(std::move(g));
    res.ids.push_back(test::take_vector<token_id>(msg, at));
  }
  return res;
}

// The grid's ranks (forked, sharing GPU 0 through host-staged Gloo, or one GPU each over NCCL)
// against tensor=1 on GPU 0. expert: parallel.expert (0: tensor).
void check_grid(const std::string& name, int tensor, int pipeline, bool nccl = false,
                int expert = 0) {
  auto dir = test::golden_model(name);
  if (!dir)
    return;
  const auto prompts = test::golden_prompt_ids(*dir);
  auto outcomes = test::run_ranks(
      tensor * pipeline,
      [&](int r, const std::filesystem::path& d) {
        parallel_layout lay{.tp_rank = r % tensor,
                            .tp_size = tensor,
                            .pp_rank = r / tensor,
                            .pp_size = pipeline,
                            .ep_size = expert};
        return run_rank(*dir, lay, prompts, d, nccl);
      },
      180s);
  if (outcomes[0].message.starts_with("SKIP")) {
    MESSAGE(outcomes[0].message);
    return;
  }
  auto ref = test::run_ranks(
      1, [&](int, const std::filesystem::path& d) { return run_rank(*dir, {}, prompts, d); }, 120s);
  REQUIRE_MESSAGE(ref[0].exit_code == 0, ref[0].message);
  const auto want = parse(ref[0].message, prompts.size());

  auto config = load_model_config(*dir);
  auto weights = weight_store::open(*dir);
  REQUIRE(config.has_value());
  REQUIRE(weights.has_value());
  auto cpu = cpu_backend::create(*config, *weights, {.num_blocks = 64, .block_size = 16});
  REQUIRE(cpu.has_value());
  // Tensor ranks add bf16 partial sums in another order than one GPU does; pipeline stages pass
  // the fp32 residual stream untouched, so pipeline alone computes the very same sums.
  const double tolerance = tensor == 1 ? 1e-6 : config->num_experts > 0 ? 3e-2 : 2e-2;
  for (size_t r = 0; r < outcomes.size(); ++r) {
    CAPTURE(r);
    REQUIRE_MESSAGE(outcomes[r].exit_code == 0, outcomes[r].message);
    const auto got = parse(outcomes[r].message, prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      CAPTURE(i);
      const double err =
          test::rel_l2(got.gens[i].last_prompt_logits, want.gens[i].last_prompt_logits);
      if (r == 0)
        MESSAGE(name << " tensor=" << tensor << " pipeline=" << pipeline << " prompt " << i
                     << ": relative L2 of logits vs tensor=1 " << err);
      CHECK(err <= tolerance);
      test::check_greedy(**cpu, prompts[i], got.gens[i].output, want.gens[i].output);
      test::check_greedy(**cpu, prompts[i], got.ids[i], want.gens[i].output);
    }
  }
}

} // namespace

TEST_CASE("cuda tensor=2 (host-staged over gloo, 2 processes): tiny-qwen3") {
  check_grid("tiny-qwen3", 2, 1);
}
TEST_CASE("cuda tensor=2: tiny-qwen2 (q/k/v bias)") {
  check_grid("tiny-qwen2", 2, 1);
}
TEST_CASE("cuda tensor=3: tiny-llama (uneven intermediate and vocab slices)") {
  check_grid("tiny-llama", 3, 1);
}
TEST_CASE("cuda tensor=4: tiny-qwen3 (kv heads replicated)") {
  check_grid("tiny-qwen3", 4, 1);
}
TEST_CASE("cuda tensor=2: tiny-qwen3-moe (experts split across ranks)") {
  check_grid("tiny-qwen3-moe", 2, 1);
}
TEST_CASE("cuda pipeline=2: tiny-llama (stages of 2 and 1 layers)") {
  check_grid("tiny-llama", 1, 2);
}
TEST_CASE("cuda tensor=2 x pipeline=2 (4 processes): tiny-qwen2") {
  check_grid("tiny-qwen2", 2, 2);
}
TEST_CASE("cuda tensor=2 x pipeline=2: tiny-qwen3-moe") {
  check_grid("tiny-qwen3-moe", 2, 2);
}
TEST_CASE("cuda tensor=2 expert=1: tiny-qwen3-moe (every expert sliced over both ranks)") {
  check_grid("tiny-qwen3-moe", 2, 1, false, 1);
}
TEST_CASE("cuda tensor=4 expert=2: tiny-qwen3-moe (two groups of four experts, sliced in two)") {
  check_grid("tiny-qwen3-moe", 4, 1, false, 2);
}

namespace {

#define CHILD_CUDA(call)                                                                           \
  do {                                                                                             \
    if (cudaError_t e_ = (call); e_ != cudaSuccess)                                                \
      return make_error(errc::internal, "{}: {}", #call, cudaGetErrorString(e_));                  \
  } while (false)
#define CHILD_CHECK(cond)                                                                          \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      return make_error(errc::internal, "check failed: {}", #cond);                                \
  } while (false)

// NCCL at one rank: init through a folder store, every collective an identity on f32 and bf16
// (all-to-all a copy), an all-gather recorded into a CUDA graph and replayed, then a clean
// destroy.
expected<void> nccl_one_rank(const std::filesystem::path& dir) {
  auto store = comm::make_folder_store((dir / "store").string());
  std::unique_ptr<comm::device_communicator> c;
  TROUPE_ASSIGN(c, comm::make_nccl_communicator(*store, 0, 1, {.prefix = "one", .timeout = 20s}));
  CHILD_CHECK(c->name() == "nccl" && c->capturable() && c->size() == 1 && c->rank() == 0);
  const size_t n = 576 * 8; // hidden x batch of a small decode step
  std::vector<float> x(n);
  std::vector<uint16_t> b(n);
  for (size_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>(i % 97) * 0.25f - 7.0f;
    b[i] = static_cast<uint16_t>(0x3f80 + i % 113); // bf16 values in [1, 2)
  }
  float *dx = nullptr, *dout = nullptr;
  uint16_t* db = nullptr;
  cudaStream_t s = nullptr;
  CHILD_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  CHILD_CUDA(cudaMalloc(&dx, n * 4));
  CHILD_CUDA(cudaMalloc(&dout, n * 4));
  CHILD_CUDA(cudaMalloc(&db, n * 2));
  CHILD_CUDA(cudaMemcpy(dx, x.data(), n * 4, cudaMemcpyHostToDevice));
  CHILD_CUDA(cudaMemcpy(db, b.data(), n * 2, cudaMemcpyHostToDevice));
  const auto ds = reinterpret_cast<comm::device_stream>(s);
  TROUPE_TRY_VOID(c->all_reduce_sum(dx, n, comm::device_dtype::f32, ds));
  TROUPE_TRY_VOID(c->all_reduce_sum(db, n, comm::device_dtype::bf16, ds));
  TROUPE_TRY_VOID(c->broadcast(dx, n, comm::device_dtype::f32, 0, ds));
  TROUPE_TRY_VOID(c->synchronize(ds));
  std::vector<float> xr(n);
  std::vector<uint16_t> br(n);
  CHILD_CUDA(cudaMemcpy(xr.data(), dx, n * 4, cudaMemcpyDeviceToHost));
  CHILD_CUDA(cudaMemcpy(br.data(), db, n * 2, cudaMemcpyDeviceToHost));
  CHILD_CHECK(xr == x);
  CHILD_CHECK(br == b);
  // All-to-all at one rank: a copy.
  CHILD_CUDA(cudaMemset(dout, 0, n * 4));
  const std::vector<int64_t> all{static_cast<int64_t>(n)};
  TROUPE_TRY_VOID(c->all_to_all(dx, all, dout, all, comm::device_dtype::f32, ds));
  TROUPE_TRY_VOID(c->synchronize(ds));
  CHILD_CUDA(cudaMemcpy(xr.data(), dout, n * 4, cudaMemcpyDeviceToHost));
  CHILD_CHECK(xr == x);
  // All-gather (out of place) captured into a graph: only the replay can fill `dout`.
  CHILD_CUDA(cudaMemset(dout, 0, n * 4));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CHILD_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  auto captured = c->all_gather(dx, dout, n, comm::device_dtype::f32, ds);
  CHILD_CUDA(cudaStreamEndCapture(s, &graph));
  TROUPE_TRY_VOID(captured);
  CHILD_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  CHILD_CUDA(cudaGraphLaunch(exec, s));
  TROUPE_TRY_VOID(c->synchronize(ds));
  CHILD_CUDA(cudaMemcpy(xr.data(), dout, n * 4, cudaMemcpyDeviceToHost));
  CHILD_CHECK(xr == x);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  c.reset(); // finalize + destroy, bounded by the timeout
  cudaFree(dx);
  cudaFree(dout);
  cudaFree(db);
  cudaStreamDestroy(s);
  return {};
}

// Host-staged all-to-all over Gloo at `rank` of 3 (forked ranks sharing GPU 0): rank r sends
// (r + 2k) % 3 values to rank k (none for some pairs), in bf16, each value naming its sender,
// receiver and position.
expected<void> staged_all_to_all(const std::filesystem::path& dir, int rank) {
  auto store = comm::make_folder_store((dir / "store").string());
  std::unique_ptr<comm::communicator> host;
  TROUPE_ASSIGN(host, comm::make_gloo_communicator(*store, rank, 3, {.prefix = "a2a"}));
  std::unique_ptr<comm::device_communicator> c;
  TROUPE_ASSIGN(c, comm::make_host_staged_communicator(*host));
  std::vector<int64_t> sc(3), rc(3);
  std::vector<uint16_t> out, want;
  auto value = [](int from, int to, int j) { // exact in bf16: small integers
    return static_cast<uint16_t>(
        std::bit_cast<uint32_t>(static_cast<float>(9 * from + 3 * to + j)) >> 16);
  };
  for (int k = 0; k < 3; ++k) {
    sc[static_cast<size_t>(k)] = (rank + 2 * k) % 3;
    rc[static_cast<size_t>(k)] = (k + 2 * rank) % 3;
    for (int j = 0; j < sc[static_cast<size_t>(k)]; ++j)
      out.push_back(value(rank, k, j));
    for (int j = 0; j < rc[static_cast<size_t>(k)]; ++j)
      want.push_back(value(k, rank, j));
  }
  uint16_t *din = nullptr, *dout = nullptr;
  CHILD_CUDA(cudaMalloc(&din, out.size() * 2 + 2));
  CHILD_CUDA(cudaMalloc(&dout, want.size() * 2 + 2));
  CHILD_CUDA(cudaMemcpy(din, out.data(), out.size() * 2, cudaMemcpyHostToDevice));
  TROUPE_TRY_VOID(c->all_to_all(din, sc, dout, rc, comm::device_dtype::bf16, nullptr));
  TROUPE_TRY_VOID(c->synchronize(nullptr));
  std::vector<uint16_t> got(want.size());
  CHILD_CUDA(cudaMemcpy(got.data(), dout, got.size() * 2, cudaMemcpyDeviceToHost));
  cudaFree(din);
  cudaFree(dout);
  CHILD_CHECK(got == want);
  return {};
}

int child(const std::filesystem::path& dir, const std::function<expected<void>()>& body) {
  if (auto why = cuda_unavailable_reason(); !why.empty())
    return write_result(dir, 0, "SKIP: " + why);
  auto start = std::chrono::steady_clock::now();
  auto r = body();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                  start)
                .count();
  return write_result(
      dir, 0, (r ? "ok" : "error: " + r.error().to_string()) + fmt::format(" | took {} ms", ms));
}

} // namespace

// NCCL grids: one GPU per rank, CUDA graphs on (NCCL calls are captured). They print SKIP with
// the GPU count on smaller machines (issue 7 lends multi-GPU ones).
TEST_CASE("cuda tensor=2 over NCCL (2 GPUs): tiny-qwen2") {
  check_grid("tiny-qwen2", 2, 1, true);
}
TEST_CASE("cuda pipeline=2 over NCCL (2 GPUs): tiny-llama") {
  check_grid("tiny-llama", 1, 2, true);
}
TEST_CASE("cuda tensor=2 x pipeline=2 over NCCL (4 GPUs): tiny-qwen3-moe") {
  check_grid("tiny-qwen3-moe", 2, 2, true);
}

TEST_CASE("host-staged all-to-all over gloo (3 processes on one GPU): uneven and empty counts") {
  auto out = test::run_ranks(
      3,
      [&](int r, const std::filesystem::path& d) {
        if (auto why = cuda_unavailable_reason(); !why.empty())
          return write_result(d, r, "SKIP: " + why);
        auto ok = staged_all_to_all(d, r);
        return write_result(d, r, ok ? "ok" : "error: " + ok.error().to_string());
      },
      60s);
  for (size_t r = 0; r < out.size(); ++r) {
    CAPTURE(r);
    MESSAGE(out[r].message);
    CHECK(out[r].exit_code == 0);
  }
}

TEST_CASE("nccl at one rank: folder-store init, identities on f32 and bf16, graph capture") {
  auto out = test::run_ranks(
      1,
      [&](int, const std::filesystem::path& d) {
        return child(d, [&] { return nccl_one_rank(d); });
      },
      60s);
  MESSAGE(out[0].message);
  CHECK(out[0].exit_code == 0);
  CHECK((out[0].message.starts_with("ok") || out[0].message.starts_with("SKIP")));
}

TEST_CASE("nccl: a peer that never joins ends init with a timeout, not a hang") {
  // Rank 0 of 2 publishes the id; rank 1 never comes. Non-blocking init is aborted at 2 s.
  auto out = test::run_ranks(
      1,
      [&](int, const std::filesystem::path& d) {
        return child(d, [&]() -> expected<void> {
          auto store = comm::make_folder_store((d / "store").string());
          auto c = comm::make_nccl_communicator(*store, 0, 2, {.prefix = "lonely", .timeout = 2s});
          if (c)
            return make_error(errc::internal, "init with a missing peer succeeded");
          if (c.error().code() != errc::timeout)
            return std::move(c).error();
          return {};
        });
      },
      30s);
  MESSAGE(out[0].message);
  CHECK(out[0].exit_code == 0);
  CHECK((out[0].message.starts_with("ok") || out[0].message.starts_with("SKIP")));
}
