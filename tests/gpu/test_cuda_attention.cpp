// The fused q/k-norm + RoPE + cache-write kernel and paged attention against straightforward CPU
// code, for mixed prefill/decode batches over shuffled KV blocks. Label `gpu`.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include <doctest/doctest.h>

#include "engine/backend/cpu/ops.hpp"
#include "engine/backend/cuda/cuda_backend.hpp"
#include "engine/backend/cuda/kernels.cuh"
#include "engine/model/dtype.hpp"
#include "gpu_test_util.hpp"

using namespace troupe;
using namespace troupe::engine;
using namespace troupe::engine::cuda;

namespace {

template <class T>
T* upload(const std::vector<T>& v) {
  T* p = nullptr;
  REQUIRE(cudaMalloc(&p, std::max<size_t>(v.size(), 1) * sizeof(T)) == cudaSuccess);
  REQUIRE(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  return p;
}
template <class T>
std::vector<T> download(const T* p, size_t n) {
  std::vector<T> v(n);
  REQUIRE(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
  return v;
}

struct scenario {
  head_layout L;
  int block_size;
  std::vector<std::pair<int, int>> seqs; // (start_pos, tokens fed)
};

void run(const scenario& sc, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1, 1);
  const int D = sc.L.head_dim, nh = sc.L.num_heads, nkv = sc.L.num_kv_heads, W = sc.L.qkv_width();
  const int group = nh / nkv;
  // Block tables: shuffled distinct blocks.
  std::vector<std::vector<int>> tables;
  int blocks = 0, T = 0, max_blocks = 0;
  for (auto [start, n] : sc.seqs) {
    int need = (start + n + sc.block_size - 1) / sc.block_size;
    tables.emplace_back(need);
    std::iota(tables.back().begin(), tables.back().end(), blocks);
    blocks += need;
    T += n;
    max_blocks = std::max(max_blocks, need);
  }
  std::vector<int> perm(static_cast<size_t>(blocks));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  for (auto& t : tables)
    for (auto& b : t)
      b = perm[static_cast<size_t>(b)];
  const size_t slots = static_cast<size_t>(blocks) * sc.block_size;
  // Caches hold earlier tokens already (random); this step's tokens are written by the kernel.
  std::vector<float> kc(slots * nkv * D), vc(slots * nkv * D);
  for (auto& x : kc)
    x = round_to_bf16(dist(rng));
  for (auto& x : vc)
    x = round_to_bf16(dist(rng));
  std::vector<float> qkv(static_cast<size_t>(T) * W), qn(static_cast<size_t>(D)), kn(qn.size());
  for (auto& x : qkv)
    x = round_to_bf16(dist(rng));
  for (auto& x : qn)
    x = 1.0f + 0.5f * dist(rng);
  for (auto& x : kn)
    x = 1.0f + 0.5f * dist(rng);
  std::vector<float> inv(static_cast<size_t>(D / 2));
  for (int i = 0; i < D / 2; ++i)
    inv[static_cast<size_t>(i)] = std::pow(10000.0f, -2.0f * i / D);
  std::vector<int32_t> positions, token_seq, slot_of, tables_flat(sc.seqs.size() * max_blocks, 0);
  for (size_t s = 0; s < sc.seqs.size(); ++s) {
    auto [start, n] = sc.seqs[s];
    for (int j = 0; j < n; ++j) {
      int pos = start + j;
      positions.push_back(pos);
      token_seq.push_back(static_cast<int32_t>(s));
      slot_of.push_back(tables[s][static_cast<size_t>(pos / sc.block_size)] * sc.block_size +
                        pos % sc.block_size);
    }
    std::copy(tables[s].begin(), tables[s].end(), tables_flat.begin() + s * max_blocks);
  }

  // CPU reference of the fused kernel: norm, rope, then cache writes.
  std::vector<float> ref_q(static_cast<size_t>(T) * nh * D);
  for (int t = 0; t < T; ++t) {
    float* row = qkv.data() + static_cast<size_t>(t) * W;
    std::vector<float> q(row, row + nh * D), k(row + nh * D, row + (nh + nkv) * D),
        v(row + (nh + nkv) * D, row + W);
    cpu::rms_norm(q.data(), nh, D, qn.data(), 1e-6, q.data());
    cpu::rms_norm(k.data(), nkv, D, kn.data(), 1e-6, k.data());
    cpu::apply_rope(q.data(), nh, D, positions[static_cast<size_t>(t)], inv);
    cpu::apply_rope(k.data(), nkv, D, positions[static_cast<size_t>(t)], inv);
    std::copy(q.begin(), q.end(), ref_q.begin() + static_cast<size_t>(t) * nh * D);
    for (int i = 0; i < nkv * D; ++i) {
      kc[static_cast<size_t>(slot_of[static_cast<size_t>(t)]) * nkv * D + i] = round_to_bf16(k[i]);
      vc[static_cast<size_t>(slot_of[static_cast<size_t>(t)]) * nkv * D + i] =
          v[static_cast<size_t>(i)];
    }
  }
  // CPU attention over the (now complete) caches, with bf16-rounded queries as the GPU sees them.
  std::vector<float> ref_out(static_cast<size_t>(T) * nh * D);
  for (int t = 0; t < T; ++t) {
    const int s = token_seq[static_cast<size_t>(t)], ctx = positions[static_cast<size_t>(t)] + 1;
    for (int h = 0; h < nh; ++h) {
      std::vector<float> p(static_cast<size_t>(ctx));
      for (int j = 0; j < ctx; ++j) {
        size_t slot = static_cast<size_t>(
                          tables[static_cast<size_t>(s)][static_cast<size_t>(j / sc.block_size)]) *
                          sc.block_size +
                      j % sc.block_size;
        double dot = 0;
        for (int d = 0; d < D; ++d)
          dot += round_to_bf16(ref_q[(static_cast<size_t>(t) * nh + h) * D + d]) *
                 kc[(slot * nkv + h / group) * D + d];
        p[static_cast<size_t>(j)] = static_cast<float>(dot / std::sqrt(static_cast<double>(D)));
      }
      cpu::softmax(p.data(), ctx);
      for (int d = 0; d < D; ++d) {
        double acc = 0;
        for (int j = 0; j < ctx; ++j) {
          size_t slot =
              static_cast<size_t>(
                  tables[static_cast<size_t>(s)][static_cast<size_t>(j / sc.block_size)]) *
                  sc.block_size +
              j % sc.block_size;
          acc += p[static_cast<size_t>(j)] * vc[(slot * nkv + h / group) * D + d];
        }
        ref_out[(static_cast<size_t>(t) * nh + h) * D + d] = static_cast<float>(acc);
      }
    }
  }

  auto* d_qkv = reinterpret_cast<bf16*>(upload(test::to_bf16_bits(qkv)));
  std::vector<float> kc0 = kc, vc0 = vc; // caches as they were before this step's writes
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < nkv * D; ++i) {
      size_t at = static_cast<size_t>(slot_of[static_cast<size_t>(t)]) * nkv * D + i;
      kc0[at] = vc0[at] = 7.0f; // poison: the kernel must overwrite these
    }
  auto* d_k = reinterpret_cast<bf16*>(upload(test::to_bf16_bits(kc0)));
  auto* d_v = reinterpret_cast<bf16*>(upload(test::to_bf16_bits(vc0)));
  auto* d_qn = upload(qn);
  auto* d_kn = upload(kn);
  auto* d_inv = upload(inv);
  auto* d_pos = upload(positions);
  auto* d_seq = upload(token_seq);
  auto* d_slot = upload(slot_of);
  auto* d_tab = upload(tables_flat);
  REQUIRE(qkv_rope_cache(d_qkv, nullptr, d_qn, d_kn, 1e-6f, d_pos, d_slot, d_inv, T, sc.L, d_k, d_v,
                         nullptr)
              .has_value());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  auto got_qkv = test::from_bf16_bits(download(reinterpret_cast<uint16_t*>(d_qkv), qkv.size()));
  std::vector<float> got_q;
  for (int t = 0; t < T; ++t)
    got_q.insert(got_q.end(), got_qkv.begin() + static_cast<long>(t) * W,
                 got_qkv.begin() + static_cast<long>(t) * W + nh * D);
  CHECK(test::rel_l2(got_q, ref_q) < 5e-3);
  CHECK(test::rel_l2(test::from_bf16_bits(download(reinterpret_cast<uint16_t*>(d_k), kc.size())),
                     kc) < 5e-3);
  CHECK(test::rel_l2(test::from_bf16_bits(download(reinterpret_cast<uint16_t*>(d_v), vc.size())),
                     vc) == 0.0);

  // Routing: every sequence of 2+ tokens to the tensor-core prefill kernel, the rest split-K.
  std::vector<int> seq_tokens;
  for (auto [start, n] : sc.seqs)
    seq_tokens.push_back(n);
  std::vector<int32_t> tiles(3 * static_cast<size_t>(T)), split_tokens(static_cast<size_t>(T)),
      decode_tiles(3 * static_cast<size_t>(T));
  attention_args route;
  route_attention(seq_tokens.data(), static_cast<int>(seq_tokens.size()), sc.L, 2, tiles.data(),
                  split_tokens.data(), decode_tiles.data(), route);
  CHECK(route.num_split_tokens + [&] {
    int n = 0;
    for (int i = 0; i < route.num_flash_tiles; ++i)
      n += tiles[3 * static_cast<size_t>(i) + 2];
    return n;
  }() == T);
  auto* d_tiles = upload(tiles);
  auto* d_split = upload(split_tokens);
  auto* d_decode = upload(decode_tiles);
  // flash: 0 = every token split-K on CUDA cores, 1 = flash tiles + CUDA-core split-K for the
  // rest, 2 = flash tiles + tensor-core split-K (decode tiles) for the rest.
  for (auto [splits, flash] :
       {std::pair{1, 0}, {3, 0}, {8, 0}, {1, 1}, {5, 1}, {1, 2}, {3, 2}, {8, 2}}) {
    CAPTURE(splits);
    CAPTURE(flash);
    if (flash > 0 && !flash_prefill_supported(sc.L))
      continue;
    float* partial = nullptr;
    REQUIRE(cudaMalloc(&partial, attention_partial_floats(T, sc.L, splits) * 4) == cudaSuccess);
    bf16* out = nullptr;
    REQUIRE(cudaMalloc(&out, static_cast<size_t>(T) * nh * D * 2) == cudaSuccess);
    REQUIRE(cudaMemset(out, 0xff, static_cast<size_t>(T) * nh * D * 2) == cudaSuccess);
    attention_args a;
    a.qkv = d_qkv;
    a.k_cache = d_k;
    a.v_cache = d_v;
    a.token_seq = d_seq;
    a.positions = d_pos;
    a.block_tables = d_tab;
    a.max_blocks = max_blocks;
    a.block_size = sc.block_size;
    a.T = T;
    a.num_splits = splits;
    a.scale = 1.0f / std::sqrt(static_cast<float>(D));
    a.partial = partial;
    a.out = out;
    if (flash > 0) {
      a.flash_tiles = d_tiles;
      a.num_flash_tiles = route.num_flash_tiles;
      a.split_tokens = d_split;
      a.num_split_tokens = route.num_split_tokens;
      a.decode_tiles = flash == 2 ? d_decode : nullptr;
    }
    REQUIRE(paged_attention(a, sc.L, nullptr).has_value());
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    CHECK(test::rel_l2(
              test::from_bf16_bits(download(reinterpret_cast<uint16_t*>(out), ref_out.size())),
              ref_out) < 1e-2);
    cudaFree(partial);
    cudaFree(out);
  }
  for (void* p : {static_cast<void*>(d_qkv), static_cast<void*>(d_k), static_cast<void*>(d_v),
                  static_cast<void*>(d_qn), static_cast<void*>(d_kn), static_cast<void*>(d_inv),
                  static_cast<void*>(d_pos), static_cast<void*>(d_seq), static_cast<void*>(d_slot),
                  static_cast<void*>(d_tab), static_cast<void*>(d_tiles),
                  static_cast<void*>(d_split), static_cast<void*>(d_decode)})
    cudaFree(p);
}

} // namespace

TEST_CASE("cuda qkv norm+rope+cache and paged attention match the CPU, mixed batches") {
  if (!test::have_gpu())
    return;
  // Qwen3-8B heads; a decode batch at long and short contexts plus prefill chunks.
  run({{32, 8, 128}, 16, {{511, 1}, {0, 37}, {1000, 1}, {20, 5}}}, 1);
  // Tiny-model heads, block size 1, GQA 2:1 and 4:1, odd head_dim
  run({{4, 2, 16}, 1, {{0, 7}, {3, 1}, {64, 9}}}, 2);
  run({{8, 2, 64}, 16, {{2047, 1}, {0, 100}}}, 3);
  run({{16, 8, 96}, 8, {{0, 1}, {300, 2}}}, 4);
  run({{24, 8, 128}, 16, {{700, 1}, {5, 3}}}, 5);   // 3 query heads per kv head
  run({{64, 8, 128}, 16, {{129, 1}, {0, 130}}}, 6); // 8 per kv head, chunk boundaries
  // Prefill-heavy steps for the tensor-core kernel: long prompts, chunks continuing a context,
  // tiles that end mid-way, GQA groups that do not divide 64 rows (3, 6), head_dim 16 and 32.
  run({{32, 8, 128}, 16, {{0, 300}, {100, 70}, {40, 1}, {0, 9}}}, 7);
  run({{24, 8, 128}, 16, {{0, 50}, {200, 33}}}, 8);
  run({{12, 2, 32}, 4, {{0, 129}, {7, 2}}}, 9);
  run({{4, 4, 16}, 16, {{0, 200}, {65, 64}}}, 10);
  run({{16, 2, 64}, 16, {{0, 257}}}, 11);
}
