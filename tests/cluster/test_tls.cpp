// cluster/tls: the cluster CA (files 0600, reused when present), certificates it issues, the CA
// fingerprint, and the join bootstrap on loopback: a wrong token, a pinned fingerprint that does
// not match, a bad name and an oversized request are refused (and counted), a right one gets a
// certificate for its own key, signed by the CA.
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <filesystem>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

#include "cluster/tls.hpp"

using namespace troupe;
namespace tls = troupe::cluster::tls;
namespace fs = std::filesystem;

namespace {

struct temp_dir {
  fs::path path = fs::temp_directory_path() / ("troupe_tls_" + std::to_string(getpid()));
  temp_dir() { fs::remove_all(path); }
  ~temp_dir() { fs::remove_all(path); }
};

unsigned mode_of(const fs::path& p) {
  struct stat st {};
  ::stat(p.c_str(), &st);
  return st.st_mode & 0777;
}

struct head_fixture {
  temp_dir dir;
  tls::certificate_authority ca;
  std::string fingerprint;
  std::unique_ptr<tls::bootstrap_server> server;
  head_fixture() {
    auto c = tls::open_ca(dir.path / "ca");
    REQUIRE(c);
    ca = *c;
    auto fp = tls::fingerprint(ca.cert_pem);
    REQUIRE(fp);
    fingerprint = *fp;
    auto id = tls::issue_identity(ca, "head");
    REQUIRE(id);
    auto s = tls::bootstrap_server::start("127.0.0.1", 0, ca, *id, "s3cret");
    REQUIRE_MESSAGE(s, s.error().message());
    server = std::move(*s);
  }
};

// A plain TCP connection to 127.0.0.1:port.
int connect_to(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  return fd;
}

} // namespace

TEST_CASE("tls: the CA is created 0600 once and reused") {
  temp_dir dir;
  auto a = tls::open_ca(dir.path / "ca");
  REQUIRE(a);
  CHECK(mode_of(dir.path / "ca") == 0700);
  CHECK(mode_of(dir.path / "ca" / "ca.key") == 0600);
  CHECK(mode_of(dir.path / "ca" / "ca.pem") == 0600);
  auto b = tls::open_ca(dir.path / "ca");
  REQUIRE(b);
  CHECK(a->cert_pem == b->cert_pem);
  auto fp = tls::fingerprint(a->cert_pem);
  REQUIRE(fp);
  CHECK(fp->size() == 64);
  auto id = tls::issue_identity(*a, "n1");
  REQUIRE(id);
  auto files = tls::write_identity(dir.path / "tls", "node", *id);
  REQUIRE(files);
  CHECK(mode_of(files->key) == 0600);
  CHECK(tls::find_identity(dir.path / "tls", "node"));
  tls::remove_identity(dir.path / "tls", "node");
  CHECK_FALSE(fs::exists(dir.path / "tls"));
}

TEST_CASE("tls: the join bootstrap issues a certificate only for the right token and CA") {
  head_fixture head;
  const uint16_t port = head.server->port();
  auto key = tls::new_private_key();
  REQUIRE(key);
  auto wrong = tls::bootstrap("127.0.0.1", port, "nope", head.fingerprint, "n1", *key);
  REQUIRE_FALSE(wrong);
  CHECK(wrong.error().code() == errc::invalid_argument);
  CHECK(wrong.error().message().find("wrong cluster token") != std::string::npos);
  auto pinned = tls::bootstrap("127.0.0.1", port, "s3cret", std::string(64, 'b'), "n1", *key);
  REQUIRE_FALSE(pinned);
  CHECK(pinned.error().message().find("does not have the fingerprint") != std::string::npos);
  auto bad_name = tls::bootstrap("127.0.0.1", port, "s3cret", head.fingerprint, "n 1", *key);
  REQUIRE_FALSE(bad_name);
  CHECK(bad_name.error().message().find("name must be") != std::string::npos);
  CHECK(head.server->issued() == 0);
  CHECK(head.server->refused() == 3);
  auto ok = tls::bootstrap("127.0.0.1", port, "s3cret", head.fingerprint, "n1", *key);
  REQUIRE_MESSAGE(ok, ok.error().message());
  CHECK(ok->ca_pem == head.ca.cert_pem);
  CHECK(ok->key_pem == *key);
  CHECK(head.server->issued() == 1);
  // Not a fingerprint at all: refused before connecting.
  auto malformed = tls::bootstrap("127.0.0.1", port, "s3cret", "abc", "n1", *key);
  REQUIRE_FALSE(malformed);
  CHECK(malformed.error().message().find("not a SHA-256 fingerprint") != std::string::npos);
}

TEST_CASE("tls: the join bootstrap survives garbage and silent clients") {
  head_fixture head;
  const uint16_t port = head.server->port();
  for (int i = 0; i < 3; ++i) {
    const int fd = connect_to(port);
    const char junk[] = "\x16\x03\x01\xff\xff not TLS at all";
    if (i != 0) // the first one sends nothing
      CHECK(write(fd, junk, sizeof junk) > 0);
    close(fd);
  }
  auto key = tls::new_private_key();
  REQUIRE(key);
  auto ok = tls::bootstrap("127.0.0.1", port, "s3cret", head.fingerprint, "n2", *key);
  CHECK_MESSAGE(ok.has_value(), (ok ? std::string() : ok.error().message()));
}

TEST_CASE("tls: clients that stall at the join bootstrap do not hold up a node joining") {
  head_fixture head;
  const uint16_t port = head.server->port();
  // Six connections that never say anything: each holds its server thread for the 5 s deadline.
  // Served one after another they would keep the node below waiting past its 10 s timeout.
  std::vector<int> silent;
  for (int i = 0; i < 6; ++i) {
    const int fd = connect_to(port);
    silent.push_back(fd);
  }
  auto key = tls::new_private_key();
  REQUIRE(key);
  auto ok = tls::bootstrap("127.0.0.1", port, "s3cret", head.fingerprint, "n3", *key);
  CHECK_MESSAGE(ok.has_value(), (ok ? std::string() : ok.error().message()));
  for (int fd : silent)
    close(fd);
}

TEST_CASE("tls: secrets compare equal only when equal") {
  CHECK(tls::same_secret("abc", "abc"));
  CHECK_FALSE(tls::same_secret("abc", "abd"));
  CHECK_FALSE(tls::same_secret("abc", "abcd"));
  CHECK(tls::same_secret("", ""));
}
