// Tokenizer benchmark (bench/tokenizer_bench.py runs it beside HF `tokenizers`): single-thread
// encode throughput over a JSONL corpus of documents. Prints one JSON line: bytes, tokens, seconds.
#include <chrono>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/tokenizer/tokenizer.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: tokenizer_bench TOKENIZER_JSON CORPUS_JSONL\n";
    return 2;
  }
  auto tok = troupe::engine::tokenizer::from_file(argv[1]);
  if (!tok) {
    std::cerr << "error: " << tok.error().to_string() << "\n";
    return 1;
  }
  std::vector<std::string> docs;
  std::ifstream in(argv[2]);
  size_t bytes = 0;
  for (std::string line; std::getline(in, line);) {
    docs.push_back(nlohmann::json::parse(line).get<std::string>());
    bytes += docs.back().size();
  }
  double best = 1e30;
  size_t tokens = 0;
  for (int rep = 0; rep < 3; ++rep) { // first pass also warms the word cache, as HF's
    tokens = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& d : docs)
      tokens += tok->encode(d)->size();
    best = std::min(best,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::cout << nlohmann::json{{"bytes", bytes}, {"tokens", tokens}, {"seconds", best}}.dump()
            << "\n";
  return 0;
}
