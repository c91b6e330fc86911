// layout.hpp: the shared-memory heap, as every process sees it.
//
// Design
// ======
// shmalloc is Go's heap (runtime/malloc.go, mheap.go, mcentral.go,
// mcache.go) moved into one named POSIX shared-memory object that several
// processes map at once, each at its own address. One daemon, shmallocd,
// owns the page heap (mheap) and the per-span-class lists (mcentral); client
// processes keep per-thread caches of spans (mcache) and allocate from them
// without a lock, a syscall or a round trip.
//
// The structures, as in Go:
//
//   page     8 KiB of heap (Go's _PageSize), independent of the OS page.
//   arena    64 MiB of pages (Go's heapArenaBytes on 64-bit Linux).
//   mspan    a run of pages serving one span class, or one large object.
//   size class  one of Go 1.23's 67 object sizes, 8 B .. 32 KiB
//            (size_classes.hpp). A span class is size class * 2 + noscan:
//            136 span classes, 0 and 1 tagging large-object spans.
//   mheap    free page runs, growth, and the scavenger (mheap.hpp).
//   mcentral per span class, spans with free objects ("partial") and
//            spans without ("full") (mcentral.hpp).
//   mcache   per client thread: one span per span class (client/).
//
// Folders are layers, each a CMake target including only from those below
// it: shm/ (this heap, and errc.hpp's error codes) <- proto/ (the control
// protocol: its message table, the fields of each body, the socket's client
// side) <- client/ (libshmalloc) and cache/ <- metrics/ <- service/
// (shmallocd, whose reports are service/reports.cpp, and shmallocctl,
// which links proto/ without the heap).
//
// Map of the segment (offsets from the segment base; every region's offset
// and size is recorded in segment_header::regions, computed by
// compute_layout() from the capacity):
//
//   0            segment_header     identity, layout facts, region map
//   +            mheap_state        accounting, span pool, mcentral[136]
//   page_map     uint32 per page: span_id+1 of the in-use span covering it
//   page_bits    1 bit per page: 1 = not free (in use, or not committed)
//   page_summary segment tree over page_bits (see page_alloc.hpp)
//   chunks       per 4 MiB chunk: when a page in it was last freed
//   released     1 bit per page: free and returned to the OS
//   roots        named roots: name -> handle (publish / lookup)
//   profile      sampled allocations (SHMALLOC_PROFILE_RATE; profile.hpp)
//   spans        the mspan table (Go's mspan fixalloc)
//   caches       mcache slots: per-thread statistics blocks
//   arenas       the heap pages; starts 64 MiB-aligned
//
// The segment's file is sized to the whole map at creation but is sparse:
// memory is committed with posix_fallocate (see segment.hpp) when the heap
// grows, in steps of at least one 4 MiB chunk as Go grows, so that a full
// /dev/shm is a clean error at growth time and never a SIGBUS later. The
// scavenger returns idle pages with FALLOC_FL_PUNCH_HOLE (MADV_DONTNEED
// frees nothing on shared tmpfs) and they are committed again before reuse.
//
// The allocation path
// -------------------
// A client thread allocates from the span its mcache holds for the span
// class: it finds a clear bit in mspan::alloc_bits, sets it and returns
// base + index * size. The bitmap lives here, in the segment, and the bit is
// set before the object is returned, so if the process dies at any
// instruction the daemon sees every object that might be in use and never
// hands one out twice (at most the objects in flight leak). When the span is
// full the thread looks, in order, at (client/runtime.hpp has the levels):
//   1. its own spares (a few spans per class it filled, still its own);
//   2. its process's pool (spans with free slots no thread holds);
//   3. its process's parked queue: spans the process filled and keeps
//      ("parked", owner_cache = parked_token) that were freed into since;
//   4. the daemon, which takes one from mcentral (sweeping remote frees into
//      it first) or carves a new one out of mheap, growing the heap if it
//      must; refills come in batches that grow with demand.
// A process keeps the spans it fills: churn within its working set never
// reaches the daemon. Spans go back when the process's pool holds more than
// it took during a decay period, at trim, at detach and at death.
// Objects over 32 KiB get a span of their own straight from mheap.
//
// The free path
// -------------
// Any thread of any process may free any object. The handle gives the page,
// page_map gives the span. The thread that holds the span (mspan::owner_cache
// is its cache id) clears the bit itself. Anyone else sets the object's bit
// in the span's remote-free bitmap (mspan::remote_bits, one atomic OR; a bit
// already set is a double free, refused at once). The holder folds those
// bits into alloc_bits when its span runs dry (a parked span has no holder
// thread: every free into it is remote, and the first since it was parked
// tells its process, see below); the daemon folds them
// ("sweeps") for spans it holds, and returns spans left with no object to
// mheap, so memory never stays stuck in one size class. A free never writes
// into the freed object: a process that writes to memory it has freed
// damages only objects, never the allocator's bookkeeping.
//
// Who writes what
// ---------------
//   segment_header   the creating process, once, before it publishes
//                    state = ready (release); attachers read it after an
//                    acquire load of state, and never write it.
//   mheap_state      the daemon only (single writer). Other processes read
//                    heap_accounts through relaxed atomic loads.
//   page_map, page_bits, page_summary, chunks, released
//                    the daemon only. Clients read page_map entries of pages
//                    that hold objects they free; those entries do not change
//                    while the object is live.
//   mspan            geometry and list links: the daemon, while it holds the
//                    span (state central) or hands it out. alloc_bits: only
//                    the current holder (one client thread, or the daemon);
//                    a large span's one bit is clear while its holder keeps
//                    it freed in its cache of large objects, so a holder
//                    that dies leaves it free, not live.
//                    owner_cache: the holding client thread (relaxed atomic;
//                    only it ever stores its own id there, so a racing reader
//                    can never mistake itself for the holder), or the
//                    process's parked_token (seq_cst: the parker then looks
//                    at remote_bits, a freer the other way round), which one
//                    thread of it replaces by compare-exchange. remote_bits:
//                    any process sets bits (fetch_or); the holder takes
//                    each word by exchange. They have cache lines of their
//                    own, so remote frees do not take the lines the
//                    holder's fast paths read.
//                    state: the daemon (relaxed atomic; freers read it).
//   root_entry       the daemon only; clients ask it (lookup) over the socket.
//   profile_sample   a client claims a free entry (compare-exchange) and
//                    fills it; whoever frees the sampled object releases it
//                    (profile.hpp). The daemon reads it.
//   mheap_state::sweep_queue, mspan::sweep_next, mspan::sweep_queued
//                    a stack of spans with remote frees pending: any
//                    process pushes (compare-exchange on the head); the
//                    daemon takes the whole stack at once (exchange) and
//                    sweeps each span it holds, so its work is the spans
//                    freed into, not the spans that exist.
//   mcache_slot::parked_queue, mspan::parked_next, mspan::parked_queued
//                    the same, per process: a stack of its parked spans
//                    freed into since it parked them. Any process pushes;
//                    the parking process takes the whole stack (exchange),
//                    claims each span still parked (compare-exchange on
//                    owner_cache) and pools it.
//   mcache_slot      stats and requests: the one client thread owning the
//                    slot, relaxed single-writer stores (never
//                    read-modify-write); the daemon reads them. client: the
//                    daemon.
//
// Every atomic in the segment is static_asserted lock-free (shared_atomic.hpp):
// lock-based atomics would put a process-local lock around shared data.
//
// Where we differ from Go, and why
// --------------------------------
// - Objects are freed explicitly; there is no garbage collector. Go frees by
//   sweeping mark bits; we clear alloc bits on free and keep a remote-free
//   bitmap per span for frees from other threads and processes (mimalloc
//   and TCMalloc link freed objects into lists instead; a bitmap never
//   writes into the object, and finds a second free while the first waits).
// - mheap's free pages are a bitmap with a segment tree of (start, end, max)
//   free-run summaries (page_alloc.hpp), a simpler cousin of Go's radix
//   summaries: O(log n) first fit at the lowest address, as Go does.
// - The alloc bitmap is part of mspan (1024 bits, Go's maxObjsPerSpan)
//   rather than in separate gcBits arenas: one table, one commit policy.
// - No malloc headers, so every size up to 32 KiB is small (size_classes.hpp).
// - Freshly grown memory is committed (fallocated), so it counts as idle,
//   not released, unlike Go's Prepared state.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "shm/ids.hpp"
#include "shm/shared_atomic.hpp"
#include "shm/size_classes.hpp"

namespace shmalloc {

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

inline constexpr std::uint64_t heap_magic = 0x636f6c6c616d6873ULL;  // "shmalloc", little endian
inline constexpr std::uint32_t layout_version = 8;  // 2: mheap_state::sweep_wanted; 3: mspan::remote_bits; 4: sweep_queue; 5: tiny freed masks, mcache_slot::tiny_block; 6: request_stats; 7: the profile table, mspan::profile_sample; 8: parked spans (mspan::parked_next, parked_queued, mcache_slot::parked_queue)
inline constexpr std::uint64_t arena_bytes = 64ULL << 20;           // Go: heapArenaBytes
inline constexpr std::uint32_t pages_per_arena = arena_bytes / page_size;
inline constexpr std::uint32_t chunk_pages = 512;                   // Go: pallocChunkPages
inline constexpr std::uint64_t chunk_bytes = std::uint64_t{chunk_pages} * page_size;  // 4 MiB growth step
inline constexpr std::uint64_t default_capacity = 4ULL << 30;
inline constexpr std::uint64_t min_capacity = chunk_bytes;
inline constexpr std::uint64_t max_capacity = 1ULL << 40;           // 1 TiB: page ids fit 28 bits
inline constexpr std::uint32_t default_max_caches = 1024;
inline constexpr std::uint64_t os_page = 4096;                      // commit granularity of metadata
inline constexpr std::uint32_t bitmap_words = max_objects_per_span / 64;

// ---------------------------------------------------------------------------
// Statistics blocks (mimalloc's MI_STAT_FIELDS pattern): every counter is
// declared once here; metrics and checkers iterate the same list.
// ---------------------------------------------------------------------------

// X(name, help) for scalar monotonic counters kept per mcache.
#define SHMALLOC_STAT_COUNTERS(X)                                                 \
  X(large_allocs, "large objects allocated")                                      \
  X(large_frees, "large objects freed")                                           \
  X(large_alloc_bytes, "bytes of large objects allocated (whole pages)")          \
  X(large_free_bytes, "bytes of large objects freed (whole pages)")               \
  X(tiny_allocs, "objects packed by the tiny allocator")                          \
  X(remote_frees, "objects freed into spans held by another thread or process")   \
  X(refills, "spans taken from the process pool or the daemon")                  \
  X(double_frees, "remote double frees found while folding remote-free bitmaps")

// Counters one cache (or the daemon) writes. Single writer: bump() with a
// relaxed load and store, never a read-modify-write.
struct stats_block {
  shared_atomic<std::uint64_t> small_allocs[num_size_classes];
  shared_atomic<std::uint64_t> small_frees[num_size_classes];
#define SHMALLOC_X(name, help) shared_atomic<std::uint64_t> name;
  SHMALLOC_STAT_COUNTERS(SHMALLOC_X)
#undef SHMALLOC_X
};

// Requested sizes, sampled (shmallocctl advise): the allocation slow path
// records the size asked for, about once per 64 objects of a class (when a
// thread's bitmap word runs out), which is a fair sample of the class's
// requests at no cost to the fast path. Bucket k of size class c counts
// requests in (lo + k*w/8, lo + (k+1)*w/8], lo the previous class's size and
// w = class_to_size(c) - lo (request_bucket). bytes[c] sums the sampled
// sizes, for an exact mean. A 0-byte request is not sampled.
inline constexpr std::uint32_t request_buckets = 8;
struct request_stats {
  shared_atomic<std::uint32_t> hist[num_size_classes][request_buckets];
  shared_atomic<std::uint64_t> bytes[num_size_classes];
};

// The previous class's size: requests of class c are in (request_floor(c), class_to_size(c)].
constexpr std::size_t request_floor(std::uint8_t c) noexcept { return c <= 1 ? 0 : class_to_size(static_cast<std::uint8_t>(c - 1)); }
// The bucket of a request of `size` bytes (0 < size <= class_to_size(c)).
constexpr std::uint32_t request_bucket(std::uint8_t c, std::size_t size) noexcept {
  const std::size_t lo = request_floor(c);
  return static_cast<std::uint32_t>((size - lo - 1) * request_buckets / (class_to_size(c) - lo));
}
// The largest request bucket k holds.
constexpr std::size_t request_bucket_top(std::uint8_t c, std::uint32_t k) noexcept {
  const std::size_t lo = request_floor(c);
  return lo + ((k + 1) * (class_to_size(c) - lo) + request_buckets - 1) / request_buckets;
}

// One per client thread cache; slot 0 belongs to the daemon itself (and to
// a standalone heap user such as the foundation demo and tests).
struct mcache_slot {
  shared_atomic<std::uint32_t> client;  // daemon writes: client id using the slot, 0 = free
  // In a process's first slot (the hello's, runtime::parked_slot): the head
  // of its queue of parked spans that were freed into (mspan::parked_next),
  // span id + 1, 0 = empty. Any process pushes (compare-exchange); the
  // slot's process takes the whole queue (exchange).
  shared_atomic<std::uint32_t> parked_queue;
  // Daemon writes: a hash of the client's reattach token (welcome_msg),
  // kept so that a restarted daemon can check a reattach; never the token.
  std::uint64_t reattach_check;
  stats_block stats;                  // the slot's thread writes
  // The slot's thread writes (its tiny allocator's slow path): the handle of
  // its current tiny block (0: none) and its stats.tiny_allocs when it took
  // the block, so that the daemon can retire the block of a thread that
  // died: the objects handed out from it are the difference.
  std::uint64_t tiny_block;
  std::uint64_t tiny_allocs_at_block;
  request_stats requests;             // the slot's thread writes (its allocation slow path)
  // Whole cache lines (asserted below): no two threads' counters share one.
};

// ---------------------------------------------------------------------------
// mspan: a span descriptor (Go's mspan), one entry of the span table.
// ---------------------------------------------------------------------------

enum class mspan_state : std::uint8_t {
  dead = 0,     // descriptor unused (on the span pool's free list)
  central = 1,  // small span held by the daemon, on an mcentral list
  cached = 2,   // small span held by a client (owner_client)
  large = 3,    // large object's span; owner_client holds it
};

struct mspan {
  // Geometry: written by the daemon when it carves the span; constant while
  // the span is in use.
  page_id start;
  std::uint32_t npages;
  std::uint32_t elem_size;  // bytes per object (npages * page_size for large)
  std::uint16_t nelems;     // object slots
  std::uint8_t span_class;  // span_class::value
  shared_atomic<mspan_state> state;  // daemon writes; freers read (relaxed)

  // mcentral / span-pool links: daemon only.
  span_id next;
  span_id prev;

  std::uint32_t owner_client;              // daemon writes: client holding it, 0 = daemon
  // The holder thread writes its cache id + 1; 0 = none (the daemon, or the
  // process's pool); parked_token(slot): parked by the process whose first
  // slot that is (a span it filled and keeps, client/runtime.hpp).
  shared_atomic<std::uint32_t> owner_cache;
  std::uint32_t div_magic;  // daemon writes: class_div_magic(size class), 0 for large (the free path's index)
  std::uint16_t alloc_count;               // live objects per alloc_bits (exact while daemon holds it)
  // A large span's entry in the profile table, + 1 (0: not sampled). The
  // client that allocated the object stores it once the entry is
  // published; whoever frees the object (any client, or the daemon freeing
  // the span) takes it by exchange and releases the entry (profile.hpp).
  shared_atomic<std::uint16_t> profile_sample;
  // The daemon's sweep queue (mheap_state::sweep_queue). A remote freer
  // that finds sweep_queued clear sets it and pushes the span, writing
  // sweep_next just before its compare-exchange; the daemon reads
  // sweep_next after taking the whole queue, then clears sweep_queued.
  // Neither is reset when the descriptor is reused: the span may still be
  // on the queue.
  shared_atomic<std::uint32_t> sweep_next;  // span id + 1 of the next on the queue, 0 = last
  shared_atomic<std::uint8_t> sweep_queued;  // 1 from a push until the daemon takes the span off
  // The parking process's queue (mcache_slot::parked_queue), as the sweep
  // queue's pair above: a freer into a parked span (owner_cache is a
  // parked_token) that finds parked_queued clear sets it and pushes the
  // span on the queue of the slot the token names; the process clears it
  // as it takes the span off. The process that is handed the span by the
  // daemon clears it (a stale flag of a process that died).
  shared_atomic<std::uint8_t> parked_queued;
  std::uint8_t reserved2[2];

  // 1 = allocated; written by the holder only (relaxed single-writer
  // stores: the daemon reads them while a client holds the span).
  shared_atomic<std::uint64_t> alloc_bits[bitmap_words];
  shared_atomic<std::uint32_t> parked_next;  // span id + 1 of the next on the parked queue, 0 = last
  std::uint32_t reserved3;
  std::uint64_t pad;                       // to a line boundary
  // Objects freed by others and not yet folded into alloc_bits: any process
  // sets bits, the holder (or the daemon) takes them. Two lines of their own.
  shared_atomic<std::uint64_t> remote_bits[bitmap_words];
  // Five whole cache lines: descriptors of spans two threads hold never
  // share a line (the table is page-aligned).
};

// A parked span's owner_cache: never a thread's token (slot + 1 < 2^31), so
// every free into a parked span takes the remote path and finds the queue
// of the process that parked it.
inline constexpr std::uint32_t parked_flag = 0x8000'0000u;
constexpr std::uint32_t parked_token(std::uint32_t slot) noexcept { return parked_flag | slot; }
constexpr bool is_parked_token(std::uint32_t owner_cache) noexcept {
  return (owner_cache & parked_flag) != 0 && owner_cache != ~0u;
}

// ---------------------------------------------------------------------------
// Named roots: a fixed table the daemon keeps (publish, lookup, unpublish).
// ---------------------------------------------------------------------------

inline constexpr std::uint32_t max_roots = 1024;
inline constexpr std::size_t root_name_bytes = 64;  // NUL-terminated, so 63 characters at most

struct root_entry {
  char name[root_name_bytes];
  handle_t handle;  // 0 = unused entry
  std::uint64_t reserved;
};
static_assert(sizeof(root_entry) == 80);

// ---------------------------------------------------------------------------
// The profile table: sampled allocations (SHMALLOC_PROFILE_RATE), each on a
// span of its own so that its free is seen (profile.hpp has the design).
// ---------------------------------------------------------------------------

inline constexpr std::uint32_t max_profile_samples = 2048;
inline constexpr std::uint32_t profile_frames = 6;

struct profile_sample {
  // The sampled object's handle; 0: the entry is free, profile_claiming:
  // being filled. Claimed by the sampling client (compare-exchange 0 ->
  // profile_claiming), published by it (release store of the handle) once
  // the rest is written, and released by whoever frees the object
  // (compare-exchange handle -> 0). The rest: the sampling client writes it
  // between claim and publish, relaxed; the daemon reads it relaxed and
  // keeps what it read only if the handle is the same after (a seqlock
  // whose sequence is the handle).
  shared_atomic<std::uint64_t> handle;
  shared_atomic<std::uint64_t> size;      // bytes requested
  shared_atomic<std::uint64_t> alloc_ns;  // CLOCK_MONOTONIC, when it was allocated
  shared_atomic<std::uint32_t> rate;      // the process's SHMALLOC_PROFILE_RATE: the sample's weight
  shared_atomic<std::uint32_t> frames;    // entries of pc and vma in use
  // The call stack at the allocation, innermost first: each return address
  // in the allocating process (pc; where in that process's memory map the
  // module is) and less its module's load bias (vma: what addr2line takes).
  shared_atomic<std::uint64_t> pc[profile_frames];
  shared_atomic<std::uint64_t> vma[profile_frames];
};
inline constexpr std::uint64_t profile_claiming = 1;  // never an object's handle (they are page-aligned or in arenas)

// ---------------------------------------------------------------------------
// Tiny spans (Go's tinySpanClass): every span of the 16-byte noscan class
// packs pointer-free objects under 16 bytes into its 16-byte blocks. Because
// objects are freed explicitly, each block needs a count of the objects in
// it: one signed byte per block, kept in the span's first 512 bytes. And so
// that a second free of a tiny object is caught instead of freeing its
// block under the other objects in it, a 16-bit mask per block of the
// offsets freed since the block was handed out, in the next 1,024 bytes.
// Those 96 blocks are marked allocated from the moment the span is carved.
// Any process freeing a tiny object sets its offset's bit (a bit already set
// is a double free) and decrements the block's count, both atomically; the
// one that brings the count to zero frees the block. The thread that takes
// a block clears its mask.
// ---------------------------------------------------------------------------

inline constexpr std::uint8_t tiny_span_class = 2 << 1 | 1;
inline constexpr std::uint32_t tiny_counts_offset = 0;        // int8 per block
inline constexpr std::uint32_t tiny_freed_masks_offset = 512;  // uint16 per block
inline constexpr std::uint32_t tiny_metadata_blocks = (512 + 1024) / 16;

// Slots of a span of class spc that hold metadata, not objects.
constexpr std::uint32_t reserved_slots(std::uint8_t spc) noexcept {
  return spc == tiny_span_class ? tiny_metadata_blocks : 0;
}

// ---------------------------------------------------------------------------
// mheap and mcentral state.
// ---------------------------------------------------------------------------

// Per span class (Go's mcentral): spans with and without free objects held by
// the daemon, and a count of spans out in client caches. Daemon only.
struct mcentral_state {
  span_id partial;  // list head: spans with at least one free slot
  span_id full;     // list head: spans with none (may have pending remote frees)
  std::uint32_t partial_count;
  std::uint32_t full_count;
  std::uint32_t cached_count;
  std::uint32_t reserved;
};

// Per 4 MiB chunk: the scavenger's bookkeeping. Daemon only.
struct chunk_info {
  std::uint64_t last_free_ns;    // when a page in the chunk was last freed
  std::uint32_t released_pages;  // pages of this chunk returned to the OS
  std::uint32_t reserved;
};

// The span table's free list and commit watermark (Go's fixalloc). Daemon only.
struct span_pool_state {
  span_id free_head;       // chain through mspan::next
  std::uint32_t committed; // descriptors backed by committed memory
  std::uint32_t in_use;    // descriptors in use
  std::uint32_t high_water;// descriptors ever handed out (table prefix in use)
};

// MemStats-style accounts. The daemon writes (single writer, relaxed
// store); anyone reads. Bytes are derived from pages where they can be.
struct heap_accounts {
  shared_atomic<std::uint64_t> pages_committed;  // heap_sys / page_size
  shared_atomic<std::uint64_t> pages_in_use;     // heap_inuse / page_size
  shared_atomic<std::uint64_t> pages_released;   // heap_released / page_size
  shared_atomic<std::uint64_t> metadata_committed_bytes;  // segment bytes committed outside arenas
  shared_atomic<std::uint64_t> large_spans;      // large objects live
  shared_atomic<std::uint64_t> large_pages;      // pages of live large objects
  shared_atomic<std::uint64_t> grow_count;       // successful heap growths
  shared_atomic<std::uint64_t> grow_failures;    // growths refused (capacity or no space)
  shared_atomic<std::uint64_t> scavenged_bytes_total;  // bytes returned to the OS, cumulative
  shared_atomic<std::uint64_t> recommitted_bytes_total;// released bytes committed again on reuse
  shared_atomic<std::uint64_t> reclaimed_bytes_total;  // bytes taken back from dead clients
  shared_atomic<std::uint64_t> caches_in_use;    // mcache slots assigned
  shared_atomic<std::uint64_t> caches_committed; // mcache slots backed by committed memory
  shared_atomic<std::uint64_t> remote_free_errors; // double frees and stray bits found by folds
};

struct mheap_state {
  heap_accounts accounts;
  span_pool_state span_pool;
  std::uint32_t next_client_id;  // daemon only: client ids stay unique across daemon restarts
  mcentral_state central[num_span_classes];
  stats_block retired;  // counters of cache slots that were recycled (daemon writes)
  request_stats retired_requests;  // likewise, their sampled requested sizes
  // Spans with remote frees pending since the daemon last looked, as a
  // stack of span id + 1 linked through mspan::sweep_next (0 = empty): any
  // process pushes a span it is the first to free into; the daemon takes
  // the stack every tick and sweeps the spans it holds. Push-and-take-all
  // has no ABA: a node pushed again links to whatever is the head then.
  // Its own cache line: freers write it, the daemon polls it.
  alignas(64) shared_atomic<std::uint32_t> sweep_queue;
  std::uint8_t sweep_queue_pad[60];
};

// ---------------------------------------------------------------------------
// The segment header and the map of the segment.
// ---------------------------------------------------------------------------

struct region {
  std::uint64_t offset;
  std::uint64_t bytes;
};

struct region_map {
  region fixed;         // segment_header + mheap_state
  region page_map;
  region page_bits;
  region page_summary;
  region chunks;
  region released;
  region roots;
  region profile;
  region spans;
  region caches;
  region arenas;
};

enum class segment_state : std::uint32_t { initializing = 0, ready = 1 };

struct segment_header {
  std::uint64_t magic;
  std::uint32_t layout_version;
  std::uint32_t page_size;
  std::uint64_t arena_bytes;
  std::uint64_t capacity;             // bytes of the arena region (heap pages)
  std::uint64_t size_class_checksum;  // size_class_table_checksum() of the creator
  std::uint64_t instance_id;          // random, new for every heap created
  std::uint64_t segment_bytes;        // size of the shared-memory object
  std::uint32_t max_pages;
  std::uint32_t max_spans;
  std::uint32_t max_caches;
  std::uint32_t summary_leaves;       // leaves of the page_summary tree (power of two)
  std::uint32_t creator_pid;
  shared_atomic<segment_state> state;   // creator stores ready (release) last
  std::uint64_t created_unix_ns;
  std::uint32_t mspan_size;           // sizeof(mspan) of the creator
  std::uint32_t mcache_slot_size;     // sizeof(mcache_slot) of the creator
  region_map regions;
};

// The fixed region: header then mheap state, at offset 0.
struct segment_fixed {
  segment_header header;
  alignas(64) mheap_state heap;
};

// Computes the segment map for a capacity (bytes of heap, rounded up to whole
// arenas) and a number of cache slots. Pure: attachers recompute it to check
// the header they read.
region_map compute_layout(std::uint64_t capacity, std::uint32_t max_caches,
                          std::uint32_t* summary_leaves);

// ---------------------------------------------------------------------------
// Layout guarantees (more in layout.cpp).
// ---------------------------------------------------------------------------

// Every struct placed in the segment is trivially copyable and standard
// layout, with its size pinned, so that a change of layout is a deliberate
// layout_version bump. shared_atomic<T> asserts that each atomic is lock-free.
template <class T>
inline constexpr bool is_shareable_v = std::is_trivially_copyable_v<T> && std::is_standard_layout_v<T>;

static_assert(is_shareable_v<mspan> && is_shareable_v<segment_header> && is_shareable_v<mheap_state>);
static_assert(is_shareable_v<stats_block> && is_shareable_v<mcache_slot> && is_shareable_v<segment_fixed>);
static_assert(sizeof(mspan) == 320 && sizeof(mspan) % 64 == 0 && offsetof(mspan, remote_bits) % 64 == 0);
static_assert(sizeof(stats_block) == (2 * num_size_classes + 8) * 8);
static_assert(sizeof(mcache_slot) == 16 + sizeof(stats_block) + 16 + sizeof(request_stats) && sizeof(mcache_slot) % 64 == 0);
static_assert(request_bucket(5, 33) == 0 && request_bucket(5, 48) == 7 && request_bucket_top(5, 3) == 40);  // class 5: 48 bytes
static_assert(sizeof(mcentral_state) == 24);
static_assert(is_shareable_v<profile_sample> && sizeof(profile_sample) == 128);
static_assert(sizeof(chunk_info) == 16);
// The fixed region: a change here is a layout_version bump.
static_assert(sizeof(mheap_state) == 7360 && sizeof(segment_fixed) == 7680);

}  // namespace shmalloc
