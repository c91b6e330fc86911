#include <doctest/doctest.h>

#include "shm/verify.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;
using shmalloc::test::test_heap;

namespace {
bool mentions(const verify_report& r, const std::string& what) {
  for (const auto& p : r.problems)
    if (p.find(what) != std::string::npos) return true;
  return false;
}
}  // namespace

TEST_SUITE("verify") {
  TEST_CASE("a healthy heap passes, and object counts balance when every object is counted") {
    test_heap t;
    mheap& h = *t.heap;
    const std::uint32_t slot = *h.assign_cache(mheap::daemon_client);
    stats_block& st = h.cache_slot(slot).stats;
    auto id = *h.central(span_class::make(2, true)).cache_span(1);
    for (int i = 0; i < 10; ++i) {
      span_alloc_object(h.span(id));
      bump(st.small_allocs[2]);
    }
    span_push_remote(h.view(), h.span(id), 3);
    bump(st.small_frees[2]);
    verify_options strict;
    strict.object_counts = true;
    const verify_report r = verify_heap(h, strict);
    CHECK_MESSAGE(r.ok(), r.summary());

    bump(st.small_allocs[2]);  // counted but never allocated
    CHECK(mentions(verify_heap(h, strict), "size class 2"));
  }

  TEST_CASE("the checker finds a page map entry that names the wrong span") {
    test_heap t;
    mheap& h = *t.heap;
    auto id = *h.alloc_large(2 * page_size, true, 1);
    h.view().page_map[h.span(id).start.value + 1] = 0;
    CHECK(mentions(verify_heap(h), "page_map"));
  }

  TEST_CASE("the checker finds a wrong in-use account") {
    test_heap t;
    mheap& h = *t.heap;
    h.alloc_large(1 * page_size, true, 1);
    bump(h.accounts().pages_in_use);
    CHECK(mentions(verify_heap(h), "pages_in_use"));
  }

  TEST_CASE("the checker finds a span on the wrong mcentral list") {
    test_heap t;
    mheap& h = *t.heap;
    mcentral c = h.central(span_class::make(9, false));
    auto id = *c.cache_span(1);
    span_alloc_object(h.span(id));
    c.uncache_span(id);  // partial
    h.span(id).alloc_count = h.span(id).nelems;  // claims to be full
    CHECK_FALSE(verify_heap(h).ok());
  }

  TEST_CASE("the checker finds a free page that a span claims") {
    test_heap t;
    mheap& h = *t.heap;
    auto id = *h.alloc_large(1 * page_size, true, 1);
    h.pages().mark_free(h.span(id).start, 1);
    CHECK(mentions(verify_heap(h), "covers free pages"));
  }
}
