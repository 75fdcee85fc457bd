// CUDA kernels against the float32 CPU reference (engine/backend/cpu/ops.hpp) over many shapes,
// with random inputs and poisoned outputs. Label `gpu`; skips with the reason where no GPU is.
#include <algorithm>
#include <cmath>
#include <random>

#include <doctest/doctest.h>

#include "engine/backend/cpu/ops.hpp"
#include "engine/backend/cuda/cuda_backend.hpp"
#include "engine/backend/cuda/gemm.cuh"
#include "engine/backend/cuda/kernels.cuh"
#include "engine/model/dtype.hpp"
#include "gpu_test_util.hpp"

using namespace troupe;
using namespace troupe::engine;
using namespace troupe::engine::cuda;

namespace {

std::vector<float> random_vec(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v)
    x = round_to_bf16(d(rng)); // representable in bf16, so uploads are exact
  return v;
}

// A device copy of host data, freed at scope end.
template <class T>
struct dev {
  T* p = nullptr;
  size_t n = 0;
  explicit dev(size_t count) : n(count) {
    REQUIRE(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)) == cudaSuccess);
    REQUIRE(cudaMemset(p, 0xff, std::max<size_t>(count, 1) * sizeof(T)) == cudaSuccess); // poison
  }
  template <class U>
  explicit dev(const std::vector<U>& host) : dev(host.size()) {
    static_assert(sizeof(U) == sizeof(T));
    REQUIRE(cudaMemcpy(p, host.data(), n * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  ~dev() { cudaFree(p); }
  std::vector<float> floats() const {
    std::vector<float> out(n);
    if constexpr (sizeof(T) == 4) {
      REQUIRE(cudaMemcpy(out.data(), p, n * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
    } else {
      std::vector<uint16_t> bits(n);
      REQUIRE(cudaMemcpy(bits.data(), p, n * 2, cudaMemcpyDeviceToHost) == cudaSuccess);
      for (size_t i = 0; i < n; ++i)
        out[i] = bf16_to_f32(bits[i]);
    }
    return out;
  }
};

void device_sync() {
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
}

} // namespace

TEST_CASE("cuda gemm: skinny kernel and cuBLASLt against the CPU reference") {
  if (!test::have_gpu())
    return;
  std::mt19937 rng(1);
  gemm_runner g;
  REQUIRE(g.init().has_value());
  for (auto [T, in, out] : {std::tuple{1, 64, 32},
                            {3, 128, 200},
                            {8, 4096, 96},
                            {9, 256, 130},
                            {64, 1024, 512},
                            {130, 352, 4096},
                            {5, 12288, 64}}) {
    CAPTURE(T);
    CAPTURE(in);
    CAPTURE(out);
    auto x = random_vec(static_cast<size_t>(T) * in, rng);
    auto w = random_vec(static_cast<size_t>(out) * in, rng, 0.05f);
    std::vector<float> want(static_cast<size_t>(T) * out);
    cpu::matmul_nt(x.data(), T, in, w.data(), out, want.data());
    dev<uint16_t> dx(test::to_bf16_bits(x)), dw(test::to_bf16_bits(w));
    auto* bx = reinterpret_cast<bf16*>(dx.p);
    auto* bw = reinterpret_cast<bf16*>(dw.p);
    for (bool skinny : {true, false}) {
      CAPTURE(skinny);
      dev<float> y(want.size());
      dev<uint16_t> yb(want.size());
      if (skinny && T <= gemm_runner::skinny_max_tokens) {
        REQUIRE(skinny_gemm(bx, T, in, bw, out, y.p, true, nullptr).has_value());
        REQUIRE(skinny_gemm(bx, T, in, bw, out, yb.p, false, nullptr).has_value());
      } else {
        g.use_skinny = false;
        REQUIRE(g.run(bx, T, in, bw, out, y.p, nullptr).has_value());
        REQUIRE(g.run(bx, T, in, bw, out, reinterpret_cast<bf16*>(yb.p), nullptr).has_value());
      }
      device_sync();
      CHECK(test::rel_l2(y.floats(), want) < 1e-5);  // fp32 accumulation of exact bf16 products
      CHECK(test::rel_l2(yb.floats(), want) < 5e-3); // bf16 output rounding
    }
  }
}

TEST_CASE("cuda norms, silu and argmax against the CPU reference") {
  if (!test::have_gpu())
    return;
  std::mt19937 rng(2);
  for (auto [T, H] : {std::pair{1, 32}, {7, 96}, {33, 4096}, {2, 5120}}) {
    CAPTURE(T);
    CAPTURE(H);
    auto x = random_vec(static_cast<size_t>(T) * H, rng, 3.0f);
    auto d = random_vec(static_cast<size_t>(T) * H, rng);
    auto w = random_vec(static_cast<size_t>(H), rng);
    dev<float> dxr(x), dwr(w);
    dev<uint16_t> out(static_cast<size_t>(T) * H), dd(test::to_bf16_bits(d));
    REQUIRE(
        rms_norm(dxr.p, T, H, dwr.p, 1e-6f, reinterpret_cast<bf16*>(out.p), nullptr).has_value());
    device_sync();
    std::vector<float> want(x.size());
    cpu::rms_norm(x.data(), T, H, w.data(), 1e-6, want.data());
    CHECK(test::rel_l2(out.floats(), want) < 5e-3);
    // add + norm: resid is updated in place
    REQUIRE(add_rms_norm(dxr.p, reinterpret_cast<bf16*>(dd.p), nullptr, T, H, dwr.p, 1e-6f,
                         reinterpret_cast<bf16*>(out.p), nullptr)
                .has_value());
    device_sync();
    for (size_t i = 0; i < x.size(); ++i)
      x[i] += d[i];
    CHECK(test::rel_l2(dxr.floats(), x) < 1e-6);
    cpu::rms_norm(x.data(), T, H, w.data(), 1e-6, want.data());
    CHECK(test::rel_l2(out.floats(), want) < 5e-3);
    // silu(gate) * up over [T, 2 * (H/2)]
    const int I = H / 2;
    std::vector<float> g(static_cast<size_t>(T) * I), u(g.size()), s(g.size());
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < I; ++i) {
        g[t * I + i] = d[static_cast<size_t>(t) * H + i];
        u[t * I + i] = d[static_cast<size_t>(t) * H + I + i];
      }
    cpu::silu_mul(g.data(), u.data(), T, I, s.data());
    dev<uint16_t> act(g.size());
    REQUIRE(silu_mul(reinterpret_cast<bf16*>(dd.p), T, I, reinterpret_cast<bf16*>(act.p), nullptr)
                .has_value());
    device_sync();
    CHECK(test::rel_l2(act.floats(), s) < 5e-3);
    // argmax per row, lowest index on ties
    std::vector<float> logits = random_vec(static_cast<size_t>(T) * H, rng);
    logits[static_cast<size_t>(H) - 1] = 9.0f;
    logits[static_cast<size_t>(H) / 2] = 9.0f;
    dev<float> dl(logits);
    dev<int32_t> am(static_cast<size_t>(T));
    REQUIRE(argmax_rows(dl.p, T, H, am.p, nullptr).has_value());
    device_sync();
    std::vector<int32_t> got(static_cast<size_t>(T));
    REQUIRE(cudaMemcpy(got.data(), am.p, got.size() * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
    CHECK(got[0] == H / 2);
    for (int t = 1; t < T; ++t) {
      auto row = std::span(logits).subspan(static_cast<size_t>(t) * H, static_cast<size_t>(H));
      CHECK(got[static_cast<size_t>(t)] == std::max_element(row.begin(), row.end()) - row.begin());
    }
  }
}
