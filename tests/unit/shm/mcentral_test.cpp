#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "shm/verify.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;
using shmalloc::test::test_heap;

namespace {
void require_healthy(mheap& h) {
  const verify_report r = verify_heap(h);
  REQUIRE_MESSAGE(r.ok(), r.summary());
}

void fill(mspan& s) {
  while (span_alloc_object(s) >= 0) {
  }
}
}  // namespace

TEST_SUITE("mcentral") {
  TEST_CASE("cache_span hands out a fresh span with every slot free") {
    test_heap t;
    mheap& h = *t.heap;
    const auto spc = span_class::make(10, true);  // 128-byte noscan objects
    auto id = h.central(spc).cache_span(4);
    REQUIRE(id);
    const mspan& s = h.span(*id);
    CHECK(s.state.load() == mspan_state::cached);
    CHECK(s.owner_client == 4);
    CHECK(count_allocated(s) == 0);
    CHECK(h.central(spc).state().cached_count == 1);
    require_healthy(h);
  }

  TEST_CASE("a full span comes back on the full list and a partial one on the partial list") {
    test_heap t;
    mheap& h = *t.heap;
    const auto spc = span_class::make(3, false);
    mcentral c = h.central(spc);
    auto full = *c.cache_span(1);
    auto part = *c.cache_span(1);
    fill(h.span(full));
    span_alloc_object(h.span(part));
    CHECK(!c.uncache_span(full).message.size());
    CHECK(!c.uncache_span(part).message.size());
    CHECK(c.state().full_count == 1);
    CHECK(c.state().partial_count == 1);
    CHECK(c.state().cached_count == 0);
    require_healthy(h);
    // The partial span is handed out before anything new is carved.
    CHECK(c.cache_span(2)->value == part.value);
    require_healthy(h);
  }

  TEST_CASE("a span whose objects are all freed goes back to mheap") {
    test_heap t;
    mheap& h = *t.heap;
    const auto spc = span_class::make(20, false);
    mcentral c = h.central(spc);
    auto id = *c.cache_span(1);
    const auto in_use = h.accounts().pages_in_use.load();
    const int i = span_alloc_object(h.span(id));
    span_free_local(h.span(id), static_cast<std::uint32_t>(i));
    CHECK(!c.uncache_span(id).message.size());
    CHECK(h.accounts().pages_in_use.load() == in_use - class_to_npages(20));
    CHECK(c.state().partial_count + c.state().full_count == 0);
    require_healthy(h);
  }

  TEST_CASE("remote frees are folded in by the sweep, which moves and frees spans") {
    test_heap t;
    mheap& h = *t.heap;
    const auto spc = span_class::make(1, true);  // 8-byte objects, 1024 per span
    mcentral c = h.central(spc);
    auto id = *c.cache_span(1);
    mspan& s = h.span(id);
    fill(s);
    REQUIRE(count_allocated(s) == 1024);
    REQUIRE(!c.uncache_span(id).message.size());
    CHECK(c.state().full_count == 1);

    // Another process frees three objects: they wait in the remote bitmap.
    for (std::uint32_t i : {5u, 700u, 1023u}) span_push_remote(h.view(), s, i);
    CHECK(count_remote_pending(h.view(), s) == 3);
    require_healthy(h);
    c.sweep();
    CHECK(c.state().partial_count == 1);
    CHECK(c.state().full_count == 0);
    CHECK(s.alloc_count == 1021);
    CHECK_FALSE(is_allocated(s, 700));
    require_healthy(h);

    // Free the rest remotely: the sweep returns the span to mheap.
    for (std::uint32_t i = 0; i < 1024; ++i)
      if (is_allocated(s, i)) span_push_remote(h.view(), s, i);
    CHECK(c.sweep() == 1);
    CHECK(c.state().partial_count == 0);
    require_healthy(h);
  }

  TEST_CASE("sweep_span folds one span's remote frees from whichever list holds it, and leaves others alone") {
    test_heap t;
    mheap& h = *t.heap;
    const auto spc = span_class::make(1, true);  // 8-byte objects, 1024 per span
    mcentral c = h.central(spc);
    auto full = *c.cache_span(1);
    auto part = *c.cache_span(1);
    auto held = *c.cache_span(1);
    fill(h.span(full));
    for (int i = 0; i < 10; ++i) span_alloc_object(h.span(part));
    fill(h.span(held));
    REQUIRE(!c.uncache_span(full).message.size());
    REQUIRE(!c.uncache_span(part).message.size());
    REQUIRE(c.state().full_count == 1);
    REQUIRE(c.state().partial_count == 1);

    // Nothing pending: nothing moves.
    CHECK_FALSE(c.sweep_span(full));
    CHECK(c.state().full_count == 1);
    // A full span with a remote free moves to the partial list.
    span_push_remote(h.view(), h.span(full), 7);
    CHECK_FALSE(c.sweep_span(full));
    CHECK(c.state().full_count == 0);
    CHECK(c.state().partial_count == 2);
    CHECK(h.span(full).alloc_count == 1023);
    require_healthy(h);
    // A partial span whose every object was freed remotely goes back to mheap.
    for (std::uint32_t i = 0; i < 10; ++i) span_push_remote(h.view(), h.span(part), i);
    CHECK(c.sweep_span(part));
    CHECK(c.state().partial_count == 1);
    require_healthy(h);
    // A span a client holds is the client's to fold, and another class's
    // span is not this mcentral's.
    span_push_remote(h.view(), h.span(held), 3);
    CHECK_FALSE(c.sweep_span(held));
    CHECK(count_remote_pending(h.view(), h.span(held)) == 1);
    span_push_remote(h.view(), h.span(full), 8);
    CHECK_FALSE(h.central(span_class::make(2, true)).sweep_span(full));
    CHECK(count_remote_pending(h.view(), h.span(full)) == 1);
    require_healthy(h);
  }

  TEST_CASE("cache_span takes a full span with pending remote frees before carving a new one") {
    test_heap t;
    mheap& h = *t.heap;
    const auto spc = span_class::make(7, false);
    mcentral c = h.central(spc);
    auto id = *c.cache_span(1);
    fill(h.span(id));
    REQUIRE(!c.uncache_span(id).message.size());
    span_push_remote(h.view(), h.span(id), 0);
    auto again = c.cache_span(2);
    REQUIRE(again);
    CHECK(again->value == id.value);
    CHECK_FALSE(is_allocated(h.span(id), 0));
    require_healthy(h);
  }

  TEST_CASE("a remote double free is detected when it is folded") {
    test_heap t;
    mheap& h = *t.heap;
    auto id = *h.central(span_class::make(4, false)).cache_span(1);
    mspan& s = h.span(id);
    const auto i = static_cast<std::uint32_t>(span_alloc_object(s));
    span_alloc_object(s);
    span_push_remote(h.view(), s, i);
    errc status{};
    std::string why;
    CHECK(span_fold_remote(h.view(), s, &status, &why) == 1);
    CHECK(status == errc::ok);
    span_push_remote(h.view(), s, i);  // the same object again
    CHECK(span_fold_remote(h.view(), s, &status, &why) == 0);
    CHECK(status == errc::double_free);
    CHECK(why.find("freed twice") != std::string::npos);
    CHECK(span_free_local(s, i) == errc::double_free);
  }

  TEST_CASE("a remote double free neither loses the other pending frees nor goes unreported by the sweep") {
    test_heap t;
    mheap& h = *t.heap;
    mcentral c = h.central(span_class::make(4, false));
    auto id = *c.cache_span(1);
    mspan& s = h.span(id);
    for (int k = 0; k < 10; ++k) span_alloc_object(s);
    REQUIRE(!c.uncache_span(id).message.size());
    span_push_remote(h.view(), s, 2);
    c.sweep();  // object 2 is free now
    for (std::uint32_t i : {1u, 2u, 3u}) span_push_remote(h.view(), s, i);  // 2 again, between two good frees
    c.sweep();
    CHECK(h.accounts().remote_free_errors.load() == 1);
    CHECK_FALSE(is_allocated(s, 1));
    CHECK_FALSE(is_allocated(s, 3));
    CHECK(s.alloc_count == 7);
    const verify_report r = verify_heap(h);
    CHECK_MESSAGE(r.ok(), r.summary());
  }

  TEST_CASE("an object freed twice while still pending is refused at the second free and folded once") {
    test_heap t;
    mheap& h = *t.heap;
    auto id = *h.central(span_class::make(4, false)).cache_span(1);
    mspan& s = h.span(id);
    for (int k = 0; k < 4; ++k) span_alloc_object(s);
    CHECK(span_push_remote(h.view(), s, 0) == errc::ok);
    CHECK(span_push_remote(h.view(), s, 1) == errc::ok);
    CHECK(span_push_remote(h.view(), s, 0) == errc::double_free);
    CHECK(count_remote_pending(h.view(), s) == 2);
    errc status{};
    std::string why;
    CHECK(span_fold_remote(h.view(), s, &status, &why) == 2);
    CHECK(status == errc::ok);
    CHECK_FALSE(remote_pending(s));
    CHECK(s.alloc_count == 2);
  }

  TEST_CASE("a remote free leaves the object's bytes alone, and bits past the last object are dropped as corrupt") {
    test_heap t;
    mheap& h = *t.heap;
    static_assert(class_to_size(5) == 48 && class_to_objects(5) == 170);  // the last word is part full
    auto id = *h.central(span_class::make(5, false)).cache_span(1);
    mspan& s = h.span(id);
    const auto i = static_cast<std::uint32_t>(span_alloc_object(s));
    auto* obj = h.view().span_base(s) + std::size_t{i} * s.elem_size;
    std::memset(obj, 0xa5, s.elem_size);
    REQUIRE(span_push_remote(h.view(), s, i) == errc::ok);
    CHECK(std::all_of(obj, obj + s.elem_size, [](std::byte b) { return b == std::byte{0xa5}; }));
    s.remote_bits[s.nelems / 64].fetch_or(std::uint64_t{1} << (s.nelems % 64));  // a slot that does not exist
    errc status{};
    std::string why;
    CHECK(span_fold_remote(h.view(), s, &status, &why) == 1);
    CHECK(status == errc::corrupt);
    CHECK(why.find("past the last object") != std::string::npos);
    CHECK_FALSE(remote_pending(s));
    CHECK_FALSE(is_allocated(s, i));
  }

  TEST_CASE("objects of the alignment table's types are aligned for their type") {
    test_heap t;
    mheap& h = *t.heap;
    struct alignas(1) a1 { char c[3]; };
    struct alignas(2) a2 { char c[6]; };
    struct alignas(4) a4 { char c[12]; };
    struct alignas(8) a8 { char c[24]; };
    struct alignas(16) a16 { char c[48]; };
    auto check_type = [&h](std::size_t size, std::size_t align) {
      const std::uint8_t c = size_to_class_aligned(size, align);
      REQUIRE(c != 0);
      auto id = *h.central(span_class::make(c, false)).cache_span(1);
      mspan& s = h.span(id);
      for (int k = 0; k < 20 && k < s.nelems; ++k) {
        const int i = span_alloc_object(s);
        REQUIRE(i >= 0);
        const auto* p = h.view().span_base(s) + static_cast<std::size_t>(i) * s.elem_size;
        CHECK(reinterpret_cast<std::uintptr_t>(p) % align == 0);
        CHECK(reinterpret_cast<std::uintptr_t>(p) % 8 == 0);  // every object at least 8-byte aligned
      }
    };
    check_type(sizeof(a1), alignof(a1));
    check_type(sizeof(a2), alignof(a2));
    check_type(sizeof(a4), alignof(a4));
    check_type(sizeof(a8), alignof(a8));
    check_type(sizeof(a16), alignof(a16));
    for (std::size_t align = 32; align <= 8192; align *= 2) check_type(align / 2 + 8, align);
    require_healthy(h);
  }

  // The daemon's sweep work is the spans freed into: each is on the queue
  // once until the daemon takes it, whatever the span table's size.
  // Two spans a client holds, with objects 0..n-1 allocated in each.
  std::pair<span_id, span_id> two_spans(mheap& h, int n) {
    mcentral c = h.central(span_class::make(6, false));
    auto a = *c.cache_span(1);
    auto b = *c.cache_span(1);
    for (auto id : {a, b})
      for (int i = 0; i < n; ++i) span_alloc_object(h.span(id));
    return {a, b};
  }

  TEST_CASE("remote frees put each span on the sweep queue once until the daemon takes the queue") {
    test_heap t;
    mheap& h = *t.heap;
    const heap_view& v = h.view();
    const auto [a, b] = two_spans(h, 4);
    auto drain = [&] {
      std::vector<std::uint32_t> seen;
      drain_sweep_queue(v, h.state().span_pool.high_water, [&](span_id id) { seen.push_back(id.value); });
      return seen;
    };
    CHECK(drain().empty());
    REQUIRE(span_push_remote(v, h.span(a), 0) == errc::ok);
    REQUIRE(span_push_remote(v, h.span(a), 1) == errc::ok);  // already queued: not again
    REQUIRE(span_push_remote(v, h.span(b), 0) == errc::ok);
    CHECK(drain() == std::vector<std::uint32_t>{b.value, a.value});  // a stack
    CHECK(h.span(a).sweep_queued.load() == 0);
    CHECK(drain().empty());
    REQUIRE(span_push_remote(v, h.span(a), 2) == errc::ok);  // taken off: the next free queues it again
    CHECK(drain() == std::vector<std::uint32_t>{a.value});
  }

  TEST_CASE("the daemon's walk of the sweep queue survives a queue a client scribbled on") {
    test_heap t;
    mheap& h = *t.heap;
    const heap_view& v = h.view();
    const auto [a, b] = two_spans(h, 1);
    const std::uint32_t high_water = h.state().span_pool.high_water;
    std::uint32_t visits = 0;
    auto count = [&](span_id) { ++visits; };
    // A cycle: a -> b -> a.
    REQUIRE(span_push_remote(v, h.span(a), 0) == errc::ok);
    REQUIRE(span_push_remote(v, h.span(b), 0) == errc::ok);
    h.span(a).sweep_next.store(b.value + 1);
    CHECK(drain_sweep_queue(v, high_water, count) == high_water);
    CHECK(visits == high_water);
    // An id past the span table.
    visits = 0;
    h.state().sweep_queue.store(high_water + 7);
    CHECK(drain_sweep_queue(v, high_water, count) == 0);
    CHECK(h.state().sweep_queue.load() == 0);
    require_healthy(h);
  }
}
