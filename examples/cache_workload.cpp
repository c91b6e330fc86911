// cache_workload: the main job. Several processes share one cache through
// libshmalloc_cache, the way worker processes of one service share a cache
// on a host:
//   - readers pick keys by a Zipf law (s = 0.99, a few keys hot), read them
//     zero-copy and check every byte; on a miss they compute the value and
//     put it (cache-aside);
//   - one writer refreshes entries with new versions, some with a TTL;
//   - one more writer, of large values, is SIGKILLed in the middle of its
//     puts: the cache must stay consistent and its memory accounted for.
// At the end it checks the cache (shmalloc_cache_check) and prints the
// throughput, the hit ratio and the cache's counters. Exit status 1 if any
// value read was wrong or the check found a problem.
//
//   cache_workload [--socket PATH] [--readers 4] [--seconds 5] [--keys 20000] [--budget-mib 8]
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "shmalloc/cache.hpp"

namespace {

struct options {
  std::string socket;
  int readers = 4;
  double seconds = 5;
  std::uint32_t keys = 20000;
  std::uint64_t budget_mib = 8;
};

// What a worker process reports to the parent through a pipe.
struct report {
  std::uint64_t gets = 0, hits = 0, puts = 0, bad = 0;
  double seconds = 0;
  std::uint64_t p50_ns = 0, p99_ns = 0;
};

// Values describe themselves: key, version and length, then bytes that
// follow from them. A torn value, another key's, or one read after its
// memory was reused cannot pass value_ok.
std::size_t length_of(std::uint32_t key, std::uint32_t version) { return 64 + (key * 2654435761u + version * 40503u) % 1984; }

void make_value(std::uint32_t key, std::uint32_t version, std::size_t len, std::string& v) {
  v.resize(len);
  std::memcpy(v.data(), &key, 4);
  std::memcpy(v.data() + 4, &version, 4);
  const auto n = static_cast<std::uint32_t>(len);
  std::memcpy(v.data() + 8, &n, 4);
  for (std::size_t i = 12; i < len; ++i) v[i] = static_cast<char>(key * 131 + version * 7 + i);
}

bool value_ok(std::uint32_t key, std::string_view v) {
  if (v.size() < 12) return false;
  std::uint32_t k = 0, version = 0, n = 0;
  std::memcpy(&k, v.data(), 4);
  std::memcpy(&version, v.data() + 4, 4);
  std::memcpy(&n, v.data() + 8, 4);
  if (k != key || n != v.size()) return false;
  for (std::size_t i = 12; i < v.size(); ++i)
    if (v[i] != static_cast<char>(key * 131 + version * 7 + i)) return false;
  return true;
}

std::string key_name(std::uint32_t k) { return "item:" + std::to_string(k); }

// Zipf's law over keys 0..n-1: the CDF, searched with a uniform draw.
class zipf {
 public:
  zipf(std::uint32_t n, double s) : cdf_(n) {
    double sum = 0;
    for (std::uint32_t i = 0; i < n; ++i) cdf_[i] = (sum += 1.0 / std::pow(i + 1.0, s));
    for (double& c : cdf_) c /= sum;
  }
  std::uint32_t operator()(std::mt19937_64& rng) const {
    const double u = std::uniform_real_distribution<double>(0, 1)(rng);
    return static_cast<std::uint32_t>(std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin());
  }

 private:
  std::vector<double> cdf_;
};

std::uint64_t now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000u + static_cast<std::uint64_t>(ts.tv_nsec);
}

void percentiles(std::vector<std::uint64_t>& lat, report& r) {
  if (lat.empty()) return;
  std::sort(lat.begin(), lat.end());
  r.p50_ns = lat[lat.size() / 2];
  r.p99_ns = lat[lat.size() * 99 / 100];
}

report read_loop(shmalloc::cache& c, const zipf& z, const options& o, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  report r;
  std::vector<std::uint64_t> lat;
  std::string v;
  const std::uint64_t start = now_ns(), end = start + static_cast<std::uint64_t>(o.seconds * 1e9);
  for (std::uint64_t i = 0;; ++i) {
    if ((i & 255) == 0 && now_ns() >= end) break;
    const std::uint32_t k = z(rng);
    const std::string key = key_name(k);
    const bool timed = (i & 63) == 0;
    const std::uint64_t t0 = timed ? now_ns() : 0;
    ++r.gets;
    if (auto view = c.get(key)) {
      ++r.hits;
      if (!value_ok(k, view->str())) ++r.bad;
    } else {
      make_value(k, 0, length_of(k, 0), v);  // cache-aside: compute, then fill
      c.put(key, v);
      ++r.puts;
    }
    if (timed) lat.push_back(now_ns() - t0);
  }
  r.seconds = static_cast<double>(now_ns() - start) / 1e9;
  percentiles(lat, r);
  return r;
}

report write_loop(shmalloc::cache& c, const zipf& z, const options& o, std::uint64_t seed, bool large) {
  std::mt19937_64 rng(seed);
  report r;
  std::string v;
  const std::uint64_t start = now_ns(), end = start + static_cast<std::uint64_t>(o.seconds * 1e9);
  for (std::uint32_t version = 1; now_ns() < end; ++version) {
    const std::uint32_t k = z(rng);
    make_value(k, version, large ? 40000 + length_of(k, version) : length_of(k, version), v);
    c.put(key_name(k), v, version % 4 == 0 ? std::chrono::milliseconds(2000) : std::chrono::milliseconds(0));
    ++r.puts;
    if (!large) std::this_thread::sleep_for(std::chrono::microseconds(200));  // a refresh rate, not a flood
  }
  r.seconds = static_cast<double>(now_ns() - start) / 1e9;
  return r;
}

// Forks a worker that writes its report to a pipe; returns its pid.
pid_t spawn(int* read_fd, const std::function<report()>& work) {
  int fds[2];
  if (pipe(fds) != 0) return -1;
  const pid_t pid = fork();
  if (pid == 0) {  // never returns into main: an error ends the worker alone
    close(fds[0]);
    try {
      const report r = work();
      const bool ok = write(fds[1], &r, sizeof r) == static_cast<ssize_t>(sizeof r);
      _exit(ok ? 0 : 3);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cache_workload: worker %d: %s\n", static_cast<int>(getpid()), e.what());
      _exit(4);
    }
  }
  close(fds[1]);
  *read_fd = fds[0];
  return pid;
}

bool collect(pid_t pid, int fd, report* r) {
  const bool got = read(fd, r, sizeof *r) == static_cast<ssize_t>(sizeof *r);
  close(fd);
  int status = 0;
  waitpid(pid, &status, 0);
  return got && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"cache_workload: processes sharing one shmalloc cache (the main job)"};
  app.add_option("--socket", o.socket, "shmallocd's socket (default: SHMALLOC_SOCKET or the default path)");
  app.add_option("--readers", o.readers, "reader processes")->check(CLI::Range(1, 64));
  app.add_option("--seconds", o.seconds, "how long the workers run")->check(CLI::Range(0.1, 3600.0));
  app.add_option("--keys", o.keys, "distinct keys")->check(CLI::Range(1u, 10'000'000u));
  app.add_option("--budget-mib", o.budget_mib, "the cache's byte budget, MiB")->check(CLI::Range(1u, 1u << 20));
  CLI11_PARSE(app, argc, argv);

  try {
    shmalloc::heap heap(o.socket.empty() ? nullptr : o.socket.c_str());
    auto cache = shmalloc::cache::open("demo", o.budget_mib << 20);
    const zipf z(o.keys, 0.99);
    std::printf("cache_workload: %d readers (Zipf 0.99 over %u keys, cache-aside), 1 writer refreshing entries,\n"
                "  1 writer of large values killed mid-run; %.1f s; budget %llu MiB\n",
                o.readers, o.keys, o.seconds, static_cast<unsigned long long>(o.budget_mib));
    std::fflush(stdout);  // before the forks, or each child prints it again

    std::vector<std::pair<pid_t, int>> readers;
    for (int i = 0; i < o.readers; ++i) {
      int fd = -1;
      const pid_t pid = spawn(&fd, [&, i] { return read_loop(cache, z, o, 100 + static_cast<std::uint64_t>(i)); });
      readers.emplace_back(pid, fd);
    }
    int writer_fd = -1;
    const pid_t writer = spawn(&writer_fd, [&] { return write_loop(cache, z, o, 7, false); });
    int victim_fd = -1;
    const pid_t victim = spawn(&victim_fd, [&] { return write_loop(cache, z, o, 9, true); });

    std::this_thread::sleep_for(std::chrono::duration<double>(o.seconds / 3));
    kill(victim, SIGKILL);
    int status = 0;
    waitpid(victim, &status, 0);
    close(victim_fd);
    std::printf("  killed writer pid %d with SIGKILL in the middle of its puts\n", static_cast<int>(victim));

    report total;
    double slowest = 0;
    bool workers_ok = true;
    std::vector<std::uint64_t> p50s, p99s;
    for (auto [pid, fd] : readers) {
      report r;
      workers_ok = collect(pid, fd, &r) && workers_ok;
      total.gets += r.gets;
      total.hits += r.hits;
      total.puts += r.puts;
      total.bad += r.bad;
      slowest = std::max(slowest, r.seconds);
      p50s.push_back(r.p50_ns);
      p99s.push_back(r.p99_ns);
    }
    report w;
    workers_ok = collect(writer, writer_fd, &w) && workers_ok;

    const int problems = cache.check();  // takes back the killed writer's slot, repairs what it left
    const auto s = cache.stats();
    std::sort(p50s.begin(), p50s.end());
    std::sort(p99s.begin(), p99s.end());
    std::printf("-- result\n");
    std::printf("  gets: %llu in %.2f s = %.2f M gets/s from %d processes (p50 %llu ns, p99 %llu ns, median of readers)\n",
                static_cast<unsigned long long>(total.gets), slowest, static_cast<double>(total.gets) / slowest / 1e6,
                o.readers, static_cast<unsigned long long>(p50s[p50s.size() / 2]),
                static_cast<unsigned long long>(p99s[p99s.size() / 2]));
    std::printf("  hit ratio: %.1f%% (readers), cache-aside fills: %llu, writer refreshes: %llu\n",
                100.0 * static_cast<double>(total.hits) / static_cast<double>(std::max<std::uint64_t>(total.gets, 1)),
                static_cast<unsigned long long>(total.puts), static_cast<unsigned long long>(w.puts));
    std::printf("  values checked: %llu, wrong: %llu\n", static_cast<unsigned long long>(total.hits),
                static_cast<unsigned long long>(total.bad));
    std::printf("  cache: %llu items, %.1f MiB of %llu MiB, %llu evictions, %llu expirations, %llu shard repairs\n",
                static_cast<unsigned long long>(s.items), static_cast<double>(s.bytes) / (1 << 20),
                static_cast<unsigned long long>(o.budget_mib), static_cast<unsigned long long>(s.evictions),
                static_cast<unsigned long long>(s.expirations), static_cast<unsigned long long>(s.repairs));
    std::printf("  cache check after the kill: %s\n", problems == 0 ? "consistent" : "PROBLEMS FOUND");
    if (total.bad != 0 || problems != 0 || !workers_ok) {
      std::fprintf(stderr, "cache_workload: FAILED (wrong values %llu, check problems %d, workers ok %d)\n",
                   static_cast<unsigned long long>(total.bad), problems, workers_ok ? 1 : 0);
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cache_workload: %s\n", e.what());
    return 1;
  }
}
