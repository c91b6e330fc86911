// runtime.hpp: libshmalloc's process-wide runtime, shared by the client's
// source files and by nothing else (not installed, not included by users).
//
// Who owns what (each file opens by saying the same of itself):
//
//   mcache.hpp      the per-thread cache and the allocation fast path
//                   (alloc_small, alloc_tiny): no lock, no call.
//   free.hpp        the free fast path (free_object), inlined into
//                   shmalloc_free, and the slow paths it jumps to.
//   runtime.hpp     this file: the runtime struct and what the files share.
//   span_pool.hpp   the lock-free per-process pool of spans (span_pool,
//                   span_links).
//   attach.cpp      attach, reconnect, fork, this process's identity, the
//                   control connection (request_locked), and the heap view
//                   the fast paths read (g_view, g_size, g_committed).
//   slow_path.cpp   the thread caches: the static empty cache and t_cache,
//                   opening and releasing a thread's cache, refills, spans
//                   taken and dropped, spares, the full list, the tiny
//                   allocator's slow path (alloc_slow, alloc_tiny_slow).
//   large.cpp       large objects: allocation, free, and the process's cache
//                   of freed large objects.
//   profile.cpp     sampled allocations (SHMALLOC_PROFILE_RATE): the
//                   countdown to the next sample and the sampled object.
//   trim.cpp        trimming and decay: what a thread or the process caches
//                   goes back to the daemon after SHMALLOC_CACHE_DECAY_MS.
//   free.cpp        the free slow paths: remote, tiny, large and bad frees.
//   c_api.cpp       the extern "C" functions of shmalloc.h.
//
// The levels (Go's mcache, mcentral and mheap, with TCMalloc's transfer
// cache and mimalloc's full page queue between the first two). A process
// keeps every span it fills; churn within its working set never reaches the
// daemon, which it asks only when its live memory grows past what it holds,
// when what it holds has sat idle for a decay period, at trim and at detach
// (and the daemon takes back what a dead process held).
//
//   thread     mcache: per span class, the current span (fast paths, no
//              lock, no atomic read-modify-write) and up to 63 spares
//              (512 KiB) it filled, looked at oldest first; frees into all
//              of them are local. No lock.
//   process    lock-free, in process memory and the process's first cache
//              slot:
//              - the pool (span_pool.hpp): per class, spans with free slots
//                that no thread holds; threads pop before anything else.
//              - parked spans: spans a thread filled past its spares stay
//                the process's, owner_cache = parked_token (layout.hpp).
//                Every free into one is a remote free, and the first since
//                it was parked pushes it on the process's parked queue
//                (mcache_slot::parked_queue); a thread whose pool is empty
//                takes the queue whole and pools each span that has a free
//                slot again (drain_parked). No round trip, by any freer.
//   daemon     refills in batches that double while a class's refills come
//              within 50 ms of each other; releases in batches of
//              max_release: the pool's surplus over what the process took
//              during the last decay period (trim.cpp: a steady workload
//              takes as much as it pools, so it keeps it), everything at
//              shmalloc_trim (but parked spans with live objects) and at
//              detach.
//
// The process-wide runtime (rt()) holds the control connection (under a
// mutex: only slow paths that talk to the daemon use it), the mapping of the
// heap, the pool, and the list of spans to give back in a batch. What the
// fast paths read without that mutex is outside it: the heap view (set at
// attach, before any cache can hold a span, cleared only by detach) and each
// thread's cache.
//
// Everything here is in shmalloc::client::detail, hidden: libshmalloc.so
// exports none of it. What only one file uses stays in that file's
// anonymous namespace.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "client/mcache.hpp"
#include "client/span_pool.hpp"
#include "proto/control_client.hpp"
#include "shm/segment.hpp"

namespace shmalloc::client {
namespace detail __attribute__((visibility("hidden"))) {

// What allocation and free read without the runtime's lock: set at attach
// (attach.cpp), before any cache can hold a span, and cleared only by
// detach.
extern constinit heap_view g_view;
extern constinit std::uint64_t g_size;
// A lower bound of the heap's committed pages (g_view.committed_pages),
// in process memory: the free fast path compares with it without following
// a pointer into the segment. The heap's count only grows, so a stale bound
// only sends a free to the slow path, which raises it. 0 when detached.
extern constinit std::atomic<std::uint64_t> g_committed;

// The thread cache every thread starts on (slow_path.cpp).
extern constinit mcache empty_cache;

constexpr std::uint16_t first_batch = 2;

// Trimming: what a process caches for speed (each thread's spans, the pool,
// freed large objects) goes back to the daemon once it has sat unused for a
// decay period, so that other processes can have it. There is no background
// thread: a thread checks the clock every trim_check_every slow-path calls.
constexpr std::uint64_t default_cache_decay_ns = 500'000'000;
constexpr std::uint64_t never = ~std::uint64_t{0};
constexpr std::uint32_t trim_check_every = 64;
extern std::atomic<std::uint64_t> g_cache_decay_ns;  // SHMALLOC_CACHE_DECAY_MS, read at attach (trim.cpp)

inline std::uint64_t now_ns() {
  return static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
}

struct runtime {
  std::mutex mu;  // the connection, the full list, batch sizes, attach state
  std::unique_ptr<control_client> conn;
  std::string socket;  // of the last attach: a forked child or a reconnect uses it again
  // Where this process runs, read at attach and said in each hello (a
  // reconnect says it again): its hostname and its container's short id.
  std::string host;
  std::string container;
  std::unique_ptr<segment> seg;
  std::uint32_t client_id = 0;
  std::uint64_t reattach_token = 0;  // the welcome's: shown by reattach after a daemon restart
  // Our own descriptor of the heap object, through which we hold the
  // liveness lock of each slot a hello gave us (segment::liveness_held): a
  // restarted daemon keeps our spans for us however long we stay silent.
  // -1 when detached; a forked child closes its copy.
  int liveness_fd = -1;
  std::uint32_t main_slot = 0;
  // The slot whose parked_queue this process's parked spans name (their
  // owner_cache is parked_token(parked_slot)): the first hello's, changed
  // only by a reconnect (repark_locked). Read without the mutex.
  std::atomic<std::uint32_t> parked_slot{0};
  // Threads walking a parked queue they took (drain_parked): a thread that
  // finds the queue and its pool empty meanwhile waits for them, not for a
  // refill (a walk of a thousand spans takes a few hundred microseconds).
  std::atomic<std::uint32_t> draining{0};
  bool main_slot_free = false;  // the slot hello gave serves the first thread that needs one
  // Cache slots of threads that ended, kept for the next threads on this
  // connection: a thread that starts then costs no cache_open round trip,
  // and one that ends no cache_close. The daemon retires them at bye.
  std::vector<std::uint32_t> spare_slots;
  bool attached = false;
  bool atfork_registered = false;
  // Every open thread cache (ensure_cache adds, release removes), so that
  // detach can empty them (forget_thread_caches_locked).
  std::set<mcache*> caches;
  span_pool pool;
  std::vector<std::uint32_t> full;  // spans to give back, in batches (trim, detach)
  std::set<std::uint32_t> held;     // every span and large object the daemon records as ours
  bool lost_heap = false;  // the daemon came back with another heap: nothing can be recovered
  // Large objects this process freed, kept (still held from the daemon's
  // point of view) so that repeated large allocations skip the round trip.
  struct cached_large {
    std::uint32_t span;
    std::uint32_t npages;
    std::uint32_t start;  // first page
    std::uint32_t epoch;  // trim_epoch when it was freed
  };
  // By pages, the most recently freed last: a request takes the smallest
  // size that fits, in O(log sizes).
  std::map<std::uint32_t, std::vector<cached_large>> large_cache;
  std::size_t large_cache_count = 0;
  std::uint64_t large_cache_bytes = 0;
  // Handles of large objects freed while the daemon was away (a restart):
  // freed by the next reconnect.
  std::vector<std::uint64_t> deferred_large_frees;
  std::uint16_t batch[num_span_classes] = {};
  // Spans of each class this process holds (refills add, releases take
  // off): a refill asks for at most a quarter more, so that a class's
  // growth overshoots what it uses by at most that much.
  std::uint32_t class_spans[num_span_classes] = {};
  std::uint64_t last_refill_ns[num_span_classes] = {};
  // Trimming: a process-wide trim bumps the epoch; what was last used two
  // epochs ago has sat unused for a whole decay period.
  std::uint64_t last_trim_ns = 0;
  std::atomic<std::uint32_t> trim_epoch{2};
  // Per span class, spans taken from the pool or refilled into it since the
  // last trim (the class's recent demand): the trim keeps that many.
  std::atomic<std::uint32_t> pool_demand[num_span_classes] = {};
  std::uint32_t large_calls = 0;
};

inline runtime& rt() {
  static runtime* r = new runtime;  // never destroyed: threads may free during exit
  return *r;
}

inline int fail(errc e) { return -static_cast<int>(e); }

// The segment's cache slot a thread cache counts into; nullptr for the
// static empty cache and a cache whose slot was lost (its stats are then
// process-local).
inline mcache_slot* slot_of(mcache* mc) noexcept {
  if (g_view.base == nullptr || mc->stats == nullptr) return nullptr;
  auto* at = reinterpret_cast<std::byte*>(mc->stats) - offsetof(mcache_slot, stats);
  return at >= g_view.base && at < g_view.base + g_size ? reinterpret_cast<mcache_slot*>(at) : nullptr;
}

// attach.cpp

// REQUIRES: r.mu held.
int attach_locked(runtime& r, const char* socket_path);
// REQUIRES: r.mu held. One request; if the daemon does not answer, one
// reconnect and one retry. Bounded: each wait is control_client's timeout.
result<std::vector<std::uint8_t>> request_locked(runtime& r, proto::msg type, const std::vector<std::uint8_t>& body);
int ensure_attached();

// slow_path.cpp

// REQUIRES: r.mu held. Gives the full list back to the daemon.
void release_full_locked(runtime& r);
// REQUIRES: r.mu held. Drops the liveness locks (detach, a forked child).
void drop_liveness(runtime& r) noexcept;
// Folds the span's remote frees into its bitmap (this thread holds it).
void fold(mcache* mc, mspan& s) noexcept;
// Gives up a span this thread holds, which stays the process's: pooled if
// it has a free slot, else parked.
void drop_span(runtime& r, std::uint8_t spc, mspan& s) noexcept;
// Claims the parked span s as `token`, folds it, and pools it if a slot is
// free, else parks it again; false if it was not ours to claim.
bool unpark_locally(runtime& r, mcache* mc, mspan& s, std::uint32_t slot, std::uint32_t token) noexcept;
// Pools the spans on the process's parked queue that got a free slot,
// claiming each as `token` while it folds (~0u: a thread with no cache).
void drain_parked(runtime& r, mcache* mc, std::uint32_t token) noexcept;
// The calling thread's cache, opened on first use; nullptr if it gets none.
mcache* ensure_cache();
// Gives the calling thread's spans back and its cache slot up (thread exit,
// detach).
void release_thread_cache() noexcept;
// REQUIRES: r.mu held. Detach: every other thread's cache stops pointing
// into the heap (its spans are the daemon's to take back at bye), so that
// its thread's exit, or its next call, touches nothing unmapped.
void forget_thread_caches_locked(runtime& r) noexcept;

// large.cpp

// REQUIRES: r.mu held. Whether a cached large object is still the one this
// process freed: another process freeing it again (a double free) gives it
// back to the daemon behind our back, and then neither reusing it nor
// freeing it again is ours to do. Inline: take_large checks every cache hit.
inline bool still_ours(const runtime& r, const runtime::cached_large& c) noexcept {
  const mspan& s = g_view.span(span_id{c.span});
  return s.state.load(std::memory_order_relaxed) == mspan_state::large && s.owner_client == r.client_id &&
         s.npages == c.npages && s.start.value == c.start;
}
SHMALLOC_SLOW_PATH void* alloc_large(std::size_t size, bool noscan) noexcept;
// alloc_large without the profiler's look: what a sampled allocation takes.
SHMALLOC_SLOW_PATH void* alloc_large_unsampled(std::size_t size, bool noscan) noexcept;
SHMALLOC_SLOW_PATH void free_large(void* p, mspan& s) noexcept;

// profile.cpp

// SHMALLOC_PROFILE_RATE in bytes, read at attach; 0: off.
extern std::atomic<std::uint32_t> g_profile_rate;
void read_profile_rate() noexcept;
// Takes `credit` bytes off the thread's countdown; true if the allocation
// being made is due for a sample (and the countdown starts again).
bool profile_due(mcache* mc, std::uint64_t credit) noexcept;
// Bytes the thread will allocate before its next slow path (a word loaded).
void profile_credit(mcache* mc, std::uint64_t bytes) noexcept;
// Records the large object p, of `size` bytes requested, as a sample.
SHMALLOC_SLOW_PATH void profile_record(void* p, std::size_t size) noexcept;
// A sampled allocation: a large object of its own, recorded.
SHMALLOC_SLOW_PATH void* alloc_sampled(std::size_t size, bool noscan) noexcept;
inline bool profiling() noexcept { return g_profile_rate.load(std::memory_order_relaxed) != 0; }

// trim.cpp

// REQUIRES: r.mu held. Gives every cached large object back (detach).
void flush_large_cache(runtime& r);
// REQUIRES: r.mu held. A thread's trim; with `everything`, every span it
// holds with no live object.
void trim_thread_locked(runtime& r, mcache* mc, bool everything);
// REQUIRES: r.mu held. Every parked span goes on the full list (detach).
void unpark_all_locked(runtime& r);
// REQUIRES: r.mu held. Parked spans name new_slot's queue (a reconnect).
void repark_locked(runtime& r, std::uint32_t new_slot);
// REQUIRES: r.mu held. The process's trim: its pool and its large objects.
void trim_process_locked(runtime& r, bool everything);
// REQUIRES: r.mu held. The process's trim, if a decay period has passed.
void trim_process_if_due_locked(runtime& r, std::uint64_t decay, std::uint64_t t);
// Trims this thread's cache, and the process's, if a decay period has
// passed since each was last trimmed.
void maybe_trim(runtime& r, mcache* mc);

// free.cpp

[[noreturn]] SHMALLOC_SLOW_PATH void bad_free(const void* p, const char* why);
// Frees slot i of span s: cleared by the holder, pushed by anyone else.
void free_slot(mspan& s, std::uint32_t i, std::uint8_t size_class, const void* p) noexcept;

}  // namespace detail
}  // namespace shmalloc::client
