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
#include <type_traits>

namespace shmalloc {

template <class T>
struct shared_atomic {
  static_assert(std::is_trivially_copyable_v<T>);
  static_assert(std::atomic_ref<T>::is_always_lock_free, "shared-memory atomics must be lock-free");

  alignas(std::atomic_ref<T>::required_alignment) T raw;

  T load(std::memory_order order = std::memory_order_seq_cst) const noexcept { return ref().load(order); }
  void store(T v, std::memory_order order = std::memory_order_seq_cst) noexcept { ref().store(v, order); }
  T exchange(T v, std::memory_order order = std::memory_order_seq_cst) noexcept { return ref().exchange(v, order); }
  bool compare_exchange_weak(T& expected, T desired, std::memory_order success,
                             std::memory_order failure) noexcept {
    return ref().compare_exchange_weak(expected, desired, success, failure);
  }

 private:
  std::atomic_ref<T> ref() const noexcept { return std::atomic_ref<T>(const_cast<T&>(raw)); }
};

// Single-writer counter increment: only one process (one thread) ever stores
// to c, so a relaxed load and store suffice; readers in other processes see a
// value that is never torn. Never a read-modify-write (no lock prefix).
template <class T>
inline void bump(shared_atomic<T>& c, T n = 1) noexcept {
  c.store(static_cast<T>(c.load(std::memory_order_relaxed) + n), std::memory_order_relaxed);
}

}  // namespace shmalloc
