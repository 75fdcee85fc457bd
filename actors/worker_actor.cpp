#include "actors/worker_actor.hpp"

#include <algorithm>
#include <chrono>
#include <memory>

#include "actors/head_rendezvous_store.hpp"
#include "actors/load_display.hpp"
#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/exec/cuda_executor.hpp"
#include "engine/exec/local_executor.hpp"
#include "engine/scheduler/scheduler.hpp"
#include "runtime/log.hpp"

namespace troupe::actors {

namespace {

using worker = caf::stateful_actor<worker_state, guarded_actor>;

engine::parallel_layout layout_of(const msg::worker_spec& s) {
  return {.tp_rank = s.tp_rank,
          .tp_size = s.tp_size,
          .pp_rank = s.pp_rank,
          .pp_size = s.pp_size,
          .ep_size = s.ep_size};
}

// device: cuda. Blocks: NCCL rendezvous, then uploading this rank's shard to its GPU.
expected<void> load_cuda(worker* self, const msg::worker_spec& spec,
                         const engine::load_callback& progress) {
  auto& st = self->state;
  const auto lay = layout_of(spec);
  const std::chrono::milliseconds timeout{spec.comm_timeout_ms};
  const std::chrono::milliseconds stage_wait{std::max(spec.comm_timeout_ms, spec.stage_wait_ms)};
  if (spec.tp_size > 1) {
    auto t = engine::comm::make_nccl_communicator(*st.store, spec.tp_rank, spec.tp_size,
                                                  {.device = spec.device,
                                                   .prefix = fmt::format("nccl-tp{}", spec.pp_rank),
                                                   .timeout = timeout});
    if (!t)
      return std::move(t).error().context("tensor group");
    st.gpu_tensor = std::move(*t);
  }
  if (spec.pp_size > 1) {
    auto w = engine::comm::make_nccl_communicator(
        *st.store, lay.world_rank(), lay.world_size(),
        {.device = spec.device, .prefix = "nccl-world", .timeout = stage_wait});
    if (!w)
      return std::move(w).error().context("pipeline group");
    st.gpu_world = std::move(*w);
  }
  engine::cuda_options o{.device = spec.device,
                         .max_num_batched_tokens = std::max(spec.max_num_batched_tokens, 1),
                         .max_num_seqs = spec.max_num_seqs,
                         .max_logit_rows = spec.max_num_seqs + engine::default_prompt_logprob_rows,
                         .max_model_len = spec.max_model_len,
                         .gpu_memory_utilization = spec.gpu_memory_utilization,
                         .layout = lay,
                         .tensor = st.gpu_tensor.get(),
                         .world = st.gpu_world.get(),
                         .broadcast_logits = false}; // only the last stage samples
  auto model = engine::load_cuda_backend(
      spec.model, {.num_blocks = spec.num_blocks, .block_size = spec.block_size}, o, progress);
  if (!model)
    return std::move(model).error();
  auto exec = engine::cuda_executor::create(**model);
  if (!exec)
    return std::move(exec).error();
  st.model = std::move(*model);
  st.exec = std::move(*exec);
  return {};
}

// Blocks: Gloo (cpu) or NCCL (cuda) rendezvous with the other ranks, then reading this rank's
// weight shard, reporting its progress to `progress`.
expected<void> load(worker* self, const msg::worker_spec& spec, const worker_context& ctx,
                    const engine::load_callback& progress) {
  auto& st = self->state;
  const auto lay = layout_of(spec);
  const std::chrono::milliseconds timeout{spec.comm_timeout_ms};
  const std::chrono::milliseconds stage_wait{std::max(spec.comm_timeout_ms, spec.stage_wait_ms)};
  st.store = std::make_unique<head_rendezvous_store>(self->system(), ctx.head, ctx.token, spec.ns);
  if (spec.backend == "cuda")
    return load_cuda(self, spec, progress);
  if (spec.tp_size > 1) {
    auto t = engine::comm::make_gloo_communicator(
        *st.store, spec.tp_rank, spec.tp_size,
        {.hostname = ctx.address, .prefix = fmt::format("tp{}", spec.pp_rank), .timeout = timeout});
    if (!t)
      return std::move(t).error().context("tensor group");
    st.tensor = std::move(*t);
  } else {
    st.tensor = engine::comm::make_single_rank_communicator();
  }
  if (spec.pp_size > 1) {
    auto w = engine::comm::make_gloo_communicator(
        *st.store, lay.world_rank(), lay.world_size(),
        {.hostname = ctx.address, .prefix = "world", .timeout = stage_wait});
    if (!w)
      return std::move(w).error().context("pipeline group");
    st.world = std::move(*w);
  }
  auto model = engine::cpu_backend::load(
      spec.model, {.num_blocks = spec.num_blocks, .block_size = spec.block_size},
      {lay, st.tensor.get(), st.world.get(), /*broadcast_logits=*/false}, progress);
  if (!model)
    return std::move(model).error();
  st.exec = std::make_unique<engine::local_executor>(**model);
  st.model = std::move(*model);
  return {};
}

// Sends each report of this rank's load to `to` (the sender of load_atom) as this worker (from the
// loading threads: send_as is safe off the actor's thread), and logs its 10% steps.
engine::load_callback progress_to(worker* self, const caf::actor& to, const msg::worker_spec& spec,
                                  int32_t rank) {
  auto steps = std::make_shared<progress_steps>();
  return [me = caf::actor_cast<caf::actor>(self), to, spec, rank,
          steps](const engine::load_report& r) {
    msg::rank_progress p{.deployment = spec.deployment,
                         .role = spec.kv_role,
                         .rank = rank,
                         .tp_rank = spec.tp_rank,
                         .pp_rank = spec.pp_rank,
                         .bytes = r.bytes,
                         .total = r.total,
                         .elapsed_s = r.elapsed_s,
                         .done = r.done};
    if (steps->due(p))
      log::info("worker {} rank {}: {} of {} read ({}%)", spec.deployment, rank,
                format_bytes(static_cast<double>(r.bytes)),
                format_bytes(static_cast<double>(r.total)), percent_of(r.bytes, r.total));
    caf::send_as(me, to, msg::progress_atom::value, std::move(p));
  };
}

// A disaggregated deployment's rank: its KV cache registered with the transfer provider.
expected<void> open_kv(worker* self, const msg::worker_spec& spec, const worker_context& ctx,
                       int32_t rank) {
  if (spec.kv_role.empty())
    return {};
  // Staged KV has room for two full contexts unless model.yaml says otherwise.
  const int32_t tokens =
      spec.kv_staging_tokens > 0 ? spec.kv_staging_tokens : 2 * std::max(spec.max_model_len, 1);
  auto kv = serve::kv_rank_endpoint::open({.role = spec.kv_role,
                                           .provider = spec.kv_provider,
                                           .host = ctx.address,
                                           .staging = spec.kv_staging,
                                           .staging_tokens = tokens,
                                           .cuda_ipc = spec.kv_cuda_ipc},
                                          self->state.model->kv_memory(), rank);
  if (!kv)
    return std::move(kv).error().context(
        fmt::format("the {} group's KV transfer endpoint", spec.kv_role));
  if (spec.kv_role == "prefill") // its layers go out as the backend writes them
    TROUPE_TRY_VOID(self->state.model->set_kv_listener((*kv)->pusher()));
  const auto staging = (*kv)->staging();
  log::info("worker {} rank {}: {} KV over {}{}{}", spec.deployment, rank, spec.kv_role,
            (*kv)->provider(), staging.empty() ? "" : ", " + staging,
            (*kv)->describe().endpoint.empty() ? ""
                                               : ", listening at " + (*kv)->describe().endpoint);
  self->state.kv = std::move(*kv);
  return {};
}

} // namespace

caf::behavior worker_actor(caf::stateful_actor<worker_state, guarded_actor>* self,
                           msg::worker_spec spec, worker_context ctx) {
  const int32_t rank = layout_of(spec).world_rank();
  if (ctx.owner)
    self->monitor(ctx.owner);
  self->set_down_handler([self, spec, rank](caf::down_msg&) {
    log::info("worker {} rank {}: its serving actor is gone; exiting", spec.deployment, rank);
    self->quit();
  });
  log::info("worker {} rank {} (tp {}/{}, pp {}/{}) started on device {}", spec.deployment, rank,
            spec.tp_rank, spec.tp_size, spec.pp_rank, spec.pp_size, spec.device);
  // The serving side (the owner's process) drives this rank; nobody else may.
  const caf::node_id serving_node = ctx.owner ? ctx.owner.node() : self->node();
  // The serving side stops ranks with exit messages (linked replica actors, anon_send_exit).
  self->set_exit_policy({.trusted = serving_node, .anonymous = true});
  auto from_serving = [self, serving_node](const char* what) {
    if (same_process(self->current_sender(), serving_node))
      return true;
    self->refuse_current(what, fmt::format("{} (not from the serving process)", what));
    return false;
  };
  return {
      [self, spec, ctx, rank, from_serving](msg::load_atom) {
        if (!from_serving("load"))
          return;
        auto sender = caf::actor_cast<caf::actor>(self->current_sender());
        msg::worker_reply reply{.rank = rank};
        log::info("worker {} rank {}: loading {} on {} ...", spec.deployment, rank, spec.model,
                  spec.backend);
        const auto t0 = std::chrono::steady_clock::now();
        if (auto ok = load(self, spec, ctx, progress_to(self, sender, spec, rank)); !ok) {
          reply.error = ok.error().to_string();
          log::error("worker {} rank {}: load failed: {}", spec.deployment, rank, reply.error);
        } else if (auto kv = open_kv(self, spec, ctx, rank); !kv) {
          reply.error = kv.error().to_string();
          log::error("worker {} rank {}: {}", spec.deployment, rank, reply.error);
        } else {
          reply.kv_blocks = self->state.model->kv_options().num_blocks;
          if (self->state.kv)
            reply.kv = self->state.kv->describe();
          log::info("worker {} rank {}: loaded {} in {:.1f} s ({} KV blocks)", spec.deployment,
                    rank, spec.model,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                    reply.kv_blocks);
        }
        self->send(sender, std::move(reply));
      },
      [self, spec, rank, from_serving](msg::execute_atom, uint64_t ticket, step_plan& plan) {
        if (!from_serving("execute"))
          return;
        auto sender = caf::actor_cast<caf::actor>(self->current_sender());
        msg::worker_reply reply{.rank = rank, .ticket = ticket};
        auto& st = self->state;
        if (!st.exec) {
          reply.error = "not loaded";
        } else if (auto r = st.exec->run(plan); r) {
          reply.result = std::move(*r);
        } else {
          reply.error = r.error().to_string();
          log::error("worker {} rank {}: step {} failed: {}", spec.deployment, rank, plan.step,
                     reply.error);
        }
        self->send(sender, std::move(reply));
      },
      [self, from_serving](msg::link_atom, const msg::kv_link& link) -> std::string {
        if (!from_serving("link"))
          return "link: not accepted from this sender";
        if (!self->state.kv)
          return "this rank has no KV transfer endpoint";
        auto ok = self->state.kv->link(link);
        return ok ? std::string() : ok.error().to_string();
      },
      [self, from_serving](msg::push_atom, const msg::kv_push& push) {
        if (!from_serving("push"))
          return;
        auto sender = caf::actor_cast<caf::actor>(self->current_sender());
        if (self->state.kv)
          self->state.kv->push(push, sender);
        else
          self->send(sender, msg::kv_pushed_atom::value,
                     msg::kv_pushed{.lease = push.lease,
                                    .rank = 0,
                                    .error = "this rank has no KV transfer endpoint"});
      },
      [self, serving_node](msg::cancel_atom, uint64_t lease) {
        if (self->current_sender() && !same_process(self->current_sender(), serving_node))
          return self->refuse_current("cancel", "cancel (not from the serving process)");
        if (self->state.kv)
          self->state.kv->cancel(lease);
      },
      [self, from_serving](msg::unstage_atom, msg::kv_unstage& job) {
        if (!from_serving("unstage"))
          return;
        auto sender = caf::actor_cast<caf::actor>(self->current_sender());
        if (self->state.kv)
          self->state.kv->unstage(std::move(job), sender);
        else
          self->send(sender, msg::unstaged_atom::value,
                     msg::kv_pushed{.lease = job.lease,
                                    .rank = 0,
                                    .error = "this rank has no KV transfer endpoint"});
      },
      [self, from_serving](msg::kv_notify_atom) {
        if (!from_serving("kv_notify"))
          return;
        if (self->state.kv)
          self->state.kv->notify(caf::actor_cast<caf::actor>(self->current_sender()));
      },
  };
}

} // namespace troupe::actors
