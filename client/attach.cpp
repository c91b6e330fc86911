// attach.cpp: attaching to the daemon and staying attached. Owns the
// control connection (attach_locked, reconnect_locked, request_locked), this
// process's identity in hello (name, host, container), the heap view the
// fast paths read without a lock (g_view, g_size, g_committed: set here,
// cleared by shmalloc_detach), SHMALLOC_CACHE_DECAY_MS, and what a forked
// child gives up of its parent's.
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "client/runtime.hpp"
#include "shm/crash_point.hpp"

namespace shmalloc::client::detail {

// The heap view and the committed bound (runtime.hpp says what they are):
// set by attach_locked, cleared by shmalloc_detach.
constinit heap_view g_view{};
constinit std::uint64_t g_size = 0;
constinit std::atomic<std::uint64_t> g_committed{0};

namespace {

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
// The welcome, or the daemon's refusal (permission_denied for a uid it does
// not admit, say), or unavailable if it did not answer sensibly.
result<proto::welcome_msg> say_hello(control_client& conn, const runtime& r) {
  const proto::hello_msg m{layout_version, static_cast<std::uint32_t>(getpid()), process_name(), r.host, r.container};
  auto f = conn.call(proto::msg::hello, proto::encode(m));
  if (!f) return error{errc::unavailable, "the daemon did not answer hello"};
  auto parts = proto::split_reply(f->payload);
  if (!parts) return error{errc::unavailable, "malformed welcome"};
  if (f->status() != errc::ok) {
    std::fprintf(stderr, "shmalloc: the daemon refused this process: %s\n", parts->message.c_str());
    return error{f->status(), parts->message};
  }
  auto w = proto::decode_welcome(parts->body);
  if (!w) return error{errc::unavailable, "malformed welcome"};
  return *w;
}

// REQUIRES: r.mu held, r.seg mapped. Takes the liveness lock of a slot a
// hello gave us. Without it a restarted daemon would reclaim our spans
// after its grace period even while we allocate from them: say so.
void hold_liveness(runtime& r, std::uint32_t slot) {
  if (r.liveness_fd < 0) r.liveness_fd = r.seg->open_liveness();
  if (r.liveness_fd >= 0 && segment::liveness_lock(r.liveness_fd, slot)) return;
  std::fprintf(stderr, "shmalloc: cannot take the liveness lock of '%s' (%s): a restarted daemon may reclaim "
               "this process's spans if it stays silent past the grace period\n", r.seg->name().c_str(), std::strerror(errno));
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

}  // namespace

// Closing our descriptor drops every liveness lock taken through it.
void drop_liveness(runtime& r) noexcept {
  if (r.liveness_fd >= 0) close(r.liveness_fd);
  r.liveness_fd = -1;
}

// REQUIRES: r.mu held.
int attach_locked(runtime& r, const char* socket_path) {
  if (r.attached) return 0;
  if (r.client_id != 0) return reconnect_locked(r) ? 0 : fail(errc::unavailable);  // lost the daemon, not detached
  const std::string path = socket_path != nullptr ? socket_path : !r.socket.empty() ? r.socket : default_socket_path();
  auto conn = std::make_unique<control_client>(path);
  if (!conn->connected()) return fail(errc::unavailable);
  SHMALLOC_CRASH_POINT("attach.hello");
  read_identity(r);
  auto w = say_hello(*conn, r);
  if (!w) return fail(w.code());
  if (w->layout_version != layout_version || w->size_class_checksum != size_class_table_checksum())
    return fail(errc::layout_mismatch);
  if (!r.seg || r.seg->header().instance_id != w->instance_id) {
    drop_liveness(r);  // another heap's
    auto att = segment::attach(w->heap_name);
    if (!att) return fail(att.code());
    r.seg = std::move(att.value());
    if (!r.pool.reset(r.seg->header().max_spans)) {  // out of address space in this process
      r.seg.reset();
      return fail(errc::os_error);
    }
  }
  SHMALLOC_CRASH_POINT("attach.welcomed");
  r.conn = std::move(conn);
  r.socket = path;
  g_cache_decay_ns.store(read_cache_decay(), std::memory_order_relaxed);  // each attach (a forked child's too) reads it
  read_profile_rate();
  r.held.clear();
  std::fill(std::begin(r.class_spans), std::end(r.class_spans), 0u);
  r.lost_heap = false;
  r.client_id = w->client_id;
  r.reattach_token = w->reattach_token;
  r.main_slot = w->cache_slot;
  r.main_slot_free = true;
  r.spare_slots.clear();  // a detached or forked process's, retired with its connection
  r.parked_slot.store(w->cache_slot, std::memory_order_relaxed);
  SHMALLOC_CRASH_POINT("attach.liveness");
  hold_liveness(r, w->cache_slot);
  g_view = heap_view::of(*r.seg);
  g_size = r.seg->size();
  // A queue a process that had the slot before us left: none of its spans
  // are ours.
  if (w->cache_slot < g_view.max_caches) g_view.slots[w->cache_slot].parked_queue.store(0, std::memory_order_relaxed);
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

namespace {

// REQUIRES: r.mu held. Reattaches every span and large object this process
// holds, and with them (even if it holds none) its cache slots, under the
// old id and token. False if the daemon refused.
bool reattach_all(runtime& r, control_client& conn, std::uint32_t old_id) {
  const std::vector<std::uint32_t> all(r.held.begin(), r.held.end());
  std::size_t at = 0;
  do {
    const std::size_t n = std::min<std::size_t>(proto::max_release, all.size() - at);
    std::vector<std::uint32_t> part(all.begin() + static_cast<std::ptrdiff_t>(at),
                                    all.begin() + static_cast<std::ptrdiff_t>(at + n));
    SHMALLOC_CRASH_POINT("reconnect.reattach");
    auto got = conn.request(proto::msg::reattach, proto::encode(proto::reattach_msg{old_id, r.reattach_token, part}));
    if (!got) return false;
    at += n;
  } while (at < all.size());
  return true;
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
  SHMALLOC_CRASH_POINT("reconnect.hello");
  hold_liveness(r, w->cache_slot);
  if (!reattach_all(r, *conn, old_id)) {
    // Our old cache slots are no longer ours (another heap's daemon, or
    // reclaimed): threads still count into them until they end. Only
    // statistics; no memory is shared by mistake.
    std::fprintf(stderr, "shmalloc: the restarted daemon did not hand back this process's cache slots; "
                 "statistics of this process's threads may be counted under another client\n");
    r.spare_slots.clear();
  }
  SHMALLOC_CRASH_POINT("reconnect.reattached");
  r.conn = std::move(conn);
  r.client_id = w->client_id;
  r.reattach_token = w->reattach_token;
  // The old main slot, if a thread still uses it, is now one of the
  // connection's extra slots (passed by reattach): it goes to the spares
  // when that thread ends. The new hello's slot serves the next thread.
  r.main_slot = w->cache_slot;
  r.main_slot_free = true;
  repark_locked(r, w->cache_slot);
  r.attached = true;
  for (const std::uint64_t h : std::exchange(r.deferred_large_frees, {})) {
    SHMALLOC_CRASH_POINT("reconnect.deferred_free");
    // Its span before the free: the daemon clears the page map when it frees.
    const span_id span = g_view.span_of(g_view.pointer(h));
    auto done = r.conn->request(proto::msg::free_large, proto::encode(proto::free_large_msg{h}));
    if (done && span)
      r.held.erase(span.value);
    else
      std::fprintf(stderr, "shmalloc: a large object freed while the daemon was away: %s\n", done.err().message.c_str());
  }
  return true;
}

}  // namespace

// REQUIRES: r.mu held. One request; if the daemon does not answer, one
// reconnect and one retry. Bounded: each wait is control_client's timeout.
result<std::vector<std::uint8_t>> request_locked(runtime& r, proto::msg type, const std::vector<std::uint8_t>& body) {
  if (!r.attached && (r.socket.empty() || !reconnect_locked(r))) return error{errc::unavailable, "not attached"};
  auto reply = r.conn->request(type, body);
  if (reply || reply.code() != errc::unavailable) return reply;
  SHMALLOC_CRASH_POINT("request.retry");
  if (!reconnect_locked(r)) return reply;
  return r.conn->request(type, body);
}

int ensure_attached() {
  runtime& r = rt();
  std::lock_guard lock(r.mu);
  return attach_locked(r, nullptr);
}

namespace {

// The child of fork() owns nothing of its parent's: not its connection, its
// caches, its pool or its full list. The mapping stays, so inherited
// pointers remain valid; the child says hello anew on first use.
void after_fork_in_child() noexcept {
  runtime& r = rt();
  // Close the child's copy of the parent's socket (a copy held here would
  // keep the daemon from seeing the parent exit), and leak the object: no
  // allocator calls between fork and the child's own use.
  if (r.conn) r.conn.release()->close_inherited();
  drop_liveness(r);  // our copy: the parent's lock stays the parent's
  r.pool.clear();
  r.full.clear();
  r.held.clear();
  std::fill(std::begin(r.class_spans), std::end(r.class_spans), 0u);
  r.caches.clear();  // the parent's threads' (their memory is a copy no thread of ours uses)
  r.large_cache.clear();
  r.large_cache_count = 0;
  r.large_cache_bytes = 0;
  r.deferred_large_frees.clear();  // the parent frees them
  r.attached = false;
  r.client_id = 0;
  t_cache = &empty_cache;
}

}  // namespace

}  // namespace shmalloc::client::detail
