// How one rank of a tensor x pipeline grid slices a model (design.md §5): whole attention heads
// per tensor rank (kv heads replicated when tensor > num_key_value_heads), MLP intermediate and
// vocabulary split in contiguous ranges, MoE experts placed by expert parallelism (below),
// contiguous layer ranges per pipeline stage.
//
// Expert parallelism (parallel.expert = G, default tensor): the tensor ranks of a stage form G
// expert groups of tensor/G consecutive ranks; group g holds the whole experts
// split_range(num_experts, G, g), and the ranks of a group slice each of those experts'
// intermediate dimension (gate/up rows, down columns). G = tensor: whole experts on every rank
// (vLLM's --enable-expert-parallel); G = 1: every rank holds a slice of every expert (vLLM's
// default). Attention stays tensor-parallel, so tokens are replicated on every rank after its
// all-reduce: each rank runs its experts (or slices) on the tokens routed to them and the MoE
// combine is the same all-reduce as a dense MLP's. Pure functions: the backends call them at load,
// the placement planner calls check_parallel_layout to reject impossible layouts before placing
// anything.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/kv/kv_layout.hpp"
#include "engine/model/model_config.hpp"
#include "engine/model/weight_source.hpp"
#include "runtime/error.hpp"

namespace troupe::engine {

struct parallel_layout {
  int tp_rank = 0, tp_size = 1;
  int pp_rank = 0, pp_size = 1;
  int ep_size = 0; // expert groups among the tensor ranks (parallel.expert); 0: tp_size
  int expert_groups() const { return ep_size > 0 ? ep_size : tp_size; }
  // Rank in the whole grid: stages are consecutive blocks of tp_size ranks.
  int world_rank() const { return pp_rank * tp_size + tp_rank; }
  int world_size() const { return tp_size * pp_size; }
};

// [begin, end) of one dimension.
struct index_range {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
  bool contains(int64_t i) const { return i >= begin && i < end; }
};

// Rank r's share of n items split as evenly as possible over `parts` contiguous ranges.
index_range split_range(int64_t n, int parts, int r);

struct shard_plan {
  index_range heads;        // query heads of this tensor rank
  index_range kv_heads;     // its key/value heads (one replicated head when tensor > kv heads)
  index_range intermediate; // dense MLP rows of gate/up, columns of down
  index_range experts;      // MoE experts of this rank's expert group
  index_range expert_slice; // the rows of moe_intermediate_size each of them has here
  index_range vocab;        // embedding and lm_head rows
  int64_t vocab_chunk = 0;  // ceil(vocab / tensor): the padded slice size of the logits gather
  index_range layers;       // this pipeline stage's decoder layers
  bool first_stage() const { return layers.begin == 0; }
};

// The reasons a layout cannot serve `config`, e.g. "num_attention_heads=40 is not divisible by
// tensor=3"; the first one found. Ranks are not looked at. expert: parallel.expert (0: tensor).
expected<void> check_parallel_layout(const model_config& config, int tensor, int pipeline,
                                     int expert = 0);

// This rank's slices; fails like check_parallel_layout, or for ranks outside the grid.
expected<shard_plan> plan_shard(const model_config& config, const parallel_layout& layout);

// The backends read slightly different sets: the CUDA backend keeps the final norm on every
// stage and the o_proj bias on every tensor rank; the CPU backend only where it applies them.
// Slices of one tensor as the loaders read them: rows r, columns r of a 2-D one, or all of it.
weight_slice rows_of(std::string name, std::vector<int64_t> shape, index_range r);
weight_slice cols_of(std::string name, std::vector<int64_t> shape, index_range r);
weight_slice whole(std::string name, std::vector<int64_t> shape);

enum class shard_reader { cpu, cuda };

// Every slice of the weights a rank with shard `s` (of `layout`) reads when its backend loads,
// in load order: the total of its load progress (load_progress.hpp). The backends' loaders and
// this list must agree; the load-progress tests check that the bytes counted while loading end
// at exactly the total.
std::vector<weight_slice> shard_weight_reads(const model_config& c, const shard_plan& s,
                                             const parallel_layout& layout, shard_reader reader);

// A rank's KV layout as its shard decides it (layers, kv heads, blocks, dtype); the backend adds
// where its memory is (allocations, planes).
kv_layout shard_kv_layout(const model_config& c, const shard_plan& s, int32_t block_size,
                          int32_t num_blocks, std::string dtype, int32_t elem_bytes);

} // namespace troupe::engine
