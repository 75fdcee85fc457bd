// Gloo ranks meeting through the head's KV store: head_rendezvous_store against a real head_actor
// (one process, one CAF system), two ranks on their own threads.
#include <doctest/doctest.h>

#include <future>

#include <caf/actor_system.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/caf_glue.hpp"
#include "actors/head_actor.hpp"
#include "actors/head_rendezvous_store.hpp"
#include "actors/messages.hpp"

using namespace troupe;
using namespace std::chrono_literals;

namespace {

struct head_fixture {
  actors::system_config cfg;
  caf::actor_system sys;
  caf::actor head;
  head_fixture() : sys((msg::add_message_types(cfg), cfg)) {
    head = sys.spawn(actors::head_actor, actors::head_config{.token = "tok",
                                                             .version = "1.0",
                                                             .membership = {.dead_after = 600ms},
                                                             .heartbeat = 100ms,
                                                             .tick = 20ms});
  }
  ~head_fixture() {
    caf::scoped_actor self{sys};
    self->send_exit(head, caf::exit_reason::user_shutdown);
  }
};

} // namespace

TEST_CASE("head rendezvous store: two Gloo ranks meet through the head and all-reduce") {
  head_fixture fx;
  auto rank = [&](int r) -> std::string {
    actors::head_rendezvous_store store(fx.sys, fx.head, "tok", "deployment-1");
    auto c = engine::comm::make_gloo_communicator(store, r, 2, {.prefix = "tp0", .timeout = 10s});
    if (!c)
      return c.error().to_string();
    std::vector<float> x{1.0f + static_cast<float>(r), 10.0f};
    if (auto ok = (*c)->all_reduce_sum(x); !ok)
      return ok.error().to_string();
    return x == std::vector<float>{3.0f, 20.0f} ? "" : "wrong sum";
  };
  auto other = std::async(std::launch::async, rank, 1);
  CHECK(rank(0) == "");
  CHECK(other.get() == "");
}

TEST_CASE("head rendezvous store: a key nobody sets times out with an error naming it") {
  head_fixture fx;
  actors::head_rendezvous_store store(fx.sys, fx.head, "tok", "deployment-1");
  auto r = store.wait({"never"}, 200ms);
  REQUIRE_FALSE(r.has_value());
  INFO(r.error().to_string());
  CHECK(r.error().to_string().find("never") != std::string::npos);
  actors::head_rendezvous_store wrong(fx.sys, fx.head, "bad-token", "deployment-1");
  CHECK_FALSE(wrong.set("k", {'x'}).has_value());
}
