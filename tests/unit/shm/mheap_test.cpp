#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "shm/memstats.hpp"
#include "shm/verify.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;
using shmalloc::test::test_heap;

namespace {
// A page run of n pages, held as a large object (mheap's own unit of work).
span_id alloc_run(mheap& h, std::uint32_t n) {
  auto id = h.alloc_large(std::uint64_t{n} * page_size, true, 1);
  REQUIRE(id);
  return *id;
}

void require_healthy(mheap& h) {
  const verify_report r = verify_heap(h);
  REQUIRE_MESSAGE(r.ok(), r.summary());
}

std::uint64_t sys_pages(mheap& h) { return h.accounts().pages_committed.load(); }
std::uint64_t inuse_pages(mheap& h) { return h.accounts().pages_in_use.load(); }
}  // namespace

TEST_SUITE("mheap") {
  // What a daemon killed in the middle of a change leaves, each kind once;
  // the crash campaign (tests/crash) kills it at every point for real.
  TEST_CASE("rebuild repairs a heap its daemon left half changed: spans half carved or half freed, lists and accounts") {
    test::test_heap t;
    mheap& h = *t.heap;
    const auto spc = span_class::make(5, false);
    mcentral c = h.central(spc);
    const span_id kept = *c.cache_span(7);                // a client's, with an object
    span_alloc_object(h.span(kept));
    const span_id central = *c.cache_span(7);
    span_alloc_object(h.span(central));
    REQUIRE(c.uncache_span(central).code == errc::ok);    // on the partial list, one object
    const span_id carved = *h.alloc_span(3, span_class::make(0, false), mspan_state::large, 7);
    const span_id freed = *h.alloc_span(2, span_class::make(0, false), mspan_state::large, 7);
    // Half carved: its pages named, its state not stored yet.
    h.span(carved).state.store(mspan_state::dead);
    // Half freed: its pages unnamed, the rest not done.
    for (std::uint32_t p = h.span(freed).start.value; p < h.span(freed).start.value + 2; ++p) h.view().page_map[p] = 0;
    // A list and two accounts caught between two stores.
    h.state().central[spc.value].partial_count = 5;
    h.accounts().pages_in_use.store(12345);
    h.accounts().large_spans.store(0);
    REQUIRE_FALSE(verify_heap(h).ok());
    CHECK(h.rebuild() == 1);  // freed (carved was already dead)
    const verify_report r = verify_heap(h);
    CHECK_MESSAGE(r.ok(), r.summary());
    CHECK(h.span(kept).state.load() == mspan_state::cached);
    CHECK(is_allocated(h.span(kept), 0));
    CHECK(h.span(central).state.load() == mspan_state::central);
    CHECK(h.state().central[spc.value].partial_count == 1);
    CHECK(h.accounts().large_spans.load() == 0);
    // The pages of both large spans are free again, and reusable.
    const span_id again = *h.alloc_span(5, span_class::make(0, false), mspan_state::large, 7);
    CHECK(h.span(again).start.value <= std::min(h.span(carved).start.value, h.span(freed).start.value));
  }

  TEST_CASE("the first span grows the heap by one 4 MiB chunk") {
    test_heap t;
    mheap& h = *t.heap;
    CHECK(sys_pages(h) == 0);
    auto id = h.central(span_class::make(5, false)).cache_span(1);  // 48-byte objects
    REQUIRE(id);
    CHECK(sys_pages(h) == chunk_pages);
    CHECK(inuse_pages(h) == 1);
    CHECK(h.accounts().grow_count.load() == 1);
    const mspan& s = h.span(*id);
    CHECK(s.start.value == 0);
    CHECK(s.nelems == class_to_objects(5));
    CHECK(s.elem_size == 48);
    require_healthy(h);
  }

  TEST_CASE("spans are carved lowest address first and freed runs coalesce") {
    test_heap t;
    mheap& h = *t.heap;
    std::vector<span_id> ids;
    for (int i = 0; i < 4; ++i) ids.push_back(alloc_run(h, 3));
    for (int i = 0; i < 4; ++i) CHECK(h.span(ids[static_cast<std::size_t>(i)]).start.value == 3u * static_cast<unsigned>(i));
    h.free_span(ids[1]);
    h.free_span(ids[2]);
    require_healthy(h);
    // The two freed 3-page runs merged: a 6-page span fits in the hole.
    auto six = h.alloc_large(6 * page_size, true, 1);
    REQUIRE(six);
    CHECK(h.span(*six).start.value == 3);
    require_healthy(h);
  }

  TEST_CASE("a fragmented heap places a larger run past the holes") {
    test_heap t;
    mheap& h = *t.heap;
    std::vector<span_id> ids;
    for (int i = 0; i < 100; ++i) ids.push_back(alloc_run(h, 1));
    for (std::size_t i = 0; i < ids.size(); i += 2) h.free_span(ids[i]);
    CHECK(h.pages().longest_free_run() == chunk_pages - 100 + 0);  // the tail of the chunk
    auto two = h.alloc_large(2 * page_size, true, 1);
    REQUIRE(two);
    CHECK(h.span(*two).start.value == 100);
    auto one = h.alloc_large(1 * page_size, true, 1);
    CHECK(h.span(*one).start.value == 0);  // the first hole
    require_healthy(h);
  }

  TEST_CASE("growth stops at capacity with a clean error and the heap intact") {
    test_heap t(64ULL << 20);  // 8192 pages
    mheap& h = *t.heap;
    std::vector<span_id> ids;
    for (;;) {
      auto id = h.alloc_large(1ULL << 20, true, 1);
      if (!id) {
        CHECK(id.code() == errc::no_memory);
        CHECK(id.err().message.find("capacity") != std::string::npos);
        break;
      }
      ids.push_back(*id);
      REQUIRE(ids.size() <= 64);
    }
    CHECK(ids.size() == 64);
    CHECK(sys_pages(h) == 8192);
    CHECK(h.accounts().grow_failures.load() >= 1);
    CHECK(h.accounts().large_spans.load() == 64);
    require_healthy(h);
    h.free_span(ids.back());
    CHECK(h.alloc_large(1ULL << 20, true, 1));  // room again after a free
    require_healthy(h);
  }

  TEST_CASE("a large object gets whole pages and one slot") {
    test_heap t;
    mheap& h = *t.heap;
    auto id = h.alloc_large(40000, false, 3);
    REQUIRE(id);
    const mspan& s = h.span(*id);
    CHECK(s.npages == 5);
    CHECK(s.nelems == 1);
    CHECK(object_bytes(s) == 5 * 8192);
    CHECK(span_class{s.span_class}.size_class() == 0);
    CHECK(s.state.load() == mspan_state::large);
    CHECK(s.owner_client == 3);
    h.free_span(*id);
    CHECK(h.accounts().large_spans.load() == 0);
    require_healthy(h);
  }

  TEST_CASE("the span table commits descriptors on demand and reuses freed ones") {
    test_heap t;
    mheap& h = *t.heap;
    auto a = h.alloc_large(1 * page_size, true, 1);
    const auto committed = h.state().span_pool.committed;
    CHECK(committed > 0);
    h.free_span(*a);
    auto b = h.alloc_large(1 * page_size, true, 1);
    CHECK(b->value == a->value);
    CHECK(h.state().span_pool.committed == committed);
    require_healthy(h);
  }

  TEST_CASE("the scavenger releases idle pages to the OS and they are committed again on reuse") {
    test_heap t;
    mheap& h = *t.heap;
    std::vector<span_id> ids;
    for (int i = 0; i < 4; ++i) ids.push_back(*h.alloc_large(1ULL << 20, true, 1));  // 4 MiB, touched below
    for (span_id id : ids) std::memset(h.view().span_base(h.span(id)), 0xab, 1ULL << 20);
    const std::uint64_t backed_before = t.seg->backed_bytes();
    for (span_id id : ids) h.free_span(id);

    // Not idle long enough: nothing is released.
    CHECK(h.scavenge(5'000'000'000ULL) == 0);
    shmalloc::test::advance_fake_clock(6'000'000'000ULL);
    const std::uint64_t released = h.scavenge(5'000'000'000ULL);
    CHECK(released >= 4ULL << 20);
    CHECK(h.accounts().pages_released.load() * page_size == released);
    CHECK(h.accounts().scavenged_bytes_total.load() == released);
    CHECK(t.seg->backed_bytes() + released <= backed_before);  // st_blocks really went down
    require_healthy(h);

    // Reuse: the pages are committed again, reads see zeros, and the
    // released account drops.
    auto again = h.alloc_large(1ULL << 20, true, 1);
    REQUIRE(again);
    CHECK(h.accounts().recommitted_bytes_total.load() >= 1ULL << 20);
    CHECK(h.accounts().pages_released.load() * page_size == released - (1ULL << 20));
    const auto* p = reinterpret_cast<const unsigned char*>(h.view().span_base(h.span(*again)));
    CHECK(p[0] == 0);
    CHECK(p[(1 << 20) - 1] == 0);
    require_healthy(h);
  }

  TEST_CASE("the page census counts pages and runs as a walk page by page does") {
    test_heap t;
    mheap& h = *t.heap;
    std::mt19937 rng(7);
    std::vector<span_id> runs;
    for (int i = 0; i < 300; ++i) runs.push_back(alloc_run(h, 1 + rng() % 40));
    for (std::size_t i = 0; i < runs.size(); i += 2) h.free_span(runs[i]);
    shmalloc::test::advance_fake_clock(6'000'000'000ULL);
    REQUIRE(h.scavenge(5'000'000'000ULL, 3ULL << 20) > 0);  // some free runs released, not all
    for (int i = 0; i < 20; ++i) alloc_run(h, 1 + rng() % 8);  // some of them reused
    require_healthy(h);

    page_census want;
    std::uint64_t free_run = 0;
    int prev = -1;
    for (std::uint32_t i = 0; i < h.accounts().pages_committed.load(); ++i) {
      const page_id pg{i};
      const int kind = !h.pages().is_free(pg) ? 0 : h.is_released(pg) ? 2 : 1;
      (kind == 0 ? want.pages_in_use : kind == 1 ? want.pages_free : want.pages_released)++;
      if (kind != prev) (kind == 0 ? want.runs_in_use : kind == 1 ? want.runs_free : want.runs_released)++;
      free_run = kind == 0 ? 0 : free_run + 1;
      want.largest_free_run_pages = std::max(want.largest_free_run_pages, free_run);
      prev = kind;
    }
    const page_census got = read_page_census(h);
    CHECK(want.pages_released > 0);
    CHECK(want.runs_free > 10);
    CHECK(got.pages_in_use == want.pages_in_use);
    CHECK(got.pages_free == want.pages_free);
    CHECK(got.pages_released == want.pages_released);
    CHECK(got.runs_in_use == want.runs_in_use);
    CHECK(got.runs_free == want.runs_free);
    CHECK(got.runs_released == want.runs_released);
    CHECK(got.largest_free_run_pages == want.largest_free_run_pages);
    CHECK(got.pages_in_use + got.pages_free + got.pages_released == got.pages_committed);
  }

  TEST_CASE("cache slots are assigned, counted and retired into monotonic totals") {
    test_heap t;
    mheap& h = *t.heap;
    auto a = h.assign_cache(5);
    auto b = h.assign_cache(6);
    REQUIRE(a);
    REQUIRE(b);
    CHECK(*a != *b);
    CHECK(h.accounts().caches_in_use.load() == 2);
    bump(h.cache_slot(*a).stats.small_allocs[3], std::uint64_t{10});
    h.retire_cache(*a);
    CHECK(h.state().retired.small_allocs[3].load() == 10);
    CHECK(h.cache_slot(*a).stats.small_allocs[3].load() == 0);
    CHECK(h.accounts().caches_in_use.load() == 1);
    CHECK(*h.assign_cache(7) == *a);  // the freed slot is reused
    CHECK(h.assign_cache(0).code() == errc::invalid_argument);
  }
}
