// The profile table (shm/profile.hpp): an entry lives exactly as long as
// its sampled object, whoever frees it, and the daemon's sweep releases
// what a killed client or a rebuild left behind.
#include <doctest/doctest.h>

#include "shm/profile.hpp"
#include "shm/verify.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;

namespace {
struct sampled {
  span_id span;
  handle_t handle;
  profile_sample* entry;
};

// What a client does for a sampled allocation: a large object, an entry
// claimed, filled and published.
sampled sample(mheap& h, std::uint64_t size, std::uint64_t pc) {
  const span_id id = *h.alloc_large(size, true, 7);
  const handle_t at = h.view().handle_of(h.view().span_base(h.span(id)));
  profile_sample* e = profile_claim(h.view(), at);
  REQUIRE(e != nullptr);
  e->size.store(size);
  e->alloc_ns.store(1000);
  e->rate.store(4096);
  e->frames.store(1);
  e->pc[0].store(pc);
  e->vma[0].store(pc - 0x1000);
  profile_publish(h.view(), *e, h.span(id), at);
  return {id, at, e};
}

std::uint32_t live(const heap_view& v) {
  std::uint32_t n = 0;
  for (std::uint32_t i = 0; i < max_profile_samples; ++i) {
    profile_record r;
    n += profile_read(v, i, &r);
  }
  return n;
}
}  // namespace

TEST_SUITE("profile") {
  TEST_CASE("a published sample reads back whole, and its free releases it") {
    test::test_heap t;
    mheap& h = *t.heap;
    const sampled s = sample(h, 100, 0x401234);
    const auto i = static_cast<std::uint32_t>(s.entry - h.view().profile);
    profile_record r;
    REQUIRE(profile_read(h.view(), i, &r));
    CHECK(r.handle == s.handle);
    CHECK(r.span == s.span);
    CHECK(r.size == 100);
    CHECK(r.rate == 4096);
    CHECK(r.frames == 1);
    CHECK(r.pc[0] == 0x401234);
    CHECK(r.vma[0] == 0x400234);
    CHECK(live(h.view()) == 1);
    // A client's free (free_large) releases it before the span goes.
    profile_release(h.view(), h.span(s.span));
    CHECK(s.entry->handle.load() == 0);
    CHECK(h.span(s.span).profile_sample.load() == 0);
    profile_release(h.view(), h.span(s.span));  // a second release finds nothing
    h.free_span(s.span);
    CHECK(live(h.view()) == 0);
  }

  TEST_CASE("the daemon freeing a sampled span (a dead client's, a free by request) releases its entry") {
    test::test_heap t;
    mheap& h = *t.heap;
    const sampled s = sample(h, 40000, 0x5000);
    CHECK(live(h.view()) == 1);
    h.free_span(s.span);
    CHECK(s.entry->handle.load() == 0);
    CHECK(live(h.view()) == 0);
    // The descriptor, reused, starts unsampled.
    const span_id again = *h.alloc_large(page_size, true, 8);
    CHECK(h.span(again).profile_sample.load() == 0);
  }

  TEST_CASE("a scribbled mark releases nothing but its own object's entry") {
    test::test_heap t;
    mheap& h = *t.heap;
    const sampled a = sample(h, 100, 0x1);
    const sampled b = sample(h, 100, 0x2);
    // b's span claims a's entry: a's entry does not name b's object.
    h.span(b.span).profile_sample.store(static_cast<std::uint16_t>(a.entry - h.view().profile + 1));
    profile_release(h.view(), h.span(b.span));
    CHECK(a.entry->handle.load() == a.handle);
    CHECK(b.entry->handle.load() == b.handle);  // orphaned: no span points at it now
    CHECK(live(h.view()) == 1);                  // profile_read does not count it
    CHECK(profile_sweep(h.view()) == 1);         // and the sweep takes it back
    CHECK(b.entry->handle.load() == 0);
    CHECK(a.entry->handle.load() == a.handle);
  }

  TEST_CASE("the sweep keeps entries being filled for live objects, and releases those of objects gone") {
    test::test_heap t;
    mheap& h = *t.heap;
    const sampled kept = sample(h, 100, 0x1);
    // Claimed, not yet published, its object live: a client filling it now.
    const span_id filling = *h.alloc_large(page_size, true, 7);
    const handle_t at = h.view().handle_of(h.view().span_base(h.span(filling)));
    profile_sample* busy = profile_claim(h.view(), at);
    REQUIRE(busy != nullptr);
    // Claimed for an object since freed: its client was killed mid-way.
    const span_id gone = *h.alloc_large(page_size, true, 7);
    profile_sample* dead = profile_claim(h.view(), h.view().handle_of(h.view().span_base(h.span(gone))));
    REQUIRE(dead != nullptr);
    h.free_span(gone);
    CHECK(profile_sweep(h.view()) == 1);
    CHECK(dead->handle.load() == 0);
    CHECK(busy->handle.load() == (at | profile_claiming));
    CHECK(kept.entry->handle.load() == kept.handle);
    CHECK(live(h.view()) == 1);  // a claimed entry is not read as a sample
  }

  TEST_CASE("a full table refuses a claim, and an entry released is claimed again") {
    test::test_heap t;
    mheap& h = *t.heap;
    profile_sample* const table = h.view().profile;
    for (std::uint32_t i = 0; i < max_profile_samples; ++i) table[i].handle.store(profile_claiming | (std::uint64_t{i + 1} << 13));
    CHECK(profile_claim(h.view(), 1 << 13) == nullptr);
    table[17].handle.store(0);
    CHECK(profile_claim(h.view(), 1 << 13) == &table[17]);
  }
}
