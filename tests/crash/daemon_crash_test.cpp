// Crash points, the daemon (issue 14): shmallocd built with crash points
// (shmallocd_crash) runs with --keep-heap and is killed with SIGKILL at
// SHMALLOC_CRASH_POINTS_DAEMON (default 100) hits spread over a stretch of
// a client's work, while the client (production libshmalloc) keeps live
// objects each filled with a pattern its handle decides. Each time, a
// production shmallocd adopts the heap (it refuses one that fails the
// heap check), the client reattaches and goes on, and the next crash daemon
// takes over after a SIGTERM. At the end the client checks every object (an
// object handed out twice shows as a clobbered pattern), frees them all and
// detaches, and the heap checks out.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "crash/crash_support.hpp"
#include "shmalloc/shmalloc.h"
#include "support/daemon_process.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;
using namespace shmalloc::crash_test;
using namespace shmalloc::test;

namespace {

// Shared between the test and its client process.
struct client_board {
  std::atomic<std::uint64_t> cycles{0};  // operations done
  std::atomic<std::uint64_t> refused{0};  // allocations that failed (no daemon)
  std::atomic<int> stop{0};
};

std::uint8_t pattern_byte(std::uint64_t h, std::size_t i) { return static_cast<std::uint8_t>((h >> 4) * 131 + i * 7 + 1); }
void fill(void* p, std::size_t n) {
  const std::uint64_t h = shmalloc_handle(p);
  auto* b = static_cast<std::uint8_t*>(p);
  for (std::size_t i = 0; i < n; ++i) b[i] = pattern_byte(h, i);
}
bool intact(const void* p, std::size_t n) {
  const std::uint64_t h = shmalloc_handle(p);
  const auto* b = static_cast<const std::uint8_t*>(p);
  for (std::size_t i = 0; i < n; ++i)
    if (b[i] != pattern_byte(h, i)) return false;
  return true;
}

std::size_t size_for(std::mt19937_64& rng) {
  const auto r = rng() % 100;
  if (r < 20) return 1 + rng() % 15;  // tiny (noscan)
  if (r < 75) return 16 + rng() % 500;
  if (r < 97) return 512 + rng() % 32000;
  return 33000 + rng() % 200000;  // large
}

// The client: keeps up to `slots` live objects, checks an object before it
// frees it and another one each step; an allocation refused (no daemon)
// waits and tries again. Exit 0: every object was intact to the end.
int client_life(const std::string& socket, client_board* board) {
  if (shmalloc_attach(socket.c_str()) != 0) return 3;
  constexpr std::size_t slots = 2000;
  std::vector<std::pair<void*, std::size_t>> live(slots, {nullptr, 0});
  std::mt19937_64 rng(14);
  while (board->stop.load() == 0) {
    const std::size_t k = rng() % slots;
    if (auto& [p, n] = live[k]; p != nullptr) {
      if (!intact(p, n)) {
        std::fprintf(stderr, "daemon crash client: object %llu of %zu bytes clobbered\n",
                     static_cast<unsigned long long>(shmalloc_handle(p)), n);
        return 5;
      }
      shmalloc_free(p);
      p = nullptr;
    } else {
      const std::size_t size = size_for(rng);
      void* q = size < 16 ? shmalloc_alloc_noscan(size) : shmalloc_alloc(size);
      if (q == nullptr) {
        board->refused.fetch_add(1);
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      fill(q, size);
      live[k] = {q, size};
    }
    if (const auto& [o, m] = live[rng() % slots]; o != nullptr && !intact(o, m)) return 6;
    if (board->cycles.fetch_add(1) % 5000 == 4999) shmalloc_trim();
  }
  for (auto& [p, n] : live) {
    if (p == nullptr) continue;
    if (!intact(p, n)) return 7;
    shmalloc_free(p);
  }
  shmalloc_detach();
  return 0;
}

// Waits until the client has done `more` cycles (or died, or a minute).
bool client_progress(const client_board* board, pid_t client, std::uint64_t more) {
  const std::uint64_t target = board->cycles.load() + more;
  for (int i = 0; i < 60000 && board->cycles.load() < target; ++i) {
    if (waitpid(client, nullptr, WNOHANG) == client) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return board->cycles.load() >= target;
}

// The client and its heap: a daemon_process names the heap and the socket
// (and removes them at the end); the daemons serving it are started here.
struct setup {
  explicit setup(client_board* b) : d({"--keep-heap"}, "crash-daemon"), board(b) {
    new (board) client_board;
    normal_args = {"--heap", d.heap, "--socket", d.socket, "--keep-heap", "--metrics", "off",
                   "--log-level", "off", "--reattach-grace", "2s", "--capacity", "256M"};
    crash_args = normal_args;
    crash_args.insert(crash_args.begin(), SHMALLOC_CRASH_DAEMON_PATH);
    if (!d.started()) return;
    client = fork();
    if (client == 0) {
      int rc = 2;
      try {
        rc = client_life(d.socket, board);
      } catch (...) {
      }
      _exit(rc);
    }
  }
  ~setup() {
    if (client > 0) {
      kill(client, SIGKILL);
      waitpid(client, nullptr, 0);
    }
  }
  daemon_process d;
  client_board* board;
  pid_t client = -1;
  std::vector<std::string> normal_args, crash_args;
};

}  // namespace

// A daemon killed inside a change to mheap or mcentral leaves the heap half
// changed. This campaign found that the next daemon refused such a heap (80
// of 100 points); now adoption derives the daemon's structures from the
// span table again (mheap::rebuild) before its check.
TEST_CASE("the daemon killed at any crash point with --keep-heap: the next one adopts the heap, no object is handed out twice") {
  const auto t0 = std::chrono::steady_clock::now();
  const std::uint64_t n = count_from_env("SHMALLOC_CRASH_POINTS_DAEMON", 100);
  constexpr std::uint64_t stretch = 1500;  // client cycles a crash daemon serves when no point kills it
  auto* board = static_cast<client_board*>(
      mmap(nullptr, sizeof(client_board), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  REQUIRE(board != MAP_FAILED);
  auto now = std::make_unique<setup>(board);
  // A fresh heap and client, served by the production daemon, which is
  // stopped (SIGTERM, the heap kept) once the client has spans to lose.
  auto warm_up = [&] {
    REQUIRE(now->d.started());
    REQUIRE(client_progress(board, now->client, stretch));
    REQUIRE(now->d.stop(SIGTERM) == 0);
  };
  warm_up();

  // A crash daemon with at (0: count only) serving `stretch` cycles unless
  // a point kills it first; its exit status.
  auto crash_daemon = [&](std::uint64_t at, bool armed) {
    const std::string log = now->d.dir + "/crash.log";
    std::remove(log.c_str());
    child_env env(at, armed, log);
    const pid_t pid = spawn(now->crash_args, env);
    for (std::uint64_t done = 0; done < stretch; done += 100) {
      if (waitpid(pid, nullptr, WNOHANG) == pid) return 128 + SIGKILL;  // the only way it ends by itself
      if (!client_progress(board, now->client, 100)) break;
    }
    kill(pid, SIGTERM);
    return wait_status(pid);
  };
  REQUIRE(crash_daemon(0, true) == 0);
  const std::uint64_t total = total_hits(now->d.dir + "/crash.log");
  REQUIRE(total > 0);

  std::map<std::string, std::uint64_t> by_point;
  std::uint64_t kills = 0, survived = 0, runs = 0, cycles = 0, refused = 0, fresh_heaps = 0;
  std::vector<std::string> failures;
  for (const std::uint64_t at : spread(total, n)) {
    ++runs;
    const int rc = crash_daemon(at, true);
    std::uint64_t hit = 0;
    const std::string point = last_point(now->d.dir + "/crash.log", &hit);
    const std::string where = "SHMALLOC_CRASH_AT=" + std::to_string(at) + " (" + point + ")";
    if (rc == 128 + SIGKILL && !point.empty()) {
      ++kills;
      ++by_point[point];
    } else if (rc == 0 || rc == 128 + SIGTERM) {  // our SIGTERM, perhaps before its handler was set
      ++survived;
    } else {
      failures.push_back(where + ": the crash daemon ended with " + std::to_string(rc));
    }
    // A production daemon adopts the heap (checking it first) and the client
    // goes on with it.
    const pid_t next = spawn_daemon(now->normal_args, now->d.socket);
    const bool going = next > 0 && client_progress(board, now->client, 300);
    if (next > 0) {
      kill(next, SIGTERM);
      if (wait_status(next) != 0) failures.push_back(where + ": the next daemon did not stop cleanly");
    }
    if (next < 0) failures.push_back(where + ": the next daemon refused the heap (its check failed)");
    else if (!going) failures.push_back(where + ": the client made no progress after the restart");
    if (next > 0 && going) continue;
    // That heap is lost: the next points start over on a fresh one.
    cycles += board->cycles.load(), refused += board->refused.load(), ++fresh_heaps;
    now.reset();
    now = std::make_unique<setup>(board);
    warm_up();
  }
  // The end: a production daemon, the client checks and frees everything.
  const pid_t last = spawn_daemon(now->normal_args, now->d.socket);
  CHECK(last > 0);
  board->stop.store(1);
  const int client_rc = wait_status(now->client);
  now->client = -1;
  cycles += board->cycles.load(), refused += board->refused.load();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("daemon crash points: %llu hits in a stretch of %llu client cycles, %llu runs (%llu killed, %llu "
              "survived), %zu distinct points hit, %llu heaps lost; clients: %llu cycles, %llu allocations refused "
              "while no daemon ran; %.1f s\n",
              static_cast<unsigned long long>(total), static_cast<unsigned long long>(stretch),
              static_cast<unsigned long long>(runs), static_cast<unsigned long long>(kills),
              static_cast<unsigned long long>(survived), by_point.size(), static_cast<unsigned long long>(fresh_heaps),
              static_cast<unsigned long long>(cycles), static_cast<unsigned long long>(refused), secs);
  for (const auto& [p, k] : by_point) std::printf("  %-28s %llu\n", p.c_str(), static_cast<unsigned long long>(k));
  for (const auto& f : failures) FAIL_CHECK(f);
  CHECK(client_rc == 0);
  CHECK(runs == n);
  if (last > 0) check_heap_after(last, now->d.heap);
  now.reset();
  munmap(board, sizeof(client_board));
}
