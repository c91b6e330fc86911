// layout.hpp: the shared cache (cache/), as every process sees it.
//
// Design
// ======
// A cache is a key/value map that lives in the shared heap and is used at
// once by every process attached to one daemon. It is made of heap objects
// only, so it is addressed by handles (offsets), never pointers, and each
// process maps it wherever it maps the heap:
//
//   root "cache:<name>" -> cache_header   one large object: identity, the
//                                         global epoch, 64 shards, 512 readers
//   cache_shard::buckets -> handle[n]     one object per shard: chain heads
//   cache_entry                           one object per key: the header
//                                         below, the key, the value
//
// Reads take no lock (the fast path): hash the key, pick a shard and a
// bucket, follow the chain with acquire loads, compare hash and key. An
// entry never changes after it is linked (but for its CLOCK bit), so a reader
// that found it may use its bytes until it leaves its read section.
//
// Safe memory reclamation is epoch based (Fraser's EBR), with one reader
// slot per thread:
//   reader  slot.epoch = E (the cache's global epoch, as the thread read it
//           at most 16 read sections ago: an older value is only more
//           careful, and reading E each time would take the line every put
//           writes), by a seq_cst exchange; look up; ... use the value ...;
//           slot.epoch = 0 (idle).
//   writer  unlink the entry (under the shard lock); r = E++ ; stamp the
//           entry retire_epoch = r and put it on the shard's retire list.
//           It is freed once every reader slot is idle or shows an epoch > r:
//           those readers started after the unlink and cannot reach it. The
//           shard's writers look at the reader slots once per batch of
//           retired entries (16, or an eighth of the shard's budget): each
//           slot is a cache line another process writes on every get.
// A zero-copy view (C++ cache::view) is a read section held open: it keeps
// its thread's epoch, so a long-held view delays the freeing of every value
// replaced meanwhile (retired bytes are reported apart from live bytes).
//
// Writes (put, erase, eviction) take the shard's mutex: a process-shared
// robust mutex (PTHREAD_MUTEX_ROBUST). A writer that dies while holding it
// hands the next locker EOWNERDEAD; that locker repairs the shard (below)
// and marks the mutex consistent. No lock a dying process holds stays held.
//
// Dead readers. Every reader slot has a robust mutex too, which its thread
// holds for as long as it owns the slot; claiming a slot is a trylock. A
// slot whose epoch blocks reclamation is probed with a trylock: EBUSY means
// its thread lives; EOWNERDEAD means it died (SIGKILL, or a thread that
// ended without running its destructors), and the prober takes the slot
// back: clears its epoch and finishes its pending put (below). This works
// across PID namespaces (containers), where pids mean nothing.
//
// Crash consistency. Every change a writer makes is one aligned store
// (linking an entry, unlinking it, pushing it on the retire list) whose
// order is chosen so that a death between two stores leaves a state the
// repair recognises:
//   put     the entry's handle is stored in the writer's reader slot
//           (pending) as the allocator returns it, before the first store
//           into the entry (which may fault a page in: microseconds), then
//           the entry is built outside the lock, linked under the lock, and
//           pending cleared. A dead slot's pending entry is freed if it is
//           neither in its chain nor on the retire list (an entry whose hash
//           was never stored is looked for in the shard its old bytes name,
//           and found in none).
//   retire  (replace, erase, evict, expire) the entry is pushed on the retire
//           list first, then unlinked. Repair drops from the retire list
//           every entry still linked.
//   free    an entry leaves the retire list before it is freed.
// The mutex holder names its reader slot in cache_shard::writer, so the
// repair can clear that slot's pending entry if it is already linked (and
// only then: an unlinked pending entry is freed by whoever takes the slot
// back, under the same shard lock). Retired entries not yet stamped with an
// epoch (the writer died between unlink and stamp) get a stamp from the
// repair. Repair also recounts the shard's items and bytes from its chains. What a
// death can still lose is the one object in flight between the allocator's
// return and the pending store, or between leaving the retire list and the
// free: a few instructions (no store into the entry between), the same
// promise the allocator makes. For a
// large entry that holds across the daemon's round trips too: a new large
// object is free in the heap's eyes until the allocator returns it (a
// writer that dies before has it freed by the daemon), and a free is done
// once its request is written; the one round trip that can lose an entry is the free
// of one another process allocated, if the freer dies before writing it.
// tests/crash (cache writers) kills a writer at points of put, replace,
// erase, retire and reclaim and finds nothing lost there.
//
// Eviction is CLOCK per shard: a hit sets the entry's referenced byte (only
// if clear, so hot entries do not bounce their line); a put that takes the
// shard over its share of the budget (max_bytes / shards) sweeps the hand
// over its buckets, clearing referenced bytes and retiring unreferenced and
// expired entries until the shard fits. Entries are charged the bytes the
// allocator really gives them (the size class), so max_bytes bounds memory.
//
// Who writes what
// ---------------
//   cache_header identity  the creating process, before it publishes the
//                          root; never written again.
//   cache_header::epoch    writers (fetch_add) after an unlink.
//   cache_shard            the process holding its mutex; the counters are
//                          relaxed atomics (single writer at a time, the
//                          lock orders them), read by anyone (the daemon's
//                          metrics, shmallocctl caches, stats).
//   cache_reader           the thread owning it (epoch, hits, misses,
//                          pending); a prober that took it back from a dead
//                          thread (epoch, pending). The counters are never
//                          reset: the sum over all slots is the cache's total.
//   cache_entry            its writer, before linking; afterwards only
//                          `next` (under the shard lock) and `referenced`
//                          (any reader, relaxed) change.
//
// The daemon reads caches (census.hpp) but never writes them: a cache is
// the clients' data; the daemon only reports it.
#pragma once

#include <pthread.h>

#include <cstddef>
#include <cstdint>

#include "shm/ids.hpp"
#include "shm/layout.hpp"
#include "shm/shared_atomic.hpp"

namespace shmalloc {

inline constexpr std::uint64_t cache_magic = 0x6568636163686d73ULL;  // "smhcache", little endian
inline constexpr std::uint32_t cache_layout_version = 1;
inline constexpr std::uint32_t cache_shards = 64;  // a power of two
inline constexpr std::uint32_t cache_max_readers = 512;
inline constexpr char cache_root_prefix[] = "cache:";
// Root names hold 63 characters; the prefix takes 6 of them.
inline constexpr std::size_t cache_max_name = root_name_bytes - 1 - (sizeof(cache_root_prefix) - 1);
inline constexpr std::uint32_t cache_max_key = 4096;
inline constexpr std::uint64_t cache_min_bytes = 1ULL << 20;
inline constexpr std::uint64_t cache_unstamped = ~std::uint64_t{0};

// One key/value pair: a single heap object, this header then the key, then
// the value at value_offset(). Immutable once linked, but for `next` and
// `referenced`.
struct cache_entry {
  shared_atomic<handle_t> next;  // bucket chain (0 = end): the shard's writer
  handle_t retired_next;         // retire list: the shard's writer
  std::uint64_t hash;
  std::uint64_t expires_ns;      // CLOCK_MONOTONIC deadline; 0 = never
  std::uint64_t retire_epoch;    // the epoch stamp when it was retired (unstamped: not yet)
  std::uint32_t key_len;
  std::uint32_t value_len;
  std::uint32_t charge;          // bytes charged to the budget (the object's usable size)
  shared_atomic<std::uint8_t> referenced;  // CLOCK bit: readers set, the evictor clears
  std::uint8_t reserved[3];

  static constexpr std::size_t value_offset(std::uint32_t key_len) noexcept {
    return (sizeof(cache_entry) + key_len + 7) & ~std::size_t{7};
  }
  const char* key() const noexcept { return reinterpret_cast<const char*>(this + 1); }
  const std::byte* value() const noexcept { return reinterpret_cast<const std::byte*>(this) + value_offset(key_len); }
};

// A shard: one robust mutex for writers, its chains and its counters. Three
// cache lines; shards never share one.
struct alignas(64) cache_shard {
  pthread_mutex_t mutex;         // robust, process-shared: writers
  handle_t buckets;              // object of buckets x shared_atomic<handle_t>
  handle_t retired;              // retire list head: entries unlinked, not yet freed
  // Counters: the mutex holder writes (relaxed store), anyone reads.
  shared_atomic<std::uint64_t> items;
  shared_atomic<std::uint64_t> bytes;          // charged bytes of linked entries
  shared_atomic<std::uint64_t> retired_items;
  shared_atomic<std::uint64_t> retired_bytes;  // charged bytes waiting on readers
  shared_atomic<std::uint64_t> puts;
  shared_atomic<std::uint64_t> erases;
  shared_atomic<std::uint64_t> evictions;      // taken out by CLOCK to fit the budget
  shared_atomic<std::uint64_t> expirations;    // taken out because their TTL passed
  shared_atomic<std::uint64_t> repairs;        // times a locker found its writer dead
  std::uint32_t clock_hand;                    // next bucket the evictor looks at
  std::uint32_t writer;                        // reader slot + 1 of the mutex holder, 0 = none
  std::uint32_t has_ttl;                       // set (never cleared) by the first put with a TTL
};

// A reader slot: one per thread using the cache.
struct alignas(64) cache_reader {
  shared_atomic<std::uint64_t> epoch;    // 0 = idle; else the epoch its read section began in
  shared_atomic<std::uint64_t> hits;     // owner bumps
  shared_atomic<std::uint64_t> misses;   // owner bumps (expired entries count as misses)
  shared_atomic<handle_t> pending;       // an entry its owner is putting, not yet linked
  std::uint64_t reserved[4];
  pthread_mutex_t owner;                 // robust, process-shared: held by the owning thread
};

struct cache_header {
  std::uint64_t magic;
  std::uint32_t layout_version;
  std::uint32_t nshards;
  std::uint64_t max_bytes;
  std::uint32_t buckets_per_shard;  // a power of two
  std::uint32_t max_readers;
  std::uint64_t created_unix_ns;
  char name[64];                    // NUL-terminated
  alignas(64) shared_atomic<std::uint64_t> epoch;         // starts at 1; writers fetch_add
  alignas(64) shared_atomic<std::uint32_t> readers_used;  // slots ever claimed: scans stop here
  cache_shard shards[cache_shards];
  cache_reader readers[cache_max_readers];
};

static_assert(is_shareable_v<cache_entry> && is_shareable_v<cache_shard> && is_shareable_v<cache_reader> &&
              is_shareable_v<cache_header>);
static_assert(sizeof(cache_entry) == 56);
static_assert(sizeof(pthread_mutex_t) == 40, "the layout assumes glibc's x86-64 pthread_mutex_t");
static_assert(sizeof(cache_shard) == 192 && sizeof(cache_reader) == 128);
static_assert(offsetof(cache_header, shards) % 64 == 0);

}  // namespace shmalloc
