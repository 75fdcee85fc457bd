#include "engine/scheduler/scheduler.hpp"

#include <algorithm>
#include <chrono>

#include "engine/backend/cpu/thread_pool.hpp"
#include "engine/sampling/sampler.hpp"

namespace troupe::engine {

// The choices of one prompt (add_group) and how many leading prompt tokens they share: the full
// blocks before the block of the prompt's last token, which each choice computes itself (its
// first token's logits come from it).
struct scheduler::group {
  std::vector<sequence*> members; // unfinished ones
  int32_t shared_tokens = 0;      // a multiple of block_size, > 0
};

struct scheduler::sequence {
  // parked: a choice of a group waiting, off the queue, for a sibling to compute the shared
  // prompt blocks.
  enum class state : uint8_t { waiting, running, importing, parked, finished };
  seq_id id = 0;
  std::vector<token_id> tokens; // prompt, then generated tokens
  int32_t num_prompt = 0;
  int32_t num_computed = 0; // tokens whose KV is in `blocks` (after the outstanding plans)
  int32_t pending = 0;      // tokens sampled by outstanding plans, not yet in `tokens`
  std::vector<int32_t> blocks;
  std::vector<kv::block_hash> hashes; // chained hashes of the full blocks of `tokens`
  int32_t num_cached_blocks = 0;      // leading blocks already in the prefix cache
  sampling_params sampling;
  std::vector<token_id> stop_ids;
  std::shared_ptr<token_constraint> constraint;
  std::shared_ptr<group> grp; // add_group with a prompt longer than one block
  kv_handoff handoff = kv_handoff::none;
  state st = state::waiting;
  bool first_step = true;
  uint64_t scheduled_step = 0;
  std::chrono::steady_clock::time_point arrival = std::chrono::steady_clock::now();
  double queue_s = -1;       // arrival to first scheduled, once scheduled
  int32_t prompt_scored = 0; // prompt logprobs: positions [1, prompt_scored] reported

  int32_t len() const { return static_cast<int32_t>(tokens.size()); }
  int32_t ahead_len() const { return len() + pending; } // once the outstanding plans are done
  int32_t num_generated() const { return len() - num_prompt; }
  // Prompt logprobs still to report: the prompt is computed here, every row's logits back.
  bool scoring() const { return sampling.prompt_logprobs >= 0 && prompt_scored < num_prompt - 1; }
};

namespace {
uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
bool contains(const std::vector<token_id>& v, token_id t) {
  return std::find(v.begin(), v.end(), t) != v.end();
}
} // namespace

uint64_t mix_seed(uint64_t base, seq_id id) {
  return splitmix(base ^ splitmix(id));
}

expected<void> validate(const scheduler_options& o) {
  auto positive = [](int64_t v, const char* name) -> expected<void> {
    if (v < 1)
      return make_error(errc::invalid_argument, "{} must be >= 1, got {}", name, v);
    return {};
  };
  TROUPE_TRY_VOID(positive(o.num_blocks, "num_blocks"));
  TROUPE_TRY_VOID(positive(o.block_size, "block_size"));
  TROUPE_TRY_VOID(positive(o.max_num_seqs, "max_num_seqs"));
  TROUPE_TRY_VOID(positive(o.max_waiting, "max_waiting"));
  TROUPE_TRY_VOID(positive(o.max_model_len, "max_model_len"));
  TROUPE_TRY_VOID(positive(o.max_prompt_logprob_rows, "max_prompt_logprob_rows"));
  TROUPE_TRY_VOID(positive(static_cast<int64_t>(o.first_id), "first_id"));
  TROUPE_TRY_VOID(positive(static_cast<int64_t>(o.id_stride), "id_stride"));
  if (o.block_offset < 0)
    return make_error(errc::invalid_argument, "block_offset must be >= 0, got {}", o.block_offset);
  if (o.max_num_batched_tokens < o.max_num_seqs)
    return make_error(errc::invalid_argument,
                      "max_num_batched_tokens ({}) must be >= max_num_seqs ({}) so every running "
                      "sequence can decode each step",
                      o.max_num_batched_tokens, o.max_num_seqs);
  return {};
}

const char* to_string(finish_reason r) {
  switch (r) {
  case finish_reason::none:
    return "none";
  case finish_reason::stop:
    return "stop";
  case finish_reason::length:
    return "length";
  case finish_reason::cancelled:
    return "cancelled";
  case finish_reason::handoff:
    return "handoff";
  }
  return "?";
}

scheduler::scheduler(scheduler_options options)
  : opt_(std::move(options)), pool_(opt_.num_blocks, opt_.block_size, opt_.prefix_caching),
    next_id_(opt_.first_id) {}

scheduler::~scheduler() = default;

expected<void> scheduler::validate(const request& r, size_t queued) const {
  if (r.prompt.empty())
    return make_error(errc::invalid_argument, "prompt must not be empty");
  const auto n = static_cast<int64_t>(r.prompt.size());
  if (n >= opt_.max_model_len)
    return make_error(errc::invalid_argument,
                      "prompt has {} tokens; the context limit (max_model_len) is {}", n,
                      opt_.max_model_len);
  const int64_t blocks = (n + 1 + opt_.block_size - 1) / opt_.block_size;
  if (blocks > opt_.num_blocks)
    return make_error(errc::resource_exhausted, "prompt needs {} KV blocks; the pool has {}",
                      blocks, opt_.num_blocks);
  if (opt_.vocab_size > 0)
    for (size_t i = 0; i < r.prompt.size(); ++i)
      if (r.prompt[i] < 0 || r.prompt[i] >= opt_.vocab_size)
        return make_error(errc::invalid_argument,
                          "prompt token {} is {}, outside the vocabulary [0, {})", i, r.prompt[i],
                          opt_.vocab_size);
  for (token_id t : r.stop_token_ids)
    if (t < 0 || (opt_.vocab_size > 0 && t >= opt_.vocab_size))
      return make_error(errc::invalid_argument, "stop_token_ids holds {}, not a token id", t);
  TROUPE_TRY_VOID(engine::validate(r.sampling));
  if (r.constraint && r.sampling.min_tokens > 0)
    return make_error(errc::invalid_argument,
                      "min_tokens cannot be combined with structured output (the grammar decides "
                      "where the output ends)");
  if (r.sampling.prompt_logprobs >= 0 && r.handoff != kv_handoff::none)
    return make_error(errc::invalid_argument,
                      "prompt logprobs need the prompt computed where they are asked for, not its "
                      "KV handed over");
  if (static_cast<int64_t>(waiting_.size() + parked_.size() + queued) > opt_.max_waiting)
    return make_error(errc::resource_exhausted,
                      "the waiting queue is full ({} requests, max_waiting {}); retry later",
                      waiting_.size() + parked_.size(), opt_.max_waiting);
  return {};
}

expected<seq_id> scheduler::add(request r) {
  TROUPE_TRY_VOID(validate(r));
  auto s = make_sequence(std::move(r));
  waiting_.push_back(s.get());
  seq_id id = s->id;
  live_.emplace(id, std::move(s));
  return id;
}

expected<std::vector<seq_id>> scheduler::add_group(std::vector<request> rs) {
  if (rs.empty())
    return make_error(errc::invalid_argument, "a group of choices needs at least one request");
  for (const auto& r : rs) {
    TROUPE_TRY_VOID(validate(r, rs.size()));
    if (r.prompt != rs.front().prompt)
      return make_error(errc::invalid_argument, "the choices of a group must have one prompt");
    if (rs.size() > 1 && r.handoff != kv_handoff::none)
      return make_error(errc::invalid_argument,
                        "the choices of a group cannot hand their KV off (disaggregation)");
  }
  const auto prompt_len = static_cast<int32_t>(rs.front().prompt.size());
  const int32_t shared = (prompt_len - 1) / opt_.block_size * opt_.block_size;
  std::shared_ptr<group> g;
  if (rs.size() > 1 && shared > 0) {
    g = std::make_shared<group>();
    g->shared_tokens = shared;
  }
  std::vector<seq_id> ids;
  for (auto& r : rs) {
    auto s = make_sequence(std::move(r));
    if (g) {
      s->grp = g;
      g->members.push_back(s.get());
    }
    waiting_.push_back(s.get());
    ids.push_back(s->id);
    live_.emplace(s->id, std::move(s));
  }
  return ids;
}

std::unique_ptr<scheduler::sequence> scheduler::make_sequence(request r) {
  auto s = std::make_unique<sequence>();
  s->id = next_id_;
  next_id_ += opt_.id_stride;
  s->num_prompt = static_cast<int32_t>(r.prompt.size());
  s->tokens = std::move(r.prompt);
  s->tokens.reserve(static_cast<size_t>(s->num_prompt + r.sampling.max_tokens));
  s->sampling = r.sampling;
  if (!s->sampling.has_seed) {
    s->sampling.has_seed = true;
    s->sampling.seed = mix_seed(opt_.seed, s->id);
  }
  s->stop_ids = std::move(r.stop_token_ids);
  s->constraint = std::move(r.constraint);
  s->handoff = r.handoff;
  return s;
}

// A running member of s's group (not s) whose KV holds at least `min_computed` tokens (0: any
// running member), or null.
scheduler::sequence* scheduler::running_sibling(const sequence& s, int32_t min_computed) const {
  if (!s.grp)
    return nullptr;
  for (sequence* m : s.grp->members)
    if (m != &s && m->st == sequence::state::running && m->num_computed >= min_computed)
      return m;
  return nullptr;
}

// After a step (every sequence's KV is as num_computed says): parked choices whose sibling now
// holds the shared prompt blocks take references to them and run, computing the rest of the
// prompt. They were counted against max_num_seqs when they parked.
void scheduler::fork_parked() {
  std::erase_if(parked_, [&](sequence* p) {
    const int32_t shared = p->grp->shared_tokens;
    sequence* m = running_sibling(*p, shared);
    if (!m)
      return false;
    const int32_t k = shared / opt_.block_size;
    for (int32_t i = 0; i < k; ++i) {
      pool_.acquire(m->blocks[static_cast<size_t>(i)]);
      p->blocks.push_back(m->blocks[static_cast<size_t>(i)]);
    }
    // The prefix cache's chained hashes (and which blocks are registered) carry over.
    p->num_cached_blocks = std::min(m->num_cached_blocks, k);
    p->hashes.assign(m->hashes.begin(),
                     m->hashes.begin() +
                         std::min<ptrdiff_t>(static_cast<ptrdiff_t>(m->hashes.size()), k));
    p->num_computed = shared;
    p->first_step = true;
    p->st = sequence::state::running;
    if (p->queue_s < 0)
      p->queue_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - p->arrival).count();
    running_.push_back(p);
    stats_.shared_prompt_tokens += static_cast<uint64_t>(shared);
    return true;
  });
}

// Parked choices with no running sibling left (it was preempted, cancelled or finished) go back
// to the head of the queue, in order: the first admitted prefills for the others.
void scheduler::unpark() {
  for (size_t i = parked_.size(); i-- > 0;) {
    sequence* p = parked_[i];
    if (running_sibling(*p, 0))
      continue;
    p->st = sequence::state::waiting;
    waiting_.push_front(p);
    parked_.erase(parked_.begin() + static_cast<ptrdiff_t>(i));
  }
}

expected<void> scheduler::cancel(seq_id id) {
  auto it = live_.find(id);
  if (it == live_.end())
    return make_error(errc::not_found, "request {} is unknown or already finished", id);
  sequence& s = *it->second;
  const bool importing = s.st == sequence::state::importing;
  if (s.st == sequence::state::waiting)
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), &s));
  else if (s.st == sequence::state::parked)
    parked_.erase(std::find(parked_.begin(), parked_.end(), &s));
  else if (importing)
    importing_.erase(std::find(importing_.begin(), importing_.end(), &s));
  else
    running_.erase(std::find(running_.begin(), running_.end(), &s));
  request_output o;
  finish(s, finish_reason::cancelled, -1, &o, importing); // a transfer may still write them
  pending_.push_back(std::move(o));
  return {};
}

void scheduler::finish(sequence& s, finish_reason why, token_id stop_token, request_output* o,
                       bool hold_blocks) {
  if (hold_blocks && !s.blocks.empty())
    held_[s.id] = std::move(s.blocks);
  else
    pool_.release_all(s.blocks);
  s.blocks.clear();
  if (s.grp)
    std::erase(s.grp->members, &s);
  s.st = sequence::state::finished;
  o->id = s.id;
  o->finish = why;
  o->stop_token = stop_token;
  dropped_.push_back(s.id);
  ++stats_.finished;
  auto it = live_.find(s.id);
  graveyard_.emplace_back(step_, std::move(it->second)); // alive until no plan can name it
  live_.erase(it);
}

bool scheduler::allocate_for(sequence& s, int32_t end_tokens) {
  const int32_t need =
      (end_tokens + opt_.block_size - 1) / opt_.block_size - static_cast<int32_t>(s.blocks.size());
  return need <= 0 || pool_.allocate(need, s.blocks);
}

// The lowest-priority running sequence not yet in this step and behind `except`, or null.
scheduler::sequence* scheduler::pick_victim(const sequence& except) {
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
    sequence* v = *it;
    if (v == &except)
      return nullptr;
    if (v->st == sequence::state::running && v->scheduled_step != step_)
      return v;
  }
  return nullptr;
}

void scheduler::preempt(sequence& s, step_plan& plan) {
  pool_.release_all(s.blocks);
  s.num_computed = 0;
  s.num_cached_blocks = 0;
  s.first_step = true;
  s.st = sequence::state::waiting;
  waiting_.push_front(&s);
  plan.finished.push_back(s.id);
  ++stats_.preemptions;
}

// Takes the longest cached prefix of full blocks (leaving at least one token to compute).
bool scheduler::admit_prefix(sequence& s, bool whole_prompt) {
  if (!opt_.prefix_caching || !s.blocks.empty() || s.scoring()) // cached rows have no logits
    return false;
  const int32_t bs = opt_.block_size;
  // Computing leaves at least one token to feed (its logits); an import feeds none.
  const int32_t max_blocks = whole_prompt ? s.len() / bs : (s.len() - 1) / bs;
  for (int32_t i = 0; i < max_blocks; ++i) {
    if (static_cast<int32_t>(s.hashes.size()) <= i)
      s.hashes.push_back(
          kv::hash_block(i ? s.hashes[i - 1] : 0,
                         {s.tokens.data() + static_cast<size_t>(i) * bs, static_cast<size_t>(bs)}));
    std::span<const token_id> toks{s.tokens.data() + static_cast<size_t>(i) * bs,
                                   static_cast<size_t>(bs)};
    int32_t b = pool_.lookup(s.hashes[i], toks, i ? s.blocks.back() : -1);
    if (b < 0)
      break;
    pool_.acquire(b);
    s.blocks.push_back(b);
  }
  s.num_cached_blocks = static_cast<int32_t>(s.blocks.size());
  s.num_computed = s.num_cached_blocks * bs;
  return s.num_computed > 0;
}

// Tokens of s to feed this step: what is left, within the step's token budget and, for a prompt
// whose every row of logits comes back, within the step's rows for those (taken from it).
int32_t scheduler::chunk_size(const sequence& s, int32_t budget, int32_t& score_budget) const {
  int32_t n = std::min(s.ahead_len() - s.num_computed, budget);
  if (s.scoring()) {
    n = std::min(n, score_budget);
    score_budget -= n;
  }
  return n;
}

void scheduler::emit(sequence& s, int32_t n, step_plan& plan, size_t& used) {
  if (used == plan.seqs.size())
    plan.seqs.emplace_back();
  seq_step& st = plan.seqs[used++];
  const int32_t start = s.num_computed, end = start + n;
  st.id = s.id;
  st.start_pos = start;
  // Tokens sampled by the outstanding plan are not known yet (a plan made ahead).
  st.tokens.assign(s.tokens.begin() + start,
                   s.tokens.begin() + std::max(start, std::min(end, s.len())));
  st.tokens.resize(static_cast<size_t>(n), previous_sample);
  st.block_table.resize(s.blocks.size());
  for (size_t i = 0; i < s.blocks.size(); ++i)
    st.block_table[i] = s.blocks[i] + opt_.block_offset;
  const bool samples = end == s.ahead_len();
  st.logits = s.scoring() ? logits_mode::all : samples ? logits_mode::last : logits_mode::none;
  st.next_prompt_token =
      st.logits == logits_mode::all && end < s.num_prompt ? s.tokens[static_cast<size_t>(end)] : -1;
  st.sampling = s.sampling;
  st.num_prompt_tokens = s.num_prompt;
  st.first_step = s.first_step;
  st.cached_prefix.clear();
  if (s.first_step && start > 0 && uses_penalties(s.sampling))
    st.cached_prefix.assign(s.tokens.begin(), s.tokens.begin() + start);
  st.banned_tokens.clear();
  if (samples && s.ahead_len() - s.num_prompt < s.sampling.min_tokens) {
    st.banned_tokens = opt_.eos_token_ids;
    st.banned_tokens.insert(st.banned_tokens.end(), s.stop_ids.begin(), s.stop_ids.end());
  }
  st.allowed_tokens.clear(); // constrained rows: fill_masks()
  s.first_step = false;
  s.num_computed = end;
  s.scheduled_step = step_;
  auto& record = outstanding_.back();
  record.seqs.push_back(&s);
  record.grammar = record.grammar || (samples && s.constraint);
  record.scoring = record.scoring || s.scoring();
  if (samples)
    ++s.pending;
}

bool scheduler::can_plan_ahead(bool masks_later) const {
  if (outstanding_.size() != 1 || starved_)
    return false;
  const auto& o = outstanding_.front();
  return !o.scoring && (!o.grammar || masks_later);
}

bool scheduler::constrained(const step_plan& plan) const {
  return std::any_of(outstanding_.begin(), outstanding_.end(),
                     [&](const auto& o) { return o.step == plan.step && o.grammar; });
}

// Whether a plan made ahead takes s, which the outstanding plan names: not when that plan ends it
// for certain (should_stop's lengths, once its token is in; a handoff after the first token).
bool scheduler::carried_ahead(const sequence& s) const {
  if (s.pending == 0)
    return true; // a prompt chunk in flight: the next one's tokens are known
  if (s.handoff == kv_handoff::export_kv)
    return false;
  const int32_t len = s.ahead_len();
  return len - s.num_prompt < s.sampling.max_tokens && len < opt_.max_model_len &&
         len < opt_.num_blocks * opt_.block_size;
}

void scheduler::fill_masks(step_plan& plan) {
  std::vector<std::pair<token_constraint*, std::vector<uint32_t>*>> rows;
  auto record = std::find_if(outstanding_.begin(), outstanding_.end(),
                             [&](const auto& o) { return o.step == plan.step; });
  if (record == outstanding_.end())
    return;
  // The oldest outstanding plan: a pending token of a running sequence is this plan's.
  for (size_t i = 0; i < plan.seqs.size() && i < record->seqs.size(); ++i)
    if (const sequence* s = record->seqs[i]; s->constraint && s->pending > 0 &&
                                             s->st == sequence::state::running &&
                                             plan.seqs[i].logits != logits_mode::none)
      rows.emplace_back(s->constraint.get(), &plan.seqs[i].allowed_tokens);
  // A mask takes ~1-60 us (xgrammar; longest inside JSON strings). Each constraint is its own
  // matcher, so rows fill on separate threads; a few are not worth the hand-off.
  constexpr size_t parallel_from = 4;
  const auto fill = [&](int64_t begin, int64_t end) {
    for (auto i = begin; i < end; ++i)
      rows[static_cast<size_t>(i)].first->fill_mask(*rows[static_cast<size_t>(i)].second);
  };
  if (rows.size() < parallel_from)
    return fill(0, static_cast<int64_t>(rows.size()));
  cpu::thread_pool::shared().parallel_for(static_cast<int64_t>(rows.size()), 1, fill);
}

void scheduler::schedule(step_plan& plan) {
  const bool ahead = !outstanding_.empty();
  // Sequences named by an outstanding plan have scheduled_step >= in_flight_from.
  const uint64_t in_flight_from = ahead ? outstanding_.front().step : step_ + 1;
  if (!ahead) {
    graveyard_.clear();
    starved_ = false;
  }
  plan.step = ++step_;
  outstanding_.push_back({.step = step_});
  plan.finished.clear();
  plan.finished.swap(dropped_);
  size_t used = 0;
  int32_t budget = opt_.max_num_batched_tokens;
  int32_t score_budget = opt_.max_prompt_logprob_rows;
  bool preempted = false;
  // Running sequences first, decodes before prefill chunks, each in priority order.
  for (int phase = 0; phase < 2; ++phase)
    for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
      sequence& s = *running_[i];
      const bool decoding = s.num_computed >= s.num_prompt;
      if (s.st != sequence::state::running || s.scheduled_step == step_ || decoding != (phase == 0))
        continue;
      if (s.scheduled_step >= in_flight_from && !carried_ahead(s))
        continue;
      const int32_t n = chunk_size(s, budget, score_budget);
      if (n == 0)
        continue;
      if (ahead && !allocate_for(s, s.num_computed + n)) { // no preemption ahead
        starved_ = true;
        continue;
      }
      while (!allocate_for(s, s.num_computed + n)) {
        sequence* victim = pick_victim(s);
        preempt(victim ? *victim : s, plan);
        preempted = true;
        if (!victim)
          break;
      }
      if (s.st != sequence::state::running)
        continue;
      emit(s, n, plan, used);
      budget -= n;
    }
  std::erase_if(running_, [](sequence* s) { return s->st != sequence::state::running; });
  unpark();
  // Then waiting requests in arrival order, unless this step had to preempt (or, made ahead,
  // lacked blocks for a running sequence).
  while (!preempted && !starved_ && !waiting_.empty() && budget > 0 &&
         static_cast<int32_t>(running_.size() + importing_.size() + parked_.size()) <
             opt_.max_num_seqs) {
    sequence& s = *waiting_.front();
    // A sibling computes (or holds) the shared prompt blocks (unless this one scores its prompt).
    if (!s.scoring() && running_sibling(s, 0)) {
      waiting_.pop_front();
      s.st = sequence::state::parked;
      parked_.push_back(&s);
      continue;
    }
    if (s.handoff == kv_handoff::import_kv) {
      if (!admit_import(s))
        break; // head of line waits for blocks
      continue;
    }
    const bool hit = admit_prefix(s);
    const int32_t n = chunk_size(s, budget, score_budget);
    if (n == 0 || !allocate_for(s, s.num_computed + n)) {
      pool_.release_all(s.blocks); // head of line waits for blocks
      s.num_computed = s.num_cached_blocks = 0;
      break;
    }
    if (hit)
      stats_.prefix_hit_tokens += static_cast<uint64_t>(s.num_computed);
    waiting_.pop_front();
    if (s.queue_s < 0)
      s.queue_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - s.arrival).count();
    s.st = sequence::state::running;
    running_.push_back(&s);
    emit(s, n, plan, used);
    budget -= n;
  }
  plan.seqs.resize(used);
  if (plan.seqs.empty() && plan.finished.empty()) // never submitted, never updated
    outstanding_.pop_back();
  ++stats_.steps;
}

// Reserves blocks for the whole prompt (cached prefix blocks reused) without computing anything.
bool scheduler::admit_import(sequence& s) {
  const bool hit = admit_prefix(s, true);
  if (!allocate_for(s, s.len())) {
    pool_.release_all(s.blocks);
    s.num_computed = s.num_cached_blocks = 0;
    return false;
  }
  if (hit)
    stats_.prefix_hit_tokens += static_cast<uint64_t>(s.num_computed);
  waiting_.pop_front();
  s.st = sequence::state::importing;
  importing_.push_back(&s);
  auto& r = reservations_.emplace_back();
  r.id = s.id;
  r.cached_tokens = s.num_computed;
  r.blocks.resize(s.blocks.size());
  for (size_t i = 0; i < s.blocks.size(); ++i)
    r.blocks[i] = s.blocks[i] + opt_.block_offset;
  return true;
}

void scheduler::take_reservations(std::vector<kv_reservation>& out) {
  for (auto& r : reservations_)
    out.push_back(std::move(r));
  reservations_.clear();
}

expected<scheduler::sequence*> scheduler::take_importing(seq_id id) {
  auto it = live_.find(id);
  if (it == live_.end())
    return make_error(errc::not_found, "request {} is unknown or already finished", id);
  sequence& s = *it->second;
  if (s.st != sequence::state::importing)
    return make_error(errc::invalid_argument, "request {} is not waiting for its KV", id);
  importing_.erase(std::find(importing_.begin(), importing_.end(), &s));
  return &s;
}

expected<void> scheduler::finish_import(seq_id id, const seq_output& first,
                                        std::vector<request_output>& out) {
  if (first.token < 0 || (opt_.vocab_size > 0 && first.token >= opt_.vocab_size))
    return make_error(errc::invalid_argument, "request {}: handed-over token {} is not a token id",
                      id, first.token);
  auto taken = take_importing(id);
  if (!taken)
    return std::move(taken).error();
  sequence& s = **taken;
  s.num_computed = s.num_prompt;
  if (opt_.prefix_caching)
    cache_full_blocks(s);
  s.tokens.push_back(first.token);
  s.st = sequence::state::running;
  s.first_step = true; // this worker rebuilds penalty state from the prompt (cached_prefix)
  running_.push_back(&s);
  request_output& r = out.emplace_back();
  r.id = s.id;
  r.has_token = true;
  r.token = first.token;
  r.logprob = first.logprob;
  r.top_ids = first.top_ids;
  r.top_logprobs = first.top_logprobs;
  finish_reason why;
  token_id which = -1;
  if (should_stop(s, first.token, why, which) || constrained_stop(s, first.token, why, which)) {
    running_.pop_back();
    finish(s, why, which, &r);
  }
  return {};
}

expected<void> scheduler::prefill_locally(seq_id id) {
  auto taken = take_importing(id);
  if (!taken)
    return std::move(taken).error();
  sequence& s = **taken;
  pool_.release_all(s.blocks);
  s.num_computed = s.num_cached_blocks = 0;
  s.handoff = kv_handoff::none;
  s.first_step = true;
  s.st = sequence::state::waiting;
  waiting_.push_front(&s);
  return {};
}

expected<void> scheduler::release_held(seq_id id) {
  auto it = held_.find(id);
  if (it == held_.end())
    return make_error(errc::not_found, "request {} holds no blocks", id);
  pool_.release_all(it->second);
  held_.erase(it);
  return {};
}

void scheduler::cache_full_blocks(sequence& s) {
  const int32_t bs = opt_.block_size;
  const int32_t full = std::min(s.num_computed, s.len()) / bs; // tokens known
  for (int32_t i = s.num_cached_blocks; i < full; ++i) {
    std::span<const token_id> toks{s.tokens.data() + static_cast<size_t>(i) * bs,
                                   static_cast<size_t>(bs)};
    if (static_cast<int32_t>(s.hashes.size()) <= i)
      s.hashes.push_back(kv::hash_block(i ? s.hashes[i - 1] : 0, toks));
    pool_.cache(s.blocks[i], s.hashes[i], toks, i ? s.blocks[i - 1] : -1);
  }
  s.num_cached_blocks = std::max(s.num_cached_blocks, full);
}

bool scheduler::should_stop(sequence& s, token_id t, finish_reason& why, token_id& which) const {
  why = finish_reason::none;
  if (s.num_generated() >= s.sampling.min_tokens) {
    if ((!s.sampling.ignore_eos && contains(opt_.eos_token_ids, t)) || contains(s.stop_ids, t)) {
      why = finish_reason::stop;
      which = t;
      return true;
    }
  }
  // The context limit, or the whole pool (a longer sequence could never be scheduled again).
  if (s.num_generated() >= s.sampling.max_tokens || s.len() >= opt_.max_model_len ||
      s.len() >= opt_.num_blocks * opt_.block_size) {
    why = finish_reason::length;
    return true;
  }
  return false;
}

// Structured output: accepts `t` into the constraint; the output ends when the grammar is complete
// (or, should the samplers have had no allowed token to pick, at a token it refuses).
bool scheduler::constrained_stop(sequence& s, token_id t, finish_reason& why, token_id& which) {
  if (!s.constraint)
    return false;
  const bool ok = s.constraint->accept(t);
  if (ok && !s.constraint->terminated())
    return false;
  if (!ok)
    ++stats_.constraint_violations;
  why = finish_reason::stop;
  which = contains(opt_.eos_token_ids, t) ? t : -1;
  return true;
}

expected<void> scheduler::update(const step_plan& plan, const step_result& result,
                                 std::vector<request_output>& out) {
  // An empty plan was never outstanding; passing it here is allowed (it reports cancellations).
  const bool empty = plan.seqs.empty() && plan.finished.empty();
  const bool oldest = !outstanding_.empty() && plan.step == outstanding_.front().step;
  if ((!oldest && !empty) || (oldest && plan.seqs.size() != outstanding_.front().seqs.size()))
    return make_error(errc::internal, "update: plan {} is not the oldest outstanding", plan.step);
  std::vector<sequence*> scheduled;
  if (oldest) {
    scheduled = std::move(outstanding_.front().seqs);
    outstanding_.pop_front();
  }
  take_pending(out);
  if (!parked_.empty()) // before any sibling finishes (and releases the blocks) below
    fork_parked();
  size_t k = 0;
  bool any_finished = false;
  for (size_t i = 0; i < plan.seqs.size(); ++i) {
    const seq_step& st = plan.seqs[i];
    sequence& s = *scheduled[i];
    const seq_output* o = nullptr;
    if (st.logits != logits_mode::none) {
      if (k >= result.outputs.size() || result.outputs[k].id != st.id)
        return make_error(errc::internal, "step {}: no output for sequence {} (output {})",
                          plan.step, st.id, k);
      o = &result.outputs[k++];
    }
    if (s.st != sequence::state::running) // cancelled while the step ran
      continue;
    if (opt_.prefix_caching)
      cache_full_blocks(s);
    if (!o)
      continue;
    std::vector<position_logprobs> scored;
    for (const auto& p : o->prompt_logprobs) // each once (a recompute after preemption repeats)
      if (p.position > s.prompt_scored && p.position < s.num_prompt) {
        scored.push_back(p);
        s.prompt_scored = p.position;
      }
    const bool samples = st.start_pos + static_cast<int32_t>(st.tokens.size()) == s.len();
    if (!samples) { // a prompt chunk scored for its logprobs
      if (!scored.empty())
        out.push_back({.id = s.id, .prompt_logprobs = std::move(scored)});
      continue;
    }
    if (o->token < 0 || (opt_.vocab_size > 0 && o->token >= opt_.vocab_size))
      return make_error(errc::internal, "step {}: sequence {} sampled token {}", plan.step, s.id,
                        o->token);
    s.tokens.push_back(o->token);
    --s.pending;
    request_output& r = out.emplace_back();
    r.prompt_logprobs = std::move(scored);
    if (s.handoff == kv_handoff::export_kv) { // prefill side: the decode side takes it from here
      r.blocks.resize(s.blocks.size());
      for (size_t b = 0; b < s.blocks.size(); ++b)
        r.blocks[b] = s.blocks[b] + opt_.block_offset;
    }
    r.id = s.id;
    r.has_token = true;
    r.token = o->token;
    r.logprob = o->logprob;
    if (s.num_generated() == 1)
      r.queue_s = s.queue_s;
    if (!o->top_ids.empty()) {
      r.top_ids = o->top_ids;
      r.top_logprobs = o->top_logprobs;
    }
    finish_reason why;
    token_id which = -1;
    if (s.handoff == kv_handoff::export_kv) {
      finish(s, finish_reason::handoff, -1, &r, true);
      any_finished = true;
    } else if (should_stop(s, o->token, why, which) || constrained_stop(s, o->token, why, which)) {
      finish(s, why, which, &r);
      any_finished = true;
    }
  }
  if (any_finished)
    std::erase_if(running_, [](sequence* s) { return s->st != sequence::state::running; });
  std::erase_if(graveyard_, [&](const auto& g) { return g.first <= plan.step; });
  return {};
}

void scheduler::forget_outstanding() {
  outstanding_.clear();
  for (auto& [id, s] : live_)
    s->pending = 0;
}

void scheduler::take_pending(std::vector<request_output>& out) {
  for (auto& o : pending_)
    out.push_back(std::move(o));
  pending_.clear();
}

std::vector<seq_id> scheduler::unfinished() const {
  std::vector<seq_id> ids;
  for (const auto& [id, s] : live_)
    ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

scheduler_stats scheduler::stats() const {
  scheduler_stats s = stats_;
  s.num_running = static_cast<int32_t>(running_.size());
  s.num_waiting = static_cast<int32_t>(waiting_.size() + parked_.size());
  s.num_importing = static_cast<int32_t>(importing_.size());
  s.num_held = static_cast<int32_t>(held_.size());
  return s;
}

expected<void> scheduler::check() const {
  TROUPE_TRY_VOID(pool_.check());
  std::vector<int32_t> refs(static_cast<size_t>(pool_.num_blocks()), 0);
  for (const auto& [id, s] : live_) {
    if ((s->st == sequence::state::waiting || s->st == sequence::state::parked) &&
        (!s->blocks.empty() || s->num_computed != 0))
      return make_error(errc::internal, "waiting sequence {} holds {} blocks", id,
                        s->blocks.size());
    if (s->pending < 0 || (outstanding_.empty() && s->pending != 0))
      return make_error(errc::internal,
                        "sequence {} has {} tokens pending with {} plans outstanding", id,
                        s->pending, outstanding_.size());
    if (static_cast<int64_t>(s->blocks.size()) * opt_.block_size < s->num_computed)
      return make_error(errc::internal, "sequence {} computed {} tokens in {} blocks", id,
                        s->num_computed, s->blocks.size());
    for (int32_t b : s->blocks)
      ++refs[static_cast<size_t>(b)];
  }
  for (const auto& [id, blocks] : held_)
    for (int32_t b : blocks)
      ++refs[static_cast<size_t>(b)];
  for (int32_t b = 0; b < pool_.num_blocks(); ++b)
    if (refs[static_cast<size_t>(b)] != pool_.ref_count(b))
      return make_error(errc::internal, "block {} has ref count {} but {} table entries", b,
                        pool_.ref_count(b), refs[static_cast<size_t>(b)]);
  if (running_.size() + waiting_.size() + importing_.size() + parked_.size() != live_.size())
    return make_error(
        errc::internal, "{} running + {} waiting + {} importing + {} parked != {} live",
        running_.size(), waiting_.size(), importing_.size(), parked_.size(), live_.size());
  return {};
}

} // namespace troupe::engine
