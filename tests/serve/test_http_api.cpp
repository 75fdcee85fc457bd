// The OpenAI HTTP API over real sockets on 127.0.0.1, served in-process from the golden
// tiny-qwen3 model on the CPU backend: greedy tokens equal engine/generate.hpp's, streaming equals
// non-streaming, every error status, API keys, disconnects freeing KV blocks, concurrent clients.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <thread>

#include <regex>

#include <doctest/doctest.h>

#include "actors/serving/deployment.hpp"
#include "engine/backend/cpu/cpu_backend.hpp"
#include "engine/generate.hpp"
#include "engine/tokenizer/chat_template.hpp"
#include "golden.hpp"
#include "http_client.hpp"
#include "json_schema_check.hpp"

using namespace troupe;
using json = nlohmann::json;

namespace {

struct served {
  std::filesystem::path dir;
  std::unique_ptr<serve::deployment> d;
  uint16_t port() const { return d->port(); }
};

std::unique_ptr<serve::deployment> start(const std::filesystem::path& dir, const std::string& key,
                                         int32_t max_num_seqs = 8, int32_t max_waiting = 1024) {
  deployment_config c;
  c.model = dir.string();
  c.served_model_name = "tiny-qwen3";
  c.max_model_len = 256;
  c.num_kv_blocks = 64;
  c.device = "cpu"; // the CPU backend on any machine
  c.max_num_seqs = max_num_seqs;
  c.max_waiting = max_waiting;
  c.port = 0;
  c.api_key = key;
  auto d = serve::deployment::start(c, "test");
  REQUIRE_MESSAGE(d.has_value(), (d ? "" : d.error().to_string()));
  return std::move(*d);
}

// One server for the whole file (loading is the slow part); nullptr when golden data is absent.
served* server() {
  static served* s = [] {
    auto dir = test::golden_model("tiny-qwen3");
    if (!dir)
      return static_cast<served*>(nullptr);
    auto* made = new served{*dir, start(*dir, "")};
    test::at_teardown([made] { delete made; });
    return made;
  }();
  return s;
}

std::vector<token_id> golden_greedy(const std::filesystem::path& dir,
                                    const std::vector<token_id>& prompt, int n) {
  auto model = engine::cpu_backend::load(dir, {.num_blocks = 32, .block_size = 16});
  REQUIRE(model.has_value());
  auto out = engine::generate_greedy(**model, {prompt}, {.max_new_tokens = n});
  REQUIRE(out.has_value());
  return out->front().output;
}

json chat_body(int max_tokens, bool stream) {
  return {{"model", "tiny-qwen3"},
          {"messages", {{{"role", "user"}, {"content", "What is the capital of France?"}}}},
          {"max_tokens", max_tokens},
          {"temperature", 0},
          {"ignore_eos", true},
          {"return_token_ids", true},
          {"stream", stream},
          {"stream_options", {{"include_usage", true}}}};
}

// A counter of /metrics (the tiny-qwen3 model's sample).
uint64_t metric(uint16_t port, const std::string& name) {
  const auto text = test::http_call(port, "GET", "/metrics").body;
  const auto key = name + "{model_name=\"tiny-qwen3\"} ";
  const auto at = text.find(key);
  REQUIRE_MESSAGE(at != std::string::npos, name);
  return std::stoull(text.substr(at + key.size()));
}

} // namespace

TEST_CASE("http: greedy chat completion equals engine generate_greedy, streamed and not") {
  auto* s = server();
  if (!s)
    return;
  auto r = test::http_call(s->port(), "POST", "/v1/chat/completions", chat_body(8, false).dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto j = r.json();
  CHECK(j["object"] == "chat.completion");
  CHECK(j["model"] == "tiny-qwen3");
  const auto prompt = j["prompt_token_ids"].get<std::vector<token_id>>();
  auto text = engine::model_tokenizer::load_for_model(s->dir);
  REQUIRE(text.has_value());
  auto expected_prompt = text->encode_chat(
      json::parse(R"([{"role":"user","content":"What is the capital of France?"}])"), {});
  REQUIRE(expected_prompt.has_value());
  CHECK(prompt == *expected_prompt);
  const auto& choice = j["choices"][0];
  const auto ids = choice["token_ids"].get<std::vector<token_id>>();
  CHECK(ids == golden_greedy(s->dir, prompt, 8));
  CHECK(choice["finish_reason"] == "length");
  CHECK(choice["message"]["role"] == "assistant");
  CHECK(choice["message"]["content"] == text->text->decode(ids, true));
  CHECK(j["usage"]["prompt_tokens"] == prompt.size());
  CHECK(j["usage"]["completion_tokens"] == 8);
  CHECK(j["usage"]["total_tokens"] == prompt.size() + 8);

  auto st = test::http_call(s->port(), "POST", "/v1/chat/completions", chat_body(8, true).dump());
  REQUIRE(st.status == 200);
  CHECK(st.head.find("text/event-stream") != std::string::npos);
  auto events = test::sse_events(st.body);
  REQUIRE(events.size() >= 4);
  CHECK(events.front()["choices"][0]["delta"]["role"] == "assistant");
  CHECK(events.front()["prompt_token_ids"] == prompt);
  CHECK(events.back() == "[DONE]");
  const auto& usage = events[events.size() - 2];
  CHECK(usage["choices"].empty());
  CHECK(usage["usage"]["completion_tokens"] == 8);
  std::string content;
  std::vector<token_id> streamed;
  std::string finish;
  for (size_t i = 1; i + 2 < events.size(); ++i) {
    const auto& c = events[i]["choices"][0];
    CHECK(events[i]["object"] == "chat.completion.chunk");
    content += c["delta"].value("content", "");
    if (c.contains("token_ids"))
      for (auto t : c["token_ids"])
        streamed.push_back(t.get<token_id>());
    if (!c["finish_reason"].is_null())
      finish = c["finish_reason"];
  }
  CHECK(streamed == ids);
  CHECK(content == choice["message"]["content"]);
  CHECK(finish == "length");
}

TEST_CASE("http: completions with token-id prompts reproduce the golden greedy tokens") {
  auto* s = server();
  if (!s)
    return;
  const auto golden = test::read_json(s->dir / "golden.json");
  std::vector<std::thread> clients;
  std::vector<std::vector<token_id>> got(golden["cases"].size()), want(got.size());
  for (size_t i = 0; i < got.size(); ++i) { // concurrently: the engine batches them
    want[i] = golden["cases"][i]["greedy_24"].get<std::vector<token_id>>();
    const auto prompt = golden["cases"][i]["prompt_ids"].get<std::vector<token_id>>();
    clients.emplace_back([&, i, prompt] {
      json body = {{"prompt", prompt},
                   {"max_tokens", 24},
                   {"temperature", 0},
                   {"ignore_eos", true},
                   {"return_token_ids", true}};
      auto r = test::http_call(s->port(), "POST", "/v1/completions", body.dump());
      if (r.status == 200)
        got[i] = r.json()["choices"][0]["token_ids"].get<std::vector<token_id>>();
    });
  }
  for (auto& t : clients)
    t.join();
  for (size_t i = 0; i < got.size(); ++i)
    CHECK(got[i] == want[i]);
}

TEST_CASE("http: errors come in OpenAI's shape with the right status and parameter") {
  auto* s = server();
  if (!s)
    return;
  auto check = [&](const std::string& target, const std::string& body, int status,
                   const std::string& param) {
    auto r = test::http_call(s->port(), "POST", target, body);
    CAPTURE(body);
    CHECK(r.status == status);
    auto j = r.json();
    REQUIRE(j.contains("error"));
    CHECK(j["error"]["code"] == status);
    CHECK(!j["error"]["message"].get<std::string>().empty());
    if (!param.empty())
      CHECK(j["error"]["param"] == param);
  };
  check("/v1/chat/completions", "{not json", 400, "");
  check("/v1/completions", R"({"prompt": "hi", "model": "gpt-4"})", 404, "model");
  check("/v1/completions", json{{"prompt", std::vector<int>(300, 5)}}.dump(), 400, "prompt");
  check("/v1/completions", R"({"prompt": "hi", "max_tokens": 1000})", 400, "max_tokens");
  check("/v1/completions", R"({"prompt": "hi", "n": 0})", 400, "n");
  check("/v1/completions", R"({"prompt": "hi", "n": 65})", 400, "n");
  check("/v1/completions", R"({"prompt": "hi", "temperature": "hot"})", 400, "temperature");
  check("/v1/completions", R"({"prompt": [1, -4]})", 400, "prompt");
  check("/v1/chat/completions", R"({"messages": []})", 400, "messages");
  // JSON nested 100k levels (a ~200 KB body) in any field is refused, never recursed into.
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  check("/v1/completions", R"({"prompt": "hi", "model": )" + deep + "}", 400, "");
  check("/v1/completions", R"({"prompt": )" + deep + "}", 400, "");
  check("/v1/chat/completions", R"({"messages": [{"role": "user", "content": )" + deep + "}]}", 400,
        "");
  check("/detokenize", R"({"tokens": )" + deep + "}", 400, "");
  // Brackets inside strings are text, not nesting.
  const auto text = json{{"prompt", std::string(100, '[') + "\\\"" + std::string(100, '{')}};
  CHECK(test::http_call(s->port(), "POST", "/tokenize", text.dump()).status == 200);
  auto top_p =
      test::http_call(s->port(), "POST", "/v1/completions", R"({"prompt": "hi", "top_p": 0})");
  CHECK(top_p.status == 400);
  CHECK(top_p.body.find("top_p") != std::string::npos);
  CHECK(test::http_call(s->port(), "GET", "/v1/nothing").status == 404);
  CHECK(test::http_call(s->port(), "GET", "/v1/completions").status == 405);
  // The server is still fine afterwards.
  CHECK(test::http_call(s->port(), "GET", "/health").status == 200);
}

TEST_CASE("http: models, version, tokenize and detokenize") {
  auto* s = server();
  if (!s)
    return;
  auto m = test::http_call(s->port(), "GET", "/v1/models").json();
  CHECK(m["data"][0]["id"] == "tiny-qwen3");
  CHECK(m["data"][0]["max_model_len"] == 256);
  CHECK(test::http_call(s->port(), "GET", "/version").json()["version"] == "test");
  auto text = engine::model_tokenizer::load_for_model(s->dir);
  REQUIRE(text.has_value());
  auto t = test::http_call(s->port(), "POST", "/tokenize", R"({"prompt": "Hello world, again"})");
  REQUIRE(t.status == 200);
  auto ids = *text->text->encode("Hello world, again");
  CHECK(t.json()["tokens"].get<std::vector<token_id>>() == ids);
  CHECK(t.json()["count"] == ids.size());
  auto d = test::http_call(s->port(), "POST", "/detokenize", json{{"tokens", ids}}.dump());
  REQUIRE(d.status == 200);
  CHECK(d.json()["prompt"] == "Hello world, again");
  auto chat = test::http_call(s->port(), "POST", "/tokenize",
                              R"({"messages": [{"role": "user", "content": "hi"}]})");
  REQUIRE(chat.status == 200);
  CHECK(chat.json()["tokens"].get<std::vector<token_id>>() ==
        *text->encode_chat(json::parse(R"([{"role":"user","content":"hi"}])"), {}));
}

TEST_CASE("http: a client that disconnects mid-stream frees its KV blocks, others are served") {
  auto* s = server();
  if (!s)
    return;
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::socket sock(ioc);
  sock.connect({boost::asio::ip::make_address("127.0.0.1"), s->port()});
  json body = {
      {"prompt", "Once upon a time"}, {"max_tokens", 200}, {"ignore_eos", true}, {"stream", true}};
  boost::asio::write(sock, boost::asio::buffer(test::http_request_text("POST", "/v1/completions",
                                                                       body.dump(), "")));
  std::string got;
  while (test::sse_events(got.substr(std::min(got.size(), got.find("\r\n\r\n")))).size() < 2) {
    char buf[512];
    got.append(buf, sock.read_some(boost::asio::buffer(buf)));
  }
  CHECK(test::metric_value(s->port(), "troupe_kv_blocks_in_use") > 0);
  sock.close();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (test::metric_value(s->port(), "troupe_kv_blocks_in_use") > 0 &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(test::metric_value(s->port(), "troupe_kv_blocks_in_use") == 0);
  CHECK(test::metric_value(s->port(), "troupe_num_requests_running") == 0);
  auto r =
      test::http_call(s->port(), "POST", "/v1/completions", R"({"prompt": "hi", "max_tokens": 2})");
  CHECK(r.status == 200);
  auto metrics = test::http_call(s->port(), "GET", "/metrics").body;
  CHECK(metrics.find("troupe_requests_total{model_name=\"tiny-qwen3\",status=\"200\"}") !=
        std::string::npos);
  CHECK(metrics.find(
            "vllm:request_success_total{model_name=\"tiny-qwen3\",finished_reason=\"length\"}") !=
        std::string::npos);
  CHECK(metrics.find("troupe_time_to_first_token_seconds_count") != std::string::npos);
  CHECK(test::metric_value(s->port(), "troupe_generation_tokens_total") > 0);
}

TEST_CASE("http: stop strings, logprobs and the api key") {
  auto* s = server();
  if (!s)
    return;
  // Greedy text of 12 tokens, then the same request with a stop string taken from its middle.
  json body = {{"prompt", "The"},
               {"max_tokens", 12},
               {"temperature", 0},
               {"ignore_eos", true},
               {"logprobs", 2}};
  auto full = test::http_call(s->port(), "POST", "/v1/completions", body.dump()).json();
  const auto text = full["choices"][0]["text"].get<std::string>();
  const auto& lp = full["choices"][0]["logprobs"];
  CHECK(lp["tokens"].size() == 12);
  CHECK(lp["top_logprobs"][0].size() == 2);
  CHECK(lp["token_logprobs"][0].get<double>() <= 0.0);
  if (text.size() > 6) {
    const auto stop = text.substr(3, 3);
    body["stop"] = stop;
    auto cut = test::http_call(s->port(), "POST", "/v1/completions", body.dump()).json();
    CHECK(cut["choices"][0]["text"] == text.substr(0, text.find(stop)));
    CHECK(cut["choices"][0]["finish_reason"] == "stop");
  }
  auto dir = s->dir;
  auto keyed = start(dir, "sekret");
  CHECK(test::http_call(keyed->port(), "GET", "/v1/models").status == 401);
  CHECK(test::http_call(keyed->port(), "GET", "/health", "", "Authorization: Bearer nope\r\n")
            .status == 401);
  CHECK(test::http_call(keyed->port(), "GET", "/v1/models", "", "Authorization: Bearer sekret\r\n")
            .status == 200);
}

TEST_CASE("http: mixed load with random disconnects, malformed bodies and oversize prompts") {
  auto* s = server();
  if (!s)
    return;
  constexpr int clients = 8, per_client = 30;
  std::atomic<int> wrong{0}, done_ok{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      uint32_t rng = 12345u + static_cast<uint32_t>(c) * 7919u;
      auto next = [&] { return rng = rng * 1664525u + 1013904223u, rng >> 8; };
      for (int i = 0; i < per_client; ++i) {
        const auto kind = next() % 5;
        const int max_tokens = 1 + static_cast<int>(next() % 40);
        if (kind == 0) { // malformed JSON
          wrong +=
              test::http_call(s->port(), "POST", "/v1/completions", "{\"prompt\": ").status != 400;
        } else if (kind == 1) { // prompt longer than the context
          json b = {{"prompt", std::vector<int>(257, 11)}, {"stream", true}};
          wrong += test::http_call(s->port(), "POST", "/v1/completions", b.dump()).status != 400;
        } else if (kind == 2) { // streaming, client leaves after a few bytes
          boost::asio::io_context ioc;
          boost::asio::ip::tcp::socket sock(ioc);
          sock.connect({boost::asio::ip::make_address("127.0.0.1"), s->port()});
          json b = {{"prompt", "tell me a story"},
                    {"max_tokens", 60},
                    {"ignore_eos", true},
                    {"stream", true},
                    {"seed", static_cast<int>(next() % 1000)}};
          boost::asio::write(sock, boost::asio::buffer(test::http_request_text(
                                       "POST", "/v1/completions", b.dump(), "")));
          char buf[256];
          boost::system::error_code ec;
          const auto leave_after = next() % 400;
          for (size_t got = 0; got <= leave_after && !ec;)
            got += sock.read_some(boost::asio::buffer(buf), ec);
          sock.close();
        } else { // complete streaming or non-streaming chat
          json b = chat_body(max_tokens, kind == 3);
          b["temperature"] = 0.8;
          auto r = test::http_call(s->port(), "POST", "/v1/chat/completions", b.dump());
          const bool ok =
              r.status == 200 && (kind == 3 ? r.body.find("data: [DONE]") != std::string::npos
                                            : r.json()["usage"]["completion_tokens"] == max_tokens);
          wrong += !ok;
          done_ok += ok;
        }
      }
    });
  }
  for (auto& t : threads)
    t.join();
  CHECK(wrong == 0);
  CHECK(done_ok > 0);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while ((test::metric_value(s->port(), "troupe_kv_blocks_in_use") > 0 ||
          test::metric_value(s->port(), "troupe_num_requests_running") > 0) &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(test::metric_value(s->port(), "troupe_kv_blocks_in_use") == 0);
  CHECK(test::metric_value(s->port(), "troupe_num_requests_running") == 0);
  CHECK(test::metric_value(s->port(), "troupe_num_requests_waiting") == 0);
  CHECK(
      test::http_call(s->port(), "POST", "/v1/completions", R"({"prompt": "hi", "max_tokens": 2})")
          .status == 200);
}

TEST_CASE("http: a full waiting queue answers 503 and the server recovers") {
  auto* s = server();
  if (!s)
    return;
  auto small = start(s->dir, "", 1, 1); // one running, one waiting
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::socket sock(ioc);
  sock.connect({boost::asio::ip::make_address("127.0.0.1"), small->port()});
  json long_body = {{"prompt", "a"}, {"max_tokens", 200}, {"ignore_eos", true}, {"stream", true}};
  boost::asio::write(sock, boost::asio::buffer(test::http_request_text("POST", "/v1/completions",
                                                                       long_body.dump(), "")));
  std::string got;
  while (test::sse_events(got.substr(std::min(got.size(), got.find("\r\n\r\n")))).empty()) {
    char buf[512];
    got.append(buf, sock.read_some(boost::asio::buffer(buf)));
  }
  // The long request runs; of two more, at most one can wait.
  std::vector<int> statuses(2);
  std::vector<std::thread> t;
  for (int i = 0; i < 2; ++i)
    t.emplace_back([&, i] {
      auto r = test::http_call(small->port(), "POST", "/v1/completions",
                               R"({"prompt": "b", "max_tokens": 2})");
      statuses[i] = r.status;
      if (r.status == 503)
        CHECK(r.json()["error"]["message"].get<std::string>().find("queue is full") !=
              std::string::npos);
    });
  for (auto& x : t)
    x.join();
  CHECK(std::count(statuses.begin(), statuses.end(), 503) == 1);
  CHECK(std::count(statuses.begin(), statuses.end(), 200) == 1);
  sock.close();
  CHECK(test::http_call(small->port(), "POST", "/v1/completions",
                        R"({"prompt": "b", "max_tokens": 2})")
            .status == 200);
}

TEST_CASE("http: in this process (--block) every replica is one rank, and replicas share load") {
  deployment_config c;
  c.model = "/nonexistent"; // refused before anything loads
  c.parallel.tensor = 2;
  auto d = serve::deployment::start(c, "test");
  REQUIRE_FALSE(d.has_value());
  CHECK(d.error().code() == errc::unsupported);
  CHECK_MESSAGE(d.error().message().find("tensor=2 pipeline=1") != std::string::npos,
                d.error().message());
  CHECK(d.error().message().find("`cluster serve` without --block") != std::string::npos);

  auto dir = test::golden_model("tiny-qwen3");
  if (!dir)
    return;
  c = {};
  c.model = dir->string();
  c.device = "cpu";
  c.served_model_name = "tiny-qwen3";
  c.max_model_len = 256;
  c.num_kv_blocks = 32;
  c.port = 0;
  c.parallel.replicas = 2;
  auto two = serve::deployment::start(c, "test");
  REQUIRE_MESSAGE(two.has_value(), (two ? "" : two.error().to_string()));
  const std::vector<token_id> prompt = {11, 22, 33, 44, 55};
  const auto want = golden_greedy(*dir, prompt, 6);
  std::vector<std::thread> clients;
  std::atomic<int> right{0};
  for (int i = 0; i < 6; ++i)
    clients.emplace_back([&] {
      json body = {{"prompt", prompt},
                   {"max_tokens", 6},
                   {"temperature", 0},
                   {"ignore_eos", true},
                   {"return_token_ids", true}};
      auto r = test::http_call((*two)->port(), "POST", "/v1/completions", body.dump());
      right += r.status == 200 &&
               r.json()["choices"][0]["token_ids"].get<std::vector<token_id>>() == want;
    });
  for (auto& t : clients)
    t.join();
  CHECK(right == 6);
  auto metrics = test::http_call((*two)->port(), "GET", "/metrics").body;
  for (int i = 0; i < 2; ++i) { // both replicas took requests
    const auto key = fmt::format("troupe_replica_requests_total{{model_name=\"tiny-qwen3\","
                                 "replica=\"{}\"}} ",
                                 i);
    const auto at = metrics.find(key);
    REQUIRE(at != std::string::npos);
    CHECK(std::stoi(metrics.substr(at + key.size())) > 0);
  }
}

TEST_CASE("http: tools reach the chat template, tool history with null content is served") {
  auto* s = server();
  if (!s)
    return;
  json tools = json::parse(R"([{"type": "function", "function": {"name": "get_weather",
      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])");
  json messages = json::parse(R"([{"role": "user", "content": "weather in Paris?"},
      {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
       "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "21C"}])");
  json body = {{"messages", messages}, {"tools", tools},     {"max_tokens", 4},
               {"temperature", 0},     {"ignore_eos", true}, {"return_token_ids", true}};
  auto r = test::http_call(s->port(), "POST", "/v1/chat/completions", body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  auto j = r.json();
  auto text = engine::model_tokenizer::load_for_model(s->dir);
  REQUIRE(text.has_value());
  json normalised = messages;
  normalised[1]["content"] = "";
  normalised[1]["tool_calls"][0]["function"]["arguments"] = json{{"city", "Paris"}};
  engine::chat_options opts;
  opts.tools = tools;
  CHECK(j["prompt_token_ids"].get<std::vector<token_id>>() == *text->encode_chat(normalised, opts));
  // The random-weight model writes no call: plain content, finish "length".
  CHECK(j["choices"][0]["finish_reason"] == "length");
  CHECK(!j["choices"][0]["message"].contains("tool_calls"));

  body["tool_choice"] = "auto";
  body["tools"][0]["type"] = "retrieval";
  auto bad = test::http_call(s->port(), "POST", "/v1/chat/completions", body.dump());
  CHECK(bad.status == 400);
  CHECK(bad.json()["error"]["param"] == "tools");
}

TEST_CASE("http: logit_bias steers the sampled tokens, streamed and not") {
  auto* s = server();
  if (!s)
    return;
  for (bool stream : {false, true}) {
    json body = chat_body(6, stream);
    body["logit_bias"] = {{"13", 100}};
    body["temperature"] = 0.8;
    body["seed"] = 5;
    auto r = test::http_call(s->port(), "POST", "/v1/chat/completions", body.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
    std::vector<token_id> ids;
    if (stream) {
      for (const auto& e : test::sse_events(r.body))
        if (e.contains("choices") && !e["choices"].empty() && e["choices"][0].contains("token_ids"))
          ids.push_back(e["choices"][0]["token_ids"][0].get<token_id>());
    } else {
      ids = r.json()["choices"][0]["token_ids"].get<std::vector<token_id>>();
    }
    CHECK(ids == std::vector<token_id>(6, 13));
  }
  json body = chat_body(2, false);
  for (const json& bias : {json{{"13", 101}}, json{{"x", 1}}, json{{"99999999", 1}},
                           json{{"13", "high"}}, json::array({13})}) {
    body["logit_bias"] = bias;
    auto r = test::http_call(s->port(), "POST", "/v1/chat/completions", body.dump());
    CHECK_MESSAGE(r.status == 400, bias.dump());
    CHECK(r.json()["error"]["param"] == "logit_bias");
  }
}

TEST_CASE("http: structured output (xgrammar) constrains what the model writes, streamed and not") {
  auto* s = server();
  if (!s)
    return;
  const json schema = json::parse(R"({"type": "object", "properties": {
      "city": {"type": "string", "maxLength": 8}, "rain": {"type": "boolean"},
      "temp": {"type": "integer", "minimum": -20, "maximum": 45}},
      "required": ["city", "rain", "temp"], "additionalProperties": false})");
  auto content_of = [&](json body) {
    auto r = test::http_call(s->port(), "POST", "/v1/chat/completions", body.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
    if (!body.value("stream", false)) {
      auto j = r.json();
      CHECK(j["choices"][0]["finish_reason"] == "stop");
      return j["choices"][0]["message"]["content"].get<std::string>();
    }
    std::string text, finish;
    for (const auto& e : test::sse_events(r.body))
      if (e != "[DONE]")
        for (const auto& c : e["choices"]) {
          if (c["delta"].contains("content") && c["delta"]["content"].is_string())
            text += c["delta"]["content"].get<std::string>();
          if (c["finish_reason"].is_string())
            finish = c["finish_reason"];
        }
    CHECK(finish == "stop");
    return text;
  };
  for (bool stream : {false, true})
    for (int seed = 0; seed < 3; ++seed) {
      json body = chat_body(200, stream); // ignore_eos: the grammar still ends the output
      body["temperature"] = 1.0;
      body["seed"] = seed;
      body["response_format"] = {
          {"type", "json_schema"},
          {"json_schema", {{"name", "w"}, {"schema", schema}, {"strict", true}}}};
      const auto text = content_of(body);
      json v;
      REQUIRE_NOTHROW(v = json::parse(text));
      CHECK(test::schema_violation(schema, v) == "");
      body.erase("response_format");
      body["guided_choice"] = {"Paris", "Lyon", "Nice"};
      const auto choice = content_of(body);
      CHECK_MESSAGE((choice == "Paris" || choice == "Lyon" || choice == "Nice"), choice);
      body.erase("guided_choice");
      body["structured_outputs"] = {{"regex", "[0-9]{3}-[a-z]{2}"}};
      const auto re = content_of(body);
      CHECK_MESSAGE(std::regex_match(re, std::regex("[0-9]{3}-[a-z]{2}")), re);
    }
  // The completions endpoint too.
  auto r =
      test::http_call(s->port(), "POST", "/v1/completions",
                      R"({"prompt": "Answer:", "max_tokens": 20, "guided_regex": "(yes|no)!"})");
  REQUIRE_MESSAGE(r.status == 200, r.body);
  const auto t = r.json()["choices"][0]["text"].get<std::string>();
  CHECK((t == "yes!" || t == "no!"));
  // Bad input: 400 naming the field, before anything is queued.
  const std::vector<std::pair<std::string, json>> bad = {
      {"response_format",
       {{"type", "json_schema"}, {"json_schema", {{"name", "x"}, {"schema", {{"type", 3}}}}}}},
      {"guided_regex", "([0-9]"},
      {"guided_grammar", "root ::= ("},
      {"guided_choice", json::array()}};
  for (const auto& [key, value] : bad) {
    json body = chat_body(2, false);
    body[key] = value;
    auto e = test::http_call(s->port(), "POST", "/v1/chat/completions", body.dump());
    CHECK_MESSAGE(e.status == 400, key);
    CHECK(e.json()["error"]["param"] == key);
  }
}

TEST_CASE("http: tool_choice required and named give tool_calls that parse") {
  auto* s = server();
  if (!s)
    return;
  const json tools = json::parse(R"([{"type": "function", "function": {"name": "get_weather",
      "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
      "required": ["city"]}}}, {"type": "function", "function": {"name": "get_time",
      "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
      "required": ["tz"]}}}])");
  for (const json& choice :
       {json("required"), json{{"type", "function"}, {"function", {{"name", "get_time"}}}}})
    for (int seed = 0; seed < 3; ++seed) {
      json body = chat_body(2, false);
      body.erase("max_tokens"); // the rest of the context: the tools take most of it
      body["temperature"] = 1.0;
      body["seed"] = seed;
      body["parallel_tool_calls"] = false; // one call: it fits what is left of the context
      body["tools"] = tools;
      body["tool_choice"] = choice;
      auto r = test::http_call(s->port(), "POST", "/v1/chat/completions", body.dump());
      REQUIRE_MESSAGE(r.status == 200, r.body);
      const auto j = r.json()["choices"][0];
      INFO(r.body);
      CHECK(j["finish_reason"] == "tool_calls");
      REQUIRE(j["message"].contains("tool_calls"));
      for (const auto& call : j["message"]["tool_calls"]) {
        const auto name = call["function"]["name"].get<std::string>();
        if (choice.is_object())
          CHECK(name == "get_time");
        const auto args = json::parse(call["function"]["arguments"].get<std::string>());
        const auto& params = tools[name == "get_weather" ? 0 : 1]["function"]["parameters"];
        CHECK(test::schema_violation(params, args) == "");
      }
    }
}

TEST_CASE("http: n choices equal single requests with seeds seed + i, streamed and not") {
  auto* s = server();
  if (!s)
    return;
  json body = chat_body(6, false);
  body["messages"][0]["content"] = "What is the capital of France? Answer in one sentence.";
  body["temperature"] = 1.0;
  body["seed"] = 77;
  std::vector<std::vector<token_id>> single;
  for (int i = 0; i < 4; ++i) {
    body["seed"] = 77 + i;
    auto r = test::http_call(s->port(), "POST", "/v1/chat/completions", body.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
    single.push_back(r.json()["choices"][0]["token_ids"].get<std::vector<token_id>>());
  }
  CHECK(single[0] != single[1]); // the seeds matter
  body["seed"] = 77;
  body["n"] = 4;
  const auto shared_before = metric(s->port(), "troupe_shared_prompt_tokens_total");
  auto r = test::http_call(s->port(), "POST", "/v1/chat/completions", body.dump());
  REQUIRE_MESSAGE(r.status == 200, r.body);
  const auto j = r.json();
  REQUIRE(j["choices"].size() == 4);
  // The prompt's full blocks (16 tokens each, all but the last token's) were computed once: the
  // other three choices took them from the first's KV.
  const auto prompt_len = j["prompt_token_ids"].size();
  const auto shared = (prompt_len - 1) / 16 * 16;
  REQUIRE(shared > 0);
  CHECK(metric(s->port(), "troupe_shared_prompt_tokens_total") - shared_before == 3 * shared);
  for (int i = 0; i < 4; ++i) {
    CHECK(j["choices"][i]["index"] == i);
    CHECK(j["choices"][i]["token_ids"].get<std::vector<token_id>>() == single[i]);
  }
  CHECK(j["usage"]["completion_tokens"] == 24);
  CHECK(j["usage"]["prompt_tokens"] == j["prompt_token_ids"].size());

  // Streamed: chunks carry their choice's index; each choice's text and ids as above.
  body["stream"] = true;
  auto st = test::http_call(s->port(), "POST", "/v1/chat/completions", body.dump());
  REQUIRE(st.status == 200);
  std::vector<std::vector<token_id>> ids(4);
  std::vector<int> finished(4, 0);
  int64_t usage_tokens = -1;
  for (const auto& e : test::sse_events(st.body)) {
    if (e == "[DONE]")
      continue;
    if (e.contains("usage") && !e["usage"].is_null())
      usage_tokens = e["usage"]["completion_tokens"].get<int64_t>();
    for (const auto& c : e["choices"]) {
      const auto i = c["index"].get<size_t>();
      REQUIRE(i < 4);
      if (c.contains("token_ids"))
        for (const auto& t : c["token_ids"])
          ids[i].push_back(t.get<token_id>());
      if (c["finish_reason"].is_string())
        ++finished[i];
    }
  }
  CHECK(ids == single);
  CHECK(finished == std::vector<int>{1, 1, 1, 1});
  CHECK(usage_tokens == 24);

  // With a constraint, every choice follows it.
  json guided = chat_body(20, false);
  guided["temperature"] = 1.0;
  guided["n"] = 3;
  guided["guided_choice"] = {"red", "green", "blue"};
  auto g = test::http_call(s->port(), "POST", "/v1/chat/completions", guided.dump());
  REQUIRE_MESSAGE(g.status == 200, g.body);
  const auto gj = g.json();
  REQUIRE(gj["choices"].size() == 3);
  for (const auto& c : gj["choices"]) {
    const auto t = c["message"]["content"].get<std::string>();
    CHECK_MESSAGE((t == "red" || t == "green" || t == "blue"), t);
  }
}

// What lm-evaluation-harness sends for log-likelihoods (echo, logprobs 1, max_tokens 1): the
// continuation's prompt positions carry the logprobs the model gave those tokens when it generated
// them, and its greedy check (the top entry is the token) holds; streamed the same.
TEST_CASE("http: echo with logprobs scores the prompt as generation did (lm-eval loglikelihood)") {
  auto* s = server();
  if (!s)
    return;
  const auto golden = test::read_json(s->dir / "golden.json");
  const auto prompt = golden["cases"].back()["prompt_ids"].get<std::vector<token_id>>();
  json gen_body = {{"prompt", prompt},   {"max_tokens", 4},          {"temperature", 0},
                   {"ignore_eos", true}, {"return_token_ids", true}, {"logprobs", 1}};
  auto gen = test::http_call(s->port(), "POST", "/v1/completions", gen_body.dump());
  REQUIRE_MESSAGE(gen.status == 200, gen.body);
  const auto ids = gen.json()["choices"][0]["token_ids"].get<std::vector<token_id>>();
  const auto lps = gen.json()["choices"][0]["logprobs"]["token_logprobs"];
  REQUIRE(ids.size() == 4);
  auto scored = prompt;
  scored.insert(scored.end(), ids.begin(), ids.end());
  for (bool stream : {false, true}) {
    CAPTURE(stream);
    json body = {{"prompt", scored}, {"max_tokens", 1}, {"temperature", 0},
                 {"logprobs", 1},    {"echo", true},    {"stream", stream}};
    auto r = test::http_call(s->port(), "POST", "/v1/completions", body.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
    json lp = {{"tokens", json::array()},
               {"token_logprobs", json::array()},
               {"top_logprobs", json::array()}};
    if (!stream) {
      lp = r.json()["choices"][0]["logprobs"];
    } else { // the chunks' logprobs, concatenated
      for (const auto& e : test::sse_events(r.body))
        if (e.contains("choices") && !e["choices"].empty() &&
            !e["choices"][0]["logprobs"].is_null())
          for (const char* k : {"tokens", "token_logprobs", "top_logprobs"})
            for (const auto& v : e["choices"][0]["logprobs"][k])
              lp[k].push_back(v);
    }
    REQUIRE(lp["token_logprobs"].size() == scored.size() + 1);
    CHECK(lp["token_logprobs"][0].is_null());
    for (size_t i = 1; i < scored.size(); ++i)
      CHECK(lp["token_logprobs"][i].get<double>() <= 0.0);
    for (size_t i = 0; i < ids.size(); ++i) {
      const size_t at = prompt.size() + i;
      CHECK(lp["token_logprobs"][at].get<double>() ==
            doctest::Approx(lps[i].get<double>()).epsilon(1e-3));
      const auto& top = lp["top_logprobs"][at];
      std::string best;
      double best_lp = -1e30;
      for (const auto& [k, v] : top.items())
        if (v.get<double>() > best_lp) {
          best = k;
          best_lp = v.get<double>();
        }
      CHECK(best == lp["tokens"][at].get<std::string>()); // greedy, as lm-eval checks
    }
  }
}

// /v1/completions with a list of prompts (as the OpenAI API and lm-evaluation-harness batches):
// choice p * n + i answers prompt p, each as a single request with that prompt would; usage
// sums every prompt and choice; streamed the same.
TEST_CASE("http: a list of prompts gets n choices each, as single requests would") {
  auto* s = server();
  if (!s)
    return;
  const auto golden = test::read_json(s->dir / "golden.json");
  const json prompts = {"The capital of France is", golden["cases"][1]["prompt_ids"],
                        "Once upon a time"};
  auto complete = [&](const json& prompt, int n, bool stream) {
    json body = {{"prompt", prompt},
                 {"max_tokens", 6},
                 {"temperature", 0},
                 {"ignore_eos", true},
                 {"n", n},
                 {"stream", stream},
                 {"return_token_ids", true},
                 {"stream_options", {{"include_usage", true}}}};
    auto r = test::http_call(s->port(), "POST", "/v1/completions", body.dump());
    REQUIRE_MESSAGE(r.status == 200, r.body);
    // index -> token ids, and the usage.
    std::map<int, std::vector<token_id>> ids;
    json usage;
    if (!stream) {
      const auto whole = r.json();
      for (const auto& c : whole["choices"])
        ids[c["index"].get<int>()] = c["token_ids"].get<std::vector<token_id>>();
      usage = whole["usage"];
    } else {
      for (const auto& e : test::sse_events(r.body)) {
        if (!e.is_object())
          continue;
        if (e.contains("usage") && !e["usage"].is_null())
          usage = e["usage"];
        for (const auto& c : e.value("choices", json::array()))
          for (const auto& t : c.value("token_ids", json::array()))
            ids[c["index"].get<int>()].push_back(t.get<token_id>());
      }
    }
    return std::make_pair(ids, usage);
  };
  std::vector<std::vector<token_id>> alone;
  int64_t prompt_tokens = 0;
  for (const auto& p : prompts) {
    auto [ids, usage] = complete(p, 1, false);
    alone.push_back(ids[0]);
    prompt_tokens += usage["prompt_tokens"].get<int64_t>();
  }
  for (bool stream : {false, true}) {
    CAPTURE(stream);
    auto [ids, usage] = complete(prompts, 2, stream);
    REQUIRE(ids.size() == 6);
    for (int c = 0; c < 6; ++c)
      CHECK(ids[c] == alone[static_cast<size_t>(c / 2)]);
    CHECK(usage["prompt_tokens"] == prompt_tokens);
    CHECK(usage["completion_tokens"] == 36);
  }
  // A bad prompt names its index; too many choices are refused.
  auto bad =
      test::http_call(s->port(), "POST", "/v1/completions", json{{"prompt", {"a", ""}}}.dump());
  CHECK(bad.status == 400);
  CHECK_MESSAGE(bad.body.find("prompt 1: ") != std::string::npos, bad.body);
  auto many =
      test::http_call(s->port(), "POST", "/v1/completions",
                      json{{"prompt", json::array({"a", "b", "c", "d", "e"})}, {"n", 64}}.dump());
  CHECK(many.status == 400);
  CHECK_MESSAGE(many.body.find("256 choices") != std::string::npos, many.body);
}
