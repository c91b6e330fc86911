// shmallocctl against a live shmallocd: stats, ping, classes, clients,
// spans and caches, as JSON and as tables, and its errors when no daemon
// answers or the daemon refuses.
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <regex>
#include <thread>

#include "shm/mspan.hpp"
#include "shm/segment.hpp"
#include "support/daemon_process.hpp"

using namespace shmalloc;
using namespace shmalloc::test;
using proto::msg;
using json = nlohmann::json;

namespace {
std::vector<std::uint32_t> refill(raw_client& c, std::uint8_t spc, std::uint16_t n) {
  auto body = c.request(msg::refill, proto::encode(proto::refill_msg{spc, n}));
  REQUIRE(body);
  auto list = proto::decode_span_list(body.value(), proto::max_refill);
  REQUIRE(list);
  return list->span_ids;
}

// shmallocctl's JSON for a command against d (which must answer).
json ctl_json(const daemon_process& d, const std::string& command) {
  std::string out;
  REQUIRE(run_ctl(command + " --json --socket " + d.socket, &out) == 0);
  return json::parse(out);
}

std::size_t count_lines(const std::string& s) { return static_cast<std::size_t>(std::count(s.begin(), s.end(), '\n')); }

const json* find_class(const json& rows, int cls) {
  for (const json& r : rows)
    if (r["class"] == cls) return &r;
  return nullptr;
}

// A client holding known spans and objects, set up the way a client thread
// would: spans by refill, objects by setting alloc bits in the mapped heap
// and counting them in its own statistics block.
struct known_client {
  static constexpr std::uint8_t cls = 5;  // 48-byte objects
  static constexpr std::uint32_t objects = 10, tiny_blocks = 3, large_bytes = 100000;
  static constexpr std::uint32_t large_pages = (large_bytes + page_size - 1) / page_size;

  explicit known_client(const daemon_process& d) : c(d.socket) {
    auto w = c.hello("ctl-test");
    REQUIRE(w);
    id = w->client_id;
    auto small = refill(c, span_class::make(cls, true).value, 3);
    auto tiny = refill(c, tiny_span_class, 2);
    REQUIRE(small.size() == 3);
    REQUIRE(tiny.size() == 2);
    REQUIRE(c.request(msg::alloc_large, proto::encode(proto::alloc_large_msg{large_bytes, true})));
    auto seg = segment::attach(d.heap);
    REQUIRE(seg);
    const heap_view v = heap_view::of(*seg.value());
    for (std::uint32_t i = 0; i < objects; ++i) REQUIRE(span_alloc_object(v.span(span_id{small[i % 2]})) >= 0);
    for (std::uint32_t i = 0; i < tiny_blocks; ++i) REQUIRE(span_alloc_object(v.span(span_id{tiny[0]})) >= 0);
    mcache_slot& slot = seg.value()->at<mcache_slot>(seg.value()->regions().caches.offset)[w->cache_slot];
    bump(slot.stats.small_allocs[cls], std::uint64_t{objects});
    bump(slot.stats.small_allocs[tiny_size_class], std::uint64_t{tiny_blocks});
  }

  raw_client c;
  std::uint32_t id = 0;
};
}  // namespace

TEST_SUITE("shmallocctl") {
  TEST_CASE("stats and ping ask the daemon, and both fail cleanly when it is gone") {
    daemon_process d;
    REQUIRE(d.started());
    raw_client c(d.socket);
    REQUIRE(c.hello("holder"));
    REQUIRE(refill(c, span_class::make(9, false).value, 3).size() == 3);
    std::string out;
    CHECK(run_ctl("ping --socket " + d.socket, &out) == 0);
    CHECK(out == "ok\n");
    REQUIRE(run_ctl("stats --socket " + d.socket, &out) == 0);
    CHECK(out.find("clients 1\n") != std::string::npos);  // shmallocctl itself does not register
    CHECK(out.find("heap_inuse_bytes " + std::to_string(3 * class_span_bytes(9)) + "\n") != std::string::npos);
    CHECK(out.find("heap_sys_bytes 4194304\n") != std::string::npos);
    REQUIRE(run_ctl("stats --json --socket " + d.socket, &out) == 0);
    CHECK(out.find("\"clients\": 1") != std::string::npos);
    CHECK(d.stop(SIGTERM) == 0);
    CHECK(run_ctl("ping --socket " + d.socket, &out) == 1);
    CHECK(run_ctl("stats --socket " + d.socket, &out) == 1);
  }

  TEST_CASE("stats adds Go's MemStats values from the census") {
    daemon_process d;
    REQUIRE(d.started());
    known_client k(d);
    const json s = ctl_json(d, "stats");
    const std::uint64_t alloc = k.objects * class_to_size(k.cls) + k.tiny_blocks * tiny_size;
    CHECK(s["heap_objects"] == k.objects + k.tiny_blocks);
    CHECK(s["mallocs_total"] == k.objects + k.tiny_blocks);
    CHECK(s["frees_total"] == 0);
    CHECK(s["heap_alloc_bytes"] == alloc);
    CHECK(s["heap_unused_bytes"] == s["heap_inuse_bytes"].get<std::uint64_t>() - alloc);
    CHECK(s["metrics_port"] == 0);  // test daemons run with --metrics off
  }

  TEST_CASE("classes shows the size classes in use, with --all every one") {
    daemon_process d;
    REQUIRE(d.started());
    known_client k(d);
    const json rows = ctl_json(d, "classes")["classes"];
    CHECK(rows.size() == 2);  // the tiny class and class 5
    const json* r = find_class(rows, k.cls);
    REQUIRE(r);
    const std::uint64_t span_bytes = 3 * class_span_bytes(k.cls);
    CHECK((*r)["object_size"] == class_to_size(k.cls));
    CHECK((*r)["spans_cached"] == 3);
    CHECK((*r)["spans_partial"] == 0);
    CHECK((*r)["spans_full"] == 0);
    CHECK((*r)["objects_live"] == k.objects);
    CHECK((*r)["mallocs"] == k.objects);
    CHECK((*r)["frees"] == 0);
    CHECK((*r)["bytes_in_use"] == span_bytes);
    CHECK((*r)["bytes_wasted"] == span_bytes - k.objects * class_to_size(k.cls));
    const json* tiny = find_class(rows, tiny_size_class);
    REQUIRE(tiny);
    CHECK((*tiny)["spans_cached"] == 2);
    CHECK((*tiny)["objects_live"] == k.tiny_blocks);
    CHECK(ctl_json(d, "classes --all")["classes"].size() == num_size_classes - 1);

    std::string out;
    REQUIRE(run_ctl("classes --socket " + d.socket, &out) == 0);
    CHECK(count_lines(out) == 3);  // header and two rows
    CHECK(out.rfind("class  object_size  spans_partial  spans_full  spans_cached  objects_live  bytes_in_use  "
                    "bytes_wasted  mallocs  frees\n", 0) == 0);
    CHECK(std::regex_search(out, std::regex("\n +5 +48 +0 +0 +3 +10 +" + std::to_string(span_bytes) + " ")));
  }

  TEST_CASE("clients shows each client's pid, name, spans and objects") {
    daemon_process d;
    REQUIRE(d.started());
    known_client k(d);
    const json t = ctl_json(d, "clients");
    CHECK(t["total"] == 1);
    CHECK(t["shown"] == 1);
    CHECK(t["left_out"] == 0);
    REQUIRE(t["clients"].size() == 1);
    const json& r = t["clients"][0];
    CHECK(r["id"] == k.id);
    CHECK(r["pid"] == getpid());
    CHECK(r["pid_in_client"] == getpid());  // what hello said
    CHECK(r["name"] == "ctl-test");
    CHECK(r["host"].is_null());  // control_client's hello does not say where it runs
    CHECK(r["container"].is_null());
    CHECK(r["spans_held"] == 5);
    CHECK(r["large_objects"] == 1);
    // Tiny spans' counter blocks are metadata, not objects.
    CHECK(r["objects_live"] == k.objects + k.tiny_blocks + 1);
    CHECK(r["bytes_held"] ==
          3 * class_span_bytes(k.cls) + 2 * class_span_bytes(tiny_size_class) + k.large_pages * page_size);
    CHECK(std::regex_match(r["connected_since"].get<std::string>(),
                           std::regex(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")));
    CHECK(r["connected_seconds_ago"].get<std::int64_t>() >= 0);
    CHECK(r["connected_seconds_ago"].get<std::int64_t>() < 60);

    std::string out;
    REQUIRE(run_ctl("clients --socket " + d.socket, &out) == 0);
    CHECK(std::regex_search(out, std::regex("^ *id +pid +pid_in_client  name +host +container +bytes_held +objects_live "
                                            "+spans_held +large_objects  connected_since +connected_seconds_ago\n")));
    CHECK(std::regex_search(out, std::regex("\n +" + std::to_string(k.id) + " +" + std::to_string(getpid()) + " +" +
                                            std::to_string(getpid()) + "  ctl-test +- +- +[0-9]+ +14 +5 +1  20")));
  }

  TEST_CASE("clients prints a name that is not text without breaking the JSON or the table") {
    daemon_process d;
    REQUIRE(d.started());
    raw_client c(d.socket);
    REQUIRE(c.hello("bad\x01\n\xffname"));
    const json t = ctl_json(d, "clients");
    REQUIRE(t["clients"].size() == 1);
    CHECK(t["clients"][0]["name"] == "bad??\xef\xbf\xbdname");  // U+FFFD for the byte that is not UTF-8
    std::string out;
    REQUIRE(run_ctl("clients --socket " + d.socket, &out) == 0);
    CHECK(count_lines(out) == 2);
    CHECK(out.find("bad??") != std::string::npos);
  }

  TEST_CASE("clients past one frame's worth are counted and said to be left out") {
    daemon_process d;
    REQUIRE(d.started());
    constexpr std::size_t n = 640;  // 64-byte names: about 610 rows fit in 64 KiB
    std::vector<std::unique_ptr<raw_client>> many;
    for (std::size_t i = 0; i < n; ++i) {
      many.push_back(std::make_unique<raw_client>(d.socket));
      REQUIRE(many.back()->hello(std::string(60, 'x') + std::to_string(1000 + i)));
    }
    const json t = ctl_json(d, "clients");
    CHECK(t["total"] == n);
    const std::size_t shown = t["clients"].size();
    CHECK(t["shown"] == shown);
    CHECK(shown == (proto::max_reply_body - proto::client_table_header_bytes) /
                       (proto::client_row_fixed_bytes + proto::client_row_identity_fixed_bytes + 64));
    CHECK(t["left_out"] == n - shown);
    std::string out;
    REQUIRE(run_ctl("clients --socket " + d.socket, &out) == 0);
    CHECK(count_lines(out) == shown + 2);
    CHECK(out.find("(" + std::to_string(n - shown) + " of 640 clients left out") != std::string::npos);
  }

  TEST_CASE("spans summarises the page map: committed pages are in use, free or released") {
    daemon_process d;
    REQUIRE(d.started());
    known_client k(d);
    const json s = ctl_json(d, "spans");
    const std::uint64_t in_use =
        3 * class_to_npages(k.cls) + 2 * class_to_npages(tiny_size_class) + k.large_pages;
    CHECK(s["pages_in_use"] == in_use);
    CHECK(s["pages_committed"] == chunk_pages);  // one growth step
    CHECK(s["pages_committed"] ==
          s["pages_in_use"].get<std::uint64_t>() + s["pages_free"].get<std::uint64_t>() +
              s["pages_released"].get<std::uint64_t>());
    CHECK(s["pages_capacity"] == (256ULL << 20) / page_size);
    CHECK(s["bytes_committed"] == s["pages_committed"].get<std::uint64_t>() * page_size);
    CHECK(s["bytes_in_use"] == in_use * page_size);
    CHECK(s["runs_in_use"] == 1);  // carved one after another from the bottom
    CHECK(s["runs_free"] == 1);
    CHECK(s["largest_free_run_pages"] == chunk_pages - in_use);
    CHECK(s["largest_free_run_bytes"] == (chunk_pages - in_use) * page_size);
    CHECK(s["spans_in_use"] == 6);
    CHECK(s["large_spans"] == 1);

    std::string out;
    REQUIRE(run_ctl("spans --socket " + d.socket, &out) == 0);
    CHECK(out.rfind("kind", 0) == 0);
    CHECK(std::regex_search(out, std::regex("\nin_use +" + std::to_string(in_use) + " +" +
                                            std::to_string(in_use * page_size) + " +1\n")));
    CHECK(std::regex_search(out, std::regex("spans_in_use  large_spans\n +6 +1\n")));
  }

  // The counters themselves, with caches clients made: cache_daemon_test.cpp.
  TEST_CASE("caches on a heap with no cache prints the header alone, and an empty list as JSON") {
    daemon_process d;
    REQUIRE(d.started());
    known_client k(d);  // a client, but no cache
    const json t = ctl_json(d, "caches");
    CHECK(t["total"] == 0);
    CHECK(t["shown"] == 0);
    CHECK(t["left_out"] == 0);
    CHECK(t["caches"] == json::array());
    std::string out;
    REQUIRE(run_ctl("caches --socket " + d.socket, &out) == 0);
    CHECK(out == "name  max_bytes  items  bytes  retired_bytes  hits  misses  hit_ratio  puts  evictions  expirations  "
                 "repairs  readers\n");
  }

  TEST_CASE("--socket and --json may come before or after the command, for every command that asks the daemon") {
    daemon_process d;
    REQUIRE(d.started());
    known_client k(d);
    const std::string sock = d.socket;
    for (const char* cmd : {"stats", "ping", "classes", "clients", "spans", "caches"}) {
      CAPTURE(cmd);
      const std::string c = cmd;
      std::vector<json> answers;
      for (const std::string& args : {"--socket " + sock + " --json " + c, c + " --socket " + sock + " --json",
                                      "--socket " + sock + " " + c + " --json", "--json " + c + " --socket=" + sock}) {
        CAPTURE(args);
        std::string out, err;
        REQUIRE(run_ctl(args, &out, &err) == 0);
        CHECK(err.empty());
        answers.push_back(json::parse(out));
      }
      for (const json& a : answers) {
        CHECK(a.is_object());
        CHECK(a.size() == answers[0].size());  // the same report each time (its counts may move)
      }
      // Without --json, before or after: the text form.
      std::string before, after;
      REQUIRE(run_ctl("--socket " + sock + " " + c, &before) == 0);
      REQUIRE(run_ctl(c + " --socket " + sock, &after) == 0);
      CHECK_FALSE(before.empty());
      CHECK(before.front() != '{');
      CHECK(count_lines(before) == count_lines(after));
    }
    // A command's own options stay after it; size-classes asks no daemon.
    std::string out, err;
    CHECK(run_ctl("--socket " + sock + " classes --all --json", &out) == 0);
    CHECK(json::parse(out)["classes"].size() == num_size_classes - 1);
    CHECK(run_ctl("--all --socket " + sock + " classes", &out) == 2);
    CHECK(run_ctl("--socket " + sock + " size-classes", &out, &err) == 2);
    CHECK(err.find("size-classes asks no daemon") != std::string::npos);
    CHECK(run_ctl("size-classes --json", &out) == 2);
    CHECK(run_ctl("--socket " + sock, &out, &err) == 2);  // options and no command
    CHECK(err.find("no subcommand given") != std::string::npos);
    // The option before the command is the one used: a socket nobody serves fails.
    CHECK(run_ctl("--socket /nonexistent/x.sock stats", &out, &err) == 1);
    CHECK(err.find("no shmallocd answers on /nonexistent/x.sock") != std::string::npos);
  }

  TEST_CASE("clients asks a daemon from before identity rows for the rows it knows") {
    // A stand-in for such a daemon: a clients request with a body is refused
    // (as "takes no body"), one without gets basic rows; on one connection.
    char tmpl[] = "/tmp/shmalloc-test-XXXXXX";
    const std::string dir = mkdtemp(tmpl), sock = dir + "/old.sock";
    const int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock.c_str());
    REQUIRE(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(listen(listener, 1) == 0);
    std::vector<std::uint32_t> bodies;  // the length of each request's body
    std::thread old_daemon([listener, &bodies] {
      const int fd = accept(listener, nullptr, nullptr);
      for (std::uint8_t head[proto::header_bytes]; fd >= 0 && recv(fd, head, sizeof head, MSG_WAITALL) == sizeof head;) {
        const proto::frame_header h = proto::decode_header(head);
        std::vector<std::uint8_t> body(h.length);
        if (h.length != 0 && recv(fd, body.data(), body.size(), MSG_WAITALL) != static_cast<ssize_t>(body.size())) break;
        bodies.push_back(h.length);
        proto::client_table_msg t;
        t.total = 1;
        proto::client_row row;
        row.id = 3;
        row.pid = 4321;
        row.name = "old-worker";
        t.rows.push_back(row);
        const auto r = h.length != 0
                           ? proto::make_reply(msg::client_table, h.request_id, errc::protocol_error, "clients takes no body")
                           : proto::make_reply(msg::client_table, h.request_id, errc::ok, {}, proto::encode(t));
        if (send(fd, r.data(), r.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(r.size()) || h.length == 0) break;
      }
      if (fd >= 0) close(fd);
    });
    std::string out, err;
    CHECK(run_ctl("clients --json --socket " + sock, &out, &err) == 0);
    old_daemon.join();
    close(listener);
    std::filesystem::remove_all(dir);
    CHECK(bodies == std::vector<std::uint32_t>{1, 0});
    CHECK(err.empty());
    const json t = json::parse(out);
    REQUIRE(t["clients"].size() == 1);
    const json& r = t["clients"][0];
    CHECK(r["pid"] == 4321);
    CHECK(r["name"] == "old-worker");
    CHECK(r["pid_in_client"].is_null());
    CHECK(r["host"].is_null());
    CHECK(r["container"].is_null());
  }

  TEST_CASE("with no daemon every command exits 1 with one line on stderr") {
    const std::string sock = "/nonexistent/x.sock";
    for (const char* cmd : {"stats", "ping", "classes", "clients", "spans", "caches"}) {
      CAPTURE(cmd);
      std::string out, err;
      CHECK(run_ctl(std::string(cmd) + " --socket " + sock, &out, &err) == 1);
      CHECK(out.empty());
      CHECK(count_lines(err) == 1);
      CHECK(err.find("no shmallocd answers on " + sock) != std::string::npos);
    }
    setenv("SHMALLOC_SOCKET", sock.c_str(), 1);  // the daemon's variable, too
    std::string out, err;
    CHECK(run_ctl("classes --json", &out, &err) == 1);
    unsetenv("SHMALLOC_SOCKET");
    CHECK(err.find(sock) != std::string::npos);
  }

  TEST_CASE("a daemon that refuses the request makes a one-line error and exit 1, and bad usage exits 2") {
    // A stand-in for a daemon that does not know the request: one reply, then close.
    char tmpl[] = "/tmp/shmalloc-test-XXXXXX";
    const std::string dir = mkdtemp(tmpl), sock = dir + "/old.sock";
    const int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", sock.c_str());
    REQUIRE(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(listen(listener, 1) == 0);
    std::thread refuser([listener] {
      const int fd = accept(listener, nullptr, nullptr);
      std::uint8_t head[proto::header_bytes];
      if (fd >= 0 && recv(fd, head, sizeof head, MSG_WAITALL) == sizeof head) {
        const proto::frame_header h = proto::decode_header(head);
        const auto r = proto::make_reply(msg::ok, h.request_id, errc::protocol_error, "unknown request type 22");
        (void)send(fd, r.data(), r.size(), MSG_NOSIGNAL);
      }
      if (fd >= 0) close(fd);
    });
    std::string out, err;
    CHECK(run_ctl("classes --socket " + sock, &out, &err) == 1);
    refuser.join();
    close(listener);
    std::filesystem::remove_all(dir);
    CHECK(out.empty());
    CHECK(count_lines(err) == 1);
    CHECK(err.find("unknown request type 22") != std::string::npos);

    CHECK(run_ctl("classes --bogus", &out) == 2);
    CHECK(run_ctl("spans --all", &out) == 2);  // --all belongs to classes
  }
}
