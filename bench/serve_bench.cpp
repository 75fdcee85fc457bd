// serve_bench: an online serving benchmark with the semantics and option names of `vllm bench
// serve` (vllm/benchmarks/serve.py): random or ShareGPT prompts sent as streaming OpenAI requests
// at a Poisson rate (or all at once) under a concurrency cap; it reports request and token
// throughput and TTFT / TPOT / ITL / E2EL (mean, median, std, p99) as vLLM's summary table and
// result JSON. Synchronous Boost.Beast client, one thread per request in flight. Builds without
// CUDA.
//
// Measurement (as vLLM's openai backends): TTFT = first SSE chunk with non-empty text/content after
// the request was sent; ITL = gaps between later content chunks; E2EL = until the end of the
// stream; TPOT = (E2EL - TTFT) / (output_tokens - 1); output tokens come from the final usage chunk
// (stream_options.include_usage), falling back to re-encoding the generated text.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "engine/tokenizer/chat_template.hpp"
#include "engine/tokenizer/tokenizer.hpp"

namespace {

using json = nlohmann::ordered_json;
using clock_type = std::chrono::steady_clock;
namespace http = boost::beast::http;
using tcp = boost::asio::ip::tcp;
using troupe::token_id;

struct options {
  std::string base_url, host = "127.0.0.1", endpoint = "/v1/completions", model, tokenizer;
  int port = 8000;
  std::string dataset_name = "random", dataset_path;
  int random_input_len = 1024, random_output_len = 128, random_prefix_len = 0;
  double random_range_ratio = 0.0;
  int sharegpt_output_len = -1;
  bool ignore_eos = false, disable_tqdm = false, save_detailed = true;
  int num_prompts = 1000;
  std::string request_rate = "inf";
  double burstiness = 1.0;
  int max_concurrency = 0; // 0: unlimited
  uint64_t seed = 0;
  std::string result_file, api_key, label;
  double temperature = 0.0;
  double timeout_s = 600;
  json extra_body = json::object();      // --extra-body: merged into every request
  std::map<std::string, double> goodput; // --goodput: SLO in ms per metric (ttft, tpot, e2el)
};

struct sample {
  std::string prompt;
  int prompt_len = 0, output_len = 0;
};

struct result {
  bool success = false;
  std::string error, generated_text;
  double ttft = 0, latency = 0; // seconds
  std::vector<double> itl;      // seconds
  int output_tokens = 0, prompt_len = 0;
  double start = 0; // seconds since the benchmark started
};

// ---------------------------------------------------------------------------------------------
// Datasets

// vLLM's RandomDataset: lengths uniform in [len*(1-r), len*(1+r)], token ids random (specials
// excluded), decoded to text, then re-encoded and trimmed or padded until the text encodes to
// exactly the sampled length (gen_prompt_decode_to_target_len).
std::vector<sample> random_dataset(const options& o, const troupe::engine::tokenizer& tok,
                                   std::mt19937_64& rng) {
  std::vector<token_id> allowed;
  for (token_id id = 0; id < tok.size(); ++id)
    if (tok.is_known(id) && !tok.is_special(id))
      allowed.push_back(id);
  auto bounds = [&](int len) {
    const int lo = static_cast<int>(std::floor(len * (1.0 - o.random_range_ratio)));
    const int hi = static_cast<int>(std::ceil(len * (1.0 + o.random_range_ratio)));
    return std::pair{std::max(lo, 1), std::max(hi, 1)};
  };
  const auto [in_lo, in_hi] = bounds(o.random_input_len);
  const auto [out_lo, out_hi] = bounds(o.random_output_len);
  std::uniform_int_distribution<int> in_len(in_lo, in_hi), out_len(out_lo, out_hi);
  std::uniform_int_distribution<size_t> pick(0, allowed.size() - 1);
  std::vector<token_id> prefix;
  for (int i = 0; i < o.random_prefix_len; ++i)
    prefix.push_back(allowed[pick(rng)]);
  std::vector<sample> out;
  for (int i = 0; i < o.num_prompts; ++i) {
    const int target = o.random_prefix_len + in_len(rng);
    std::vector<token_id> ids = prefix;
    while (static_cast<int>(ids.size()) < target)
      ids.push_back(allowed[pick(rng)]);
    std::string text = tok.decode(ids);
    for (int attempt = 0; attempt < 10; ++attempt) {
      auto re = tok.encode(text);
      if (!re) // lossy decode gave invalid UTF-8? never for decode's output, but stay safe
        break;
      ids = std::move(*re);
      if (static_cast<int>(ids.size()) == target)
        break;
      if (static_cast<int>(ids.size()) > target)
        ids.resize(target);
      else
        while (static_cast<int>(ids.size()) < target)
          ids.push_back(allowed[pick(rng)]);
      text = tok.decode(ids);
    }
    out.push_back({text, target, out_len(rng)});
  }
  return out;
}

// vLLM's ShareGPTDataset: conversations with at least two turns, shuffled with the seed; the first
// turn is the prompt, the second's token count the output length (or --sharegpt-output-len);
// pairs with either side under 4 tokens, a prompt over 1024 or a total over 2048 are skipped.
std::vector<sample> sharegpt_dataset(const options& o, const troupe::engine::tokenizer& tok,
                                     std::mt19937_64& rng) {
  std::ifstream in(o.dataset_path);
  if (!in)
    throw std::runtime_error("cannot open --dataset-path " + o.dataset_path);
  auto data = nlohmann::json::parse(in);
  std::vector<std::pair<std::string, std::string>> convs;
  for (const auto& entry : data) {
    const auto it = entry.find("conversations");
    if (it == entry.end() || !it->is_array() || it->size() < 2)
      continue;
    convs.emplace_back((*it)[0].value("value", ""), (*it)[1].value("value", ""));
  }
  std::shuffle(convs.begin(), convs.end(), rng);
  std::vector<sample> out;
  for (const auto& [prompt, completion] : convs) {
    if (static_cast<int>(out.size()) >= o.num_prompts)
      break;
    auto p = tok.encode(prompt);
    auto c = tok.encode(completion);
    if (!p || !c)
      continue;
    const int plen = static_cast<int>(p->size());
    const int olen =
        o.sharegpt_output_len > 0 ? o.sharegpt_output_len : static_cast<int>(c->size());
    const bool fixed = o.sharegpt_output_len > 0;
    if (plen < 4 || (!fixed && olen < 4) || (!fixed && (plen > 1024 || plen + olen > 2048)))
      continue;
    out.push_back({prompt, plen, olen});
  }
  if (static_cast<int>(out.size()) < o.num_prompts)
    std::cerr << "warning: the ShareGPT file has only " << out.size()
              << " usable conversations; --num-prompts " << o.num_prompts << "\n";
  return out;
}

// ---------------------------------------------------------------------------------------------
// One streaming request

struct target {
  std::string host, port, path_prefix;
};

target parse_url(const options& o) {
  if (o.base_url.empty())
    return {o.host, std::to_string(o.port), ""};
  std::string u = o.base_url;
  if (u.rfind("http://", 0) == 0)
    u = u.substr(7);
  else if (u.find("://") != std::string::npos)
    throw std::runtime_error("only http:// base URLs are supported: " + o.base_url);
  const auto slash = u.find('/');
  std::string hostport = u.substr(0, slash),
              prefix = slash == std::string::npos ? "" : u.substr(slash);
  while (!prefix.empty() && prefix.back() == '/')
    prefix.pop_back();
  const auto colon = hostport.rfind(':');
  if (colon == std::string::npos)
    return {hostport, "80", prefix};
  return {hostport.substr(0, colon), hostport.substr(colon + 1), prefix};
}

std::string request_body(const options& o, const sample& s) {
  json b = {{"model", o.model}};
  const bool chat = o.endpoint.find("chat") != std::string::npos;
  if (chat) {
    b["messages"] = json::array({{{"role", "user"}, {"content", s.prompt}}});
    b["max_completion_tokens"] = s.output_len;
  } else {
    b["prompt"] = s.prompt;
    b["max_tokens"] = s.output_len;
  }
  b["temperature"] = o.temperature;
  b["stream"] = true;
  b["stream_options"] = {{"include_usage", true}};
  if (o.ignore_eos)
    b["ignore_eos"] = true;
  b.update(o.extra_body);
  return b.dump();
}

// Parses complete SSE events out of `pending` as they arrive; calls on_data(payload, now).
template <class F>
void drain_events(std::string& pending, F&& on_data) {
  for (;;) {
    auto end = pending.find("\n\n");
    size_t sep = 2;
    const auto crlf = pending.find("\r\n\r\n");
    if (crlf != std::string::npos && (end == std::string::npos || crlf < end))
      end = crlf, sep = 4;
    if (end == std::string::npos)
      return;
    const std::string event = pending.substr(0, end);
    pending.erase(0, end + sep);
    size_t pos = 0;
    std::string data;
    while (pos < event.size()) {
      auto nl = event.find('\n', pos);
      if (nl == std::string::npos)
        nl = event.size();
      std::string line = event.substr(pos, nl - pos);
      if (!line.empty() && line.back() == '\r')
        line.pop_back();
      if (line.rfind("data:", 0) == 0)
        data += line.substr(line.size() > 5 && line[5] == ' ' ? 6 : 5);
      pos = nl + 1;
    }
    if (!data.empty())
      on_data(data);
  }
}

result send_request(const options& o, const target& t, const sample& s, bool chat,
                    clock_type::time_point bench_start) {
  result r;
  r.prompt_len = s.prompt_len;
  const std::string body = request_body(o, s);
  const auto st = clock_type::now();
  r.start = std::chrono::duration<double>(st - bench_start).count();
  auto secs = [&](clock_type::time_point tp) {
    return std::chrono::duration<double>(tp - st).count();
  };
  try {
    boost::asio::io_context ioc;
    tcp::resolver resolver(ioc);
    tcp::socket sock(ioc);
    boost::asio::connect(sock, resolver.resolve(t.host, t.port));
    sock.set_option(tcp::no_delay(true));
    http::request<http::string_body> req{http::verb::post, t.path_prefix + o.endpoint, 11};
    req.set(http::field::host, t.host);
    req.set(http::field::user_agent, "troupe-serve-bench");
    req.set(http::field::content_type, "application/json");
    req.set(http::field::accept, "text/event-stream");
    if (!o.api_key.empty())
      req.set(http::field::authorization, "Bearer " + o.api_key);
    req.keep_alive(false);
    req.body() = body;
    req.prepare_payload();
    http::write(sock, req);

    boost::beast::flat_buffer buf;
    http::response_parser<http::buffer_body> parser;
    parser.body_limit(boost::none);
    http::read_header(sock, buf, parser);
    const int status = parser.get().result_int();
    std::string pending, raw;
    bool first = true, done = false;
    auto last = st;
    char chunk[16384];
    auto on_data = [&](const std::string& data) {
      const auto now = clock_type::now();
      if (data == "[DONE]") {
        done = true;
        return;
      }
      auto j = nlohmann::json::parse(data, nullptr, false);
      if (j.is_discarded() || !j.is_object())
        return;
      if (j.contains("error")) {
        r.error = j["error"].dump();
        return;
      }
      const auto ch = j.find("choices");
      if (ch != j.end() && ch->is_array() && !ch->empty()) {
        const auto& c0 = (*ch)[0];
        std::string text;
        if (chat) {
          if (auto d = c0.find("delta");
              d != c0.end() && d->contains("content") && (*d)["content"].is_string())
            text = (*d)["content"].get<std::string>();
        } else if (c0.contains("text") && c0["text"].is_string()) {
          text = c0["text"].get<std::string>();
        }
        if (!text.empty()) {
          if (first)
            r.ttft = secs(now), first = false;
          else
            r.itl.push_back(std::chrono::duration<double>(now - last).count());
          last = now;
          r.generated_text += text;
        }
      }
      if (auto u = j.find("usage");
          u != j.end() && u->is_object() && u->contains("completion_tokens"))
        r.output_tokens = (*u)["completion_tokens"].get<int>();
    };
    boost::system::error_code ec;
    while (!parser.is_done()) {
      parser.get().body().data = chunk;
      parser.get().body().size = sizeof chunk;
      http::read_some(sock, buf, parser, ec);
      if (ec == http::error::need_buffer)
        ec = {};
      const size_t n = sizeof chunk - parser.get().body().size;
      if (status == 200) {
        pending.append(chunk, n);
        drain_events(pending, on_data);
      } else {
        raw.append(chunk, n);
      }
      if (ec == http::error::end_of_stream || ec == boost::asio::error::eof) {
        ec = {};
        break;
      }
      if (ec)
        break;
    }
    r.latency = secs(clock_type::now());
    if (ec)
      r.error = "read: " + ec.message();
    else if (status != 200)
      r.error = fmt::format("HTTP {}: {}", status, raw.substr(0, 500));
    else if (!done && r.error.empty())
      r.error = "the stream ended without data: [DONE]";
    r.success = r.error.empty() && !first;
    if (r.error.empty() && first)
      r.error = "no content in the stream";
  } catch (const std::exception& e) {
    r.error = e.what();
    r.latency = secs(clock_type::now());
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Statistics (numpy's mean / median / std / percentile with linear interpolation)

double mean(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / v.size();
}
double percentile(std::vector<double> v, double p) {
  if (v.empty())
    return 0.0;
  std::sort(v.begin(), v.end());
  const double pos = p / 100.0 * (v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos)), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}
double stddev(const std::vector<double>& v) {
  if (v.empty())
    return 0.0;
  const double m = mean(v);
  double s = 0;
  for (double x : v)
    s += (x - m) * (x - m);
  return std::sqrt(s / v.size());
}

void line(const std::string& label, const std::string& value) {
  std::cout << fmt::format("{:<40} {:<10}\n", label, value);
}
void line(const std::string& label, double value) {
  std::cout << fmt::format("{:<40} {:<10.2f}\n", label, value);
}
void section(const std::string& title, char fill) {
  // Python's "{:=^50}": the title centred, the odd pad character on the right.
  const size_t pad = title.size() < 50 ? 50 - title.size() : 0;
  std::cout << std::string(pad / 2, fill) << title << std::string(pad - pad / 2, fill) << "\n";
}

} // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"serve_bench: online serving benchmark with the options of `vllm bench serve`"};
  app.add_option("--base-url", o.base_url, "server base URL, e.g. http://127.0.0.1:8000");
  app.add_option("--host", o.host, "server host when --base-url is not given");
  app.add_option("--port", o.port, "server port when --base-url is not given");
  app.add_option("--endpoint", o.endpoint, "/v1/completions or /v1/chat/completions");
  app.add_option("--backend", o.label, "accepted for compatibility (openai, openai-chat, vllm)");
  app.add_option("--model", o.model, "served model name (and tokenizer when --tokenizer is absent)")
      ->required();
  app.add_option("--tokenizer", o.tokenizer, "Hugging Face folder or .gguf file");
  app.add_option("--dataset-name", o.dataset_name, "random or sharegpt")
      ->check(CLI::IsMember({"random", "sharegpt"}));
  app.add_option("--dataset-path", o.dataset_path, "ShareGPT-format JSON file");
  app.add_option("--random-input-len", o.random_input_len);
  app.add_option("--random-output-len", o.random_output_len);
  app.add_option("--random-prefix-len", o.random_prefix_len);
  app.add_option("--random-range-ratio", o.random_range_ratio)->check(CLI::Range(0.0, 0.999));
  app.add_option("--sharegpt-output-len", o.sharegpt_output_len);
  app.add_flag("--ignore-eos", o.ignore_eos);
  app.add_option("--num-prompts", o.num_prompts)->check(CLI::PositiveNumber);
  app.add_option("--request-rate", o.request_rate, "requests/s (Poisson arrivals) or inf");
  app.add_option("--burstiness", o.burstiness, "gamma shape of inter-arrival times (1: Poisson)")
      ->check(CLI::PositiveNumber);
  app.add_option("--max-concurrency", o.max_concurrency, "requests in flight at most (0: no cap)");
  app.add_option("--seed", o.seed);
  app.add_option("--temperature", o.temperature);
  std::string extra_body;
  std::vector<std::string> goodput;
  app.add_option("--goodput", goodput,
                 "service level objectives KEY:MS (ttft, tpot, e2el): also report the request "
                 "goodput, requests/s meeting all of them");
  app.add_option("--extra-body", extra_body,
                 "JSON object merged into every request (e.g. a response_format), as vLLM's");
  app.add_option("--result-file", o.result_file, "write the result JSON here");
  app.add_option("--api-key", o.api_key, "Bearer token (default: $OPENAI_API_KEY)");
  app.add_option("--request-timeout", o.timeout_s, "not enforced; accepted for compatibility");
  app.add_flag("--disable-tqdm", o.disable_tqdm, "accepted for compatibility");
  CLI11_PARSE(app, argc, argv);
  for (const auto& g : goodput) { // as vllm bench serve: "ttft:500 tpot:50"
    const auto colon = g.find(':');
    const std::string key = g.substr(0, colon);
    char* end = nullptr;
    const double ms = colon == std::string::npos ? -1 : std::strtod(g.c_str() + colon + 1, &end);
    if ((key != "ttft" && key != "tpot" && key != "e2el") || !(ms >= 0) || *end != '\0') {
      std::cerr << "error: --goodput takes KEY:MS with KEY ttft, tpot or e2el and MS >= 0, not '"
                << g << "'\n";
      return 2;
    }
    o.goodput[key] = ms;
  }
  if (!extra_body.empty()) {
    o.extra_body = json::parse(extra_body, nullptr, false);
    if (!o.extra_body.is_object()) {
      std::cerr << "error: --extra-body must be a JSON object\n";
      return 2;
    }
  }
  if (o.api_key.empty())
    if (const char* k = std::getenv("OPENAI_API_KEY"))
      o.api_key = k;
  const bool chat = o.endpoint.find("chat") != std::string::npos;
  double rate = INFINITY;
  if (o.request_rate != "inf") {
    rate = std::stod(o.request_rate);
    if (!(rate > 0)) {
      std::cerr << "error: --request-rate must be positive or inf\n";
      return 2;
    }
  }
  if (o.dataset_name == "sharegpt" && o.dataset_path.empty()) {
    std::cerr << "error: --dataset-name sharegpt needs --dataset-path\n";
    return 2;
  }
  const std::string tok_path = o.tokenizer.empty() ? o.model : o.tokenizer;
  auto loaded = troupe::engine::model_tokenizer::load_for_model(tok_path);
  if (!loaded) {
    std::cerr << "error: tokenizer " << tok_path << ": " << loaded.error().to_string() << "\n";
    return 1;
  }
  const auto& tok = *loaded->text;
  target t;
  std::vector<sample> samples;
  std::mt19937_64 rng(o.seed);
  try {
    t = parse_url(o);
    samples =
        o.dataset_name == "random" ? random_dataset(o, tok, rng) : sharegpt_dataset(o, tok, rng);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  if (samples.empty()) {
    std::cerr << "error: no requests to send\n";
    return 1;
  }

  // Arrival times: all at 0 for inf, else gamma(burstiness, 1/(rate*burstiness)) gaps (Poisson at
  // 1).
  std::vector<double> arrival(samples.size(), 0.0);
  if (std::isfinite(rate)) {
    std::gamma_distribution<double> gap(o.burstiness, 1.0 / (rate * o.burstiness));
    double at = 0;
    for (auto& a : arrival)
      a = at, at += gap(rng);
  }
  std::cout << "Traffic request rate: " << o.request_rate << "\n"
            << "Burstiness factor: " << o.burstiness
            << (o.burstiness == 1.0 ? " (Poisson process)" : " (gamma process)") << "\n"
            << "Maximum request concurrency: "
            << (o.max_concurrency > 0 ? std::to_string(o.max_concurrency) : "None") << "\n"
            << std::flush;

  std::vector<result> results(samples.size());
  std::mutex mu;
  std::condition_variable cv;
  int in_flight = 0, peak = 0;
  const int cap = o.max_concurrency > 0 ? o.max_concurrency : 1 << 30;
  std::vector<std::thread> threads;
  const auto bench_start = clock_type::now();
  for (size_t i = 0; i < samples.size(); ++i) {
    std::this_thread::sleep_until(bench_start + std::chrono::duration_cast<clock_type::duration>(
                                                    std::chrono::duration<double>(arrival[i])));
    threads.emplace_back([&, i] {
      {
        std::unique_lock lk(mu);
        cv.wait(lk, [&] { return in_flight < cap; });
        peak = std::max(peak, ++in_flight);
      }
      results[i] = send_request(o, t, samples[i], chat, bench_start);
      {
        std::lock_guard lk(mu);
        --in_flight;
      }
      cv.notify_one();
    });
  }
  for (auto& th : threads)
    th.join();
  const double duration = std::chrono::duration<double>(clock_type::now() - bench_start).count();

  // Metrics, as vLLM's calculate_metrics.
  int completed = 0, good = 0;
  long total_input = 0, total_output = 0;
  std::vector<double> ttfts, tpots, itls, e2els;
  std::vector<int> output_lens;
  std::vector<std::string> errors;
  for (auto& r : results) {
    if (!r.success) {
      output_lens.push_back(0);
      errors.push_back(r.error);
      continue;
    }
    if (r.output_tokens == 0) { // no usage chunk: count by re-encoding the text
      auto ids = tok.encode(r.generated_text);
      r.output_tokens = ids ? static_cast<int>(ids->size()) : 0;
    }
    ++completed;
    output_lens.push_back(r.output_tokens);
    errors.emplace_back();
    total_input += r.prompt_len;
    total_output += r.output_tokens;
    const double tpot = r.output_tokens > 1 ? (r.latency - r.ttft) / (r.output_tokens - 1) : 0.0;
    if (r.output_tokens > 1)
      tpots.push_back(tpot);
    const std::map<std::string, double> got{
        {"ttft", r.ttft * 1000.0}, {"tpot", tpot * 1000.0}, {"e2el", r.latency * 1000.0}};
    good += std::all_of(o.goodput.begin(), o.goodput.end(),
                        [&](const auto& slo) { return got.at(slo.first) <= slo.second; });
    itls.insert(itls.end(), r.itl.begin(), r.itl.end());
    ttfts.push_back(r.ttft);
    e2els.push_back(r.latency);
  }
  if (completed == 0)
    std::cerr << "warning: all requests failed; the first error: " << results[0].error << "\n";
  else if (completed < static_cast<int>(results.size()))
    for (const auto& r : results)
      if (!r.success) {
        std::cerr << "warning: " << results.size() - completed
                  << " requests failed; one: " << r.error << "\n";
        break;
      }

  // Peak output tokens/s over 1 s buckets (vLLM's max_output_tokens_per_s), from chunk times.
  double peak_tps = 0;
  {
    std::vector<int> buckets(static_cast<size_t>(duration) + 2, 0);
    for (const auto& r : results) {
      if (!r.success)
        continue;
      double at = r.start + r.ttft;
      ++buckets[std::min(buckets.size() - 1, static_cast<size_t>(at))];
      for (double g : r.itl) {
        at += g;
        ++buckets[std::min(buckets.size() - 1, static_cast<size_t>(at))];
      }
    }
    for (int b : buckets)
      peak_tps = std::max(peak_tps, static_cast<double>(b));
  }

  json out;
  {
    std::time_t now = std::time(nullptr);
    char date[32];
    std::strftime(date, sizeof date, "%Y%m%d-%H%M%S", std::localtime(&now));
    out["date"] = date;
  }
  out["backend"] = chat ? "openai-chat" : "openai";
  out["endpoint_type"] = chat ? "openai-chat" : "openai";
  out["label"] = o.label.empty() ? json() : json(o.label);
  out["model_id"] = o.model;
  out["tokenizer_id"] = tok_path;
  out["num_prompts"] = samples.size();
  out["request_rate"] = std::isfinite(rate) ? json(rate) : json("inf");
  out["burstiness"] = o.burstiness;
  out["max_concurrency"] = o.max_concurrency > 0 ? json(o.max_concurrency) : json();
  out["duration"] = duration;
  out["completed"] = completed;
  out["failed"] = static_cast<int>(samples.size()) - completed;
  out["total_input_tokens"] = total_input;
  out["total_output_tokens"] = total_output;
  out["request_throughput"] = completed / duration;
  out["request_goodput"] = o.goodput.empty() ? json() : json(good / duration);
  out["output_throughput"] = total_output / duration;
  out["total_token_throughput"] = (total_input + total_output) / duration;
  out["max_output_tokens_per_s"] = peak_tps;
  out["max_concurrent_requests"] = peak;
  auto ms = [](std::vector<double> v) {
    for (auto& x : v)
      x *= 1000.0;
    return v;
  };
  const std::pair<const char*, const std::vector<double>*> metrics[] = {
      {"ttft", &ttfts}, {"tpot", &tpots}, {"itl", &itls}, {"e2el", &e2els}};
  for (const auto& [name, v] : metrics) {
    const auto m = ms(*v);
    out[fmt::format("mean_{}_ms", name)] = mean(m);
    out[fmt::format("median_{}_ms", name)] = percentile(m, 50);
    out[fmt::format("std_{}_ms", name)] = stddev(m);
    out[fmt::format("p99_{}_ms", name)] = percentile(m, 99);
  }
  // Per-request arrays, in request order (vLLM's keys; times in seconds as vLLM writes them).
  json input_lens = json::array(), ttft_arr = json::array(), itl_arr = json::array(),
       e2el_arr = json::array(), texts = json::array(), starts = json::array();
  for (const auto& r : results) {
    input_lens.push_back(r.prompt_len);
    starts.push_back(r.start);
    ttft_arr.push_back(r.ttft);
    itl_arr.push_back(r.itl);
    e2el_arr.push_back(r.latency);
    texts.push_back(r.generated_text);
  }
  out["input_lens"] = input_lens;
  out["output_lens"] = output_lens;
  out["ttfts"] = ttft_arr;
  out["itls"] = itl_arr;
  out["e2els"] = e2el_arr;
  out["start_times"] = starts; // seconds from the benchmark's start (not in vLLM's output)
  out["generated_texts"] = texts;
  out["errors"] = errors;

  section(" Serving Benchmark Result ", '=');
  line("Successful requests:", std::to_string(completed));
  line("Failed requests:", std::to_string(samples.size() - completed));
  line("Maximum request concurrency:",
       o.max_concurrency > 0 ? std::to_string(o.max_concurrency) : "None");
  if (std::isfinite(rate))
    line("Request rate configured (RPS):", rate);
  line("Benchmark duration (s):", duration);
  line("Total input tokens:", std::to_string(total_input));
  line("Total generated tokens:", std::to_string(total_output));
  line("Request throughput (req/s):", completed / duration);
  if (!o.goodput.empty())
    line("Request goodput (req/s):", good / duration);
  line("Output token throughput (tok/s):", total_output / duration);
  line("Peak output token throughput (tok/s):", peak_tps);
  line("Peak concurrent requests:", static_cast<double>(peak));
  line("Total token throughput (tok/s):", (total_input + total_output) / duration);
  const std::pair<const char*, const char*> titles[] = {
      {"Time to First Token", "TTFT"},
      {"Time per Output Token (excl. 1st token)", "TPOT"},
      {"Inter-token Latency", "ITL"},
      {"End-to-end Latency", "E2EL"}};
  for (size_t k = 0; k < 4; ++k) {
    section(titles[k].first, '-');
    const std::string name = metrics[k].first;
    line(fmt::format("Mean {} (ms):", titles[k].second), out["mean_" + name + "_ms"].get<double>());
    line(fmt::format("Median {} (ms):", titles[k].second),
         out["median_" + name + "_ms"].get<double>());
    line(fmt::format("P99 {} (ms):", titles[k].second), out["p99_" + name + "_ms"].get<double>());
  }
  std::cout << std::string(50, '=') << "\n" << std::flush;

  if (!o.result_file.empty()) {
    std::ofstream f(o.result_file);
    f << out.dump(2) << "\n";
    if (!f) {
      std::cerr << "error: cannot write " << o.result_file << "\n";
      return 1;
    }
  }
  return completed > 0 ? 0 : 1;
}
