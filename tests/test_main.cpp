// The doctest main shared by every test executable. CTest runs each test case on its own
// (--test-case=NAME); a name that matches nothing (CTest splits names at ';') would pass
// silently, so a run whose filter selects no test case fails.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <functional>
#include <string_view>
#include <vector>

#include "golden.hpp"

namespace {

unsigned selected = 0;

struct selection_listener : doctest::IReporter {
  explicit selection_listener(const doctest::ContextOptions&) {}
  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_run_end(const doctest::TestRunStats& s) override {
    selected = s.numTestCasesPassingFilters;
  }
  void test_case_start(const doctest::TestCaseData&) override {}
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}
};

REGISTER_LISTENER("selection", 1, selection_listener);

std::vector<std::function<void()>>& teardowns() {
  static std::vector<std::function<void()>> t;
  return t;
}

} // namespace

void troupe::test::at_teardown(std::function<void()> f) {
  teardowns().push_back(std::move(f));
}

int main(int argc, char** argv) {
  doctest::Context context(argc, argv);
  const int result = context.run();
  for (auto& t = teardowns(); !t.empty(); t.pop_back())
    t.back()();
  if (context.shouldExit())
    return result;
  bool filtered = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    filtered |= a.starts_with("--test-case=") || a.starts_with("-tc=");
  }
  if (filtered && selected == 0) {
    std::fprintf(stderr, "test: the --test-case filter selected no test case\n");
    return result == 0 ? 1 : result;
  }
  return result;
}
