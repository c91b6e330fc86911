// mcentral.hpp: per span class, the spans the daemon holds (Go's mcentral).
//
// "partial" spans have at least one free slot; "full" spans have none
// except, perhaps, objects other processes freed since the daemon last
// looked (pending in the span's remote-free bitmap). Sweeping folds those in:
// a span that gains free slots moves to partial, and a span left with no
// object goes back to mheap, so memory never stays stuck in one size class.
//
// cache_span hands a span with free slots to a client (Go's cacheSpan):
// partial first, then full spans with pending remote frees (at most
// sweep_budget of them, as Go's spanBudget), then a fresh span from mheap.
// uncache_span takes one back. Both run in the daemon only, under its heap
// lock (service/daemon.hpp), one call at a time.
#pragma once

#include <cstdint>

#include "shm/errc.hpp"
#include "shm/layout.hpp"

namespace shmalloc {

class mheap;

class mcentral {
 public:
  static constexpr std::uint32_t sweep_budget = 100;

  mcentral(mheap& heap, span_class spc) noexcept;

  // A span with at least one free slot, now held by client owner.
  result<span_id> cache_span(std::uint32_t owner);
  // A span a client gives back (or the daemon takes back from a dead
  // client): its bitmap is recounted and its remote frees folded in.
  error uncache_span(span_id id);
  // Folds remote frees into up to budget spans this class holds. Returns
  // the number of spans returned to mheap.
  std::uint32_t sweep(std::uint32_t budget = sweep_budget);
  // Folds the remote frees pending in one span of this class on its lists
  // (state central; any other span is left alone). True if the span went
  // back to mheap. The daemon calls it for each span on the sweep queue
  // (mheap_state::sweep_queue), and its backstop for a bounded stretch of
  // span ids per tick, instead of walking every list.
  bool sweep_span(span_id id);

  // Files a span the daemon holds on the list its alloc_count calls for, or
  // frees it if empty (mheap::rebuild, after the lists were emptied).
  void relink(span_id id) { settle(id, nullptr); }

  mcentral_state& state() const noexcept { return *state_; }

 private:
  enum class list { partial, full };
  void push(list l, span_id id) noexcept;
  void unlink(list l, span_id id) noexcept;
  span_id& head(list l) noexcept;
  std::uint32_t& count(list l) noexcept;
  // Folds the span's remote frees; a double free or a stray bit found
  // there is counted in heap_accounts::remote_free_errors and returned.
  error fold(span_id id);
  // Folds remote frees and files the span on the list its count calls for
  // (or frees it). Returns true if the span went back to mheap.
  bool settle(span_id id, error* problem);
  span_id take_swept_full();
  span_id hand_out(span_id id, std::uint32_t owner) noexcept;

  mheap* heap_;
  span_class spc_;
  mcentral_state* state_;
};

}  // namespace shmalloc
