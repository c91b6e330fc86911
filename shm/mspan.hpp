// mspan.hpp: what any process may do with a span it can see.
//
// heap_view is the process-local set of base pointers into a mapped heap
// that both sides need: handle -> page -> span lookups (the free path) and
// span -> object addresses (the allocation path). The span operations below
// follow layout.hpp's rules on who writes what: alloc/free_local only by the
// span's holder, push_remote by anyone, fold_remote by the holder.
#pragma once

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>

#include "shm/check.hpp"
#include "shm/errc.hpp"
#include "shm/layout.hpp"

namespace shmalloc {

class segment;

struct object_ref {
  span_id span;
  std::uint32_t index = 0;
};

// Base pointers into one mapping of a heap; cheap to copy.
struct heap_view {
  std::byte* base = nullptr;
  std::byte* arenas = nullptr;        // base + regions.arenas.offset
  std::uint32_t* page_map = nullptr;  // span_id + 1 per page, 0 = none
  mspan* spans = nullptr;
  std::uint32_t max_pages = 0;
  std::uint32_t max_spans = 0;
  // Pages committed so far (mheap's account; it only grows). Lookups never
  // read page_map beyond it: those entries are not backed by memory.
  const shared_atomic<std::uint64_t>* committed_pages = nullptr;
  shared_atomic<std::uint32_t>* sweep_queue = nullptr;  // mheap_state's: nullptr pushes nothing
  mcache_slot* slots = nullptr;  // the cache slots, whose parked_queue heads parked spans' freers push on
  std::uint32_t max_caches = 0;
  profile_sample* profile = nullptr;  // the profile table (profile.hpp); nullptr: none

  static heap_view of(const segment& seg) noexcept;

  mspan& span(span_id id) const noexcept { return spans[id.value]; }
  span_id span_id_of(const mspan& s) const noexcept { return span_id{static_cast<std::uint32_t>(&s - spans)}; }
  std::byte* span_base(const mspan& s) const noexcept { return arenas + std::uint64_t{s.start.value} * page_size; }
  handle_t handle_of(const void* p) const noexcept { return static_cast<handle_t>(static_cast<const std::byte*>(p) - base); }
  void* pointer(handle_t h) const noexcept { return base + h; }

  // The in-use span covering address p of this mapping, or nil: one
  // unsigned compare rejects anything outside the committed arenas (an
  // unattached view has no committed pages), then the page map decides.
  span_id span_of(const void* p) const noexcept {
    const auto off = static_cast<std::uint64_t>(static_cast<const std::byte*>(p) - arenas);
    const std::uint64_t page = off / page_size;
    if (committed_pages == nullptr || page >= committed_pages->load(std::memory_order_relaxed)) return span_id::nil();
    const std::uint32_t entry = page_map[page];
    if (entry == 0 || entry > max_spans) return span_id::nil();
    return span_id{entry - 1};
  }

  // The in-use span covering handle h, or nil if h is not inside one
  // (outside the arenas, in a free page, or a corrupt page_map entry).
  span_id span_at(handle_t h) const noexcept {  // inline: the free fast path's lookup
    const auto arena_start = static_cast<handle_t>(arenas - base);
    if (h < arena_start) return span_id::nil();
    const std::uint64_t page = (h - arena_start) / page_size;
    if (page >= max_pages || page >= committed_pages->load(std::memory_order_relaxed)) return span_id::nil();
    const std::uint32_t entry = page_map[page];
    if (entry == 0 || entry > max_spans) return span_id::nil();
    return span_id{entry - 1};
  }
  // The object whose first byte is h; errc::bad_handle if h is not an
  // object's start inside an in-use span.
  errc object_at(handle_t h, object_ref* out) const noexcept;
};

// Bytes per object of a span: the class size, or the whole run for a large
// object.
inline std::uint64_t object_bytes(const mspan& s) noexcept {
  return s.elem_size != 0 ? s.elem_size : std::uint64_t{s.npages} * page_size;
}

inline bool is_allocated(const mspan& s, std::uint32_t i) noexcept {
  return (s.alloc_bits[i / 64].load(std::memory_order_relaxed) >> (i % 64)) & 1;
}

// The holder's changes to a word of its span's alloc bits: a relaxed load
// and store, never a read-modify-write (it is the only writer; others, the
// daemon's reports, only read).
inline void set_alloc_bits(shared_atomic<std::uint64_t>& w, std::uint64_t bits) noexcept {
  w.store(w.load(std::memory_order_relaxed) | bits, std::memory_order_relaxed);
}
inline void clear_alloc_bits(shared_atomic<std::uint64_t>& w, std::uint64_t bits) noexcept {
  w.store(w.load(std::memory_order_relaxed) & ~bits, std::memory_order_relaxed);
}

inline std::uint32_t count_allocated(const mspan& s) noexcept {
  std::uint32_t n = 0;
  for (const auto& w : s.alloc_bits) n += static_cast<std::uint32_t>(std::popcount(w.load(std::memory_order_relaxed)));
  return n;
}

// A tiny span's per-block metadata (layout.hpp): the count of objects in
// the block, and the mask of offsets freed since the block was taken. Any
// process changes them atomically.
static_assert(std::atomic_ref<std::int8_t>::is_always_lock_free && std::atomic_ref<std::uint16_t>::is_always_lock_free);
inline constexpr std::int8_t tiny_bias = 64;  // a current block's count carries it: more than a block's 16 objects
inline std::atomic_ref<std::int8_t> tiny_count(const heap_view& v, const mspan& s, std::uint32_t block) noexcept {
  return std::atomic_ref<std::int8_t>(*reinterpret_cast<std::int8_t*>(v.span_base(s) + tiny_counts_offset + block));
}
inline std::atomic_ref<std::uint16_t> tiny_freed_mask(const heap_view& v, const mspan& s, std::uint32_t block) noexcept {
  return std::atomic_ref<std::uint16_t>(
      *reinterpret_cast<std::uint16_t*>(v.span_base(s) + tiny_freed_masks_offset + 2 * std::size_t{block}));
}
// A current block stops being current after `handed_out` objects: its
// count loses the bias. True if that leaves it empty: the caller frees it.
inline bool tiny_retire(const heap_view& v, const mspan& s, std::uint32_t block, std::uint32_t handed_out) noexcept {
  const auto delta = static_cast<std::int8_t>(static_cast<int>(handed_out) - tiny_bias);
  return tiny_count(v, s, block).fetch_add(delta, std::memory_order_acq_rel) + delta == 0;
}

// Holder only: the lowest free slot, marked allocated, or -1 if the span is
// full. The generic scan; the client's fast path keeps a cached word.
std::int32_t span_alloc_object(mspan& s) noexcept;

// Holder only: frees slot i. errc::double_free if it was not allocated.
errc span_free_local(mspan& s, std::uint32_t i) noexcept;

// Any process: marks slot i freed in the span's remote-free bitmap (one
// atomic OR; the object's bytes are not touched), and pushes the span on
// the queue of the process that parked it, if it is parked, else on the
// daemon's sweep queue, if no one has since that queue's taker took it.
// errc::double_free if the bit was already set: the object was freed
// before and not yet folded.
errc span_push_remote(const heap_view& v, mspan& s, std::uint32_t i) noexcept;

// Parked spans (layout.hpp's allocation path, level 3): a process keeps the
// spans it filled, with owner_cache = parked_token(slot), and learns of
// frees into them from its queue of them (mcache_slot::parked_queue).
//
// The holder thread parks s: after this, every free into s is remote and
// the first one pushes s on the slot's queue. If frees came before (they
// were pushed for the daemon, which does not hold s), the parker pushes s
// itself: the token's store and the bitmap's load are seq_cst, as a freer's
// fetch_or and its load of the token, so one of the two sees the other.
void park_span(const heap_view& v, mspan& s, std::uint32_t slot) noexcept;

// The parking process takes slot's queue whole and calls visit(s) for each
// span on it, after clearing its parked_queued (a later free pushes it
// again). Other processes write the queue, so the walk trusts nothing: an
// id past the span table, or more spans than the table holds, ends it (the
// spans lost that way are found by the process's trim). A span can also
// leave a queue while still linked in it: the process's trim may pool it
// and give it back, and the daemon hand it to another process that parks
// it; that process's pushes then relink it, and a walk of the old queue
// wanders into the new one, clearing flags whose spans it cannot claim.
// Those spans wait for their process's trim too. Returns the number of
// spans visited.
template <class Visit>
std::uint32_t take_parked_queue(const heap_view& v, std::uint32_t slot, Visit&& visit) {
  if (v.slots == nullptr || slot >= v.max_caches) return 0;
  std::uint32_t n = 0;
  for (std::uint32_t h = v.slots[slot].parked_queue.exchange(0, std::memory_order_acquire); h != 0 && h <= v.max_spans && n < v.max_spans;
       ++n) {
    mspan& s = v.span(span_id{h - 1});
    h = s.parked_next.load(std::memory_order_relaxed);  // before the clear: a new push rewrites it
    s.parked_queued.exchange(0, std::memory_order_seq_cst);
    visit(s);
  }
  return n;
}

// Makes a parked span this thread's (token): false if it is no longer
// parked by the process of `slot` (another of its threads took it first,
// or it went back to the daemon).
inline bool claim_parked(mspan& s, std::uint32_t slot, std::uint32_t token) noexcept {
  std::uint32_t expected = parked_token(slot);
  return s.owner_cache.compare_exchange_strong(expected, token, std::memory_order_seq_cst, std::memory_order_relaxed);
}

// Holder only: takes the remote-free bitmap and clears those slots'
// alloc_bits. Returns the number of objects folded in. A slot already free
// (freed again after its first free was folded) is skipped and the fold goes
// on, reporting errc::double_free; bits past nelems (written by no correct
// process) are dropped with errc::corrupt. *why gets the first problem.
std::uint32_t span_fold_remote(const heap_view& v, mspan& s, errc* status, std::string* why) noexcept;

// Objects waiting in the remote-free bitmap.
std::uint32_t count_remote_pending(const heap_view& v, const mspan& s) noexcept;

// Whether any object waits in the remote-free bitmap (relaxed: a hint for
// the daemon's sweep, which folds under acquire).
bool remote_pending(const mspan& s) noexcept;

// The daemon: takes every span on the sweep queue, clearing each one's
// sweep_queued (so the next freer pushes it again) before the caller
// looks at its bits, and calls visit(span_id) for each. Clients write the
// queue, so the walk trusts nothing: an id past the span table, or more
// ids than the table holds (a cycle), ends it; the backstop finds what such
// a walk missed. Returns the number of spans visited.
template <class Visit>
std::uint32_t drain_sweep_queue(const heap_view& v, std::uint32_t high_water, Visit&& visit) {
  std::uint32_t n = 0;
  for (std::uint32_t h = v.sweep_queue->exchange(0, std::memory_order_acquire); h != 0 && h <= high_water && n < high_water;
       ++n) {
    const span_id id{h - 1};
    mspan& s = v.span(id);
    h = s.sweep_next.load(std::memory_order_relaxed);  // before the clear: a new push rewrites it
    // seq_cst, paired with the freer's: either the freer saw the clear and
    // pushes again, or this thread's fold that follows sees its bit.
    s.sweep_queued.exchange(0, std::memory_order_seq_cst);
    visit(id);
  }
  return n;
}

}  // namespace shmalloc
