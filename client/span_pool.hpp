// span_pool.hpp: the lock-free per-process pool of spans (span_pool) and
// its next links (span_links). Spans this process holds but no thread
// caches wait here per span class: refills pool what they do not use,
// threads pop before they ask the daemon, trims push the surplus to the
// full list. Header-only, as it was in the one file: push and pop are on
// every span switch and stay inlined into the slow path.
#pragma once

#include <sys/mman.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "shm/layout.hpp"

namespace shmalloc::client {
namespace detail __attribute__((visibility("hidden"))) {

// The pool's next links, one per span id the heap may ever have. Mapped,
// not allocated: a process pays only for the pages of the ids it pools.
// (new[] zeroed every link at attach: 2 MiB for a 4 GiB heap, 512 MiB for
// a 1 TiB one.)
class span_links {
 public:
  span_links() = default;
  span_links(const span_links&) = delete;
  span_links& operator=(const span_links&) = delete;
  ~span_links() { unmap(); }
  bool map(std::uint32_t count) noexcept {
    unmap();
    const std::size_t bytes = std::size_t{count} * sizeof(std::uint32_t);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    links_ = static_cast<std::uint32_t*>(p);
    bytes_ = bytes;
    return true;
  }
  std::atomic_ref<std::uint32_t> operator[](std::uint32_t id) const noexcept {
    return std::atomic_ref<std::uint32_t>(links_[id]);
  }

 private:
  void unmap() noexcept {
    if (links_ != nullptr) munmap(links_, bytes_);
    links_ = nullptr;
    bytes_ = 0;
  }
  std::uint32_t* links_ = nullptr;
  std::size_t bytes_ = 0;
};

// Per span class, a lock-free stack of spans this process holds but no
// thread caches (Treiber stack; the upper 32 bits of the head are a tag
// that changes on every operation, so a stale head never wins a CAS).
class span_pool {
 public:
  bool reset(std::uint32_t max_spans) noexcept {
    clear();
    return next_.map(max_spans);
  }
  // Spans in the pool for spc (approximate under concurrency: a bound, not
  // an invariant).
  std::uint32_t size(std::uint8_t spc) const noexcept { return size_[spc].load(std::memory_order_relaxed); }
  void push(std::uint8_t spc, std::uint32_t id) noexcept {
    size_[spc].fetch_add(1, std::memory_order_relaxed);
    std::uint64_t old = head_[spc].load(std::memory_order_relaxed);
    std::uint64_t desired;
    do {
      next_[id].store(static_cast<std::uint32_t>(old), std::memory_order_relaxed);
      desired = (((old >> 32) + 1) << 32) | (id + 1);
    } while (!head_[spc].compare_exchange_weak(old, desired, std::memory_order_release, std::memory_order_relaxed));
  }
  // A span id, or -1 if the pool is empty.
  std::int64_t pop(std::uint8_t spc) noexcept {
    std::uint64_t old = head_[spc].load(std::memory_order_acquire);
    for (;;) {
      const auto top = static_cast<std::uint32_t>(old);
      if (top == 0) return -1;
      const std::uint64_t desired = (((old >> 32) + 1) << 32) | next_[top - 1].load(std::memory_order_relaxed);
      if (head_[spc].compare_exchange_weak(old, desired, std::memory_order_acquire, std::memory_order_acquire)) {
        size_[spc].fetch_sub(1, std::memory_order_relaxed);
        return top - 1;
      }
    }
  }
  void clear() noexcept {
    for (auto& h : head_) h.store(0, std::memory_order_relaxed);
    for (auto& n : size_) n.store(0, std::memory_order_relaxed);
  }

 private:
  span_links next_;
  std::atomic<std::uint64_t> head_[num_span_classes] = {};
  std::atomic<std::uint32_t> size_[num_span_classes] = {};
};

}  // namespace detail
}  // namespace shmalloc::client
