// Continuous batching: admits requests, packs each step's work under a token budget (decode
// first, then chunked prefill, FCFS), manages KV blocks with prefix reuse and preemption by
// recompute, and turns step results into per-request outputs. Called by engine_loop on one
// thread; nothing here blocks. Plain policy, tested directly.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "engine/grammar/constraint.hpp"
#include "engine/kv/block_pool.hpp"
#include "runtime/error.hpp"
#include "runtime/step.hpp"

namespace troupe::engine {

// scheduler_options::max_prompt_logprob_rows unless set.
inline constexpr int32_t default_prompt_logprob_rows = 64;

struct scheduler_options {
  int32_t num_blocks = 256; // must match the workers' KV pool
  int32_t block_size = 16;
  bool prefix_caching = true;
  int32_t max_num_batched_tokens = 2048; // tokens fed per step, all sequences together
  int32_t max_num_seqs = 256;            // sequences running at once
  int32_t max_waiting = 4096;            // waiting queue bound; add() rejects beyond it
  int32_t max_model_len = 4096;          // context limit: prompt + generated tokens
  int64_t vocab_size = 0;                // > 0: prompt and stop ids are checked against it
  std::vector<token_id> eos_token_ids;   // the model's EOS ids (finish `stop` unless ignore_eos)
  uint64_t seed = 0;                     // seeds requests that bring none
  // Prompt logprobs (sampling.prompt_logprobs): the prompt tokens fed per step whose every row of
  // logits comes back, all such requests together. Each step has at most max_num_seqs +
  // max_prompt_logprob_rows logits rows (a backend sizes its logits buffer from that).
  int32_t max_prompt_logprob_rows = default_prompt_logprob_rows;
  // One lane of a shared pool and id space (engine_loop runs several schedulers over one
  // executor): plans name blocks [block_offset, block_offset + num_blocks), and ids go
  // first_id, first_id + id_stride, ...
  int32_t block_offset = 0;
  seq_id first_id = 1;
  seq_id id_stride = 1;
};

// Rejects option sets the scheduler cannot work with (naming the option), e.g. a budget smaller
// than max_num_seqs would starve decodes. Call before constructing a scheduler.
expected<void> validate(const scheduler_options& o);

// The seed a request without one gets: from the deployment's seed and the request's id.
uint64_t mix_seed(uint64_t base, seq_id id);

// `handoff`: a prefill-only request (kv_handoff::export_kv) sampled its first token; its KV
// blocks stay held for the transfer to the decode side until release_held().
enum class finish_reason : uint8_t { none, stop, length, cancelled, handoff };
const char* to_string(finish_reason r);

// Prefill/decode disaggregation (design.md §6). export_kv (prefill side): prefill, sample the
// first token, then finish with finish_reason::handoff, keeping the blocks held (their ids in
// request_output::blocks) until release_held(). import_kv (decode side): when admitted, blocks for
// the prompt are reserved (prefix cache hits included) instead of computed, and reported by
// take_reservations(); the KV of the other positions arrives from outside; finish_import() then
// hands over the first token and the sequence decodes as if it had prefilled here.
enum class kv_handoff : uint8_t { none, export_kv, import_kv };

// A decode-side reservation: where the prompt's KV goes. Blocks are physical (block_offset
// applied); positions [cached_tokens, prompt length) must be written before finish_import().
struct kv_reservation {
  seq_id id = 0;
  std::vector<int32_t> blocks;
  int32_t cached_tokens = 0; // leading prompt positions already here (prefix cache)
};

struct request {
  std::vector<token_id> prompt;
  kv_handoff handoff = kv_handoff::none;
  sampling_params sampling; // including max_tokens, min_tokens, ignore_eos
  // Stop strings are not the engine's: the front end's detokenizer finds them in the text it
  // makes anyway and cancels the request (vLLM v1's output processor does the same).
  std::vector<token_id> stop_token_ids;
  // Structured output (optional): each sampled token is restricted to what the constraint allows
  // (seq_step::allowed_tokens), then accepted into it; when it terminates, the request finishes
  // with `stop`. The scheduler owns it from add() on (a copy of the request must fork() it).
  std::shared_ptr<token_constraint> constraint;
};

// What one step produced for one request: at most one token (with logprobs), and/or the end.
struct request_output {
  seq_id id = 0;
  bool has_token = false;
  token_id token = -1;
  float logprob = 0.0f;
  std::vector<token_id> top_ids;
  std::vector<float> top_logprobs;
  // sampling.prompt_logprobs: prompt positions scored by this step (each reported once, in
  // order; position 0 has none). Such outputs may come without a token (a prompt chunk).
  std::vector<position_logprobs> prompt_logprobs;
  finish_reason finish = finish_reason::none;
  token_id stop_token = -1;    // the EOS or stop_token_id that ended it
  std::vector<int32_t> blocks; // finish_reason::handoff: the held blocks (physical)
  // On a request's first token: seconds from add() until it was first scheduled (else -1).
  double queue_s = -1;
};

struct scheduler_stats {
  uint64_t steps = 0;
  uint64_t preemptions = 0;
  uint64_t finished = 0;
  uint64_t prefix_hit_tokens = 0; // prompt tokens served from the prefix cache
  // Parallel sampling (add_group): prompt tokens a sequence took from a sibling's KV blocks
  // instead of computing them.
  uint64_t shared_prompt_tokens = 0;
  // Structured output: sampled tokens the grammar refused (none unless a sampler ignored the mask
  // or every allowed token was banned); each ended its request.
  uint64_t constraint_violations = 0;
  int32_t num_running = 0;
  int32_t num_waiting = 0;
  int32_t num_importing = 0; // decode side: blocks reserved, KV not yet arrived
  int32_t num_held = 0;      // sequences whose blocks are held for a transfer
};

class scheduler {
 public:
  explicit scheduler(scheduler_options options);
  ~scheduler();

  // Validates and queues a request. Errors: invalid_argument naming the parameter;
  // resource_exhausted when the waiting queue is full or the prompt can never fit the pool.
  expected<seq_id> add(request r);
  // Parallel sampling (OpenAI `n`): the choices of one prompt, each with its own sampling (seed)
  // and constraint, queued together. The prompt's full blocks (all but the block of its last
  // token) are computed once: the first choice admitted prefills; the others park until its KV
  // holds those blocks, then reference them (shared, reference counted) and compute only the
  // rest of the prompt (1 to block_size tokens, for their own first-token logits) into blocks of
  // their own. A preempted or cancelled choice releases only its references; should no choice
  // be running, a parked one prefills instead. Same errors as add(), for any of them; the prompts
  // must be equal and none may hand off its KV. Returns the ids in the order of `rs`.
  expected<std::vector<seq_id>> add_group(std::vector<request> rs);
  // Ends a request in any state; its blocks are freed now and the next update() (or
  // take_pending()) reports it `cancelled`. not_found if it is unknown or already finished.
  // An importing request's blocks are held instead (a transfer may still write them) until
  // release_held().
  expected<void> cancel(seq_id id);

  // Decode side: reservations made by schedule() since the last call.
  void take_reservations(std::vector<kv_reservation>& out);
  // The prompt's KV arrived for importing request `id`; `first` is the token the prefill side
  // sampled. The request decodes from the next schedule(); its output for `first` (and its end,
  // if `first` ends it) goes to `out`. not_found / invalid_argument otherwise.
  expected<void> finish_import(seq_id id, const seq_output& first,
                               std::vector<request_output>& out);
  // The transfer for importing request `id` failed and nothing writes its blocks any more: they
  // are freed and the request is prefilled here instead, ahead of the waiting queue.
  expected<void> prefill_locally(seq_id id);
  // Frees blocks held for a transfer (an exported request, or a cancelled import). not_found
  // when `id` holds none.
  expected<void> release_held(seq_id id);

  // The next step's work into `plan` (its buffers are reused). An empty plan (no seqs, nothing
  // finished) means nothing to run and is not outstanding. A plan is outstanding from here until
  // its result is passed to update(); with one outstanding (step n) this plans step n+1 ahead,
  // only when can_plan_ahead() says so.
  void schedule(step_plan& plan);
  step_plan schedule() {
    step_plan p;
    schedule(p);
    return p;
  }
  // Whether schedule() may make step n+1 while step n is outstanding (vLLM's async scheduling):
  // a sequence that samples in step n then feeds previous_sample in step n+1 (the executor puts
  // in the token), one whose prompt chunk is in step n gets its next chunk. Not when step n
  // scores a prompt (the next chunk depends on its result), nor when it samples under a grammar
  // unless `masks_later` (step n+1's masks are then filled once step n is updated: fill_masks),
  // nor after a plan made ahead lacked KV blocks for a sequence (a plan made with nothing
  // outstanding may preempt; one made ahead never does). Sequences that step n ends for certain
  // (max_tokens, the context limit, a KV handoff) are left out; one it ends by a sampled stop
  // token (or a finished grammar) computes one token that is dropped. Plans run in order, so step
  // n+1 may use blocks step n writes, and blocks freed meanwhile are reused only by later plans.
  bool can_plan_ahead(bool masks_later = false) const;
  // Whether outstanding `plan` samples under a grammar.
  bool constrained(const step_plan& plan) const;
  size_t outstanding() const { return outstanding_.size(); }
  // Structured output: writes the grammar masks (seq_step::allowed_tokens) of `plan`, the oldest
  // outstanding (each grammar has then seen every token before), for its constrained rows;
  // schedule() leaves them empty. Call it before the plan's tokens are sampled and before
  // update(); the engine loop calls it while the GPU runs the forward pass (executor::mask_fill).
  // Many constrained rows are filled in parallel.
  void fill_masks(step_plan& plan);
  // Consumes the result of `plan` (the oldest outstanding, or an empty plan) and appends the
  // outputs to `out`.
  expected<void> update(const step_plan& plan, const step_result& result,
                        std::vector<request_output>& out);
  // The outstanding plans' results will never come (the executor failed): forget them. Their
  // sequences' KV state is unknown; cancel them.
  void forget_outstanding();
  // Outputs of cancellations that no update() has reported yet (when nothing is running).
  void take_pending(std::vector<request_output>& out);

  bool has_unfinished() const { return !live_.empty(); }
  // Something a step can advance: running or waiting requests, or outputs not yet reported
  // (importing requests wait for their KV, not for a step).
  bool has_work() const {
    return !running_.empty() || !waiting_.empty() || !parked_.empty() || !pending_.empty();
  }
  std::vector<seq_id> unfinished() const; // ids of waiting and running requests
  scheduler_stats stats() const;
  const kv::block_pool& pool() const { return pool_; }
  const scheduler_options& options() const { return opt_; }
  // Block reference counts equal block-table entries of live sequences; pool invariants.
  expected<void> check() const;

 private:
  struct sequence;
  struct group;
  std::unique_ptr<sequence> make_sequence(request r);
  sequence* running_sibling(const sequence& s, int32_t min_computed) const;
  void fork_parked();
  void unpark();
  bool allocate_for(sequence& s, int32_t end_tokens);
  sequence* pick_victim(const sequence& except);
  void preempt(sequence& s, step_plan& plan);
  bool admit_prefix(sequence& s, bool whole_prompt = false);
  int32_t chunk_size(const sequence& s, int32_t budget, int32_t& score_budget) const;
  void emit(sequence& s, int32_t n, step_plan& plan, size_t& used);
  bool carried_ahead(const sequence& s) const;
  void cache_full_blocks(sequence& s);
  void finish(sequence& s, finish_reason why, token_id stop_token, request_output* o,
              bool hold_blocks = false);
  bool admit_import(sequence& s);
  expected<sequence*> take_importing(seq_id id); // out of importing_, or why not
  bool should_stop(sequence& s, token_id t, finish_reason& why, token_id& which) const;
  bool constrained_stop(sequence& s, token_id t, finish_reason& why, token_id& which);
  expected<void> validate(const request& r, size_t queued = 1) const;

  scheduler_options opt_;
  kv::block_pool pool_;
  std::unordered_map<seq_id, std::unique_ptr<sequence>> live_;
  std::deque<sequence*> waiting_;
  std::vector<sequence*> running_; // priority order: preemption takes from the back
  struct outstanding_plan {
    uint64_t step = 0;
    std::vector<sequence*> seqs; // per seq_step
    bool grammar = false;        // samples under a grammar
    bool scoring = false;        // scores a prompt
  };
  std::deque<outstanding_plan> outstanding_; // oldest first
  bool starved_ = false; // a plan made ahead lacked blocks for a sequence it should carry
  std::vector<sequence*> importing_; // decode side: waiting for their KV
  std::vector<sequence*> parked_;    // add_group: waiting for a sibling's prompt blocks
  std::vector<kv_reservation> reservations_;
  std::unordered_map<seq_id, std::vector<int32_t>> held_; // blocks held for a transfer
  std::vector<seq_id> dropped_;                           // for the next plan's `finished`
  std::vector<request_output> pending_;
  // Finished sequences, alive while an outstanding plan may name them (up to the step noted).
  std::vector<std::pair<uint64_t, std::unique_ptr<sequence>>> graveyard_;
  seq_id next_id_ = 1;
  uint64_t step_ = 0;
  scheduler_stats stats_;
};

} // namespace troupe::engine
