// test_heap.hpp: what every shm test needs. Each heap gets a name no other
// test (or parallel ctest process) uses, and is removed when the test ends,
// so nothing is left in /dev/shm.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "shm/mheap.hpp"
#include "shm/segment.hpp"

namespace shmalloc::test {

// "shmalloc-test-<what>-<pid>-<n>-<random>".
std::string unique_heap_name(const std::string& what);

// A fake clock the tests move by hand (mheap takes a plain function).
std::uint64_t fake_clock() noexcept;
void advance_fake_clock(std::uint64_t ns) noexcept;

// Creates a heap with a unique name and an mheap over it; removes the
// shared-memory object on destruction.
struct test_heap {
  explicit test_heap(std::uint64_t capacity = 256ULL << 20, const std::string& what = "heap",
                     mode_t mode = 0600);
  ~test_heap();
  test_heap(const test_heap&) = delete;
  test_heap& operator=(const test_heap&) = delete;

  std::string name;
  std::unique_ptr<segment> seg;
  std::unique_ptr<mheap> heap;
};

// Runs fn in a forked child; returns its exit code, or 128 + signal if it was
// killed by a signal. The child never returns into the test framework.
int run_in_child(const std::function<int()>& fn);

}  // namespace shmalloc::test
