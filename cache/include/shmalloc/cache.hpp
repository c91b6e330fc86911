// cache.hpp: the C++ API of the shared cache, on top of cache.h.
//
//   auto c = shmalloc::cache::open("sessions", 64 << 20);
//   c.put("user:42", payload, std::chrono::seconds(30));
//   if (auto v = c.get("user:42")) use(v->bytes());   // zero copy, pinned
//   std::string copy; c.get_copy("user:42", copy);
//
// A view pins its value for as long as it lives (and holds back the freeing
// of values replaced meanwhile: keep views short). Views belong to the thread
// that made them; destroy them on that thread.
// Errors: std::system_error with shmalloc's category (client_category());
// a miss is not an error.
#pragma once

#if __cplusplus < 202002L
#error "shmalloc/cache.hpp needs C++20 (-std=c++20, or CMake's cxx_std_20): it uses std::span. From C or older C++, use shmalloc/cache.h"
#endif

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "shmalloc/cache.h"
#include "shmalloc/shmalloc.hpp"

namespace shmalloc {

class cache {
 public:
  using stats_type = shmalloc_cache_stats;

  // A pinned value in the shared heap.
  class view {
   public:
    view(view&& o) noexcept : cache_(std::exchange(o.cache_, nullptr)), data_(o.data_), size_(o.size_) {}
    view& operator=(view&&) = delete;
    view(const view&) = delete;
    ~view() {
      if (cache_ != nullptr) shmalloc_cache_unpin(cache_);
    }
    std::string_view str() const noexcept { return {static_cast<const char*>(data_), size_}; }
    std::span<const std::byte> bytes() const noexcept { return {static_cast<const std::byte*>(data_), size_}; }
    std::size_t size() const noexcept { return size_; }

   private:
    friend class cache;
    view(shmalloc_cache* c, const void* d, std::size_t n) noexcept : cache_(c), data_(d), size_(n) {}
    shmalloc_cache* cache_;
    const void* data_;
    std::size_t size_;
  };

  // Opens name, creating it with max_bytes if absent (0: must exist).
  static cache open(std::string_view name, std::uint64_t max_bytes = 0) {
    shmalloc_cache* c = nullptr;
    const std::string n(name);
    check(shmalloc_cache_open(n.c_str(), max_bytes, &c), "shmalloc cache open");
    return cache(c);
  }
  cache(cache&& o) noexcept : c_(std::exchange(o.c_, nullptr)) {}
  cache& operator=(cache&& o) noexcept {
    std::swap(c_, o.c_);
    return *this;
  }
  cache(const cache&) = delete;
  ~cache() {
    if (c_ != nullptr) shmalloc_cache_close(c_);
  }

  std::optional<view> get(std::string_view key) const {
    const void* v = nullptr;
    std::size_t n = 0;
    const int rc = shmalloc_cache_pin(c_, key.data(), key.size(), &v, &n);
    if (rc == -7) return std::nullopt;
    check(rc, "shmalloc cache get");
    return view(c_, v, n);
  }

  // Copies the value into out; false on a miss.
  bool get_copy(std::string_view key, std::string& out) const {
    auto v = get(key);
    if (!v) return false;
    out.assign(v->str());
    return true;
  }

  void put(std::string_view key, std::string_view value, std::chrono::milliseconds ttl = {}) {
    check(shmalloc_cache_put(c_, key.data(), key.size(), value.data(), value.size(),
                             static_cast<std::uint64_t>(ttl.count() > 0 ? ttl.count() : 0)),
          "shmalloc cache put");
  }

  bool erase(std::string_view key) {
    const int rc = shmalloc_cache_erase(c_, key.data(), key.size());
    if (rc == -7) return false;
    check(rc, "shmalloc cache erase");
    return true;
  }

  stats_type stats() const {
    stats_type s{};
    check(shmalloc_cache_stats_get(c_, &s), "shmalloc cache stats");
    return s;
  }

  // Repairs what dead processes left; the number of problems it could not.
  int check() {
    const int rc = shmalloc_cache_check(c_);
    if (rc < 0) check(rc, "shmalloc cache check");
    return rc;
  }

  shmalloc_cache* native() const noexcept { return c_; }

 private:
  explicit cache(shmalloc_cache* c) noexcept : c_(c) {}
  static void check(int rc, const char* what) {
    if (rc != 0) throw std::system_error(-rc, client_category(), what);
  }
  shmalloc_cache* c_;
};

}  // namespace shmalloc
