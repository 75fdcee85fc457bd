#include <doctest/doctest.h>

#include "runtime/error.hpp"

using namespace troupe;

namespace {
expected<int> half(int x) {
  if (x % 2 != 0)
    return make_error(errc::invalid_argument, "{} is odd", x);
  return x / 2;
}
expected<void> check_even(int x) {
  TROUPE_TRY_VOID(half(x));
  return {};
}
} // namespace

TEST_CASE("expected carries a value or an error with context") {
  auto ok = half(8);
  REQUIRE(ok.has_value());
  CHECK(*ok == 4);
  auto bad = half(3);
  REQUIRE_FALSE(bad.has_value());
  CHECK(bad.error().code() == errc::invalid_argument);
  CHECK(bad.error().to_string() == "invalid_argument: 3 is odd");
  auto err = std::move(bad).error().context("halving");
  CHECK(err.message() == "halving: 3 is odd");
  CHECK(check_even(4).has_value());
  CHECK(check_even(5).error().message() == "5 is odd");
}
