// Peers under another uid. The test, as root, starts shmallocd and forks
// children that drop to a uid no account uses: without --allow-uid such a
// peer is refused and told why, and cannot map the heap behind the
// daemon's back, while the daemon goes on serving everyone else; with
// --allow-uid (or --allow-gid) it is served. The socket and the heap's
// shared-memory object carry the modes their settings give, whatever the
// umask. Not as root: each test says it is skipped.
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "security/security_support.hpp"
#include "shm/segment.hpp"
#include "shmalloc/shmalloc.h"
#include "support/daemon_process.hpp"

using namespace shmalloc;
using namespace shmalloc::test;
using proto::msg;

namespace {

// A daemon whose socket the test's other uids may reach: the socket is
// 0666 (the daemon's check is what must refuse them), its directory
// traversable by all but not listable.
struct open_daemon {
  daemon_process d;
  explicit open_daemon(std::vector<std::string> extra) : d(with_open_socket(std::move(extra))) {
    REQUIRE(d.started());
    REQUIRE(chmod(d.dir.c_str(), 0711) == 0);
  }
  static std::vector<std::string> with_open_socket(std::vector<std::string> extra) {
    extra.insert(extra.end(), {"--socket-mode", "0666"});
    return extra;
  }
};

// In a child: hello over a raw connection. 0 on a welcome; the refusal's
// errc otherwise (its message must name the peer's uid), 100 + n for a
// broken exchange.
int raw_hello(const std::string& socket) {
  raw_client c(socket);
  if (!c.connected()) return 101;
  auto f = c.call(msg::hello, proto::encode(proto::hello_msg{layout_version, static_cast<std::uint32_t>(getpid()), "peer"}));
  if (!f) return 102;
  if (f->status() == errc::ok) return 0;
  auto parts = proto::split_reply(f->payload);
  if (!parts || parts->message.find("uid " + std::to_string(getuid())) == std::string::npos) return 103;
  std::fprintf(stderr, "refused: %s\n", parts->message.c_str());
  return c.eof() ? static_cast<int>(f->status()) : 104;
}

// In a child: a few objects through libshmalloc, written and freed; 0, or
// the negative code of a failed attach as a positive exit code.
int use_heap(const std::string& socket) {
  if (const int rc = shmalloc_attach(socket.c_str()); rc != 0) {
    std::fprintf(stderr, "shmalloc_attach: %s\n", shmalloc_strerror(rc));
    return -rc;
  }
  for (std::size_t n : {16u, 300u, 70000u}) {
    auto* p = static_cast<char*>(shmalloc_alloc(n));
    if (p == nullptr) return 110;
    std::memset(p, 0x5a, n);
    shmalloc_free(p);
  }
  shmalloc_detach();
  return 0;
}

std::vector<std::uint32_t> refill(raw_client& c) {
  auto f = c.call(msg::refill, proto::encode(proto::refill_msg{span_class::make(5, false).value, 1}));
  if (!f || f->status() != errc::ok) return {};
  auto list = proto::decode_span_list(proto::split_reply(f->payload)->body, proto::max_refill);
  return list ? list->span_ids : std::vector<std::uint32_t>{};
}

mode_t mode_of(const std::string& path) {
  struct stat st {};
  REQUIRE(stat(path.c_str(), &st) == 0);
  return st.st_mode & 07777;
}

}  // namespace

TEST_SUITE("security: peers under another uid") {
  TEST_CASE("a peer of a uid not allowed is refused with permission_denied naming its uid, and others are still served") {
    if (!root_or_skip("a peer of a uid not allowed is refused")) return;
    open_daemon od({});
    const std::string sock = od.d.socket, heap = od.d.heap;
    const uid_t uid = unused_uid();
    raw_client before(sock);
    REQUIRE(before.hello("before"));

    const child_end raw = run_child([&] { return raw_hello(sock); }, as_user(uid));
    CHECK_MESSAGE(raw.exit_code == static_cast<int>(errc::permission_denied), raw.err);
    // libshmalloc: attach fails and says why (not "unavailable"),
    // allocation gives NULL, nothing else happens.
    const child_end lib = run_child([&] {
      const int rc = shmalloc_attach(sock.c_str());
      std::fprintf(stderr, "shmalloc_attach: %d %s\n", rc, shmalloc_strerror(rc));
      if (rc != -static_cast<int>(errc::permission_denied)) return 1;
      return shmalloc_alloc(64) == nullptr ? 0 : 2;
    }, as_user(uid));
    CHECK_MESSAGE(lib.exit_code == 0, lib.err);
    // Nor can it go round the socket: the heap object is the daemon's, 0600.
    const child_end direct = run_child([&] {
      auto seg = segment::attach(heap);
      return !seg && seg.code() == errc::permission_denied ? 0 : 1;
    }, as_user(uid));
    CHECK(direct.exit_code == 0);

    // The connection made before, and a new one, are served as before.
    CHECK(refill(before).size() == 1);
    raw_client after(sock);
    CHECK(after.hello("after"));
    CHECK(refill(after).size() == 1);
    CHECK(daemon_stats(after).clients == 2);
  }

  TEST_CASE("a peer of a uid given to --allow-uid, or of a gid given to --allow-gid, is served") {
    if (!root_or_skip("a peer of an allowed uid or gid is served")) return;
    const uid_t uid = unused_uid();
    const uid_t other = uid + 1;  // not allowed itself; its gid is
    open_daemon od({"--allow-uid", std::to_string(uid), "--allow-gid", std::to_string(uid + 2)});
    const std::string sock = od.d.socket;
    CHECK(run_child([&] { return raw_hello(sock); }, as_user(uid)).exit_code == 0);
    CHECK(run_child([&] { return raw_hello(sock); }, as_user(other, static_cast<gid_t>(uid + 2))).exit_code == 0);
    CHECK(run_child([&] { return raw_hello(sock); }, as_user(other)).exit_code == static_cast<int>(errc::permission_denied));
  }

  TEST_CASE("an allowed peer maps the heap only if --heap-mode lets it: else attach says permission_denied") {
    if (!root_or_skip("an allowed peer maps the heap only if --heap-mode lets it")) return;
    const uid_t uid = unused_uid();
    {
      open_daemon od({"--allow-uid", std::to_string(uid)});  // the default heap mode, 0600
      const std::string sock = od.d.socket;
      const child_end end = run_child([&] { return use_heap(sock); }, as_user(uid));
      CHECK_MESSAGE(end.exit_code == static_cast<int>(errc::permission_denied), end.err);
      CHECK(end.err.find("permission") != std::string::npos);
    }
    {
      open_daemon od({"--allow-uid", std::to_string(uid), "--heap-mode", "0666", "--keep-heap"});
      const std::string sock = od.d.socket;
      const child_end end = run_child([&] { return use_heap(sock); }, as_user(uid));
      CHECK_MESSAGE(end.exit_code == 0, end.err);
      check_heap_after(od.d);
    }
  }
}

// Not a matter of uids: runs as any user.
TEST_SUITE("security: modes") {
  TEST_CASE("the socket and the heap object have the modes their settings give, whatever the umask") {
    struct expect {
      std::vector<std::string> args;
      mode_t umask, socket, heap;
    };
    const std::vector<expect> cases{
        {{}, 0, 0660, 0600},  // the defaults: neither is world-readable, even under umask 0
        {{}, 0077, 0660, 0600},
        {{"--socket-mode", "0600", "--heap-mode", "0640"}, 0, 0600, 0640},
        {{"--socket-mode", "0666", "--heap-mode", "0666"}, 0077, 0666, 0666},
    };
    for (const expect& e : cases) {
      CAPTURE(e.umask);
      CAPTURE(e.socket);
      const mode_t was = umask(e.umask);  // the daemon inherits it
      daemon_process d(e.args);
      umask(was);
      REQUIRE(d.started());
      CHECK(mode_of(d.socket) == e.socket);
      CHECK(mode_of("/dev/shm/" + d.heap) == e.heap);
      struct stat st {};
      REQUIRE(stat(("/dev/shm/" + d.heap).c_str(), &st) == 0);
      CHECK(st.st_uid == geteuid());
    }
  }
}
