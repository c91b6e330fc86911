// The metrics layer without HTTP: families built from a heap we shaped by
// hand, rendered by prometheus-cpp's TextSerializer and read back, so the
// test sees exactly what Prometheus would.
#include <doctest/doctest.h>
#include <prometheus/text_serializer.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <ctime>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>

#include "metrics/collector.hpp"
#include "metrics/process_collector.hpp"
#include "metrics/server.hpp"
#include "support/http_get.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;
using namespace shmalloc::metrics;
using shmalloc::test::test_heap;

namespace {

// "name{labels}" -> value, from text format 0.0.4; "# TYPE" lines into types.
struct scrape {
  std::map<std::string, double> series;
  std::map<std::string, std::string> types;
  std::set<std::string> label_names;

  explicit scrape(const std::string& text) {
    std::istringstream in(text);
    std::string line;
    static const std::regex label_name(R"(([a-zA-Z_][a-zA-Z0-9_]*)=")");
    while (std::getline(in, line)) {
      if (line.rfind("# TYPE ", 0) == 0) {
        std::istringstream t(line.substr(7));
        std::string name, type;
        t >> name >> type;
        types[name] = type;
        continue;
      }
      if (line.empty() || line[0] == '#') continue;
      const auto space = line.rfind(' ');
      const std::string key = line.substr(0, space);
      series[key] = std::stod(line.substr(space + 1));
      for (std::sregex_iterator it(key.begin(), key.end(), label_name), end; it != end; ++it)
        label_names.insert((*it)[1]);
    }
  }
  double at(const std::string& key) const {
    auto it = series.find(key);
    REQUIRE_MESSAGE(it != series.end(), "no series " << key);
    return it->second;
  }
};

std::string render(const std::vector<prometheus::MetricFamily>& families) {
  std::ostringstream out;
  prometheus::TextSerializer{}.Serialize(out, families);
  return out.str();
}

metrics_sample sample_of(const mheap& h, std::uint64_t clients = 0) {
  metrics_sample s;
  s.census = read_census(h);
  s.clients = clients;
  s.shm_avail_bytes = filesystem_avail_bytes("/dev/shm");
  s.valid = true;
  return s;
}

const build_info build{"1.2.3", "abcdef"};

// Allocates n objects of size class c in spans held by cache slot `slot`,
// counting them as a client thread would.
void allocate(mheap& h, std::uint32_t slot, std::uint8_t c, bool noscan, int n) {
  auto spc = span_class::make(c, noscan);
  mcache_slot& cs = h.cache_slot(slot);
  while (n > 0) {
    auto id = h.central(spc).cache_span(1);
    REQUIRE(id);
    mspan& s = h.span(*id);
    for (; n > 0 && span_alloc_object(s) >= 0; --n) bump(cs.stats.small_allocs[c]);
  }
}

}  // namespace

TEST_SUITE("metrics") {
  TEST_CASE("Go's MemStats identities hold in the rendered text") {
    test_heap t;
    mheap& h = *t.heap;
    auto slot = h.assign_cache(1);
    REQUIRE(slot);
    allocate(h, *slot, 1, true, 700);   // 8-byte objects
    allocate(h, *slot, 20, false, 50);  // 320-byte objects
    mcache_slot& cs = h.cache_slot(*slot);
    bump(cs.stats.small_frees[1], std::uint64_t{100});
    bump(cs.stats.tiny_allocs, std::uint64_t{9});
    auto large = h.alloc_large(100'000, true, 1);
    REQUIRE(large);
    const std::uint64_t large_bytes = std::uint64_t{h.span(*large).npages} * page_size;
    bump(cs.stats.large_allocs);
    bump(cs.stats.large_alloc_bytes, large_bytes);

    const scrape m(render(heap_families(sample_of(h, 3), build)));
    const double sys = m.at("shmalloc_heap_sys_bytes"), inuse = m.at("shmalloc_heap_inuse_bytes");
    const double idle = m.at("shmalloc_heap_idle_bytes"), alloc = m.at("shmalloc_heap_alloc_bytes");
    const double unused = m.at("shmalloc_memory_classes_heap_unused_bytes");
    CHECK(sys > 0);
    CHECK(sys == inuse + idle);
    CHECK(inuse == alloc + unused);
    CHECK(idle == m.at("shmalloc_memory_classes_heap_free_bytes") + m.at("shmalloc_heap_released_bytes"));
    // Against an independent source: the page bitmap, walked page by page.
    const page_census pages = read_page_census(h);
    CHECK(inuse == static_cast<double>(pages.pages_in_use * page_size));
    CHECK(idle == static_cast<double>((pages.pages_free + pages.pages_released) * page_size));
    CHECK(m.at("shmalloc_alloc_bytes") == alloc);
    CHECK(m.at("shmalloc_heap_objects") == m.at("shmalloc_mallocs_total") - m.at("shmalloc_frees_total"));
    // The numbers themselves: 600 + 50 small objects and one large one live;
    // the 9 tiny objects count in both mallocs and frees, as in Go.
    CHECK(m.at("shmalloc_heap_objects") == 651);
    CHECK(m.at("shmalloc_mallocs_total") == 700 + 50 + 9 + 1);
    CHECK(alloc == 600 * 8 + 50 * class_to_size(20) + static_cast<double>(large_bytes));
    CHECK(m.at("shmalloc_alloc_bytes_total") == 700 * 8 + 50 * class_to_size(20) + static_cast<double>(large_bytes));
    CHECK(m.at("shmalloc_clients") == 3);
    CHECK(m.at("shmalloc_heap_limit_bytes") == static_cast<double>(h.seg().header().capacity));
    CHECK(m.at("shmalloc_sys_bytes") > sys);  // metadata on top
    CHECK(m.at("shmalloc_shm_avail_bytes") > 0);
    CHECK(m.at(R"(shmalloc_build_info{revision="abcdef",version="1.2.3"})") == 1);
  }

  TEST_CASE("allocations by size: one bucket per size class, cumulative, counting every malloc") {
    test_heap t;
    mheap& h = *t.heap;
    auto slot = h.assign_cache(1);
    REQUIRE(slot);
    allocate(h, *slot, 1, true, 5);    // 8 B
    allocate(h, *slot, 3, false, 7);   // 24 B
    allocate(h, *slot, 67, false, 2);  // 32 KiB
    bump(h.cache_slot(*slot).stats.tiny_allocs, std::uint64_t{4});
    bump(h.cache_slot(*slot).stats.large_allocs, std::uint64_t{1});
    const scrape m(render(heap_families(sample_of(h), build)));
    CHECK(m.types.at("shmalloc_heap_allocs_by_size_bytes") == "histogram");
    double previous = 0;
    int buckets = 0;
    for (std::size_t c = 1; c < num_size_classes; ++c) {
      const double v = m.at("shmalloc_heap_allocs_by_size_bytes_bucket{le=\"" +
                            std::to_string(class_to_size(static_cast<std::uint8_t>(c))) + "\"}");
      CHECK(v >= previous);
      previous = v;
      ++buckets;
    }
    CHECK(buckets == 67);
    CHECK(m.at(R"(shmalloc_heap_allocs_by_size_bytes_bucket{le="8"})") == 5);
    CHECK(m.at(R"(shmalloc_heap_allocs_by_size_bytes_bucket{le="16"})") == 9);  // + 4 tiny
    CHECK(m.at(R"(shmalloc_heap_allocs_by_size_bytes_bucket{le="24"})") == 16);
    CHECK(m.at(R"(shmalloc_heap_allocs_by_size_bytes_bucket{le="32768"})") == 18);
    CHECK(m.at(R"(shmalloc_heap_allocs_by_size_bytes_bucket{le="+Inf"})") == 19);
    CHECK(m.at("shmalloc_heap_allocs_by_size_bytes_count") == m.at("shmalloc_mallocs_total"));
  }

  TEST_CASE("spans per size class by state match mcentral") {
    test_heap t;
    mheap& h = *t.heap;
    const auto spc = span_class::make(5, false);  // 48-byte objects
    mcentral c = h.central(spc);
    auto full = *c.cache_span(1);
    auto partial = *c.cache_span(1);
    *c.cache_span(1);  // stays cached
    while (span_alloc_object(h.span(full)) >= 0) {
    }
    span_alloc_object(h.span(partial));
    c.uncache_span(full);
    c.uncache_span(partial);
    const scrape m(render(heap_families(sample_of(h), build)));
    CHECK(m.at(R"(shmalloc_size_class_spans{size_class="48",state="partial"})") == 1);
    CHECK(m.at(R"(shmalloc_size_class_spans{size_class="48",state="full"})") == 1);
    CHECK(m.at(R"(shmalloc_size_class_spans{size_class="48",state="cached"})") == 1);
    CHECK(m.at(R"(shmalloc_size_class_inuse_bytes{size_class="48"})") == 3.0 * class_span_bytes(5));
    CHECK(m.at(R"(shmalloc_size_class_spans{size_class="64",state="cached"})") == 0);
  }

  TEST_CASE("control requests: counted by op, failures by op and reason, durations in a histogram") {
    metrics_sample s;
    s.valid = true;
    s.control.record(static_cast<std::uint16_t>(proto::msg::refill), errc::ok, 20e-6);
    s.control.record(static_cast<std::uint16_t>(proto::msg::refill), errc::quota_exceeded, 3e-6);
    s.control.record(static_cast<std::uint16_t>(proto::msg::hello), errc::ok, 2.0);
    s.control.record(static_cast<std::uint16_t>(proto::msg::pages), errc::ok, 1e-6);
    s.control.record(999, errc::protocol_error, 1e-6);
    s.control.record(static_cast<std::uint16_t>(proto::msg::welcome), errc::protocol_error, 1e-6);  // a reply type
    const scrape m(render(heap_families(s, build)));
    CHECK(m.at(R"(shmalloc_control_requests_total{op="refill"})") == 2);
    CHECK(m.at(R"(shmalloc_control_requests_total{op="hello"})") == 1);
    CHECK(m.at(R"(shmalloc_control_requests_total{op="unknown"})") == 2);
    CHECK(m.at(R"(shmalloc_control_requests_total{op="pages"})") == 1);
    CHECK(m.at(R"(shmalloc_control_request_failures_total{op="refill",reason="quota_exceeded"})") == 1);
    CHECK(m.at(R"(shmalloc_control_request_failures_total{op="unknown",reason="protocol_error"})") == 2);
    CHECK(m.series.count(R"(shmalloc_control_request_failures_total{op="hello",reason="ok"})") == 0);
    CHECK(m.at(R"(shmalloc_control_request_duration_seconds_bucket{op="refill",le="5e-06"})") == 1);
    CHECK(m.at(R"(shmalloc_control_request_duration_seconds_bucket{op="refill",le="2.5e-05"})") == 2);
    CHECK(m.at(R"(shmalloc_control_request_duration_seconds_bucket{op="hello",le="1"})") == 0);
    CHECK(m.at(R"(shmalloc_control_request_duration_seconds_bucket{op="hello",le="+Inf"})") == 1);
    CHECK(m.at(R"(shmalloc_control_request_duration_seconds_count{op="refill"})") == 2);
    CHECK(m.at(R"(shmalloc_control_request_duration_seconds_sum{op="refill"})") == doctest::Approx(23e-6));
    // Every op and the failures alerts watch exist from the start, at 0.
    CHECK(m.at(R"(shmalloc_control_requests_total{op="stats"})") == 0);
    CHECK(m.at(R"(shmalloc_control_request_duration_seconds_count{op="stats"})") == 0);
    CHECK(m.at(R"(shmalloc_control_request_failures_total{op="alloc_large",reason="no_space"})") == 0);
    CHECK(m.series.count(R"(shmalloc_control_request_failures_total{op="stats",reason="no_space"})") == 0);
  }

  TEST_CASE("every request of the message table has its op label, the highest numbered too") {
    metrics_sample s;
    s.valid = true;
    for (proto::msg type : {proto::msg::advise, proto::msg::leaks, proto::msg::leak_sites})
      s.control.record(static_cast<std::uint16_t>(type), errc::ok, 1e-6);
    const scrape m(render(heap_families(s, build)));
    CHECK(m.at(R"(shmalloc_control_requests_total{op="advise"})") == 1);
    CHECK(m.at(R"(shmalloc_control_requests_total{op="leaks"})") == 1);
    CHECK(m.at(R"(shmalloc_control_requests_total{op="leak_sites"})") == 1);
    CHECK(m.at(R"(shmalloc_control_requests_total{op="unknown"})") == 0);
    for (std::uint16_t op = 1; op <= proto::max_msg; ++op)
      if (proto::is_request(op)) CHECK(op_name(op) == proto::msg_name(op));
  }

  TEST_CASE("a refill cut short counts as a failure; a refused header is not timed; connections are counted") {
    metrics_sample s;
    s.valid = true;
    const auto refill = static_cast<std::uint16_t>(proto::msg::refill);
    s.control.record(refill, errc::ok, 1e-5, errc::quota_exceeded);  // some spans, then the quota
    s.control.record_refused(refill, errc::protocol_error);
    s.control.connections = 7;
    s.control.peers_refused = 2;
    s.control.connections_refused = 3;
    s.control.deadline_closes = 1;
    const scrape m(render(heap_families(s, build)));
    CHECK(m.at(R"(shmalloc_control_requests_total{op="refill"})") == 2);
    CHECK(m.at(R"(shmalloc_control_request_failures_total{op="refill",reason="quota_exceeded"})") == 1);
    CHECK(m.at(R"(shmalloc_control_request_failures_total{op="refill",reason="protocol_error"})") == 1);
    CHECK(m.at(R"(shmalloc_control_request_duration_seconds_count{op="refill"})") == 1);
    CHECK(m.at("shmalloc_control_connections_total") == 7);
    CHECK(m.at("shmalloc_control_peers_refused_total") == 2);
    CHECK(m.at("shmalloc_control_connections_refused_total") == 3);
    CHECK(m.at("shmalloc_control_deadline_closes_total") == 1);
  }

  TEST_CASE("names follow Prometheus' rules and labels stay bounded") {
    test_heap t;
    auto slot = t.heap->assign_cache(1);
    REQUIRE(slot);
    allocate(*t.heap, *slot, 10, false, 3);
    metrics_sample s = sample_of(*t.heap, 1);
    s.control.record(static_cast<std::uint16_t>(proto::msg::refill), errc::no_memory, 1e-5);
    s.caches.push_back(cache_census{.name = "sessions"});
    const scrape m(render(heap_families(s, build)));
    for (const auto& [name, type] : m.types) {
      CHECK_MESSAGE(name.rfind("shmalloc_", 0) == 0, name);
      CHECK_MESSAGE((type == "counter") == (name.size() > 6 && name.substr(name.size() - 6) == "_total"), name);
    }
    const std::set<std::string> allowed{"size_class", "state", "op", "reason", "le", "version", "revision", "cache"};
    for (const auto& l : m.label_names) CHECK_MESSAGE(allowed.count(l) == 1, "unexpected label " << l);
    // 67 size classes x 3 states, whatever the heap holds.
    int span_series = 0;
    for (const auto& [key, v] : m.series) span_series += key.rfind("shmalloc_size_class_spans{", 0) == 0;
    CHECK(span_series == 67 * 3);
  }

  TEST_CASE("shared caches: one series per cache in each family, and no family while there is no cache") {
    metrics_sample s;
    s.valid = true;
    CHECK(render(heap_families(s, build)).find("shmalloc_cache_") == std::string::npos);
    cache_census a{.name = "sessions", .max_bytes = 64 << 20, .items = 5, .bytes = 640, .retired_items = 1,
                   .retired_bytes = 128, .hits = 42, .misses = 8, .puts = 17, .erases = 2, .evictions = 4,
                   .expirations = 6, .repairs = 1, .readers = 3};
    s.caches = {a, cache_census{.name = "users", .hits = 1}};
    s.caches.push_back(cache_census{.name = "sessions", .hits = 1000});  // a repeated root name: left out
    s.caches.push_back(cache_census{.name = "bad\nname", .hits = 1});    // not a root name: left out
    s.caches.push_back(cache_census{.name = "", .hits = 1});
    const scrape m(render(heap_families(s, build)));
    const std::map<std::string, std::pair<std::string, double>> expected{
        {"shmalloc_cache_hits_total", {"counter", 42}},       {"shmalloc_cache_misses_total", {"counter", 8}},
        {"shmalloc_cache_evictions_total", {"counter", 4}},   {"shmalloc_cache_expirations_total", {"counter", 6}},
        {"shmalloc_cache_puts_total", {"counter", 17}},       {"shmalloc_cache_items", {"gauge", 5}},
        {"shmalloc_cache_bytes", {"gauge", 640}},             {"shmalloc_cache_retired_bytes", {"gauge", 128}},
        {"shmalloc_cache_max_bytes", {"gauge", 64 << 20}},    {"shmalloc_cache_repairs_total", {"counter", 1}}};
    for (const auto& [name, want] : expected) {
      CAPTURE(name);
      CHECK(m.types.at(name) == want.first);
      CHECK(m.at(name + R"({cache="sessions"})") == want.second);
      CHECK(m.series.count(name + R"({cache="users"})") == 1);
    }
    CHECK(m.at(R"(shmalloc_cache_hits_total{cache="users"})") == 1);
    std::size_t cache_series = 0, cache_families = 0;
    for (const auto& [key, v] : m.series) cache_series += key.rfind("shmalloc_cache_", 0) == 0;
    for (const auto& [name, type] : m.types) cache_families += name.rfind("shmalloc_cache_", 0) == 0;
    CHECK(cache_families == expected.size());
    CHECK(cache_series == 2 * expected.size());  // sessions and users, nothing else
  }

  TEST_CASE("a daemon that cannot be sampled still reports its build") {
    const scrape m(render(heap_families(metrics_sample{}, build)));
    CHECK(m.series.size() == 1);
    CHECK(m.at(R"(shmalloc_build_info{revision="abcdef",version="1.2.3"})") == 1);
  }

  TEST_CASE("the process_* set describes this process") {
    const scrape m(render(process_collector{}.Collect()));
    CHECK(m.at("process_resident_memory_bytes") > 1e6);
    CHECK(m.at("process_virtual_memory_bytes") >= m.at("process_resident_memory_bytes"));
    CHECK(m.at("process_open_fds") >= 3);
    CHECK(m.at("process_max_fds") >= m.at("process_open_fds"));
    CHECK(m.at("process_cpu_seconds_total") >= 0);
    const double now = static_cast<double>(std::time(nullptr));
    CHECK(m.at("process_start_time_seconds") <= now + 1);
    CHECK(m.at("process_start_time_seconds") > now - 3600);
    CHECK(m.types.at("process_cpu_seconds_total") == "counter");
  }

  TEST_CASE("the HTTP endpoint serves /metrics, and a port in use is an error, not an abort") {
    auto collector = std::make_shared<heap_collector>([] { return metrics_sample{}; }, build);
    auto first = metrics_server::start("127.0.0.1:0", {collector});
    REQUIRE(first);
    const std::uint16_t port = first.value()->port();
    CHECK(port != 0);
    // Idle connections (anyone on the host may open them) take a worker
    // each; scrapes still get through.
    int idle[3];
    for (int& fd : idle) fd = shmalloc::test::tcp_connect(port);
    const auto t0 = std::chrono::steady_clock::now();
    const std::string response = shmalloc::test::http_get(port);
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2));
    for (int fd : idle) close(fd);
    CHECK(response.find("200 OK") != std::string::npos);
    CHECK(response.find(R"(shmalloc_build_info{revision="abcdef",version="1.2.3"} 1)") != std::string::npos);

    auto second = metrics_server::start("127.0.0.1:" + std::to_string(port), {collector});
    REQUIRE(!second);
    CHECK(second.code() == errc::os_error);
    CHECK(second.err().message.find("cannot serve metrics on 127.0.0.1:" + std::to_string(port)) == 0);
    CHECK(!metrics_server::start("203.0.113.7:0", {collector}));  // not an address of this host
  }

  TEST_CASE("shmalloc_client_live_bytes: the top clients only, labelled client, name and pid") {
    metrics_sample s;
    s.valid = true;
    for (std::uint32_t i = 1; i <= 12; ++i) s.top_clients.push_back({i, i == 2 ? 0 : 100 + i, "w\n" + std::to_string(i), 1000 * (13 - i)});
    const std::string text = render(heap_families(s, build));
    std::size_t series = 0;
    for (std::size_t at = text.find("\nshmalloc_client_live_bytes{"); at != std::string::npos;
         at = text.find("\nshmalloc_client_live_bytes{", at + 1))
      ++series;
    CHECK(series == max_client_series);
    CHECK(text.find(R"(shmalloc_client_live_bytes{client="1",name="w?1",pid="101"} 12000)") != std::string::npos);
    CHECK(text.find(R"(shmalloc_client_live_bytes{client="2",name="w?2",pid=""} 11000)") != std::string::npos);
    CHECK(text.find(R"(client="11")") == std::string::npos);
  }
}
