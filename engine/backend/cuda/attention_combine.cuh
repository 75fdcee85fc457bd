// The split-K attention combine for one (token, query head), shared by attention.cu's combine
// kernel and the tensor-core decode kernel's fused combine (flash_prefill.cu). nvcc only.
#pragma once

#include "engine/backend/cuda/device_math.cuh"
#include "engine/backend/cuda/kernels.cuh"

namespace troupe::engine::cuda {

// out[t, h, :] from the `splits` partial results of a.partial ([T, nh, splits, D + 2]: D
// unnormalised outputs, the running max (natural log), the sum): a warp finds the global max and
// normaliser, then every thread of the block sums the rescaled outputs of its dimensions. Every
// thread of the block calls it; weight holds `splits` floats of shared memory. Partials are read
// through L2 (__ldcg): other blocks of the same launch may have written them.
__device__ inline void combine_head(const attention_args& a, const head_layout& L, int t, int h,
                                    int splits, float* weight) {
  const int D = L.head_dim;
  const float* base = a.partial + (static_cast<size_t>(t) * L.num_heads + h) * splits * (D + 2);
  if (threadIdx.x < 32) {
    float m = -INFINITY;
    for (int s = threadIdx.x; s < splits; s += 32)
      m = fmaxf(m, __ldcg(base + s * (D + 2) + D));
    m = warp_max(m);
    float l = 0.0f;
    for (int s = threadIdx.x; s < splits; s += 32) {
      const float* p = base + s * (D + 2);
      const float sum = __ldcg(p + D + 1);
      const float w = sum > 0.0f ? __expf(__ldcg(p + D) - m) : 0.0f;
      weight[s] = w;
      l += w * sum;
    }
    l = warp_sum(l);
    for (int s = threadIdx.x; s < splits; s += 32)
      weight[s] /= l;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
#pragma unroll 4
    for (int s = 0; s < splits; ++s)
      acc += weight[s] * __ldcg(base + s * (D + 2) + d);
    a.out[(static_cast<size_t>(t) * L.num_heads + h) * D + d] = __float2bfloat16(acc);
  }
  __syncthreads(); // weight is reused by the next call
}

} // namespace troupe::engine::cuda
