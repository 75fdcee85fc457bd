// What a forward pass hands the sampler: the logits of the seq_steps that asked for them.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace troupe::engine {

// Logits a forward pass produced, for the seq_steps that asked for them.
struct forward_output {
  int64_t vocab_size = 0;
  std::vector<float> logits; // [rows, vocab_size]
  std::vector<int32_t>
      first_row;                 // per seq_step in plan order: first row, or -1 (logits_mode::none)
  std::vector<int32_t> num_rows; // per seq_step: 0, 1 (last) or its token count (all)

  std::span<const float> row(int32_t r) const {
    return {logits.data() + static_cast<size_t>(r) * vocab_size, static_cast<size_t>(vocab_size)};
  }
  // The logits of seq_step i's last fed token. Precondition: num_rows[i] > 0.
  std::span<const float> last_row(size_t i) const { return row(first_row[i] + num_rows[i] - 1); }
};

} // namespace troupe::engine
