// c_api.cpp: the C API (shmalloc.h): the extern "C" functions and alloc,
// which picks the allocation path by size. shmalloc_alloc,
// shmalloc_alloc_noscan and shmalloc_free are the fast paths
// (mcache.hpp's alloc_small and alloc_tiny, free.hpp's free_object, forced
// inline here); everything they do not finish is a tail jump to a slow path.
#include <cerrno>
#include <mutex>
#include <utility>
#include <vector>

#include "client/free.hpp"
#include "client/runtime.hpp"
#include "shm/crash_point.hpp"
#include "shmalloc/shmalloc.h"

namespace shmalloc::client {

using namespace detail;

SHMALLOC_FAST_PATH void* alloc(std::size_t size, bool noscan) noexcept {
  if (SHMALLOC_UNLIKELY(size > max_small_size)) return alloc_large(size, noscan);  // size 0 is class 1
  if (noscan && size - 1 < tiny_size - 1) return alloc_tiny(size);  // 1..15 bytes; 0 wraps past
  const std::uint8_t c = size_to_class_fast(size);
  // The noscan 16-byte span class is the tiny allocator's: other 16-byte
  // objects take the scan class (no collector reads the difference).
  return alloc_small(c, noscan && c != tiny_size_class, size);
}

}  // namespace shmalloc::client

// ---------------------------------------------------------------------------
// The C API
// ---------------------------------------------------------------------------

using namespace shmalloc;
using namespace shmalloc::client;
using namespace shmalloc::client::detail;

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
  // Spans pooled and parked go back.
  for (std::uint32_t spc = 0; spc < num_span_classes; ++spc)
    for (std::int64_t id; (id = r.pool.pop(static_cast<std::uint8_t>(spc))) >= 0;) r.full.push_back(static_cast<std::uint32_t>(id));
  unpark_all_locked(r);
  release_full_locked(r);
  forget_thread_caches_locked(r);
  if (r.conn) r.conn->request(proto::msg::bye);  // the daemon retires every slot of ours
  r.conn.reset();
  drop_liveness(r);
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
  return c != 0 ? alloc_small(c, false, size) : client::alloc(max_small_size + 1, false);
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

namespace {
// The span of the allocated object that starts at h, or nullptr: h must be
// inside an in-use span, at an object's start, and the object allocated.
// Inside a tiny span any byte of an allocated block passes: objects within
// a block are not recorded.
const mspan* object_starting_at(handle_t h) noexcept {
  const span_id id = g_view.span_at(h);
  if (!id) return nullptr;
  const mspan& s = g_view.span(id);
  if (s.span_class == tiny_span_class) {
    const std::uint64_t block = (h - g_view.handle_of(g_view.span_base(s))) / tiny_size;
    return block >= tiny_metadata_blocks && block < s.nelems && is_allocated(s, static_cast<std::uint32_t>(block)) ? &s
                                                                                                            : nullptr;
  }
  object_ref at;
  return g_view.object_at(h, &at) == errc::ok && is_allocated(s, at.index) ? &s : nullptr;
}
}  // namespace

size_t shmalloc_usable_size(const void* p) {
  if (p == nullptr || g_view.base == nullptr) return 0;
  const mspan* s = object_starting_at(g_view.handle_of(p));
  if (s == nullptr) return 0;
  if (s->span_class == tiny_span_class)  // to the end of its block
    return tiny_size - static_cast<std::size_t>(static_cast<const std::byte*>(p) - g_view.span_base(*s)) % tiny_size;
  return object_bytes(*s);
}

uint64_t shmalloc_handle(const void* p) {
  if (p == nullptr || g_view.base == nullptr) return 0;
  const auto* b = static_cast<const std::byte*>(p);
  return b >= g_view.base && b < g_view.base + g_size ? g_view.handle_of(p) : 0;
}

void* shmalloc_pointer(uint64_t handle) {
  if (handle == 0) return nullptr;
  if (g_view.base == nullptr && ensure_attached() != 0) return nullptr;
  return handle < g_size && object_starting_at(handle) != nullptr ? g_view.pointer(handle) : nullptr;
}

namespace {
// One control request from the C API: 0 or a negative code.
int call_daemon(proto::msg type, const std::vector<std::uint8_t>& body, std::vector<std::uint8_t>* out = nullptr) {
  runtime& r = rt();
  std::lock_guard lock(r.mu);
  if (int rc = attach_locked(r, nullptr); rc != 0) return rc;
  SHMALLOC_CRASH_POINT("api.request");
  auto reply = request_locked(r, type, body);
  if (!reply) return fail(reply.code());
  SHMALLOC_CRASH_POINT("api.replied");
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
