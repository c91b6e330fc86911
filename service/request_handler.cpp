#include "service/request_handler.hpp"

#include <sys/random.h>

#include <algorithm>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "shm/crash_point.hpp"
#include "shm/profile.hpp"
#include "shm/segment.hpp"

namespace shmalloc::service {

using proto::msg;

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

reply request::fail(errc code, const std::string& why, bool close) const {
  return {proto::make_reply(reply_type, header.request_id, code, why), close};
}

reply request::ok(const std::vector<std::uint8_t>& payload) const {
  return {proto::make_reply(reply_type, header.request_id, errc::ok, {}, payload), false};
}

reply request::no_body_error() const {
  return fail(errc::protocol_error, std::string(proto::msg_name(header.type)) + " takes no body");
}

// Each request type goes to its on_ handler (the message table names both);
// a failure before one is chosen is answered with ok's type.
reply request_handler::handle(client_state& c, const proto::frame_header& h, std::span<const std::uint8_t> p) {
  ++requests_;
  const request refused{h, p, msg::ok};
  if (std::string why = proto::check_header(h); !why.empty()) return refused.fail(errc::protocol_error, why, true);
  if (c.id == 0 && proto::sender_of(h.type) != proto::sender::greeting && !proto::read_only(h.type))
    return refused.fail(errc::protocol_error, "the first request must be hello");
  const auto type = static_cast<msg>(h.type);
  switch (type) {
#define SHMALLOC_X(name, number, reply, who) \
  case msg::name: return on_##name(c, request{h, p, msg::reply});
    SHMALLOC_PROTO_REQUESTS(SHMALLOC_X)
#undef SHMALLOC_X
    default: return refused.fail(errc::protocol_error, "unknown request type " + std::to_string(h.type));
  }
}

reply request_handler::on_bye(client_state&, const request& req) {
  reply r = req.ok();
  r.close = true;  // the daemon closes once the ok is sent
  return r;
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

reply request_handler::on_hello(client_state& c, const request& req) {
  if (c.id != 0) return req.fail(errc::protocol_error, "hello was already said");
  auto m = proto::decode_hello(req.body);
  if (!m) return req.fail(errc::protocol_error, "malformed hello");
  if (m->layout_version != layout_version)
    return req.fail(errc::layout_mismatch,
                       "client speaks heap layout version " + std::to_string(m->layout_version) + ", daemon " +
                           std::to_string(layout_version));
  std::uint32_t& next_id = heap_->state().next_client_id;
  if (next_id == 0 || next_id == mheap::daemon_client) next_id = 1;
  auto slot = heap_->assign_cache(next_id);
  if (!slot) return req.fail(slot.code(), slot.err().message);
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
  return req.ok(proto::encode(w));
}

std::uint64_t request_handler::span_bytes(std::uint32_t span) const noexcept {
  return std::uint64_t{heap_->span(span_id{span}).npages} * page_size;
}

std::size_t request_handler::slots_held(const client_state& c) noexcept {
  return 1 + c.extra_slots.size();  // the connection's own slot and the threads'
}

bool request_handler::slots_fit(const client_state& c, std::size_t more) const noexcept {
  return settings_.max_caches_per_client == 0 || slots_held(c) + more <= settings_.max_caches_per_client;
}

bool request_handler::over_quota(const client_state& c, std::uint64_t more) const noexcept {
  return settings_.quota_bytes != 0 && c.bytes_held + more > settings_.quota_bytes;
}

reply request_handler::on_refill(client_state& c, const request& req) {
  auto m = proto::decode_refill(req.body);
  if (!m) return req.fail(errc::protocol_error, "malformed refill (span class 2..135, 1..64 spans)");
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
  if (out.span_ids.empty()) return req.fail(failure.code, failure.message);
  reply r = req.ok(proto::encode(out));
  r.shortfall = failure.code;
  return r;
}

reply request_handler::on_release(client_state& c, const request& req) {
  auto m = proto::decode_span_list(req.body, proto::max_release);
  if (!m) return req.fail(errc::protocol_error, "malformed release");
  // Checked whole before anything is released. A span named twice would
  // pass the ownership check twice and come off the client's bytes twice.
  std::set<std::uint32_t> named;
  for (std::uint32_t id : m->span_ids) {
    if (c.spans.count(id) == 0)
      return req.fail(errc::bad_handle,
                         "span " + std::to_string(id) + " is not held by this client (double release?)");
    if (!named.insert(id).second)
      return req.fail(errc::bad_handle, "span " + std::to_string(id) + " is named twice in one release");
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
  return req.ok();
}

reply request_handler::on_alloc_large(client_state& c, const request& req) {
  auto m = proto::decode_alloc_large(req.body);
  if (!m) return req.fail(errc::protocol_error, "malformed alloc_large");
  const std::uint64_t bytes = (m->bytes + page_size - 1) / page_size * page_size;
  if (m->bytes > heap_->seg().header().capacity || over_quota(c, bytes))
    return req.fail(m->bytes > heap_->seg().header().capacity ? errc::no_memory : errc::quota_exceeded,
                       "a large object of " + std::to_string(m->bytes) + " bytes does not fit the " +
                           (m->bytes > heap_->seg().header().capacity ? "heap" : "client quota"));
  SHMALLOC_CRASH_POINT("handler.alloc_large");
  auto id = heap_->alloc_large(m->bytes, m->noscan, c.id);
  if (!id) return req.fail(id.code(), id.err().message);
  SHMALLOC_CRASH_POINT("handler.large_recorded");
  // Free in the heap's eyes until the client hands it out (client/large.cpp
  // sets the bit): a client that dies waiting for this reply leaves a span
  // its reclaim frees, not one kept as another process's object.
  heap_->span(*id).alloc_bits[0].store(0, std::memory_order_relaxed);
  c.large.insert(id->value);
  c.bytes_held += bytes;
  const handle_t handle = heap_->view().handle_of(heap_->view().span_base(heap_->span(*id)));
  return req.ok(proto::encode(proto::large_msg{id->value, handle}));
}

reply request_handler::on_free_large(client_state& c, const request& req) {
  auto m = proto::decode_free_large(req.body);
  if (!m) return req.fail(errc::protocol_error, "malformed free_large");
  object_ref ref;
  if (m->handle >= heap_->seg().size() || heap_->view().object_at(m->handle, &ref) != errc::ok ||
      heap_->span(ref.span).state.load(std::memory_order_relaxed) != mspan_state::large)
    return req.fail(errc::bad_handle, "handle " + std::to_string(m->handle) + " is not a large object");
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
  return req.ok();
}

reply request_handler::on_cache_open(client_state& c, const request& req) {
  if (!req.body.empty()) return req.no_body_error();
  if (!slots_fit(c, 1))
    return req.fail(errc::quota_exceeded, "client holds " + std::to_string(slots_held(c)) +
                                              " cache slots, the most one client may (max-caches-per-client)");
  auto slot = heap_->assign_cache(c.id);
  if (!slot) return req.fail(slot.code(), slot.err().message);
  label_slot(c, *slot);
  c.extra_slots.push_back(*slot);
  return req.ok(proto::encode(proto::slot_msg{*slot}));
}

reply request_handler::on_cache_close(client_state& c, const request& req) {
  auto m = proto::decode_slot(req.body);
  if (!m) return req.fail(errc::protocol_error, "malformed cache_close");
  auto it = std::find(c.extra_slots.begin(), c.extra_slots.end(), m->slot);
  if (it == c.extra_slots.end())
    return req.fail(errc::bad_handle, "cache slot " + std::to_string(m->slot) + " is not this client's");
  heap_->retire_cache(m->slot);
  c.extra_slots.erase(it);
  return req.ok();
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
  forget(c);
}

void request_handler::leave(client_state& c) {
  if (c.id != 0) forget(c);
}

void request_handler::forget(client_state& c) {
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

reply request_handler::on_reattach(client_state& c, const request& req) {
  auto m = proto::decode_reattach(req.body);
  if (!m) return req.fail(errc::protocol_error, "malformed reattach");
  auto it = orphans_.find(m->old_client_id);
  if (it == orphans_.end())
    return req.fail(errc::not_found,
                       "no spans of an earlier client " + std::to_string(m->old_client_id) + " wait to be reattached");
  orphan_group& g = it->second;
  if (g.reattach_check == 0 || reattach_check_of(m->token) != g.reattach_check)
    return req.fail(errc::permission_denied,
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
  reply r = req.ok(proto::encode(taken));
  if (!slots_fit(c, g.slots.size())) {
    // Past max-caches-per-client the slots stay with the group, and count
    // under the old id: threads may still write them, so they cannot be
    // retired while the client lives, and its old hello slot, among them,
    // holds the liveness lock that keeps the group waiting (orphan_alive).
    r.shortfall = errc::quota_exceeded;
  } else {
    for (std::uint32_t slot : g.slots) label_slot(c, slot);
    c.extra_slots.insert(c.extra_slots.end(), g.slots.begin(), g.slots.end());
    g.slots.clear();
  }
  if (g.spans.empty() && g.large.empty() && g.slots.empty()) orphans_.erase(it);
  return r;
}

}  // namespace shmalloc::service
