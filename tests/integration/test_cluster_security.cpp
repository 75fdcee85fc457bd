// The control plane against an adversary on the network (docs/security.md): a CAF peer without a
// cluster certificate (or with one from another CA) gets no connection; forged BASP headers that
// announce huge payloads reach only the TLS layer (head memory flat); a peer with a valid
// certificate that sends another role's messages (deploy from a node's process, kill, forged
// down, failed, tick, heartbeat or leave of another node) changes nothing, and each is logged;
// a wrong token or CA fingerprint at join is refused with a clear error.
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <csignal>
#include <fstream>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <caf/actor_system.hpp>
#include <caf/io/middleman.hpp>
#include <caf/scoped_actor.hpp>
#include <fmt/format.h>

#include "actors/caf_glue.hpp"
#include "actors/messages.hpp"
#include "cluster/tls.hpp"
#include "process_harness.hpp"

using namespace troupe;
using namespace troupe::test;
using namespace std::chrono_literals;

namespace {

long rss_kib(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0)
      return std::atol(line.c_str() + 6);
  return -1;
}

int tcp_connect(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// A head (blocking, in dir "head") whose own node is alive.
pid_t start_head(cluster_fixture& fx) {
  pid_t head = fx.start_head_blocking();
  REQUIRE(eventually([&] { return fx.nodes().size() == 1; }, 30s));
  return head;
}

std::string version_of(cluster_fixture& fx) {
  auto v = fx.cluster({"--version"});
  auto text = v.output.substr(v.output.find_last_of(' ') + 1);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r'))
    text.pop_back();
  return text;
}

// A certificate from the head's join bootstrap, as a node gets one, written under `dir`.
cluster::tls::identity_files certificate(cluster_fixture& fx, const std::string& name,
                                         const fs::path& dir) {
  auto key = cluster::tls::new_private_key();
  REQUIRE(key);
  auto id = cluster::tls::bootstrap("127.0.0.1", cluster::tls::bootstrap_port(fx.port()),
                                    fx.token(), fx.ca_sha256(), name, *key);
  REQUIRE_MESSAGE(id, id.error().message());
  auto files = cluster::tls::write_identity(dir, "node", *id);
  REQUIRE(files);
  return *files;
}

} // namespace

TEST_CASE("security: a CAF peer without a cluster certificate gets no connection") {
  cluster_fixture fx;
  pid_t head = start_head(fx);
  {
    actors::system_config cfg; // plain CAF, as before TLS
    msg::add_message_types(cfg);
    caf::actor_system sys{cfg};
    auto plain = sys.middleman().remote_actor("127.0.0.1", fx.port());
    CHECK_FALSE(plain);
  }
  {
    // A certificate of another CA: refused in the TLS handshake.
    auto ca = cluster::tls::open_ca(fx.dir("evil") / "ca");
    REQUIRE(ca);
    auto id = cluster::tls::issue_identity(*ca, "intruder");
    REQUIRE(id);
    auto files = cluster::tls::write_identity(fx.dir("evil") / "tls", "node", *id);
    REQUIRE(files);
    actors::system_config cfg{*files};
    msg::add_message_types(cfg);
    caf::actor_system sys{cfg};
    caf::scoped_actor self{sys};
    bool connected = false;
    self->request(actors::connector(sys), 5s, caf::connect_atom::value, std::string("127.0.0.1"),
                  fx.port())
        .receive([&](const caf::node_id&, caf::strong_actor_ptr& p,
                     const std::set<std::string>&) { connected = p != nullptr; },
                 [&](caf::error&) {});
    CHECK_FALSE(connected);
  }
  // Garbage at the join bootstrap: refused, logged, nothing issued.
  int fd = tcp_connect(cluster::tls::bootstrap_port(fx.port()));
  REQUIRE(fd >= 0);
  const std::string junk = "GET / HTTP/1.0\r\n\r\n";
  CHECK(write(fd, junk.data(), junk.size()) == static_cast<ssize_t>(junk.size()));
  close(fd);
  std::this_thread::sleep_for(500ms);
  CHECK(alive(head));
  auto nodes = fx.nodes();
  CHECK(nodes.size() == 1); // nobody joined
  auto log = read_file(fx.dir("head") / "foreground.log");
  CHECK(log.find("joined from") != std::string::npos); // only the head's own node
  CHECK(log.find("intruder") == std::string::npos);
}

TEST_CASE("security: forged BASP headers with huge payload lengths leave the head's memory flat") {
  cluster_fixture fx;
  pid_t head = start_head(fx);
  const long before = rss_kib(head);
  REQUIRE(before > 0);
  // A BASP header (32 bytes) announcing a 4 GiB - 1 payload, on three connections, sent raw.
  unsigned char hdr[32] = {};
  hdr[0] = 1; // client handshake
  hdr[4] = hdr[5] = hdr[6] = hdr[7] = 0xff;
  std::vector<int> fds;
  for (int i = 0; i < 3; ++i) {
    int fd = tcp_connect(fx.port());
    REQUIRE(fd >= 0);
    CHECK(write(fd, hdr, sizeof hdr) == static_cast<ssize_t>(sizeof hdr));
    fds.push_back(fd);
  }
  std::this_thread::sleep_for(2s);
  const long after = rss_kib(head);
  for (int fd : fds)
    close(fd);
  MESSAGE("head RSS before ", before, " KiB, after ", after, " KiB");
  CHECK(after - before < 64 * 1024);
  CHECK(alive(head));
  CHECK(fx.nodes().size() == 1);
}

TEST_CASE("security: a certified peer sending other roles' messages changes nothing") {
  cluster_fixture fx;
  pid_t head = start_head(fx);
  const auto before = fx.nodes();
  REQUIRE(before.size() == 1);
  const std::string head_node = before.begin()->first;
  const auto files = certificate(fx, "rogue", fx.dir("rogue") / "tls");
  actors::system_config cfg{files};
  msg::add_message_types(cfg);
  caf::actor_system sys{cfg};
  caf::scoped_actor self{sys};
  caf::actor target;
  self->request(actors::connector(sys), 10s, caf::connect_atom::value, std::string("127.0.0.1"),
                fx.port())
      .receive([&](const caf::node_id&, caf::strong_actor_ptr& p,
                   const std::set<std::string>&) { target = caf::actor_cast<caf::actor>(p); },
               [&](caf::error& e) { FAIL("TLS connect failed: ", sys.render(e)); });
  REQUIRE(target);
  // Join as a node: this process is now a node's.
  cluster::node_info info;
  info.node_id = "rogue";
  info.address = "127.0.0.1";
  info.hostname = "rogue";
  bool joined = false;
  self->request(target, 10s, msg::join_atom::value,
                msg::join_request{fx.token(), version_of(fx), info})
      .receive([&](const msg::join_reply&) { joined = true; },
               [&](caf::error& e) { FAIL("join failed: ", sys.render(e)); });
  REQUIRE(joined);
  // A node's process may not deploy, undeploy or stop, token or not.
  deployment_config dc;
  dc.model = "/nonexistent";
  dc.served_model_name = "rogue";
  std::string refused;
  self->request(target, 10s, msg::deploy_atom::value, fx.token(), dc)
      .receive([&](const msg::deployment_view&) { refused = "accepted"; },
               [&](caf::error& e) { refused = sys.render(e); });
  CHECK(refused.find("not accepted") != std::string::npos);
  self->request(target, 10s, msg::stop_atom::value, fx.token(), 0.0)
      .receive([&](bool) { refused = "accepted"; },
               [&](caf::error& e) { refused = sys.render(e); });
  CHECK(refused.find("not accepted") != std::string::npos);
  // Messages of the head's own roles and of other nodes: dropped.
  self->send(target, msg::failed_atom::value, std::string("rogue"), std::string("ns"),
             std::string("forged"));
  self->send(target, msg::tick_atom::value);
  self->send(target, msg::restart_atom::value);
  bool known = true;
  self->request(target, 5s, msg::leave_atom::value, head_node, uint64_t{0})
      .receive([&](bool ok) { known = ok; }, [&](caf::error&) {});
  CHECK_FALSE(known);
  // CAF system messages: kill, a forged down message about the head's node, a bare error.
  self->send(target, caf::down_msg{target.address(), caf::exit_reason::kill});
  self->send(target, caf::make_error(caf::sec::runtime_error));
  self->send_exit(target, caf::exit_reason::kill);
  std::this_thread::sleep_for(1s);
  CHECK(alive(head));
  auto after = fx.nodes();
  REQUIRE(after.count(head_node) == 1);
  CHECK(after[head_node]["state"] == "alive");
  auto log = read_file(fx.dir("head") / "foreground.log");
  for (const char* what :
       {"refused deploy (from a node's process)", "refused stop (from a node's process)",
        "refused failed for deployment 'rogue'", "refused tick", "refused restart",
        "refused leave for node", "refused an exit message", "refused a down message",
        "refused a bare error message"})
    CHECK_MESSAGE(log.find(what) != std::string::npos, what);
  // Rate-limited per peer and kind: five more forged ticks make no line.
  auto count = [](const std::string& text, const std::string& what) {
    size_t n = 0;
    for (size_t at = 0; (at = text.find(what, at)) != std::string::npos; ++at)
      ++n;
    return n;
  };
  const size_t ticks = count(log, "refused tick");
  CHECK(ticks == 1);
  for (int i = 0; i < 5; ++i)
    self->send(target, msg::tick_atom::value);
  std::this_thread::sleep_for(500ms);
  CHECK(count(read_file(fx.dir("head") / "foreground.log"), "refused tick") == ticks);
}

TEST_CASE("security: a wrong token or CA fingerprint at join is refused with a clear error") {
  cluster_fixture fx;
  start_head(fx);
  auto wrong_token = fx.cluster({"join", fx.head_address(), "--token", "wrong", "--ca-sha256",
                                 fx.ca_sha256(), "--temp-dir", fx.dir("w1").string()});
  CHECK(wrong_token.exit_code == 3);
  CHECK(wrong_token.output.find("wrong cluster token") != std::string::npos);
  auto wrong_ca = fx.cluster({"join", fx.head_address(), "--token", fx.token(), "--ca-sha256",
                              std::string(64, 'a'), "--temp-dir", fx.dir("w2").string()});
  CHECK(wrong_ca.exit_code == 3);
  CHECK(wrong_ca.output.find("does not have the fingerprint") != std::string::npos);
  auto no_ca = fx.cluster(
      {"join", fx.head_address(), "--token", fx.token(), "--temp-dir", fx.dir("w3").string()});
  CHECK(no_ca.exit_code == 2);
  CHECK(no_ca.output.find("--ca-sha256") != std::string::npos);
  CHECK(fx.nodes().size() == 1);
}
