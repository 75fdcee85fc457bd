// How a disaggregated deployment's KV moves between node processes: by CUDA IPC when every rank
// of both groups runs on one host with GPU KV (kv_cuda_ipc_host), and what refuses that path.
#include <doctest/doctest.h>

#include <vector>

#include "actors/serving/kv_net.hpp"
#include "actors/serving/kv_rank_endpoint.hpp"
#include "cluster/membership.hpp"
#include "engine/backend/cuda/cuda_device.hpp"

using namespace troupe;

namespace {

deployment_config disaggregated(const char* device, const char* provider, const char* staging) {
  deployment_config c;
  c.device = device;
  c.disaggregation.enabled = true;
  c.disaggregation.provider = provider;
  c.disaggregation.staging = staging;
  return c;
}

} // namespace

TEST_CASE("kv path: CUDA IPC only for GPU KV with every rank on one host over auto or socket") {
  const std::string a = "gpu-box/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
  const std::string b = "gpu-box2/11111111-2222-3333-4444-555555555555";
  const std::vector<std::string> one_host = {a, a, a};
  const auto ipc = serve::kv_cuda_ipc_host;
  CHECK(ipc(disaggregated("cuda", "auto", "auto"), one_host) == a);
  CHECK(ipc(disaggregated("cuda", "socket", "auto"), one_host) == a);
  CHECK(ipc(disaggregated("cuda", "auto", "never"), one_host) == a);
  // Everything else keeps the provider (staging GPU KV where it must).
  CHECK(ipc(disaggregated("cuda", "auto", "always"), one_host).empty());
  CHECK(ipc(disaggregated("cuda", "tcp", "auto"), one_host).empty());
  CHECK(ipc(disaggregated("cuda", "verbs", "auto"), one_host).empty());
  CHECK(ipc(disaggregated("cuda", "local", "auto"), one_host).empty());
  CHECK(ipc(disaggregated("cpu", "auto", "auto"), one_host).empty());
  CHECK(ipc(disaggregated("cuda", "auto", "auto"), std::vector<std::string>{a, b}).empty());
  CHECK(ipc(disaggregated("cuda", "auto", "auto"), std::vector<std::string>{a, ""}).empty());
  CHECK(ipc(disaggregated("cuda", "auto", "auto"), std::vector<std::string>{"", ""}).empty());
  CHECK(ipc(disaggregated("cuda", "auto", "auto"), std::vector<std::string>{}).empty());
  auto colocated = disaggregated("cuda", "auto", "auto");
  colocated.disaggregation.enabled = false;
  CHECK(ipc(colocated, one_host).empty());
}

TEST_CASE("kv path: a node's host identity is its hostname and boot id, unknown without one") {
  cluster::node_info n;
  n.hostname = "gpu-box";
  CHECK(cluster::host_identity(n).empty());
  n.resources.boot_id = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
  CHECK(cluster::host_identity(n) == "gpu-box/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
  // Two containers on one kernel share the boot id but not the hostname: not one host here.
  cluster::node_info m = n;
  m.hostname = "other-container";
  CHECK(cluster::host_identity(m) != cluster::host_identity(n));
}

TEST_CASE("kv path: the CUDA IPC transport is the socket one, and only where CUDA is usable") {
  auto tcp = serve::open_net_transport("tcp", "127.0.0.1", true);
  REQUIRE(!tcp);
  CHECK(tcp.error().code() == errc::invalid_argument);
  CHECK(tcp.error().message().find("socket transport") != std::string::npos);
  auto devices = engine::cuda_devices();
  const bool gpu = devices && !devices->empty();
  auto t = serve::open_net_transport("auto", "127.0.0.1", true);
  CHECK(t.has_value() == gpu);
  if (t)
    CHECK((*t).transport->name() == "socket");
  else
    MESSAGE("no CUDA device here: " << t.error().to_string());
  // Never staged: IPC and `staging: always` exclude each other.
  engine::kv_layout layout;
  auto e = serve::kv_rank_endpoint::open({.role = "decode",
                                          .provider = "auto",
                                          .host = "127.0.0.1",
                                          .staging = "always",
                                          .staging_tokens = 64,
                                          .cuda_ipc = true},
                                         layout, 0);
  REQUIRE(!e);
  CHECK(e.error().code() == errc::invalid_argument);
  CHECK(e.error().message().find("never staged") != std::string::npos);
}
