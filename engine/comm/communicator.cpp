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
  expected<void> all_to_all(std::span<const float> send, std::span<const int64_t> send_counts,
                            std::span<float> recv, std::span<const int64_t> recv_counts) override {
    TROUPE_TRY_VOID(check_all_to_all(1, send.size(), send_counts, recv.size(), recv_counts));
    std::copy(send.begin(), send.end(), recv.begin());
    return {};
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

expected<std::pair<int64_t, int64_t>> all_to_all_totals(int size,
                                                        std::span<const int64_t> send_counts,
                                                        std::span<const int64_t> recv_counts) {
  if (send_counts.size() != static_cast<size_t>(size) ||
      recv_counts.size() != static_cast<size_t>(size))
    return make_error(errc::invalid_argument,
                      "all_to_all: {} send and {} receive counts for a group of {}",
                      send_counts.size(), recv_counts.size(), size);
  int64_t out = 0, in = 0;
  for (int r = 0; r < size; ++r) {
    if (send_counts[static_cast<size_t>(r)] < 0 || recv_counts[static_cast<size_t>(r)] < 0)
      return make_error(errc::invalid_argument, "all_to_all: a negative count for rank {}", r);
    out += send_counts[static_cast<size_t>(r)];
    in += recv_counts[static_cast<size_t>(r)];
  }
  return std::pair{out, in};
}

expected<void> check_all_to_all(int size, size_t send_floats, std::span<const int64_t> send_counts,
                                size_t recv_floats, std::span<const int64_t> recv_counts) {
  auto totals = all_to_all_totals(size, send_counts, recv_counts);
  if (!totals)
    return std::move(totals).error();
  if (static_cast<int64_t>(send_floats) != totals->first ||
      static_cast<int64_t>(recv_floats) != totals->second)
    return make_error(errc::invalid_argument,
                      "all_to_all: buffers of {} and {} floats, the counts say {} and {}",
                      send_floats, recv_floats, totals->first, totals->second);
  return {};
}

std::unique_ptr<communicator> make_single_rank_communicator() {
  return std::make_unique<single_rank_communicator>();
}

std::unique_ptr<rendezvous_store> make_folder_store(std::string folder) {
  return std::make_unique<folder_store>(std::move(folder));
}

} // namespace troupe::engine::comm
