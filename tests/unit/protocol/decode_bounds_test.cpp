// Decoders allocate for what a payload holds, not for what it claims: a
// row count is untrusted until the rows arrive (issue 23, item 9). This
// binary replaces operator new to see the largest single allocation.
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "proto/control_protocol.hpp"
#include "shm/size_classes.hpp"

namespace {
std::atomic<std::size_t> largest{0};
}  // namespace

void* operator new(std::size_t n) {
  std::size_t seen = largest.load(std::memory_order_relaxed);
  while (n > seen && !largest.compare_exchange_weak(seen, n, std::memory_order_relaxed)) {
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

using namespace shmalloc;

namespace {
// The largest allocation decode makes of payload.
template <class Decode>
std::size_t largest_allocation(const std::vector<std::uint8_t>& payload, Decode decode) {
  largest.store(0, std::memory_order_relaxed);
  CHECK_FALSE(decode(payload));
  return largest.load(std::memory_order_relaxed);
}
}  // namespace

TEST_SUITE("protocol") {
  TEST_CASE("a table that claims more rows than it holds is refused without allocating them") {
    proto::writer leaks;
    leaks.u64(60'000'000'000).u32(0xffff).u16(0xffff);  // 65,535 leak rows claimed, none sent
    CHECK(largest_allocation(leaks.bytes(), proto::decode_leak_table) < 1024);
    proto::writer sites;
    sites.u32(1024).u32(1024).u16(proto::max_site_rows);  // 256 site rows claimed, none sent
    CHECK(largest_allocation(sites.bytes(), proto::decode_site_table) < 1024);
    proto::writer classes;
    classes.u16(num_size_classes - 1);
    CHECK(largest_allocation(classes.bytes(), proto::decode_class_table) < 1024);
    proto::writer advise;
    advise.u64(0).u16(num_size_classes - 1);
    CHECK(largest_allocation(advise.bytes(), proto::decode_advise_table) < 1024);
  }
}
