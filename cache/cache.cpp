// cache.cpp: the shared cache's client side (design: cache/layout.hpp).
//
// Sections: the process-local handle and thread bindings (reader slots),
// the read path (lock-free), the shard lock and its repair, the write path
// (put, erase, eviction, reclamation), open and check, and the C API.
#include <pthread.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <unordered_set>
#include <utility>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "cache/layout.hpp"
#include "shm/crash_point.hpp"
#include "shm/size_classes.hpp"
#include "shm/errc.hpp"
#include "shmalloc/cache.h"

// The process-local handle of a cache: where this process sees it.
struct shmalloc_cache {
  std::byte* base;            // this process's address of handle 0
  shmalloc::cache_header* header;
  std::uint64_t shard_budget; // max_bytes / shards
  std::atomic<int> refs{1};   // the opener's, plus one per thread bound to it
};

namespace shmalloc {
namespace {

constexpr auto relaxed = std::memory_order_relaxed;
constexpr auto acquire = std::memory_order_acquire;
constexpr auto release = std::memory_order_release;

int fail(errc e) { return -static_cast<int>(e); }

[[noreturn]] void die(const char* what, int rc) {
  std::fprintf(stderr, "shmalloc cache: %s: %s\n", what, std::strerror(rc));
  std::abort();
}

cache_entry* entry_at(const shmalloc_cache* c, handle_t h) noexcept {
  return reinterpret_cast<cache_entry*>(c->base + h);
}
handle_t handle_of(const shmalloc_cache* c, const void* p) noexcept {
  return static_cast<handle_t>(static_cast<const std::byte*>(p) - c->base);
}
shared_atomic<handle_t>* buckets_of(const shmalloc_cache* c, const cache_shard& s) noexcept {
  return reinterpret_cast<shared_atomic<handle_t>*>(c->base + s.buckets);
}
std::uint64_t hash_key(const void* key, std::size_t len) noexcept { return XXH3_64bits(key, len); }
// Top bits pick the shard, low bits the bucket: independent.
std::uint32_t shard_index(std::uint64_t h) noexcept { return static_cast<std::uint32_t>(h >> 58) & (cache_shards - 1); }
std::uint32_t bucket_index(const cache_header* hd, std::uint64_t h) noexcept {
  return static_cast<std::uint32_t>(h) & (hd->buckets_per_shard - 1);
}
void add(shared_atomic<std::uint64_t>& counter, std::int64_t delta) noexcept {  // under the shard lock
  counter.store(counter.load(relaxed) + static_cast<std::uint64_t>(delta), relaxed);
}
std::uint64_t now_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000u + static_cast<std::uint64_t>(ts.tv_nsec);
}
bool expired(const cache_entry* e, std::uint64_t& now) noexcept {
  if (e->expires_ns == 0) return false;
  if (now == 0) now = now_ns();
  return e->expires_ns <= now;
}
bool matches(const cache_entry* e, std::uint64_t h, const void* key, std::size_t len) noexcept {
  return e->hash == h && e->key_len == len && std::memcmp(e->key(), key, len) == 0;
}
// The bytes an object of `bytes` really takes: its size class, or whole
// pages for a large object (what shmalloc_usable_size would say, without
// the call and the span lookup).
std::uint32_t charge_of(std::size_t bytes) noexcept {
  if (bytes <= max_small_size) return class_to_size(size_to_class(bytes));
  return static_cast<std::uint32_t>((bytes + page_size - 1) / page_size * page_size);
}

void release_ref(shmalloc_cache* c) noexcept {
  if (c->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete c;
}

// ---------------------------------------------------------------------------
// Thread bindings: each thread that touches a cache owns one reader slot of
// it, held through the slot's robust mutex until the thread exits.
// ---------------------------------------------------------------------------

constexpr int max_bindings = 16;  // caches one thread may use at once
std::atomic<std::uint64_t> g_fork_generation{1};

struct binding {
  shmalloc_cache* cache = nullptr;
  cache_reader* slot = nullptr;
  std::uint32_t index = 0;
  std::uint32_t nest = 0;  // open read sections (pins) of this thread
  std::uint64_t generation = 0;
  std::uint64_t epoch = 0;     // the cache's epoch as this thread last read it
  std::uint32_t sections = 0;  // read sections begun: the epoch is read again every 16th
  bool closing = false;        // closed with a pin held: given back when the last pin goes
};

void give_back_slot(binding& b) noexcept;

struct thread_bindings {
  binding b[max_bindings];
  int n = 0;
  ~thread_bindings() {
    for (int i = 0; i < n; ++i) give_back_slot(b[i]);
  }
};
thread_local thread_bindings t_bindings;

void resolve_pending(shmalloc_cache* c, std::uint32_t index);

// Takes a free slot (or one a dead thread left) for the calling thread.
int claim_slot(shmalloc_cache* c, binding& out) {
  cache_header* hd = c->header;
  for (std::uint32_t i = 0; i < hd->max_readers; ++i) {
    cache_reader& r = hd->readers[i];
    const int rc = pthread_mutex_trylock(&r.owner);
    if (rc == EOWNERDEAD) {
      pthread_mutex_consistent(&r.owner);
    } else if (rc != 0) {
      continue;  // EBUSY: a live thread's
    }
    r.epoch.store(0, release);
    resolve_pending(c, i);  // a dead owner's half-done put
    std::uint32_t used = hd->readers_used.load(relaxed);
    while (used < i + 1 && !hd->readers_used.compare_exchange_weak(used, i + 1, release, relaxed)) {
    }
    c->refs.fetch_add(1, relaxed);
    out = binding{};
    out.cache = c;
    out.slot = &r;
    out.index = i;
    out.generation = g_fork_generation.load(relaxed);
    return 0;
  }
  return fail(errc::no_memory);
}

void give_back_slot(binding& b) noexcept {
  shmalloc_cache* c = std::exchange(b.cache, nullptr);
  if (c == nullptr) return;
  // A forked child does not own its parent's slots; a detached process no
  // longer maps them.
  if (b.generation == g_fork_generation.load(relaxed) && shmalloc_handle(b.slot) != 0) {
    b.slot->epoch.store(0, release);
    pthread_mutex_unlock(&b.slot->owner);
  }
  release_ref(c);
}

void on_fork_child() { g_fork_generation.fetch_add(1, relaxed); }

// The calling thread's binding to c, claiming a slot on first use.
binding* bind(shmalloc_cache* c, int* rc) {
  thread_bindings& t = t_bindings;
  const std::uint64_t gen = g_fork_generation.load(relaxed);
  for (int i = 0; i < t.n; ++i) {
    binding& b = t.b[i];
    if (b.cache != c) continue;
    if (b.generation == gen) return &b;
    b.nest = 0;  // inherited from the parent: not ours
    give_back_slot(b);
    *rc = claim_slot(c, b);
    return *rc == 0 ? &b : nullptr;
  }
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, on_fork_child); });
  int free_i = -1;
  for (int i = 0; i < t.n && free_i < 0; ++i)
    if (t.b[i].cache == nullptr) free_i = i;
  if (free_i < 0) {
    if (t.n == max_bindings) {
      *rc = fail(errc::no_memory);
      return nullptr;
    }
    free_i = t.n++;
  }
  *rc = claim_slot(c, t.b[free_i]);
  return *rc == 0 ? &t.b[free_i] : nullptr;
}

// The calling thread's binding to c made in this process (a forked child's
// copies of its parent's bindings are not its own: leaving one would end
// the parent's read section), or nullptr.
binding* find_binding(const shmalloc_cache* c) noexcept {
  if (c == nullptr) return nullptr;
  thread_bindings& t = t_bindings;
  const std::uint64_t gen = g_fork_generation.load(relaxed);
  for (int i = 0; i < t.n; ++i)
    if (t.b[i].cache == c && t.b[i].generation == gen) return &t.b[i];
  return nullptr;
}

// ---------------------------------------------------------------------------
// The read path: no lock. A read section publishes the epoch it began in.
// ---------------------------------------------------------------------------

// The exchange is a full barrier: the epoch is visible before the chain is
// read (Dekker with the reclaimer's fetch_add and slot loads). The epoch
// published may be one this thread read up to 16 sections ago: an older
// value only holds back more (entries retired since wait for the next
// read), and the acquire load that gave it already ordered every unlink
// before it ahead of this thread's reads. Reading it on every get would take
// a line that every put writes.
inline void enter(shmalloc_cache* c, binding& b) noexcept {
  if (b.nest++ != 0) return;
  if ((b.sections++ & 15) == 0) b.epoch = c->header->epoch.load(acquire);
  b.slot->epoch.exchange(b.epoch, std::memory_order_seq_cst);
}
inline void leave(binding& b) noexcept {
  if (b.nest == 0 || --b.nest != 0) return;
  b.slot->epoch.store(0, release);
  if (b.closing) give_back_slot(b);
}

const cache_entry* find(const shmalloc_cache* c, std::uint64_t h, const void* key, std::size_t len) noexcept {
  const cache_shard& s = c->header->shards[shard_index(h)];
  // An entry may have been built by another process in memory a thread of
  // this one used before: order that for TSan as the writer's link does.
  tsan_acquire_cross_process();
  for (handle_t e = buckets_of(c, s)[bucket_index(c->header, h)].load(acquire); e != null_handle;) {
    const cache_entry* ent = entry_at(c, e);
    if (matches(ent, h, key, len)) return ent;
    e = ent->next.load(acquire);
  }
  return nullptr;
}

// 0, or why a key (1 to 4,096 bytes) cannot be one.
int check_key(const shmalloc_cache* c, const void* key, std::size_t len) noexcept {
  if (c == nullptr || (key == nullptr && len != 0)) return fail(errc::invalid_argument);
  return len == 0 || len > cache_max_key ? fail(errc::too_large) : 0;
}

// Leaves the section open on a hit (the caller's pin), closed on a miss.
int pin(shmalloc_cache* c, const void* key, std::size_t len, const void** value, std::size_t* value_len) {
  int rc = check_key(c, key, len);
  binding* b = rc == 0 ? bind(c, &rc) : nullptr;
  if (b == nullptr) return rc;
  const std::uint64_t h = hash_key(key, len);
  enter(c, *b);
  const cache_entry* e = find(c, h, key, len);
  std::uint64_t now = 0;
  if (e == nullptr || expired(e, now)) {
    bump(b->slot->misses);
    leave(*b);
    return fail(errc::not_found);
  }
  auto& ref = const_cast<cache_entry*>(e)->referenced;
  if (ref.load(relaxed) == 0) ref.store(1, relaxed);  // only if clear: hot entries keep their line shared
  bump(b->slot->hits);
  *value = e->value();
  *value_len = e->value_len;
  return 0;
}

// ---------------------------------------------------------------------------
// The shard lock, and the repair of a shard whose writer died.
// ---------------------------------------------------------------------------

void reclaim(shmalloc_cache* c, cache_shard& s);

// Walks every chain of s; calls fn(link, handle) for each entry.
template <class Fn>
void for_each_linked(shmalloc_cache* c, cache_shard& s, Fn fn) {
  shared_atomic<handle_t>* buckets = buckets_of(c, s);
  for (std::uint32_t b = 0; b < c->header->buckets_per_shard; ++b)
    for (handle_t e = buckets[b].load(acquire); e != null_handle; e = entry_at(c, e)->next.load(acquire))
      fn(b, e);
}

bool is_linked(shmalloc_cache* c, cache_shard& s, handle_t h) noexcept {
  const cache_entry* ent = entry_at(c, h);
  for (handle_t e = buckets_of(c, s)[bucket_index(c->header, ent->hash)].load(acquire); e != null_handle;
       e = entry_at(c, e)->next.load(acquire))
    if (e == h) return true;
  return false;
}

// Under the lock, after EOWNERDEAD: the dead writer's last store may be any
// of its sequence (layout.hpp, "Crash consistency"); each leaves a state
// this puts right.
void repair_shard(shmalloc_cache* c, cache_shard& s) {
  // No allocation here (a throw would leave the shard locked for good):
  // membership is asked of each entry's own chain.
  SHMALLOC_CRASH_POINT("cache.repair");
  std::uint64_t items = 0, bytes = 0;
  for_each_linked(c, s, [&](std::uint32_t, handle_t e) {
    ++items;
    bytes += entry_at(c, e)->charge;
  });
  // Retired but still linked: the writer died between push and unlink.
  std::uint64_t r_items = 0, r_bytes = 0;
  for (handle_t* link = &s.retired; *link != null_handle;) {
    cache_entry* e = entry_at(c, *link);
    if (is_linked(c, s, *link)) {
      *link = e->retired_next;
      continue;
    }
    if (e->retire_epoch == cache_unstamped) e->retire_epoch = c->header->epoch.fetch_add(1);
    ++r_items;
    r_bytes += e->charge;
    link = &e->retired_next;
  }
  s.items.store(items, relaxed);
  s.bytes.store(bytes, relaxed);
  s.retired_items.store(r_items, relaxed);
  s.retired_bytes.store(r_bytes, relaxed);
  // The dead writer's pending entry, if it got linked: nothing to undo. A
  // new owner of the slot may store its own pending meanwhile: only ours
  // is cleared.
  if (s.writer != 0 && s.writer <= c->header->max_readers) {
    cache_reader& r = c->header->readers[s.writer - 1];
    handle_t p = r.pending.load(acquire);
    if (p != null_handle && shard_index(entry_at(c, p)->hash) == static_cast<std::uint32_t>(&s - c->header->shards) &&
        is_linked(c, s, p)) {
      while (!r.pending.compare_exchange_weak(p, null_handle, release, relaxed) && p == r.pending.load(acquire)) {
      }
    }
  }
  s.writer = 0;
  add(s.repairs, 1);
}

void lock_shard(shmalloc_cache* c, cache_shard& s, std::uint32_t slot_index) {
  const int rc = pthread_mutex_lock(&s.mutex);
  if (rc == EOWNERDEAD) {
    repair_shard(c, s);
    pthread_mutex_consistent(&s.mutex);
  } else if (rc != 0) {
    die("cannot lock a shard", rc);  // ENOTRECOVERABLE: only if a repair was skipped
  }
  s.writer = slot_index + 1;
}

void unlock_shard(cache_shard& s) {
  s.writer = 0;
  pthread_mutex_unlock(&s.mutex);
}

// Frees the entry a dead (or gone) owner of slot index left half put. The
// caller owns the slot's mutex. Under the entry's shard lock, a pending
// entry never got linked: its writer clears pending before unlocking, and a
// repair clears it if the writer died after linking.
void resolve_pending(shmalloc_cache* c, std::uint32_t index) {
  cache_reader& r = c->header->readers[index];
  for (;;) {
    const handle_t p = r.pending.load(acquire);
    if (p == null_handle) return;
    const std::uint32_t si = shard_index(entry_at(c, p)->hash);
    cache_shard& s = c->header->shards[si];
    lock_shard(c, s, index);
    if (r.pending.load(acquire) == p && shard_index(entry_at(c, p)->hash) == si) {
      // Cleared before the free: a death between leaks the entry; the other
      // order would leave pending naming freed memory, freed again later.
      const bool linked = is_linked(c, s, p);
      SHMALLOC_CRASH_POINT("cache.resolve_pending");
      r.pending.store(null_handle, release);
      std::atomic_signal_fence(std::memory_order_seq_cst);
      if (!linked) shmalloc_free(entry_at(c, p));
      unlock_shard(s);
      return;
    }
    unlock_shard(s);  // a repair settled it meanwhile: look again
  }
}

// ---------------------------------------------------------------------------
// The write path (under the shard lock).
// ---------------------------------------------------------------------------

// Retires the entry at *link: on the retire list first, then unlinked, then
// stamped (layout.hpp, "Crash consistency").
void retire(shmalloc_cache* c, cache_shard& s, shared_atomic<handle_t>* link, handle_t h,
            handle_t replacement = null_handle) {
  cache_entry* e = entry_at(c, h);
  e->retire_epoch = cache_unstamped;
  e->retired_next = s.retired;
  std::atomic_signal_fence(std::memory_order_seq_cst);  // a death sees these in this order
  s.retired = h;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  SHMALLOC_CRASH_POINT("cache.retire_pushed");
  if (replacement != null_handle) {
    link->store(replacement, release);
  } else {
    link->store(e->next.load(relaxed), release);
    add(s.items, -1);
  }
  SHMALLOC_CRASH_POINT("cache.retire_unlinked");
  e->retire_epoch = c->header->epoch.fetch_add(1);
  add(s.bytes, -static_cast<std::int64_t>(e->charge));
  add(s.retired_items, 1);
  add(s.retired_bytes, e->charge);
}

// Links h into its chain, replacing the entry of the same key; expired
// entries it passes go too.
void link_entry(shmalloc_cache* c, cache_shard& s, handle_t h) {
  cache_entry* e = entry_at(c, h);
  tsan_release_cross_process();  // no code outside TSan builds
  shared_atomic<handle_t>* link = &buckets_of(c, s)[bucket_index(c->header, e->hash)];
  std::uint64_t now = 0;
  for (handle_t cur = link->load(relaxed); cur != null_handle; cur = link->load(relaxed)) {
    cache_entry* old = entry_at(c, cur);
    if (matches(old, e->hash, e->key(), e->key_len)) {
      e->next.store(old->next.load(relaxed), relaxed);
      retire(c, s, link, cur, h);
      add(s.bytes, e->charge);
      return;
    }
    if (expired(old, now)) {
      retire(c, s, link, cur);
      add(s.expirations, 1);
      continue;
    }
    link = &old->next;
  }
  e->next.store(null_handle, relaxed);
  link->store(h, release);  // at the chain's end: readers see it whole
  add(s.items, 1);
  add(s.bytes, e->charge);
}

// Takes the expired entries of one bucket out (readers only skip them).
void expire_bucket(shmalloc_cache* c, cache_shard& s, std::uint32_t bucket, std::uint64_t& now) {
  shared_atomic<handle_t>* link = &buckets_of(c, s)[bucket];
  for (handle_t cur = link->load(relaxed); cur != null_handle; cur = link->load(relaxed)) {
    cache_entry* e = entry_at(c, cur);
    if (!expired(e, now)) {
      link = &e->next;
      continue;
    }
    retire(c, s, link, cur);
    add(s.expirations, 1);
  }
}

// CLOCK: sweeps buckets from the hand until the shard fits its budget.
// Every put also moves the hand one bucket, taking expired entries out, so
// they go in time even when the cache is under its budget.
void evict(shmalloc_cache* c, cache_shard& s) {
  const std::uint32_t n = c->header->buckets_per_shard;
  std::uint64_t now = 0;
  if (s.has_ttl != 0) {
    expire_bucket(c, s, s.clock_hand, now);
    s.clock_hand = (s.clock_hand + 1) & (n - 1);
  }
  for (std::uint32_t step = 0; step < 2 * n + 1 && s.bytes.load(relaxed) > c->shard_budget; ++step) {
    shared_atomic<handle_t>* link = &buckets_of(c, s)[s.clock_hand];
    s.clock_hand = (s.clock_hand + 1) & (n - 1);
    for (handle_t cur = link->load(relaxed); cur != null_handle; cur = link->load(relaxed)) {
      cache_entry* e = entry_at(c, cur);
      const bool dead = expired(e, now);
      if (!dead && e->referenced.load(relaxed) != 0) {
        e->referenced.store(0, relaxed);
        link = &e->next;
        continue;
      }
      retire(c, s, link, cur);
      add(dead ? s.expirations : s.evictions, 1);
    }
  }
}

// The oldest epoch a live read section began in (UINT64_MAX: none). With
// probe, each slot in a section is probed: a dead thread's is taken back.
std::uint64_t oldest_reader(shmalloc_cache* c, bool probe) {
  cache_header* hd = c->header;
  std::uint64_t min = ~std::uint64_t{0};
  const std::uint32_t used = std::min(hd->readers_used.load(acquire), hd->max_readers);
  for (std::uint32_t i = 0; i < used; ++i) {
    cache_reader& r = hd->readers[i];
    const std::uint64_t e = r.epoch.load(std::memory_order_seq_cst);
    if (e == 0) continue;
    if (probe) {
      const int rc = pthread_mutex_trylock(&r.owner);
      if (rc == 0 || rc == EOWNERDEAD) {  // no live owner: its section is over
        if (rc == EOWNERDEAD) pthread_mutex_consistent(&r.owner);
        r.epoch.store(0, release);
        pthread_mutex_unlock(&r.owner);  // pending, if any, is settled by its next owner or a check
        continue;
      }
    }
    min = std::min(min, e);
  }
  return min;
}

// Frees retired entries no read section can still reach. Reading the
// reader slots costs a cache miss each (other processes write them on every
// get), so a writer does it once per batch of retired entries, not per put.
bool reclaim_due(const shmalloc_cache* c, const cache_shard& s) noexcept {
  return s.retired_items.load(relaxed) >= 16 || s.retired_bytes.load(relaxed) >= c->shard_budget / 8;
}

void reclaim(shmalloc_cache* c, cache_shard& s) {
  if (s.retired == null_handle) return;
  // Probing costs a trylock per slot in a read section: only when the
  // backlog is big (a dead reader holds it back).
  const bool probe = s.retired_bytes.load(relaxed) > c->shard_budget / 4;
  const std::uint64_t min = oldest_reader(c, probe);
  for (handle_t* link = &s.retired; *link != null_handle;) {
    cache_entry* e = entry_at(c, *link);
    if (e->retire_epoch >= min) {
      link = &e->retired_next;
      continue;
    }
    SHMALLOC_CRASH_POINT("cache.reclaim_entry");
    *link = e->retired_next;  // off the list before the free: a death between leaks, never double-frees
    std::atomic_signal_fence(std::memory_order_seq_cst);
    add(s.retired_items, -1);
    add(s.retired_bytes, -static_cast<std::int64_t>(e->charge));
    shmalloc_free(e);
  }
}

int put(shmalloc_cache* c, const void* key, std::size_t len, const void* value, std::size_t value_len,
        std::uint64_t ttl_ms) {
  if (value == nullptr && value_len != 0) return fail(errc::invalid_argument);
  if (int rc = check_key(c, key, len); rc != 0) return rc;
  const std::size_t bytes = cache_entry::value_offset(static_cast<std::uint32_t>(len)) + value_len;
  // Charged its size class: an entry over a shard's share could never fit,
  // and eviction would empty the shard trying.
  if (value_len > c->shard_budget || value_len > UINT32_MAX / 2 || charge_of(bytes) > c->shard_budget)
    return fail(errc::too_large);
  int rc = 0;
  binding* b = bind(c, &rc);
  if (b == nullptr) return rc;
  auto* e = static_cast<cache_entry*>(shmalloc_alloc(bytes));
  if (e == nullptr) return fail(errc::no_memory);
  const handle_t h = handle_of(c, e);
  // Pending before the first store into the entry: that store may fault its
  // page in (microseconds on a new large object), and a death there must
  // leave it to be freed, not leaked. Until its hash is stored a prober
  // looks in whatever shard its old bytes name, and finds it in none.
  b->slot->pending.store(h, release);
  SHMALLOC_CRASH_POINT("cache.put_pending");
  e->hash = hash_key(key, len);
  e->key_len = static_cast<std::uint32_t>(len);
  e->value_len = static_cast<std::uint32_t>(value_len);
  e->charge = charge_of(bytes);
  constexpr std::uint64_t max_ttl_ms = std::uint64_t{1} << 40;  // 34 years: no overflow below
  e->expires_ns = ttl_ms == 0 ? 0 : now_ns() + std::min(ttl_ms, max_ttl_ms) * 1'000'000;
  e->referenced.store(0, relaxed);
  e->next.store(null_handle, relaxed);
  SHMALLOC_CRASH_POINT("cache.put_built");
  std::memcpy(const_cast<char*>(e->key()), key, len);
  if (value_len != 0) std::memcpy(const_cast<std::byte*>(e->value()), value, value_len);
  cache_shard& s = c->header->shards[shard_index(e->hash)];
  lock_shard(c, s, b->index);
  SHMALLOC_CRASH_POINT("cache.put_locked");
  if (ttl_ms != 0 && s.has_ttl == 0) s.has_ttl = 1;
  link_entry(c, s, h);
  SHMALLOC_CRASH_POINT("cache.put_linked");
  b->slot->pending.store(null_handle, release);
  SHMALLOC_CRASH_POINT("cache.put_done");
  add(s.puts, 1);
  evict(c, s);
  if (reclaim_due(c, s)) reclaim(c, s);
  unlock_shard(s);
  return 0;
}

int erase(shmalloc_cache* c, const void* key, std::size_t len) {
  int rc = check_key(c, key, len);
  binding* b = rc == 0 ? bind(c, &rc) : nullptr;
  if (b == nullptr) return rc;
  const std::uint64_t h = hash_key(key, len);
  cache_shard& s = c->header->shards[shard_index(h)];
  lock_shard(c, s, b->index);
  SHMALLOC_CRASH_POINT("cache.erase_locked");
  rc = fail(errc::not_found);
  shared_atomic<handle_t>* link = &buckets_of(c, s)[bucket_index(c->header, h)];
  for (handle_t cur = link->load(relaxed); cur != null_handle; cur = link->load(relaxed)) {
    if (matches(entry_at(c, cur), h, key, len)) {
      retire(c, s, link, cur);
      add(s.erases, 1);
      rc = 0;
      break;
    }
    link = &entry_at(c, cur)->next;
  }
  if (reclaim_due(c, s)) reclaim(c, s);
  unlock_shard(s);
  return rc;
}

// ---------------------------------------------------------------------------
// Open: find the root, or build a cache and publish it.
// ---------------------------------------------------------------------------

bool valid_name(const char* name) noexcept {
  if (name == nullptr) return false;
  const std::size_t n = strnlen(name, cache_max_name + 1);
  if (n == 0 || n > cache_max_name) return false;
  return std::all_of(name, name + n, [](char ch) { return ch > ' ' && ch < 0x7f; });
}

void init_robust(pthread_mutex_t* m) {
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(m, &a);
  pthread_mutexattr_destroy(&a);
}

std::uint32_t buckets_for(std::uint64_t max_bytes) noexcept {
  std::uint64_t want = max_bytes / cache_shards / 256;  // one bucket per ~256 bytes of budget
  std::uint32_t n = 16;
  while (n < want && n < (1u << 20)) n <<= 1;
  return n;
}

void free_header(cache_header* hd, std::byte* base) {
  for (cache_shard& s : hd->shards)
    if (s.buckets != null_handle) shmalloc_free(base + s.buckets);
  shmalloc_free(hd);
}

// A new cache, not yet published; nullptr if the heap has no room.
cache_header* build(const char* name, std::uint64_t max_bytes, std::byte** base) {
  auto* hd = static_cast<cache_header*>(shmalloc_alloc_aligned(sizeof(cache_header), 64));
  if (hd == nullptr) return nullptr;
  std::memset(static_cast<void*>(hd), 0, sizeof(cache_header));
  *base = static_cast<std::byte*>(static_cast<void*>(hd)) - shmalloc_handle(hd);
  hd->nshards = cache_shards;
  hd->max_bytes = max_bytes;
  hd->buckets_per_shard = buckets_for(max_bytes);
  hd->max_readers = cache_max_readers;
  hd->created_unix_ns = static_cast<std::uint64_t>(time(nullptr)) * 1'000'000'000u;
  std::strncpy(hd->name, name, sizeof hd->name - 1);
  hd->epoch.store(1, relaxed);
  for (cache_shard& s : hd->shards) {
    init_robust(&s.mutex);
    const std::size_t bytes = std::size_t{hd->buckets_per_shard} * sizeof(handle_t);
    void* b = shmalloc_alloc(bytes);
    if (b == nullptr) {
      free_header(hd, *base);
      return nullptr;
    }
    std::memset(b, 0, bytes);
    s.buckets = shmalloc_handle(b);
  }
  for (cache_reader& r : hd->readers) init_robust(&r.owner);
  hd->layout_version = cache_layout_version;
  std::atomic_ref<std::uint64_t>(hd->magic).store(cache_magic, release);  // last: the header is whole
  return hd;
}

int adopt(std::uint64_t h, shmalloc_cache** out) {
  auto* hd = static_cast<cache_header*>(shmalloc_pointer(h));
  if (hd == nullptr || hd->magic != cache_magic || hd->layout_version != cache_layout_version ||
      hd->nshards != cache_shards || hd->max_readers != cache_max_readers)
    return fail(errc::layout_mismatch);  // a root of that name that is not a cache of this build
  auto* c = new (std::nothrow) shmalloc_cache{};
  if (c == nullptr) return fail(errc::no_memory);
  c->base = static_cast<std::byte*>(static_cast<void*>(hd)) - h;
  c->header = hd;
  c->shard_budget = hd->max_bytes / cache_shards;
  *out = c;
  return 0;
}

int open(const char* name, std::uint64_t max_bytes, shmalloc_cache** out) {
  if (out == nullptr || !valid_name(name)) return fail(errc::invalid_argument);
  const std::string root = std::string(cache_root_prefix) + name;
  for (int attempt = 0; attempt < 2; ++attempt) {
    std::uint64_t h = 0;
    const int rc = shmalloc_lookup(root.c_str(), &h);
    if (rc == 0) return adopt(h, out);
    if (rc != fail(errc::not_found)) return rc;
    if (max_bytes == 0) return rc;
    if (max_bytes < cache_min_bytes) return fail(errc::invalid_argument);
    std::byte* base = nullptr;
    cache_header* hd = build(name, max_bytes, &base);
    if (hd == nullptr) return fail(errc::no_memory);
    const int prc = shmalloc_publish(root.c_str(), shmalloc_handle(hd));
    if (prc == 0) return adopt(shmalloc_handle(hd), out);
    free_header(hd, base);
    if (prc != fail(errc::exists)) return prc;
    // Another process published it first: open theirs.
  }
  return fail(errc::exists);
}

// ---------------------------------------------------------------------------
// Check: take back dead readers, repair, verify every chain.
// ---------------------------------------------------------------------------

void settle_dead_readers(shmalloc_cache* c) {
  cache_header* hd = c->header;
  const std::uint32_t used = std::min(hd->readers_used.load(acquire), hd->max_readers);
  for (std::uint32_t i = 0; i < used; ++i) {
    cache_reader& r = hd->readers[i];
    const int rc = pthread_mutex_trylock(&r.owner);
    if (rc != 0 && rc != EOWNERDEAD) continue;  // a live thread's (or our own)
    if (rc == EOWNERDEAD) pthread_mutex_consistent(&r.owner);
    r.epoch.store(0, release);
    resolve_pending(c, i);
    pthread_mutex_unlock(&r.owner);
  }
}

int verify_shard(shmalloc_cache* c, cache_shard& s, std::uint32_t si) {
  int problems = 0;
  std::uint64_t items = 0, bytes = 0, r_items = 0, r_bytes = 0;
  std::unordered_set<handle_t> linked;
  for_each_linked(c, s, [&](std::uint32_t b, handle_t e) {
    const cache_entry* ent = entry_at(c, e);
    if (shard_index(ent->hash) != si || bucket_index(c->header, ent->hash) != b || ent->key_len == 0 ||
        ent->key_len > cache_max_key || !linked.insert(e).second)
      ++problems;
    ++items;
    bytes += ent->charge;
  });
  for (handle_t h = s.retired; h != null_handle; h = entry_at(c, h)->retired_next) {
    if (linked.count(h) != 0 || entry_at(c, h)->retire_epoch == cache_unstamped) ++problems;
    ++r_items;
    r_bytes += entry_at(c, h)->charge;
  }
  if (items != s.items.load(relaxed) || bytes != s.bytes.load(relaxed)) ++problems;
  if (r_items != s.retired_items.load(relaxed) || r_bytes != s.retired_bytes.load(relaxed)) ++problems;
  return problems;
}

int check(shmalloc_cache* c) {
  if (c == nullptr) return fail(errc::invalid_argument);
  int rc = 0;
  binding* b = bind(c, &rc);
  if (b == nullptr) return rc;
  settle_dead_readers(c);
  int problems = 0;
  for (std::uint32_t i = 0; i < cache_shards; ++i) {
    cache_shard& s = c->header->shards[i];
    lock_shard(c, s, b->index);
    reclaim(c, s);
    problems += verify_shard(c, s, i);
    unlock_shard(s);
  }
  return problems;
}

void stats(const shmalloc_cache* c, shmalloc_cache_stats* out) {
  const cache_header* hd = c->header;
  *out = shmalloc_cache_stats{};
  out->max_bytes = hd->max_bytes;
  for (const cache_shard& s : hd->shards) {
    out->items += s.items.load(relaxed);
    out->bytes += s.bytes.load(relaxed);
    out->retired_items += s.retired_items.load(relaxed);
    out->retired_bytes += s.retired_bytes.load(relaxed);
    out->puts += s.puts.load(relaxed);
    out->erases += s.erases.load(relaxed);
    out->evictions += s.evictions.load(relaxed);
    out->expirations += s.expirations.load(relaxed);
    out->repairs += s.repairs.load(relaxed);
  }
  out->readers = std::min(hd->readers_used.load(acquire), hd->max_readers);
  for (std::uint32_t i = 0; i < out->readers; ++i) {
    out->hits += hd->readers[i].hits.load(relaxed);
    out->misses += hd->readers[i].misses.load(relaxed);
  }
}

}  // namespace
}  // namespace shmalloc

// ---------------------------------------------------------------------------
// The C API
// ---------------------------------------------------------------------------

using namespace shmalloc;

extern "C" {

int shmalloc_cache_open(const char* name, uint64_t max_bytes, shmalloc_cache** cache) {
  return shmalloc::open(name, max_bytes, cache);
}

void shmalloc_cache_close(shmalloc_cache* cache) {
  if (cache == nullptr) return;
  if (binding* b = find_binding(cache)) {
    if (b->nest == 0)
      give_back_slot(*b);
    else
      b->closing = true;  // a view still pins: its read section stays open until unpinned
  }
  release_ref(cache);
}

int shmalloc_cache_get(shmalloc_cache* cache, const void* key, size_t key_len, void* buf, size_t buf_len,
                       size_t* value_len) {
  if (value_len == nullptr || (buf == nullptr && buf_len != 0)) return fail(errc::invalid_argument);
  const void* v = nullptr;
  if (int rc = pin(cache, key, key_len, &v, value_len); rc != 0) return rc;
  const int rc = *value_len <= buf_len ? 0 : fail(errc::too_small);
  if (rc == 0 && *value_len != 0) std::memcpy(buf, v, *value_len);
  leave(*find_binding(cache));
  return rc;
}

int shmalloc_cache_pin(shmalloc_cache* cache, const void* key, size_t key_len, const void** value,
                       size_t* value_len) {
  if (value == nullptr || value_len == nullptr) return fail(errc::invalid_argument);
  return pin(cache, key, key_len, value, value_len);
}

void shmalloc_cache_unpin(shmalloc_cache* cache) {
  if (binding* b = find_binding(cache)) leave(*b);
}

int shmalloc_cache_put(shmalloc_cache* cache, const void* key, size_t key_len, const void* value, size_t value_len,
                       uint64_t ttl_ms) {
  return put(cache, key, key_len, value, value_len, ttl_ms);
}

int shmalloc_cache_erase(shmalloc_cache* cache, const void* key, size_t key_len) {
  return erase(cache, key, key_len);
}

int shmalloc_cache_stats_get(shmalloc_cache* cache, shmalloc_cache_stats* out) {
  if (cache == nullptr || out == nullptr) return fail(errc::invalid_argument);
  stats(cache, out);
  return 0;
}

int shmalloc_cache_check(shmalloc_cache* cache) { return check(cache); }

}  // extern "C"
