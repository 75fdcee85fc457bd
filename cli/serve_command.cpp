#include "cli/serve_command.hpp"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <memory>
#include <optional>

#include <fmt/format.h>

#include "actors/caf_glue.hpp"
#include "actors/load_display.hpp"
#include "actors/messages.hpp"
#include "actors/serving/deployment.hpp"
#include "cli/cluster_commands.hpp"
#include "cli/exit_codes.hpp"
#include "cli/serve_source.hpp"
#include "cluster/resources.hpp"
#include "runtime/log.hpp"

#ifndef TROUPE_VERSION
#define TROUPE_VERSION "0.0.0"
#endif

namespace troupe::cli {

namespace {

struct serve_args {
  std::string target; // model.yaml, model folder, .gguf file or HF id
  bool block = false;
  std::string stop; // --stop NAME
  std::string address, token, temp_dir, ca_sha256;
  int timeout_s = 600;
  double grace_s = 30; // --block: SIGTERM lets requests finish this long
  deployment_flags flags;
};

// How the ranks' load progress is shown: on a terminal (stderr, text logs) bars redrawn in place,
// else log lines at each 10% of every rank's bytes (JSON lines with --log-format json).
actors::load_display make_load_display() {
  if (isatty(STDERR_FILENO) == 1 && log::current_format() == log::format::text) {
    winsize ws{};
    const int columns =
        ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0 ? ws.ws_col : 80;
    return actors::load_display(
        actors::load_display::style::bars,
        [](const std::string& text) {
          std::fputs(text.c_str(), stderr);
          std::fflush(stderr);
        },
        std::min(columns - 1, 120)); // a line as wide as the terminal would wrap
  }
  return actors::load_display(actors::load_display::style::lines,
                              [](const std::string& line) { log::info("{}", line); });
}

// Sends the deployment (or --stop NAME) to the head and waits for its verdict.
int run_on_cluster(const serve_args& args, const deployment_config* config) {
  auto target = resolve_head(args.address, args.token, args.temp_dir, args.ca_sha256);
  if (!target) {
    const bool no_head = target.error().code() == errc::not_found;
    fmt::print(stderr, "error: {}{}\n", target.error().message(),
               no_head ? "; start a head (`cluster start --head`) or serve in this process with "
                         "--block"
                       : "");
    return no_head ? exit_usage : exit_status_of(target.error().code());
  }
  const auto timeout = std::chrono::seconds(args.timeout_s);
  auto done = with_head(
      *target, std::chrono::seconds(10),
      [&](caf::scoped_actor& self, const caf::actor& head,
          caf::actor_system& sys) -> expected<void> {
        expected<void> out = make_error(errc::internal, "no reply from the head");
        if (!config) {
          self->request(head, timeout, msg::undeploy_atom::value, target->token, args.stop)
              .receive(
                  [&](bool) {
                    fmt::print("stopped deployment '{}'\n", args.stop);
                    out = {};
                  },
                  [&](caf::error& e) { out = actors::from_caf(e, &sys); });
          return out;
        }
        // The verdict can take minutes (weights loading): ping the head every 2 s meanwhile,
        // so that a head that dies (connection lost) or hangs (4 pings unanswered) ends the
        // wait within seconds instead of after --timeout.
        self->monitor(head);
        self->send(head, msg::deploy_atom::value, target->token, *config);
        auto display = make_load_display();
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        auto next_ping = std::chrono::steady_clock::now() + std::chrono::seconds(2);
        for (int unanswered = 0;;) {
          bool waiting = true;
          self->receive(
              [&](msg::deployment_view& v) {
                std::string ranks;
                for (const auto& r : v.ranks)
                  ranks += v.replicas > 1
                               ? fmt::format(" r{}/pp{}/tp{}@{}", r.replica, r.pp_rank, r.tp_rank,
                                             r.node_id)
                               : fmt::format(" pp{}/tp{}@{}", r.pp_rank, r.tp_rank, r.node_id);
                fmt::print("serving '{}' at {} ({}, tensor={} pipeline={}{}, ranks:{})\n", v.name,
                           v.endpoint, v.device, v.tensor, v.pipeline,
                           v.replicas > 1 ? fmt::format(" replicas={}", v.replicas) : "", ranks);
                out = {};
                waiting = false;
              },
              [&](msg::cluster_view&) { unanswered = 0; },
              [&](msg::progress_atom, const msg::rank_progress& p) {
                if (p.deployment == config->served_model_name)
                  display.update(p);
              },
              [&](caf::error& e) {
                out = actors::from_caf(e, &sys);
                waiting = false;
              },
              [&](caf::down_msg& dm) {
                out = make_error(errc::unavailable,
                                 "lost the head at {}:{} while the deployment loaded ({}); it "
                                 "may have crashed (see its log); if it restarts it serves the "
                                 "deployments that were ready, not this one",
                                 target->host, target->port, sys.render(dm.reason));
                waiting = false;
              },
              caf::after(std::max(std::chrono::duration_cast<std::chrono::milliseconds>(
                                      next_ping - std::chrono::steady_clock::now()),
                                  std::chrono::milliseconds(1))) >>
                  [] {});
          // Every 2 s, whether progress reports arrive or not: the deadline, then a ping.
          if (const auto now = std::chrono::steady_clock::now(); waiting && now >= next_ping) {
            next_ping = now + std::chrono::seconds(2);
            if (now > deadline) {
              out = make_error(errc::timeout,
                               "the deployment was not ready within {} s (--timeout); it "
                               "goes on loading: see `cluster status`",
                               args.timeout_s);
              waiting = false;
            } else if (++unanswered > 3) {
              out = make_error(errc::unavailable,
                               "the head at {}:{} stopped answering (4 pings in 8 s); "
                               "it may hang or be overloaded",
                               target->host, target->port);
              waiting = false;
            } else {
              self->send(head, msg::status_atom::value, target->token);
            }
          }
          if (!waiting)
            break;
        }
        display.flush();
        return out;
      });
  if (!done) {
    fmt::print(stderr, "error: {}\n", done.error().message());
    return exit_status_of(done.error().code());
  }
  return exit_ok;
}

int run(const serve_args& args) {
  if (!args.stop.empty())
    return run_on_cluster(args, nullptr);
  if (args.target.empty()) {
    fmt::print(stderr, "error: give a model.yaml, a model folder, a .gguf file or a Hugging Face "
                       "id to serve (or --stop NAME)\n");
    return exit_usage;
  }
  auto config = load_serve_target(args.target, args.flags.given());
  if (!config) {
    fmt::print(stderr, "error: {}\n", config.error().message());
    return exit_status_of(config.error().code());
  }
  // The API key from the environment when neither model.yaml nor a flag gives one (so that it
  // need not be on a command line or in a file).
  if (const char* env = std::getenv("TROUPE_API_KEY"); config->api_key.empty() && env != nullptr)
    config->api_key = env;
  if (!args.block)
    return run_on_cluster(args, &*config);
  if (config->device == "auto") {
    const auto here = cluster::discover_resources();
    const auto choice = cluster::choose_device(here.gpus, here.gpu_discovery_note);
    log::info("device: auto -> {} ({})", choice.device, choice.why);
    config->device = choice.device;
  }
  // Block the stop signals before any thread starts, so that only sigwait below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  log::info("loading {} on {} ...", config->model, config->device);
  const auto t0 = std::chrono::steady_clock::now();
  auto display = make_load_display();
  auto d = serve::deployment::start(*config, TROUPE_VERSION,
                                    [&display](const msg::rank_progress& p) { display.update(p); });
  display.flush();
  if (!d) {
    fmt::print(stderr, "error: {}\n", d.error().to_string());
    return exit_status_of(d.error().code());
  }
  log::info("loaded in {:.1f} s",
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  fmt::print("serving '{}' at http://{}:{}/v1 ({}, max_model_len {}, {} KV blocks)\n", (*d)->name(),
             (*d)->host(), (*d)->port(), config->device, (*d)->max_model_len(),
             (*d)->num_kv_blocks());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop_signals, &sig);
  log::info("signal {}: shutting down; requests in flight get {} s to finish", sig, args.grace_s);
  (*d)->drain(args.grace_s);
  d->reset();
  log::info("stopped");
  return exit_ok;
}

} // namespace

void add_serve_command(CLI::App& app, int& exit_code) {
  auto args = std::make_shared<serve_args>();
  auto* cmd = app.add_subcommand(
      "serve", "Serve a model with the OpenAI HTTP API: TARGET is a model.yaml, a model folder, a "
               ".gguf file or a Hugging Face id (ORG/NAME, from the local cache); flags override "
               "model.yaml's keys");
  cmd->add_option("target", args->target, "model.yaml, model folder, .gguf file or ORG/NAME");
  cmd->add_flag("--block", args->block, "Serve in this process until Ctrl-C / SIGTERM");
  cmd->add_option("--stop", args->stop, "Remove the deployment NAME (its served_model_name)");
  cmd->add_option("--address", args->address, "Head address (default: this host's session)");
  cmd->add_option("--token", args->token, "Cluster token (default: $TROUPE_TOKEN or the session)");
  add_secret_file_option(cmd, "token", args->token);
  add_ca_option(cmd, args->ca_sha256);
  cmd->add_option("--temp-dir", args->temp_dir,
                  "Session root (default $TROUPE_TEMP_DIR or /tmp/troupe)");
  cmd->add_option("--timeout", args->timeout_s, "Seconds to wait for the deployment to load")
      ->check(CLI::Range(1, 3600));
  cmd->add_option("--grace", args->grace_s,
                  "--block: seconds requests in flight get to finish after SIGTERM (default 30)")
      ->check(CLI::Range(0.0, 3600.0));
  add_deployment_flags(cmd, args->flags);
  cmd->callback([args, &exit_code] { exit_code = run(*args); });
}

} // namespace troupe::cli
