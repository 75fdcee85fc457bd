#include "engine/exec/cuda_executor.hpp"

#include <chrono>

#include "runtime/log.hpp"

#include "engine/model/gguf_weights.hpp"

namespace troupe::engine {

expected<std::unique_ptr<cuda_executor>> cuda_executor::create(cuda_backend& model) {
  auto gpu = make_gpu_sampler();
  if (!gpu)
    return std::move(gpu).error();
  return std::unique_ptr<cuda_executor>(new cuda_executor(model, std::move(*gpu)));
}

bool cuda_executor::idle_work() {
  const auto t0 = std::chrono::steady_clock::now();
  auto more = model_.warm_up_next();
  warm_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!more) { // the next step reports what broke, if anything did
    log::warn("cuda: warming up decode batch sizes stopped: {}", more.error().to_string());
    return false;
  }
  if (*more) {
    ++warmed_;
    return true;
  }
  if (warmed_ > 0)
    log::info("cuda: {} decode batch sizes warmed up while idle (GEMMs timed, CUDA graphs "
              "captured) in {:.2f} s",
              warmed_, warm_s_);
  return false;
}

expected<step_result> cuda_executor::execute_filling(const step_plan& plan, const mask_fill& fill) {
  step_result result{.step = plan.step};
  if (fill && !model_.makes_logits())
    fill(); // nothing samples here; the masks stay correct for whoever reads the plan
  if (plan.seqs.empty()) {
    prepare_output(plan, model_.config().vocab_size, out_, false);
    TROUPE_TRY_VOID(host_.prepare(plan, out_)); // still drops state of finished sequences
    return result;
  }
  if (!model_.makes_logits()) { // a pipeline stage before the last: nothing to sample
    TROUPE_TRY_VOID(model_.forward(plan, out_));
    return result;
  }
  if (scores_prompt(plan)) { // prompt logprobs: every row's logits to the host, sampled there
    TROUPE_TRY_VOID(model_.forward(plan, out_));
    if (fill)
      fill();
    return host_.sample(plan, out_);
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto logits = model_.forward_on_device(plan, out_); // queued on the GPU, not waited for
  if (!logits)
    return std::move(logits).error();
  const auto queued = std::chrono::steady_clock::now();
  if (fill)
    fill(); // the grammar masks, on this thread while the GPU runs the forward pass
  auto jobs = host_.prepare(plan, out_);
  if (!jobs)
    return std::move(jobs).error();
  // Waits for the step even when no row is sampled (errors surface here, not a step later).
  auto outputs = gpu_->sample(*logits, model_.config().vocab_size, *jobs, model_.stream());
  if (!outputs)
    return std::move(outputs).error();
  log::debug(
      "cuda: step {} ({} tokens) queued in {:.0f} us, sampled {:.0f} us later", plan.step,
      plan.num_tokens(), std::chrono::duration<double, std::micro>(queued - t0).count(),
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - queued).count());
  for (size_t i = 0; i < jobs->size(); ++i) {
    auto& o = (*outputs)[i];
    o.id = plan.seqs[(*jobs)[i].seq].id;
    result.outputs.push_back(std::move(o));
  }
  return result;
}

expected<std::unique_ptr<cuda_backend>> load_cuda_backend(const std::filesystem::path& model,
                                                          kv_cache_options kv, cuda_options options,
                                                          const load_callback& progress) {
  if (auto why = cuda_unavailable_reason(); !why.empty())
    return make_error(errc::unsupported, "device: cuda cannot run here: {}", why);
  return open_model(model,
                    [&](model_config config,
                        const weight_source& weights) -> expected<std::unique_ptr<cuda_backend>> {
                      if (!progress || options.random_weights)
                        return make_cuda_backend(config, &weights, kv, options);
                      auto shard = plan_shard(config, options.layout);
                      if (!shard)
                        return std::move(shard).error();
                      auto total = total_read_bytes(
                          weights,
                          shard_weight_reads(config, *shard, options.layout, shard_reader::cuda));
                      if (!total)
                        return std::move(total).error();
                      load_progress counter(*total, progress);
                      const counted_weights counted(weights, counter);
                      options.progress = &counter;
                      auto b = make_cuda_backend(config, &counted, kv, options);
                      if (b)
                        counter.finish();
                      return b;
                    });
}

} // namespace troupe::engine
