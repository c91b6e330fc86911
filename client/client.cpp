// client.cpp: libshmalloc's slow paths and its C API.
//
// The process-wide runtime holds the control connection (under a mutex:
// only slow paths use it), the mapping of the heap, the lock-free pool of
// spans refilled from the daemon in batches, and the list of full spans
// waiting to be given back in a batch. The fast paths are in mcache.hpp
// (allocation) and free_object() below (free).
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "client/mcache.hpp"
#include "shm/control_client.hpp"
#include "shm/segment.hpp"
#include "shmalloc/shmalloc.h"

namespace shmalloc::client {

namespace {

constinit stats_block dummy_stats{};
constinit mcache empty_cache{.alloc = {}, .token = ~0u, .slot = 0, .stats = &dummy_stats};

// What allocation and free read without the runtime's lock: set at attach,
// before any cache can hold a span, and cleared only by detach.
constinit heap_view g_view{};
constinit std::uint64_t g_size = 0;
// A lower bound of the heap's committed pages (g_view.committed_pages),
// in process memory: the free fast path compares with it without following
// a pointer into the segment. The heap's count only grows, so a stale bound
// only sends a free to the slow path, which raises it. 0 when detached.
constinit std::atomic<std::uint64_t> g_committed{0};

constexpr std::uint16_t first_batch = 2;
constexpr std::uint16_t max_batch = proto::max_refill;
constexpr std::size_t release_batch = 32;
constexpr std::uint64_t hot_refill_ns = 50'000'000;  // refills closer than this grow the batch
constexpr std::uint64_t max_pool_bytes = 1 << 20;  // per span class: more goes back to the daemon
constexpr std::size_t large_cache_entries = 8;
constexpr std::uint64_t large_cache_max_bytes = 64ULL << 20;

// Trimming: what a process caches for speed (each thread's spans, the pool,
// freed large objects) goes back to the daemon once it has sat unused for a
// decay period, so that other processes can have it. There is no background
// thread: a thread checks the clock every trim_check_every slow-path calls.
constexpr std::uint64_t default_cache_decay_ns = 500'000'000;
constexpr std::uint64_t never = ~std::uint64_t{0};
constexpr std::uint32_t trim_check_every = 64;
// Slots of ended threads a process keeps for new ones (runtime::spare_slots);
// they count against the daemon's --max-caches-per-client (default 256).
constexpr std::size_t max_spare_slots = 16;
std::atomic<std::uint64_t> g_cache_decay_ns{default_cache_decay_ns};  // SHMALLOC_CACHE_DECAY_MS, read at attach

std::uint64_t now_ns() {
  return static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
}

// The pool's next links, one per span id the heap may ever have. Mapped,
// not allocated: a process pays only for the pages of the ids it pools.
// (new[] zeroed every link at attach: 2 MiB for a 4 GiB heap, 512 MiB for
// a 1 TiB one.)
class span_links {
 public:
  span_links() = default;
  span_links(const span_links&) = delete;
  span_links& operator=(const span_links&) = delete;
  ~span_links() { unmap(); }
  bool map(std::uint32_t count) noexcept {
    unmap();
    const std::size_t bytes = std::size_t{count} * sizeof(std::uint32_t);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    links_ = static_cast<std::uint32_t*>(p);
    bytes_ = bytes;
    return true;
  }
  std::atomic_ref<std::uint32_t> operator[](std::uint32_t id) const noexcept {
    return std::atomic_ref<std::uint32_t>(links_[id]);
  }

 private:
  void unmap() noexcept {
    if (links_ != nullptr) munmap(links_, bytes_);
    links_ = nullptr;
    bytes_ = 0;
  }
  std::uint32_t* links_ = nullptr;
  std::size_t bytes_ = 0;
};

// Per span class, a lock-free stack of spans this process holds but no
// thread caches (Treiber stack; the upper 32 bits of the head are a tag
// that changes on every operation, so a stale head never wins a CAS).
class span_pool {
 public:
  bool reset(std::uint32_t max_spans) noexcept {
    clear();
    return next_.map(max_spans);
  }
  // Spans in the pool for spc (approximate under concurrency: a bound, not
  // an invariant).
  std::uint32_t size(std::uint8_t spc) const noexcept { return size_[spc].load(std::memory_order_relaxed); }
  void push(std::uint8_t spc, std::uint32_t id) noexcept {
    size_[spc].fetch_add(1, std::memory_order_relaxed);
    std::uint64_t old = head_[spc].load(std::memory_order_relaxed);
    std::uint64_t desired;
    do {
      next_[id].store(static_cast<std::uint32_t>(old), std::memory_order_relaxed);
      desired = (((old >> 32) + 1) << 32) | (id + 1);
    } while (!head_[spc].compare_exchange_weak(old, desired, std::memory_order_release, std::memory_order_relaxed));
  }
  // A span id, or -1 if the pool is empty.
  std::int64_t pop(std::uint8_t spc) noexcept {
    std::uint64_t old = head_[spc].load(std::memory_order_acquire);
    for (;;) {
      const auto top = static_cast<std::uint32_t>(old);
      if (top == 0) return -1;
      const std::uint64_t desired = (((old >> 32) + 1) << 32) | next_[top - 1].load(std::memory_order_relaxed);
      if (head_[spc].compare_exchange_weak(old, desired, std::memory_order_acquire, std::memory_order_acquire)) {
        size_[spc].fetch_sub(1, std::memory_order_relaxed);
        return top - 1;
      }
    }
  }
  void clear() noexcept {
    for (auto& h : head_) h.store(0, std::memory_order_relaxed);
    for (auto& n : size_) n.store(0, std::memory_order_relaxed);
  }

 private:
  span_links next_;
  std::atomic<std::uint64_t> head_[num_span_classes] = {};
  std::atomic<std::uint32_t> size_[num_span_classes] = {};
};

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
  std::uint32_t main_slot = 0;
  bool main_slot_free = false;  // the slot hello gave serves the first thread that needs one
  // Cache slots of threads that ended, kept for the next threads on this
  // connection: a thread that starts then costs no cache_open round trip,
  // and one that ends no cache_close. The daemon retires them at bye.
  std::vector<std::uint32_t> spare_slots;
  bool attached = false;
  bool atfork_registered = false;
  span_pool pool;
  std::vector<std::uint32_t> full;  // spans to give back, in batches
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
  std::vector<cached_large> large_cache;
  std::uint64_t large_cache_bytes = 0;
  // Handles of large objects freed while the daemon was away (a restart):
  // freed by the next reconnect.
  std::vector<std::uint64_t> deferred_large_frees;
  std::uint16_t batch[num_span_classes] = {};
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

runtime& rt() {
  static runtime* r = new runtime;  // never destroyed: threads may free during exit
  return *r;
}

int fail(errc e) { return -static_cast<int>(e); }

// ---------------------------------------------------------------------------
// Attach, detach, fork
// ---------------------------------------------------------------------------

void after_fork_in_child() noexcept;

std::string process_name() {
  char buf[64] = {};
  FILE* f = std::fopen("/proc/self/comm", "r");
  if (f != nullptr) {
    if (std::fgets(buf, sizeof buf, f) == nullptr) buf[0] = '\0';
    std::fclose(f);
  }
  std::string s(buf);
  if (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

bool reconnect_locked(runtime& r);

// The first max bytes of a file of /proc (whose size stat does not tell).
std::string read_proc_file(const char* path, std::size_t max) {
  std::string text;
  FILE* f = std::fopen(path, "re");
  if (f == nullptr) return text;
  char buf[4096];
  for (std::size_t n; text.size() < max && (n = std::fread(buf, 1, sizeof buf, f)) > 0;) text.append(buf, n);
  std::fclose(f);
  return text;
}

// Where this process runs, for the daemon's client table and log: its
// hostname (in a container, that of its UTS namespace: docker makes it the
// short container id unless told otherwise), and the id of its container
// from its cgroup or, with a private cgroup namespace, from the mount of
// /etc/hostname. Both made fit for hello, which refuses unprintable bytes.
void read_identity(runtime& r) {
  char host[256] = {};
  r.host = gethostname(host, sizeof host - 1) == 0 ? proto::identity_text(host, proto::max_host) : std::string();
  r.container = proto::container_from_cgroup(read_proc_file("/proc/self/cgroup", 64 << 10));
  if (r.container.empty())
    r.container = proto::container_from_mountinfo(read_proc_file("/proc/self/mountinfo", 1 << 20));
}

// hello, saying where this process runs; the welcome, or nullopt.
std::optional<proto::welcome_msg> say_hello(control_client& conn, const runtime& r) {
  const proto::hello_msg m{layout_version, static_cast<std::uint32_t>(getpid()), process_name(), r.host, r.container};
  auto f = conn.call(proto::msg::hello, proto::encode(m));
  if (!f || f->status() != errc::ok) return std::nullopt;
  auto parts = proto::split_reply(f->payload);
  if (!parts) return std::nullopt;
  return proto::decode_welcome(parts->body);
}

// SHMALLOC_CACHE_DECAY_MS: milliseconds a cached span or large object may
// sit unused before it goes back to the daemon; "off" keeps them until the
// thread or process ends. Anything else is reported once and ignored.
std::uint64_t read_cache_decay() {
  const char* v = std::getenv("SHMALLOC_CACHE_DECAY_MS");
  if (v == nullptr || *v == '\0') return default_cache_decay_ns;
  if (std::strcmp(v, "off") == 0) return never;
  char* end = nullptr;
  errno = 0;
  const unsigned long long ms = std::strtoull(v, &end, 10);
  if (errno != 0 || *end != '\0' || *v == '-' || ms > 86'400'000) {
    std::fprintf(stderr, "shmalloc: SHMALLOC_CACHE_DECAY_MS=%s is not a number of milliseconds up to a day or \"off\"; "
                 "using %llu\n", v, static_cast<unsigned long long>(default_cache_decay_ns / 1'000'000));
    return default_cache_decay_ns;
  }
  return ms * 1'000'000;
}

// REQUIRES: r.mu held.
int attach_locked(runtime& r, const char* socket_path) {
  if (r.attached) return 0;
  if (r.client_id != 0) return reconnect_locked(r) ? 0 : fail(errc::unavailable);  // lost the daemon, not detached
  const std::string path = socket_path != nullptr ? socket_path : !r.socket.empty() ? r.socket : default_socket_path();
  auto conn = std::make_unique<control_client>(path);
  if (!conn->connected()) return fail(errc::unavailable);
  read_identity(r);
  auto w = say_hello(*conn, r);
  if (!w) return fail(errc::unavailable);
  if (w->layout_version != layout_version || w->size_class_checksum != size_class_table_checksum())
    return fail(errc::layout_mismatch);
  if (!r.seg || r.seg->header().instance_id != w->instance_id) {
    auto att = segment::attach(w->heap_name);
    if (!att) return fail(att.code());
    r.seg = std::move(att.value());
    if (!r.pool.reset(r.seg->header().max_spans)) {  // out of address space in this process
      r.seg.reset();
      return fail(errc::os_error);
    }
  }
  r.conn = std::move(conn);
  r.socket = path;
  g_cache_decay_ns.store(read_cache_decay(), std::memory_order_relaxed);  // each attach (a forked child's too) reads it
  r.held.clear();
  r.lost_heap = false;
  r.client_id = w->client_id;
  r.main_slot = w->cache_slot;
  r.main_slot_free = true;
  r.spare_slots.clear();  // a detached or forked process's, retired with its connection
  g_view = heap_view::of(*r.seg);
  g_size = r.seg->size();
  g_committed.store(0, std::memory_order_relaxed);  // raised by the first free
  for (auto& b : r.batch) b = first_batch;
  r.attached = true;
  if (!r.atfork_registered) {
    pthread_atfork([] { rt().mu.lock(); }, [] { rt().mu.unlock(); }, [] {
      rt().mu.unlock();
      after_fork_in_child();
    });
    r.atfork_registered = true;
  }
  return 0;
}

// REQUIRES: r.mu held. The daemon went away and (perhaps) came back: say
// hello again and reattach every span and large object this process holds,
// under the old client id. If the daemon now serves another heap, nothing we
// hold exists there: the process stays detached and says so once.
bool reconnect_locked(runtime& r) {
  if (r.lost_heap) return false;
  const std::uint32_t old_id = r.client_id;
  const std::uint64_t old_instance = r.seg ? r.seg->header().instance_id : 0;
  r.conn.reset();
  r.attached = false;
  auto conn = std::make_unique<control_client>(r.socket);
  if (!conn->connected()) return false;
  auto w = say_hello(*conn, r);
  if (!w) return false;
  if (w->instance_id != old_instance) {
    std::fprintf(stderr, "shmalloc: the daemon came back with another heap; this process's objects are lost to it\n");
    r.lost_heap = true;
    return false;
  }
  const std::vector<std::uint32_t> all(r.held.begin(), r.held.end());
  for (std::size_t at = 0; at < all.size(); at += proto::max_release) {
    const std::size_t n = std::min<std::size_t>(proto::max_release, all.size() - at);
    std::vector<std::uint32_t> part(all.begin() + static_cast<std::ptrdiff_t>(at),
                                    all.begin() + static_cast<std::ptrdiff_t>(at + n));
    conn->request(proto::msg::reattach, proto::encode(proto::reattach_msg{old_id, part}));
  }
  r.conn = std::move(conn);
  r.client_id = w->client_id;
  r.attached = true;
  r.spare_slots.clear();  // the old connection's: passed on by reattach, or reclaimed
  for (const std::uint64_t h : std::exchange(r.deferred_large_frees, {})) {
    auto done = r.conn->request(proto::msg::free_large, proto::encode(proto::free_large_msg{h}));
    if (done)
      r.held.erase(g_view.span_of(g_view.pointer(h)).value);
    else
      std::fprintf(stderr, "shmalloc: a large object freed while the daemon was away: %s\n", done.err().message.c_str());
  }
  return true;
}

// REQUIRES: r.mu held. One request; if the daemon does not answer, one
// reconnect and one retry. Bounded: each wait is control_client's timeout.
result<std::vector<std::uint8_t>> request_locked(runtime& r, proto::msg type, const std::vector<std::uint8_t>& body) {
  if (!r.attached && (r.socket.empty() || !reconnect_locked(r))) return error{errc::unavailable, "not attached"};
  auto reply = r.conn->request(type, body);
  if (reply || reply.code() != errc::unavailable) return reply;
  if (!reconnect_locked(r)) return reply;
  return r.conn->request(type, body);
}

int ensure_attached() {
  runtime& r = rt();
  std::lock_guard lock(r.mu);
  return attach_locked(r, nullptr);
}

// The child of fork() owns nothing of its parent's: not its connection, its
// caches, its pool or its full list. The mapping stays, so inherited
// pointers remain valid; the child says hello anew on first use.
void after_fork_in_child() noexcept {
  runtime& r = rt();
  // Close the child's copy of the parent's socket (a copy held here would
  // keep the daemon from seeing the parent exit), and leak the object: no
  // allocator calls between fork and the child's own use.
  if (r.conn) r.conn.release()->close_inherited();
  r.pool.clear();
  r.full.clear();
  r.held.clear();
  r.large_cache.clear();
  r.large_cache_bytes = 0;
  r.deferred_large_frees.clear();  // the parent frees them
  r.attached = false;
  r.client_id = 0;
  t_cache = &empty_cache;
}

// REQUIRES: r.mu held. Gives the full list back to the daemon.
void release_full_locked(runtime& r) {
  for (std::size_t at = 0; at < r.full.size(); at += proto::max_release) {
    const std::size_t n = std::min<std::size_t>(proto::max_release, r.full.size() - at);
    std::vector<std::uint32_t> part(r.full.begin() + static_cast<std::ptrdiff_t>(at),
                                    r.full.begin() + static_cast<std::ptrdiff_t>(at + n));
    if (request_locked(r, proto::msg::release, proto::encode(proto::span_list_msg{part})))
      for (std::uint32_t id : part) r.held.erase(id);
  }
  r.full.clear();
}

// ---------------------------------------------------------------------------
// Thread caches
// ---------------------------------------------------------------------------

bool has_free_slot(const mspan& s) noexcept {
  for (std::uint32_t w = 0; w * 64 < s.nelems; ++w) {
    const std::uint32_t valid = s.nelems - w * 64;
    const std::uint64_t mask = valid >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << valid) - 1;
    if ((~s.alloc_bits[w] & mask) != 0) return true;
  }
  return false;
}

// Loads into e the first word of s in [from, to) with a free slot.
// When there is none, e keeps pointing at s (its span() stays s) with no
// free bits.
bool load_word(mcache_entry& e, mspan& s, std::uint32_t from, std::uint32_t to = bitmap_words) noexcept {
  for (std::uint32_t w = from; w < to && w * 64 < s.nelems; ++w) {
    std::uint64_t free = ~s.alloc_bits[w];
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

// Gives up the entry's span: to the pool if a slot is free, else to the
// full list (released to the daemon in batches).
void drop_span(runtime& r, std::uint8_t spc, mspan& s) {
  s.owner_cache.store(0, std::memory_order_release);
  const std::uint32_t id = g_view.span_id_of(s).value;
  const std::uint64_t pooled = std::uint64_t{r.pool.size(spc) + 1} * class_span_bytes(span_class{spc}.size_class());
  if (has_free_slot(s) && pooled <= max_pool_bytes) {
    r.pool.push(spc, id);
    return;
  }
  std::lock_guard lock(r.mu);
  r.full.push_back(id);
  if (r.full.size() >= release_batch) release_full_locked(r);
}

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
  fold(mc, s);
  bump(mc->stats->refills, std::uint64_t{1});
  return install(mc->alloc[spc], s);
}

// The current span ran dry: switch to a spare that has a free slot (after
// folding its remote frees), or keep the dry one as a spare, dropping the
// oldest spare if there are too many. True if e now has a free slot.
//
// The spares are a queue, oldest first. The search takes spans from the
// front, and every span it finds dry, the current one included, goes to the
// back: the front is always the span that went dry longest ago, which has
// had the most time to get its objects back. When a class's working set
// cycles through its spans, the first spare looked at has room, and spans
// held full by long-lived objects drift behind those that cycle. (Taking a
// spare in place, as this once did, left the dry spans at the front to be
// looked at again on every switch: a cycle through k spans cost k^2 / 2.)
bool switch_to_spare(runtime& r, mcache* mc, std::uint8_t spc) {
  mcache_entry& e = mc->alloc[spc];
  spare_queue& q = mc->spares[spc];
  const std::uint32_t current = g_view.span_id_of(*e.span()).value;
  for (std::uint8_t looked = 0, n = q.n; looked < n; ++looked) {
    const spare_queue::entry front = q.pop_front();
    mspan& s = g_view.span(span_id{front.id});
    fold(mc, s);
    if (has_free_slot(s)) {  // front becomes current; the dry current goes to the back
      q.push_back({current, true});
      return install(e, s);
    }
    q.push_back(front);  // dry: to the back
  }
  // Every spare was dry (and the queue is back in its order). Keep at most
  // a queue's capacity, and max_spare_bytes, per class.
  const std::uint64_t span_bytes = class_span_bytes(span_class{spc}.size_class());
  while (q.n > 0 && (q.n == spare_queue::capacity || (q.n + 1) * span_bytes > mcache::max_spare_bytes))
    drop_span(r, spc, g_view.span(span_id{q.pop_front().id}));
  q.push_back({current, true});
  e = mcache_entry{};
  return false;
}

// The shared object count of the tiny block at p (its span's first bytes).
std::atomic_ref<std::int8_t> tiny_count_of(const mspan& s, std::uint32_t block) noexcept {
  return std::atomic_ref<std::int8_t>(*reinterpret_cast<std::int8_t*>(g_view.span_base(s) + block));
}

// Frees slot i of span s: cleared by the holder, pushed by anyone else.
void free_slot(mspan& s, std::uint32_t i, std::uint8_t size_class, const void* p) noexcept;

// Retires the thread's current tiny block: its count loses the bias and
// gains the objects packed into it; whoever brings the count to zero (now,
// or a later free) frees the block.
void retire_tiny(mcache* mc) noexcept {
  if (mc->tiny == nullptr) return;
  const span_id id = g_view.span_at(g_view.handle_of(mc->tiny));
  mspan& s = g_view.span(id);
  const auto block = static_cast<std::uint32_t>((mc->tiny - g_view.span_base(s)) / tiny_size);
  const auto delta = static_cast<std::int8_t>(static_cast<int>(mc->tiny_count) - tiny_bias);
  if (tiny_count_of(s, block).fetch_add(delta, std::memory_order_acq_rel) + delta == 0)
    free_slot(s, block, tiny_size_class, mc->tiny);
  mc->tiny = nullptr;
  mc->tiny_offset = tiny_size;
  mc->tiny_count = 0;
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
  auto body = request_locked(r, proto::msg::refill, proto::encode(proto::refill_msg{spc, n}));
  if (!body) return -1;
  auto list = proto::decode_span_list(body.value(), proto::max_refill);
  if (!list || list->span_ids.empty()) return -1;
  tsan_acquire_cross_process();  // the daemon folded what was pushed into these spans' memory
  r.held.insert(list->span_ids.begin(), list->span_ids.end());
  r.pool_demand[spc].fetch_add(1, std::memory_order_relaxed);  // the span returned; pooled ones count when taken
  for (std::size_t i = 1; i < list->span_ids.size(); ++i) r.pool.push(spc, list->span_ids[i]);
  return list->span_ids[0];
}

void release_thread_cache() noexcept;

struct thread_cache_guard {
  ~thread_cache_guard() { release_thread_cache(); }
};
thread_local thread_cache_guard t_guard;

mcache* ensure_cache() {
  if (t_cache != &empty_cache) return t_cache;
  runtime& r = rt();
  std::lock_guard lock(r.mu);
  if (!r.attached && attach_locked(r, nullptr) != 0) return nullptr;
  std::uint32_t slot = r.main_slot;
  if (r.main_slot_free) {
    r.main_slot_free = false;
  } else if (!r.spare_slots.empty()) {
    slot = r.spare_slots.back();
    r.spare_slots.pop_back();
  } else {
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
  (void)&t_guard;  // constructs the guard, so the thread's exit gives the cache back
  t_cache = mc;
  return mc;
}

void release_thread_cache() noexcept {
  mcache* mc = t_cache;
  if (mc == &empty_cache) return;
  retire_tiny(mc);
  runtime& r = rt();
  for (std::uint32_t spc = 0; spc < num_span_classes; ++spc) {
    const auto c = static_cast<std::uint8_t>(spc);
    if (mspan* s = mc->alloc[spc].span(); s != nullptr) drop_span(r, c, *s);
    for (std::uint8_t k = 0; k < mc->spares[spc].n; ++k) drop_span(r, c, g_view.span(span_id{mc->spares[spc].ids[k]}));
  }
  t_cache = &empty_cache;
  std::lock_guard lock(r.mu);
  if (r.attached && mc->slot == r.main_slot) r.main_slot_free = true;  // retired with the connection
  else if (r.attached && r.spare_slots.size() < max_spare_slots) r.spare_slots.push_back(mc->slot);
  else if (r.attached) request_locked(r, proto::msg::cache_close, proto::encode(proto::slot_msg{mc->slot}));
  delete mc;
}

// ---------------------------------------------------------------------------
// Bad frees
// ---------------------------------------------------------------------------

[[noreturn]] SHMALLOC_SLOW_PATH void bad_free(const void* p, const char* why) {
  std::fprintf(stderr, "shmalloc: free(%p): %s\n", p, why);
  std::abort();
}

}  // namespace

constinit thread_local mcache* t_cache __attribute__((tls_model("initial-exec"))) = &empty_cache;

namespace {
void maybe_trim(runtime& r, mcache* mc);
}  // namespace

SHMALLOC_SLOW_PATH void* alloc_slow(std::uint8_t size_class, bool noscan) noexcept {
  mcache* mc = ensure_cache();
  if (mc == nullptr) return nullptr;
  runtime& r = rt();
  const std::uint8_t spc = span_class::make(size_class, noscan).value;
  mcache_entry& e = mc->alloc[spc];
  mc->active[spc / 64] |= std::uint64_t{1} << (spc % 64);
  if (SHMALLOC_UNLIKELY(++mc->slow_calls % trim_check_every == 0)) maybe_trim(r, mc);
  // First what this thread freed into the word it allocates from: in a
  // steady state that is where the next objects are, and reading one word
  // is the cheapest refill there is (it also keeps objects packed low).
  if (mspan* s = e.span(); s != nullptr && load_word(e, *s, e.word, e.word + 1)) return alloc_small(size_class, noscan);
  for (int attempt = 0; attempt < 8; ++attempt) {
    if (mspan* s = e.span(); s != nullptr) {
      // The rest of the span, then what other threads and processes freed.
      if (load_word(e, *s, e.word + 1) || (fold(mc, *s), load_word(e, *s, 0))) return alloc_small(size_class, noscan);
      if (switch_to_spare(r, mc, spc)) return alloc_small(size_class, noscan);
    }
    std::int64_t id = r.pool.pop(spc);
    if (id >= 0) r.pool_demand[spc].fetch_add(1, std::memory_order_relaxed);
    if (id < 0) id = refill(r, spc);
    if (id < 0) return nullptr;
    if (take_span(mc, spc, static_cast<std::uint32_t>(id))) return alloc_small(size_class, noscan);
  }
  return nullptr;
}


SHMALLOC_SLOW_PATH void* alloc_tiny_slow(std::size_t size) noexcept {
  mcache* mc = ensure_cache();
  if (mc == nullptr) return nullptr;
  retire_tiny(mc);
  auto* block = static_cast<std::byte*>(alloc_small(tiny_size_class, true));  // a block of a tiny span
  if (block == nullptr) return nullptr;
  const mspan& s = g_view.span(g_view.span_at(g_view.handle_of(block)));
  tiny_count_of(s, static_cast<std::uint32_t>((block - g_view.span_base(s)) / tiny_size))
      .store(tiny_bias, std::memory_order_relaxed);
  mc->tiny = block;
  mc->tiny_offset = 0;
  mc->tiny_count = 0;
  return alloc_tiny(size);
}

namespace {

// REQUIRES: r.mu held. Whether a cached large object is still the one this
// process freed: another process freeing it again (a double free) gives it
// back to the daemon behind our back, and then neither reusing it nor
// freeing it again is ours to do.
bool still_ours(const runtime& r, const runtime::cached_large& c) noexcept {
  const mspan& s = g_view.span(span_id{c.span});
  return s.state.load(std::memory_order_relaxed) == mspan_state::large && s.owner_client == r.client_id &&
         s.npages == c.npages && s.start.value == c.start;
}

// REQUIRES: r.mu held. A cached large span of the right size (at most an
// eighth bigger), or nullptr.
void* take_cached_large(runtime& r, std::size_t size) noexcept {
  const std::uint64_t need = (size + page_size - 1) / page_size;
  for (std::size_t i = 0; i < r.large_cache.size(); ++i) {
    const runtime::cached_large c = r.large_cache[i];
    if (c.npages < need || c.npages > need + need / 8) continue;
    r.large_cache.erase(r.large_cache.begin() + static_cast<std::ptrdiff_t>(i));
    r.large_cache_bytes -= std::uint64_t{c.npages} * page_size;
    if (!still_ours(r, c)) {
      r.held.erase(c.span);
      return take_cached_large(r, size);
    }
    mspan& s = g_view.span(span_id{c.span});
    s.alloc_bits[0] |= 1;  // allocated again, before it is returned (cache_large)
    return g_view.span_base(s);
  }
  return nullptr;
}

// REQUIRES: r.mu held. Keeps a large object this process allocated, if
// the cache has room; false otherwise.
bool cache_large(runtime& r, void* p, const mspan& s) noexcept {
  const std::uint32_t id = g_view.span_id_of(s).value;
  for (const auto& c : r.large_cache)
    if (c.span == id) bad_free(p, "double free (of a large object)");
  const std::uint64_t bytes = std::uint64_t{s.npages} * page_size;
  if (s.owner_client != r.client_id || r.large_cache.size() >= large_cache_entries ||
      r.large_cache_bytes + bytes > large_cache_max_bytes)
    return false;
  r.large_cache.push_back({id, s.npages, s.start.value, r.trim_epoch.load(std::memory_order_relaxed)});
  r.large_cache_bytes += bytes;
  // Free in the heap's eyes while it waits here, so that if this process
  // dies the daemon frees it instead of keeping it as a live object
  // (request_handler::reclaim); its holder writes a span's alloc bits.
  g_view.span(span_id{id}).alloc_bits[0] &= ~std::uint64_t{1};
  return true;
}

// REQUIRES: r.mu held. Gives every cached large object back (detach).
// REQUIRES: r.mu held. Gives back the cached large objects that keep(c)
// does not want kept.
template <class Keep>
void trim_large_cache(runtime& r, Keep keep) {
  std::size_t kept = 0;
  for (const auto& c : r.large_cache) {
    if (keep(c)) {
      r.large_cache[kept++] = c;
      continue;
    }
    r.large_cache_bytes -= std::uint64_t{c.npages} * page_size;
    if (!still_ours(r, c)) {  // freed twice elsewhere: not ours to free again
      r.held.erase(c.span);
      continue;
    }
    const handle_t h = g_view.handle_of(g_view.span_base(g_view.span(span_id{c.span})));
    if (request_locked(r, proto::msg::free_large, proto::encode(proto::free_large_msg{h}))) r.held.erase(c.span);
  }
  r.large_cache.resize(kept);
}

// REQUIRES: r.mu held. Gives every cached large object back (detach).
void flush_large_cache(runtime& r) {
  trim_large_cache(r, [](const runtime::cached_large&) { return false; });
}

// REQUIRES: r.mu held. Gives s, which this thread held, back to the daemon
// (with the next batch of full spans).
void give_back_locked(runtime& r, mspan& s) {
  s.owner_cache.store(0, std::memory_order_release);
  r.full.push_back(g_view.span_id_of(s).value);
}

// REQUIRES: r.mu held. Gives back the thread's spans of every span class it
// has not allocated from since its last trim, whether or not objects in them
// are live (their frees become remote frees), and of the other classes the
// spares that hold no live object and were not current since the last trim,
// past the first two. (Giving back every such spare slowed the next steady
// state of the mixed benchmark by up to two times, for a reason not found.)
// With `everything`, every span of every class that holds no live object.
// The tiny class keeps its spans: its current block is counted in a way only
// its thread can retire.
void trim_thread_locked(runtime& r, mcache* mc, bool everything) {
  for (std::uint32_t spc = 0; spc < num_span_classes; ++spc) {
    if (spc == tiny_span_class) continue;
    mcache_entry& e = mc->alloc[spc];
    // Active: its slow path ran (the bit), or its fast path took a slot.
    const bool active = ((mc->active[spc / 64] >> (spc % 64)) & 1) != 0 || e.free_bits != mc->free_bits_at_trim[spc];
    const bool idle = !everything && !active;
    spare_queue& q = mc->spares[spc];
    std::uint32_t* const spares = q.ids;
    std::uint8_t& n = q.n;
    std::uint16_t& used = q.used;
    std::uint8_t kept = 0;
    for (std::uint8_t k = 0; k < n; ++k) {
      mspan& s = g_view.span(span_id{spares[k]});
      const bool was_current = ((used >> k) & 1) != 0;
      bool goes = idle;
      if (!goes && (everything || (!was_current && k >= mcache::spares_kept_by_trim))) {
        fold(mc, s);
        goes = count_allocated(s) == 0;
      }
      if (goes) {
        give_back_locked(r, s);
        continue;
      }
      spares[kept++] = spares[k];
    }
    n = kept;
    used = 0;  // a new period starts
    if (mspan* s = e.span(); s != nullptr && (idle || (everything && (fold(mc, *s), count_allocated(*s) == 0)))) {
      give_back_locked(r, *s);
      e = mcache_entry{};
    }
    mc->free_bits_at_trim[spc] = e.free_bits;
  }
  for (auto& word : mc->active) word = 0;
  release_full_locked(r);
}

// REQUIRES: r.mu held. Of each class's pooled spans, those beyond what its
// threads took (or refilled) during the last decay period; large objects
// cached that long; with `everything`, all of both. A class whose demand
// stopped also starts its refill batches small again.
void trim_process_locked(runtime& r, bool everything) {
  const std::uint32_t epoch = r.trim_epoch.load(std::memory_order_relaxed);
  for (std::uint32_t spc = 0; spc < num_span_classes; ++spc) {
    const auto c = static_cast<std::uint8_t>(spc);
    const std::uint32_t demand = r.pool_demand[spc].exchange(0, std::memory_order_relaxed);
    const std::uint32_t keep = everything ? 0 : demand;
    const std::uint32_t pooled = r.pool.size(c);
    for (std::uint32_t k = keep; k < pooled; ++k) {
      const std::int64_t id = r.pool.pop(c);
      if (id < 0) break;
      r.full.push_back(static_cast<std::uint32_t>(id));
    }
    if (demand == 0) r.batch[spc] = first_batch;
  }
  release_full_locked(r);
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
  std::lock_guard lock(r.mu);
  if (!r.attached) return;
  trim_thread_locked(r, mc, false);
  mc->last_trim_ns = t;
  trim_process_if_due_locked(r, decay, t);
}

SHMALLOC_SLOW_PATH void* take_large(std::size_t size, bool noscan) noexcept {
  runtime& r = rt();
  std::lock_guard lock(r.mu);
  if (!r.attached && attach_locked(r, nullptr) != 0) return nullptr;
  if (void* p = take_cached_large(r, size)) return p;
  auto body = request_locked(r, proto::msg::alloc_large, proto::encode(proto::alloc_large_msg{size, noscan}));
  if (!body) return nullptr;
  auto large = proto::decode_large(body.value());
  if (!large) return nullptr;
  tsan_acquire_cross_process();  // as for a refill: its pages may have held pushed objects
  r.held.insert(large->span_id);
  return g_view.pointer(large->handle);
}

SHMALLOC_SLOW_PATH void* alloc_large(std::size_t size, bool noscan) noexcept {
  void* p = take_large(size, noscan);
  if (p == nullptr) return nullptr;
  // Counted in this thread's block, which a thread whose first object is
  // large must open (else a free counted elsewhere would leave it one short).
  if (mcache* mc = ensure_cache(); mc != nullptr) {
    bump(mc->stats->large_allocs, std::uint64_t{1});
    bump(mc->stats->large_alloc_bytes, (size + page_size - 1) / page_size * page_size);
  }
  return p;
}

SHMALLOC_SLOW_PATH void free_large(void* p, const mspan& s) noexcept {
  runtime& r = rt();
  const std::uint64_t bytes = object_bytes(s);
  {
    std::lock_guard lock(r.mu);
    const std::uint64_t h = g_view.handle_of(p);
    if (std::find(r.deferred_large_frees.begin(), r.deferred_large_frees.end(), h) != r.deferred_large_frees.end())
      bad_free(p, "double free (of a large object)");
    const bool up = r.attached || attach_locked(r, nullptr) == 0;
    if (!cache_large(r, p, s)) {
      if (!up) {
        r.deferred_large_frees.push_back(h);  // the daemon is away: freed when the library reconnects
      } else {
        auto done = request_locked(r, proto::msg::free_large, proto::encode(proto::free_large_msg{h}));
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
  if (mcache* mc = ensure_cache(); mc != nullptr) {
    bump(mc->stats->large_frees, std::uint64_t{1});
    bump(mc->stats->large_free_bytes, bytes);
  }
}

SHMALLOC_SLOW_PATH void free_remote(mspan& s, std::uint32_t index, std::uint8_t size_class, const void* p) noexcept {
  if (span_push_remote(g_view, s, index) == errc::double_free)
    bad_free(p, "double free (freed before by another thread or process, and not yet reclaimed)");
  mcache* mc = ensure_cache();
  if (mc == nullptr) return;  // counted nowhere: the daemon is gone
  bump(mc->stats->small_frees[size_class], std::uint64_t{1});
  bump(mc->stats->remote_frees, std::uint64_t{1});
}

// The span holding p, or a bad_free report; *offset is p's offset in it.
SHMALLOC_FAST_PATH mspan& locate(const void* p, std::uint64_t* offset) noexcept {
  const heap_view& v = g_view;
  const span_id id = v.span_of(p);
  if (SHMALLOC_UNLIKELY(!id)) {
    const auto* b = static_cast<const std::byte*>(p);
    bad_free(p, v.base == nullptr || b < v.arenas || b >= v.base + g_size ? "not a pointer into the shared heap"
                                                                          : "not inside an allocated span (already freed?)");
  }
  mspan& s = v.span(id);
  *offset = static_cast<std::uint64_t>(static_cast<const std::byte*>(p) - v.span_base(s));
  return s;
}

// A tiny object: one less in its block; the last one out frees the block.
SHMALLOC_SLOW_PATH void free_tiny(mspan& s, std::uint64_t offset, const void* p) noexcept {
  const auto block = static_cast<std::uint32_t>(offset / tiny_size);
  if (block < tiny_counter_blocks || !is_allocated(s, block)) bad_free(p, "not a live tiny object (double free?)");
  const std::int8_t before = tiny_count_of(s, block).fetch_sub(1, std::memory_order_acq_rel);
  if (before <= 0) bad_free(p, "double free (of a tiny object)");
  if (before == 1) free_slot(s, block, tiny_size_class, p);
}

}  // namespace

SHMALLOC_FAST_PATH void free_slot_inline(mspan& s, std::uint32_t i, std::uint8_t size_class, const void* p) noexcept {
  mcache* mc = t_cache;
  if (SHMALLOC_UNLIKELY(s.owner_cache.load(std::memory_order_relaxed) != mc->token))
    return free_remote(s, i, size_class, p);
  const std::uint64_t bit = std::uint64_t{1} << (i % 64);
  if (SHMALLOC_UNLIKELY((s.alloc_bits[i / 64] & bit) == 0)) bad_free(p, "double free");
  s.alloc_bits[i / 64] &= ~bit;
  bump(mc->stats->small_frees[size_class]);
}

namespace {

// Clears bit i % 64 of w; true if it was set. One `btr` on x86-64, which
// takes the bit number modulo 64 itself (GCC spells the portable form as
// five instructions).
SHMALLOC_FAST_PATH bool test_and_clear(std::uint64_t& w, std::uint32_t i) noexcept {
#if defined(__x86_64__) && defined(__GCC_ASM_FLAG_OUTPUTS__)
  bool was_set;
  asm("btrq %q2, %0" : "+r"(w), "=@ccc"(was_set) : "r"(std::uint64_t{i}));
  return was_set;
#else
  const std::uint64_t bit = std::uint64_t{1} << (i % 64);
  const bool was_set = (w & bit) != 0;
  w &= ~bit;
  return was_set;
#endif
}

// Every free the fast path does not finish: large and tiny objects, remote
// frees, and bad pointers, each checked in full and reported by name.
SHMALLOC_SLOW_PATH void free_slow(void* p) noexcept {
  if (p == nullptr) return;
  if (g_view.committed_pages != nullptr)
    g_committed.store(g_view.committed_pages->load(std::memory_order_relaxed), std::memory_order_relaxed);
  std::uint64_t offset = 0;
  mspan& s = locate(p, &offset);
  if (SHMALLOC_UNLIKELY(s.elem_size == 0)) {
    if (offset != 0) bad_free(p, "not the start of an object");
    return free_large(p, s);
  }
  if (s.span_class == tiny_span_class) return free_tiny(s, offset, p);
  // Go's division-free object index: a multiply by the class's magic.
  const std::uint8_t size_class = span_class{s.span_class}.size_class();
  const object_position at = object_position_of(static_cast<std::uint32_t>(offset), class_div_magic(size_class));
  if (!at.start || at.index >= s.nelems) bad_free(p, "not the start of an object");
  free_slot_inline(s, at.index, size_class, p);
}

}  // namespace

namespace {

// An object of a span this thread does not hold, whose index the fast path
// found: a remote free, without finding the span again. Steps into a span's
// tail, and any span without a size class (large spans never get here: their
// magic is 0), go to free_slow.
SHMALLOC_SLOW_PATH void free_other(void* p, mspan& s, std::uint32_t i) noexcept {
  if (s.elem_size == 0 || i >= s.nelems) return free_slow(p);
  free_remote(s, i, span_class{s.span_class}.size_class(), p);
}

}  // namespace

// The free fast path: a small object of a span this thread holds, allocated.
// Anything else takes free_slow, which checks again and says what is wrong.
// Three things make the checks here cheap: a page without a span maps to
// entry 0, which wraps past max_spans; a large object's span has class 0,
// whose magic 0 no offset passes; and bits at or past nelems are never set,
// so a slot in a span's tail reads as free. The index stays inside the
// bitmap: a span of c's class holds at most bitmap_words * 64 objects, and
// offset < span bytes.
SHMALLOC_FAST_PATH void free_object(void* p) noexcept {
  const heap_view& v = g_view;
  const auto off = static_cast<std::uint64_t>(static_cast<const std::byte*>(p) - v.arenas);
  const std::uint64_t page = off / page_size;
  if (SHMALLOC_UNLIKELY(page >= g_committed.load(std::memory_order_relaxed))) return free_slow(p);
  const std::uint32_t entry = v.page_map[page] - 1;
  if (SHMALLOC_UNLIKELY(entry >= v.max_spans)) return free_slow(p);
  mspan& s = v.spans[entry];
  __builtin_prefetch(&s.alloc_bits[2], 1);
  if (SHMALLOC_UNLIKELY(s.span_class == tiny_span_class)) return free_slow(p);
  const std::uint64_t offset = off - std::uint64_t{s.start.value} * page_size;
  // With the magic the span carries: no table lookup after the span's line
  // arrives.
  const object_position at = object_position_of(static_cast<std::uint32_t>(offset), s.div_magic);
  if (SHMALLOC_UNLIKELY(!at.start)) return free_slow(p);
  const std::uint32_t i = at.index;
  const std::uint8_t size_class = span_class{s.span_class}.size_class();
  mcache* mc = t_cache;
  if (SHMALLOC_UNLIKELY(s.owner_cache.load(std::memory_order_relaxed) != mc->token)) return free_other(p, s, i);
  std::uint64_t& word = s.alloc_bits[i / 64];
  std::uint64_t bits = word;
  if (SHMALLOC_UNLIKELY(!test_and_clear(bits, i))) return free_slow(p);
  word = bits;
  bump(mc->stats->small_frees[size_class]);
}

namespace {
void free_slot(mspan& s, std::uint32_t i, std::uint8_t size_class, const void* p) noexcept {
  free_slot_inline(s, i, size_class, p);
}
}  // namespace


SHMALLOC_FAST_PATH void* alloc(std::size_t size, bool noscan) noexcept {
  if (SHMALLOC_UNLIKELY(size > max_small_size)) return alloc_large(size, noscan);  // size 0 is class 1
  if (noscan && size - 1 < tiny_size - 1) return alloc_tiny(size);  // 1..15 bytes; 0 wraps past
  const std::uint8_t c = size_to_class_fast(size);
  // The noscan 16-byte span class is the tiny allocator's: other 16-byte
  // objects take the scan class (no collector reads the difference).
  return alloc_small(c, noscan && c != tiny_size_class);
}

}  // namespace shmalloc::client

// ---------------------------------------------------------------------------
// The C API
// ---------------------------------------------------------------------------

using namespace shmalloc;
using namespace shmalloc::client;

extern "C" {

int shmalloc_attach(const char* socket_path) {
  runtime& r = rt();
  std::lock_guard lock(r.mu);
  return attach_locked(r, socket_path);
}

void shmalloc_detach(void) {
  release_thread_cache();
  runtime& r = rt();
  std::lock_guard lock(r.mu);
  if (!r.attached && r.client_id == 0) return;
  flush_large_cache(r);
  // Spans pooled but unused go back with the full ones.
  for (std::uint32_t spc = 0; spc < num_span_classes; ++spc)
    for (std::int64_t id; (id = r.pool.pop(static_cast<std::uint8_t>(spc))) >= 0;) r.full.push_back(static_cast<std::uint32_t>(id));
  release_full_locked(r);
  if (r.conn) r.conn->request(proto::msg::bye);  // the daemon retires every slot of ours
  r.conn.reset();
  r.attached = false;
  r.client_id = 0;
  g_committed.store(0, std::memory_order_relaxed);
  g_view = heap_view{};
  g_size = 0;
  r.seg.reset();
}

const char* shmalloc_strerror(int code) { return to_string(static_cast<errc>(code < 0 ? -code : code)); }

void* shmalloc_alloc(size_t size) { return client::alloc(size, false); }

// Pointer-free objects under 16 bytes go to the tiny allocator.
void* shmalloc_alloc_noscan(size_t size) { return client::alloc(size, true); }

void* shmalloc_alloc_aligned(size_t size, size_t alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > page_size) {
    errno = EINVAL;
    return nullptr;
  }
  if (alignment <= 8 || size > max_small_size) return client::alloc(size, false);  // large spans are page-aligned
  const std::uint8_t c = size_to_class_aligned(size == 0 ? 1 : size, alignment);
  return c != 0 ? alloc_small(c, false) : client::alloc(max_small_size + 1, false);
}

// NULL needs no test of its own: it lies below the arenas, so the fast
// path's page bound sends it to free_slow, which returns.
void shmalloc_free(void* p) { free_object(p); }

void shmalloc_trim(void) {
  runtime& r = rt();
  mcache* mc = t_cache;
  std::lock_guard lock(r.mu);
  if (!r.attached) return;
  if (mc != &empty_cache) trim_thread_locked(r, mc, true);
  trim_process_locked(r, true);
}

size_t shmalloc_usable_size(const void* p) {
  if (p == nullptr || g_view.base == nullptr) return 0;
  const span_id id = g_view.span_at(g_view.handle_of(p));
  if (!id) return 0;
  const mspan& s = g_view.span(id);
  if (s.span_class == tiny_span_class)  // to the end of its block
    return tiny_size - static_cast<std::size_t>(static_cast<const std::byte*>(p) - g_view.span_base(s)) % tiny_size;
  return object_bytes(s);
}

uint64_t shmalloc_handle(const void* p) {
  if (p == nullptr || g_view.base == nullptr) return 0;
  const auto* b = static_cast<const std::byte*>(p);
  return b >= g_view.base && b < g_view.base + g_size ? g_view.handle_of(p) : 0;
}

void* shmalloc_pointer(uint64_t handle) {
  if (handle == 0) return nullptr;
  if (g_view.base == nullptr && ensure_attached() != 0) return nullptr;
  return handle < g_size ? g_view.pointer(handle) : nullptr;
}

namespace {
// One control request from the C API: 0 or a negative code.
int call_daemon(proto::msg type, const std::vector<std::uint8_t>& body, std::vector<std::uint8_t>* out = nullptr) {
  runtime& r = rt();
  std::lock_guard lock(r.mu);
  if (int rc = attach_locked(r, nullptr); rc != 0) return rc;
  auto reply = request_locked(r, type, body);
  if (!reply) return fail(reply.code());
  if (out != nullptr) *out = std::move(reply.value());
  return 0;
}
}  // namespace

int shmalloc_publish(const char* name, uint64_t handle) {
  if (name == nullptr) return fail(errc::invalid_argument);
  return call_daemon(proto::msg::publish, proto::encode_publish(proto::root_msg{name, handle}));
}

int shmalloc_lookup(const char* name, uint64_t* handle) {
  if (name == nullptr || handle == nullptr) return fail(errc::invalid_argument);
  std::vector<std::uint8_t> body;
  if (int rc = call_daemon(proto::msg::lookup, proto::encode_name(name), &body); rc != 0) return rc;
  auto root = proto::decode_root(body);
  if (!root) return fail(errc::protocol_error);
  *handle = *root;
  return 0;
}

int shmalloc_unpublish(const char* name) {
  if (name == nullptr) return fail(errc::invalid_argument);
  return call_daemon(proto::msg::unpublish, proto::encode_name(name));
}

}  // extern "C"
