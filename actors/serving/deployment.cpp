#include "actors/serving/deployment.hpp"

#include <algorithm>
#include <chrono>

#include <caf/actor_system_config.hpp>

#include "actors/serving/handoff_links.hpp"
#include "cluster/resources.hpp"
#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/exec/cuda_executor.hpp"
#include "engine/exec/local_executor.hpp"
#include "engine/exec/threaded_executor.hpp"
#include "engine/model/gguf_weights.hpp"
#include "engine/sampling/sampler.hpp"
#include "engine/scheduler/scheduler.hpp"
#include "http/http_server.hpp"
#include "runtime/log.hpp"

namespace troupe::serve {

struct deployment::parts {
  // In-process deployments only: the replica actor's system, joined last.
  std::unique_ptr<caf::actor_system_config> own_config;
  std::unique_ptr<caf::actor_system> own_system;
  engine::model_tokenizer text;
  std::shared_ptr<engine::grammar_compiler> grammar; // structured output over `text`
  std::unique_ptr<replica_router> router;
  size_t decoding = 0; // replicas [0, decoding) decode (or serve whole); the rest prefill
  serve_metrics metrics;
  std::unique_ptr<serve_context> ctx;
  std::unique_ptr<http_server> server;
};

namespace {

// A replica in this process: its executor on a thread of its own, owning the backend it runs on.
std::unique_ptr<engine::executor> in_process(std::unique_ptr<engine::backend> model,
                                             std::unique_ptr<engine::executor> exec) {
  return std::make_unique<engine::threaded_executor>(std::move(exec), std::move(model));
}

// Loads the model onto GPU 0 (bf16) with the KV pool sized from gpu_memory_utilization unless
// num_kv_blocks fixes it; kv.num_blocks becomes the pool's real size.
// Replicas in this process share GPU 0: the k-th of n to load may fill it up to (k+1)/n of
// gpu_memory_utilization (the CUDA backend sizes its KV pool from what is still free), so each
// gets an equal share.
double share(const deployment_config& c, int32_t k, int32_t n) {
  return c.gpu_memory_utilization * (k + 1) / n;
}

// A replica in this process, where its KV cache lives and its backend (owned by r.exec).
struct local_replica {
  replica_executor r;
  engine::kv_layout kv;
  engine::backend* model = nullptr;
};

using progress_fn = std::function<void(const msg::rank_progress&)>;

// The load progress of replica `replica` of group `role` in this process, for `progress`; none
// when `progress` is unset.
engine::load_callback replica_progress(const progress_fn& progress, const deployment_config& c,
                                       const std::string& role, int32_t replica) {
  if (!progress)
    return {};
  return [&progress, name = c.served_model_name, role, replica](const engine::load_report& r) {
    progress({.deployment = name,
              .role = role,
              .replica = replica,
              .bytes = r.bytes,
              .total = r.total,
              .elapsed_s = r.elapsed_s,
              .done = r.done});
  };
}

expected<local_replica> start_cuda(const deployment_config& c, const kv_plan& kv,
                                   const engine::load_callback& progress) {
  engine::cuda_options o{.device = 0,
                         .max_num_batched_tokens = std::max(c.max_num_batched_tokens, 1),
                         .max_num_seqs = c.max_num_seqs,
                         .max_logit_rows = c.max_num_seqs + engine::default_prompt_logprob_rows,
                         .max_model_len = kv.max_model_len,
                         .gpu_memory_utilization = static_cast<float>(c.gpu_memory_utilization)};
  const auto t0 = std::chrono::steady_clock::now();
  auto model = engine::load_cuda_backend(
      c.model, {.num_blocks = c.num_kv_blocks, .block_size = c.block_size}, o, progress);
  if (!model)
    return std::move(model).error().context("device: cuda, model " + c.model);
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t per_seq = (kv.max_model_len + c.block_size - 1) / c.block_size;
  const int32_t blocks = (*model)->kv_options().num_blocks;
  if (blocks < per_seq)
    return make_error(errc::resource_exhausted,
                      "device: cuda: the KV pool has {} blocks of {} tokens ({:.2f} GiB after "
                      "{:.2f} GiB of weights at gpu_memory_utilization {}), fewer than one context "
                      "of max_model_len {} needs ({}); raise gpu_memory_utilization or lower "
                      "max_model_len",
                      blocks, c.block_size, (*model)->kv_bytes() / 1073741824.0,
                      (*model)->weight_bytes() / 1073741824.0, c.gpu_memory_utilization,
                      kv.max_model_len, per_seq);
  auto exec = engine::cuda_executor::create(**model);
  if (!exec)
    return std::move(exec).error();
  log::info("device: cuda: {:.2f} GiB of bf16 weights, {} KV blocks of {} tokens ({:.2f} GiB)",
            (*model)->weight_bytes() / 1073741824.0, blocks, c.block_size,
            (*model)->kv_bytes() / 1073741824.0);
  const auto t = (*model)->load_timings();
  log::info("device: cuda: loaded in {:.2f} s: weights {:.2f} s ({:.2f} GB from the files at "
            "{:.1f} GB/s; reading into staging {:.2f} s over {} threads, overlapped with the "
            "upload), workspace {:.2f} s, KV pool {:.2f} s, the rest (config, CUDA context, "
            "cuBLASLt) {:.2f} s",
            load_s, t.weights_s, t.weight_file_bytes / 1e9,
            t.weights_s > 0 ? t.weight_file_bytes / 1e9 / t.weights_s : 0.0,
            t.loader_threads > 0 ? t.read_s / t.loader_threads : 0.0, t.loader_threads,
            t.workspace_s, t.kv_s, load_s - t.weights_s - t.workspace_s - t.kv_s);
  auto layout = (*model)->kv_memory();
  engine::backend* backend = model->get();
  return local_replica{
      {in_process(std::move(*model), std::move(*exec)), blocks}, std::move(layout), backend};
}

expected<local_replica> start_local(const deployment_config& c, const kv_plan& kv,
                                    const engine::load_callback& progress) {
  if (c.device == "cuda")
    return start_cuda(c, kv, progress);
  auto model = engine::cpu_backend::load(
      c.model, {.num_blocks = kv.num_blocks, .block_size = c.block_size}, {}, progress);
  if (!model)
    return std::move(model).error();
  auto layout = (*model)->kv_memory();
  auto exec = std::make_unique<engine::local_executor>(**model);
  engine::backend* backend = model->get();
  return local_replica{
      {in_process(std::move(*model), std::move(exec)), kv.num_blocks}, std::move(layout), backend};
}

// Both groups of a disaggregated deployment in this process, linked: the decode replicas, then
// the prefill replicas (their prefill role set).
expected<std::vector<replica_executor>> start_disaggregated(const resolved_deployment& rd,
                                                            const progress_fn& progress) {
  const auto& c = rd.config;
  const auto& d = c.disaggregation;
  std::vector<local_replica> groups[2]; // decode, prefill: rd.groups' order
  const int32_t all = d.decode.parallel.replicas + d.prefill.parallel.replicas;
  int32_t loaded = 0;
  for (int g = 0; g < 2; ++g) {
    const auto& group = rd.groups.at(static_cast<size_t>(g));
    deployment_config gc = c;
    gc.block_size = group.group.block_size;
    for (int32_t i = 0; i < group.group.parallel.replicas; ++i) {
      gc.gpu_memory_utilization = share(c, loaded++, all);
      auto r = start_local(gc, group.kv, replica_progress(progress, c, group.group.role, i));
      if (!r)
        return std::move(r).error().context(fmt::format("{} replica {}", group.group.role, i));
      r->r.block_size = gc.block_size;
      groups[g].push_back(std::move(*r));
    }
  }
  std::vector<engine::kv_layout> layouts[2];
  for (int g = 0; g < 2; ++g)
    for (const auto& r : groups[g])
      layouts[g].push_back(r.kv);
  std::vector<std::shared_ptr<void>> decode_owners; // their executors own their KV memory
  for (const auto& r : groups[0])
    decode_owners.push_back(r.r.exec);
  auto links = link_in_process(d, layouts[1], layouts[0], decode_owners);
  if (!links)
    return std::move(links).error();
  log::info("disaggregation: {} prefill -> {} decode replica(s), {}", groups[1].size(),
            groups[0].size(), links->describe);
  std::vector<replica_executor> out;
  for (size_t i = 0; i < groups[0].size(); ++i) {
    groups[0][i].r.decode = links->decode[i];
    out.push_back(std::move(groups[0][i].r));
  }
  for (size_t i = 0; i < groups[1].size(); ++i) {
    auto& r = groups[1][i].r;
    // The backend reports its layers to its pusher, which it owns (and stops before its KV
    // memory goes).
    TROUPE_TRY_VOID(groups[1][i].model->set_kv_listener(links->pushers[i]));
    r.prefill = links->prefill[i];
    out.push_back(std::move(r));
  }
  return out;
}

} // namespace

expected<std::unique_ptr<deployment>> deployment::start(const deployment_config& config,
                                                        std::string version,
                                                        const progress_fn& progress) {
  for (const auto& g : replica_groups(config))
    if (g.parallel.tensor != 1 || g.parallel.pipeline != 1)
      return make_error(errc::unsupported,
                        "{}tensor={} pipeline={}: serving in this process (--block) runs one rank "
                        "per replica; serve through the cluster (`cluster serve` without --block)",
                        g.role.empty() ? "parallel " : "disaggregation." + g.role + ": ",
                        g.parallel.tensor, g.parallel.pipeline);
  auto model = engine::peek_model_config(config.model);
  if (!model)
    return std::move(model).error().context("model " + config.model);
  std::string auto_device;
  if (config.device == "auto") { // cuda where this process sees a GPU, else cpu
    const auto here = cluster::discover_resources();
    const auto choice = cluster::choose_device(here.gpus, here.gpu_discovery_note);
    log::info("device auto -> {} ({})", choice.device, choice.why);
    auto_device = choice.device;
  }
  auto rd = resolve(config, std::move(*model), auto_device);
  if (!rd)
    return std::move(rd).error();
  auto cfg = std::make_unique<caf::actor_system_config>();
  cfg->set("scheduler.max-threads", size_t{1}); // the replica actors are detached
  auto sys = std::make_unique<caf::actor_system>(*cfg);
  auto d =
      start(*rd, std::move(version), *sys,
            [&progress](const resolved_deployment& r) -> expected<std::vector<replica_executor>> {
              if (r.config.disaggregation.enabled)
                return start_disaggregated(r, progress);
              std::vector<replica_executor> all;
              deployment_config rc = r.config;
              const int32_t n = rc.parallel.replicas;
              for (int32_t i = 0; i < n; ++i) {
                rc.gpu_memory_utilization = share(r.config, i, n);
                auto one = start_local(rc, r.groups.front().kv,
                                       replica_progress(progress, r.config, "", i));
                if (!one)
                  return std::move(one).error().context(fmt::format("replica {}", i));
                all.push_back(std::move(one->r));
              }
              return all;
            });
  if (d) {
    (*d)->parts_->own_config = std::move(cfg);
    (*d)->parts_->own_system = std::move(sys);
  } else {
    sys.reset(); // joins a replica actor started before the failure
  }
  return d;
}

expected<std::unique_ptr<deployment>> deployment::start(const resolved_deployment& rd,
                                                        std::string version, caf::actor_system& sys,
                                                        const executor_factory& make_executor) {
  const auto& c = rd.config;
  const auto* config = &rd.model;
  const auto* kv = &rd.groups.front().kv; // the serving (decode) group's
  auto d = std::unique_ptr<deployment>(new deployment());
  d->parts_ = std::make_unique<parts>();
  auto& p = *d->parts_;
  auto text = engine::model_tokenizer::load_for_model(c.model);
  if (!text)
    return std::move(text).error().context("tokenizer of " + c.model);
  p.text = std::move(*text);
  auto replicas = make_executor(rd);
  if (!replicas)
    return std::move(replicas).error();
  const size_t decoding = static_cast<size_t>(
      c.disaggregation.enabled ? c.disaggregation.decode.parallel.replicas : c.parallel.replicas);
  const auto prefilling = static_cast<size_t>(
      std::count_if(replicas->begin(), replicas->end(), [](const auto& r) { return r.prefill; }));
  if (replicas->size() - prefilling != decoding)
    return make_error(errc::internal, "{} executors for {} replicas", replicas->size() - prefilling,
                      decoding);

  engine::scheduler_options so{.num_blocks = kv->num_blocks,
                               .block_size = c.block_size,
                               .prefix_caching = c.prefix_caching,
                               .max_num_batched_tokens = c.max_num_batched_tokens,
                               .max_num_seqs = c.max_num_seqs,
                               .max_waiting = c.max_waiting,
                               .max_model_len = kv->max_model_len,
                               .vocab_size = config->vocab_size,
                               .eos_token_ids = p.text.eos_ids,
                               .seed = c.seed};
  if (so.eos_token_ids.empty())
    so.eos_token_ids = config->eos_token_ids;
  TROUPE_TRY_VOID(engine::validate(so));
  {
    const auto t0 = std::chrono::steady_clock::now();
    auto g = engine::grammar_compiler::create(*p.text.text, config->vocab_size, so.eos_token_ids);
    if (!g)
      log::warn("structured output is off for {}: {}", c.served_model_name, g.error().message());
    else
      p.grammar = std::move(*g);
    log::info("structured output (xgrammar): vocabulary of {} tokens indexed in {:.2f} s",
              config->vocab_size,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  p.router = std::make_unique<replica_router>(sys, c.served_model_name, decoding, so);
  p.decoding = decoding;
  int32_t blocks = 0;
  size_t next_decode = 0, next_prefill = 0;
  for (auto& r : *replicas) {
    if (r.prefill) {
      TROUPE_TRY_VOID(p.router->install_prefill(next_prefill++, std::move(r)));
      continue;
    }
    blocks = next_decode == 0 ? r.num_blocks : std::min(blocks, r.num_blocks);
    TROUPE_TRY_VOID(p.router->install(next_decode++, std::move(r)));
  }
  p.ctx = std::make_unique<serve_context>();
  p.ctx->options = {.host = c.host,
                    .port = static_cast<uint16_t>(c.port),
                    .api_key = c.api_key,
                    .open_health_metrics = c.open_health_metrics,
                    .stats_interval_s = c.log_stats_interval_s,
                    .version = std::move(version),
                    .limits = c.http};
  p.ctx->model = {.name = c.served_model_name,
                  .max_model_len = kv->max_model_len,
                  .vocab_size = config->vocab_size,
                  .text = &p.text,
                  .grammar = p.grammar.get()};
  p.ctx->serving = p.router.get();
  p.ctx->metrics = &p.metrics;
  p.server = std::make_unique<http_server>(*p.ctx);
  auto port = p.server->start();
  if (!port)
    return std::move(port).error();
  d->port_ = *port;
  d->host_ = c.host;
  d->name_ = c.served_model_name;
  d->max_model_len_ = kv->max_model_len;
  d->num_kv_blocks_ = blocks;
  return d;
}

void deployment::drain(double grace_s) {
  if (parts_ && parts_->server)
    parts_->server->drain(std::chrono::duration<double>(grace_s));
}

void deployment::take_down(size_t replica, const std::string& why) {
  if (replica >= parts_->decoding)
    return parts_->router->take_down_prefill(replica - parts_->decoding, why);
  parts_->router->take_down(replica, why);
}

expected<void> deployment::replace(size_t replica, replica_executor r) {
  if (replica >= parts_->decoding)
    return parts_->router->install_prefill(replica - parts_->decoding, std::move(r));
  return parts_->router->install(replica, std::move(r));
}

deployment::~deployment() {
  if (!parts_)
    return;
  if (parts_->server)
    parts_->server->stop(); // sessions end (their requests cancelled) before the replicas stop
  parts_->server.reset();
  parts_->router.reset();
  parts_->own_system.reset(); // in-process: waits for the replica actor's last step
}

} // namespace troupe::serve
