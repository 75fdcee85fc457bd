// CPU decode speed at batch 1: loads a model (folder or .gguf) into the float32 CPU backend,
// prefills a prompt, then times greedy decode steps of one token each and prints tokens/s.
// Usage: bench_decode_cpu MODEL [prompt_tokens=32] [decode_tokens=64]. Blocks until done.
#include <algorithm>
#include <chrono>
#include <cstdlib>

#include <fmt/format.h>

#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/generate.hpp"

using namespace troupe;
using namespace troupe::engine;
using clock_type = std::chrono::steady_clock;

int main(int argc, char** argv) {
  if (argc < 2) {
    fmt::print(stderr, "usage: {} MODEL_DIR_OR_GGUF [prompt_tokens=32] [decode_tokens=64]\n",
               argv[0]);
    return 2;
  }
  const int32_t prompt_len = argc > 2 ? std::atoi(argv[2]) : 32;
  const int32_t decode = argc > 3 ? std::atoi(argv[3]) : 64;
  const int32_t block = 16;
  const int32_t blocks = (prompt_len + decode + block - 1) / block;
  auto t0 = clock_type::now();
  auto model = cpu_backend::load(argv[1], {.num_blocks = blocks, .block_size = block});
  if (!model) {
    fmt::print(stderr, "{}\n", model.error().to_string());
    return 1;
  }
  auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  auto t1 = clock_type::now();
  const auto& c = (*model)->config();
  fmt::print("model {}: {} layers, hidden {}, vocab {}; load {:.2f} s\n", argv[1], c.num_layers,
             c.hidden_size, c.vocab_size, secs(t0, t1));

  seq_step s;
  s.id = 1;
  for (int32_t b = 0; b < blocks; ++b)
    s.block_table.push_back(b);
  for (int32_t i = 0; i < prompt_len; ++i) // a fixed pseudo-prompt of ordinary token ids
    s.tokens.push_back(static_cast<token_id>(1000 + (i * 7919) % 20000));
  forward_output out;
  step_plan plan;
  plan.seqs = {s};
  auto p0 = clock_type::now();
  if (auto r = (*model)->forward(plan, out); !r) {
    fmt::print(stderr, "{}\n", r.error().to_string());
    return 1;
  }
  auto p1 = clock_type::now();
  token_id next = argmax(out.last_row(0));
  int32_t pos = prompt_len;
  auto d0 = clock_type::now();
  for (int32_t i = 0; i < decode; ++i, ++pos) {
    plan.seqs[0].start_pos = pos;
    plan.seqs[0].tokens = {next};
    if (auto r = (*model)->forward(plan, out); !r) {
      fmt::print(stderr, "{}\n", r.error().to_string());
      return 1;
    }
    next = argmax(out.last_row(0));
  }
  auto d1 = clock_type::now();
  fmt::print("prefill {} tokens: {:.3f} s ({:.1f} tokens/s)\n", prompt_len, secs(p0, p1),
             prompt_len / secs(p0, p1));
  fmt::print("decode batch 1, {} tokens: {:.3f} s, {:.1f} ms/token, {:.2f} tokens/s\n", decode,
             secs(d0, d1), 1e3 * secs(d0, d1) / decode, decode / secs(d0, d1));
  return 0;
}
