#include "cli/serve/serving_actor.hpp"

#include <algorithm>

#include <caf/after.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/caf_glue.hpp"
#include "actors/remote_executor.hpp"
#include "cli/serve/deployment.hpp"
#include "runtime/log.hpp"
#include "runtime/messages.hpp"

namespace troupe::serve {

namespace {

using serving = caf::stateful_actor<serving_state>;
using namespace std::chrono_literals;
constexpr auto load_timeout = 300s;

// Asks each rank's node to spawn its worker. Blocks.
expected<std::vector<caf::actor>> spawn_workers(serving* self, const msg::deployment_plan& plan,
                                                const kv_plan& kv) {
  const auto& c = plan.config;
  caf::scoped_actor s{self->system()};
  std::vector<caf::actor> workers(plan.ranks.size());
  for (size_t i = 0; i < plan.ranks.size(); ++i) {
    const auto& r = plan.ranks[i];
    if (i >= plan.nodes.size() || !plan.nodes[i])
      return make_error(errc::unavailable, "node {} of rank {} is not connected to the head",
                        r.node_id, i);
    msg::worker_spec spec{.deployment = c.served_model_name,
                          .ns = plan.ns,
                          .model = c.model,
                          .tp_rank = r.tp_rank,
                          .tp_size = c.parallel.tensor,
                          .pp_rank = r.pp_rank,
                          .pp_size = c.parallel.pipeline,
                          .device = r.device,
                          // cuda: 0 lets each GPU size its pool from gpu_memory_utilization
                          .num_blocks = c.device == "cuda" ? c.num_kv_blocks : kv.num_blocks,
                          .block_size = c.block_size,
                          .backend = c.device,
                          .max_model_len = kv.max_model_len,
                          .max_num_seqs = c.max_num_seqs,
                          .max_num_batched_tokens = c.max_num_batched_tokens,
                          .gpu_memory_utilization = static_cast<float>(c.gpu_memory_utilization)};
    troupe::error err;
    s->request(plan.nodes[i], 10s, msg::spawn_atom::value, std::move(spec),
               caf::actor_cast<caf::actor>(self))
        .receive([&](caf::actor& w) { workers[i] = std::move(w); },
                 [&](caf::error& e) { err = actors::from_caf(e, &self->system()); });
    if (err)
      return std::move(err).context(fmt::format("spawning rank {} on node {}", i, r.node_id));
    self->state.workers.push_back(workers[i]);
  }
  return workers;
}

// Has every worker load its shard; fails on the first error or a worker that dies. Blocks.
// Returns the smallest KV pool among the ranks (the pool the scheduler may use).
expected<int32_t> load_workers(serving* self, const std::vector<caf::actor>& workers,
                            const msg::deployment_plan& plan) {
  caf::scoped_actor s{self->system()};
  for (const auto& w : workers) {
    s->monitor(w);
    s->send(w, msg::load_atom::value);
  }
  size_t loaded = 0;
  int32_t blocks = 0;
  std::string err;
  const auto deadline = std::chrono::steady_clock::now() + load_timeout;
  while (loaded < workers.size() && err.empty()) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    s->receive(
        [&](msg::worker_reply& r) {
          if (!r.error.empty())
            err = fmt::format("rank {} on node {} failed to load: {}", r.rank,
                              plan.ranks.at(static_cast<size_t>(r.rank)).node_id, r.error);
          else
            blocks = loaded++ == 0 ? r.kv_blocks : std::min(blocks, r.kv_blocks);
        },
        [&](caf::down_msg& dm) {
          err = "a worker died while loading (" + self->system().render(dm.reason) + ")";
        },
        caf::after(std::max(left, std::chrono::milliseconds(1))) >>
            [&] { err = fmt::format("ranks did not load within {} s", load_timeout.count()); });
  }
  if (!err.empty())
    return make_error(errc::unavailable, "{}", err);
  return blocks;
}

expected<std::string> start(serving* self, const caf::actor& head, const std::string& version,
                            const msg::deployment_plan& plan) {
  const auto& c = plan.config;
  const std::string name = c.served_model_name;
  auto factory = [&](const engine::model_config&,
                     kv_plan& kv) -> expected<std::unique_ptr<engine::executor>> {
    auto workers = spawn_workers(self, plan, kv);
    if (!workers)
      return std::move(workers).error();
    auto blocks = load_workers(self, *workers, plan);
    if (!blocks)
      return std::move(blocks).error();
    const int32_t per_seq = (kv.max_model_len + c.block_size - 1) / c.block_size;
    if (*blocks < per_seq)
      return make_error(errc::resource_exhausted,
                        "the smallest rank's KV pool has {} blocks of {} tokens, fewer than one "
                        "context of max_model_len {} needs ({}); raise gpu_memory_utilization or "
                        "lower max_model_len",
                        *blocks, c.block_size, kv.max_model_len, per_seq);
    kv.num_blocks = *blocks; // cpu: the planned pool; cuda: what the GPUs had room for
    // The last stage's tensor rank 0 answers (it samples). A plan passes every stage, each of
    // which may wait up to stage_wait_ms for the one before it.
    const size_t answer = static_cast<size_t>(c.parallel.pipeline - 1) * c.parallel.tensor;
    const auto step_timeout = msg::worker_spec::stage_wait_ms * 1ms * c.parallel.pipeline + 5s;
    auto& sys = self->system();
    auto on_failure = [head, name](const std::string& why) {
      caf::anon_send(head, msg::ready_atom::value, name, std::string("failed"), why);
    };
    return std::unique_ptr<engine::executor>(std::make_unique<actors::remote_executor>(
        sys, std::move(*workers), answer, step_timeout, on_failure, c.parallel.pipeline));
  };
  auto d = deployment::start(c, version, factory);
  if (!d)
    return std::move(d).error();
  self->state.served = std::move(*d);
  const auto& served = *self->state.served;
  return fmt::format("http://{}:{}/v1", served.host(), served.port());
}

} // namespace

serving_state::~serving_state() {
  served.reset(); // HTTP server and engine first: in-flight requests end before the workers go
  for (auto& w : workers)
    caf::anon_send_exit(w, caf::exit_reason::user_shutdown);
}

caf::behavior serving_actor(caf::stateful_actor<serving_state>* self, caf::actor head,
                            std::string version) {
  return {
      [self, head, version](msg::deploy_atom,
                            const msg::deployment_plan& plan) -> caf::result<std::string> {
        log::info("serving: starting '{}' on {} rank(s)", plan.config.served_model_name,
                  plan.ranks.size());
        auto endpoint = start(self, head, version, plan);
        if (!endpoint) {
          log::error("serving: '{}' failed to start: {}", plan.config.served_model_name,
                     endpoint.error().to_string());
          for (auto& w : self->state.workers)
            self->send_exit(w, caf::exit_reason::user_shutdown);
          self->state.workers.clear();
          return actors::to_caf(endpoint.error());
        }
        log::info("serving: '{}' at {}", plan.config.served_model_name, *endpoint);
        return *endpoint;
      },
  };
}

} // namespace troupe::serve
