// shmallocd as a subprocess: the control protocol, ownership, dead clients,
// bad bytes, and the daemon's own lifecycle.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <fcntl.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <thread>

#include "shm/mheap.hpp"
#include "shm/segment.hpp"
#include "shm/verify.hpp"
#include "support/daemon_process.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;
using namespace shmalloc::test;
using proto::msg;

namespace {
// True once every thread of pid shows state T (stopped) in /proc; false
// after 10 s. A SIGSTOP takes effect when each thread next enters the
// kernel, which on a loaded machine can come after the sender's next call.
bool wait_all_threads_stopped(pid_t pid) {
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  for (int i = 0; i < 1000; ++i) {
    bool all = true;
    for (const auto& t : std::filesystem::directory_iterator(dir)) {
      std::ifstream in(t.path() / "stat");
      std::string line;
      std::getline(in, line);
      const auto close = line.rfind(')');
      if (close == std::string::npos || close + 2 >= line.size() || line[close + 2] != 'T') all = false;
    }
    if (all) return true;
    usleep(10000);
  }
  return false;
}

std::vector<std::uint32_t> refill(raw_client& c, std::uint8_t spc, std::uint16_t n, errc* status = nullptr) {
  auto f = c.call(msg::refill, proto::encode(proto::refill_msg{spc, n}));
  if (!f) return {};
  if (status) *status = f->status();
  auto parts = proto::split_reply(f->payload);
  if (f->status() != errc::ok || !parts) return {};
  auto list = proto::decode_span_list(parts->body, proto::max_refill);
  return list ? list->span_ids : std::vector<std::uint32_t>{};
}

proto::stats_msg stats(raw_client& c) { return daemon_stats(c); }

// n class-table requests in one buffer, ids first_id onward: 64 KB for 4,000,
// which a socket takes at once, and their replies (a class table each, 16 MB
// in all) far more than the socket buffers hold, so the daemon's sends come
// up short and wait.
std::vector<std::uint8_t> pipelined_class_tables(int n, std::uint32_t first_id) {
  std::vector<std::uint8_t> all;
  for (int i = 0; i < n; ++i) {
    const auto one = proto::make_request(msg::classes, first_id + static_cast<std::uint32_t>(i));
    all.insert(all.end(), one.begin(), one.end());
  }
  return all;
}

// A process's CPU time so far, user and system, from /proc/<pid>/stat.
double cpu_seconds(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  const std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto name_end = stat.rfind(')');  // the command name may hold spaces
  REQUIRE(name_end != std::string::npos);
  std::istringstream rest(stat.substr(name_end + 1));
  std::vector<std::string> fields;  // from field 3 (state) on
  for (std::string field; rest >> field;) fields.push_back(field);
  REQUIRE(fields.size() > 12);
  return (std::stod(fields[14 - 3]) + std::stod(fields[15 - 3])) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// hello as raw frames, since control_client::hello hides a refusal's reason:
// the welcome or the refusal within 3 s; nullopt if the daemon left the
// client hanging. A refused client's send may fail (the daemon has closed
// already): the refusal is still there to read.
std::optional<raw_client::frame> greet(raw_client& c) {
  c.send_bytes(proto::make_request(msg::hello, 1, proto::encode(proto::hello_msg{layout_version, 1, "fd-test"})));
  return c.read_frame(3000);
}

// shmallocd started in dir, so that a relative --socket is relative to it,
// with its stderr in dir/stderr; its pid.
pid_t start_daemon_in(const std::string& dir, const std::vector<std::string>& args) {
  static std::string path = SHMALLOC_DAEMON_PATH;
  std::vector<char*> argv{path.data()};
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  const std::string err = dir + "/stderr";
  const pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    const int fd = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || chdir(dir.c_str()) != 0) _exit(126);
    dup2(fd, STDERR_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

// Its exit code once it exits, within 5 s; -1 if it was still running (it
// is killed then: it served where it should have refused).
int exit_code_within_5s(pid_t pid) {
  for (int i = 0; i < 500; ++i) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  return -1;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A temp directory, removed with everything in it when the test ends.
struct temp_dir {
  std::string path;
  temp_dir() {
    char tmpl[] = "/tmp/shmalloc-test-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

std::vector<std::string> daemon_args(const std::string& heap, const std::string& socket) {
  return {"--heap", heap, "--socket", socket, "--capacity", "64M", "--metrics", "off", "--log-level", "info"};
}

}  // namespace

TEST_SUITE("shmallocd") {
  TEST_CASE("hello, refill, use the spans through the mapped heap, release") {
    daemon_process d({"--keep-heap"});
    REQUIRE(d.started());
    raw_client c(d.socket);
    auto w = c.hello("refill-test");
    REQUIRE(w);
    CHECK(w->client_id != 0);
    CHECK(w->heap_name == d.heap);
    CHECK(w->layout_version == layout_version);
    const auto spc = span_class::make(4, false).value;  // 32-byte objects
    auto spans = refill(c, spc, 8);
    REQUIRE(spans.size() == 8);

    auto seg = segment::attach(d.heap);
    REQUIRE(seg);
    CHECK(seg.value()->header().instance_id == w->instance_id);
    const heap_view v = heap_view::of(*seg.value());
    for (std::uint32_t id : spans) {
      mspan& s = v.span(span_id{id});
      CHECK(s.state.load() == mspan_state::cached);
      CHECK(s.owner_client == w->client_id);
      CHECK(span_alloc_object(s) == 0);  // this client now holds it
    }
    auto ok = c.call(msg::release, proto::encode(proto::span_list_msg{{spans[0], spans[1]}}));
    REQUIRE(ok);
    CHECK(ok->status() == errc::ok);
    // Releasing again is a double release: refused, nothing changes.
    auto again = c.call(msg::release, proto::encode(proto::span_list_msg{{spans[0]}}));
    REQUIRE(again);
    CHECK(again->status() == errc::bad_handle);
    CHECK(v.span(span_id{spans[0]}).state.load() == mspan_state::central);
    CHECK(stats(c).heap_inuse_bytes >= 6 * page_size);
    seg.value().reset();
    c.call(msg::bye);
    check_heap_after(d);
  }

  // The sweep queue is what brings the daemon's sweep within a tick; a span
  // a freer flagged but never pushed (it was killed in between) is found by
  // the backstop's stretches of span ids.
  TEST_CASE("remote frees into a span the daemon holds come back when their freer never queued the span") {
    daemon_process d({"--keep-heap", "--sweep-backstop", "1s"});
    REQUIRE(d.started());
    raw_client c(d.socket);
    REQUIRE(c.hello("backstop-test"));
    const auto spc = span_class::make(4, false);  // 32-byte objects
    auto spans = refill(c, spc.value, 1);
    REQUIRE(spans.size() == 1);
    auto seg = segment::attach(d.heap);
    REQUIRE(seg);
    const heap_view v = heap_view::of(*seg.value());
    mspan& s = v.span(span_id{spans[0]});
    REQUIRE(span_alloc_object(s) == 0);
    REQUIRE(span_alloc_object(s) == 1);
    const std::uint64_t in_use = stats(c).heap_inuse_bytes;
    auto released = c.call(msg::release, proto::encode(proto::span_list_msg{{spans[0]}}));
    REQUIRE(released);
    REQUIRE(released->status() == errc::ok);
    REQUIRE(s.state.load() == mspan_state::central);
    // Another process frees both objects and dies after flagging the span,
    // before pushing it: a view without the queue pushes nothing.
    heap_view unqueued = v;
    unqueued.sweep_queue = nullptr;
    s.sweep_queued.store(1);
    CHECK(span_push_remote(unqueued, s, 0) == errc::ok);
    CHECK(span_push_remote(unqueued, s, 1) == errc::ok);
    bool back = false;
    for (int i = 0; i < 3000 && !back; ++i) {  // a pass of the backstop takes 1 s here
      back = stats(c).heap_inuse_bytes < in_use;
      if (!back) usleep(10000);
    }
    CHECK(back);
    CHECK(count_remote_pending(v, s) == 0);
    seg.value().reset();
    c.call(msg::bye);
    check_heap_after(d);
  }

  TEST_CASE("requests before hello, unknown types and malformed bodies get errors, not crashes") {
    daemon_process d({"--keep-heap"});
    REQUIRE(d.started());
    raw_client c(d.socket);
    auto before = c.call(msg::refill, proto::encode(proto::refill_msg{10, 1}));
    REQUIRE(before);
    CHECK(before->status() == errc::protocol_error);
    REQUIRE(c.hello());
    auto unknown = c.call(static_cast<msg>(999));
    REQUIRE(unknown);
    CHECK(unknown->status() == errc::protocol_error);
    auto bad_class = c.call(msg::refill, proto::encode(proto::refill_msg{200, 1}));
    REQUIRE(bad_class);
    CHECK(bad_class->status() == errc::protocol_error);
    auto foreign = c.call(msg::release, proto::encode(proto::span_list_msg{{12345}}));
    REQUIRE(foreign);
    CHECK(foreign->status() == errc::bad_handle);
    auto bad_free = c.call(msg::free_large, proto::encode(proto::free_large_msg{~0ULL}));
    REQUIRE(bad_free);
    CHECK(bad_free->status() == errc::bad_handle);
    // An oversized frame breaks the framing: an error, then the connection closes.
    proto::frame_header h;
    h.length = proto::max_payload + 1;
    h.type = static_cast<std::uint16_t>(msg::stats);
    std::vector<std::uint8_t> head(proto::header_bytes);
    proto::encode_header(h, head.data());
    REQUIRE(c.send_bytes(head));
    auto err = c.read_frame();
    REQUIRE(err);
    CHECK(err->status() == errc::protocol_error);
    CHECK(c.eof());
    // Everyone else is still served.
    raw_client other(d.socket);
    CHECK(other.hello());
    check_heap_after(d);
  }

  TEST_CASE("a client killed with SIGKILL while holding spans has them taken back") {
    daemon_process d({"--keep-heap"});
    REQUIRE(d.started());
    const std::string sock = d.socket;
    int pipe_fds[2];
    REQUIRE(pipe(pipe_fds) == 0);
    const pid_t child = fork();
    if (child == 0) {
      raw_client c(sock);
      if (!c.hello("victim")) _exit(1);
      auto spans = refill(c, span_class::make(6, false).value, 4);
      const char ready = spans.size() == 4 ? 'y' : 'n';
      if (write(pipe_fds[1], &ready, 1) != 1) _exit(2);
      pause();
      _exit(0);
    }
    char ready = 0;
    REQUIRE(read(pipe_fds[0], &ready, 1) == 1);
    CHECK(ready == 'y');
    kill(child, SIGKILL);
    waitpid(child, nullptr, 0);
    close(pipe_fds[0]);
    close(pipe_fds[1]);

    raw_client observer(d.socket);
    REQUIRE(observer.hello("observer"));
    proto::stats_msg s{};
    for (int i = 0; i < 200 && (s = stats(observer)).reclaimed_bytes_total == 0; ++i) usleep(10000);
    CHECK(s.reclaimed_bytes_total == 4 * class_span_bytes(6));
    CHECK(s.clients == 1);
    observer.call(msg::bye);
    check_heap_after(d);
  }

  TEST_CASE("large objects: allocate, free from another client, quota and capacity errors") {
    daemon_process d({"--quota", "1M", "--keep-heap"});
    REQUIRE(d.started());
    raw_client a(d.socket), b(d.socket);
    REQUIRE(a.hello("a"));
    REQUIRE(b.hello("b"));
    auto big = a.call(msg::alloc_large, proto::encode(proto::alloc_large_msg{600 << 10, true}));
    REQUIRE(big);
    REQUIRE(big->status() == errc::ok);
    auto large = proto::decode_large(proto::split_reply(big->payload)->body);
    REQUIRE(large);
    auto over = a.call(msg::alloc_large, proto::encode(proto::alloc_large_msg{600 << 10, true}));
    REQUIRE(over);
    CHECK(over->status() == errc::quota_exceeded);
    auto huge = b.call(msg::alloc_large, proto::encode(proto::alloc_large_msg{1ULL << 40, true}));
    REQUIRE(huge);
    CHECK(huge->status() == errc::no_memory);
    // Any process may free any object: b frees a's, which gives a its quota back.
    auto freed = b.call(msg::free_large, proto::encode(proto::free_large_msg{large->handle}));
    REQUIRE(freed);
    CHECK(freed->status() == errc::ok);
    auto twice = b.call(msg::free_large, proto::encode(proto::free_large_msg{large->handle}));
    CHECK(twice->status() == errc::bad_handle);
    auto again = a.call(msg::alloc_large, proto::encode(proto::alloc_large_msg{600 << 10, true}));
    CHECK(again->status() == errc::ok);
    check_heap_after(d);
  }

  TEST_CASE("a second daemon on the same heap or socket refuses to start, and a stale socket is replaced") {
    daemon_process d;
    REQUIRE(d.started());
    const pid_t same_socket = spawn_daemon({"--heap", unique_heap_name("second"), "--socket", d.socket, "--capacity", "64M",
                                            "--log-level", "off"}, "/nonexistent/none.sock");
    CHECK(same_socket == -1);
    const std::string other_socket = d.dir + "/other.sock";
    const pid_t same_heap = spawn_daemon({"--heap", d.heap, "--socket", other_socket, "--log-level", "off"}, other_socket);
    CHECK(same_heap == -1);

    // kill -9 leaves the socket file behind; a new daemon takes it over and
    // adopts the heap the dead one left.
    CHECK(d.stop(SIGKILL) == 128 + SIGKILL);
    struct stat st {};
    CHECK(stat(d.socket.c_str(), &st) == 0);
    const pid_t next = spawn_daemon({"--heap", d.heap, "--socket", d.socket, "--log-level", "off"}, d.socket);
    REQUIRE(next > 0);
    raw_client c(d.socket);
    CHECK(c.hello());
    kill(next, SIGTERM);
    int status = 0;
    waitpid(next, &status, 0);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    CHECK_FALSE(segment::exists(d.heap));  // removed on a clean stop
  }

  TEST_CASE("--socket with no slash is a socket in the working directory, not a directory") {
    temp_dir dir;
    const std::string heap = unique_heap_name("relsock");
    const pid_t pid = start_daemon_in(dir.path, daemon_args(heap, "rel.sock"));
    REQUIRE(pid > 0);
    const std::string socket = dir.path + "/rel.sock";
    bool answered = false;
    for (int i = 0; i < 500 && !answered; ++i) {
      answered = raw_client(socket).connected();
      if (!answered) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    struct stat st {};
    CHECK(lstat(socket.c_str(), &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    CHECK(answered);
    kill(pid, SIGTERM);
    CHECK(exit_code_within_5s(pid) == 0);
    CHECK(lstat(socket.c_str(), &st) != 0);  // removed at the stop
    segment::remove(heap);
  }

  TEST_CASE("a regular file, a link or a live socket at the socket path is refused and left as it is") {
    temp_dir dir;
    const std::string heap = unique_heap_name("sockpath");
    auto refused = [&](const std::string& path, const std::string& why) {
      const pid_t pid = start_daemon_in(dir.path, daemon_args(heap, path));
      REQUIRE(pid > 0);
      CHECK(exit_code_within_5s(pid) == 1);
      const std::string err = read_file(dir.path + "/stderr");
      CHECK_MESSAGE(err.find(why) != std::string::npos, err);
      CHECK_FALSE(segment::exists(heap));  // the heap it made goes with it
      segment::remove(heap);  // had it served (and been killed), nothing stays in /dev/shm
    };
    const std::string file = dir.path + "/file.sock";
    std::ofstream(file) << "someone's data";
    refused(file, "is not a socket");
    CHECK(read_file(file) == "someone's data");

    const std::string link = dir.path + "/link.sock";
    REQUIRE(symlink(file.c_str(), link.c_str()) == 0);
    refused(link, "is not a socket");
    struct stat st {};
    CHECK(lstat(link.c_str(), &st) == 0);
    CHECK(S_ISLNK(st.st_mode));

    // A listener that is not shmallocd at all: its socket stays.
    const std::string live = dir.path + "/live.sock";
    const int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(listener >= 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, live.c_str(), sizeof addr.sun_path - 1);
    REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(listener, 8) == 0);
    refused(live, "is listening on " + live);
    CHECK(lstat(live.c_str(), &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    ::close(listener);

    // Closed, the same socket file is stale: replaced.
    const pid_t pid = start_daemon_in(dir.path, daemon_args(heap, live));
    REQUIRE(pid > 0);
    bool answered = false;
    for (int i = 0; i < 500 && !answered; ++i) {
      answered = raw_client(live).connected();
      if (!answered) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    CHECK(answered);
    kill(pid, SIGTERM);
    CHECK(exit_code_within_5s(pid) == 0);
    CHECK(read_file(dir.path + "/stderr").find("removed the stale socket") != std::string::npos);
    segment::remove(heap);
  }

  TEST_CASE("SIGTERM tells clients, removes the socket and the heap, and exits 0") {
    daemon_process d;
    REQUIRE(d.started());
    raw_client c(d.socket);
    REQUIRE(c.hello());
    REQUIRE(refill(c, span_class::make(3, true).value, 2).size() == 2);
    CHECK(d.stop(SIGTERM) == 0);
    auto notice = c.read_frame();
    REQUIRE(notice);
    CHECK(notice->header.type == static_cast<std::uint16_t>(msg::shutdown));
    struct stat st {};
    CHECK(stat(d.socket.c_str(), &st) != 0);
    CHECK_FALSE(segment::exists(d.heap));
  }

  TEST_CASE("invalid settings exit 2 with one line naming the setting") {
    const std::string sock = "/tmp/shmalloc-test-nosock-" + std::to_string(getpid());
    CHECK(spawn_daemon({"--capacity", "lots", "--socket", sock}, sock) == -1);
    // spawn_daemon only says it did not come up; run it directly for the code.
    const std::vector<std::pair<const char*, const char*>> bad{
        {"--capacity", "lots"}, {"--max-caches-per-client", "0"}, {"--max-caches-per-client", "1025"}};
    for (const auto& [flag, value] : bad) {
      CAPTURE(flag);
      CAPTURE(value);
      const pid_t pid = fork();
      if (pid == 0) {
        execl(SHMALLOC_DAEMON_PATH, "shmallocd", flag, value, "--socket", sock.c_str(), static_cast<char*>(nullptr));
        _exit(127);
      }
      int status = 0;
      waitpid(pid, &status, 0);
      CHECK(WIFEXITED(status));
      CHECK(WEXITSTATUS(status) == 2);
    }
  }

  TEST_CASE("100,000 random and mutated frames do not crash the daemon or corrupt the heap") {
    daemon_process d({"--keep-heap"});
    REQUIRE(d.started());
    std::mt19937_64 rng(20261126);
    const std::vector<std::vector<std::uint8_t>> seeds{
        proto::make_request(msg::hello, 1, proto::encode(proto::hello_msg{layout_version, 1, "fuzz"})),
        proto::make_request(msg::refill, 2, proto::encode(proto::refill_msg{20, 3})),
        proto::make_request(msg::release, 3, proto::encode(proto::span_list_msg{{0, 1, 2}})),
        proto::make_request(msg::alloc_large, 4, proto::encode(proto::alloc_large_msg{70000, false})),
        proto::make_request(msg::free_large, 5, proto::encode(proto::free_large_msg{1 << 26})),
        proto::make_request(msg::stats, 6)};
    int frames = 0;
    while (frames < 100000) {
      raw_client c(d.socket);
      REQUIRE(c.connected());
      // A burst on one connection; a broken frame may end it early.
      for (int k = 0; k < 200 && frames < 100000; ++k, ++frames) {
        std::vector<std::uint8_t> f = seeds[rng() % seeds.size()];
        switch (rng() % 4) {
          case 0: break;  // well-formed
          case 1:         // flip bytes anywhere, header included
            for (int m = 0; m < 1 + static_cast<int>(rng() % 4); ++m) f[rng() % f.size()] ^= static_cast<std::uint8_t>(rng());
            break;
          case 2:  // truncate or extend the payload, keep the header's length
            f.resize(proto::header_bytes + rng() % 40, static_cast<std::uint8_t>(rng()));
            break;
          default:  // random body with a valid header
            f.resize(proto::header_bytes + rng() % 64);
            for (std::size_t i = proto::header_bytes; i < f.size(); ++i) f[i] = static_cast<std::uint8_t>(rng());
            {
              proto::frame_header h{static_cast<std::uint32_t>(f.size() - proto::header_bytes),
                                    static_cast<std::uint16_t>(1 + rng() % 14), proto::protocol_version, 0, 0};
              proto::encode_header(h, f.data());
            }
        }
        // Pipelined: replies are drained as they come, never awaited (a frame
        // whose length lies makes the daemon wait for bytes that never come).
        if (!c.send_bytes(f) || !c.drain()) break;
      }
    }
    raw_client good(d.socket);
    REQUIRE(good.hello("after-fuzz"));
    CHECK(refill(good, span_class::make(12, false).value, 2).size() == 2);
    good.call(msg::bye);
    check_heap_after(d);
  }
}

TEST_SUITE("shmallocd restart") {
  TEST_CASE("after a daemon dies, a restarted one adopts the heap and clients reattach their spans") {
    daemon_process d;
    REQUIRE(d.started());
    raw_client c(d.socket), idle(d.socket);
    auto w = c.hello("survivor");
    auto w_idle = idle.hello("never-returns");
    REQUIRE(w);
    REQUIRE(w_idle);
    auto spans = refill(c, span_class::make(5, false).value, 3);
    REQUIRE(spans.size() == 3);
    REQUIRE(refill(idle, span_class::make(5, false).value, 2).size() == 2);
    auto big = c.call(msg::alloc_large, proto::encode(proto::alloc_large_msg{100000, true}));
    REQUIRE(big);
    const auto large = *proto::decode_large(proto::split_reply(big->payload)->body);
    // Objects allocated before the crash.
    auto seg = segment::attach(d.heap);
    REQUIRE(seg);
    heap_view v = heap_view::of(*seg.value());
    for (std::uint32_t id : spans) span_alloc_object(v.span(span_id{id}));

    REQUIRE(d.stop(SIGKILL) == 128 + SIGKILL);
    const pid_t next = spawn_daemon({"--heap", d.heap, "--socket", d.socket, "--reattach-grace", "1s",
                                     "--log-level", "off", "--keep-heap"}, d.socket);
    REQUIRE(next > 0);
    raw_client again(d.socket);
    auto w2 = again.hello("survivor");
    REQUIRE(w2);
    CHECK(w2->client_id > w_idle->client_id);  // ids are never reused across restarts
    std::vector<std::uint32_t> claim = spans;
    claim.push_back(large.span_id);
    claim.push_back(123456);  // not ours: ignored
    // Under the right id but without the token (a thief who guessed the
    // id, or read the heap): refused, and nothing moves.
    auto thief = again.call(msg::reattach, proto::encode(proto::reattach_msg{w->client_id, w->reattach_token ^ 1, claim}));
    REQUIRE(thief);
    CHECK(thief->status() == errc::permission_denied);
    for (std::uint32_t id : spans) CHECK(v.span(span_id{id}).owner_client == w->client_id);
    auto r = again.call(msg::reattach, proto::encode(proto::reattach_msg{w->client_id, w->reattach_token, claim}));
    REQUIRE(r);
    REQUIRE(r->status() == errc::ok);
    auto taken = proto::decode_span_list(proto::split_reply(r->payload)->body, proto::max_release);
    REQUIRE(taken);
    CHECK(taken->span_ids.size() == 4);
    for (std::uint32_t id : spans) {
      CHECK(v.span(span_id{id}).owner_client == w2->client_id);
      CHECK(is_allocated(v.span(span_id{id}), 0));  // no object was lost
    }
    // Another client cannot take the idle client's spans under a wrong id.
    auto wrong = again.call(msg::reattach, proto::encode(proto::reattach_msg{w->client_id, w->reattach_token, {spans[0]}}));
    REQUIRE(wrong);
    CHECK(wrong->status() == errc::not_found);
    // The client that never came back loses its spans after the grace period.
    proto::stats_msg s{};
    for (int i = 0; i < 300 && (s = stats(again)).reclaimed_bytes_total == 0; ++i) usleep(10000);
    CHECK(s.reclaimed_bytes_total == 2 * class_span_bytes(5));
    // The reattached client works as before: it releases what it reclaimed.
    auto rel = again.call(msg::release, proto::encode(proto::span_list_msg{spans}));
    REQUIRE(rel);
    CHECK(rel->status() == errc::ok);
    again.call(msg::bye);
    seg.value().reset();
    check_heap_after(next, d.heap);
  }
}

TEST_SUITE("shmallocd fresh") {
  TEST_CASE("--fresh discards a heap left by a dead daemon, and refuses one a live daemon serves") {
    daemon_process d;
    REQUIRE(d.started());
    std::uint64_t first = 0;
    {
      raw_client c(d.socket);
      auto w = c.hello();
      REQUIRE(w);
      first = w->instance_id;
    }
    const std::string other = d.dir + "/other.sock";
    CHECK(spawn_daemon({"--heap", d.heap, "--socket", other, "--fresh", "--log-level", "off"}, other) == -1);
    REQUIRE(d.stop(SIGKILL) == 128 + SIGKILL);
    const pid_t next = spawn_daemon({"--heap", d.heap, "--socket", d.socket, "--fresh", "--log-level", "off"}, d.socket);
    REQUIRE(next > 0);
    raw_client c(d.socket);
    auto w = c.hello();
    REQUIRE(w);
    CHECK(w->instance_id != first);  // a new heap, not the adopted one
    kill(next, SIGTERM);
    waitpid(next, nullptr, 0);
  }
}

TEST_SUITE("shmallocd security and deadlines") {
  TEST_CASE("a client's read timeout holds while signals interrupt it") {
    daemon_process d;
    REQUIRE(d.started());
    raw_client c(d.socket);
    REQUIRE(c.hello());
    kill(d.pid(), SIGSTOP);  // it will never answer, once every thread has stopped:
    REQUIRE(wait_all_threads_stopped(d.pid()));  // kill() returns before that on a busy machine
    // In a child, so that a hang is a failure here, not a stuck test: a
    // signal every 50 ms (SA_RESTART: recv with SO_RCVTIMEO returns EINTR
    // anyway) must not restart the 1 s timeout each time.
    const pid_t child = fork();
    if (child == 0) {
      struct sigaction sa {};
      sa.sa_handler = [](int) {};
      sa.sa_flags = SA_RESTART;
      sigaction(SIGALRM, &sa, nullptr);
      itimerval every{{0, 50000}, {0, 50000}};
      setitimer(ITIMER_REAL, &every, nullptr);
      const bool sent = c.send_bytes(proto::make_request(msg::stats, 99));
      _exit(sent && !c.read_frame(1000) ? 0 : 1);
    }
    int status = -1;
    for (int i = 0; i < 400 && waitpid(child, &status, WNOHANG) == 0; ++i) usleep(10000);  // 4 s at most
    const bool finished = WIFEXITED(status);
    if (!finished) {
      kill(child, SIGKILL);
      waitpid(child, nullptr, 0);
    }
    CHECK(finished);
    CHECK((finished && WEXITSTATUS(status) == 0));
    kill(d.pid(), SIGCONT);
  }

  TEST_CASE("a silent connection and a half-sent frame are closed at their deadlines") {
    daemon_process d({"--hello-timeout", "300ms", "--frame-timeout", "300ms"});
    REQUIRE(d.started());
    raw_client silent(d.socket);
    CHECK(silent.eof(3000));  // never said hello
    raw_client stalled(d.socket);
    REQUIRE(stalled.hello());
    usleep(500000);  // past both timeouts: a client that has said hello may idle
    CHECK(stalled.call(msg::stats).has_value());
    auto half = proto::make_request(msg::refill, 10, proto::encode(proto::refill_msg{10, 1}));
    half.resize(proto::header_bytes + 1);  // the header promises 3 bytes, 1 comes
    REQUIRE(stalled.send_bytes(half));
    CHECK(stalled.eof(3000));
    raw_client split(d.socket);  // half a header, after hello
    REQUIRE(split.hello());
    auto header = proto::make_request(msg::stats, 11);
    header.resize(proto::header_bytes / 2);
    REQUIRE(split.send_bytes(header));
    CHECK(split.eof(3000));
    raw_client fine(d.socket);
    CHECK(fine.hello());
  }

  TEST_CASE("a client that has not said hello must read its replies within its hello deadline") {
    daemon_process d({"--hello-timeout", "500ms"});
    REQUIRE(d.started());
    raw_client greedy(d.socket);
    REQUIRE(greedy.send_bytes(pipelined_class_tables(4000, 0)));  // tables may be asked for without hello
    usleep(1500000);  // well past the deadline, reading nothing
    std::size_t replies = 0;
    while (greedy.read_frame()) ++replies;  // what was sent before the close, then the end
    CHECK(replies < 4000);
    CHECK(greedy.eof(1000));
    raw_client c(d.socket);
    REQUIRE(c.hello());
    auto stats = c.call(msg::stats);
    REQUIRE(stats);
    auto parts = proto::split_reply(stats->payload);
    REQUIRE(parts);
    CHECK(proto::decode_stats(parts->body).has_value());
  }

  TEST_CASE("connections past --max-connections are refused with a reason, and served once one closes") {
    daemon_process d({"--max-connections", "2"});
    REQUIRE(d.started());
    // The connection that found the daemon up (spawn_daemon's probe) counts
    // until its session sees it closed, which a loaded machine delays: a
    // refusal then is tried again.
    auto served_client = [&d] {
      for (int i = 0; i < 100; ++i) {
        auto c = std::make_unique<raw_client>(d.socket);
        if (c->hello()) return c;
        usleep(20000);
      }
      return std::unique_ptr<raw_client>();
    };
    auto a = served_client();
    REQUIRE(a);
    auto b = served_client();
    REQUIRE(b);
    raw_client third(d.socket);
    auto refused = third.read_frame();
    REQUIRE(refused);
    CHECK(refused->status() == errc::unavailable);
    auto parts = proto::split_reply(refused->payload);
    REQUIRE(parts);
    CHECK(parts->message.find("at most 2 connections") != std::string::npos);
    CHECK(third.eof(1000));
    a.reset();  // its session ends; a new connection is served
    bool served = false;
    for (int i = 0; i < 50 && !served; ++i) {
      raw_client next(d.socket);
      served = next.hello().has_value();
      if (!served) usleep(20000);
    }
    CHECK(served);
  }

  // Out of descriptors, accept failed at once on every try: the daemon spun
  // on a CPU and the client waited unanswered until another one left.
  TEST_CASE("out of file descriptors, a client is refused with the cause, the daemon idles, and serves once some close") {
    daemon_process d({}, "nofile", rlimit{48, 48});  // below max-connections: descriptors run out first
    REQUIRE(d.started());
    std::vector<std::unique_ptr<raw_client>> served;
    std::optional<raw_client::frame> refused;
    while (!refused && served.size() < 100) {
      auto c = std::make_unique<raw_client>(d.socket);
      REQUIRE(c->connected());
      auto reply = greet(*c);
      REQUIRE_MESSAGE(reply, "no reply after ", served.size(), " connections: the client was left hanging");
      if (reply->status() == errc::ok) served.push_back(std::move(c));
      else refused = std::move(reply);
    }
    REQUIRE(refused);
    CHECK(refused->status() == errc::unavailable);
    auto parts = proto::split_reply(refused->payload);
    REQUIRE(parts);
    CHECK(parts->message.find("out of file descriptors") != std::string::npos);
    CHECK(served.size() > 10);  // 48 descriptors, less the daemon's own

    // Still out of descriptors: clients that come are refused at once, and
    // in between the daemon waits rather than retrying.
    const auto t0 = std::chrono::steady_clock::now();
    const double cpu0 = cpu_seconds(d.pid());
    for (int i = 0; i < 3; ++i) {
      raw_client again(d.socket);
      auto r = greet(again);
      REQUIRE(r);
      CHECK(r->status() == errc::unavailable);
      std::this_thread::sleep_for(std::chrono::milliseconds(350));
    }
    const double cpu = cpu_seconds(d.pid()) - cpu0;
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CHECK_MESSAGE(cpu < 0.3 * wall, "the daemon used ", cpu, " s of CPU in ", wall, " s");

    served.resize(served.size() - 4);  // their sessions end and give their descriptors back
    bool ok = false;
    for (int i = 0; i < 50 && !ok; ++i) {
      raw_client next(d.socket);
      auto r = greet(next);
      ok = r && r->status() == errc::ok && next.call(msg::stats).has_value();
      if (!ok) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    CHECK(ok);
    served.clear();
    CHECK(d.stop(SIGTERM) == 0);
    CHECK_FALSE(segment::exists(d.heap));
  }

  TEST_CASE("the daemon raises its soft descriptor limit to the hard limit") {
    rlimit mine{};
    REQUIRE(getrlimit(RLIMIT_NOFILE, &mine) == 0);
    if (mine.rlim_max <= 64) {
      MESSAGE("skipped: the hard descriptor limit is too low to start below it");
      return;
    }
    daemon_process d({}, "nofile-raise", rlimit{64, mine.rlim_max});
    REQUIRE(d.started());
    rlimit got{};
    REQUIRE(prlimit(d.pid(), RLIMIT_NOFILE, nullptr, &got) == 0);
    CHECK(got.rlim_cur == mine.rlim_max);
  }

  TEST_CASE("a client that stops reading its replies holds up only itself, and gets every reply whole later") {
    daemon_process d;
    REQUIRE(d.started());
    raw_client greedy(d.socket);
    REQUIRE(greedy.hello());
    constexpr int requests = 4000;  // 16 MB of replies
    REQUIRE(greedy.send_bytes(pipelined_class_tables(requests, 1000)));
    usleep(200000);
    raw_client other(d.socket);
    const auto t0 = std::chrono::steady_clock::now();
    REQUIRE(other.hello());
    CHECK(other.call(msg::stats).has_value());
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(1));
    int whole = 0;
    for (int i = 0; i < requests; ++i) {
      auto f = greedy.read_frame();
      if (!f || f->header.request_id != static_cast<std::uint32_t>(1000 + i) || f->status() != errc::ok) break;
      auto parts = proto::split_reply(f->payload);
      if (!parts || !proto::decode_class_table(parts->body)) break;
      ++whole;
    }
    CHECK(whole == requests);
  }

  TEST_CASE("a daemon stops within seconds even while a client blocks its replies, and the others get the notice") {
    daemon_process d;
    REQUIRE(d.started());
    raw_client greedy(d.socket);
    REQUIRE(greedy.hello());
    REQUIRE(greedy.send_bytes(pipelined_class_tables(4000, 0)));
    raw_client idle(d.socket);
    REQUIRE(idle.hello());
    REQUIRE(refill(idle, span_class::make(3, true).value, 1).size() == 1);
    usleep(200000);  // the greedy session is now blocked in its send
    const auto t0 = std::chrono::steady_clock::now();
    CHECK(d.stop(SIGTERM) == 0);
    CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
    auto notice = idle.read_frame();
    REQUIRE(notice);
    CHECK(notice->header.type == static_cast<std::uint16_t>(msg::shutdown));
    CHECK_FALSE(segment::exists(d.heap));
  }

  TEST_CASE("other protocol and layout versions are refused with their numbers") {
    daemon_process d;
    REQUIRE(d.started());
    raw_client c(d.socket);
    auto hello = proto::make_request(msg::hello, 1,
                                     proto::encode(proto::hello_msg{layout_version + 1, 1, "future"}));
    REQUIRE(c.send_bytes(hello));
    auto r = c.read_frame();
    REQUIRE(r);
    CHECK(r->status() == errc::layout_mismatch);
    CHECK(proto::split_reply(r->payload)->message.find(std::to_string(layout_version + 1)) != std::string::npos);
    auto v2 = proto::make_request(msg::stats, 2);
    v2[6] = proto::protocol_version + 1;  // a protocol version from the future
    REQUIRE(c.send_bytes(v2));
    auto r2 = c.read_frame();
    REQUIRE(r2);
    CHECK(r2->status() == errc::protocol_error);
    CHECK(proto::split_reply(r2->payload)->message.find("protocol version " + std::to_string(proto::protocol_version + 1)) !=
          std::string::npos);
    CHECK(c.eof());
  }

  TEST_CASE("docs/protocol.md names the protocol version the daemon speaks, and the one before is refused") {
    const std::string docs = std::string(SHMALLOC_TEST_DATA_DIR) + "/../../docs/protocol.md";
    std::ifstream in(docs);
    REQUIRE_MESSAGE(in, "cannot read " << docs);
    std::string title;
    std::getline(in, title);
    const std::string v = std::to_string(proto::protocol_version);
    CHECK(title == "# The shmallocd control protocol (version " + v + ")");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(text.find("| 6 | u16 | version | the sender's protocol version (" + v + ") |") != std::string::npos);
    daemon_process d;
    REQUIRE(d.started());
    raw_client c(d.socket);
    auto old = proto::make_request(msg::stats, 1);
    old[6] = proto::protocol_version - 1;
    REQUIRE(c.send_bytes(old));
    auto r = c.read_frame();
    REQUIRE(r);
    CHECK(r->status() == errc::protocol_error);
  }

  TEST_CASE("the socket has an explicit mode and peers of other uids are refused unless allowed") {
    if (geteuid() != 0) {
      MESSAGE("skipped: needs root to connect as another uid");
      return;
    }
    constexpr uid_t nobody = 65534;
    auto connect_as_nobody = [](const std::string& sock) -> int {  // 0 welcome, 1 refused, 2 no connection
      const pid_t pid = fork();
      if (pid == 0) {
        if (setgid(nobody) != 0 || setuid(nobody) != 0) _exit(3);
        raw_client c(sock);
        if (!c.connected()) _exit(2);
        auto f = c.call(msg::hello, proto::encode(proto::hello_msg{layout_version, 1, "nobody"}));
        _exit(f && f->status() == errc::ok ? 0 : f && f->status() == errc::permission_denied ? 1 : 4);
      }
      int status = 0;
      waitpid(pid, &status, 0);
      return WEXITSTATUS(status);
    };
    for (bool allowed : {false, true}) {
      std::vector<std::string> extra{"--socket-mode", "0666"};
      if (allowed) extra.insert(extra.end(), {"--allow-uid", std::to_string(nobody)});
      daemon_process d(extra);
      REQUIRE(d.started());
      struct stat st {};
      REQUIRE(stat(d.socket.c_str(), &st) == 0);
      CHECK((st.st_mode & 0777) == 0666);
      chmod(d.dir.c_str(), 0755);  // let nobody reach the socket: the credential check must refuse it
      CHECK(connect_as_nobody(d.socket) == (allowed ? 0 : 1));
    }
    daemon_process def;
    REQUIRE(def.started());
    struct stat st {};
    REQUIRE(stat(def.socket.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0660);
  }
}

TEST_SUITE("shmallocd settings") {
  TEST_CASE("SIGHUP reloads the quota from the config file, and a bad file keeps the old settings") {
    char tmpl[] = "/tmp/shmalloc-test-conf-XXXXXX";
    const std::string dir = mkdtemp(tmpl);
    const std::string conf = dir + "/shmallocd.toml";
    auto write_conf = [&conf](const std::string& text) {
      FILE* f = std::fopen(conf.c_str(), "w");
      REQUIRE(f);
      std::fputs(text.c_str(), f);
      std::fclose(f);
    };
    write_conf("quota = \"1M\"\nscavenge_delay = \"10s\"\n");
    daemon_process d({"--config", conf});
    REQUIRE(d.started());
    raw_client c(d.socket);
    REQUIRE(c.hello());
    auto alloc = [&c] {
      auto f = c.call(msg::alloc_large, proto::encode(proto::alloc_large_msg{600 << 10, true}));
      REQUIRE(f);
      return f->status();
    };
    CHECK(alloc() == errc::ok);
    CHECK(alloc() == errc::quota_exceeded);

    write_conf("quota = \"not a size\"\n");
    kill(d.pid(), SIGHUP);
    usleep(200000);
    CHECK(alloc() == errc::quota_exceeded);  // still the old quota, and still serving

    write_conf("quota = \"4M\"\n");
    kill(d.pid(), SIGHUP);
    errc got = errc::quota_exceeded;
    for (int i = 0; i < 100 && got != errc::ok; ++i) {
      usleep(20000);
      got = alloc();
    }
    CHECK(got == errc::ok);
    CHECK(d.stop(SIGTERM) == 0);
    std::remove(conf.c_str());
    rmdir(dir.c_str());
  }

  TEST_CASE("flags win over the environment, which wins over the config file") {
    char tmpl[] = "/tmp/shmalloc-test-conf-XXXXXX";
    const std::string dir = mkdtemp(tmpl);
    const std::string conf = dir + "/c.toml";
    FILE* f = std::fopen(conf.c_str(), "w");
    REQUIRE(f);
    std::fputs("capacity = \"128M\"\n", f);
    std::fclose(f);
    // The capacity a daemon started this way reports in its welcome.
    auto capacity = [&](std::vector<std::string> extra, const char* env) -> std::uint64_t {
      if (env) setenv("SHMALLOC_CAPACITY", env, 1);
      const std::string sock = dir + "/d.sock";
      std::vector<std::string> args{"--heap", unique_heap_name("layers"), "--socket", sock, "--config", conf,
                                    "--log-level", "off"};
      args.insert(args.end(), extra.begin(), extra.end());
      const pid_t pid = spawn_daemon(args, sock);
      unsetenv("SHMALLOC_CAPACITY");
      if (pid <= 0) return 0;
      std::uint64_t got = 0;
      {
        raw_client c(sock);
        if (auto w = c.hello()) got = w->capacity;
      }
      kill(pid, SIGTERM);  // removes its heap and socket
      waitpid(pid, nullptr, 0);
      return got;
    };
    CHECK(capacity({}, nullptr) == 128ULL << 20);
    CHECK(capacity({}, "192M") == 192ULL << 20);
    CHECK(capacity({"--capacity", "256M"}, "192M") == 256ULL << 20);
    std::remove(conf.c_str());
    rmdir(dir.c_str());
  }
}
