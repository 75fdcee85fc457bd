#include "engine/comm/communicator.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

#include <fmt/format.h>

namespace troupe::engine::comm {

namespace {

class single_rank_communicator final : public communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  expected<void> all_reduce_sum(std::span<float>) override { return {}; }
  expected<void> all_gather(std::span<const float> in, std::span<float> out) override {
    if (out.size() != in.size())
      return make_error(errc::invalid_argument, "all_gather: output holds {} floats, expected {}",
                        out.size(), in.size());
    std::copy(in.begin(), in.end(), out.begin());
    return {};
  }
  expected<void> broadcast(std::span<float>, int root) override {
    if (root != 0)
      return make_error(errc::invalid_argument, "broadcast: no rank {}", root);
    return {};
  }
  expected<void> send(std::span<const float>, int to, uint32_t) override {
    return make_error(errc::invalid_argument, "send to rank {} in a group of one", to);
  }
  expected<void> recv(std::span<float>, int from, uint32_t) override {
    return make_error(errc::invalid_argument, "recv from rank {} in a group of one", from);
  }
  expected<void> barrier() override { return {}; }
};

// One file per key; keys may hold '/', which becomes '%'.
class folder_store final : public rendezvous_store {
 public:
  explicit folder_store(std::string folder) : folder_(std::move(folder)) {}

  expected<void> set(const std::string& key, const std::vector<char>& value) override {
    std::error_code ec;
    std::filesystem::create_directories(folder_, ec);
    auto path = file_of(key);
    auto tmp = path;
    tmp += fmt::format(".tmp{}", std::hash<std::thread::id>{}(std::this_thread::get_id()));
    {
      std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
      f.write(value.data(), static_cast<std::streamsize>(value.size()));
      if (!f)
        return make_error(errc::io_error, "rendezvous store: cannot write {}", tmp.string());
    }
    std::filesystem::rename(tmp, path, ec);
    if (ec)
      return make_error(errc::io_error, "rendezvous store: rename to {}: {}", path.string(),
                        ec.message());
    return {};
  }

  expected<std::vector<char>> get(const std::string& key,
                                  std::chrono::milliseconds timeout) override {
    TROUPE_TRY_VOID(wait({key}, timeout));
    std::ifstream f(file_of(key), std::ios::binary);
    if (!f)
      return make_error(errc::io_error, "rendezvous store: cannot read key {}", key);
    return std::vector<char>(std::istreambuf_iterator<char>(f), {});
  }

  expected<void> wait(const std::vector<std::string>& keys,
                      std::chrono::milliseconds timeout) override {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (const auto& key : keys) {
      while (!std::filesystem::exists(file_of(key))) {
        if (std::chrono::steady_clock::now() > deadline)
          return make_error(errc::timeout,
                            "rendezvous store {}: key {} did not appear within {} ms", folder_, key,
                            timeout.count());
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
    }
    return {};
  }

 private:
  std::filesystem::path file_of(std::string key) const {
    std::replace(key.begin(), key.end(), '/', '%');
    return std::filesystem::path(folder_) / key;
  }
  std::string folder_;
};

} // namespace

std::unique_ptr<communicator> make_single_rank_communicator() {
  return std::make_unique<single_rank_communicator>();
}

std::unique_ptr<rendezvous_store> make_folder_store(std::string folder) {
  return std::make_unique<folder_store>(std::move(folder));
}

} // namespace troupe::engine::comm
