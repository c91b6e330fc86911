// trim.cpp: trimming and decay. What a process caches for speed (each
// thread's spans and spares, the pool, freed large objects) goes back to the
// daemon once it has sat unused for SHMALLOC_CACHE_DECAY_MS, checked from the
// slow paths (maybe_trim, and free_large for a process that only allocates
// large objects); shmalloc_trim gives back everything at once, and detach
// every cached large object (flush_large_cache).
#include <atomic>
#include <iterator>
#include <mutex>
#include <vector>

#include "client/runtime.hpp"
#include "shm/crash_point.hpp"

namespace shmalloc::client::detail {

std::atomic<std::uint64_t> g_cache_decay_ns{default_cache_decay_ns};  // SHMALLOC_CACHE_DECAY_MS, read at attach

namespace {

// REQUIRES: r.mu held. Gives back the cached large objects that keep(c)
// does not want kept.
template <class Keep>
void trim_large_cache(runtime& r, Keep keep) {
  std::vector<runtime::cached_large> gone;
  for (auto it = r.large_cache.begin(); it != r.large_cache.end();) {
    std::size_t kept = 0;
    for (const auto& c : it->second) {
      if (keep(c))
        it->second[kept++] = c;
      else
        gone.push_back(c);
    }
    it->second.resize(kept);
    it = kept == 0 ? r.large_cache.erase(it) : std::next(it);
  }
  r.large_cache_count -= gone.size();
  for (const auto& c : gone) {
    r.large_cache_bytes -= std::uint64_t{c.npages} * page_size;
    if (!still_ours(r, c)) {  // freed twice elsewhere: not ours to free again
      r.held.erase(c.span);
      continue;
    }
    const handle_t h = g_view.handle_of(g_view.span_base(g_view.span(span_id{c.span})));
    SHMALLOC_CRASH_POINT("trim.large_free");
    if (request_locked(r, proto::msg::free_large, proto::encode(proto::free_large_msg{h}))) r.held.erase(c.span);
  }
}

}  // namespace

// REQUIRES: r.mu held. Gives every cached large object back (detach).
void flush_large_cache(runtime& r) {
  trim_large_cache(r, [](const runtime::cached_large&) { return false; });
}

namespace {

// REQUIRES: r.mu held. Gives s, which this thread held, to the process
// (drop_span: pooled or parked), whose trim decides what the daemon gets.
void give_back_locked(runtime& r, std::uint8_t spc, mspan& s) {
  SHMALLOC_CRASH_POINT("trim.give_back");
  drop_span(r, spc, s);
}

// Calls f(s) for each span this process holds parked (r.held's small spans
// whose owner_cache is our parked token).
template <class F>
void for_each_parked_locked(runtime& r, std::uint32_t slot, F f) {
  for (const std::uint32_t id : r.held) {
    if (id >= g_view.max_spans) continue;
    mspan& s = g_view.span(span_id{id});
    if (s.owner_cache.load(std::memory_order_relaxed) == parked_token(slot)) f(s);
  }
}

// REQUIRES: r.mu held. The parked queue's backstop: a parked span freed
// into whose notice was lost (a freer killed between flag and push, a
// scribbled queue, a flag left set by a race with a reconnect) is pooled
// here, once per decay period. O(spans held).
void pool_freed_parked_locked(runtime& r, mcache* mc) {
  const std::uint32_t slot = r.parked_slot.load(std::memory_order_relaxed);
  for_each_parked_locked(r, slot, [&](mspan& s) {
    if (remote_pending(s)) unpark_locally(r, mc, s, slot, ~0u);
  });
}

}  // namespace

// REQUIRES: r.mu held. Every parked span goes on the full list (detach).
void unpark_all_locked(runtime& r) {
  const std::uint32_t slot = r.parked_slot.load(std::memory_order_relaxed);
  for_each_parked_locked(r, slot, [&](mspan& s) {
    if (claim_parked(s, slot, 0)) r.full.push_back(g_view.span_id_of(s).value);
  });
}

// REQUIRES: r.mu held. The process's parked spans name new_slot's queue
// from now on (a reconnect gave the process another first slot). What the
// old queue holds is dropped (its spans' flags cleared) and every parked
// span with frees pending is pushed on the new one.
void repark_locked(runtime& r, std::uint32_t new_slot) {
  const std::uint32_t old = r.parked_slot.load(std::memory_order_relaxed);
  if (old == new_slot) return;
  take_parked_queue(g_view, old, [](mspan&) {});
  if (new_slot < g_view.max_caches) g_view.slots[new_slot].parked_queue.store(0, std::memory_order_relaxed);
  r.parked_slot.store(new_slot, std::memory_order_relaxed);
  for_each_parked_locked(r, old, [&](mspan& s) {
    std::uint32_t expected = parked_token(old);
    if (s.owner_cache.compare_exchange_strong(expected, parked_token(new_slot), std::memory_order_seq_cst, std::memory_order_relaxed))
      park_span(g_view, s, new_slot);
  });
}

// REQUIRES: r.mu held. Gives the thread's spans of every span class it has
// not allocated from since its last trim to the process (pooled, or parked
// while objects in them are live), and of the other classes the spares that
// hold no live object and were not current since the last trim, past the
// first two. (Giving back every such spare slowed the next steady state of
// the mixed benchmark by up to two times, for a reason not found.) With
// `everything`, every span of every class that holds no live object. The
// tiny class keeps its spans: its current block is counted in a way only
// its thread can retire.
void trim_thread_locked(runtime& r, mcache* mc, bool everything) {
  for (std::uint32_t spc = 0; spc < num_span_classes; ++spc) {
    if (spc == tiny_span_class) continue;
    mcache_entry& e = mc->alloc[spc];
    // Active: its slow path ran (the bit), or its fast path took a slot.
    const bool active = ((mc->active[spc / 64] >> (spc % 64)) & 1) != 0 || e.free_bits != mc->free_bits_at_trim[spc];
    const bool idle = !everything && !active;
    mc->spares[spc].filter(
        [&](spare_queue::entry spare, std::uint8_t k) {
          if (idle) return false;
          if (!everything && (spare.used || k < mcache::spares_kept_by_trim)) return true;
          mspan& s = g_view.span(span_id{spare.id});
          fold(mc, s);
          return count_allocated(s) != 0;
        },
        [&](spare_queue::entry spare) { give_back_locked(r, static_cast<std::uint8_t>(spc), g_view.span(span_id{spare.id})); });
    if (mspan* s = e.span(); s != nullptr && (idle || (everything && (fold(mc, *s), count_allocated(*s) == 0)))) {
      give_back_locked(r, static_cast<std::uint8_t>(spc), *s);
      e = mcache_entry{};
    }
    mc->free_bits_at_trim[spc] = e.free_bits;
  }
  for (auto& word : mc->active) word = 0;
  release_full_locked(r);
}

// REQUIRES: r.mu held. Of each class's pooled spans (parked spans freed
// into first join them), those beyond what its threads took (or refilled)
// during the last decay period; large objects
// cached that long; with `everything`, all of both. A class whose demand
// stopped also starts its refill batches small again.
void trim_process_locked(runtime& r, bool everything) {
  const std::uint32_t epoch = r.trim_epoch.load(std::memory_order_relaxed);
  // Parked spans freed into are pooled first: idle ones among them go back.
  drain_parked(r, t_cache, ~0u);
  pool_freed_parked_locked(r, t_cache);
  for (std::uint32_t spc = 0; spc < num_span_classes; ++spc) {
    const auto c = static_cast<std::uint8_t>(spc);
    const std::uint32_t demand = r.pool_demand[spc].exchange(0, std::memory_order_relaxed);
    const std::uint32_t keep = everything ? 0 : demand;
    const std::uint32_t pooled = r.pool.size(c);
    for (std::uint32_t k = keep; k < pooled; ++k) {
      const std::int64_t id = r.pool.pop(c);
      if (id < 0) break;
      SHMALLOC_CRASH_POINT("trim.pool_pop");
      r.full.push_back(static_cast<std::uint32_t>(id));
    }
    if (demand == 0) r.batch[spc] = first_batch;
  }
  release_full_locked(r);
  SHMALLOC_CRASH_POINT("trim.process_large");
  trim_large_cache(r, [&](const runtime::cached_large& c) { return !everything && c.epoch + 1 >= epoch; });
  r.trim_epoch.store(epoch + 1, std::memory_order_relaxed);
}

// REQUIRES: r.mu held. Trims the process's caches if a decay period has
// passed since they were last trimmed (at time t).
void trim_process_if_due_locked(runtime& r, std::uint64_t decay, std::uint64_t t) {
  if (t - r.last_trim_ns < decay) return;
  trim_process_locked(r, false);
  r.last_trim_ns = t;
}

// Trims this thread's cache, and the process's, if a decay period has
// passed since each was last trimmed.
void maybe_trim(runtime& r, mcache* mc) {
  const std::uint64_t decay = g_cache_decay_ns.load(std::memory_order_relaxed);
  if (decay == never) return;
  const std::uint64_t t = now_ns();
  if (t - mc->last_trim_ns < decay) return;
  // Only tried: a free may come here from a path that holds the lock
  // (release_thread_cache's drops), and a trim can always wait.
  std::unique_lock lock(r.mu, std::try_to_lock);
  if (!lock.owns_lock() || !r.attached) return;
  trim_thread_locked(r, mc, false);
  mc->last_trim_ns = t;
  trim_process_if_due_locked(r, decay, t);
}

}  // namespace shmalloc::client::detail
