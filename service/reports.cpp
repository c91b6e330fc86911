// reports.cpp: request_handler's read-only reports (stats, classes,
// clients, pages, caches, advise, leaks, leak_sites), built from the heap's
// census (shm/memstats.hpp), the client registry, the shared caches'
// counters (cache/census.hpp) and the profile table (shm/profile.hpp).
// Observers may ask for them before hello: they change nothing but each
// client's live-bytes history, which a leaks request samples once more.
#include "service/request_handler.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>

#include "cache/census.hpp"
#include "cache/layout.hpp"
#include "shm/memstats.hpp"
#include "shm/profile.hpp"

namespace shmalloc::service {

namespace {
// A report whose request has no body: build() makes it.
template <class Build>
reply report(const request& req, Build build) {
  if (!req.body.empty()) return req.no_body_error();
  return req.ok(proto::encode(build()));
}

std::uint64_t unix_now_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}
}  // namespace

reply request_handler::on_stats(client_state&, const request& req) { return report(req, [&] { return stats(); }); }

reply request_handler::on_classes(client_state&, const request& req) { return report(req, [&] { return class_table(); }); }

reply request_handler::on_clients(client_state&, const request& req) {
  const auto format = proto::decode_clients_request(req.body);
  if (!format)
    return req.fail(errc::protocol_error,
                       "malformed clients (an empty body, or u8 row format 0 or 1)");
  return req.ok(proto::encode(client_table(*format)));
}

reply request_handler::on_pages(client_state&, const request& req) { return report(req, [&] { return page_table(); }); }

reply request_handler::on_caches(client_state&, const request& req) { return report(req, [&] { return cache_table(); }); }

reply request_handler::on_advise(client_state&, const request& req) { return report(req, [&] { return advise_table(); }); }

reply request_handler::on_leaks(client_state&, const request& req) {
  const auto window = proto::decode_leaks_request(req.body);
  if (!window)
    return req.fail(errc::protocol_error, "malformed leaks (an empty body, or u32 window 1..600 s)");
  return req.ok(proto::encode(leak_table(*window)));
}

reply request_handler::on_leak_sites(client_state&, const request& req) {
  const auto older_than = proto::decode_leak_sites_request(req.body);
  if (!older_than) return req.fail(errc::protocol_error, "malformed leak_sites (u64 older_than_ns)");
  return req.ok(proto::encode(site_table(*older_than)));
}

proto::stats_msg request_handler::stats() const {
  const heap_census census = read_census(*heap_);
  proto::stats_msg s;
#define SHMALLOC_MEM(name) s.name = census.mem.name;
#define SHMALLOC_CENSUS(name) s.name = census.name();
#define SHMALLOC_DAEMON(name)
  SHMALLOC_PROTO_STATS_BY_SOURCE(SHMALLOC_MEM, SHMALLOC_CENSUS, SHMALLOC_DAEMON)
#undef SHMALLOC_MEM
#undef SHMALLOC_CENSUS
#undef SHMALLOC_DAEMON
  s.clients = clients_;
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
// CLOCK_MONOTONIC, the clock the clients stamped them with (sample_clock_,
// not mheap's clock, which tests drive for other ends).
proto::site_table_msg request_handler::site_table(std::uint64_t older_than_ns) const {
  static_assert(proto::max_site_frames == profile_frames);
  const std::uint64_t now = sample_clock_();
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

}  // namespace shmalloc::service
