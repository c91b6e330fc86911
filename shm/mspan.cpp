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
  v.sweep_queue = &seg.heap().sweep_queue;
  v.slots = seg.at<mcache_slot>(h.regions.caches.offset);
  v.max_caches = h.max_caches;
  v.profile = seg.at<profile_sample>(h.regions.profile.offset);
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
    const std::uint64_t free = ~s.alloc_bits[w].load(std::memory_order_relaxed);
    if (free == 0) continue;
    const std::uint32_t i = w * 64 + static_cast<std::uint32_t>(std::countr_zero(free));
    if (i >= s.nelems) return -1;
    set_alloc_bits(s.alloc_bits[w], std::uint64_t{1} << (i % 64));
    ++s.alloc_count;
    return static_cast<std::int32_t>(i);
  }
  return -1;
}

errc span_free_local(mspan& s, std::uint32_t i) noexcept {
  if (i >= s.nelems) return errc::bad_handle;
  const std::uint64_t bit = std::uint64_t{1} << (i % 64);
  if ((s.alloc_bits[i / 64].load(std::memory_order_relaxed) & bit) == 0) return errc::double_free;
  clear_alloc_bits(s.alloc_bits[i / 64], bit);
  --s.alloc_count;
  return errc::ok;
}

namespace {
std::uint32_t bitmap_words_of(const mspan& s) noexcept { return (std::uint32_t{s.nelems} + 63) / 64; }
std::uint64_t valid_bits(const mspan& s, std::uint32_t w) noexcept {
  const std::uint32_t valid = s.nelems - w * 64;
  return valid >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << valid) - 1;
}
}  // namespace

namespace {
// The first freer into a span since the daemon last took it off the queue
// pushes it, whoever holds the span: a span a client holds now may be the
// daemon's by the time the daemon looks (the daemon skips the others), and
// reading the state first would race with that hand-back. The loads and
// the flag's exchange are seq_cst, paired with the daemon's clear-then-fold
// (drain_sweep_queue): a freer that finds the flag set was ordered before
// the clear, so the fold after it sees the freer's bit. A freer killed
// between the flag and the push leaves the span to the daemon's backstop.
void push_for_sweep(const heap_view& v, mspan& s) noexcept {
  shared_atomic<std::uint8_t>& queued = s.sweep_queued;
  if (queued.load(std::memory_order_seq_cst) != 0 || queued.exchange(1, std::memory_order_seq_cst) != 0) return;
  const std::uint32_t me = v.span_id_of(s).value + 1;
  std::uint32_t head = v.sweep_queue->load(std::memory_order_relaxed);
  do {
    s.sweep_next.store(head, std::memory_order_relaxed);
  } while (!v.sweep_queue->compare_exchange_weak(head, me, std::memory_order_release, std::memory_order_relaxed));
}

// The first freer into a parked span since its process took it off its
// queue pushes it there. A slot past the table (owner_cache is written by
// clients) pushes nothing: the span's process finds it at its trim.
void push_parked(const heap_view& v, mspan& s, std::uint32_t slot) noexcept {
  if (v.slots == nullptr || slot >= v.max_caches) return;
  shared_atomic<std::uint8_t>& queued = s.parked_queued;
  if (queued.load(std::memory_order_seq_cst) != 0 || queued.exchange(1, std::memory_order_seq_cst) != 0) return;
  shared_atomic<std::uint32_t>& queue = v.slots[slot].parked_queue;
  const std::uint32_t me = v.span_id_of(s).value + 1;
  std::uint32_t head = queue.load(std::memory_order_relaxed);
  do {
    s.parked_next.store(head, std::memory_order_relaxed);
  } while (!queue.compare_exchange_weak(head, me, std::memory_order_release, std::memory_order_relaxed));
}
}  // namespace

void park_span(const heap_view& v, mspan& s, std::uint32_t slot) noexcept {
  s.owner_cache.store(parked_token(slot), std::memory_order_seq_cst);
  if (remote_pending(s)) push_parked(v, s, slot);
}

errc span_push_remote(const heap_view& v, mspan& s, std::uint32_t i) noexcept {
  const std::uint64_t bit = std::uint64_t{1} << (i % 64);
  // Release: what this thread did with the object happens before whoever
  // folds the bit hands the object out again. seq_cst for push_for_sweep
  // and for park_span's pairing.
  if ((s.remote_bits[i / 64].fetch_or(bit, std::memory_order_seq_cst) & bit) != 0) return errc::double_free;
  tsan_release_cross_process();
  if (const std::uint32_t owner = s.owner_cache.load(std::memory_order_seq_cst); is_parked_token(owner))
    push_parked(v, s, owner & ~parked_flag);
  else if (v.sweep_queue != nullptr)
    push_for_sweep(v, s);
  return errc::ok;
}

std::uint32_t span_fold_remote(const heap_view&, mspan& s, errc* status, std::string* why) noexcept {
  *status = errc::ok;
  std::uint32_t folded = 0;
  for (std::uint32_t w = 0; w < bitmap_words_of(s); ++w) {
    // A plain load first: most words hold nothing, and the exchange is a
    // locked instruction. Acquire even so (free on x86): the word may have
    // been emptied by another process (the daemon's sweep), and this load is
    // what orders the freers' last uses of the objects before this thread
    // hands them out again. Across processes the socket that handed the span
    // over orders them too, but TSan sees only this process.
    if (s.remote_bits[w].load(std::memory_order_acquire) == 0) continue;
    std::uint64_t freed = s.remote_bits[w].exchange(0, std::memory_order_acquire);
    if (const std::uint64_t stray = freed & ~valid_bits(s, w); stray != 0) {
      if (*status == errc::ok && why)
        *why = "remote-free bits past the last object of span at page " + std::to_string(s.start.value);
      *status = errc::corrupt;
      freed &= ~stray;
    }
    if (const std::uint64_t twice = freed & ~s.alloc_bits[w].load(std::memory_order_relaxed); twice != 0) {
      // Freed again after the first free was folded: reported, not folded.
      if (why && *status != errc::double_free && *status != errc::corrupt)
        *why = "object " + std::to_string(w * 64 + static_cast<std::uint32_t>(std::countr_zero(twice))) +
               " of span at page " + std::to_string(s.start.value) + " was freed twice (remote free of a free object)";
      if (*status == errc::ok) *status = errc::double_free;
      freed &= ~twice;
    }
    clear_alloc_bits(s.alloc_bits[w], freed);
    const auto n = static_cast<std::uint32_t>(std::popcount(freed));
    s.alloc_count = static_cast<std::uint16_t>(s.alloc_count - n);
    folded += n;
  }
  return folded;
}

std::uint32_t count_remote_pending(const heap_view&, const mspan& s) noexcept {
  std::uint32_t n = 0;
  for (std::uint32_t w = 0; w < bitmap_words_of(s); ++w)
    n += static_cast<std::uint32_t>(std::popcount(s.remote_bits[w].load(std::memory_order_acquire) & valid_bits(s, w)));
  return n;
}

bool remote_pending(const mspan& s) noexcept {
  // seq_cst: the second half of drain_sweep_queue's pairing (a plain load
  // on x86-64).
  for (std::uint32_t w = 0; w < bitmap_words_of(s); ++w)
    if (s.remote_bits[w].load(std::memory_order_seq_cst) != 0) return true;
  return false;
}

}  // namespace shmalloc
