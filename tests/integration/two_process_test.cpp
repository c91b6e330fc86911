// Two processes map one heap at different addresses and agree on every
// handle; each carves spans while the other waits (mheap has one writer at a
// time: later, the daemon), and frees cross the process boundary through the
// remote-free bitmaps.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "shm/verify.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;
using shmalloc::test::run_in_child;
using shmalloc::test::test_heap;

namespace {
// The pattern an object holds is derived from its handle, so an object read
// through a wrong translation (or handed out twice) does not match.
std::uint64_t pattern(handle_t h) { return h * 0x9e3779b97f4a7c15ULL ^ 0x5555; }

struct handoff {  // lives at the start of the first object the parent allocates
  std::uint64_t count;
  handle_t handles[200];
  handle_t child_span_first;  // the child writes it
  std::uint64_t child_count;
};
}  // namespace

TEST_SUITE("two processes") {
  TEST_CASE("two processes map the heap at different addresses and agree on every handle") {
    test_heap t;
    mheap& h = *t.heap;
    const auto spc = span_class::make(8, false);  // 96-byte objects
    auto meta_span = *h.alloc_large(sizeof(handoff), false, 1);
    auto* board = static_cast<handoff*>(static_cast<void*>(h.view().span_base(h.span(meta_span))));
    auto id = *h.central(spc).cache_span(1);
    board->count = 0;
    for (int k = 0; k < 50; ++k) {
      const int i = span_alloc_object(h.span(id));
      std::byte* p = h.view().span_base(h.span(id)) + static_cast<std::size_t>(i) * 96;
      const handle_t hd = t.seg->handle_of(p);
      *reinterpret_cast<std::uint64_t*>(p + 8) = pattern(hd);
      board->handles[board->count++] = hd;
    }
    const handle_t board_handle = t.seg->handle_of(board);
    const std::string name = t.name;
    const std::uintptr_t parent_base = reinterpret_cast<std::uintptr_t>(t.seg->base());

    const int rc = run_in_child([&]() -> int {
      auto att = segment::attach(name);
      if (!att) return 10;
      segment& seg = *att.value();
      if (reinterpret_cast<std::uintptr_t>(seg.base()) == parent_base) return 11;
      mheap child(seg);
      auto* b = static_cast<handoff*>(seg.pointer(board_handle));
      // Every handle reaches the same bytes.
      for (std::uint64_t k = 0; k < b->count; ++k) {
        auto* p = static_cast<std::byte*>(seg.pointer(b->handles[k]));
        if (*reinterpret_cast<std::uint64_t*>(p + 8) != pattern(b->handles[k])) return 12;
        if (seg.handle_of(p) != b->handles[k]) return 13;
      }
      // Free the even objects from this process: remote frees.
      for (std::uint64_t k = 0; k < b->count; k += 2) {
        object_ref ref;
        if (child.view().object_at(b->handles[k], &ref) != errc::ok) return 14;
        if (span_push_remote(child.view(), child.span(ref.span), ref.index) != errc::ok) return 15;
      }
      // Carve a span of our own (the parent waits) and fill objects.
      auto mine = child.central(span_class::make(8, false)).cache_span(2);
      if (!mine) return 15;
      mspan& s = child.span(*mine);
      b->child_span_first = seg.handle_of(child.view().span_base(s));
      b->child_count = 0;
      for (int k = 0; k < 30; ++k) {
        const int i = span_alloc_object(s);
        std::byte* p = child.view().span_base(s) + static_cast<std::size_t>(i) * 96;
        *reinterpret_cast<std::uint64_t*>(p + 8) = pattern(seg.handle_of(p));
        ++b->child_count;
      }
      return 0;
    });
    REQUIRE(rc == 0);

    // The parent reads the child's objects through its own mapping.
    REQUIRE(board->child_count == 30);
    for (std::uint64_t k = 0; k < board->child_count; ++k) {
      const handle_t hd = board->child_span_first + k * 96;
      CHECK(*static_cast<std::uint64_t*>(static_cast<void*>(static_cast<std::byte*>(t.seg->pointer(hd)) + 8)) ==
            pattern(hd));
    }
    // The child's remote frees fold into the parent's span.
    errc status{};
    CHECK(span_fold_remote(h.view(), h.span(id), &status, nullptr) == 25);
    CHECK(status == errc::ok);
    CHECK(count_allocated(h.span(id)) == 25);
    const verify_report r = verify_heap(h);
    CHECK_MESSAGE(r.ok(), r.summary());
  }

  TEST_CASE("a process can attach while another holds the heap and sees its accounts") {
    test_heap t;
    t.heap->alloc_span(4, span_class::make(40, false), mspan_state::cached, 1);
    const std::string name = t.name;
    const int rc = run_in_child([&]() -> int {
      auto att = segment::attach(name);
      if (!att) return 10;
      return att.value()->heap().accounts.pages_in_use.load() == 4 ? 0 : 11;
    });
    CHECK(rc == 0);
  }
}
