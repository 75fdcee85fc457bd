// CUDA kernels against the float32 CPU reference (engine/backend/cpu/ops.hpp) over many shapes,
// with random inputs and poisoned outputs. Label `gpu`; skips with the reason where no GPU is.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include <doctest/doctest.h>

#include "engine/backend/cpu/ops.hpp"
#include "engine/backend/cuda/cuda_backend.hpp"
#include "engine/backend/cuda/gemm.cuh"
#include "engine/backend/cuda/kernels.cuh"
#include "engine/backend/cuda/moe.cuh"
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

// One MoE layer as the CPU backend computes it (cpu_backend::moe): softmax router, top-k by a
// stable sort (ties to the lower id), optional renormalisation; only experts [begin, end), whose
// weights gu [local, 2 I, H] and dn [local, H, I] hold, contribute.
std::vector<float> moe_reference(const moe_dims& d, const std::vector<float>& logits,
                                 const std::vector<float>& h, const std::vector<float>& gu,
                                 const std::vector<float>& dn) {
  const size_t H = static_cast<size_t>(d.H), I = static_cast<size_t>(d.I);
  std::vector<float> out(static_cast<size_t>(d.T) * H, 0.0f), p(static_cast<size_t>(d.E));
  std::vector<float> g(I), u(I), y(H);
  std::vector<int> order(static_cast<size_t>(d.E));
  for (int t = 0; t < d.T; ++t) {
    std::copy_n(logits.begin() + static_cast<long>(t) * d.E, d.E, p.begin());
    cpu::softmax(p.data(), d.E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    float sum = 0;
    for (int k = 0; k < d.K; ++k)
      sum += p[order[k]];
    for (int k = 0; k < d.K; ++k) {
      const int e = order[k];
      if (e < d.expert_begin || e >= d.expert_end)
        continue;
      const float w = d.norm_topk_prob ? p[e] / sum : p[e];
      const float* x = h.data() + t * H;
      const float* ge = gu.data() + static_cast<size_t>(e - d.expert_begin) * 2 * I * H;
      cpu::matmul_nt(x, 1, d.H, ge, d.I, g.data());
      cpu::matmul_nt(x, 1, d.H, ge + I * H, d.I, u.data());
      cpu::silu_mul(g.data(), u.data(), 1, d.I, g.data());
      cpu::matmul_nt(g.data(), 1, d.I, dn.data() + static_cast<size_t>(e - d.expert_begin) * H * I,
                     d.H, y.data());
      for (size_t i = 0; i < H; ++i)
        out[t * H + i] += w * y[i];
    }
  }
  return out;
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

TEST_CASE("cuda moe: device routing and grouped expert GEMMs against the CPU reference") {
  if (!test::have_gpu())
    return;
  std::mt19937 rng(3);
  // T, H, I, E, K, this rank's experts, renormalised: single tokens, partial expert ranges (a
  // tensor rank's share), more pairs than one permutation chunk, Qwen3-30B-A3B's dimensions.
  struct shape {
    int T, H, I, E, K, begin, end;
    bool norm;
  };
  for (auto c :
       {shape{1, 64, 48, 8, 2, 0, 8, true}, shape{5, 64, 48, 8, 2, 2, 6, true},
        shape{9, 32, 16, 5, 1, 0, 5, false}, shape{37, 128, 96, 16, 4, 0, 16, true},
        shape{300, 256, 64, 128, 8, 0, 128, true}, shape{16, 2048, 768, 128, 8, 32, 96, true}}) {
    moe_dims d{.T = c.T,
               .H = c.H,
               .I = c.I,
               .E = c.E,
               .K = c.K,
               .expert_begin = c.begin,
               .expert_end = c.end,
               .norm_topk_prob = c.norm};
    CAPTURE(c.T);
    CAPTURE(c.H);
    CAPTURE(c.E);
    CAPTURE(c.begin);
    REQUIRE(moe_supported(d).has_value());
    const size_t L = static_cast<size_t>(d.local());
    auto logits = random_vec(static_cast<size_t>(c.T) * c.E, rng, 2.0f);
    auto h = random_vec(static_cast<size_t>(c.T) * c.H, rng);
    auto gu = random_vec(L * 2 * c.I * c.H, rng, 1.0f / std::sqrt(static_cast<float>(c.H)));
    auto dn = random_vec(L * c.H * c.I, rng, 1.0f / std::sqrt(static_cast<float>(c.I)));
    const auto want = moe_reference(d, logits, h, gu, dn);
    dev<float> dl(logits);
    dev<uint16_t> dh(test::to_bf16_bits(h)), dgu(test::to_bf16_bits(gu)),
        ddn(test::to_bf16_bits(dn));
    auto* bh = reinterpret_cast<bf16*>(dh.p);
    auto* bgu = reinterpret_cast<bf16*>(dgu.p);
    auto* bdn = reinterpret_cast<bf16*>(ddn.p);
    dev<uint8_t> space(moe_workspace_bytes(d, c.T));
    const auto ws = moe_carve(space.p, d, c.T);
    // The fused output: added to a residual stream, then RMS-normalised.
    auto resid0 = random_vec(want.size(), rng, 2.0f);
    auto norm_w = random_vec(static_cast<size_t>(c.H), rng);
    std::vector<float> resid_want(want.size()), normed_want(want.size());
    for (size_t i = 0; i < want.size(); ++i)
      resid_want[i] = resid0[i] + want[i];
    cpu::rms_norm(resid_want.data(), c.T, c.H, norm_w.data(), 1e-6, normed_want.data());
    dev<float> dnorm(norm_w);
    for (auto path : {moe_path::skinny, moe_path::tensor_core, moe_path::auto_path}) {
      CAPTURE(static_cast<int>(path));
      dev<float> partial(want.size()); // poisoned: NaN where nothing was written
      REQUIRE(moe_forward(d, dl.p, bh, bgu, bdn, ws, {.partial = partial.p}, path, nullptr)
                  .has_value());
      dev<float> resid(resid0);
      dev<uint16_t> normed(want.size());
      const moe_output fused{.resid = resid.p,
                             .norm = dnorm.p,
                             .eps = 1e-6f,
                             .normed = reinterpret_cast<bf16*>(normed.p)};
      REQUIRE(moe_forward(d, dl.p, bh, bgu, bdn, ws, fused, path, nullptr).has_value());
      device_sync();
      // The activation is rounded to bf16 between the GEMMs.
      CHECK(test::rel_l2(partial.floats(), want) < 1e-2);
      CHECK(test::rel_l2(resid.floats(), resid_want) < 2e-3);
      CHECK(test::rel_l2(normed.floats(), normed_want) < 1e-2);
      // The first token alone gets exactly the row it got in the batch (same path).
      if (path == moe_path::auto_path)
        continue;
      moe_dims one = d;
      one.T = 1;
      dev<float> alone(static_cast<size_t>(c.H));
      REQUIRE(moe_forward(one, dl.p, bh, bgu, bdn, ws, {.partial = alone.p}, path, nullptr)
                  .has_value());
      device_sync();
      auto row = partial.floats();
      row.resize(static_cast<size_t>(c.H));
      CHECK(alone.floats() == row);
    }
  }
  moe_dims odd{.T = 1, .H = 36, .I = 16, .E = 4, .K = 2, .expert_begin = 0, .expert_end = 4};
  auto r = moe_supported(odd);
  REQUIRE(!r.has_value());
  CHECK(r.error().to_string().find("multiples of 8") != std::string::npos);
}
