// heap_demo: the foundation at work before the daemon exists. One process
// creates a heap, carves spans and fills objects; a second process (forked,
// so it maps the heap at another address) reads them by handle, frees half
// of them remotely and carves spans of its own; the first sweeps, checks the
// heap and prints its accounting, then scavenges and removes the heap.
//
// mheap has one writer at a time: here the two processes take turns (the
// parent waits for the child); in the real system the daemon is that writer.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "shm/memstats.hpp"
#include "shm/mheap.hpp"
#include "shm/segment.hpp"
#include "shm/verify.hpp"

using namespace shmalloc;

namespace {

struct board {  // handles the parent publishes for the child, in a large object
  std::uint64_t count;
  handle_t objects[4096];
};

std::uint64_t pattern(handle_t h) { return h * 0x9e3779b97f4a7c15ULL; }

std::uint64_t live_objects(mheap& h) {
  std::uint64_t n = 0;
  for (std::uint32_t i = 0; i < h.state().span_pool.high_water; ++i) {
    const mspan& s = h.span(span_id{i});
    if (s.state.load(std::memory_order_relaxed) != mspan_state::dead)
      n += count_allocated(s) - count_remote_pending(h.view(), s);
  }
  return n;
}

void print_accounts(const char* when, mheap& h) {
  const heap_memstats m = read_memstats(h);
  auto row = [](const char* name, std::uint64_t v) {
    std::printf("  %-26s %12llu\n", name, static_cast<unsigned long long>(v));
  };
  std::printf("-- %s\n", when);
  row("heap_sys_bytes", m.heap_sys_bytes);
  row("heap_inuse_bytes", m.heap_inuse_bytes);
  row("heap_idle_bytes", m.heap_idle_bytes);
  row("heap_released_bytes", m.heap_released_bytes);
  row("heap_objects", live_objects(h));
  row("large_objects", m.large_objects);
  row("mspan_inuse_bytes", m.mspan_inuse_bytes);
  row("mspan_sys_bytes", m.mspan_sys_bytes);
  row("metadata_sys_bytes", m.metadata_sys_bytes);
  row("backed_bytes (st_blocks)", h.seg().backed_bytes());
  const verify_report r = verify_heap(h);
  std::printf("  checker: %s\n", r.summary().c_str());
}

// The parent's turn: spans of three classes, objects with known contents.
board* parent_fills(mheap& h) {
  auto meta = h.alloc_large(sizeof(board), false, 1);
  auto* b = static_cast<board*>(static_cast<void*>(h.view().span_base(h.span(*meta))));
  b->count = 0;
  for (std::uint8_t c : {std::uint8_t{3}, std::uint8_t{10}, std::uint8_t{25}}) {
    mcentral central = h.central(span_class::make(c, false));
    auto id = central.cache_span(1);
    mspan& s = h.span(*id);
    for (int k = 0; k < 40; ++k) {  // at most 40 objects a class: class 25 has only 18 per span
      const int i = span_alloc_object(s);
      if (i < 0) break;
      std::byte* p = h.view().span_base(s) + static_cast<std::size_t>(i) * s.elem_size;
      const handle_t hd = h.seg().handle_of(p);
      std::memcpy(p, &hd, sizeof hd);  // each object starts with a pattern of its handle
      const std::uint64_t pat = pattern(hd);
      std::memcpy(p + 8, &pat, sizeof pat);
      b->objects[b->count++] = hd;
    }
    central.uncache_span(*id);  // back to mcentral: partial
  }
  return b;
}

// The child's turn: check every handle, free every other object remotely,
// carve a span and a large object of its own.
int child_turn(const std::string& name, handle_t board_handle) {
  auto att = segment::attach(name);
  if (!att) {
    std::fprintf(stderr, "child: %s\n", att.err().message.c_str());
    return 1;
  }
  mheap h(*att.value());
  auto* b = static_cast<board*>(h.seg().pointer(board_handle));
  for (std::uint64_t k = 0; k < b->count; ++k) {
    const auto* p = static_cast<const std::byte*>(h.seg().pointer(b->objects[k]));
    std::uint64_t pat = 0;
    std::memcpy(&pat, p + 8, sizeof pat);
    if (pat != pattern(b->objects[k])) return 2;
  }
  for (std::uint64_t k = 0; k < b->count; k += 2) {
    object_ref ref;
    if (h.view().object_at(b->objects[k], &ref) != errc::ok) return 3;
    (void)span_push_remote(h.view(), h.span(ref.span), ref.index);  // each object once
  }
  auto mine = h.central(span_class::make(5, true)).cache_span(2);
  for (int k = 0; k < 40; ++k) span_alloc_object(h.span(*mine));
  h.central(span_class::make(5, true)).uncache_span(*mine);
  h.alloc_large(3 << 20, true, 2);
  std::printf("child %d: mapped at %p, checked %llu handles, freed %llu remotely\n", getpid(),
              static_cast<void*>(h.seg().base()), static_cast<unsigned long long>(b->count),
              static_cast<unsigned long long>((b->count + 1) / 2));
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  heap_options o;
  o.name = argc > 1 ? argv[1] : "shmalloc-demo-" + std::to_string(getpid());
  o.capacity = 256ULL << 20;
  auto made = segment::create(o);
  if (!made) {
    std::fprintf(stderr, "heap_demo: %s\n", made.err().message.c_str());
    return 1;
  }
  mheap h(*made.value());
  std::printf("parent %d: heap '%s' mapped at %p, capacity %llu bytes\n", getpid(), o.name.c_str(),
              static_cast<void*>(h.seg().base()), static_cast<unsigned long long>(h.seg().header().capacity));
  board* b = parent_fills(h);
  print_accounts("after the parent's turn", h);

  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) _exit(child_turn(o.name, h.seg().handle_of(b)));
  int status = 0;
  waitpid(pid, &status, 0);
  int rc = WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
  if (rc != 0) std::fprintf(stderr, "heap_demo: the child failed (status %d)\n", status);

  for (std::uint32_t c = 0; c < num_span_classes; ++c) h.central(span_class{static_cast<std::uint8_t>(c)}).sweep();
  print_accounts("after the child's turn and a sweep", h);
  std::printf("scavenged %llu bytes\n", static_cast<unsigned long long>(h.scavenge(0)));
  print_accounts("after scavenging", h);
  if (!verify_heap(h).ok()) rc = 1;
  made.value().reset();
  segment::remove(o.name);
  return rc;
}
