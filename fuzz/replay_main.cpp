// The replay driver of the fuzz harnesses in the normal build (no clang, no libFuzzer): runs
// LLVMFuzzerTestOneInput over every file of the folders and files given, as CTest's
// fuzz_replay_* tests do with fuzz/corpus/<harness>/ (seeds and the inputs that once crashed).
// A crash, a sanitizer report or a hang (CTest's timeout) fails the test.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) __attribute__((weak));

namespace fs = std::filesystem;

namespace {

bool run_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "replay: cannot read %s\n", p.c_str());
    return false;
  }
  const std::vector<char> bytes{std::istreambuf_iterator<char>(in), {}};
  std::fprintf(stderr, "replay: %s (%zu bytes)\n", p.c_str(), bytes.size());
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  return true;
}

} // namespace

int main(int argc, char** argv) {
  if (LLVMFuzzerInitialize)
    LLVMFuzzerInitialize(&argc, &argv);
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR_OR_FILE...\n", argv[0]);
    return 2;
  }
  size_t n = 0;
  for (int i = 1; i < argc; ++i) {
    const fs::path arg = argv[i];
    if (fs::is_directory(arg)) {
      std::vector<fs::path> files;
      for (const auto& e : fs::recursive_directory_iterator(arg))
        if (e.is_regular_file())
          files.push_back(e.path());
      std::sort(files.begin(), files.end());
      for (const auto& f : files)
        n += run_file(f) ? 1 : 0;
    } else if (run_file(arg)) {
      ++n;
    } else {
      return 1;
    }
  }
  if (n == 0) { // an empty corpus would make the test pass without running anything
    std::fprintf(stderr, "replay: no input files found\n");
    return 1;
  }
  std::fprintf(stderr, "replay: %zu inputs, no crash\n", n);
  return 0;
}
