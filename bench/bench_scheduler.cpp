// Scheduler benchmark (issue 4): CPU time of schedule() + update() per decode step with N running
// sequences of C-token contexts and prefix caching on. The executor is a stand-in that answers
// every sequence with a token; its time is not counted. Goal: <= 50 us per step at 256 x 2000.
//   bench_scheduler [--seqs 256] [--context 2000] [--steps 1000] [--shared 1024] [--no-cache]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "engine/scheduler/scheduler.hpp"

using namespace troupe;
using namespace troupe::engine;

namespace {

double thread_cpu_us() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e6 + static_cast<double>(t.tv_nsec) / 1e3;
}

void answer(const step_plan& plan, step_result& r) {
  r.step = plan.step;
  r.outputs.clear();
  for (const auto& s : plan.seqs)
    if (s.logits != logits_mode::none)
      r.outputs.push_back({.id = s.id,
                           .token = static_cast<token_id>((s.start_pos * 7 + 3) % 30000),
                           .logprob = -1.0f});
}

} // namespace

int main(int argc, char** argv) {
  int32_t seqs = 256, context = 2000, steps = 1000, shared = 1024;
  bool cache = true;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::atoi(argv[++i]) : 0; };
    if (a == "--seqs")
      seqs = next();
    else if (a == "--context")
      context = next();
    else if (a == "--steps")
      steps = next();
    else if (a == "--shared")
      shared = next();
    else if (a == "--no-cache")
      cache = false;
    else {
      std::fprintf(stderr,
                   "usage: %s [--seqs N] [--context C] [--steps S] [--shared P] [--no-cache]\n",
                   argv[0]);
      return 2;
    }
  }
  const int32_t bs = 16;
  const int32_t per_seq = (context + steps + 512) / bs + 1;
  scheduler_options o{.num_blocks = seqs * per_seq,
                      .block_size = bs,
                      .prefix_caching = cache,
                      .max_num_batched_tokens = 8192,
                      .max_num_seqs = seqs,
                      .max_model_len = context + steps + 8192,
                      .vocab_size = 32000,
                      .eos_token_ids = {2}};
  scheduler sched(o);
  for (int32_t i = 0; i < seqs; ++i) {
    std::vector<token_id> prompt(static_cast<size_t>(context));
    for (int32_t k = 0; k < context; ++k) // a shared system prefix, then each request's own text
      prompt[k] = k < shared ? 10 + k % 20000 : 100 + (i * 7919 + k * 31) % 30000;
    sampling_params sp;
    sp.temperature = 0.7f;
    sp.top_p = 0.9f;
    sp.max_tokens = steps + 4096; // never reached: prefill steps already decode some
    sp.ignore_eos = true;
    if (!sched.add({.prompt = std::move(prompt), .sampling = sp})) {
      std::fprintf(stderr, "add failed\n");
      return 1;
    }
  }
  step_plan plan;
  step_result result;
  std::vector<request_output> outs;
  // Prefill everything (not timed).
  int prefill_steps = 0;
  for (;; ++prefill_steps) {
    sched.schedule(plan);
    bool all_decode = static_cast<int32_t>(plan.seqs.size()) == seqs;
    for (const auto& s : plan.seqs)
      all_decode = all_decode && s.tokens.size() == 1;
    answer(plan, result);
    outs.clear();
    if (!sched.update(plan, result, outs)) {
      std::fprintf(stderr, "update failed\n");
      return 1;
    }
    if (all_decode)
      break;
  }
  std::vector<double> cpu(static_cast<size_t>(steps));
  double total = 0;
  for (int32_t i = 0; i < steps; ++i) {
    double t0 = thread_cpu_us();
    sched.schedule(plan);
    double t1 = thread_cpu_us();
    answer(plan, result); // the stand-in executor: not timed
    double t2 = thread_cpu_us();
    outs.clear();
    auto u = sched.update(plan, result, outs);
    double t3 = thread_cpu_us();
    if (!u || static_cast<int32_t>(plan.seqs.size()) != seqs) {
      std::fprintf(stderr, "step %d: %zu sequences scheduled\n", i, plan.seqs.size());
      return 1;
    }
    cpu[static_cast<size_t>(i)] = (t1 - t0) + (t3 - t2);
    total += cpu[static_cast<size_t>(i)];
  }
  std::sort(cpu.begin(), cpu.end());
  const auto st = sched.stats();
  std::printf("scheduler: %d running seqs, context %d..%d tokens, %d shared-prefix tokens, "
              "prefix caching %s, block size %d\n",
              seqs, context, context + steps, shared, cache ? "on" : "off", bs);
  std::printf("prefill: %d steps, prefix-hit tokens %llu (pool hit rate %.3f)\n", prefill_steps,
              static_cast<unsigned long long>(st.prefix_hit_tokens), sched.pool().hit_rate());
  std::printf("decode: %d steps, schedule()+update() CPU time per step: mean %.1f us, "
              "p50 %.1f us, p99 %.1f us, max %.1f us\n",
              steps, total / steps, cpu[cpu.size() / 2], cpu[cpu.size() * 99 / 100], cpu.back());
  return 0;
}
