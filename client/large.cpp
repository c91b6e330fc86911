// large.cpp: objects over max_small_size, each on a span of its own from
// the daemon. Owns their allocation (alloc_large), their free (free_large:
// a double free of a large object is caught here, and a free while the
// daemon is away is deferred to the next reconnect), and the process's
// cache of freed large objects, which repeated large allocations take
// without a round trip. Giving that cache back is trim.cpp's.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include "client/runtime.hpp"
#include "shm/crash_point.hpp"
#include "shm/profile.hpp"

namespace shmalloc::client::detail {

namespace {

// A process that replaces large objects of random sizes frees about as many
// as it allocates, but a freed one serves only requests of about its size,
// and how many of each size are live wanders: the cache is a buffer against
// that walk, and a walk that reaches either end (no object of the size
// cached, or no room for one more) costs a round trip. 8 entries left 30% of
// a random mix of 5 to 8 pages to round trips, 64 left 3%; 256, within a
// byte budget. (Going further needs large objects carved by the process out
// of pages it holds, which it does not do: docs/benchmarks.md.)
constexpr std::size_t large_cache_entries = 256;
constexpr std::uint64_t large_cache_max_bytes = 64ULL << 20;

// REQUIRES: r.mu held. The smallest cached large span of the right size (at
// most a quarter bigger), or nullptr; still free in the heap's eyes (its
// caller marks it).
void* take_cached_large(runtime& r, std::size_t size) noexcept {
  const std::uint64_t need = (size + page_size - 1) / page_size;
  // A size's list stays when it empties (its node and storage are reused
  // by the next free of that size: a pair of large allocation and free
  // would otherwise allocate and free both); the trim drops empty lists.
  for (auto it = r.large_cache.lower_bound(static_cast<std::uint32_t>(std::min<std::uint64_t>(need, ~0u)));
       it != r.large_cache.end() && it->first <= need + need / 4;) {
    if (it->second.empty()) {
      ++it;
      continue;
    }
    const runtime::cached_large c = it->second.back();
    it->second.pop_back();
    --r.large_cache_count;
    r.large_cache_bytes -= std::uint64_t{c.npages} * page_size;
    if (!still_ours(r, c)) {
      r.held.erase(c.span);
      continue;
    }
    SHMALLOC_CRASH_POINT("large.cache_take");
    return g_view.span_base(g_view.span(span_id{c.span}));
  }
  return nullptr;
}

// A large object's free, counted in the freeing thread's block (if it has
// one) just before the object is free in the heap's eyes: a death between
// the two is a few instructions; counting after the daemon's reply lost the
// count of every free whose process died waiting for it (the daemon still
// frees what a dead peer's request asked).
void count_large_free(mcache* mc, std::uint64_t object_bytes) noexcept {
  if (mc == nullptr) return;
  bump(mc->stats->large_frees, std::uint64_t{1});
  bump(mc->stats->large_free_bytes, object_bytes);
}

// REQUIRES: r.mu held. Keeps a large object this process allocated, if
// the cache has room (and counts its free); false otherwise.
bool cache_large(runtime& r, void* p, const mspan& s, mcache* mc, std::uint64_t object_bytes) noexcept {
  const std::uint32_t id = g_view.span_id_of(s).value;
  // One of ours cached is free in the heap's eyes (below): freeing it again
  // is a double free. (Another process's second free of it goes to the
  // daemon, and our trim drops it: still_ours.)
  if (s.owner_client == r.client_id && !is_allocated(s, 0)) bad_free(p, "double free (of a large object)");
  const std::uint64_t bytes = std::uint64_t{s.npages} * page_size;
  if (s.owner_client != r.client_id || r.large_cache_count >= large_cache_entries ||
      r.large_cache_bytes + bytes > large_cache_max_bytes)
    return false;
  count_large_free(mc, object_bytes);
  // Free in the heap's eyes while it waits here, so that if this process
  // dies the daemon frees it instead of keeping it as a live object
  // (request_handler::reclaim); its holder writes a span's alloc bits.
  // Before it is listed: a death in between leaves it to that reclaim too.
  clear_alloc_bits(g_view.span(span_id{id}).alloc_bits[0], 1);
  SHMALLOC_CRASH_POINT("large.cache_put");
  // Constructed in place: a braced temporary is built on the stack in pieces and
  // copied out whole, which stalls on store forwarding (2 ns a free).
  r.large_cache[s.npages].emplace_back(id, s.npages, s.start.value, r.trim_epoch.load(std::memory_order_relaxed));
  ++r.large_cache_count;
  r.large_cache_bytes += bytes;
  SHMALLOC_CRASH_POINT("large.cache_put_done");
  return true;
}

SHMALLOC_SLOW_PATH void* take_large(std::size_t size, bool noscan) noexcept {
  runtime& r = rt();
  std::lock_guard lock(r.mu);
  if (!r.attached && attach_locked(r, nullptr) != 0) return nullptr;
  if (void* p = take_cached_large(r, size)) return p;
  SHMALLOC_CRASH_POINT("large.alloc_request");
  auto body = request_locked(r, proto::msg::alloc_large, proto::encode(proto::alloc_large_msg{size, noscan}));
  if (!body) return nullptr;
  auto large = proto::decode_large(body.value());
  if (!large) return nullptr;
  tsan_acquire_cross_process();  // as for a refill: its pages may have held pushed objects
  SHMALLOC_CRASH_POINT("large.alloc_reply");
  r.held.insert(large->span_id);
  return g_view.pointer(large->handle);  // free in the heap's eyes, as the daemon hands it over (on_alloc_large)
}

}  // namespace

// The object is taken free in the heap's eyes (from the daemon or this
// process's cache), counted, and marked allocated last, just before it is
// returned: a process that dies before has the daemon's reclaim free it,
// and what a death can lose is the few instructions from here to where the
// caller stores the pointer (the shared cache's pending slot, say).
SHMALLOC_SLOW_PATH void* alloc_large_unsampled(std::size_t size, bool noscan) noexcept {
  void* p = take_large(size, noscan);
  if (p == nullptr) return nullptr;
  mspan& s = g_view.span(g_view.span_of(p));
  SHMALLOC_CRASH_POINT("large.alloc_taken");
  // Counted in this thread's block, which a thread whose first object is
  // large must open (else a free counted elsewhere would leave it one short).
  if (mcache* mc = ensure_cache(); mc != nullptr) {
    bump(mc->stats->large_allocs, std::uint64_t{1});
    // The span's pages, which a cached span may have more of than asked:
    // what its free counts.
    bump(mc->stats->large_alloc_bytes, object_bytes(s));
  }
  set_alloc_bits(s.alloc_bits[0], 1);
  return p;
}

// A large object is its own span, so a sampled one's free is seen here.
SHMALLOC_SLOW_PATH void* alloc_large(std::size_t size, bool noscan) noexcept {
  if (SHMALLOC_UNLIKELY(profiling())) {
    if (mcache* mc = ensure_cache(); mc != nullptr && profile_due(mc, size)) return alloc_sampled(size, noscan);
  }
  return alloc_large_unsampled(size, noscan);
}

SHMALLOC_SLOW_PATH void free_large(void* p, mspan& s) noexcept {
  runtime& r = rt();
  const std::uint64_t bytes = object_bytes(s);
  mcache* mc = ensure_cache();
  {
    std::lock_guard lock(r.mu);
    const std::uint64_t h = g_view.handle_of(p);
    if (std::find(r.deferred_large_frees.begin(), r.deferred_large_frees.end(), h) != r.deferred_large_frees.end())
      bad_free(p, "double free (of a large object)");
    profile_release(g_view, s);  // before it is cached or freed: a sample is a live object
    const bool up = r.attached || attach_locked(r, nullptr) == 0;
    if (!cache_large(r, p, s, mc, bytes)) {
      count_large_free(mc, bytes);
      // Ours: free in the heap's eyes before it is asked, so that a death
      // before the request is written has the daemon's reclaim free it.
      // Another process's object is lost by such a death (in flight).
      if (s.owner_client == r.client_id) clear_alloc_bits(s.alloc_bits[0], 1);
      if (!up) {
        r.deferred_large_frees.push_back(h);  // the daemon is away: freed when the library reconnects
      } else {
        SHMALLOC_CRASH_POINT("large.free_request");
        auto done = request_locked(r, proto::msg::free_large, proto::encode(proto::free_large_msg{h}));
        SHMALLOC_CRASH_POINT("large.free_reply");
        if (!done && done.code() == errc::unavailable)
          r.deferred_large_frees.push_back(h);
        else if (!done)
          bad_free(p, done.err().message.c_str());
        else
          r.held.erase(g_view.span_id_of(s).value);
      }
    }
    // A process that only allocates large objects trims from here.
    if (const std::uint64_t decay = g_cache_decay_ns.load(std::memory_order_relaxed);
        ++r.large_calls % trim_check_every == 0 && decay != never)
      trim_process_if_due_locked(r, decay, now_ns());
  }
}

}  // namespace shmalloc::client::detail
