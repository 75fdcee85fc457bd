// The compute interface every backend implements (cpu/ float32 reference, cuda/ bf16). A worker
// owns one backend: its weight shard and its KV cache pool. forward() runs one step plan.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "engine/kv/kv_layout.hpp"
#include "engine/model/model_config.hpp"
#include "engine/sampling/logits.hpp"
#include "runtime/error.hpp"
#include "runtime/step.hpp"

namespace troupe::engine {

// The paged KV cache: num_blocks blocks of block_size tokens, per layer.
struct kv_cache_options {
  int32_t num_blocks = 256;
  int32_t block_size = 16;
};

// Told by a backend, during forward(), as each of its layers' keys and values for the step are
// written, so that finished layers can move (prefill/decode disaggregation pushes a prompt's KV
// layer by layer while the later layers compute). Called on the forward's thread; must not block.
class kv_layer_listener {
 public:
  virtual ~kv_layer_listener() = default;
  // Before a step's first layer: whether to hear of its layers.
  virtual bool step_begins(const step_plan& plan) = 0;
  // Layer `layer` (the model's index) of the step is in the KV cache once `written` returns (a
  // GPU backend's kernels may still run: it waits for them; it blocks, so call it elsewhere, and
  // before the backend's next step). Layers come in order.
  virtual void layer_written(int32_t layer, std::function<expected<void>()> written) = 0;
  // The step is over (`ok` false: it failed, and layers not heard of will not come).
  virtual void step_ends(bool ok) = 0;
};

class backend {
 public:
  virtual ~backend() = default;

  virtual const model_config& config() const = 0;
  virtual kv_cache_options kv_options() const = 0;

  // Feeds every seq_step's tokens at their positions, writes their keys and values into the KV
  // blocks named by the block tables, and fills `out` with the requested logits. The plan may mix
  // prefill chunks and decode tokens of many sequences. Blocks the calling thread until done.
  virtual expected<void> forward(const step_plan& plan, forward_output& out) = 0;
  // False on a pipeline stage before the last whose backend was told not to receive the logits
  // (pipelined serving: only the last stage samples): forward() then leaves out.logits empty.
  virtual bool makes_logits() const { return true; }
  // Where this rank's KV cache lives, for moving it to another deployment's ranks. Valid for the
  // backend's lifetime.
  virtual kv_layout kv_memory() const = 0;
  // From now on, tells `listener` (null: nobody) of every step's layers as they are written. The
  // backend keeps it alive and lets it go first when destroyed, before its KV memory (so that a
  // listener reading that memory stops in time). Unsupported unless a backend says otherwise.
  virtual expected<void> set_kv_listener(std::shared_ptr<kv_layer_listener> listener);
};

// Checks a plan against a model and KV layout: token ids within the vocabulary, block tables
// long enough and within the pool, no sequence twice. Backends call it before touching memory.
expected<void> validate_plan(const step_plan& plan, const model_config& config,
                             const kv_cache_options& kv);

// Sizes `out` for `plan` (first_row/num_rows; logits zero-filled, or left empty when
// !host_logits: a backend that keeps them on its device). Returns the row count.
int32_t prepare_output(const step_plan& plan, int64_t vocab_size, forward_output& out,
                       bool host_logits = true);

} // namespace troupe::engine
