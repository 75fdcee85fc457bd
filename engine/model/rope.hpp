// Rotary embedding frequencies per model (default, linear and llama3 scaling), shared by every
// backend so that all of them rotate by exactly the same angles.
#pragma once

#include <vector>

#include "engine/model/model_config.hpp"

namespace troupe::engine {

// inv_freq[head_dim / 2], float32 as Hugging Face computes it; linear scaling folded in.
std::vector<float> rope_inv_freq(const model_config& config);

} // namespace troupe::engine
