#include "engine/model/rope.hpp"

#include <cmath>
#include <numbers>

namespace troupe::engine {

std::vector<float> rope_inv_freq(const model_config& config) {
  const auto& rope = config.rope;
  const int64_t dim = config.head_dim;
  std::vector<float> inv(static_cast<size_t>(dim / 2));
  for (int64_t i = 0; i < dim / 2; ++i) {
    float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    inv[static_cast<size_t>(i)] = 1.0f / std::pow(static_cast<float>(rope.theta), exponent);
  }
  switch (rope.type) {
  case rope_config::kind::standard:
    break;
  case rope_config::kind::linear:
    for (auto& f : inv)
      f = static_cast<float>(f / rope.factor);
    break;
  case rope_config::kind::llama3: {
    // Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    const double old_len = static_cast<double>(rope.original_max_position);
    const double low_wavelen = old_len / rope.low_freq_factor;
    const double high_wavelen = old_len / rope.high_freq_factor;
    for (auto& f : inv) {
      const double freq = f;
      const double wavelen = 2.0 * std::numbers::pi / freq;
      double scaled = wavelen > low_wavelen ? freq / rope.factor : freq;
      if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
        double smooth = (old_len / wavelen - rope.low_freq_factor) /
                        (rope.high_freq_factor - rope.low_freq_factor);
        scaled = (1.0 - smooth) * scaled / rope.factor + smooth * scaled;
      }
      f = static_cast<float>(scaled);
    }
    break;
  }
  }
  // Hugging Face keeps inv_freq in a buffer that is cast with the model, so a checkpoint run in
  // its saved dtype rotates by frequencies rounded to that dtype. Reproduce it: the golden
  // references (and every HF-served bf16 model) were computed that way.
  if (config.checkpoint_dtype == dtype::bf16)
    for (auto& f : inv)
      f = round_to_bf16(f);
  else if (config.checkpoint_dtype == dtype::f16)
    for (auto& f : inv)
      f = round_to_f16(f);
  return inv;
}

} // namespace troupe::engine
