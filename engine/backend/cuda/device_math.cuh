// Device-side helpers shared by the CUDA kernels (warp reductions, bf16 unpacking). nvcc only.
#pragma once

#include <cuda_bf16.h>

namespace troupe::engine::cuda {

// The first statement of every kernel launched with launch_pdl (cuda_common.cuh): waits until the
// kernels it depends on have completed and their writes are visible.
__device__ __forceinline__ void pdl_wait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

// Lets the next kernel be scheduled now: its blocks fill the SMs this grid's last wave leaves
// idle and wait there. Only the decode GEMM (batch <= 8) does this (H100, 8B batch 1: 6.53 ->
// 6.49 ms); done in every kernel it won more at batch 1 (6.39 ms) but cost 15-40% at batch 32.
__device__ __forceinline__ void pdl_trigger() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Eight bf16 values loaded as one 16-byte vector, widened to float.
__device__ __forceinline__ void bf16x8_to_float(const uint4& v, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float2 p = __bfloat1622float2(h[k]);
    f[2 * k] = p.x;
    f[2 * k + 1] = p.y;
  }
}

} // namespace troupe::engine::cuda
