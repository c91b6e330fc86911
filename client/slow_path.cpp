// slow_path.cpp: the allocation slow paths and the thread caches. Owns the
// static empty cache and t_cache (every thread starts on the empty cache),
// opening a thread's cache and giving it back at thread exit
// (ensure_cache, release_thread_cache, the process's spare cache slots),
// alloc_slow (the rest of the current span, spares, the pool, a refill from
// the daemon), spans taken into and dropped from a thread's cache, the full
// list given back in batches, and the tiny allocator's slow path.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "client/runtime.hpp"
#include "shm/crash_point.hpp"

namespace shmalloc::client {

namespace detail {

namespace {

constinit stats_block dummy_stats{};

constexpr std::uint16_t max_batch = proto::max_refill;
constexpr std::uint64_t hot_refill_ns = 50'000'000;  // refills closer than this grow the batch
constexpr std::uint8_t max_spares_looked = 4;  // per switch (switch_to_spare)
// Slots of ended threads a process keeps for new ones (runtime::spare_slots);
// they count against the daemon's --max-caches-per-client (default 256).
constexpr std::size_t max_spare_slots = 16;

}  // namespace

constinit mcache empty_cache{.alloc = {}, .token = ~0u, .slot = 0, .stats = &dummy_stats};

namespace {
// REQUIRES: r.mu held. A small span released: no longer ours.
void forget_span_locked(runtime& r, std::uint32_t id) {
  if (r.held.erase(id) == 0 || id >= g_view.max_spans) return;
  if (const std::uint8_t spc = g_view.span(span_id{id}).span_class; spc < num_span_classes && r.class_spans[spc] > 0)
    --r.class_spans[spc];
}
}  // namespace

// REQUIRES: r.mu held. Gives the full list back to the daemon.
void release_full_locked(runtime& r) {
  for (std::size_t at = 0; at < r.full.size(); at += proto::max_release) {
    const std::size_t n = std::min<std::size_t>(proto::max_release, r.full.size() - at);
    std::vector<std::uint32_t> part(r.full.begin() + static_cast<std::ptrdiff_t>(at),
                                    r.full.begin() + static_cast<std::ptrdiff_t>(at + n));
    SHMALLOC_CRASH_POINT("release.request");
    if (request_locked(r, proto::msg::release, proto::encode(proto::span_list_msg{part})))
      for (std::uint32_t id : part) forget_span_locked(r, id);
  }
  SHMALLOC_CRASH_POINT("release.done");
  r.full.clear();
}

namespace {

bool has_free_slot(const mspan& s) noexcept {
  for (std::uint32_t w = 0; w * 64 < s.nelems; ++w) {
    const std::uint32_t valid = s.nelems - w * 64;
    const std::uint64_t mask = valid >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << valid) - 1;
    if ((~s.alloc_bits[w].load(std::memory_order_relaxed) & mask) != 0) return true;
  }
  return false;
}

// Loads into e the first word of s in [from, to) with a free slot.
// When there is none, e keeps pointing at s (its span() stays s) with no
// free bits.
bool load_word(mcache_entry& e, mspan& s, std::uint32_t from, std::uint32_t to = bitmap_words) noexcept {
  for (std::uint32_t w = from; w < to && w * 64 < s.nelems; ++w) {
    std::uint64_t free = ~s.alloc_bits[w].load(std::memory_order_relaxed);
    const std::uint32_t valid = s.nelems - w * 64;
    if (valid < 64) free &= (std::uint64_t{1} << valid) - 1;
    if (free != 0) {
      e.word = w;
      e.bits = &s.alloc_bits[w];
      e.word_base = g_view.span_base(s) + std::size_t{w} * 64 * e.elem_size;
      e.free_bits = free;
      return true;
    }
  }
  e.free_bits = 0;
  return false;
}

}  // namespace

// Gives up a span this thread holds, which stays the process's: to the
// pool if a slot is free, else parked, so that the first free into it puts
// it on the process's parked queue. No lock and no round trip: whatever
// the process filled comes back to it (runtime.hpp's levels).
void drop_span(runtime& r, std::uint8_t spc, mspan& s) noexcept {
  if (has_free_slot(s)) {
    s.owner_cache.store(0, std::memory_order_release);
    SHMALLOC_CRASH_POINT("drop.pool");
    r.pool.push(spc, g_view.span_id_of(s).value);
    return;
  }
  SHMALLOC_CRASH_POINT("drop.park");
  park_span(g_view, s, r.parked_slot.load(std::memory_order_relaxed));
}

// Claims the parked span s (as `token`), folds its remote frees, and pools
// it if that freed a slot, else parks it again. False if s was not ours to
// claim (another thread took it, or it is no longer parked by us).
bool unpark_locally(runtime& r, mcache* mc, mspan& s, std::uint32_t slot, std::uint32_t token) noexcept {
  if (s.span_class >= num_span_classes || !claim_parked(s, slot, token)) return false;
  SHMALLOC_CRASH_POINT("parked.claimed");
  fold(mc, s);
  if (has_free_slot(s)) {
    s.owner_cache.store(0, std::memory_order_release);
    r.pool.push(s.span_class, g_view.span_id_of(s).value);
  } else {
    park_span(g_view, s, slot);
  }
  return true;
}

// Pools what is on the process's parked queue: each span still parked is
// claimed (as `token`), folded, and pooled if that freed a slot, else
// parked again. Lock-free: any thread may drain; each span on the queue
// goes to one of them.
void drain_parked(runtime& r, mcache* mc, std::uint32_t token) noexcept {
  const std::uint32_t slot = r.parked_slot.load(std::memory_order_relaxed);
  r.draining.fetch_add(1, std::memory_order_relaxed);
  take_parked_queue(g_view, slot, [&](mspan& s) { unpark_locally(r, mc, s, slot, token); });
  r.draining.fetch_sub(1, std::memory_order_release);
}

namespace {
// A span of class spc from the pool, or from the parked queue; -1 if
// neither has one (the caller asks the daemon).
std::int64_t take_pooled(runtime& r, mcache* mc, std::uint8_t spc) noexcept {
  std::int64_t id = r.pool.pop(spc);
  if (id >= 0) return id;
  drain_parked(r, mc, mc->token);
  id = r.pool.pop(spc);
  // Another thread took the queue before us and is still pooling it.
  for (int spin = 0; id < 0 && r.draining.load(std::memory_order_acquire) != 0 && spin < 1 << 16; ++spin) {
    cpu_relax();
    id = r.pool.pop(spc);
  }
  return id;
}
}  // namespace

// Folds the span's remote frees into its bitmap (this thread holds it). A
// remote double free is reported and counted, not fatal: the process that
// made it is not this one.
void fold(mcache* mc, mspan& s) noexcept {
  errc status = errc::ok;
  std::string why;
  span_fold_remote(g_view, s, &status, &why);
  if (SHMALLOC_UNLIKELY(status != errc::ok)) {
    std::fprintf(stderr, "shmalloc: %s\n", why.c_str());
    bump(mc->stats->double_frees, std::uint64_t{1});
  }
}

namespace {

// Takes span id into the thread's entry for spc: this thread now holds it.
// Makes s the entry's current span; true if it has a free slot.
bool install(mcache_entry& e, mspan& s) noexcept {
  e.elem_size = s.elem_size;
  e.word = 0;
  e.bits = &s.alloc_bits[0];
  return load_word(e, s, 0);
}

bool take_span(mcache* mc, std::uint8_t spc, std::uint32_t id) noexcept {
  mspan& s = g_view.span(span_id{id});
  s.owner_cache.store(mc->token, std::memory_order_relaxed);
  SHMALLOC_CRASH_POINT("take.owned");
  fold(mc, s);
  bump(mc->stats->refills, std::uint64_t{1});
  return install(mc->alloc[spc], s);
}

// The current span ran dry: switch to a spare that has a free slot (after
// folding its remote frees), or keep the dry one as a spare, parking the
// oldest spares past the queue's room. True if e now has a free slot.
//
// The spares are a queue, oldest first. The search takes spans from the
// front, and every span it finds dry, the current one included, goes to the
// back: the front is always the span that went dry longest ago, which has
// had the most time to get its objects back. When a class's working set
// cycles through its spans, the first spare looked at has room, and spans
// held full by long-lived objects drift behind those that cycle. (Taking a
// spare in place, as this once did, left the dry spans at the front to be
// looked at again on every switch: a cycle through k spans cost k^2 / 2.)
// At most max_spares_looked are looked at: each look is up to three cache
// misses (the span's header, alloc bits and remote bits), and a queue of 63
// dry spares looked at whole on every switch cost a fifth of a working set's
// time; the pool and the parked queue are next.
bool switch_to_spare(runtime& r, mcache* mc, std::uint8_t spc) {
  mcache_entry& e = mc->alloc[spc];
  spare_queue& q = mc->spares[spc];
  const std::uint32_t current = g_view.span_id_of(*e.span()).value;
  const std::uint64_t span_bytes = class_span_bytes(span_class{spc}.size_class());
  const auto full = [&q, span_bytes] {
    return q.n == spare_queue::capacity || (q.n + 1) * span_bytes > mcache::max_spare_bytes;
  };
  for (std::uint8_t looked = 0, n = std::min(q.n, max_spares_looked); looked < n; ++looked) {
    const spare_queue::entry front = q.pop_front();
    mspan& s = g_view.span(span_id{front.id});
    fold(mc, s);
    if (has_free_slot(s)) {  // front becomes current; the dry current goes to the back
      q.push_back({current, true});
      return install(e, s);
    }
    if (full())
      drop_span(r, spc, s);  // dry since its last turn: parked until a free
    else
      q.push_back(front);  // dry: to the back
  }
  // Keep at most a queue's capacity, and max_spare_bytes, per class.
  while (q.n > 0 && full()) drop_span(r, spc, g_view.span(span_id{q.pop_front().id}));
  q.push_back({current, true});
  e = mcache_entry{};
  return false;
}

// Retires the thread's current tiny block: its count loses the bias and
// gains the objects packed into it; whoever brings the count to zero (now,
// or a later free) frees the block.
void retire_tiny(mcache* mc) noexcept {
  if (mc->tiny == nullptr) return;
  const span_id id = g_view.span_at(g_view.handle_of(mc->tiny));
  mspan& s = g_view.span(id);
  const auto block = static_cast<std::uint32_t>((mc->tiny - g_view.span_base(s)) / tiny_size);
  // Unrecorded first: killed after this, the block is never retired (one
  // block lost); recorded still after the retire, the daemon would retire it
  // a second time.
  if (mcache_slot* slot = slot_of(mc)) slot->tiny_block = 0;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  SHMALLOC_CRASH_POINT("tiny.retire");
  if (tiny_retire(g_view, s, block, mc->tiny_count)) free_slot(s, block, tiny_size_class, mc->tiny);
  mc->tiny = nullptr;
  mc->tiny_offset = tiny_size;
  mc->tiny_count = 0;
}

// Records a request of `size` bytes of size class c in the thread's slot
// (layout.hpp's request_stats): one sample per slow path, about one per
// 64 objects of the class.
void sample_request(mcache* mc, std::uint8_t c, std::size_t size) noexcept {
  mcache_slot* slot = slot_of(mc);
  if (slot == nullptr || size <= request_floor(c) || size > class_to_size(c)) return;  // 0 bytes, or aligned up a class
  bump(slot->requests.hist[c][request_bucket(c, size)]);
  bump(slot->requests.bytes[c], std::uint64_t{size});
}

// REQUIRES: r.mu not held. Asks the daemon for a batch of spans; returns one
// and pools the rest, or -1.
std::int64_t refill(runtime& r, std::uint8_t spc) {
  std::lock_guard lock(r.mu);
  if (!r.attached && attach_locked(r, nullptr) != 0) return -1;
  const std::uint64_t t = now_ns();
  std::uint16_t& n = r.batch[spc];
  if (t - r.last_refill_ns[spc] < hot_refill_ns) n = std::min<std::uint16_t>(max_batch, static_cast<std::uint16_t>(n * 2));
  r.last_refill_ns[spc] = t;
  const auto ask = static_cast<std::uint16_t>(std::min<std::uint32_t>(n, std::max<std::uint32_t>(first_batch, r.class_spans[spc] / 4)));
  SHMALLOC_CRASH_POINT("refill.request");
  auto body = request_locked(r, proto::msg::refill, proto::encode(proto::refill_msg{spc, ask}));
  if (!body) return -1;
  auto list = proto::decode_span_list(body.value(), proto::max_refill);
  if (!list || list->span_ids.empty()) return -1;
  tsan_acquire_cross_process();  // the daemon folded what was pushed into these spans' memory
  SHMALLOC_CRASH_POINT("refill.reply");
  // Ours now: a parked_queued flag set is a stale one (of a process that
  // died with the span on its queue), and would keep its frees from
  // telling us once we park it.
  for (std::uint32_t id : list->span_ids)
    if (id < g_view.max_spans) g_view.span(span_id{id}).parked_queued.store(0, std::memory_order_relaxed);
  r.held.insert(list->span_ids.begin(), list->span_ids.end());
  r.class_spans[spc] += static_cast<std::uint32_t>(list->span_ids.size());
  r.pool_demand[spc].fetch_add(1, std::memory_order_relaxed);  // the span returned; pooled ones count when taken
  SHMALLOC_CRASH_POINT("refill.pool");
  for (std::size_t i = 1; i < list->span_ids.size(); ++i) r.pool.push(spc, list->span_ids[i]);
  return list->span_ids[0];
}

struct thread_cache_guard {
  ~thread_cache_guard() { release_thread_cache(); }
};
thread_local thread_cache_guard t_guard;

}  // namespace

mcache* ensure_cache() {
  runtime& r = rt();
  if (t_cache->token != ~0u) return t_cache;  // neither the empty cache nor one a detach emptied
  std::lock_guard lock(r.mu);
  if (t_cache != &empty_cache) {  // opened before a detach: emptied by it, ours to delete
    r.caches.erase(t_cache);
    delete std::exchange(t_cache, &empty_cache);
  }
  if (!r.attached && attach_locked(r, nullptr) != 0) return nullptr;
  std::uint32_t slot = r.main_slot;
  if (r.main_slot_free) {
    r.main_slot_free = false;
  } else if (!r.spare_slots.empty()) {
    slot = r.spare_slots.back();
    r.spare_slots.pop_back();
  } else {
    SHMALLOC_CRASH_POINT("cache.open");
    auto body = request_locked(r, proto::msg::cache_open, {});
    if (!body) {
      // Each allocation of this thread asks again (a slot may have come
      // free), but says why only once per process.
      static std::atomic<bool> said{false};
      if (!said.exchange(true, std::memory_order_relaxed))
        std::fprintf(stderr, "shmalloc: a thread gets no cache, so its allocations fail: %s\n", body.err().message.c_str());
      errno = ENOMEM;
      return nullptr;
    }
    auto opened = proto::decode_slot(body.value());
    if (!opened) return nullptr;
    slot = opened->slot;
  }
  auto* mc = new mcache;
  mc->slot = slot;
  mc->token = slot + 1;
  mc->stats = &r.seg->at<mcache_slot>(r.seg->regions().caches.offset)[slot].stats;
  r.caches.insert(mc);
  (void)&t_guard;  // constructs the guard, so the thread's exit gives the cache back
  t_cache = mc;
  return mc;
}

void release_thread_cache() noexcept {
  mcache* mc = t_cache;
  if (mc == &empty_cache) return;
  runtime& r = rt();
  // Under the lock throughout: a detach in another thread cannot unmap the
  // heap under the drops (the trim check on their free path only tries it).
  std::lock_guard lock(r.mu);
  r.caches.erase(mc);
  if (mc->token == ~0u) {  // a detach emptied it
    t_cache = &empty_cache;
    delete mc;
    return;
  }
  retire_tiny(mc);
  for (std::uint32_t spc = 0; spc < num_span_classes; ++spc) {
    const auto c = static_cast<std::uint8_t>(spc);
    if (mspan* s = mc->alloc[spc].span(); s != nullptr) drop_span(r, c, *s);
    for (std::uint8_t k = 0; k < mc->spares[spc].n; ++k) drop_span(r, c, g_view.span(span_id{mc->spares[spc].at(k).id}));
  }
  SHMALLOC_CRASH_POINT("cache.dropped");
  t_cache = &empty_cache;  // after the drops: a remote free in them (the tiny block's) still counts in mc
  SHMALLOC_CRASH_POINT("cache.release");
  if (r.attached && mc->slot == r.main_slot) r.main_slot_free = true;  // retired with the connection
  else if (r.attached && r.spare_slots.size() < max_spare_slots) r.spare_slots.push_back(mc->slot);
  else if (r.attached) request_locked(r, proto::msg::cache_close, proto::encode(proto::slot_msg{mc->slot}));
  delete mc;
}

void forget_thread_caches_locked(runtime& r) noexcept {
  for (mcache* mc : r.caches) {
    // Its fast paths miss from now on and their slow path opens a new
    // cache; its frees find no span of its own (the token matches none).
    for (mcache_entry& e : mc->alloc) e = mcache_entry{};
    for (spare_queue& q : mc->spares) q = spare_queue{};
    mc->tiny = nullptr;
    mc->tiny_offset = tiny_size;
    mc->tiny_count = 0;
    mc->token = ~0u;
    mc->stats = &dummy_stats;
  }
}

}  // namespace detail

using namespace detail;

constinit thread_local mcache* t_cache __attribute__((tls_model("initial-exec"))) = &empty_cache;

namespace detail {

namespace {

// Gives the thread's entry for spc a word with a free slot: the rest of the
// current span, spares, the pool, a refill from the daemon. False if none.
bool find_free(runtime& r, mcache* mc, std::uint8_t spc) {
  mcache_entry& e = mc->alloc[spc];
  // First what this thread freed into the word it allocates from: in a
  // steady state that is where the next objects are, and reading one word
  // is the cheapest refill there is (it also keeps objects packed low).
  if (mspan* s = e.span(); s != nullptr && load_word(e, *s, e.word, e.word + 1)) return true;
  for (int attempt = 0; attempt < 8; ++attempt) {
    if (mspan* s = e.span(); s != nullptr) {
      // The rest of the span, then what other threads and processes freed.
      if (load_word(e, *s, e.word + 1) || (fold(mc, *s), load_word(e, *s, 0))) return true;
      if (switch_to_spare(r, mc, spc)) return true;
    }
    std::int64_t id = take_pooled(r, mc, spc);
    if (id >= 0) r.pool_demand[spc].fetch_add(1, std::memory_order_relaxed);
    if (id < 0) id = refill(r, spc);
    if (id < 0) return false;
    SHMALLOC_CRASH_POINT("alloc.take");
    if (take_span(mc, spc, static_cast<std::uint32_t>(id))) return true;
  }
  return false;
}

}  // namespace

}  // namespace detail

SHMALLOC_SLOW_PATH void* alloc_slow(std::uint8_t size_class, bool noscan, std::size_t size) noexcept {
  mcache* mc = ensure_cache();
  if (mc == nullptr) return nullptr;
  sample_request(mc, size_class, size);
  runtime& r = rt();
  const std::uint8_t spc = span_class::make(size_class, noscan).value;
  mc->active[spc / 64] |= std::uint64_t{1} << (spc % 64);
  if (SHMALLOC_UNLIKELY(++mc->slow_calls % trim_check_every == 0)) maybe_trim(r, mc);
  // The profiler's countdown was credited with the bytes of the word that
  // just ran out (below): this object may be the one due. Not a tiny block,
  // which is no user's object: alloc_tiny_slow samples the tiny objects.
  const bool sampling = profiling();
  if (SHMALLOC_UNLIKELY(sampling) && spc != tiny_span_class && profile_due(mc, 0))
    return alloc_sampled(size != 0 ? size : class_to_size(size_class), noscan);
  if (!find_free(r, mc, spc)) return nullptr;
  if (SHMALLOC_UNLIKELY(sampling))
    profile_credit(mc, std::uint64_t{static_cast<std::uint32_t>(std::popcount(mc->alloc[spc].free_bits))} * mc->alloc[spc].elem_size);
  return alloc_small(size_class, noscan, size);
}

SHMALLOC_SLOW_PATH void* alloc_tiny_slow(std::size_t size) noexcept {
  mcache* mc = ensure_cache();
  if (mc == nullptr) return nullptr;
  if (SHMALLOC_UNLIKELY(profiling()) && profile_due(mc, tiny_size)) return alloc_sampled(size, true);  // a block's bytes
  retire_tiny(mc);
  auto* block = static_cast<std::byte*>(alloc_small(tiny_size_class, true, 0));  // a block of a tiny span
  if (block == nullptr) return nullptr;
  const mspan& s = g_view.span(g_view.span_at(g_view.handle_of(block)));
  const auto index = static_cast<std::uint32_t>((block - g_view.span_base(s)) / tiny_size);
  tiny_count(g_view, s, index).store(tiny_bias, std::memory_order_relaxed);
  SHMALLOC_CRASH_POINT("tiny.block_set");
  tiny_freed_mask(g_view, s, index).store(0, std::memory_order_relaxed);
  // Recorded for the daemon once the block is set up: a thread that dies
  // while it holds the block gets it retired with its other state.
  if (mcache_slot* slot = slot_of(mc)) {
    std::atomic_signal_fence(std::memory_order_seq_cst);
    slot->tiny_allocs_at_block = mc->stats->tiny_allocs.load(std::memory_order_relaxed);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    SHMALLOC_CRASH_POINT("tiny.record");
    slot->tiny_block = g_view.handle_of(block);
  }
  mc->tiny = block;
  mc->tiny_offset = 0;
  mc->tiny_count = 0;
  return alloc_tiny(size);
}

}  // namespace shmalloc::client
