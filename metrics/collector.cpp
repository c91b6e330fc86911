#include "metrics/collector.hpp"

#include <sys/statvfs.h>

#include <algorithm>
#include <limits>
#include <set>
#include <string>

namespace shmalloc::metrics {

namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

// Builds the families of one scrape, in order.
class family_list {
 public:
  void gauge(const char* name, const char* help, double v) { add(name, help, MetricType::Gauge).gauge.value = v; }
  void counter(const char* name, const char* help, double v) {
    add(name, help, MetricType::Counter).counter.value = v;
  }
  // A family with one metric per label set; fill the returned metrics.
  MetricFamily& family(const char* name, const char* help, MetricType type) {
    families_.push_back(MetricFamily{name, help, type, {}});
    return families_.back();
  }
  std::vector<MetricFamily> take() { return std::move(families_); }

 private:
  ClientMetric& add(const char* name, const char* help, MetricType type) {
    return family(name, help, type).metric.emplace_back();
  }
  std::vector<MetricFamily> families_;
};

ClientMetric& labelled(MetricFamily& f, std::vector<ClientMetric::Label> labels) {
  ClientMetric& m = f.metric.emplace_back();
  m.label = std::move(labels);
  return m;
}

double d(std::uint64_t v) { return static_cast<double>(v); }

void add_memstats(family_list& out, const heap_census& c) {
  const heap_memstats& m = c.mem;
  const std::uint64_t alloc = c.heap_alloc_bytes();
  out.gauge("shmalloc_sys_bytes",
            "Bytes obtained for the heap: heap pages (released ones included) and committed metadata "
            "(go_memstats_sys_bytes).",
            d(m.heap_sys_bytes + m.metadata_sys_bytes));
  out.gauge("shmalloc_heap_sys_bytes",
            "Heap pages committed: heap_inuse_bytes + heap_idle_bytes (go_memstats_heap_sys_bytes).",
            d(m.heap_sys_bytes));
  out.gauge("shmalloc_heap_inuse_bytes",
            "Bytes in in-use spans: heap_alloc_bytes + memory_classes_heap_unused_bytes (go_memstats_heap_inuse_bytes).",
            d(m.heap_inuse_bytes));
  out.gauge("shmalloc_heap_idle_bytes",
            "Bytes in free pages, released ones included (go_memstats_heap_idle_bytes).", d(m.heap_idle_bytes));
  out.gauge("shmalloc_heap_released_bytes",
            "Free bytes returned to the OS by the scavenger (go_memstats_heap_released_bytes).",
            d(m.heap_released_bytes));
  out.gauge("shmalloc_memory_classes_heap_free_bytes",
            "Free bytes still backed by memory: heap_idle_bytes - heap_released_bytes "
            "(go_memory_classes_heap_free_bytes).",
            d(m.heap_idle_bytes - m.heap_released_bytes));
  out.gauge("shmalloc_heap_alloc_bytes",
            "Bytes of live objects, each counted at its size class (go_memstats_heap_alloc_bytes).", d(alloc));
  out.gauge("shmalloc_alloc_bytes", "Same as shmalloc_heap_alloc_bytes (go_memstats_alloc_bytes).", d(alloc));
  out.gauge("shmalloc_memory_classes_heap_unused_bytes",
            "Bytes of in-use spans holding no live object: free slots and fragmentation "
            "(go_memory_classes_heap_unused_bytes).",
            d(c.heap_unused_bytes()));
  out.gauge("shmalloc_heap_objects", "Live objects: mallocs_total - frees_total (go_memstats_heap_objects).",
            d(c.heap_objects()));
  out.gauge("shmalloc_mspan_inuse_bytes", "Bytes of span descriptors in use (go_memstats_mspan_inuse_bytes).",
            d(m.mspan_inuse_bytes));
  out.gauge("shmalloc_mspan_sys_bytes", "Bytes of span descriptors committed (go_memstats_mspan_sys_bytes).",
            d(m.mspan_sys_bytes));
  out.gauge("shmalloc_mcache_inuse_bytes",
            "Bytes of per-thread cache statistics blocks in use (go_memstats_mcache_inuse_bytes).",
            d(m.mcache_inuse_bytes));
  out.gauge("shmalloc_mcache_sys_bytes",
            "Bytes of per-thread cache statistics blocks committed (go_memstats_mcache_sys_bytes).",
            d(m.mcache_sys_bytes));
  out.gauge("shmalloc_heap_limit_bytes", "Bytes the heap may grow to, its capacity (go_gc_gomemlimit_bytes).",
            d(m.capacity_bytes));
}

void add_totals(family_list& out, const heap_census& c) {
  out.counter("shmalloc_mallocs_total",
              "Objects allocated; tiny objects count here and in frees_total, as in Go (go_memstats_mallocs_total).",
              d(c.mallocs_total()));
  out.counter("shmalloc_frees_total", "Objects freed (go_memstats_frees_total).", d(c.frees_total()));
  out.counter("shmalloc_alloc_bytes_total",
              "Bytes allocated, each object at its size class (go_memstats_alloc_bytes_total).",
              d(c.alloc_bytes_total()));
  out.counter("shmalloc_remote_frees_total",
              "Objects freed into spans held by another thread or process.", d(c.stats.remote_frees));
  out.counter("shmalloc_double_frees_total",
              "Double frees found when remote-free bitmaps were folded.", d(c.stats.double_frees));
}

// Allocations by size (go_gc_heap_allocs_by_size_bytes): the buckets are the
// size classes; large objects fall in +Inf. Sizes requested are not
// recorded, so an object counts at its class's size (the sum is an upper bound).
void add_allocs_by_size(family_list& out, const heap_census& c) {
  MetricFamily& f = out.family("shmalloc_heap_allocs_by_size_bytes",
                               "Allocations by size class, bucketed by the class's object size; tiny objects in "
                               "the 16-byte bucket, large ones in +Inf (go_gc_heap_allocs_by_size_bytes).",
                               MetricType::Histogram);
  ClientMetric::Histogram& h = labelled(f, {}).histogram;
  std::uint64_t cumulative = 0;
  double sum = 0;
  for (std::size_t s = 1; s < num_size_classes; ++s) {
    const auto size = class_to_size(static_cast<std::uint8_t>(s));
    std::uint64_t n = c.classes[s].mallocs;
    if (size == tiny_size) n += c.stats.tiny_allocs;
    cumulative += n;
    sum += d(n) * size;
    h.bucket.push_back({cumulative, static_cast<double>(size)});
  }
  cumulative += c.stats.large_allocs;
  sum += d(c.stats.large_alloc_bytes);
  h.bucket.push_back({cumulative, std::numeric_limits<double>::infinity()});
  h.sample_count = cumulative;
  h.sample_sum = sum;
}

void add_classes(family_list& out, const heap_census& c) {
  MetricFamily& spans = out.family("shmalloc_size_class_spans",
                                   "Spans per size class: partial and full on mcentral, cached in client caches.",
                                   MetricType::Gauge);
  MetricFamily& objects =
      out.family("shmalloc_size_class_objects", "Live objects per size class.", MetricType::Gauge);
  MetricFamily& bytes = out.family("shmalloc_size_class_inuse_bytes",
                                   "Bytes of in-use spans per size class.", MetricType::Gauge);
  for (std::size_t s = 1; s < num_size_classes; ++s) {
    const class_census& k = c.classes[s];
    const auto cls = static_cast<std::uint8_t>(s);
    const std::string size = std::to_string(class_to_size(cls));
    labelled(spans, {{"size_class", size}, {"state", "partial"}}).gauge.value = k.spans_partial;
    labelled(spans, {{"size_class", size}, {"state", "full"}}).gauge.value = k.spans_full;
    labelled(spans, {{"size_class", size}, {"state", "cached"}}).gauge.value = k.spans_cached;
    labelled(objects, {{"size_class", size}}).gauge.value = d(k.live_objects());
    labelled(bytes, {{"size_class", size}}).gauge.value = d(c.class_inuse_bytes(s));
  }
}

// Failures alerting rules watch exist from the start at 0, so that rate()
// sees the first one (a series that appears with its first failure has no
// earlier sample to compare with).
bool watched_failure(std::size_t op, std::size_t reason) noexcept {
  const auto o = static_cast<proto::msg>(op);
  const auto r = static_cast<errc>(reason);
  const bool grows = o == proto::msg::refill || o == proto::msg::alloc_large;
  return (grows && (r == errc::no_memory || r == errc::no_space || r == errc::quota_exceeded)) ||
         (op == 0 && r == errc::protocol_error);
}

void add_duration(MetricFamily& f, const std::string& op, const op_stats& o) {
  ClientMetric::Histogram& h = labelled(f, {{"op", op}}).histogram;
  std::uint64_t cumulative = 0;
  for (std::size_t b = 0; b < o.duration_counts.size(); ++b) {
    cumulative += o.duration_counts[b];
    h.bucket.push_back({cumulative, b < control_duration_bounds.size() ? control_duration_bounds[b]
                                                                        : std::numeric_limits<double>::infinity()});
  }
  h.sample_count = cumulative;
  h.sample_sum = o.duration_sum;
}

// Every request op is exported from the start, with "unknown" for the rest.
void add_control(family_list& out, const control_stats& cs) {
  MetricFamily& requests = out.family("shmalloc_control_requests_total",
                                      "Control-socket requests handled, by op.", MetricType::Counter);
  MetricFamily& failures = out.family("shmalloc_control_request_failures_total",
                                      "Control-socket requests that failed, wholly or in part, by op and reason.",
                                      MetricType::Counter);
  MetricFamily& duration = out.family(
      "shmalloc_control_request_duration_seconds",
      "Time from a whole request read to its reply built, by op (requests with a malformed header excluded).",
      MetricType::Histogram);
  for (std::size_t i = 0; i < max_ops; ++i) {
    if (i != 0 && !is_request(i)) continue;
    const op_stats& o = cs.op(i);
    const std::string op{op_name(i)};
    labelled(requests, {{"op", op}}).counter.value = d(o.requests);
    for (std::size_t r = 1; r < num_reasons; ++r)
      if (o.failures[r] != 0 || watched_failure(i, r))
        labelled(failures, {{"op", op}, {"reason", std::string{reason_name(r)}}}).counter.value = d(o.failures[r]);
    add_duration(duration, op, o);
  }
  out.counter("shmalloc_control_connections_total", "Connections accepted on the control socket.",
              d(cs.connections));
  out.counter("shmalloc_control_peers_refused_total",
              "Connections refused because the peer's uid and gid are not allowed.", d(cs.peers_refused));
  out.counter("shmalloc_control_connections_refused_total",
              "Connections refused because max-connections were open, or no thread or file descriptor could serve them.",
              d(cs.connections_refused));
  out.counter("shmalloc_control_deadline_closes_total",
              "Connections closed because hello, or a started frame, did not arrive in time.",
              d(cs.deadline_closes));
}

// A name a label may carry: what publish lets a root be called (printable
// ASCII, no spaces). The root table lies in a segment other processes can
// write; a name that is not text, or a repeat, would make the whole scrape
// unreadable to Prometheus, so such a cache is left out.
bool label_safe(const std::string& name) {
  return !name.empty() && std::all_of(name.begin(), name.end(), [](char ch) { return ch > 0x20 && ch < 0x7f; });
}

struct cache_family {
  const char* name;
  const char* help;
  MetricType type;
  std::uint64_t cache_census::*value;
};

// Same counters as shmallocctl caches; help texts say what each counts.
constexpr cache_family cache_families[] = {
    {"shmalloc_cache_hits_total", "Lookups (get or pin) that found their key in the shared cache.",
     MetricType::Counter, &cache_census::hits},
    {"shmalloc_cache_misses_total", "Lookups that did not find their key, or found it expired.",
     MetricType::Counter, &cache_census::misses},
    {"shmalloc_cache_evictions_total", "Entries the CLOCK hand took out to keep the cache within max_bytes.",
     MetricType::Counter, &cache_census::evictions},
    {"shmalloc_cache_expirations_total", "Entries taken out because their time to live had passed.",
     MetricType::Counter, &cache_census::expirations},
    {"shmalloc_cache_puts_total", "Entries inserted or replaced.", MetricType::Counter, &cache_census::puts},
    {"shmalloc_cache_items", "Entries a lookup can find.", MetricType::Gauge, &cache_census::items},
    {"shmalloc_cache_bytes", "Heap bytes of the entries a lookup can find (each at its object's size class).",
     MetricType::Gauge, &cache_census::bytes},
    {"shmalloc_cache_retired_bytes",
     "Heap bytes of entries replaced, erased or evicted that wait for readers to leave before they are freed.",
     MetricType::Gauge, &cache_census::retired_bytes},
    {"shmalloc_cache_max_bytes", "The cache's byte budget, set when it was created.", MetricType::Gauge,
     &cache_census::max_bytes},
    {"shmalloc_cache_repairs_total", "Shards repaired because a writer died holding their lock.",
     MetricType::Counter, &cache_census::repairs},
};

// The shared caches (cache/census.hpp), one series per cache in each
// family; no families at all while the heap has no cache.
void add_caches(family_list& out, const std::vector<cache_census>& caches) {
  std::set<std::string> seen;
  std::vector<const cache_census*> shown;
  for (const cache_census& k : caches)
    if (label_safe(k.name) && seen.insert(k.name).second) shown.push_back(&k);
  if (shown.empty()) return;
  for (const cache_family& c : cache_families) {
    MetricFamily& f = out.family(c.name, c.help, c.type);
    for (const cache_census* k : shown) {
      ClientMetric& m = labelled(f, {{"cache", k->name}});
      (c.type == MetricType::Counter ? m.counter.value : m.gauge.value) = d(k->*c.value);
    }
  }
}

// A client's name is its own: bytes a label should not carry show as '?'.
std::string label_text(std::string s) {
  for (char& ch : s)
    if (ch < 0x20 || ch >= 0x7f) ch = '?';
  return s;
}

void add_clients(family_list& out, const std::vector<client_live>& clients) {
  MetricFamily& f = out.family("shmalloc_client_live_bytes",
                               "Bytes a client's threads allocated and have not freed, large objects included; "
                               "the top 10 clients by these bytes (shmallocctl leaks shows all).",
                               MetricType::Gauge);
  for (std::size_t i = 0; i < clients.size() && i < max_client_series; ++i) {
    const client_live& c = clients[i];
    labelled(f, {{"client", std::to_string(c.id)}, {"name", label_text(c.name)},
                 {"pid", c.pid != 0 ? std::to_string(c.pid) : std::string()}})
        .gauge.value = d(c.live_bytes);
  }
}

}  // namespace

std::vector<MetricFamily> heap_families(const metrics_sample& s, const build_info& b) {
  family_list out;
  MetricFamily& info = out.family("shmalloc_build_info", "Build of shmallocd; the value is 1 (go_info).",
                                  MetricType::Gauge);
  labelled(info, {{"revision", b.revision}, {"version", b.version}}).gauge.value = 1;
  if (!s.valid) return out.take();
  add_memstats(out, s.census);
  add_totals(out, s.census);
  add_allocs_by_size(out, s.census);
  add_classes(out, s.census);
  out.gauge("shmalloc_clients", "Client processes connected to the daemon.", d(s.clients));
  add_clients(out, s.top_clients);
  add_control(out, s.control);
  out.counter("shmalloc_reclaimed_bytes_total", "Bytes of spans taken back from clients that disconnected, cleanly or by dying.",
              d(s.census.mem.reclaimed_bytes_total));
  out.counter("shmalloc_scavenged_bytes_total", "Bytes of free pages the scavenger returned to the OS.",
              d(s.census.mem.scavenged_bytes_total));
  out.counter("shmalloc_heap_grow_failures_total",
              "Heap growths refused: capacity reached or the shared-memory filesystem full.",
              d(s.census.mem.grow_failures));
  out.gauge("shmalloc_shm_avail_bytes",
            "Free bytes of the filesystem behind the heap (/dev/shm), the headroom before growth fails.",
            d(s.shm_avail_bytes));
  add_caches(out, s.caches);
  return out.take();
}

std::vector<MetricFamily> heap_collector::Collect() const { return heap_families(sample_(), build_); }

std::uint64_t filesystem_avail_bytes(const std::string& path) noexcept {
  struct statvfs st {};
  if (statvfs(path.c_str(), &st) != 0) return 0;
  return std::uint64_t{st.f_bavail} * st.f_frsize;
}

}  // namespace shmalloc::metrics
