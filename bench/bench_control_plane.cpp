// Control-plane latency: (1) request/response round trip between actors in two processes on
// loopback (a forked process hosts the real head_actor behind the middleman), measured from a
// blocking scoped_actor and from an event-based actor; (2) time from `cluster join` (a real
// process) until the head reports the node alive. Usage: bench_control_plane [--requests N]
// [--joins K] [--policy stealing|sharing]. Prints p50/p99 per measurement.
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <functional>
#include <future>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/io/middleman.hpp>
#include <caf/scoped_actor.hpp>
#include <fmt/format.h>

#include "actors/caf_glue.hpp"
#include "actors/head_actor.hpp"
#include "actors/messages.hpp"
#include "cluster/session.hpp"

using namespace troupe;
using clk = std::chrono::steady_clock;
using us = std::chrono::duration<double, std::micro>;

namespace {

const std::string token = "bench-token";
std::string policy = "sharing"; // CAF scheduler: sharing (what the daemons use) or stealing

void configure(actors::system_config& cfg) {
  msg::add_message_types(cfg);
  cfg.set("scheduler.policy", caf::atom_from_string(policy));
}

std::string cluster_binary() {
  const char* env = std::getenv("TROUPE_CLUSTER_BIN");
  return env != nullptr ? env : TROUPE_CLUSTER_BIN;
}

void report(const std::string& what, std::vector<double> v, const char* unit) {
  std::sort(v.begin(), v.end());
  auto pct = [&](double p) { return v[std::min(v.size() - 1, size_t(p * (v.size() - 1) + 0.5))]; };
  double mean = 0;
  for (double x : v)
    mean += x / v.size();
  fmt::print("{:<44} n={:<6} p50 {:8.1f} {}  p99 {:8.1f} {}  p99.9 {:8.1f} {}  mean {:8.1f} {}\n",
             what, v.size(), pct(0.5), unit, pct(0.99), unit, pct(0.999), unit, mean, unit);
}

// Child process: a head_actor published on `port` until killed.
[[noreturn]] void serve_head(uint16_t port, int ready_fd) {
  actors::system_config cfg;
  msg::add_message_types(cfg);
  caf::actor_system sys{cfg};
  // The version must be the cluster binary's: the join benchmark starts real `cluster join`.
  auto head =
      sys.spawn(actors::head_actor, actors::head_config{.token = token, .version = TROUPE_VERSION});
  auto p = sys.middleman().publish(head, port, "127.0.0.1", true);
  char c = p ? '1' : '0';
  [[maybe_unused]] auto n = write(ready_fd, &c, 1);
  pause();
  _exit(0);
}

caf::actor connect(caf::actor_system& sys, uint16_t port) {
  auto head = sys.middleman().remote_actor("127.0.0.1", port);
  if (!head) {
    fmt::print(stderr, "cannot connect: {}\n", sys.render(head.error()));
    std::exit(1);
  }
  return *head;
}

void bench_round_trip(caf::actor_system& sys, caf::actor head, int n) {
  caf::scoped_actor self{sys};
  const std::string ns = "bench", key = "nccl_id", value(128, 'x');
  self->request(head, std::chrono::seconds(5), msg::kv_set_atom::value, token, ns, key, value)
      .receive([](bool) {}, [](caf::error&) {});
  std::vector<double> rtt;
  for (int i = 0; i < n + 1000; ++i) {
    auto t0 = clk::now();
    self->request(head, std::chrono::seconds(5), msg::kv_get_atom::value, token, ns, key)
        .receive([](std::string&) {}, [](caf::error&) { std::abort(); });
    if (i >= 1000)
      rtt.push_back(us(clk::now() - t0).count());
  }
  report("kv_get 128 B, scoped_actor (blocking)", rtt, "us");

  // Event-based client: the next request leaves from the response handler.
  std::promise<std::vector<double>> done;
  sys.spawn([head, n, &done](caf::event_based_actor* a) {
    auto samples = std::make_shared<std::vector<double>>();
    auto step = std::make_shared<std::function<void(int)>>();
    *step = [a, head, n, samples, step, &done](int i) {
      if (i == n + 1000) {
        done.set_value(*samples);
        *step = nullptr; // break the self-reference
        return;
      }
      auto t0 = clk::now();
      a->request(head, std::chrono::seconds(5), msg::heartbeat_atom::value, std::string("x"),
                 uint64_t{1})
          .then([=](bool) {
            if (i >= 1000)
              samples->push_back(us(clk::now() - t0).count());
            (*step)(i + 1);
          });
    };
    (*step)(0);
  });
  report("heartbeat, event-based actor", done.get_future().get(), "us");
}

pid_t spawn_cluster(const std::vector<std::string>& args) {
  pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> argv;
    for (const auto& a : args)
      argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    int null_fd = open("/dev/null", O_WRONLY);
    dup2(null_fd, 1);
    dup2(null_fd, 2);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

size_t alive_nodes(caf::scoped_actor& self, caf::actor head) {
  size_t alive = 0;
  self->request(head, std::chrono::seconds(5), msg::status_atom::value, token)
      .receive(
          [&](msg::cluster_view& v) {
            for (auto& n : v.nodes)
              alive += n.state == "alive";
          },
          [](caf::error&) {});
  return alive;
}

void bench_join(caf::actor_system& sys, caf::actor head, uint16_t port, int joins) {
  caf::scoped_actor self{sys};
  auto root = std::filesystem::temp_directory_path() / fmt::format("troupe_bench_{}", getpid());
  std::vector<double> ms;
  for (int i = 0; i < joins; ++i) {
    auto t0 = clk::now();
    pid_t p = spawn_cluster({cluster_binary(), "join", fmt::format("127.0.0.1:{}", port), "--token",
                             token, "--block", "--num-gpus", "1", "--temp-dir",
                             (root / std::to_string(i)).string()});
    while (alive_nodes(self, head) < 1 && clk::now() - t0 < std::chrono::seconds(10))
      usleep(200);
    if (alive_nodes(self, head) < 1) {
      fmt::print(stderr, "join {}: the node did not show up alive within 10 s\n", i);
      kill(p, SIGKILL);
      waitpid(p, nullptr, 0);
      break;
    }
    ms.push_back(std::chrono::duration<double, std::milli>(clk::now() - t0).count());
    kill(p, SIGTERM); // leaves gracefully: the node turns "left"
    waitpid(p, nullptr, 0);
  }
  std::filesystem::remove_all(root);
  if (!ms.empty())
    report("cluster join (process start) -> alive", ms, "ms");
}

} // namespace

int main(int argc, char** argv) {
  int n = 20000, joins = 10;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--requests"))
      n = std::atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--joins"))
      joins = std::atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--policy"))
      policy = argv[i + 1];
  }
  // The head lives in another process: fork it before this process starts CAF's threads.
  const uint16_t port = static_cast<uint16_t>(20000 + getpid() % 20000);
  int fds[2];
  if (pipe(fds) != 0)
    return 1;
  pid_t child = fork();
  if (child == 0)
    serve_head(port, fds[1]);
  char ok = 0;
  if (read(fds[0], &ok, 1) != 1 || ok != '1') {
    fmt::print(stderr, "the head process could not listen on port {}\n", port);
    kill(child, SIGKILL);
    return 1;
  }
  int rc = 0;
  {
    actors::system_config cfg;
    configure(cfg);
    caf::actor_system sys{cfg};
    fmt::print("CAF scheduler policy: {}\n", policy);
    auto head = connect(sys, port);
    bench_round_trip(sys, head, n);
    if (joins > 0)
      bench_join(sys, head, port, joins);
  }
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  return rc;
}
