// span_pool.hpp: the lock-free per-process pool of spans (span_pool) and
// its next links (span_links). Spans this process holds but no thread
// caches wait here per span class, in order: refills pool what they do not
// use, parked spans freed into come back here, threads pop before they ask
// the daemon, trims push the surplus to the full list. Header-only, as it was in the one file: push and pop are on
// every span switch and stay inlined into the slow path.
#pragma once

#include <sys/mman.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// Per span class, a lock-free queue of spans this process holds but no
// thread caches, first in first out by batches: pushes go on an "in"
// stack, pops come off an "out" stack, and a pop that finds "out" empty
// takes "in" whole, reverses it and puts it on "out". Order matters: a
// stack hands out the spans pushed last again and again, and those at its
// bottom are never taken while their objects are freed one by one (a
// server's working set left three times its live bytes in such spans). In
// order, each span waits its turn and is taken with what was freed into it
// meanwhile. Both stacks are Treiber stacks whose heads carry a tag in
// their upper 32 bits that changes on every operation, so a stale head
// never wins a compare-exchange; taking a whole stack is an exchange, which
// has no ABA.
inline void cpu_relax() noexcept {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

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
    splice(in_[spc], id, id);
  }
  // A span id, or -1 if the pool is empty.
  std::int64_t pop(std::uint8_t spc) noexcept {
    std::int64_t id = pop_from(out_[spc]);
    if (id < 0 && refill_out(spc)) id = pop_from(out_[spc]);
    // Both stacks empty while another thread moves "in" to "out": a few
    // microseconds of a reversal are worth waiting for, a round trip to the
    // daemon is not. Bounded: a mover that was preempted is not waited for.
    for (int spin = 0; id < 0 && moving_[spc].load(std::memory_order_acquire) != 0 && spin < 4096; ++spin) {
      cpu_relax();
      id = pop_from(out_[spc]);
    }
    if (id >= 0) size_[spc].fetch_sub(1, std::memory_order_relaxed);
    return id;
  }
  void clear() noexcept {
    for (auto& h : in_) h.store(0, std::memory_order_relaxed);
    for (auto& h : out_) h.store(0, std::memory_order_relaxed);
    for (auto& n : size_) n.store(0, std::memory_order_relaxed);
  }

 private:
  static std::uint64_t tagged(std::uint64_t old, std::uint32_t top) noexcept { return (((old >> 32) + 1) << 32) | top; }

  // Puts the chain first .. last (linked through next_, ids) on top of head.
  void splice(std::atomic<std::uint64_t>& head, std::uint32_t first, std::uint32_t last) noexcept {
    std::uint64_t old = head.load(std::memory_order_relaxed);
    do {
      next_[last].store(static_cast<std::uint32_t>(old), std::memory_order_relaxed);
    } while (!head.compare_exchange_weak(old, tagged(old, first + 1), std::memory_order_release, std::memory_order_relaxed));
  }
  std::int64_t pop_from(std::atomic<std::uint64_t>& head) noexcept {
    std::uint64_t old = head.load(std::memory_order_acquire);
    for (;;) {
      const auto top = static_cast<std::uint32_t>(old);
      if (top == 0) return -1;
      if (head.compare_exchange_weak(old, tagged(old, next_[top - 1].load(std::memory_order_relaxed)),
                                     std::memory_order_acquire, std::memory_order_acquire))
        return top - 1;
    }
  }
  // Takes "in" whole (it is then this thread's alone), reverses it in place
  // and puts it on "out": oldest on top. False if "in" was empty.
  bool refill_out(std::uint8_t spc) noexcept {
    std::uint64_t old = in_[spc].load(std::memory_order_relaxed);
    while (static_cast<std::uint32_t>(old) != 0 &&
           !in_[spc].compare_exchange_weak(old, tagged(old, 0), std::memory_order_acquire, std::memory_order_relaxed)) {
    }
    std::uint32_t node = static_cast<std::uint32_t>(old);  // id + 1
    if (node == 0) return false;
    moving_[spc].fetch_add(1, std::memory_order_relaxed);
    const std::uint32_t last = node - 1;  // the newest: last of the reversed chain
    std::uint32_t reversed = 0;
    while (node != 0) {
      const std::uint32_t next = next_[node - 1].load(std::memory_order_relaxed);
      next_[node - 1].store(reversed, std::memory_order_relaxed);
      reversed = node;
      node = next;
    }
    splice(out_[spc], reversed - 1, last);
    moving_[spc].fetch_sub(1, std::memory_order_release);
    return true;
  }

  span_links next_;
  std::atomic<std::uint64_t> in_[num_span_classes] = {};
  std::atomic<std::uint64_t> out_[num_span_classes] = {};
  std::atomic<std::uint32_t> size_[num_span_classes] = {};
  std::atomic<std::uint32_t> moving_[num_span_classes] = {};  // reversals under way
};

}  // namespace detail
}  // namespace shmalloc::client
