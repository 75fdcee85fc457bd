// Fuzz harness: control-plane message payloads as a peer's bytes reach the head: a caf::message
// read by caf::binary_deserializer against an actor system with every troupe message type
// registered (actors/messages.hpp add_message_types), as the middleman decodes a BASP payload.
// TROUPE_FUZZ_WRITE_SEEDS=DIR writes one serialized message of each kind there (the seeds).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/binary_deserializer.hpp>
#include <caf/binary_serializer.hpp>
#include <caf/message.hpp>

#include "actors/messages.hpp"

namespace {

using namespace troupe;
using namespace troupe::msg;

// Made once and never destroyed: CAF's actor system does not survive static destruction order.
caf::actor_system& sys() {
  static caf::actor_system* s = [] {
    auto* cfg = new caf::actor_system_config;
    add_message_types(*cfg);
    cfg->set("scheduler.max-threads", 1);
    return new caf::actor_system{*cfg};
  }();
  return *s;
}

std::vector<caf::message> seed_messages() {
  step_plan plan;
  plan.step = 7;
  seq_step s;
  s.id = 3;
  s.tokens = {1, 2, 3};
  s.block_table = {0, 1};
  s.num_prompt_tokens = 3;
  s.first_step = true;
  plan.seqs.push_back(s);
  worker_reply reply;
  reply.rank = 1;
  reply.ticket = 9;
  reply.result.step = 7;
  reply.kv.endpoint = "tcp://127.0.0.1:1";
  reply.kv.regions = {{1, 2, 3}};
  deployment_config config;
  config.model = "/models/m";
  config.disaggregation.enabled = true;
  worker_spec spec;
  spec.deployment = "m";
  spec.ns = "deploy/m/1/r0";
  join_request join;
  join.token = "0123456789abcdef0123456789abcdef";
  join.version = "0.1.0";
  join.info.node_id = "n1";
  join.info.resources.gpus.push_back({});
  return {
      caf::make_message(join_atom::value, join),
      caf::make_message(heartbeat_atom::value, std::string("n1"), uint64_t{42}),
      caf::make_message(kv_set_atom::value, std::string("tok"), std::string("ns"),
                        std::string("key"), std::string("value")),
      caf::make_message(kv_wait_atom::value, std::string("tok"), std::string("ns"),
                        std::string("key"), int64_t{1000}),
      caf::make_message(deploy_atom::value, std::string("tok"), config),
      caf::make_message(execute_atom::value, uint64_t{9}, plan),
      caf::make_message(spawn_atom::value, spec),
      caf::make_message(reply),
      caf::make_message(failed_atom::value, std::string("m"), std::string("ns"),
                        std::string("why")),
      caf::make_message(ready_atom::value, std::string("m"), std::string("failed")),
      caf::make_message(tick_atom::value),
  };
}

} // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* dir = std::getenv("TROUPE_FUZZ_WRITE_SEEDS");
  if (dir == nullptr)
    return 0;
  int i = 0;
  for (const auto& m : seed_messages()) {
    std::vector<char> buf;
    caf::binary_serializer sink{sys(), buf};
    if (auto err = sink(const_cast<caf::message&>(m)))
      std::abort();
    std::ofstream(std::string(dir) + "/seed_" + std::to_string(i++), std::ios::binary)
        .write(buf.data(), static_cast<std::streamsize>(buf.size()));
  }
  std::exit(0);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  caf::binary_deserializer source{sys(), reinterpret_cast<const char*>(data), size};
  caf::message msg;
  if (auto err = source(msg))
    return 0;
  (void)caf::to_string(msg); // what a log line of the message prints
  return 0;
}
