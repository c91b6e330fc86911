#include "shm/mspan.hpp"

#include "shm/segment.hpp"

namespace shmalloc {

heap_view heap_view::of(const segment& seg) noexcept {
  const segment_header& h = seg.header();
  heap_view v;
  v.base = seg.base();
  v.arenas = seg.base() + h.regions.arenas.offset;
  v.page_map = seg.at<std::uint32_t>(h.regions.page_map.offset);
  v.spans = seg.at<mspan>(h.regions.spans.offset);
  v.max_pages = h.max_pages;
  v.max_spans = h.max_spans;
  v.committed_pages = &seg.heap().accounts.pages_committed;
  v.sweep_wanted = seg.heap().sweep_wanted;
  return v;
}

errc heap_view::object_at(handle_t h, object_ref* out) const noexcept {
  const span_id id = span_at(h);
  if (!id) return errc::bad_handle;
  const mspan& s = span(id);
  const mspan_state st = s.state.load(std::memory_order_relaxed);
  if (st == mspan_state::dead) return errc::bad_handle;
  const std::uint64_t offset = h - handle_of(span_base(s));
  const std::uint64_t size = object_bytes(s);
  if (offset % size != 0 || offset / size >= s.nelems) return errc::bad_handle;
  *out = {id, static_cast<std::uint32_t>(offset / size)};
  return errc::ok;
}

std::int32_t span_alloc_object(mspan& s) noexcept {
  for (std::uint32_t w = 0; w * 64 < s.nelems; ++w) {
    const std::uint64_t free = ~s.alloc_bits[w];
    if (free == 0) continue;
    const std::uint32_t i = w * 64 + static_cast<std::uint32_t>(std::countr_zero(free));
    if (i >= s.nelems) return -1;
    s.alloc_bits[w] |= std::uint64_t{1} << (i % 64);
    ++s.alloc_count;
    return static_cast<std::int32_t>(i);
  }
  return -1;
}

errc span_free_local(mspan& s, std::uint32_t i) noexcept {
  if (i >= s.nelems) return errc::bad_handle;
  const std::uint64_t bit = std::uint64_t{1} << (i % 64);
  if ((s.alloc_bits[i / 64] & bit) == 0) return errc::double_free;
  s.alloc_bits[i / 64] &= ~bit;
  --s.alloc_count;
  return errc::ok;
}

namespace {
std::uint32_t& link_of(const heap_view& v, const mspan& s, std::uint32_t i) noexcept {
  return *reinterpret_cast<std::uint32_t*>(v.span_base(s) + std::uint64_t{i} * object_bytes(s));
}
}  // namespace

void span_push_remote(const heap_view& v, mspan& s, std::uint32_t i) noexcept {
  // Read before the push: once pushed, the object may be folded, the span
  // freed and the descriptor reused by the daemon.
  const bool daemon_holds = s.state.load(std::memory_order_relaxed) == mspan_state::central;
  const std::uint8_t spc = s.span_class;
  std::uint32_t& link = link_of(v, s, i);
  std::uint32_t top = s.remote_free.load(std::memory_order_relaxed);
  do {
    link = top;  // published by the release CAS below
  } while (!s.remote_free.compare_exchange_weak(top, i + 1, std::memory_order_release, std::memory_order_relaxed));
  tsan_release_cross_process();
  // A span the daemon holds is folded by the daemon: ask for a sweep of its
  // class. Load first, so that many freers of one class mostly share the
  // line instead of bouncing it. A push the flag misses (the daemon took
  // the span back just after the state was read, or cleared the flag in
  // between) waits for the daemon's periodic sweep of every span.
  if (daemon_holds && v.sweep_wanted != nullptr) {
    shared_atomic<std::uint8_t>& wanted = v.sweep_wanted[spc];
    if (wanted.load(std::memory_order_relaxed) == 0) wanted.store(1, std::memory_order_release);
  }
}

std::uint32_t span_fold_remote(const heap_view& v, mspan& s, errc* status, std::string* why) noexcept {
  *status = errc::ok;
  // A plain load first: most folds find nothing, and the exchange is a
  // locked instruction. Acquire even so (free on x86): the stack may have
  // been emptied by another process (the daemon's sweep), and this load is
  // what orders the pushers' writes into the objects (their links) before
  // this thread reuses them. Across processes the socket that handed the
  // span over orders them too, but TSan sees only this process.
  if (s.remote_free.load(std::memory_order_acquire) == 0) return 0;
  std::uint32_t top = s.remote_free.exchange(0, std::memory_order_acquire);
  std::uint32_t folded = 0;
  // A well-formed stack has at most nelems entries. An object pushed a
  // second time while its first push is still pending turns the stack into a
  // cycle; the step bound ends that walk.
  for (std::uint32_t steps = 0; top != 0; ++steps) {
    const std::uint32_t i = top - 1;
    if (i >= s.nelems || steps > s.nelems) {
      *status = errc::corrupt;
      if (why) *why = "remote-free list of span at page " + std::to_string(s.start.value) + " is corrupt";
      return folded;
    }
    top = link_of(v, s, i);
    if (span_free_local(s, i) != errc::ok) {
      // Freed twice, but after its first free was folded: the link is the
      // second push's, so the rest of the stack is intact. Keep folding.
      if (*status == errc::ok && why)
        *why = "object " + std::to_string(i) + " of span at page " + std::to_string(s.start.value) +
               " was freed twice (remote free of a free object)";
      *status = errc::double_free;
      continue;
    }
    ++folded;
  }
  return folded;
}

std::uint32_t count_remote_pending(const heap_view& v, const mspan& s) noexcept {
  std::uint32_t n = 0;
  for (std::uint32_t top = s.remote_free.load(std::memory_order_acquire); top != 0 && n <= s.nelems; ++n)
    top = top - 1 < s.nelems ? link_of(v, s, top - 1) : 0;
  return n;
}

}  // namespace shmalloc
