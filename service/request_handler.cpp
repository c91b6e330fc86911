#include "service/request_handler.hpp"

#include <sys/random.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <cstring>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "cache/census.hpp"
#include "cache/layout.hpp"
#include "shm/crash_point.hpp"
#include "shm/memstats.hpp"
#include "shm/profile.hpp"
#include "shm/segment.hpp"

namespace shmalloc::service {

using proto::msg;

namespace {
reply error_reply(msg type, const proto::frame_header& h, errc code, const std::string& why, bool close = false) {
  return {proto::make_reply(type, h.request_id, code, why), close};
}
reply ok_reply(msg type, const proto::frame_header& h, const std::vector<std::uint8_t>& body = {}) {
  return {proto::make_reply(type, h.request_id, errc::ok, {}, body), false};
}
// Reports that change nothing, so observers such as shmallocctl need not register.
bool read_only(msg type) {
  return type == msg::stats || type == msg::classes || type == msg::clients || type == msg::pages ||
         type == msg::caches || type == msg::advise || type == msg::leaks || type == msg::leak_sites;
}
reply no_body_error(msg type, const proto::frame_header& h, const char* request) {
  return error_reply(type, h, errc::protocol_error, std::string(request) + " takes no body");
}
std::uint64_t unix_now_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}
}  // namespace

std::string describe(const client_state& c) {
  std::string name = c.name;
  for (char& ch : name)
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
  std::string out = "client " + std::to_string(c.id) + " \"" + name + "\" (pid ";
  out += c.pid != 0 ? std::to_string(c.pid) : std::string("unknown here: another PID namespace");
  if (c.pid_in_client != 0 && c.pid_in_client != static_cast<std::uint32_t>(c.pid))
    out += ", pid " + std::to_string(c.pid_in_client) + " in its own";
  if (!c.host.empty()) out += ", host " + c.host;
  if (!c.container.empty()) out += ", container " + c.container;
  return out + ")";
}

reply request_handler::handle(client_state& c, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  ++requests_;
  if (std::string why = proto::check_header(h); !why.empty())
    return error_reply(msg::ok, h, errc::protocol_error, why, true);
  const auto type = static_cast<msg>(h.type);
  if (c.id == 0 && type != msg::hello && !read_only(type))
    return error_reply(msg::ok, h, errc::protocol_error, "the first request must be hello");
  switch (type) {
    case msg::hello: return on_hello(c, h, p);
    case msg::refill: return on_refill(c, h, p);
    case msg::release: return on_release(c, h, p);
    case msg::alloc_large: return on_alloc_large(c, h, p);
    case msg::free_large: return on_free_large(c, h, p);
    case msg::stats: return on_stats(c, h, p);
    case msg::classes: return on_classes(c, h, p);
    case msg::clients: return on_clients(c, h, p);
    case msg::pages: return on_pages(c, h, p);
    case msg::caches: return on_caches(c, h, p);
    case msg::advise: return on_advise(c, h, p);
    case msg::leaks: return on_leaks(c, h, p);
    case msg::leak_sites: return on_leak_sites(c, h, p);
    case msg::reattach: return on_reattach(c, h, p);
    case msg::cache_open: return on_cache_open(c, h, p);
    case msg::cache_close: return on_cache_close(c, h, p);
    case msg::publish: return on_publish(c, h, p);
    case msg::lookup: return on_lookup(c, h, p);
    case msg::unpublish: return on_unpublish(c, h, p);
    case msg::bye: return {proto::make_reply(msg::ok, h.request_id, errc::ok, {}), true};
    default: return error_reply(msg::ok, h, errc::protocol_error, "unknown request type " + std::to_string(h.type));
  }
}

namespace {
// A reattach token: 64 random bits from the kernel. Only the connection
// that said hello learns it; the heap keeps its hash.
std::uint64_t new_reattach_token() {
  std::uint64_t t = 0;
  while (t == 0)
    if (getrandom(&t, sizeof t, 0) != static_cast<ssize_t>(sizeof t)) t = 0;
  return t;
}
}  // namespace

// Not a cryptographic hash: a peer that maps the heap can write any of it
// anyway. The hash keeps the token itself out of the heap, so that the
// protocol alone cannot be used to claim another client's spans.
std::uint64_t request_handler::reattach_check_of(std::uint64_t token) const noexcept {
  const std::uint64_t h = XXH3_64bits_withSeed(&token, sizeof token, heap_->seg().header().instance_id);
  return h == 0 ? 1 : h;  // 0 marks a slot with no check
}

// A cache slot now the client's: labelled with its id and its check.
void request_handler::label_slot(const client_state& c, std::uint32_t slot) noexcept {
  mcache_slot& s = heap_->cache_slot(slot);
  s.client.store(c.id, std::memory_order_relaxed);
  s.reattach_check = c.reattach_check;
}

reply request_handler::on_hello(client_state& c, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  if (c.id != 0) return error_reply(msg::welcome, h, errc::protocol_error, "hello was already said");
  auto m = proto::decode_hello(p);
  if (!m) return error_reply(msg::welcome, h, errc::protocol_error, "malformed hello");
  if (m->layout_version != layout_version)
    return error_reply(msg::welcome, h, errc::layout_mismatch,
                       "client speaks heap layout version " + std::to_string(m->layout_version) + ", daemon " +
                           std::to_string(layout_version));
  std::uint32_t& next_id = heap_->state().next_client_id;
  if (next_id == 0 || next_id == mheap::daemon_client) next_id = 1;
  auto slot = heap_->assign_cache(next_id);
  if (!slot) return error_reply(msg::welcome, h, slot.code(), slot.err().message);
  c.id = next_id++;
  c.name = m->name;
  c.pid_in_client = m->pid;
  c.host = m->host;
  c.container = m->container;
  c.cache_slot = *slot;
  const std::uint64_t token = new_reattach_token();
  c.reattach_check = reattach_check_of(token);
  label_slot(c, c.cache_slot);
  c.connected_ns = heap_->now();
  by_id_[c.id] = &c;
  ++clients_;
  const segment_header& sh = heap_->seg().header();
  proto::welcome_msg w{c.id, c.cache_slot, sh.instance_id, sh.layout_version, sh.page_size,
                       sh.size_class_checksum, sh.capacity, heap_->seg().name(), token};
  return ok_reply(msg::welcome, h, proto::encode(w));
}

std::uint64_t request_handler::span_bytes(std::uint32_t span) const noexcept {
  return std::uint64_t{heap_->span(span_id{span}).npages} * page_size;
}

bool request_handler::over_quota(const client_state& c, std::uint64_t more) const noexcept {
  return settings_.quota_bytes != 0 && c.bytes_held + more > settings_.quota_bytes;
}

reply request_handler::on_refill(client_state& c, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  auto m = proto::decode_refill(p);
  if (!m) return error_reply(msg::spans, h, errc::protocol_error, "malformed refill (span class 2..135, 1..64 spans)");
  const span_class spc{m->span_class};
  const std::uint64_t bytes = class_span_bytes(spc.size_class());
  proto::span_list_msg out;
  error failure;
  for (std::uint16_t i = 0; i < m->count; ++i) {
    if (over_quota(c, bytes)) {
      failure = {errc::quota_exceeded, "client quota of " + std::to_string(settings_.quota_bytes) + " bytes reached"};
      break;
    }
    SHMALLOC_CRASH_POINT("handler.refill");
    auto id = heap_->central(spc).cache_span(c.id);
    if (!id) {
      failure = id.err();
      break;
    }
    SHMALLOC_CRASH_POINT("handler.refilled");
    c.spans.insert(id->value);
    c.bytes_held += bytes;
    out.span_ids.push_back(id->value);
  }
  // Partial success still hands over what was carved: the client must not
  // lose spans the daemon now records as its own.
  if (out.span_ids.empty()) return error_reply(msg::spans, h, failure.code, failure.message);
  reply r = ok_reply(msg::spans, h, proto::encode(out));
  r.shortfall = failure.code;
  return r;
}

reply request_handler::on_release(client_state& c, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  auto m = proto::decode_span_list(p, proto::max_release);
  if (!m) return error_reply(msg::ok, h, errc::protocol_error, "malformed release");
  // Checked whole before anything is released. A span named twice would
  // pass the ownership check twice and come off the client's bytes twice.
  std::set<std::uint32_t> named;
  for (std::uint32_t id : m->span_ids) {
    if (c.spans.count(id) == 0)
      return error_reply(msg::ok, h, errc::bad_handle,
                         "span " + std::to_string(id) + " is not held by this client (double release?)");
    if (!named.insert(id).second)
      return error_reply(msg::ok, h, errc::bad_handle, "span " + std::to_string(id) + " is named twice in one release");
  }
  // Each span is now a cached span of this client's, so uncache_span takes
  // it; what settling it may find wrong (a remote double free folded in) is
  // counted in remote_free_errors and is no fault of this request: the
  // client hears ok, and forgets the spans.
  for (std::uint32_t id : m->span_ids) {
    const mspan& s = heap_->span(span_id{id});
    c.bytes_held -= span_bytes(id);
    c.spans.erase(id);
    SHMALLOC_CRASH_POINT("handler.release");
    (void)heap_->central(span_class{s.span_class}).uncache_span(span_id{id});
  }
  return ok_reply(msg::ok, h);
}

reply request_handler::on_alloc_large(client_state& c, const proto::frame_header& h,
                                      std::span<const std::uint8_t> p) {
  auto m = proto::decode_alloc_large(p);
  if (!m) return error_reply(msg::large, h, errc::protocol_error, "malformed alloc_large");
  const std::uint64_t bytes = (m->bytes + page_size - 1) / page_size * page_size;
  if (m->bytes > heap_->seg().header().capacity || over_quota(c, bytes))
    return error_reply(msg::large, h, m->bytes > heap_->seg().header().capacity ? errc::no_memory : errc::quota_exceeded,
                       "a large object of " + std::to_string(m->bytes) + " bytes does not fit the " +
                           (m->bytes > heap_->seg().header().capacity ? "heap" : "client quota"));
  SHMALLOC_CRASH_POINT("handler.alloc_large");
  auto id = heap_->alloc_large(m->bytes, m->noscan, c.id);
  if (!id) return error_reply(msg::large, h, id.code(), id.err().message);
  SHMALLOC_CRASH_POINT("handler.large_recorded");
  // Free in the heap's eyes until the client hands it out (client/large.cpp
  // sets the bit): a client that dies waiting for this reply leaves a span
  // its reclaim frees, not one kept as another process's object.
  heap_->span(*id).alloc_bits[0] = 0;
  c.large.insert(id->value);
  c.bytes_held += bytes;
  const handle_t handle = heap_->view().handle_of(heap_->view().span_base(heap_->span(*id)));
  return ok_reply(msg::large, h, proto::encode(proto::large_msg{id->value, handle}));
}

reply request_handler::on_free_large(client_state& c, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  auto m = proto::decode_free_large(p);
  if (!m) return error_reply(msg::ok, h, errc::protocol_error, "malformed free_large");
  object_ref ref;
  if (m->handle >= heap_->seg().size() || heap_->view().object_at(m->handle, &ref) != errc::ok ||
      heap_->span(ref.span).state.load(std::memory_order_relaxed) != mspan_state::large)
    return error_reply(msg::ok, h, errc::bad_handle, "handle " + std::to_string(m->handle) + " is not a large object");
  // Any process may free any object: the bytes come off the holder's quota.
  mspan& s = heap_->span(ref.span);
  if (auto it = by_id_.find(s.owner_client); it != by_id_.end()) {
    it->second->large.erase(ref.span.value);
    it->second->bytes_held -= span_bytes(ref.span.value);
  } else if (auto o = orphans_.find(s.owner_client); o != orphans_.end()) {
    // Held by a client of the previous daemon: its group must forget the
    // span, whose descriptor the next allocation may reuse for someone else.
    o->second.large.erase(ref.span.value);
    if (o->second.spans.empty() && o->second.large.empty() && o->second.slots.empty()) orphans_.erase(o);
  }
  SHMALLOC_CRASH_POINT("handler.free_large");
  heap_->free_span(ref.span);
  return ok_reply(msg::ok, h);
}

reply request_handler::on_cache_open(client_state& c, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  if (!p.empty()) return error_reply(msg::cache_slot, h, errc::protocol_error, "cache_open takes no body");
  const std::size_t held = 1 + c.extra_slots.size();  // the connection's own slot and the threads'
  if (settings_.max_caches_per_client != 0 && held >= settings_.max_caches_per_client)
    return error_reply(msg::cache_slot, h, errc::quota_exceeded,
                       "client holds " + std::to_string(held) + " cache slots, the most one client may (max-caches-per-client)");
  auto slot = heap_->assign_cache(c.id);
  if (!slot) return error_reply(msg::cache_slot, h, slot.code(), slot.err().message);
  label_slot(c, *slot);
  c.extra_slots.push_back(*slot);
  return ok_reply(msg::cache_slot, h, proto::encode(proto::slot_msg{*slot}));
}

reply request_handler::on_cache_close(client_state& c, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  auto m = proto::decode_slot(p);
  if (!m) return error_reply(msg::ok, h, errc::protocol_error, "malformed cache_close");
  auto it = std::find(c.extra_slots.begin(), c.extra_slots.end(), m->slot);
  if (it == c.extra_slots.end())
    return error_reply(msg::ok, h, errc::bad_handle, "cache slot " + std::to_string(m->slot) + " is not this client's");
  heap_->retire_cache(m->slot);
  c.extra_slots.erase(it);
  return ok_reply(msg::ok, h);
}

root_entry* request_handler::find_root(const std::string& name) const noexcept {
  auto* roots = heap_->seg().at<root_entry>(heap_->seg().regions().roots.offset);
  for (std::uint32_t i = 0; i < max_roots; ++i)
    if (roots[i].handle != 0 && name == roots[i].name) return &roots[i];
  return nullptr;
}

reply request_handler::on_publish(client_state&, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  auto m = proto::decode_publish(p);
  if (!m) return error_reply(msg::ok, h, errc::invalid_argument, "malformed publish (a name of 1 to 63 printable characters and a handle)");
  object_ref ref;
  if (m->handle >= heap_->seg().size() || heap_->view().object_at(m->handle, &ref) != errc::ok ||
      !is_allocated(heap_->span(ref.span), ref.index))
    return error_reply(msg::ok, h, errc::bad_handle, "handle " + std::to_string(m->handle) + " is not an allocated object");
  if (find_root(m->name) != nullptr) return error_reply(msg::ok, h, errc::exists, "root '" + m->name + "' already exists");
  auto* roots = heap_->seg().at<root_entry>(heap_->seg().regions().roots.offset);
  for (std::uint32_t i = 0; i < max_roots; ++i) {
    if (roots[i].handle != 0) continue;
    std::memset(roots[i].name, 0, sizeof roots[i].name);
    std::memcpy(roots[i].name, m->name.data(), m->name.size());
    roots[i].handle = m->handle;
    return ok_reply(msg::ok, h);
  }
  return error_reply(msg::ok, h, errc::no_memory, "all " + std::to_string(max_roots) + " named roots are in use");
}

reply request_handler::on_lookup(client_state&, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  auto name = proto::decode_name(p);
  if (!name) return error_reply(msg::root, h, errc::invalid_argument, "malformed root name");
  const root_entry* r = find_root(*name);
  if (r == nullptr) return error_reply(msg::root, h, errc::not_found, "no root named '" + *name + "'");
  return ok_reply(msg::root, h, proto::encode_root(r->handle));
}

reply request_handler::on_unpublish(client_state&, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  auto name = proto::decode_name(p);
  if (!name) return error_reply(msg::ok, h, errc::invalid_argument, "malformed root name");
  root_entry* r = find_root(*name);
  if (r == nullptr) return error_reply(msg::ok, h, errc::not_found, "no root named '" + *name + "'");
  r->handle = 0;
  return ok_reply(msg::ok, h);
}

reply request_handler::on_stats(client_state&, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  if (!p.empty()) return no_body_error(msg::stats_reply, h, "stats");
  return ok_reply(msg::stats_reply, h, proto::encode(stats()));
}

reply request_handler::on_classes(client_state&, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  if (!p.empty()) return no_body_error(msg::class_table, h, "classes");
  return ok_reply(msg::class_table, h, proto::encode(class_table()));
}

reply request_handler::on_clients(client_state&, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  const auto format = proto::decode_clients_request(p);
  if (!format)
    return error_reply(msg::client_table, h, errc::protocol_error,
                       "malformed clients (an empty body, or u8 row format 0 or 1)");
  return ok_reply(msg::client_table, h, proto::encode(client_table(*format)));
}

reply request_handler::on_pages(client_state&, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  if (!p.empty()) return no_body_error(msg::page_table, h, "pages");
  return ok_reply(msg::page_table, h, proto::encode(page_table()));
}

reply request_handler::on_caches(client_state&, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  if (!p.empty()) return no_body_error(msg::cache_table, h, "caches");
  return ok_reply(msg::cache_table, h, proto::encode(cache_table()));
}

reply request_handler::on_advise(client_state&, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  if (!p.empty()) return no_body_error(msg::advise_table, h, "advise");
  return ok_reply(msg::advise_table, h, proto::encode(advise_table()));
}

reply request_handler::on_leaks(client_state&, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  const auto window = proto::decode_leaks_request(p);
  if (!window)
    return error_reply(msg::leak_table, h, errc::protocol_error, "malformed leaks (an empty body, or u32 window 1..600 s)");
  return ok_reply(msg::leak_table, h, proto::encode(leak_table(*window)));
}

reply request_handler::on_leak_sites(client_state&, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  const auto older_than = proto::decode_leak_sites_request(p);
  if (!older_than) return error_reply(msg::site_table, h, errc::protocol_error, "malformed leak_sites (u64 older_than_ns)");
  return ok_reply(msg::site_table, h, proto::encode(site_table(*older_than)));
}

proto::stats_msg request_handler::stats() const {
  const heap_census census = read_census(*heap_);
  const heap_memstats& m = census.mem;
  proto::stats_msg s;
  s.heap_sys_bytes = m.heap_sys_bytes;
  s.heap_inuse_bytes = m.heap_inuse_bytes;
  s.heap_idle_bytes = m.heap_idle_bytes;
  s.heap_released_bytes = m.heap_released_bytes;
  s.heap_alloc_bytes = census.heap_alloc_bytes();
  s.heap_unused_bytes = census.heap_unused_bytes();
  s.heap_objects = census.heap_objects();
  s.mallocs_total = census.mallocs_total();
  s.frees_total = census.frees_total();
  s.large_objects = m.large_objects;
  s.large_bytes = m.large_bytes;
  s.mspan_inuse_bytes = m.mspan_inuse_bytes;
  s.mspan_sys_bytes = m.mspan_sys_bytes;
  s.metadata_sys_bytes = m.metadata_sys_bytes;
  s.clients = clients_;
  s.reclaimed_bytes_total = m.reclaimed_bytes_total;
  s.scavenged_bytes_total = m.scavenged_bytes_total;
  s.grow_failures = m.grow_failures;
  s.capacity_bytes = m.capacity_bytes;
  s.control_requests_total = requests_;
  s.metrics_port = metrics_port_;
  return s;
}

proto::class_table_msg request_handler::class_table() const {
  const heap_census census = read_census(*heap_);
  proto::class_table_msg t;
  for (std::size_t s = 1; s < num_size_classes; ++s) {
    const class_census& k = census.classes[s];
    const auto cls = static_cast<std::uint8_t>(s);
    t.rows.push_back({cls, static_cast<std::uint32_t>(class_to_size(cls)), k.spans_partial, k.spans_full,
                      k.spans_cached, k.live_objects(), census.class_inuse_bytes(s),
                      census.class_unused_bytes(s), k.mallocs, k.frees});
  }
  return t;
}

proto::advise_table_msg request_handler::advise_table() const {
  static_assert(proto::advise_buckets == request_buckets);
  const heap_census census = read_census(*heap_);
  proto::advise_table_msg t;
  t.heap_inuse_bytes = census.mem.heap_inuse_bytes;
  auto add = [&t](const request_stats& r) {
    for (std::size_t s = 1; s < num_size_classes; ++s) {
      proto::advise_row& row = t.rows[s - 1];
      for (std::uint32_t k = 0; k < request_buckets; ++k) row.buckets[k] += r.hist[s][k].load(std::memory_order_relaxed);
      row.requested_bytes += r.bytes[s].load(std::memory_order_relaxed);
    }
  };
  t.rows.resize(num_size_classes - 1);
  add(heap_->state().retired_requests);
  const auto slots = heap_->accounts().caches_committed.load(std::memory_order_relaxed);
  for (std::uint64_t i = 0; i < slots; ++i) add(heap_->cache_slot(static_cast<std::uint32_t>(i)).requests);
  for (std::size_t s = 1; s < num_size_classes; ++s) {
    proto::advise_row& row = t.rows[s - 1];
    row.size_class = static_cast<std::uint8_t>(s);
    row.object_size = class_to_size(row.size_class);
    row.objects_live = census.classes[s].live_objects();
    row.bytes_in_use = census.class_inuse_bytes(s);
    // Read while clients write: a bucket bumped after its bytes were read
    // would break the decoder's check, so clamp as the census clamps.
    row.requested_bytes = std::min(row.requested_bytes, row.samples() * row.object_size);
  }
  return t;
}

void request_handler::sample_held(std::uint64_t now, bool force) {
  constexpr std::uint64_t every_ns = 1'000'000'000;
  constexpr std::uint64_t keep_ns = std::uint64_t{proto::max_leak_window_s} * every_ns;
  constexpr std::size_t max_samples = proto::max_leak_window_s + 16;
  if (!force && now - last_held_sample_ns_ < every_ns) return;
  last_held_sample_ns_ = now;
  for (auto& [id, c] : by_id_) {
    auto& hist = c->live_history;
    if (!hist.empty() && hist.back().ns == now) continue;
    hist.push_back({now, live_bytes(*c, nullptr)});
    // Keep one sample at least keep_ns old (the longest window's start).
    std::size_t drop = 0;
    while (drop + 1 < hist.size() && now - hist[drop + 1].ns >= keep_ns) ++drop;
    if (hist.size() - drop > max_samples) drop = hist.size() - max_samples;
    hist.erase(hist.begin(), hist.begin() + static_cast<std::ptrdiff_t>(drop));
  }
}

// Objects the client's threads allocated and have not freed, per size
// class, from its cache slots' counters: a free counts in the freeing
// thread's slot, so objects another process frees stay charged here (a
// class's count is clamped at 0 for the process that frees them).
std::uint64_t request_handler::live_bytes(const client_state& c, std::uint64_t* per_class) const noexcept {
  std::int64_t net[num_size_classes] = {};
  auto add = [&](std::uint32_t slot) {
    const stats_block& b = heap_->cache_slot(slot).stats;
    for (std::size_t k = 1; k < num_size_classes; ++k)
      net[k] += static_cast<std::int64_t>(b.small_allocs[k].load(std::memory_order_relaxed) -
                                          b.small_frees[k].load(std::memory_order_relaxed));
  };
  add(c.cache_slot);
  for (std::uint32_t slot : c.extra_slots) add(slot);
  std::uint64_t bytes = 0;
  for (std::uint32_t id : c.large) bytes += span_bytes(id);
  for (std::size_t k = 1; k < num_size_classes; ++k) {
    const std::uint64_t n = net[k] > 0 ? static_cast<std::uint64_t>(net[k]) : 0;
    if (per_class != nullptr) per_class[k] = n;
    bytes += n * class_to_size(static_cast<std::uint8_t>(k));
  }
  return bytes;
}

proto::leak_row request_handler::leak_row_of(const client_state& c, std::uint64_t now, std::uint64_t window_ns) const {
  proto::leak_row row;
  row.id = c.id;
  row.pid = static_cast<std::uint32_t>(c.pid);
  row.name = c.name;
  row.bytes_held = c.bytes_held;
  std::uint64_t per_class[num_size_classes] = {};
  row.live_bytes = live_bytes(c, per_class);
  // The newest sample at least a window old, else the oldest there is.
  const client_state::live_sample* then = c.live_history.empty() ? nullptr : &c.live_history.front();
  for (const auto& h : c.live_history)
    if (now - h.ns >= window_ns) then = &h;
  row.live_bytes_then = then != nullptr ? then->bytes : row.live_bytes;
  row.then_ago_ns = then != nullptr ? now - then->ns : 0;
  row.large_objects = static_cast<std::uint32_t>(c.large.size());
  for (std::uint32_t id : c.large) row.large_bytes += span_bytes(id);
  for (std::size_t k = 1; k < num_size_classes; ++k)
    if (per_class[k] != 0) row.classes.push_back({static_cast<std::uint8_t>(k), per_class[k]});
  return row;
}

proto::leak_table_msg request_handler::leak_table(std::uint32_t window_s) {
  const std::uint64_t now = heap_->now();
  sample_held(now, true);
  proto::leak_table_msg t;
  t.window_ns = std::uint64_t{window_s} * 1'000'000'000;
  t.total = static_cast<std::uint32_t>(by_id_.size());
  std::vector<proto::leak_row> rows;
  for (const auto& [id, c] : by_id_) rows.push_back(leak_row_of(*c, now, t.window_ns));
  std::stable_sort(rows.begin(), rows.end(), [](const proto::leak_row& a, const proto::leak_row& b) {
    return a.growth() != b.growth() ? a.growth() > b.growth() : a.live_bytes > b.live_bytes;
  });
  std::size_t room = proto::max_reply_body - proto::leak_table_header_bytes;
  for (proto::leak_row& row : rows) {
    const std::size_t size = proto::encoded_size(row);
    if (size > room) break;  // the rest are counted in total only
    room -= size;
    t.rows.push_back(std::move(row));
  }
  return t;
}

namespace {
// What one sample of `size` bytes at `rate` stands for: Go's pprof scaling,
// on the bytes an unsampled object of that size takes in the heap (its size
// class's, or whole pages): 1 / (1 - e^(-bytes/rate)) objects like it.
std::uint64_t estimated_bytes(std::uint64_t size, std::uint32_t rate) {
  const auto held = static_cast<double>(size > max_small_size ? (size + page_size - 1) / page_size * page_size
                                                              : class_to_size(size_to_class(size)));
  const double p = rate == 0 ? 1.0 : 1.0 - std::exp(-held / rate);
  return static_cast<std::uint64_t>(held / std::max(p, 1e-9));
}
}  // namespace

// The sampled objects still live, by holder and call stack. Ages are on
// CLOCK_MONOTONIC, the clock the clients stamped them with (not mheap's,
// which tests may drive).
proto::site_table_msg request_handler::site_table(std::uint64_t older_than_ns) const {
  static_assert(proto::max_site_frames == profile_frames);
  const auto now = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  const heap_view& v = heap_->view();
  proto::site_table_msg t;
  t.capacity = max_profile_samples;
  std::map<std::pair<std::uint32_t, std::vector<std::uint64_t>>, proto::site_row> by_site;
  for (std::uint32_t i = 0; i < max_profile_samples; ++i) {
    profile_record r;
    if (!profile_read(v, i, &r)) continue;
    ++t.live;
    const std::uint64_t age = now > r.alloc_ns ? now - r.alloc_ns : 0;
    if (age < older_than_ns) continue;
    const std::uint32_t owner = v.span(r.span).owner_client;
    std::vector<std::uint64_t> pc(r.pc, r.pc + r.frames);
    proto::site_row& row = by_site[{owner, pc}];
    if (row.samples == 0) {
      row.client = owner;  // 0: no holder (a large object its ended client left live)
      auto it = by_id_.find(owner);
      row.pid = it != by_id_.end() ? static_cast<std::uint32_t>(it->second->pid) : 0;
      row.pc = pc;
      row.vma.assign(r.vma, r.vma + r.frames);
      row.oldest_ns = age;
      row.newest_ns = age;
    }
    ++row.samples;
    row.bytes += r.size;
    const std::uint64_t estimate = estimated_bytes(r.size, r.rate);
    row.estimated_bytes += estimate;
    for (std::size_t k = 0; k < std::size(proto::site_age_bounds_s); ++k)
      if (age >= proto::site_age_bounds_s[k] * 1'000'000'000) row.aged_bytes[k] += estimate;
    row.oldest_ns = std::max(row.oldest_ns, age);
    row.newest_ns = std::min(row.newest_ns, age);
  }
  std::vector<proto::site_row> rows;
  for (auto& [key, row] : by_site) rows.push_back(std::move(row));
  std::stable_sort(rows.begin(), rows.end(), [](const proto::site_row& a, const proto::site_row& b) {
    return a.estimated_bytes > b.estimated_bytes;
  });
  if (rows.size() > proto::max_site_rows) rows.resize(proto::max_site_rows);
  t.rows = std::move(rows);
  return t;
}

std::vector<proto::leak_row> request_handler::top_live_clients(std::size_t k) const {
  const std::uint64_t now = heap_->now();
  std::vector<proto::leak_row> rows;
  for (const auto& [id, c] : by_id_) rows.push_back(leak_row_of(*c, now, 0));
  std::stable_sort(rows.begin(), rows.end(),
                   [](const proto::leak_row& a, const proto::leak_row& b) { return a.live_bytes > b.live_bytes; });
  if (rows.size() > k) rows.resize(k);
  return rows;
}

std::uint64_t request_handler::objects_held(const client_state& c) const noexcept {
  std::uint64_t n = c.large.size();
  for (std::uint32_t id : c.spans) {
    const mspan& s = heap_->span(span_id{id});
    const std::uint32_t bits = count_allocated(s), metadata = reserved_slots(s.span_class);
    n += bits > metadata ? bits - metadata : 0;
  }
  return n;
}

// connected_ns is on mheap's monotonic clock: the age it gives, taken from
// the wall clock now, is the Unix time of the hello.
proto::client_row request_handler::row_of(const client_state& c, std::uint64_t now_ns,
                                          std::uint64_t unix_now_ns) const {
  const std::uint64_t age = now_ns > c.connected_ns ? now_ns - c.connected_ns : 0;
  proto::client_row row;
  row.id = c.id;
  row.pid = static_cast<std::uint32_t>(c.pid);
  row.name = c.name;
  row.bytes_held = c.bytes_held;
  row.objects_live = objects_held(c);
  row.spans = static_cast<std::uint32_t>(c.spans.size());
  row.large_objects = static_cast<std::uint32_t>(c.large.size());
  row.connected_unix_ns = unix_now_ns > age ? unix_now_ns - age : 0;
  row.pid_in_client = c.pid_in_client;
  row.host = c.host;
  row.container = c.container;
  return row;
}

proto::client_table_msg request_handler::client_table(proto::client_rows format) const {
  proto::client_table_msg t;
  t.format = format;
  t.total = static_cast<std::uint32_t>(by_id_.size());
  const std::uint64_t now = heap_->now(), unix_now = unix_now_ns();
  std::size_t room = proto::max_reply_body - proto::client_table_header_bytes;
  for (const auto& [id, c] : by_id_) {
    proto::client_row row = row_of(*c, now, unix_now);
    const std::size_t size = proto::encoded_size(row, format);
    if (size > room) break;  // the rest are counted in total only
    room -= size;
    t.rows.push_back(std::move(row));
  }
  return t;
}

proto::page_table_msg request_handler::page_table() const {
  const page_census p = read_page_census(*heap_);
  proto::page_table_msg t;
#define SHMALLOC_X(name) t.name = p.name;
  SHMALLOC_PROTO_PAGES(SHMALLOC_X)
#undef SHMALLOC_X
  return t;
}

static_assert(proto::max_cache_name == cache_max_name);

// By name, so that a table cut at the frame limit always keeps the same
// caches. The daemon writes root names, unique and at most 63 characters;
// the segment is shared with processes it does not trust, so a name no
// cache can have, or a repeat, is left out rather than sent.
proto::cache_table_msg request_handler::cache_table() const {
  std::vector<cache_census> caches = read_caches(heap_->seg());
  std::erase_if(caches, [](const cache_census& k) { return k.name.empty() || k.name.size() > proto::max_cache_name; });
  std::sort(caches.begin(), caches.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  caches.erase(std::unique(caches.begin(), caches.end(), [](const auto& a, const auto& b) { return a.name == b.name; }),
               caches.end());
  proto::cache_table_msg t;
  t.total = static_cast<std::uint32_t>(caches.size());
  std::size_t room = proto::max_reply_body - proto::cache_table_header_bytes;
  for (const cache_census& k : caches) {
    proto::cache_row row;
    row.name = k.name;
#define SHMALLOC_X(name) row.name = k.name;
    SHMALLOC_PROTO_CACHE(SHMALLOC_X)
#undef SHMALLOC_X
    if (proto::encoded_size(row) > room) break;  // the rest are counted in total only
    room -= proto::encoded_size(row);
    t.rows.push_back(std::move(row));
  }
  return t;
}

bool request_handler::holds(std::uint32_t owner, std::uint32_t id, mspan_state state) const noexcept {
  const mspan& s = heap_->span(span_id{id});
  return s.owner_client == owner && s.state.load(std::memory_order_relaxed) == state;
}

// A dead thread's current tiny block (mcache_slot::tiny_block), retired as
// the thread would have: its count loses the bias and gains the objects the
// thread handed out from it; if that empties it, it is freed like a remote
// free (folded when its span is uncached). Cleared here, so every slot is
// retired with no block (a thread that ends retires its own). What the slot
// says is the dead client's to have written: anything that is not a tiny
// block in use, or a count no thread can reach, leaves the block alone.
void request_handler::retire_dead_tiny(std::uint32_t slot) {
  mcache_slot& cs = heap_->cache_slot(slot);
  const handle_t h = std::exchange(cs.tiny_block, 0);
  const heap_view& v = heap_->view();
  const span_id id = h == 0 ? span_id::nil() : v.span_at(h);
  if (!id) return;
  mspan& s = v.span(id);
  const std::uint64_t offset = h - v.handle_of(v.span_base(s));
  const std::uint64_t block = offset / tiny_size;
  if (s.span_class != tiny_span_class || offset % tiny_size != 0 || block < tiny_metadata_blocks ||
      block >= s.nelems || !is_allocated(s, static_cast<std::uint32_t>(block)))
    return;
  const std::uint64_t handed_out = cs.stats.tiny_allocs.load(std::memory_order_relaxed) - cs.tiny_allocs_at_block;
  if (handed_out > tiny_size) return;
  const auto b = static_cast<std::uint32_t>(block);
  SHMALLOC_CRASH_POINT("handler.retire_tiny");
  if (tiny_retire(v, s, b, static_cast<std::uint32_t>(handed_out))) span_push_remote(v, s, b);
}

void request_handler::reclaim(std::uint32_t owner, const std::set<std::uint32_t>& spans,
                              const std::set<std::uint32_t>& large, const std::vector<std::uint32_t>& slots) {
  std::uint64_t reclaimed = 0;
  for (std::uint32_t slot : slots) retire_dead_tiny(slot);  // before its span goes back: the fold takes the block
  SHMALLOC_CRASH_POINT("handler.reclaim");
  for (std::uint32_t id : spans) {
    if (!holds(owner, id, mspan_state::cached)) continue;
    reclaimed += span_bytes(id);
    SHMALLOC_CRASH_POINT("handler.reclaim_span");
    heap_->central(span_class{heap_->span(span_id{id}).span_class}).uncache_span(span_id{id});
  }
  for (std::uint32_t id : large) {
    if (!holds(owner, id, mspan_state::large)) continue;
    if (is_allocated(heap_->span(span_id{id}), 0)) {
      heap_->span(span_id{id}).owner_client = 0;  // stays allocated: another process may use it
    } else {  // freed, and kept in the dead process's cache of large objects
      reclaimed += span_bytes(id);
      heap_->free_span(span_id{id});
    }
  }
  SHMALLOC_CRASH_POINT("handler.reclaim_slots");
  for (std::uint32_t slot : slots) heap_->retire_cache(slot);
  bump(heap_->accounts().reclaimed_bytes_total, reclaimed);
}

void request_handler::disconnect(client_state& c) {
  if (c.id == 0) return;
  std::vector<std::uint32_t> slots = c.extra_slots;
  slots.push_back(c.cache_slot);
  reclaim(c.id, c.spans, c.large, slots);
  by_id_.erase(c.id);
  --clients_;
  c.spans.clear();
  c.large.clear();
  c.extra_slots.clear();
  c.bytes_held = 0;
  c.id = 0;
}

void request_handler::leave(client_state& c) {
  if (c.id == 0) return;
  by_id_.erase(c.id);
  --clients_;
  c.spans.clear();
  c.large.clear();
  c.extra_slots.clear();
  c.bytes_held = 0;
  c.id = 0;
}

void request_handler::adopt_orphans() {
  const std::uint64_t now = heap_->now();
  const span_pool_state& pool = heap_->state().span_pool;
  for (std::uint32_t i = 0; i < pool.high_water; ++i) {
    const mspan& s = heap_->span(span_id{i});
    const mspan_state st = s.state.load(std::memory_order_relaxed);
    if (s.owner_client == 0 || (st != mspan_state::cached && st != mspan_state::large)) continue;
    orphan_group& g = orphans_[s.owner_client];
    (st == mspan_state::cached ? g.spans : g.large).insert(i);
    g.since_ns = now;
  }
  const auto slots = static_cast<std::uint32_t>(heap_->accounts().caches_committed.load(std::memory_order_relaxed));
  for (std::uint32_t i = 0; i < slots; ++i) {
    const std::uint32_t owner = heap_->cache_slot(i).client.load(std::memory_order_relaxed);
    if (owner == 0 || owner == mheap::daemon_client) continue;
    orphan_group& g = orphans_[owner];
    g.slots.push_back(i);
    if (g.reattach_check == 0) g.reattach_check = heap_->cache_slot(i).reattach_check;
    g.since_ns = now;
  }
}

// A group whose client still lives (it holds the liveness lock of one of
// its slots: segment::liveness_held) waits for it however long it stays
// silent: it still allocates from its spans without asking.
bool request_handler::orphan_alive(const orphan_group& g) const noexcept {
  return std::any_of(g.slots.begin(), g.slots.end(), [&](std::uint32_t slot) { return heap_->seg().liveness_held(slot); });
}

std::size_t request_handler::expire_orphans(std::uint64_t grace_ns) {
  const std::uint64_t now = heap_->now();
  std::size_t expired = 0;
  for (auto it = orphans_.begin(); it != orphans_.end();) {
    if (now - it->second.since_ns < grace_ns || orphan_alive(it->second)) {
      ++it;
      continue;
    }
    SHMALLOC_CRASH_POINT("handler.expire");
    reclaim(it->first, it->second.spans, it->second.large, it->second.slots);
    it = orphans_.erase(it);
    ++expired;
  }
  return expired;
}

reply request_handler::on_reattach(client_state& c, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  auto m = proto::decode_reattach(p);
  if (!m) return error_reply(msg::spans, h, errc::protocol_error, "malformed reattach");
  auto it = orphans_.find(m->old_client_id);
  if (it == orphans_.end())
    return error_reply(msg::spans, h, errc::not_found,
                       "no spans of an earlier client " + std::to_string(m->old_client_id) + " wait to be reattached");
  orphan_group& g = it->second;
  if (g.reattach_check == 0 || reattach_check_of(m->token) != g.reattach_check)
    return error_reply(msg::spans, h, errc::permission_denied,
                       "the reattach token is not client " + std::to_string(m->old_client_id) + "'s");
  proto::span_list_msg taken;
  SHMALLOC_CRASH_POINT("handler.reattach");
  for (std::uint32_t id : m->span_ids) {
    std::set<std::uint32_t>* from = g.spans.count(id) ? &g.spans : g.large.count(id) ? &g.large : nullptr;
    if (from == nullptr) continue;  // not that client's: left alone
    from->erase(id);
    if (!holds(m->old_client_id, id, from == &g.spans ? mspan_state::cached : mspan_state::large)) continue;
    (from == &g.spans ? c.spans : c.large).insert(id);
    heap_->span(span_id{id}).owner_client = c.id;
    c.bytes_held += span_bytes(id);
    taken.span_ids.push_back(id);
  }
  // The group's cache slots pass to the claiming client, relabelled, so that
  // after another restart they are grouped with it. Spans not claimed yet
  // wait for further reattach requests (with the same token) until the
  // grace period ends. The reply lists what was taken, perhaps nothing.
  for (std::uint32_t slot : g.slots) label_slot(c, slot);
  c.extra_slots.insert(c.extra_slots.end(), g.slots.begin(), g.slots.end());
  g.slots.clear();
  if (g.spans.empty() && g.large.empty()) orphans_.erase(it);
  return ok_reply(msg::spans, h, proto::encode(taken));
}

}  // namespace shmalloc::service
