// Prefill/decode disaggregation served in one process (`cluster serve --block`) over HTTP, on the
// golden models: xPyD layouts, block sizes that differ between the groups and every in-process
// transport (local memcpy, libfabric tcp, plain sockets) give the greedy tokens the colocated
// engine gives, and seeded sampling the same tokens as a colocated deployment; the handoffs
// really happen (counters), blocks are free on both sides afterwards, a client leaving mid-stream
// frees them too, short prompts are prefilled on the decode side, and impossible specs are refused.
#include <chrono>
#include <optional>
#include <thread>

#include <doctest/doctest.h>

#include "actors/serving/deployment.hpp"
#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/generate.hpp"
#include "golden.hpp"
#include "http_client.hpp"

using namespace troupe;
using json = nlohmann::json;

namespace {

deployment_config base(const std::filesystem::path& dir) {
  deployment_config c;
  c.model = dir.string();
  c.device = "cpu"; // compared with the CPU reference also where a GPU is present
  c.served_model_name = "m";
  c.max_model_len = 256;
  c.num_kv_blocks = 96;
  c.block_size = 8;
  c.max_num_seqs = 8;
  c.port = 0;
  return c;
}

deployment_config disaggregated(const std::filesystem::path& dir, int32_t prefill, int32_t decode,
                                std::string provider, int32_t prefill_block = 0,
                                int32_t decode_block = 0) {
  auto c = base(dir);
  auto& d = c.disaggregation;
  d.enabled = true;
  d.prefill.parallel.replicas = prefill;
  d.decode.parallel.replicas = decode;
  d.prefill.block_size = prefill_block;
  d.decode.block_size = decode_block;
  d.provider = std::move(provider);
  d.timeout_s = 10;
  return c;
}

std::unique_ptr<serve::deployment> start(const deployment_config& c) {
  auto d = serve::deployment::start(c, "test");
  REQUIRE_MESSAGE(d.has_value(), (d ? "" : d.error().to_string()));
  return std::move(*d);
}

// Waits until no KV block is in use on either side (freed after the last response is written).
void expect_all_blocks_free(uint16_t port) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (test::metric_value(port, "troupe_kv_blocks_in_use") > 0 &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(test::metric_value(port, "troupe_kv_blocks_in_use") == 0);
}

std::vector<std::vector<token_id>> prompts() {
  std::vector<std::vector<token_id>> out;
  for (int i = 0; i < 6; ++i) {
    std::vector<token_id> p;
    for (int k = 0; k < 9 + 7 * i; ++k)
      p.push_back(static_cast<token_id>(11 + (k * 37 + i * 101) % 900));
    out.push_back(std::move(p));
  }
  out.push_back(out[2]); // a shared prefix, twice: the decode side's prefix cache
  out.back().push_back(42);
  return out;
}

std::vector<token_id> completion_ids(uint16_t port, const std::vector<token_id>& prompt, int n,
                                     const json& sampling) {
  json body = {
      {"prompt", prompt}, {"max_tokens", n}, {"ignore_eos", true}, {"return_token_ids", true}};
  body.update(sampling);
  auto r = test::http_call(port, "POST", "/v1/completions", body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  return r.json()["choices"][0]["token_ids"].get<std::vector<token_id>>();
}

// Every prompt concurrently, one client thread each.
std::vector<std::vector<token_id>> run_all(uint16_t port, int n, const json& sampling) {
  const auto ps = prompts();
  std::vector<std::vector<token_id>> out(ps.size());
  std::vector<std::thread> clients;
  for (size_t i = 0; i < ps.size(); ++i)
    clients.emplace_back([&, i] { out[i] = completion_ids(port, ps[i], n, sampling); });
  for (auto& t : clients)
    t.join();
  return out;
}

std::vector<std::vector<token_id>> golden_greedy(const std::filesystem::path& dir, int n) {
  auto model = engine::cpu_backend::load(dir, {.num_blocks = 64, .block_size = 16});
  REQUIRE(model.has_value());
  std::vector<std::vector<token_id>> out;
  for (const auto& p : prompts()) {
    auto g = engine::generate_greedy(**model, {p}, {.max_new_tokens = n});
    REQUIRE(g.has_value());
    out.push_back(g->front().output);
  }
  return out;
}

const json greedy = {{"temperature", 0}};
const json seeded = {
    {"temperature", 0.9}, {"top_p", 0.95}, {"seed", 1234}, {"frequency_penalty", 0.3}};

// The golden MoE model has no tokenizer of its own: served with tiny-qwen3's (the prompts are
// token ids below both vocabularies).
std::optional<std::filesystem::path> servable(const std::string& name) {
  auto dir = test::golden_model(name);
  auto text = test::golden_model("tiny-qwen3");
  if (!dir || !text || std::filesystem::exists(*dir / "tokenizer.json"))
    return dir;
  const auto made = std::filesystem::temp_directory_path() / ("troupe-disagg-" + name);
  std::filesystem::create_directories(made);
  const auto qwen3 = text->parent_path().parent_path() / "tokenizers" / "qwen3";
  for (auto [from, file] : {std::pair{*dir, "config.json"},
                            {*dir, "model.safetensors"},
                            {qwen3, "tokenizer.json"},
                            {qwen3, "tokenizer_config.json"}})
    if (!std::filesystem::exists(made / file))
      std::filesystem::create_symlink(from / file, made / file);
  return made;
}

} // namespace

TEST_CASE("disaggregation: xPyD layouts, block sizes and transports equal the colocated tokens") {
  for (const char* name : {"tiny-qwen3", "tiny-qwen3-moe"}) {
    auto dir = servable(name);
    if (!dir)
      return;
    CAPTURE(name);
    const auto want = golden_greedy(*dir, 10);
    auto colocated = start(base(*dir));
    const auto want_seeded = run_all(colocated->port(), 10, seeded);
    colocated.reset();
    struct layout {
      int32_t p, d;
      const char* provider;
      int32_t pbs, dbs;
    };
    for (auto l :
         {layout{1, 1, "local", 0, 0}, layout{1, 2, "tcp", 0, 0}, layout{2, 1, "socket", 0, 0},
          layout{1, 1, "local", 4, 16}, layout{2, 2, "tcp", 16, 4}}) {
      CAPTURE(l.p);
      CAPTURE(l.d);
      CAPTURE(l.provider);
      CAPTURE(l.pbs);
      CAPTURE(l.dbs);
      auto s = start(disaggregated(*dir, l.p, l.d, l.provider, l.pbs, l.dbs));
      CHECK(run_all(s->port(), 10, greedy) == want);
      CHECK(run_all(s->port(), 10, seeded) == want_seeded);
      const auto handed = test::metric_value(s->port(), "troupe_kv_handoffs_total");
      CHECK(handed == 2.0 * static_cast<double>(prompts().size()));
      CHECK(test::metric_value(s->port(), "troupe_kv_handoff_failures_total") == 0);
      CHECK(test::metric_value(s->port(), "troupe_kv_local_prefills_total") == 0);
      CHECK(test::metric_value(s->port(), "troupe_kv_transfer_bytes_total") > 0);
      expect_all_blocks_free(s->port());
    }
  }
}

TEST_CASE("disaggregation: a client leaving mid-stream frees blocks on both sides") {
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  auto s = start(disaggregated(*dir, 1, 1, "tcp"));
  for (int round = 0; round < 3; ++round) {
    boost::asio::io_context ioc;
    boost::asio::ip::tcp::socket sock(ioc);
    sock.connect({boost::asio::ip::make_address("127.0.0.1"), s->port()});
    json body = {{"prompt", "Once upon a time there was"},
                 {"max_tokens", 200},
                 {"ignore_eos", true},
                 {"stream", true}};
    boost::asio::write(sock, boost::asio::buffer(test::http_request_text("POST", "/v1/completions",
                                                                         body.dump(), "")));
    std::string got;
    if (round > 0) // round 0 leaves before the first token (during the handoff)
      while (test::sse_events(got.substr(std::min(got.size(), got.find("\r\n\r\n")))).size() <
             static_cast<size_t>(2 * round)) {
        char buf[512];
        got.append(buf, sock.read_some(boost::asio::buffer(buf)));
      }
    sock.close();
  }
  expect_all_blocks_free(s->port());
  CHECK(test::metric_value(s->port(), "troupe_num_requests_running") == 0);
  // Still serving.
  const auto ids = completion_ids(s->port(), prompts()[0], 4, greedy);
  CHECK(ids.size() == 4);
}

TEST_CASE("disaggregation: prompts shorter than min_prefill_tokens are prefilled on decode") {
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  auto c = disaggregated(*dir, 1, 1, "local");
  c.disaggregation.min_prefill_tokens = 20;
  auto s = start(c);
  const auto want = golden_greedy(*dir, 6);
  const auto ps = prompts();
  for (size_t i = 0; i < ps.size(); ++i)
    CHECK(completion_ids(s->port(), ps[i], 6, greedy) == want[i]);
  // Short prompts, and the one whose prefix the decode side has cached (what is left is short),
  // are prefilled there.
  size_t short_ones = 0;
  for (const auto& p : ps)
    short_ones += p.size() < 20;
  CHECK(short_ones > 0);
  CHECK(test::metric_value(s->port(), "troupe_kv_local_prefills_total") ==
        static_cast<double>(short_ones + 1));
  CHECK(test::metric_value(s->port(), "troupe_kv_handoffs_total") ==
        static_cast<double>(ps.size() - short_ones - 1));
  expect_all_blocks_free(s->port());
}

TEST_CASE("disaggregation: impossible specs are refused with the reason before serving") {
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  auto c = disaggregated(*dir, 1, 1, "local");
  c.disaggregation.prefill.parallel.tensor = 2;
  auto d = serve::deployment::start(c, "test");
  REQUIRE_FALSE(d.has_value());
  CHECK(d.error().message().find("disaggregation.prefill: tensor=2") != std::string::npos);
  c = disaggregated(*dir, 1, 1, "verbs");
  d = serve::deployment::start(c, "test");
  REQUIRE_FALSE(d.has_value()); // no RDMA device here, or no libfabric: named, never replaced
  CHECK(d.error().message().find("verbs") != std::string::npos);
  c = disaggregated(*dir, 1, 1, "tcp");
  c.disaggregation.staging = "always"; // staging runs between node processes only
  d = serve::deployment::start(c, "test");
  REQUIRE_FALSE(d.has_value());
  CHECK(d.error().message().find("staging: always") != std::string::npos);
}

TEST_CASE("disaggregation: the shipped 1P2D example serves with handoffs") {
  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  auto c = load_deployment(std::filesystem::path(TROUPE_EXAMPLES_DIR) / "disaggregated-1p2d.yaml");
  REQUIRE_MESSAGE(c.has_value(), (c ? "" : c.error().to_string()));
  CHECK(c->disaggregation.decode.parallel.replicas == 2);
  c->model = dir->string(); // wherever the golden data is
  c->device = "cpu";
  c->port = 0;
  auto s = start(*c);
  const auto want = golden_greedy(*dir, 5);
  const auto ps = prompts();
  CHECK(completion_ids(s->port(), ps.back(), 5, greedy) == want.back()); // 24 tokens: handed off
  CHECK(completion_ids(s->port(), ps.front(), 5, greedy) ==
        want.front()); // 9 tokens: prefilled on decode
  CHECK(test::metric_value(s->port(), "troupe_kv_handoffs_total") == 1);
  CHECK(test::metric_value(s->port(), "troupe_kv_local_prefills_total") == 1);
  expect_all_blocks_free(s->port());
}
