#include "cli/cluster_daemon.hpp"

#include <atomic>
#include <csignal>
#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include <caf/actor_system.hpp>
#include <caf/io/middleman.hpp>
#include <caf/openssl/manager.hpp>
#include <caf/openssl/publish.hpp>
#include <caf/scoped_actor.hpp>
#include <fmt/format.h>

#include "actors/caf_glue.hpp"
#include "actors/head_actor.hpp"
#include "actors/messages.hpp"
#include "actors/node_actor.hpp"
#include "actors/serving/serving_actor.hpp"
#include "cluster/session.hpp"
#include "cluster/tls.hpp"
#include "runtime/log.hpp"

#ifndef TROUPE_VERSION
#define TROUPE_VERSION "0.0.0"
#endif

namespace troupe::cli {

namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;

// One line from the daemon to the command that launched it: "ok ..." or "error ...".
class ready_pipe {
 public:
  explicit ready_pipe(int fd) : fd_(fd) {}
  void report(const std::string& line) {
    if (sent_.exchange(true))
      return;
    if (fd_ < 0) { // --block: the verdict goes to the terminal
      const std::string text = line.substr(line.find(' ') + 1);
      if (line.rfind("ok", 0) == 0)
        fmt::print("{}", text), fflush(stdout);
      else
        fmt::print(stderr, "error: {}\n", text);
      return;
    }
    std::string text = line + "\n";
    [[maybe_unused]] auto n = ::write(fd_, text.data(), text.size());
    ::close(fd_);
  }

 private:
  int fd_;
  std::atomic<bool> sent_{false};
};

// Fork: the child becomes the daemon (own session, output into the log) and returns the write
// end of the ready pipe; the parent waits for the ready line and exits with its verdict.
int daemonize(const fs::path& log_file, int timeout_s, int& ready_fd) {
  int fds[2];
  if (pipe(fds) != 0) {
    fmt::print(stderr, "error: pipe: {}\n", strerror(errno));
    return 1;
  }
  pid_t pid = fork();
  if (pid < 0) {
    fmt::print(stderr, "error: fork: {}\n", strerror(errno));
    return 1;
  }
  if (pid == 0) {
    ::close(fds[0]);
    setsid();
    int null_fd = open("/dev/null", O_RDONLY);
    int log_fd = open(log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    dup2(null_fd, 0);
    dup2(log_fd, 1);
    dup2(log_fd, 2);
    ::close(null_fd);
    ::close(log_fd);
    ready_fd = fds[1];
    return -1; // continue as the daemon
  }
  ::close(fds[1]);
  std::string line;
  pollfd p{fds[0], POLLIN, 0};
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (line.find('\n') == std::string::npos) {
    auto left =
        std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0 || poll(&p, 1, static_cast<int>(left.count())) <= 0)
      break;
    char buf[512];
    ssize_t n = read(fds[0], buf, sizeof buf);
    if (n <= 0)
      break;
    line.append(buf, static_cast<size_t>(n));
  }
  ::close(fds[0]);
  if (line.rfind("ok", 0) == 0) {
    fmt::print("{}", line.substr(3));
    return 0;
  }
  if (line.empty()) {
    kill(pid, SIGTERM);
    fmt::print(stderr, "error: the daemon (pid {}) did not become ready within {} s; see {}\n", pid,
               timeout_s, log_file.string());
    return 1;
  }
  fmt::print(stderr, "error: {}", line.substr(line.find(' ') + 1));
  return line.rfind("refused", 0) == 0 ? 3 : 1;
}

// Blocks SIGTERM, SIGINT and SIGUSR1 in every thread (call before CAF starts its threads);
// wait_for_signal() then receives them in the main thread. SIGUSR1: an actor asked to exit.
sigset_t block_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

int wait_for_signal(const sigset_t& set) {
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

cluster::node_info local_node_info(const fs::path& root, const std::string& role,
                                   const std::string& address, int32_t num_gpus, bool head) {
  cluster::node_info info;
  info.resources = cluster::discover_resources(std::max(0, num_gpus));
  info.hostname = info.resources.hostname;
  info.address = address;
  info.head_node = head;
  auto id = cluster::stable_node_id(root, role);
  info.node_id = id ? *id : fmt::format("{}-{}", info.hostname, getpid());
  return info;
}

struct session_files {
  fs::path root, session;
};

expected<session_files> prepare_session(const std::string& temp_dir, const std::string& role,
                                        bool fresh) {
  session_files f{cluster::temp_root(temp_dir), {}};
  const fs::path latest = f.root / "session_latest";
  if (auto pid = cluster::live_pid(latest, role))
    return make_error(errc::invalid_argument,
                      "a {} daemon is already running here (pid {}, temp dir {}); run "
                      "`cluster stop` first",
                      role, *pid, f.root.string());
  auto session = cluster::open_session(f.root, fresh);
  if (!session)
    return std::move(session).error();
  f.session = *session;
  return f;
}

// Control-plane daemons are mostly idle: CAF's work-sharing scheduler wakes a worker on every
// message, where work stealing polls with sleeps of up to 10 ms (bench/RESULTS.md compares them).
// What a head keeps across its own crash: <temp root>/head_state/{token, deployments/}.
fs::path head_state_dir(const fs::path& root) {
  return root / "head_state";
}

caf::actor_system_config& troupe_config(actors::system_config& cfg) {
  msg::add_message_types(cfg);
  cfg.set("scheduler.policy", caf::atom("sharing"));
  return cfg;
}

} // namespace

int run_head_daemon(const head_options& opts, const session_files& files, const std::string& token,
                    ready_pipe& ready);
int run_node_daemon(const join_options& opts, const session_files& files,
                    const std::string& head_host, uint16_t head_port, ready_pipe& ready);

int start_head(const head_options& opts) {
  auto files = prepare_session(opts.temp_dir, "head", true);
  if (!files) {
    fmt::print(stderr, "error: {}\n", files.error().message());
    return 1;
  }
  // A head that did not stop cleanly left its token and deployments here: the nodes rejoin
  // with that token, and its deployments are served again.
  const auto saved_token = cluster::read_text(head_state_dir(files->root) / "token");
  const std::string token =
      !opts.token.empty() ? opts.token : saved_token.value_or(cluster::random_token());
  int ready_fd = -1;
  if (!opts.block) {
    int rc = daemonize(files->session / "logs" / "head.log", 60, ready_fd);
    if (rc >= 0)
      return rc;
  }
  ready_pipe ready(ready_fd);
  return run_head_daemon(opts, *files, token, ready);
}

int join_cluster(const join_options& opts) {
  auto addr = cluster::parse_address(opts.address, 6380);
  if (!addr) {
    fmt::print(stderr, "error: {}\n", addr.error().message());
    return 2;
  }
  if (opts.ca_sha256.empty()) {
    fmt::print(stderr, "error: pass --ca-sha256 FINGERPRINT as printed by `cluster start --head` "
                       "(or --ca-file CA_PEM, or set TROUPE_CA_SHA256): the node checks that it "
                       "joins that head\n");
    return 2;
  }
  auto files = prepare_session(opts.temp_dir, "node", false);
  if (!files) {
    fmt::print(stderr, "error: {}\n", files.error().message());
    return 1;
  }
  int ready_fd = -1;
  if (!opts.block) {
    int rc = daemonize(files->session / "logs" / "node.log", 60, ready_fd);
    if (rc >= 0)
      return rc;
  }
  ready_pipe ready(ready_fd);
  return run_node_daemon(opts, *files, addr->first, addr->second, ready);
}

// The head's TLS material: the cluster CA (kept in <temp>/cluster_ca across head restarts, so
// joined nodes' certificates stay valid; removed by a clean stop) and this head's identity in
// the session's tls/ folder.
struct head_tls {
  cluster::tls::certificate_authority ca;
  cluster::tls::identity id;
  cluster::tls::identity_files files;
  std::string fingerprint;
};

fs::path ca_dir_of(const head_options& opts, const session_files& files) {
  return opts.ca_dir.empty() ? files.root / "cluster_ca" : fs::path(opts.ca_dir);
}

expected<head_tls> prepare_head_tls(const head_options& opts, const session_files& files,
                                    const std::string& name) {
  head_tls t;
  TROUPE_ASSIGN(t.ca, cluster::tls::open_ca(ca_dir_of(opts, files)));
  TROUPE_ASSIGN(t.fingerprint, cluster::tls::fingerprint(t.ca.cert_pem));
  TROUPE_ASSIGN(t.id, cluster::tls::issue_identity(t.ca, name));
  TROUPE_ASSIGN(t.files, cluster::tls::write_identity(files.session / "tls", "head", t.id));
  return t;
}

// Publishes the head over mutual TLS on `port` and starts the join bootstrap on port + 1; with
// port 0, tries free ports until port + 1 is free too.
expected<std::unique_ptr<cluster::tls::bootstrap_server>>
listen_head(const caf::actor& head, const head_options& opts, const head_tls& tls,
            const std::string& token, uint16_t& port) {
  const char* bind = opts.host.empty() ? nullptr : opts.host.c_str();
  troupe::error last;
  for (int attempt = 0; attempt < (opts.port == 0 ? 20 : 1); ++attempt) {
    auto published = caf::openssl::publish(head, opts.port, bind, true);
    if (!published)
      return make_error(errc::unavailable, "cannot listen on {}:{}: {}",
                        opts.host.empty() ? "*" : opts.host, opts.port,
                        head.home_system().render(published.error()));
    auto boot = cluster::tls::bootstrap_server::start(
        opts.host, cluster::tls::bootstrap_port(*published), tls.ca, tls.id, token);
    if (boot) {
      port = *published;
      return boot;
    }
    last = std::move(boot).error();
    caf::scoped_actor self{
        head.home_system()}; // (Debian's caf::openssl::unpublish does not compile)
    self->request(head.home_system().openssl_manager().actor_handle(), std::chrono::seconds(5),
                  caf::unpublish_atom::value, head.address(), *published)
        .receive([] {}, [](caf::error&) {});
  }
  return std::move(last).context("the join bootstrap listens on the control-plane port + 1");
}

int run_head_daemon(const head_options& opts, const session_files& files, const std::string& token,
                    ready_pipe& ready) {
  sigset_t signals = block_signals();
  const auto node_info = local_node_info(files.root, "head", "", opts.num_gpus, true);
  auto tls = prepare_head_tls(opts, files, node_info.node_id);
  if (!tls) {
    ready.report("error " + tls.error().message());
    return 1;
  }
  actors::system_config cfg{tls->files};
  caf::actor_system sys{troupe_config(cfg)};
  actors::head_config hc{.token = token, .version = TROUPE_VERSION};
  const fs::path state_dir = head_state_dir(files.root);
  hc.store = actors::deployment_store(state_dir / "deployments", TROUPE_VERSION);
  auto previous = hc.store.load_all();
  for (const auto& skipped : previous.skipped)
    log::warn("head: a deployment of the previous head is not restored: {}", skipped.message());
  std::string restoring;
  for (const auto& dc : previous.configs)
    restoring += (restoring.empty() ? "" : ", ") + dc.served_model_name;
  hc.recovered = std::move(previous.configs);
  // Deployments are served from this process: one detached serving actor each.
  hc.spawn_serving = [](caf::actor_system& sys, caf::actor head) {
    return sys.spawn<caf::detached>(serve::serving_actor, std::move(head),
                                    std::string(TROUPE_VERSION));
  };
  auto head = sys.spawn(actors::head_actor, hc);
  uint16_t port = 0;
  auto bootstrap = listen_head(head, opts, *tls, token, port);
  if (!bootstrap) {
    ready.report("error " + bootstrap.error().message());
    caf::scoped_actor self{sys};
    self->send_exit(head, caf::exit_reason::user_shutdown); // head_actor ignores anonymous exits
    return 1;
  }
  const bool any = opts.host.empty() || opts.host == "0.0.0.0";
  const std::string address = any ? cluster::primary_address() : opts.host;
  const std::string head_addr = fmt::format("{}:{}", address, port);
  (void)cluster::write_pid_file(files.session, "head");
  (void)cluster::write_text(files.session / "head_address", head_addr + "\n");
  (void)cluster::write_text(files.session / "token", token + "\n", true);
  std::error_code ec;
  fs::create_directories(state_dir, ec);
  (void)cluster::write_text(state_dir / "token", token + "\n", true);
  log::info("head: troupe {} listening on {} (mutual TLS; join bootstrap on port {}; CA "
            "sha256 {}; session {})",
            TROUPE_VERSION, head_addr, (*bootstrap)->port(), tls->fingerprint,
            fs::canonical(files.session).string());
  if (!restoring.empty())
    log::info("head: the previous head did not stop cleanly; restoring its deployments: {}",
              restoring);

  actors::node_config nc{
      .local_head = head, .token = token, .version = TROUPE_VERSION, .info = node_info};
  nc.info.address = address;
  const std::string join_line = fmt::format(
      "troupe head started (pid {}), listening on {} (mutual TLS)\n  logs: {}\nTo add a node, "
      "run on it:\n  cluster join {} --token {} --ca-sha256 {}\n(or keep the token in a file: "
      "--token-file FILE)\nThen: cluster status    To stop: cluster stop\n{}",
      getpid(), head_addr, (fs::canonical(files.session) / "logs").string(), head_addr, token,
      tls->fingerprint,
      restoring.empty()
          ? ""
          : fmt::format("Restoring the deployments of the previous head, which did not stop "
                        "cleanly: {} (`cluster serve --stop NAME` drops one)\n",
                        restoring));
  nc.on_joined = [&ready, join_line](const std::string&) { ready.report("ok " + join_line); };
  nc.on_shutdown = [] {}; // the head process itself decides when to exit
  auto node = sys.spawn(actors::node_actor, nc);

  int sig = wait_for_signal(signals);
  // `cluster stop --grace G` leaves G in the session: drain for all of it but the time to exit.
  double grace = opts.grace_s;
  if (auto g = cluster::read_text(files.session / "stop_grace"))
    grace = std::max(0.0, std::strtod(g->c_str(), nullptr) - 3);
  log::info("head: signal {}: draining the deployments (up to {:.0f} s), then telling the nodes",
            sig, grace);
  caf::scoped_actor self{sys};
  self->request(head, milliseconds(static_cast<int64_t>(grace * 1000)) + std::chrono::seconds(8),
                msg::stop_atom::value, token, grace)
      .receive([](bool) {}, [](caf::error&) {});
  std::this_thread::sleep_for(milliseconds(200)); // let the shutdown messages leave
  self->send_exit(node, caf::exit_reason::user_shutdown);
  self->send_exit(head, caf::exit_reason::user_shutdown);
  bootstrap->reset();
  // The cluster ends with its head: no secret outlives it (a SIGKILLed head keeps the CA, its
  // token and its deployments, so that a restarted head takes its nodes back and serves them
  // again; a CA given by --ca-dir is the operator's).
  fs::remove(files.session / "head.pid", ec);
  fs::remove(files.session / "token", ec);
  fs::remove(state_dir / "token", ec);
  fs::remove(state_dir / "deployments", ec);
  fs::remove(state_dir, ec);
  cluster::tls::remove_identity(files.session / "tls", "head");
  if (opts.ca_dir.empty())
    fs::remove_all(ca_dir_of(opts, files), ec);
  return 0;
}

// Proves the token at the head's join bootstrap (retrying while the head is not up yet: once a
// second, for 55 s, or for ever with --block) and writes the certificate it gets with this
// node's new key to the session's tls/ folder. A refusal or a fingerprint mismatch is
// errc::invalid_argument, already reported.
expected<cluster::tls::identity_files>
node_identity(const join_options& opts, const session_files& files, const std::string& head_host,
              uint16_t head_port, const std::string& name, ready_pipe& ready) {
  auto key = cluster::tls::new_private_key();
  if (!key) {
    ready.report("error " + key.error().message());
    return std::move(key).error();
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(55);
  for (int attempt = 0;; ++attempt) {
    auto id = cluster::tls::bootstrap(head_host, cluster::tls::bootstrap_port(head_port),
                                      opts.token, opts.ca_sha256, name, *key);
    if (id) {
      auto written = cluster::tls::write_identity(files.session / "tls", "node", *id);
      if (!written)
        ready.report("error " + written.error().message());
      return written;
    }
    if (id.error().code() == errc::invalid_argument) {
      log::error("node: {}", id.error().message());
      ready.report("refused " + id.error().message());
      return std::move(id).error();
    }
    if (!opts.block && std::chrono::steady_clock::now() > deadline) {
      ready.report("error " + id.error().message());
      return std::move(id).error();
    }
    if (attempt % 10 == 0)
      log::warn("node: {}; retrying", id.error().message());
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
}

int run_node_daemon(const join_options& opts, const session_files& files,
                    const std::string& head_host, uint16_t head_port, ready_pipe& ready) {
  sigset_t signals = block_signals();
  std::string address = opts.node_ip;
  if (address.empty()) {
    auto routed = cluster::route_source_address(head_host);
    if (!routed) {
      ready.report("error " + routed.error().message());
      return 1;
    }
    address = *routed;
  }
  auto info = local_node_info(files.root, "node", address, opts.num_gpus, false);
  auto tls = node_identity(opts, files, head_host, head_port, info.node_id, ready);
  if (!tls)
    return tls.error().code() == errc::invalid_argument ? 3 : 1;
  actors::system_config cfg{*tls};
  caf::actor_system sys{troupe_config(cfg)};
  (void)cluster::write_pid_file(files.session, "node");
  (void)cluster::write_text(files.session / "head_address",
                            fmt::format("{}:{}\n", head_host, head_port));
  if (!opts.token.empty())
    (void)cluster::write_text(files.session / "token", opts.token + "\n", true);

  std::atomic<int> exit_code{0};
  actors::node_config nc{.head_host = head_host,
                         .head_port = head_port,
                         .token = opts.token,
                         .version = TROUPE_VERSION,
                         .info = std::move(info)};
  const std::string id = nc.info.node_id;
  nc.on_joined = [&ready, id, address, head_host, head_port](const std::string&) {
    ready.report(fmt::format("ok troupe node {} ({}) joined the head at {}:{} (pid {})\n", id,
                             address, head_host, head_port, getpid()));
  };
  nc.on_refused = [&ready, &exit_code](const troupe::error& err) {
    exit_code = 3;
    ready.report("refused " + err.message());
    kill(getpid(), SIGUSR1);
  };
  nc.on_shutdown = [] { kill(getpid(), SIGUSR1); };
  log::info("node: troupe {} node {} at {} joining {}:{}", TROUPE_VERSION, id, address, head_host,
            head_port);
  auto node = sys.spawn(actors::node_actor, nc);

  int sig = wait_for_signal(signals);
  caf::scoped_actor self{sys};
  if (sig != SIGUSR1) {
    log::info("node: signal {}: leaving the cluster", sig);
    self->request(node, std::chrono::seconds(3), msg::leave_atom::value)
        .receive([](bool) {}, [](caf::error&) {});
  }
  self->send_exit(node, caf::exit_reason::user_shutdown);
  std::error_code ec;
  fs::remove(files.session / "node.pid", ec);
  fs::remove(files.session / "token", ec);
  cluster::tls::remove_identity(files.session / "tls", "node");
  return exit_code.load();
}

} // namespace troupe::cli
