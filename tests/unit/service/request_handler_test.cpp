// The request handler without sockets (frames in, frames out), and the whole
// daemon in this process on a temp socket.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <atomic>
#include <thread>

#include "cache/census.hpp"
#include "cache/layout.hpp"
#include "service/daemon.hpp"
#include "service/request_handler.hpp"
#include "proto/control_client.hpp"
#include "shm/mspan.hpp"
#include "shm/profile.hpp"
#include "shm/verify.hpp"
#include "support/http_get.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;
using namespace shmalloc::service;
using proto::msg;

namespace {
struct answer {
  errc status;
  std::string message;
  std::vector<std::uint8_t> body;
  bool close;
};

answer ask(request_handler& rh, client_state& c, msg type, const std::vector<std::uint8_t>& body = {}) {
  const auto frame = proto::make_request(type, 7, body);
  const proto::frame_header h = proto::decode_header(frame.data());
  reply r = rh.handle(c, h, std::span<const std::uint8_t>(frame).subspan(proto::header_bytes));
  const proto::frame_header rh_header = proto::decode_header(r.frame.data());
  REQUIRE(rh_header.request_id == 7);
  auto parts = proto::split_reply(std::span<const std::uint8_t>(r.frame).subspan(proto::header_bytes));
  REQUIRE(parts);
  return {static_cast<errc>(rh_header.status), parts->message, {parts->body.begin(), parts->body.end()}, r.close};
}

// Returns the reattach token the welcome gave.
std::uint64_t say_hello(request_handler& rh, client_state& c, const std::string& name = "unit") {
  auto got = ask(rh, c, msg::hello, proto::encode(proto::hello_msg{layout_version, 1, name}));
  REQUIRE(got.status == errc::ok);
  auto w = proto::decode_welcome(got.body);
  REQUIRE(w);
  return w->reattach_token;
}

std::vector<std::uint32_t> refill(request_handler& rh, client_state& c, std::uint8_t spc, std::uint16_t n) {
  auto got = ask(rh, c, msg::refill, proto::encode(proto::refill_msg{spc, n}));
  REQUIRE(got.status == errc::ok);
  auto list = proto::decode_span_list(got.body, proto::max_refill);
  REQUIRE(list);
  return list->span_ids;
}

// Every proper prefix of a well-formed payload, and the payload with a byte
// more, must be refused.
template <class Decode>
void check_exact(const std::vector<std::uint8_t>& good, Decode decode) {
  REQUIRE(decode(good));
  for (std::size_t n = 0; n < good.size(); ++n) {
    CAPTURE(n);
    CHECK_FALSE(decode(std::span<const std::uint8_t>(good.data(), n)));
  }
  std::vector<std::uint8_t> longer = good;
  longer.push_back(0);
  CHECK_FALSE(decode(longer));
}

// A basic client row (the fields every client table has).
proto::client_row client_row(std::uint32_t id, std::uint32_t pid, std::string name, std::uint64_t bytes_held,
                             std::uint64_t objects_live, std::uint32_t spans, std::uint32_t large_objects,
                             std::uint64_t connected_unix_ns) {
  proto::client_row r;
  r.id = id;
  r.pid = pid;
  r.name = std::move(name);
  r.bytes_held = bytes_held;
  r.objects_live = objects_live;
  r.spans = spans;
  r.large_objects = large_objects;
  r.connected_unix_ns = connected_unix_ns;
  return r;
}

std::uint64_t unix_now_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// A heap object of at least bytes (a large object with no holder); its handle.
handle_t large_object(mheap& heap, std::uint64_t bytes) {
  auto id = heap.alloc_large(bytes, true, 0);
  REQUIRE(id);
  return heap.view().handle_of(heap.view().span_base(heap.span(*id)));
}

// Names h in the segment's root table, as publish does.
void add_root(mheap& heap, const std::string& name, handle_t h) {
  auto* roots = heap.seg().at<root_entry>(heap.seg().regions().roots.offset);
  for (std::uint32_t i = 0; i < max_roots; ++i) {
    if (roots[i].handle != 0) continue;
    std::memset(roots[i].name, 0, sizeof roots[i].name);
    std::memcpy(roots[i].name, name.data(), std::min(name.size(), sizeof roots[i].name));
    roots[i].handle = h;
    return;
  }
  FAIL("every root is taken");
}

// A cache as the cache library leaves one (cache/layout.hpp), with no
// entries: only the header the daemon reads. The test plays the client
// that writes it; the daemon only reads caches.
cache_header& init_cache_header(const segment& seg, handle_t h, const std::string& name, std::uint64_t max_bytes) {
  auto* c = seg.at<cache_header>(h);
  std::memset(static_cast<void*>(c), 0, sizeof *c);
  c->magic = cache_magic;
  c->layout_version = cache_layout_version;
  c->nshards = cache_shards;
  c->max_readers = cache_max_readers;
  c->max_bytes = max_bytes;
  c->buckets_per_shard = 64;
  std::memcpy(c->name, name.data(), std::min(name.size(), sizeof c->name - 1));
  c->epoch.store(1);
  return *c;
}

// The same in a large object of the heap, named by its root.
cache_header& fake_cache(mheap& heap, const std::string& name, std::uint64_t max_bytes, handle_t* where = nullptr) {
  const handle_t h = large_object(heap, sizeof(cache_header));
  cache_header& c = init_cache_header(heap.seg(), h, name, max_bytes);
  add_root(heap, cache_root_prefix + name, h);
  if (where != nullptr) *where = h;
  return c;
}

// Counters spread over shards and reader slots, as many threads would leave them.
void fill_counters(cache_header& c) {
  cache_shard& first = c.shards[0];
  cache_shard& last = c.shards[cache_shards - 1];
  first.items.store(3);
  last.items.store(2);
  first.bytes.store(3 * 128);
  last.bytes.store(2 * 256);
  last.retired_items.store(1);
  last.retired_bytes.store(4096);
  first.puts.store(10);
  last.puts.store(7);
  first.erases.store(2);
  first.evictions.store(4);
  last.evictions.store(1);
  last.expirations.store(6);
  first.repairs.store(1);
  c.readers_used.store(3);
  c.readers[0].hits.store(40);
  c.readers[2].hits.store(2);
  c.readers[1].misses.store(8);
  c.readers[3].hits.store(1000);  // past readers_used: never claimed, not counted
}
}  // namespace

TEST_SUITE("control_protocol hello") {
  TEST_CASE("a hello round-trips with and without where the client runs, and one from before is unchanged") {
    const proto::hello_msg old{layout_version, 77, "worker"};
    const auto old_bytes = proto::encode(old);
    CHECK(old_bytes.size() == 4 + 4 + 2 + 6);  // layout_version, pid, name: as the first protocol
    auto back = proto::decode_hello(old_bytes);
    REQUIRE(back);
    CHECK(back->pid == 77);
    CHECK(back->name == "worker");
    CHECK(back->host.empty());
    CHECK(back->container.empty());

    const proto::hello_msg m{layout_version, 1, "worker", "web-1", "3f2a9c1b0d4e"};
    const auto bytes = proto::encode(m);
    CHECK(bytes.size() == old_bytes.size() + 2 + 5 + 2 + 12);
    back = proto::decode_hello(bytes);
    REQUIRE(back);
    CHECK(back->layout_version == layout_version);
    CHECK(back->pid == 1);
    CHECK(back->name == "worker");
    CHECK(back->host == "web-1");
    CHECK(back->container == "3f2a9c1b0d4e");
    // Every prefix is refused but the one that ends after the name.
    for (std::size_t n = 0; n < bytes.size(); ++n) {
      CAPTURE(n);
      CHECK(static_cast<bool>(proto::decode_hello(std::span<const std::uint8_t>(bytes.data(), n))) ==
            (n == old_bytes.size()));
    }
    std::vector<std::uint8_t> longer = bytes;
    longer.push_back(0);
    CHECK_FALSE(proto::decode_hello(longer));

    // A host alone still sends both (the container empty); so does a container alone.
    back = proto::decode_hello(proto::encode(proto::hello_msg{layout_version, 1, "w", "web-1"}));
    REQUIRE(back);
    CHECK(back->host == "web-1");
    CHECK(back->container.empty());
    back = proto::decode_hello(proto::encode(proto::hello_msg{layout_version, 1, "w", "", "3f2a9c1b0d4e"}));
    REQUIRE(back);
    CHECK(back->host.empty());
    CHECK(back->container == "3f2a9c1b0d4e");
  }

  TEST_CASE("a hello whose host or container is too long or not printable is refused") {
    auto refused = [](const std::string& host, const std::string& container) {
      return !proto::decode_hello(proto::encode(proto::hello_msg{layout_version, 1, "w", host, container}));
    };
    CHECK_FALSE(refused(std::string(proto::max_host, 'h'), std::string(proto::max_container, 'c')));
    CHECK(refused(std::string(proto::max_host + 1, 'h'), ""));
    CHECK(refused("", std::string(proto::max_container + 1, 'c')));
    CHECK(refused(std::string(4000, 'h'), ""));
    for (const char* bad : {"web 1", "web\t1", "web\n1", "web\x7f", "web\x01", "caf\xc3\xa9"}) {
      CAPTURE(bad);
      CHECK(refused(bad, ""));
      CHECK(refused("", bad));
    }
    // A host with no container after it.
    proto::writer w;
    w.u32(layout_version).u32(1).str("w").str("web-1");
    CHECK_FALSE(proto::decode_hello(w.bytes()));
  }

  TEST_CASE("identity_text makes any hostname fit a hello") {
    CHECK(proto::identity_text("web-1.example", proto::max_host) == "web-1.example");
    CHECK(proto::identity_text("web 1\n\x01\xc3", proto::max_host) == "web?1???");
    CHECK(proto::identity_text(std::string(300, 'h'), proto::max_host) == std::string(proto::max_host, 'h'));
    CHECK(proto::valid_identity(proto::identity_text("a b\xff", 2), 2));
    CHECK(proto::valid_identity("", 0));
    CHECK_FALSE(proto::valid_identity("abc", 2));
  }

  TEST_CASE("the container id is found in the cgroup paths of docker, containerd, CRI-O and podman, and only there") {
    const std::string id = "3f2a9c1b0d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5061728394a5b6c7d8e";
    REQUIRE(id.size() == 64);
    const std::string short_id = id.substr(0, 12);
    // docker on cgroup v1
    CHECK(proto::container_from_cgroup("12:pids:/docker/" + id + "\n11:memory:/docker/" + id + "\n0::/\n") == short_id);
    // cgroup v2, the systemd driver, with the host's cgroup namespace
    CHECK(proto::container_from_cgroup("0::/system.slice/docker-" + id + ".scope\n") == short_id);
    // cgroup v2, the cgroupfs driver
    CHECK(proto::container_from_cgroup("0::/docker/" + id) == short_id);
    // a container's own cgroup below its scope (nested, or systemd inside)
    CHECK(proto::container_from_cgroup("0::/system.slice/docker-" + id + ".scope/init.scope\n") == short_id);
    // Kubernetes (containerd, CRI-O) and podman
    CHECK(proto::container_from_cgroup("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c.slice/"
                                       "cri-containerd-" + id + ".scope\n") == short_id);
    CHECK(proto::container_from_cgroup("11:memory:/kubepods/burstable/pod0d1e2f3a-aaaa-bbbb-cccc-0123456789ab/" + id) ==
          short_id);
    CHECK(proto::container_from_cgroup("0::/machine.slice/libpod-" + id + ".scope") == short_id);
    CHECK(proto::container_from_cgroup("0::/crio-" + id + ".scope") == short_id);
    // Not in a container, or a private cgroup namespace: nothing to find.
    CHECK(proto::container_from_cgroup("0::/\n").empty());
    CHECK(proto::container_from_cgroup("0::/user.slice/user-0.slice/session-3.scope\n").empty());
    CHECK(proto::container_from_cgroup("0::/system.slice/docker.service\n").empty());
    CHECK(proto::container_from_cgroup("4:memory:/process_api/8a6363c918454cc6e612e42c10993205\n").empty());  // 32 digits
    CHECK(proto::container_from_cgroup("0::/docker/" + id.substr(1)).empty());  // 63
    CHECK(proto::container_from_cgroup("0::/docker/" + id + "0").empty());      // 65
    std::string upper = id;
    upper[0] = 'F';
    CHECK(proto::container_from_cgroup("0::/docker/" + upper).empty());
    CHECK(proto::container_from_cgroup("").empty());
    CHECK(proto::container_from_cgroup("garbage without colons " + id).empty());
  }

  TEST_CASE("the container id is found in the runtime's mount of /etc/hostname, and not in the host's mount table") {
    const std::string id = "3f2a9c1b0d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5061728394a5b6c7d8e";
    const std::string short_id = id.substr(0, 12);
    const std::string docker =
        "612 590 0:52 / / rw,relatime master:263 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/X\n"
        "631 612 8:1 /var/lib/docker/containers/" + id + "/resolv.conf /etc/resolv.conf rw,relatime - ext4 /dev/sda1 rw\n"
        "632 612 8:1 /var/lib/docker/containers/" + id + "/hostname /etc/hostname rw,relatime - ext4 /dev/sda1 rw\n";
    CHECK(proto::container_from_mountinfo(docker) == short_id);
    // /var/lib/docker on a file system of its own: the root is relative to it.
    CHECK(proto::container_from_mountinfo("700 612 8:17 /containers/" + id + "/hostname /etc/hostname rw - ext4 /dev/sdb rw\n") ==
          short_id);
    // podman
    CHECK(proto::container_from_mountinfo("900 880 0:30 /containers/storage/overlay-containers/" + id +
                                          "/userdata/hostname /etc/hostname rw - tmpfs tmpfs rw\n") == short_id);
    // The host's table names every container's /dev/shm, at other mount points.
    CHECK(proto::container_from_mountinfo("300 25 0:60 / /var/lib/docker/containers/" + id +
                                          "/mounts/shm rw,nosuid - tmpfs shm rw,size=65536k\n"
                                          "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
              .empty());
    CHECK(proto::container_from_mountinfo("632 612 8:1 /etc/hostname /etc/hostname rw - ext4 /dev/sda1 rw\n").empty());
    CHECK(proto::container_from_mountinfo("632 612 8:1 /containers/" + id.substr(1) + "/hostname /etc/hostname rw\n").empty());
    CHECK(proto::container_from_mountinfo("632 612").empty());
    CHECK(proto::container_from_mountinfo("").empty());
  }
}

TEST_SUITE("control_protocol reports") {
  TEST_CASE("a class table round-trips and is refused when short, long, unordered or inconsistent") {
    proto::class_table_msg m;
    m.rows.push_back({2, 16, 1, 2, 3, 40, 3 * 8192, 100, 50, 10});
    m.rows.push_back({67, 32768, 0, 0, 1, 1, 32768, 0, 7, 6});
    const auto bytes = proto::encode(m);
    CHECK(bytes.size() == 2 + 2 * 57);
    auto back = proto::decode_class_table(bytes);
    REQUIRE(back);
    REQUIRE(back->rows.size() == 2);
    const proto::class_row& r = back->rows[0];
    CHECK(r.size_class == 2);
    CHECK(r.object_size == 16);
    CHECK(r.spans_partial == 1);
    CHECK(r.spans_full == 2);
    CHECK(r.spans_cached == 3);
    CHECK(r.objects_live == 40);
    CHECK(r.bytes_in_use == 3 * 8192);
    CHECK(r.bytes_wasted == 100);
    CHECK(r.mallocs == 50);
    CHECK(r.frees == 10);
    CHECK(back->rows[1].size_class == 67);
    check_exact(bytes, [](std::span<const std::uint8_t> p) { return proto::decode_class_table(p); });
    CHECK(proto::decode_class_table(proto::encode(proto::class_table_msg{})));  // no rows is fine

    auto refused = [](proto::class_table_msg bad) { return !proto::decode_class_table(proto::encode(bad)); };
    CHECK(refused({{m.rows[1], m.rows[0]}}));  // out of order
    CHECK(refused({{m.rows[0], m.rows[0]}}));  // repeated
    auto row = m.rows[0];
    row.size_class = 0;
    CHECK(refused({{row}}));
    row.size_class = 68;
    CHECK(refused({{row}}));
    row = m.rows[0];
    row.object_size = 32769;
    CHECK(refused({{row}}));
    row = m.rows[0];
    row.bytes_wasted = row.bytes_in_use + 1;
    CHECK(refused({{row}}));
    row = m.rows[0];
    row.objects_live = row.mallocs + 1;
    CHECK(refused({{row}}));
    proto::class_table_msg too_many;
    for (std::uint8_t c = 1; c <= 68; ++c) too_many.rows.push_back({c, 8, 0, 0, 0, 0, 0, 0, 0, 0});
    CHECK(refused(too_many));
    too_many.rows.pop_back();
    CHECK_FALSE(refused(too_many));  // all 67 classes
  }

  TEST_CASE("a client table round-trips and is refused when short, long, or out of range") {
    proto::client_table_msg m;
    m.total = 3;
    m.rows.push_back(client_row(4, 1234, "worker", 65536, 12, 3, 1, 1'700'000'000'000'000'000ULL));
    m.rows.push_back(client_row(9, 99, std::string(proto::max_name, 'n'), 0, 0, 0, 0, 5));
    const auto bytes = proto::encode(m);
    CHECK(bytes.size() == proto::client_table_header_bytes + proto::encoded_size(m.rows[0]) + proto::encoded_size(m.rows[1]));
    auto back = proto::decode_client_table(bytes);
    REQUIRE(back);
    CHECK(back->total == 3);
    REQUIRE(back->rows.size() == 2);
    const proto::client_row& r = back->rows[0];
    CHECK(r.id == 4);
    CHECK(r.pid == 1234);
    CHECK(r.name == "worker");
    CHECK(r.bytes_held == 65536);
    CHECK(r.objects_live == 12);
    CHECK(r.spans == 3);
    CHECK(r.large_objects == 1);
    CHECK(r.connected_unix_ns == 1'700'000'000'000'000'000ULL);
    CHECK(back->rows[1].name == m.rows[1].name);
    check_exact(bytes, [](std::span<const std::uint8_t> p) { return proto::decode_client_table(p); });

    auto refused = [](std::uint32_t total, std::vector<proto::client_row> rows) {
      return !proto::decode_client_table(proto::encode(proto::client_table_msg{total, std::move(rows)}));
    };
    CHECK(refused(1, m.rows));                    // more rows than clients
    CHECK(refused(3, {m.rows[1], m.rows[0]}));    // ids out of order
    CHECK(refused(3, {m.rows[0], m.rows[0]}));    // repeated
    auto row = m.rows[0];
    row.id = 0;
    CHECK(refused(3, {row}));
    row = m.rows[0];
    row.name = std::string(proto::max_name + 1, 'n');
    CHECK(refused(3, {row}));
    // A count that promises more rows than the bytes hold.
    proto::writer w;
    w.u32(60000).u16(60000);
    CHECK_FALSE(proto::decode_client_table(w.bytes()));
  }

  TEST_CASE("a client table of identity rows round-trips, and each format is refused as the other") {
    proto::client_table_msg m;
    m.total = 2;
    m.format = proto::client_rows::identity;
    m.rows.push_back(client_row(4, 0, "worker", 65536, 12, 3, 1, 5));
    m.rows[0].pid_in_client = 1;
    m.rows[0].host = "web-1";
    m.rows[0].container = "3f2a9c1b0d4e";
    m.rows.push_back(client_row(9, 99, "old", 0, 0, 0, 0, 6));  // a client that did not say where it runs
    m.rows[1].pid_in_client = 99;
    const auto bytes = proto::encode(m);
    CHECK(bytes.size() == proto::client_table_header_bytes + proto::encoded_size(m.rows[0], m.format) +
                              proto::encoded_size(m.rows[1], m.format));
    CHECK(proto::encoded_size(m.rows[1], m.format) == proto::encoded_size(m.rows[1]) + 8);
    auto back = proto::decode_client_table(bytes, proto::client_rows::identity);
    REQUIRE(back);
    REQUIRE(back->rows.size() == 2);
    CHECK(back->format == proto::client_rows::identity);
    CHECK(back->rows[0].pid == 0);
    CHECK(back->rows[0].pid_in_client == 1);
    CHECK(back->rows[0].name == "worker");
    CHECK(back->rows[0].host == "web-1");
    CHECK(back->rows[0].container == "3f2a9c1b0d4e");
    CHECK(back->rows[0].connected_unix_ns == 5);
    CHECK(back->rows[1].pid_in_client == 99);
    CHECK(back->rows[1].host.empty());
    CHECK(back->rows[1].container.empty());
    check_exact(bytes, [](std::span<const std::uint8_t> p) {
      return proto::decode_client_table(p, proto::client_rows::identity);
    });
    CHECK_FALSE(proto::decode_client_table(bytes));  // not basic rows
    proto::client_table_msg basic = m;
    basic.format = proto::client_rows::basic;
    CHECK_FALSE(proto::decode_client_table(proto::encode(basic), proto::client_rows::identity));

    auto refused = [&m](auto change) {
      proto::client_table_msg bad = m;
      change(bad.rows[0]);
      return !proto::decode_client_table(proto::encode(bad), proto::client_rows::identity);
    };
    CHECK(refused([](auto& r) { r.host = std::string(proto::max_host + 1, 'h'); }));
    CHECK(refused([](auto& r) { r.container = std::string(proto::max_container + 1, 'c'); }));
    CHECK(refused([](auto& r) { r.host = "web 1"; }));
    CHECK(refused([](auto& r) { r.container = "ab\ncd"; }));
    CHECK_FALSE(refused([](auto& r) { r.host = std::string(proto::max_host, 'h'); }));
  }

  TEST_CASE("a clients request is empty or names its row format") {
    using proto::client_rows;
    CHECK(proto::encode_clients_request(client_rows::basic).empty());  // as before the formats
    CHECK(proto::encode_clients_request(client_rows::identity) == std::vector<std::uint8_t>{1});
    CHECK(proto::decode_clients_request({}) == client_rows::basic);
    const std::vector<std::uint8_t> zero{0}, one{1}, two{2}, long_one{1, 0};
    CHECK(proto::decode_clients_request(zero) == client_rows::basic);
    CHECK(proto::decode_clients_request(one) == client_rows::identity);
    CHECK_FALSE(proto::decode_clients_request(two));
    CHECK_FALSE(proto::decode_clients_request(long_one));
  }

  TEST_CASE("a page table round-trips and is refused unless its pages add up") {
    proto::page_table_msg m;
    m.page_size = 8192;
    m.pages_capacity = 32768;
    m.pages_committed = 512;
    m.pages_in_use = 20;
    m.pages_free = 400;
    m.pages_released = 92;
    m.runs_in_use = 2;
    m.runs_free = 2;
    m.runs_released = 1;
    m.largest_free_run_pages = 300;
    m.spans_in_use = 5;
    m.large_spans = 1;
    const auto bytes = proto::encode(m);
    CHECK(bytes.size() == 2 + 12 * 8);
    auto back = proto::decode_page_table(bytes);
    REQUIRE(back);
#define SHMALLOC_X(name) CHECK(back->name == m.name);
    SHMALLOC_PROTO_PAGES(SHMALLOC_X)
#undef SHMALLOC_X
    check_exact(bytes, [](std::span<const std::uint8_t> p) { return proto::decode_page_table(p); });

    auto refused = [&m](auto change) {
      proto::page_table_msg bad = m;
      change(bad);
      return !proto::decode_page_table(proto::encode(bad));
    };
    CHECK(refused([](auto& b) { b.pages_free += 1; }));
    CHECK(refused([](auto& b) { b.pages_capacity = 511; }));
    CHECK(refused([](auto& b) { b.page_size = 0; }));
    CHECK(refused([](auto& b) { b.largest_free_run_pages = 493; }));
    CHECK(refused([](auto& b) { b.large_spans = 6; }));
    // Parts that wrap around to the right sum.
    CHECK(refused([](auto& b) {
      b.pages_in_use = ~std::uint64_t{0};
      b.pages_free = 421;
    }));
    CHECK_FALSE(refused([](auto& b) { b.largest_free_run_pages = 492; }));
    // A stats reply is not a page table, nor the other way round.
    CHECK_FALSE(proto::decode_page_table(proto::encode(proto::stats_msg{})));
    CHECK_FALSE(proto::decode_stats(bytes));
  }

  TEST_CASE("a cache table round-trips and is refused when short, long, unordered or badly named") {
    proto::cache_table_msg m;
    m.total = 3;
    proto::cache_row a;
    a.name = "sessions";
    std::uint64_t v = 0;
#define SHMALLOC_X(name) a.name = 0x0102030405060708ULL + v++;  // every byte set, each counter its own
    SHMALLOC_PROTO_CACHE(SHMALLOC_X)
#undef SHMALLOC_X
    proto::cache_row b;
    b.name = std::string(proto::max_cache_name, 'z');
    b.hits = 5;
    m.rows = {a, b};
    const auto bytes = proto::encode(m);
    CHECK(bytes.size() == proto::cache_table_header_bytes + proto::encoded_size(a) + proto::encoded_size(b));
    CHECK(proto::cache_row_fixed_bytes == 2 + 13 * 8);
    auto back = proto::decode_cache_table(bytes);
    REQUIRE(back);
    CHECK(back->total == 3);
    REQUIRE(back->rows.size() == 2);
    CHECK(back->rows[0].name == "sessions");
#define SHMALLOC_X(name) CHECK(back->rows[0].name == a.name);
    SHMALLOC_PROTO_CACHE(SHMALLOC_X)
#undef SHMALLOC_X
    CHECK(back->rows[1].name == b.name);
    CHECK(back->rows[1].hits == 5);
    check_exact(bytes, [](std::span<const std::uint8_t> p) { return proto::decode_cache_table(p); });
    CHECK(proto::decode_cache_table(proto::encode(proto::cache_table_msg{})));  // no caches is fine

    auto refused = [](proto::cache_table_msg bad) { return !proto::decode_cache_table(proto::encode(bad)); };
    CHECK(refused({1, {a, b}}));  // more rows than caches
    CHECK(refused({3, {b, a}}));  // out of order
    CHECK(refused({3, {a, a}}));  // repeated
    proto::cache_row bad = a;
    bad.name = "";
    CHECK(refused({3, {bad}}));
    bad.name = std::string(proto::max_cache_name + 1, 'n');
    CHECK(refused({3, {bad}}));
    proto::writer w;  // a count that promises more rows than the bytes hold
    w.u32(60000).u16(60000);
    CHECK_FALSE(proto::decode_cache_table(w.bytes()));
  }

  TEST_CASE("a stats reply carries the MemStats values and the metrics port") {
    proto::stats_msg m;
    m.heap_alloc_bytes = 1;
    m.heap_unused_bytes = 2;
    m.heap_objects = 3;
    m.mallocs_total = 4;
    m.frees_total = 5;
    m.metrics_port = 9464;
    const auto bytes = proto::encode(m);
    auto back = proto::decode_stats(bytes);
    REQUIRE(back);
#define SHMALLOC_X(name) CHECK(back->name == m.name);
    SHMALLOC_PROTO_STATS(SHMALLOC_X)
#undef SHMALLOC_X
    check_exact(bytes, [](std::span<const std::uint8_t> p) { return proto::decode_stats(p); });
  }
}

TEST_SUITE("request_handler") {
  TEST_CASE("the client table reads a span's alloc bits while its holder changes them (atomics on both sides, for TSan)") {
    // One mapping for the holder's writes and the handler's reads, so that
    // ThreadSanitizer sees both (across processes it sees neither).
    test::test_heap t;
    request_handler rh(*t.heap, {});
    client_state holder, observer;
    say_hello(rh, holder);
    const auto ids = refill(rh, holder, span_class::make(5, false).value, 2);
    mspan& span = t.heap->span(span_id{ids.at(0)});
    std::atomic<bool> done{false};
    std::thread writer([&] {  // as the holding thread's fast paths do
      for (std::uint64_t i = 0; !done.load(); ++i) {
        set_alloc_bits(span.alloc_bits[0], std::uint64_t{1} << (i % 64));
        clear_alloc_bits(span.alloc_bits[0], std::uint64_t{1} << ((i + 32) % 64));
      }
    });
    int tables = 0;
    for (int i = 0; i < 200; ++i)
      tables += ask(rh, observer, msg::clients, proto::encode_clients_request(proto::client_rows::basic)).status == errc::ok;
    done = true;
    writer.join();
    CHECK(tables == 200);
  }

  TEST_CASE("refill records ownership, release checks it, disconnect takes back the rest") {
    test::test_heap t;
    request_handler rh(*t.heap, {});
    client_state a, b;
    say_hello(rh, a);
    say_hello(rh, b);
    CHECK(a.id != b.id);
    auto got = ask(rh, a, msg::refill, proto::encode(proto::refill_msg{span_class::make(7, false).value, 5}));
    REQUIRE(got.status == errc::ok);
    auto list = proto::decode_span_list(got.body, proto::max_refill);
    REQUIRE(list);
    CHECK(list->span_ids.size() == 5);
    CHECK(a.spans.size() == 5);
    CHECK(a.bytes_held == 5 * class_span_bytes(7));
    // b cannot release a's span.
    CHECK(ask(rh, b, msg::release, proto::encode(proto::span_list_msg{{list->span_ids[0]}})).status == errc::bad_handle);
    CHECK(ask(rh, a, msg::release, proto::encode(proto::span_list_msg{{list->span_ids[0]}})).status == errc::ok);
    CHECK(a.spans.size() == 4);
    rh.disconnect(a);
    CHECK(rh.clients() == 1);
    CHECK(t.heap->accounts().reclaimed_bytes_total.load() == 4 * class_span_bytes(7));
    CHECK(t.heap->central(span_class::make(7, false)).state().cached_count == 0);
    const verify_report r = verify_heap(*t.heap);
    CHECK_MESSAGE(r.ok(), r.summary());
  }

  TEST_CASE("a release that names a span twice is refused whole, and the client's bytes stay right") {
    test::test_heap t;
    request_handler rh(*t.heap, {});
    client_state a;
    say_hello(rh, a);
    const auto ids = refill(rh, a, span_class::make(7, false).value, 3);
    REQUIRE(ids.size() == 3);
    const std::uint64_t held = a.bytes_held;
    auto twice = ask(rh, a, msg::release, proto::encode(proto::span_list_msg{{ids[0], ids[1], ids[0]}}));
    CHECK(twice.status == errc::bad_handle);
    CHECK(twice.message.find("twice") != std::string::npos);
    CHECK(a.bytes_held == held);  // nothing released: not even ids[1]
    CHECK(a.spans.size() == 3);
    CHECK(ask(rh, a, msg::release, proto::encode(proto::span_list_msg{{ids[0], ids[1]}})).status == errc::ok);
    CHECK(a.bytes_held == held - 2 * class_span_bytes(7));
    CHECK(a.spans.size() == 1);
    rh.disconnect(a);
    const verify_report r = verify_heap(*t.heap);
    CHECK_MESSAGE(r.ok(), r.summary());
  }

  TEST_CASE("an orphaned large object freed after a restart leaves its group, and its reused span stays with its new holder") {
    test::test_heap t;
    std::uint32_t old_id = 0;
    std::uint64_t token = 0;
    proto::large_msg orphan{};
    {
      request_handler before(*t.heap, {});  // the daemon that dies with a client holding a large object
      client_state x;
      token = say_hello(before, x);
      old_id = x.id;
      auto got = ask(before, x, msg::alloc_large, proto::encode(proto::alloc_large_msg{100'000, false}));
      REQUIRE(got.status == errc::ok);
      orphan = *proto::decode_large(got.body);
    }
    request_handler rh(*t.heap, {});  // the next daemon
    rh.adopt_orphans();
    CHECK(rh.orphan_groups() == 1);
    client_state y, x2;
    say_hello(rh, y);
    REQUIRE(ask(rh, y, msg::free_large, proto::encode(proto::free_large_msg{orphan.handle})).status == errc::ok);
    CHECK(rh.orphan_groups() == 1);  // its cache slot still waits for the client
    // The descriptor is reused for y's next large object.
    auto again = ask(rh, y, msg::alloc_large, proto::encode(proto::alloc_large_msg{100'000, false}));
    REQUIRE(again.status == errc::ok);
    const proto::large_msg mine = *proto::decode_large(again.body);
    const std::uint64_t held = y.bytes_held;
    // The old client comes back and claims what it held: nothing is left.
    say_hello(rh, x2);
    auto claim = ask(rh, x2, msg::reattach, proto::encode(proto::reattach_msg{old_id, token, {orphan.span_id}}));
    CHECK(claim.status == errc::ok);
    CHECK(proto::decode_span_list(claim.body, proto::max_release, 0)->span_ids.empty());  // nothing taken
    CHECK(x2.extra_slots.size() == 1);  // but its cache slot passed over
    CHECK(x2.large.empty());
    CHECK(x2.bytes_held == 0);
    CHECK(t.heap->span(span_id{mine.span_id}).owner_client == y.id);
    rh.expire_orphans(0);
    CHECK(t.heap->span(span_id{mine.span_id}).owner_client == y.id);
    CHECK(y.bytes_held == held);
    REQUIRE(ask(rh, y, msg::free_large, proto::encode(proto::free_large_msg{mine.handle})).status == errc::ok);
    CHECK(y.bytes_held == held - 100'000 / page_size * page_size - page_size);
    rh.disconnect(y);
    rh.disconnect(x2);
    const verify_report r = verify_heap(*t.heap);
    CHECK_MESSAGE(r.ok(), r.summary());
  }

  TEST_CASE("a client holds at most max-caches-per-client cache slots, and others still get theirs") {
    test::test_heap t;
    handler_settings settings;
    settings.max_caches_per_client = 3;
    request_handler rh(*t.heap, settings);
    client_state greedy, other;
    say_hello(rh, greedy);
    CHECK(ask(rh, greedy, msg::cache_open).status == errc::ok);
    auto second = ask(rh, greedy, msg::cache_open);
    REQUIRE(second.status == errc::ok);
    auto refused = ask(rh, greedy, msg::cache_open);  // its connection's slot and two threads'
    CHECK(refused.status == errc::quota_exceeded);
    CHECK(refused.message.find("max-caches-per-client") != std::string::npos);
    CHECK(greedy.extra_slots.size() == 2);
    say_hello(rh, other);
    CHECK(ask(rh, other, msg::cache_open).status == errc::ok);
    // A slot given back makes room again.
    const auto slot = proto::decode_slot(second.body);
    REQUIRE(slot);
    REQUIRE(ask(rh, greedy, msg::cache_close, proto::encode(*slot)).status == errc::ok);
    CHECK(ask(rh, greedy, msg::cache_open).status == errc::ok);
    rh.disconnect(greedy);
    rh.disconnect(other);
  }

  TEST_CASE("a reattach passes the old group's cache slots only within max-caches-per-client, and its spans always") {
    test::test_heap t;
    handler_settings settings;
    settings.max_caches_per_client = 3;
    std::uint32_t old_id = 0;
    std::uint64_t token = 0;
    std::vector<std::uint32_t> spans;
    {
      request_handler before(*t.heap, settings);  // the daemon that stops, keeping the heap
      client_state x;
      token = say_hello(before, x);
      old_id = x.id;
      REQUIRE(ask(before, x, msg::cache_open).status == errc::ok);
      REQUIRE(ask(before, x, msg::cache_open).status == errc::ok);  // three slots: the most it may hold
      spans = refill(before, x, span_class::make(5, false).value, 2);
      before.leave(x);
    }
    request_handler rh(*t.heap, settings);
    rh.adopt_orphans();
    client_state x2;
    say_hello(rh, x2);  // one slot of its own: three more would make four
    REQUIRE(rh.orphan_groups() == 1);
    const auto frame = proto::make_request(msg::reattach, 7, proto::encode(proto::reattach_msg{old_id, token, spans}));
    const reply r = rh.handle(x2, proto::decode_header(frame.data()),
                              std::span<const std::uint8_t>(frame).subspan(proto::header_bytes));
    CHECK(proto::decode_header(r.frame.data()).status == static_cast<std::uint32_t>(errc::ok));
    CHECK(r.shortfall == errc::quota_exceeded);
    CHECK(1 + x2.extra_slots.size() <= settings.max_caches_per_client);
    CHECK(x2.spans.size() == spans.size());  // the spans are the client's whatever its slots
    CHECK(rh.orphan_groups() == 1);           // the slots wait with the group, under the old id
    rh.disconnect(x2);
    rh.expire_orphans(0);
    CHECK(rh.orphan_groups() == 0);
    const verify_report v = verify_heap(*t.heap);
    CHECK_MESSAGE(v.ok(), v.summary());
  }

  TEST_CASE("a refill cut short by the quota hands over what it carved") {
    test::test_heap t;
    request_handler rh(*t.heap, {3 * page_size});
    client_state a;
    say_hello(rh, a);
    auto got = ask(rh, a, msg::refill, proto::encode(proto::refill_msg{span_class::make(7, false).value, 10}));
    REQUIRE(got.status == errc::ok);
    CHECK(proto::decode_span_list(got.body, proto::max_refill)->span_ids.size() == 3);
    auto none = ask(rh, a, msg::refill, proto::encode(proto::refill_msg{span_class::make(7, false).value, 1}));
    CHECK(none.status == errc::quota_exceeded);
    CHECK(none.message.find("quota") != std::string::npos);
  }

  TEST_CASE("hello's pid, host and container are the client's, beside the peer's pid, in identity rows only") {
    test::test_heap t;
    request_handler rh(*t.heap, {});
    client_state worker, old, observer;
    worker.pid = 0;  // SO_PEERCRED across PID namespaces
    REQUIRE(ask(rh, worker, msg::hello,
                proto::encode(proto::hello_msg{layout_version, 1, "worker", "web-1", "3f2a9c1b0d4e"}))
                .status == errc::ok);
    old.pid = 5150;  // a client from before: no host or container
    REQUIRE(ask(rh, old, msg::hello, proto::encode(proto::hello_msg{layout_version, 5150, "old"})).status == errc::ok);
    CHECK(worker.pid_in_client == 1);
    CHECK(worker.host == "web-1");
    CHECK(worker.container == "3f2a9c1b0d4e");

    auto got = ask(rh, observer, msg::clients, proto::encode_clients_request(proto::client_rows::identity));
    REQUIRE(got.status == errc::ok);
    auto table = proto::decode_client_table(got.body, proto::client_rows::identity);
    REQUIRE(table);
    REQUIRE(table->rows.size() == 2);
    const proto::client_row& w = table->rows[0];
    CHECK(w.id == worker.id);
    CHECK(w.pid == 0);
    CHECK(w.pid_in_client == 1);
    CHECK(w.name == "worker");
    CHECK(w.host == "web-1");
    CHECK(w.container == "3f2a9c1b0d4e");
    const proto::client_row& o = table->rows[1];
    CHECK(o.pid == 5150);
    CHECK(o.pid_in_client == 5150);
    CHECK(o.host.empty());
    CHECK(o.container.empty());
    // An empty request gets the rows of the first protocol, for shmallocctl builds from before.
    got = ask(rh, observer, msg::clients);
    REQUIRE(got.status == errc::ok);
    table = proto::decode_client_table(got.body);
    REQUIRE(table);
    CHECK(table->rows.size() == 2);
    CHECK(table->rows[0].name == "worker");
    // A format it does not know is refused, and the connection stays.
    got = ask(rh, observer, msg::clients, {2});
    CHECK(got.status == errc::protocol_error);
    CHECK_FALSE(got.close);

    CHECK(describe(worker) == "client " + std::to_string(worker.id) +
                                  " \"worker\" (pid unknown here: another PID namespace, pid 1 in its own, host web-1, "
                                  "container 3f2a9c1b0d4e)");
    CHECK(describe(old) == "client " + std::to_string(old.id) + " \"old\" (pid 5150)");
    client_state odd;
    odd.id = 3;
    odd.pid = 10;
    odd.pid_in_client = 10;
    odd.name = "a\x1b[2Jb";  // a terminal escape, from an untrusted client
    CHECK(describe(odd) == "client 3 \"a?[2Jb\" (pid 10)");
  }

  TEST_CASE("a hello with a malformed host or container is refused and registers nothing") {
    test::test_heap t;
    request_handler rh(*t.heap, {});
    client_state c;
    auto got = ask(rh, c, msg::hello, proto::encode(proto::hello_msg{layout_version, 1, "w", "web 1", ""}));
    CHECK(got.status == errc::protocol_error);
    CHECK(c.id == 0);
    got = ask(rh, c, msg::hello,
              proto::encode(proto::hello_msg{layout_version, 1, "w", "", std::string(proto::max_container + 1, 'c')}));
    CHECK(got.status == errc::protocol_error);
    CHECK(c.id == 0);
    CHECK(rh.clients() == 0);
    // The same client may then say a good hello.
    CHECK(ask(rh, c, msg::hello, proto::encode(proto::hello_msg{layout_version, 1, "w", "web-1", ""})).status == errc::ok);
    CHECK(c.host == "web-1");
  }

  TEST_CASE("bye closes, and every reply echoes the request id") {
    test::test_heap t;
    request_handler rh(*t.heap, {});
    client_state a;
    say_hello(rh, a);
    CHECK(ask(rh, a, msg::bye).close);
  }
}

TEST_SUITE("request_handler reports") {
  // One client holding spans and objects the test placed itself.
  struct census_fixture {
    static constexpr std::uint8_t cls = 5;  // 48-byte objects
    test::test_heap t;
    request_handler rh{*t.heap, {}};
    client_state a, observer;  // the observer never says hello
    std::vector<std::uint32_t> small, tiny;
    census_fixture() {
      say_hello(rh, a, "census");
      a.pid = 4242;  // the daemon takes it from the socket
      small = refill(rh, a, span_class::make(cls, false).value, 3);
      tiny = refill(rh, a, tiny_span_class, 1);
      for (int i = 0; i < 7; ++i) REQUIRE(span_alloc_object(t.heap->span(span_id{small[0]})) >= 0);
      REQUIRE(span_alloc_object(t.heap->span(span_id{tiny[0]})) >= 0);
      stats_block& st = t.heap->cache_slot(a.cache_slot).stats;
      bump(st.small_allocs[cls], std::uint64_t{9});
      bump(st.small_frees[cls], std::uint64_t{2});
      bump(st.small_allocs[tiny_size_class], std::uint64_t{1});
    }
  };

  TEST_CASE("the class table counts spans by state and objects by the statistics blocks") {
    census_fixture f;
    auto got = ask(f.rh, f.observer, msg::classes);
    REQUIRE(got.status == errc::ok);  // allowed before hello
    auto t = proto::decode_class_table(got.body);
    REQUIRE(t);
    REQUIRE(t->rows.size() == num_size_classes - 1);  // every class; shmallocctl filters
    const proto::class_row& r = t->rows[f.cls - 1];
    CHECK(r.size_class == f.cls);
    CHECK(r.object_size == 48);
    CHECK(r.spans_cached == 3);
    CHECK(r.spans_partial == 0);
    CHECK(r.mallocs == 9);
    CHECK(r.frees == 2);
    CHECK(r.objects_live == 7);
    CHECK(r.bytes_in_use == 3 * class_span_bytes(f.cls));
    CHECK(r.bytes_wasted == 3 * class_span_bytes(f.cls) - 7 * 48);
    CHECK(t->rows[tiny_size_class - 1].spans_cached == 1);
    CHECK(t->rows[tiny_size_class - 1].objects_live == 1);
    CHECK(t->rows[6].mallocs == 0);
    // Taken back: the span with objects waits on mcentral's partial list,
    // the two empty ones go back to mheap.
    f.rh.disconnect(f.a);
    t = proto::decode_class_table(ask(f.rh, f.observer, msg::classes).body);
    REQUIRE(t);
    CHECK(t->rows[f.cls - 1].spans_cached == 0);
    CHECK(t->rows[f.cls - 1].spans_partial == 1);
    CHECK(t->rows[f.cls - 1].bytes_in_use == class_span_bytes(f.cls));
    CHECK(t->rows[f.cls - 1].mallocs == 9);  // the retired slot's counters stay
  }

  TEST_CASE("the client table gives each client's pid, name, spans, objects and Unix time of hello") {
    census_fixture f;
    const std::uint64_t before = unix_now_ns();
    test::advance_fake_clock(5'000'000'000);  // hello was 5 s ago on mheap's clock
    auto got = ask(f.rh, f.observer, msg::clients);
    const std::uint64_t after = unix_now_ns();
    REQUIRE(got.status == errc::ok);
    auto t = proto::decode_client_table(got.body);
    REQUIRE(t);
    CHECK(t->total == 1);
    REQUIRE(t->rows.size() == 1);
    const proto::client_row r = t->rows[0];  // a copy: t is asked again below
    CHECK(r.id == f.a.id);
    CHECK(r.pid == 4242);
    CHECK(r.name == "census");
    CHECK(r.spans == 4);
    CHECK(r.large_objects == 0);
    CHECK(r.bytes_held == 3 * class_span_bytes(f.cls) + class_span_bytes(tiny_size_class));
    CHECK(r.objects_live == 7 + 1);  // not the tiny span's 32 counter blocks
    CHECK(r.connected_unix_ns >= before - 5'000'000'000);
    CHECK(r.connected_unix_ns <= after - 5'000'000'000);
    // A large object counts as one object and its pages.
    auto big = ask(f.rh, f.a, msg::alloc_large, proto::encode(proto::alloc_large_msg{40000, true}));
    REQUIRE(big.status == errc::ok);
    t = proto::decode_client_table(ask(f.rh, f.observer, msg::clients).body);
    REQUIRE(t);
    CHECK(t->rows[0].objects_live == 9);
    CHECK(t->rows[0].large_objects == 1);
    CHECK(t->rows[0].bytes_held == r.bytes_held + 5 * page_size);
  }

  // The site table's clock in these tests: a fixed "now" far from the
  // clock's origin. The real CLOCK_MONOTONIC starts near 0 at boot, so on a
  // machine up less than 700 s the stamps below would wrap around 0 (and
  // the eleven-minute-old sample read as new); and a fixed now makes every
  // age exact, however long a loaded machine takes between stamp and table.
  constexpr std::uint64_t sample_now_ns = 1'000'000 * 1'000'000'000ULL;  // about 11.6 days
  std::uint64_t sample_clock() noexcept { return sample_now_ns; }

  // A sampled allocation as a client makes one (client/profile.cpp): a large
  // object of client a's, its entry filled and published, allocated
  // `age_s` seconds before sample_clock's now.
  void sample_of(census_fixture& f, std::uint64_t size, std::uint64_t pc, std::uint64_t age_s) {
    auto got = ask(f.rh, f.a, msg::alloc_large, proto::encode(proto::alloc_large_msg{size, true}));
    REQUIRE(got.status == errc::ok);
    const auto large = proto::decode_large(got.body);
    REQUIRE(large);
    const heap_view& v = f.t.heap->view();
    profile_sample* e = profile_claim(v, large->handle);
    REQUIRE(e != nullptr);
    e->size.store(size);
    e->alloc_ns.store(sample_now_ns - age_s * 1'000'000'000);
    e->rate.store(4096);
    e->frames.store(2);
    e->pc[0].store(pc);
    e->vma[0].store(pc - 0x1000);
    e->pc[1].store(0x9999);
    e->vma[1].store(0x8999);
    profile_publish(v, *e, f.t.heap->span(span_id{large->span_id}), large->handle);
  }

  TEST_CASE("the site table groups live samples by holder and stack, scales them as pprof does, and ages them") {
    census_fixture f;
    f.rh.set_sample_clock(&sample_clock);
    sample_of(f, 100, 0x401000, 0);      // site 1: one young object of 112 bytes' class
    sample_of(f, 100, 0x401000, 120);    // and one two minutes old
    sample_of(f, 40000, 0x402000, 700);  // site 2: a large object, eleven minutes old
    auto got = ask(f.rh, f.observer, msg::leak_sites, proto::encode_leak_sites_request(0));
    REQUIRE(got.status == errc::ok);  // an observer may ask
    auto t = proto::decode_site_table(got.body);
    REQUIRE(t);
    CHECK(t->capacity == max_profile_samples);
    CHECK(t->live == 3);
    REQUIRE(t->rows.size() == 2);
    // Two 112-byte objects sampled at 4,096 bytes stand for 2 * 112 / (1 - e^(-112/4096)) bytes.
    const auto small_estimate = static_cast<std::uint64_t>(112 / (1 - std::exp(-112.0 / 4096)));
    const proto::site_row& big = t->rows[0];  // 40,000 bytes take 5 pages: nearly surely sampled, so about themselves
    CHECK(big.client == f.a.id);
    CHECK(big.pid == 4242);
    CHECK(big.samples == 1);
    CHECK(big.bytes == 40000);
    CHECK(big.estimated_bytes == static_cast<std::uint64_t>(5 * page_size / (1 - std::exp(-5.0 * page_size / 4096))));
    CHECK(big.estimated_bytes - 5 * page_size < 2);
    CHECK(big.aged_bytes[2] == big.estimated_bytes);  // older than 600 s
    REQUIRE(big.pc.size() == 2);
    CHECK(big.pc[0] == 0x402000);
    CHECK(big.vma[0] == 0x401000);
    const proto::site_row& small = t->rows[1];
    CHECK(small.samples == 2);
    CHECK(small.bytes == 200);
    CHECK(small.estimated_bytes == 2 * small_estimate);
    CHECK(small.oldest_ns == 120'000'000'000);
    CHECK(small.newest_ns == 0);
    CHECK(small.aged_bytes[0] == small_estimate);  // the old one is older than 10 s
    CHECK(small.aged_bytes[1] == small_estimate);  // and 60 s
    CHECK(small.aged_bytes[2] == 0);               // not 600 s
    // Only what is older than a minute.
    t = proto::decode_site_table(ask(f.rh, f.observer, msg::leak_sites, proto::encode_leak_sites_request(60'000'000'000)).body);
    REQUIRE(t);
    CHECK(t->live == 3);  // live counts every sample
    REQUIRE(t->rows.size() == 2);
    CHECK(t->rows[1].samples == 1);
    // A freed sample leaves the table: the client's free releases it first (free_large).
    auto freed = ask(f.rh, f.a, msg::free_large, proto::encode(proto::free_large_msg{f.t.heap->view().handle_of(
                                                     f.t.heap->view().span_base(f.t.heap->span(span_id{*f.a.large.rbegin()})))}));
    REQUIRE(freed.status == errc::ok);
    t = proto::decode_site_table(ask(f.rh, f.observer, msg::leak_sites, proto::encode_leak_sites_request(0)).body);
    REQUIRE(t);
    CHECK(t->live == 2);
    CHECK(proto::decode_site_table(ask(f.rh, f.observer, msg::leak_sites, {}).body) == std::nullopt);
    CHECK(ask(f.rh, f.observer, msg::leak_sites, {}).status == errc::protocol_error);
  }

  TEST_CASE("the client table stops at one frame and counts the rest") {
    test::test_heap t;
    request_handler rh(*t.heap, {});
    std::vector<client_state> clients(700);
    for (std::size_t i = 0; i < clients.size(); ++i) say_hello(rh, clients[i], std::string(proto::max_name - 4, 'c') + std::to_string(1000 + i));
    client_state observer;
    const auto frame = proto::make_request(msg::clients, 3);
    const reply r = rh.handle(observer, proto::decode_header(frame.data()), {});
    CHECK(r.frame.size() <= proto::header_bytes + proto::max_payload);
    auto parts = proto::split_reply(std::span<const std::uint8_t>(r.frame).subspan(proto::header_bytes));
    REQUIRE(parts);
    auto table = proto::decode_client_table(parts->body);
    REQUIRE(table);
    CHECK(table->total == 700);
    const std::size_t fit = (proto::max_reply_body - proto::client_table_header_bytes) / (proto::client_row_fixed_bytes + proto::max_name);
    CHECK(table->rows.size() == fit);
    CHECK(table->rows.front().id == clients.front().id);  // the lowest ids
    CHECK(table->rows.back().id == clients[fit - 1].id);
    // Identity rows take more: each the most host and container allow.
    for (client_state& c : clients) {
      c.host = std::string(proto::max_host, 'h');
      c.container = std::string(proto::max_container, 'c');
    }
    const proto::client_table_msg wide = rh.client_table(proto::client_rows::identity);
    CHECK(wide.total == 700);
    const std::size_t row = proto::client_row_fixed_bytes + proto::client_row_identity_fixed_bytes + proto::max_name +
                            proto::max_host + proto::max_container;
    CHECK(wide.rows.size() == (proto::max_reply_body - proto::client_table_header_bytes) / row);
    CHECK(proto::encode(wide).size() <= proto::max_reply_body);
    CHECK(proto::decode_client_table(proto::encode(wide), proto::client_rows::identity));
  }

  TEST_CASE("the page table and stats agree with the heap's census") {
    census_fixture f;
    f.rh.set_metrics_port(9464);
    auto pages = proto::decode_page_table(ask(f.rh, f.observer, msg::pages).body);
    REQUIRE(pages);
    const std::uint64_t in_use = 3 * class_to_npages(f.cls) + class_to_npages(tiny_size_class);
    CHECK(pages->page_size == page_size);
    CHECK(pages->pages_in_use == in_use);
    CHECK(pages->pages_committed == chunk_pages);
    CHECK(pages->pages_free == chunk_pages - in_use);
    CHECK(pages->pages_released == 0);
    CHECK(pages->runs_in_use == 1);
    CHECK(pages->runs_free == 1);
    CHECK(pages->largest_free_run_pages == chunk_pages - in_use);
    CHECK(pages->spans_in_use == 4);
    CHECK(pages->large_spans == 0);
    CHECK(pages->pages_capacity == f.t.seg->header().max_pages);

    auto s = proto::decode_stats(ask(f.rh, f.observer, msg::stats).body);
    REQUIRE(s);
    const std::uint64_t alloc = 7 * 48 + 1 * 16;
    CHECK(s->mallocs_total == 10);
    CHECK(s->frees_total == 2);
    CHECK(s->heap_objects == 8);
    CHECK(s->heap_alloc_bytes == alloc);
    CHECK(s->heap_inuse_bytes == in_use * page_size);
    CHECK(s->heap_unused_bytes == in_use * page_size - alloc);
    CHECK(s->metrics_port == 9464);
  }

  TEST_CASE("the reports take no body (clients at most its row format), and other requests before hello are still refused") {
    census_fixture f;
    for (msg m : {msg::stats, msg::classes, msg::pages, msg::caches}) {
      CAPTURE(static_cast<int>(m));
      auto got = ask(f.rh, f.observer, m, {1});
      CHECK(got.status == errc::protocol_error);
      CHECK(got.message.find("takes no body") != std::string::npos);
      CHECK_FALSE(got.close);
    }
    for (const std::vector<std::uint8_t>& body : {std::vector<std::uint8_t>{7}, std::vector<std::uint8_t>{1, 1}}) {
      auto got = ask(f.rh, f.observer, msg::clients, body);
      CHECK(got.status == errc::protocol_error);
      CHECK(got.message.find("malformed clients") != std::string::npos);
      CHECK_FALSE(got.close);
    }
    CHECK(ask(f.rh, f.observer, msg::refill, proto::encode(proto::refill_msg{10, 1})).status == errc::protocol_error);
    CHECK(f.observer.id == 0);
    CHECK(f.rh.clients() == 1);  // asking did not register the observer
  }
}

TEST_SUITE("cache census") {
  TEST_CASE("read_caches sums every shard and every claimed reader slot of each cache the roots name") {
    test::test_heap t;
    fill_counters(fake_cache(*t.heap, "sessions", 64ULL << 20));
    fake_cache(*t.heap, "empty", 1ULL << 20);
    const std::vector<cache_census> caches = read_caches(t.heap->seg());
    REQUIRE(caches.size() == 2);
    const cache_census& k = caches[0];  // root-table order
    CHECK(k.name == "sessions");
    CHECK(k.max_bytes == 64ULL << 20);
    CHECK(k.items == 5);
    CHECK(k.bytes == 3 * 128 + 2 * 256);
    CHECK(k.retired_items == 1);
    CHECK(k.retired_bytes == 4096);
    CHECK(k.puts == 17);
    CHECK(k.erases == 2);
    CHECK(k.evictions == 5);
    CHECK(k.expirations == 6);
    CHECK(k.repairs == 1);
    CHECK(k.readers == 3);
    CHECK(k.hits == 42);
    CHECK(k.misses == 8);
    CHECK(caches[1].name == "empty");
    CHECK(caches[1].max_bytes == 1ULL << 20);
    CHECK(caches[1].hits + caches[1].items + caches[1].readers == 0);
  }

  TEST_CASE("read_caches skips roots that are not caches, and trusts no count it reads") {
    test::test_heap t;
    handle_t real = 0;
    cache_header& c = fake_cache(*t.heap, "real", 1ULL << 20, &real);
    c.readers_used.store(1'000'000);  // past the table: only its 512 slots are read
    c.readers[cache_max_readers - 1].hits.store(9);
    add_root(*t.heap, "real", real);                      // not under "cache:"
    add_root(*t.heap, "cache:zeros", large_object(*t.heap, sizeof(cache_header)));  // no magic
    add_root(*t.heap, "cache:unaligned", real + 8);
    add_root(*t.heap, "cache:outside", t.heap->seg().size() - 64);
    add_root(*t.heap, "cache:metadata", t.heap->seg().regions().roots.offset);
    cache_header& old = fake_cache(*t.heap, "old-layout", 1ULL << 20);
    old.layout_version = cache_layout_version + 1;
    cache_header& odd = fake_cache(*t.heap, "odd-geometry", 1ULL << 20);
    odd.nshards = cache_shards / 2;
    const std::vector<cache_census> caches = read_caches(t.heap->seg());
    REQUIRE(caches.size() == 1);
    CHECK(caches[0].name == "real");
    CHECK(caches[0].readers == cache_max_readers);
    CHECK(caches[0].hits == 9);
  }
}

TEST_SUITE("request_handler reports") {
  TEST_CASE("the cache table gives every cache by name, to an observer that never said hello") {
    test::test_heap t;
    request_handler rh(*t.heap, {});
    fill_counters(fake_cache(*t.heap, "sessions", 64ULL << 20));
    fake_cache(*t.heap, "a-first", 2ULL << 20);
    add_root(*t.heap, "cache:junk", large_object(*t.heap, sizeof(cache_header)));
    client_state observer;
    auto got = ask(rh, observer, msg::caches);
    REQUIRE(got.status == errc::ok);
    auto table = proto::decode_cache_table(got.body);
    REQUIRE(table);
    CHECK(table->total == 2);
    REQUIRE(table->rows.size() == 2);
    CHECK(table->rows[0].name == "a-first");
    CHECK(table->rows[0].max_bytes == 2ULL << 20);
    const proto::cache_row& r = table->rows[1];
    CHECK(r.name == "sessions");
    const cache_census k = read_caches(t.heap->seg())[0];
#define SHMALLOC_X(name) CHECK(r.name == k.name);
    SHMALLOC_PROTO_CACHE(SHMALLOC_X)
#undef SHMALLOC_X
    CHECK(r.hits == 42);
    CHECK(r.misses == 8);
    CHECK(observer.id == 0);
    CHECK(rh.clients() == 0);
    // A heap with no cache: an empty table.
    test::test_heap bare;
    request_handler none(*bare.heap, {});
    table = proto::decode_cache_table(ask(none, observer, msg::caches).body);
    REQUIRE(table);
    CHECK(table->total == 0);
    CHECK(table->rows.empty());
  }

  TEST_CASE("the cache table stops at one frame and counts the rest, and shows a repeated name once") {
    test::test_heap t;
    handle_t h = 0;
    fake_cache(*t.heap, std::string(proto::max_cache_name, 'a'), 1ULL << 20, &h);
    // Every other root names the same header, each under a longest name.
    for (std::uint32_t i = 1; i < max_roots - 1; ++i) {
      const std::string n = std::to_string(1000 + i);
      add_root(*t.heap, cache_root_prefix + std::string(proto::max_cache_name - n.size(), 'c') + n, h);
    }
    add_root(*t.heap, cache_root_prefix + std::string(proto::max_cache_name, 'a'), h);  // a repeat
    request_handler rh(*t.heap, {});
    client_state observer;
    const auto frame = proto::make_request(msg::caches, 3);
    const reply r = rh.handle(observer, proto::decode_header(frame.data()), {});
    CHECK(r.frame.size() <= proto::header_bytes + proto::max_payload);
    auto parts = proto::split_reply(std::span<const std::uint8_t>(r.frame).subspan(proto::header_bytes));
    REQUIRE(parts);
    auto table = proto::decode_cache_table(parts->body);
    REQUIRE(table);
    CHECK(table->total == max_roots - 1);
    const std::size_t fit = (proto::max_reply_body - proto::cache_table_header_bytes) /
                            (proto::cache_row_fixed_bytes + proto::max_cache_name);
    CHECK(table->rows.size() == fit);
    CHECK(table->rows.front().name == std::string(proto::max_cache_name, 'a'));  // the first names
    CHECK(table->rows.back().name.ends_with(std::to_string(1000 + fit - 1)));
  }
}

namespace {
// Settings for a daemon run inside the test: a unique heap, a socket in a
// fresh temp dir (returned in dir, for the test to remove).
daemon_settings inproc_settings(const char* name, const char* metrics, std::string& dir) {
  daemon_settings s;
  s.heap.name = test::unique_heap_name(name);
  s.heap.capacity = 64ULL << 20;
  char tmpl[] = "/tmp/shmalloc-test-XXXXXX";
  dir = mkdtemp(tmpl);
  s.socket_path = dir + "/d.sock";
  s.metrics = metrics;
  return s;
}
}  // namespace

TEST_SUITE("daemon in process") {
  TEST_CASE("the daemon runs on a thread of the test, serves, and stops cleanly") {
    std::string dir;
    // Tests run in parallel: never the default port.
    const daemon_settings s = inproc_settings("inproc", "127.0.0.1:0", dir);
    auto d = daemon::open(s);
    REQUIRE(d);
    CHECK(d.value()->metrics_port() != 0);
    std::thread runner([&d] { d.value()->run(); });
    {
      control_client c(s.socket_path);
      REQUIRE(c.connected());
      auto w = c.hello("inproc");
      REQUIRE(w);
      CHECK(w->heap_name == s.heap.name);
      auto spans = c.request(msg::refill, proto::encode(proto::refill_msg{span_class::make(3, true).value, 2}));
      CHECK(spans);
      // A scrape on the HTTP thread while the daemon serves on its own
      // (under TSan: the heap lock keeps the two apart).
      const std::string scrape = test::http_get(d.value()->metrics_port());
      CHECK(scrape.find("\nshmalloc_clients 1\n") != std::string::npos);
      CHECK(scrape.find("shmalloc_size_class_spans{size_class=\"24\",state=\"cached\"} 2") != std::string::npos);
      CHECK(scrape.find("shmalloc_control_requests_total{op=\"refill\"} 1") != std::string::npos);
    }
    d.value()->request_stop();
    runner.join();
    CHECK_FALSE(segment::exists(s.heap.name));
    CHECK_FALSE(std::filesystem::exists(s.socket_path));
    std::filesystem::remove_all(dir);
  }

  TEST_CASE("a connection past max-connections is counted as refused for room, a refused peer as a peer") {
    std::string dir;
    daemon_settings s = inproc_settings("inproc-max", "127.0.0.1:0", dir);
    s.max_connections = 1;
    s.socket_mode = 0666;
    auto d = daemon::open(s);
    REQUIRE(d);
    std::thread runner([&d] { d.value()->run(); });
    const bool root = geteuid() == 0;
    if (root) {  // a peer of another uid, refused for its credentials
      chmod(dir.c_str(), 0755);
      const int rc = test::run_in_child([&s] {
        if (setgid(65534) != 0 || setuid(65534) != 0) return 3;
        control_client c(s.socket_path);
        auto f = c.read_frame();
        return f && f->status() == errc::permission_denied ? 0 : 1;
      });
      CHECK(rc == 0);
    }
    {
      control_client first(s.socket_path);
      REQUIRE(first.hello("first"));
      control_client second(s.socket_path);
      auto refused = second.read_frame();
      REQUIRE(refused);
      CHECK(refused->status() == errc::unavailable);
      const std::string scrape = test::http_get(d.value()->metrics_port());
      CHECK(scrape.find("\nshmalloc_control_connections_refused_total 1\n") != std::string::npos);
      CHECK(scrape.find(std::string("\nshmalloc_control_peers_refused_total ") + (root ? "1" : "0") + "\n") !=
            std::string::npos);
    }
    d.value()->request_stop();
    runner.join();
    std::filesystem::remove_all(dir);
  }

  TEST_CASE("a scrape carries each shared cache's counters, labelled with its name") {
    std::string dir;
    const daemon_settings s = inproc_settings("inproc-cache", "127.0.0.1:0", dir);
    auto d = daemon::open(s);
    REQUIRE(d);
    std::thread runner([&d] { d.value()->run(); });
    {
      // What the cache library does: a header in a large object, then a root naming it.
      control_client c(s.socket_path);
      REQUIRE(c.hello("cache-writer"));
      auto big = c.request(msg::alloc_large, proto::encode(proto::alloc_large_msg{sizeof(cache_header), true}));
      REQUIRE(big);
      const auto object = proto::decode_large(big.value());
      REQUIRE(object);
      auto seg = segment::attach(s.heap.name);
      REQUIRE(seg);
      // The daemon hands a large object over free; its client marks it (client/large.cpp).
      set_alloc_bits(mheap(*seg.value()).span(span_id{object->span_id}).alloc_bits[0], 1);
      fill_counters(init_cache_header(*seg.value(), object->handle, "inproc", 8ULL << 20));
      REQUIRE(c.request(msg::publish, proto::encode_publish({"cache:inproc", object->handle})));
      const std::string scrape = test::http_get(d.value()->metrics_port());
      CHECK(scrape.find("\nshmalloc_cache_hits_total{cache=\"inproc\"} 42\n") != std::string::npos);
      CHECK(scrape.find("\nshmalloc_cache_misses_total{cache=\"inproc\"} 8\n") != std::string::npos);
      CHECK(scrape.find("\nshmalloc_cache_items{cache=\"inproc\"} 5\n") != std::string::npos);
      CHECK(scrape.find("\nshmalloc_cache_max_bytes{cache=\"inproc\"} 8388608\n") != std::string::npos);
      CHECK(scrape.find("# TYPE shmalloc_cache_hits_total counter") != std::string::npos);
    }
    d.value()->request_stop();
    runner.join();
    CHECK_FALSE(segment::exists(s.heap.name));
    std::filesystem::remove_all(dir);
  }

  // Each connection has its own thread in the daemon; under TSan this is
  // the check that every one of them changes the heap only under its lock.
  TEST_CASE("four clients refill and release at once, each served by its own thread") {
    std::string dir;
    const daemon_settings s = inproc_settings("inproc4", "off", dir);
    auto d = daemon::open(s);
    REQUIRE(d);
    std::thread runner([&d] { d.value()->run(); });
    std::atomic<int> round_trips{0}, failures{0};
    std::vector<std::thread> clients;
    for (int t = 0; t < 4; ++t)
      clients.emplace_back([&, t] {
        control_client c(s.socket_path);
        if (!c.connected() || !c.hello("inproc" + std::to_string(t))) {
          ++failures;
          return;
        }
        const auto cls = span_class::make(static_cast<std::uint8_t>(1 + t), t % 2 == 0).value;
        for (int i = 0; i < 200; ++i) {
          auto got = c.request(msg::refill, proto::encode(proto::refill_msg{cls, 2}));
          auto list = got ? proto::decode_span_list(got.value(), proto::max_refill) : std::nullopt;
          if (!list || list->span_ids.size() != 2 || !c.request(msg::release, proto::encode(*list))) {
            ++failures;
            return;
          }
          round_trips += 2;
        }
      });
    for (auto& c : clients) c.join();
    CHECK(failures == 0);
    CHECK(round_trips == 4 * 200 * 2);
    {
      control_client c(s.socket_path);
      REQUIRE(c.hello("check"));
      auto body = c.request(msg::stats);
      REQUIRE(body);
      auto stats = proto::decode_stats(body.value());
      REQUIRE(stats);
      CHECK(stats->control_requests_total >= 4 * (1 + 200 * 2));  // each client's hello, refills and releases
      CHECK(stats->heap_objects == 0);
    }
    d.value()->request_stop();
    runner.join();
    CHECK_FALSE(segment::exists(s.heap.name));
    std::filesystem::remove_all(dir);
  }
}
