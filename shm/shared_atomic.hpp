// shared_atomic.hpp: an atomic field of a shared-memory struct.
//
// std::atomic<T> is not trivially copyable, and every struct we place in the
// segment must be (so that its bytes mean the same thing in every process and
// in every build that passes the layout check). shared_atomic<T> is a plain,
// trivially copyable T whose every access goes through std::atomic_ref. Only
// types whose atomic_ref is always lock-free are allowed: a lock-based atomic
// would guard shared data with a lock private to one process.
#pragma once

#include <atomic>
#include <cstdint>
#include <type_traits>

#if defined(__SANITIZE_THREAD__)
#define SHMALLOC_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SHMALLOC_TSAN 1
#endif
#endif
#ifndef SHMALLOC_TSAN
#define SHMALLOC_TSAN 0
#endif

#if SHMALLOC_TSAN
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

namespace shmalloc {

// What ThreadSanitizer cannot see: order made by another process. A thread
// that pushes a remote free releases this process's cross-process order; a
// thread that receives memory from the daemon (a refill, a large object)
// acquires it. That is what really happens: the daemon folds every push
// into a span before it hands the span's memory out again, and its reply
// comes after. Without it TSan reports the pusher's link write and the
// next owner's first write to the same bytes as a race. No code in other
// builds.
inline char cross_process_order;
inline void tsan_release_cross_process() noexcept {
#if SHMALLOC_TSAN
  __tsan_release(&cross_process_order);
#endif
}
inline void tsan_acquire_cross_process() noexcept {
#if SHMALLOC_TSAN
  __tsan_acquire(&cross_process_order);
#endif
}

template <class T>
struct shared_atomic {
  static_assert(std::is_trivially_copyable_v<T>);
  static_assert(std::atomic_ref<T>::is_always_lock_free, "shared-memory atomics must be lock-free");

  alignas(std::atomic_ref<T>::required_alignment) T raw;

  T load(std::memory_order order = std::memory_order_seq_cst) const noexcept { return ref().load(order); }
  void store(T v, std::memory_order order = std::memory_order_seq_cst) noexcept { ref().store(v, order); }
  T exchange(T v, std::memory_order order = std::memory_order_seq_cst) noexcept { return ref().exchange(v, order); }
  T fetch_or(T v, std::memory_order order = std::memory_order_seq_cst) noexcept { return ref().fetch_or(v, order); }
  T fetch_add(T v, std::memory_order order = std::memory_order_seq_cst) noexcept { return ref().fetch_add(v, order); }
  bool compare_exchange_weak(T& expected, T desired, std::memory_order success,
                             std::memory_order failure) noexcept {
    return ref().compare_exchange_weak(expected, desired, success, failure);
  }
  bool compare_exchange_strong(T& expected, T desired, std::memory_order success,
                               std::memory_order failure) noexcept {
    return ref().compare_exchange_strong(expected, desired, success, failure);
  }

 private:
  std::atomic_ref<T> ref() const noexcept { return std::atomic_ref<T>(const_cast<T&>(raw)); }
};

// Single-writer counter increment: only one thread (of one process) ever
// stores to c, so no read-modify-write is needed for it to stay exact, and
// readers in other processes see a value that is never torn. Never a lock
// prefix. On x86-64 it is one `add` to memory (the fast paths count every
// object: a relaxed load, add and store would be three instructions); an
// aligned 8-byte access is single-copy atomic there, so a reader's relaxed
// load sees the old or the new value. Elsewhere, and under ThreadSanitizer
// (which must see the store), it is the relaxed load and store.
#if SHMALLOC_TSAN
#define SHMALLOC_BUMP_ASM 0
#elif defined(__x86_64__)
#define SHMALLOC_BUMP_ASM 1
#endif

template <class T>
inline void bump(shared_atomic<T>& c, T n = 1) noexcept {
#if SHMALLOC_BUMP_ASM
  if constexpr (sizeof(T) == 8) {
    asm("addq %1, %0" : "+m"(c.raw) : "er"(static_cast<std::uint64_t>(n)));
    return;
  }
#endif
  c.store(static_cast<T>(c.load(std::memory_order_relaxed) + n), std::memory_order_relaxed);
}

}  // namespace shmalloc
