// The request handler without sockets (frames in, frames out), and the whole
// daemon in this process on a temp socket.
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include "service/daemon.hpp"
#include "service/request_handler.hpp"
#include "shm/control_client.hpp"
#include "shm/verify.hpp"
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

void say_hello(request_handler& rh, client_state& c) {
  REQUIRE(ask(rh, c, msg::hello, proto::encode(proto::hello_msg{layout_version, 1, "unit"})).status == errc::ok);
}
}  // namespace

TEST_SUITE("request_handler") {
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

  TEST_CASE("bye closes, and every reply echoes the request id") {
    test::test_heap t;
    request_handler rh(*t.heap, {});
    client_state a;
    say_hello(rh, a);
    CHECK(ask(rh, a, msg::bye).close);
  }
}

TEST_SUITE("daemon in process") {
  TEST_CASE("the daemon runs on a thread of the test, serves, and stops cleanly") {
    daemon_settings s;
    s.heap.name = test::unique_heap_name("inproc");
    s.heap.capacity = 64ULL << 20;
    char tmpl[] = "/tmp/shmalloc-test-XXXXXX";
    const std::string dir = mkdtemp(tmpl);
    s.socket_path = dir + "/d.sock";
    auto d = daemon::open(s);
    REQUIRE(d);
    std::thread runner([&d] { d.value()->run(); });
    {
      control_client c(s.socket_path);
      REQUIRE(c.connected());
      auto w = c.hello("inproc");
      REQUIRE(w);
      CHECK(w->heap_name == s.heap.name);
      auto spans = c.request(msg::refill, proto::encode(proto::refill_msg{span_class::make(3, true).value, 2}));
      CHECK(spans);
    }
    d.value()->request_stop();
    runner.join();
    CHECK_FALSE(segment::exists(s.heap.name));
    CHECK_FALSE(std::filesystem::exists(s.socket_path));
    std::filesystem::remove_all(dir);
  }
}
