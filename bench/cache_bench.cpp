// cache_bench: the shared cache (cache/) against memcached, Redis and a
// Boost.Interprocess map, with the same get/put mix from 1, 2 and 4 client
// processes. bench/run.sh runs it and writes the table in docs/benchmarks.md.
//
//   cache_bench <system> [--procs 1,2,4] [--seconds 2] [--keys 100000]
//               [--get-percent 90] [--zipf 0.99] [--daemon PATH] [--budget-mb 256]
//               [--memcached-threads 4]
//   system: shmalloc | memcached | redis | boostipc | shmalloc-zerocopy
//
// Each run starts what it measures and stops it by pid:
//   shmalloc   shmallocd from the build tree, on a heap name and socket of
//              its own; the cache is shmalloc::cache (copying get).
//              shmalloc-zerocopy: the same, but gets pin the value and check
//              it where it lies (shmalloc_cache_pin/unpin).
//   memcached  memcached -p <free port> -l 127.0.0.1 -U 0 -m 1024 -t 4
//   redis      redis-server --port <free port> --bind 127.0.0.1 --save ''
//              --appendonly no
//   boostipc   a managed_shared_memory segment holding a boost::unordered_map
//              of shared-memory strings behind one interprocess_mutex (the
//              idiom of Boost.Interprocess's documentation), removed at exit.
// memcached and Redis are spoken to over TCP on loopback with their text
// protocols (memcached get/set, Redis RESP GET/SET), by a minimal client
// written here: one connection per client process, one request at a time,
// waiting for its reply (no pipelining), as a typical application does.
//
// Workload: N keys ("key:0000042"), each with a value of 100..1000 bytes
// whose length and content follow from the key, preloaded. Each client
// process runs its own sequence of operations: Zipf-distributed keys
// (s = 0.99, hot ranks scattered over the key space), 90% gets and 10% puts
// (a put writes the key's value stamped with the writer and a counter).
// Every get is checked: the length, the key stamped in the value and the
// rest of its bytes must match, so no system wins by returning garbage.
// All processes start together and run for a fixed time; each counts its
// operations and times every 64th one with clock_gettime (the latency
// includes two clock reads, printed as "clock,<ns>").
//
// Output: one CSV line per process count,
//   system,procs,gets_per_s,ops_per_s,get_p50_ns,get_p99_ns,put_p50_ns,put_p99_ns,misses,gets,
//   get_mean_ns,put_mean_ns
// "clock,pair_ns" once, and for shmalloc "daemon,procs,requests,puts": the
// control requests shmallocd served during the run. Progress and errors on
// stderr. Exit status 1 if anything failed (a check, a connection, the
// server).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <boost/interprocess/allocators/allocator.hpp>
#include <boost/interprocess/containers/string.hpp>
#include <boost/interprocess/managed_shared_memory.hpp>
#include <boost/interprocess/sync/interprocess_mutex.hpp>
#include <boost/interprocess/sync/scoped_lock.hpp>
#include <boost/unordered_map.hpp>

#ifndef CACHE_BENCH_NO_SHMALLOC
#include "proto/control_client.hpp"
#include "shmalloc/cache.h"
#include "shmalloc/shmalloc.h"
#endif

namespace {

using u32 = std::uint32_t;
using u64 = std::uint64_t;

constexpr int max_procs = 16;
constexpr u32 sample_every = 64;               // every 64th operation is timed
constexpr std::size_t max_samples = 1u << 21;  // per process and kind
constexpr u32 ops_length = 1u << 20;           // each process's operation sequence, cycled
constexpr u32 put_bit = 1u << 31;
constexpr std::size_t max_value = 1000;

u64 now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return u64(ts.tv_sec) * 1'000'000'000u + u64(ts.tv_nsec);
}

u32 clamp_ns(u64 ns) { return u32(std::min<u64>(ns, ~0u)); }

u64 mix(u64 x) {  // splitmix64's finalizer
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "cache_bench: %s\n", what.c_str());
  std::exit(1);
}

struct options {
  std::string system;
  std::vector<int> procs{1, 2, 4};
  double seconds = 2;
  u32 keys = 100'000;
  int get_percent = 90;
  double zipf = 0.99;
  u64 budget_mb = 256;  // shmalloc's cache budget: room for every key (about 70 MB), no evictions
  int memcached_threads = 4;  // memcached's default
#ifdef SHMALLOC_DAEMON_PATH
  std::string daemon = SHMALLOC_DAEMON_PATH;
#else
  std::string daemon;
#endif
};

// ---------------------------------------------------------------------------
// The workload: keys, their values, each process's operations, the check.

// A value: bytes 0..3 the key's index, 4..7 a stamp (0: preloaded; else the
// writer process + 1 in the top 8 bits and its put counter), then bytes that
// follow from the key. Its length follows from the key too.
struct workload {
  u32 nkeys = 0;
  std::vector<std::string> keys;
  std::vector<u64> offset;
  std::vector<u32> length;
  std::vector<char> values;  // every key's preloaded value, end to end
  std::vector<double> cdf;   // Zipf over ranks
  std::vector<u32> key_of_rank;

  workload(u32 n, double s) : nkeys(n) {
    char name[32];
    u64 total = 0;
    for (u32 k = 0; k < n; ++k) {
      std::snprintf(name, sizeof name, "key:%07u", k);
      keys.emplace_back(name);
      offset.push_back(total);
      length.push_back(100 + u32(mix(k) % 901));
      total += length.back();
    }
    values.resize(total);
    for (u32 k = 0; k < n; ++k) {
      char* v = values.data() + offset[k];
      std::memcpy(v, &k, 4);
      std::memset(v + 4, 0, 4);
      for (u32 i = 8; i < length[k]; i += 8) {
        const u64 r = mix((u64(k) << 20) + i);
        std::memcpy(v + i, &r, std::min<u32>(8, length[k] - i));
      }
    }
    cdf.resize(n);
    double sum = 0;
    for (u32 r = 0; r < n; ++r) cdf[r] = sum += 1.0 / std::pow(double(r + 1), s);
    for (double& c : cdf) c /= sum;
    key_of_rank.resize(n);
    for (u32 k = 0; k < n; ++k) key_of_rank[k] = k;
    std::shuffle(key_of_rank.begin(), key_of_rank.end(), std::mt19937_64(12345));
  }

  const char* value(u32 k) const { return values.data() + offset[k]; }

  // A process's operations: key index, put_bit for a put.
  std::vector<u32> operations(u64 seed, int get_percent) const {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> u(0, 1);
    std::vector<u32> ops(ops_length);
    for (u32& op : ops) {
      const auto rank = u32(std::lower_bound(cdf.begin(), cdf.end(), u(rng)) - cdf.begin());
      op = key_of_rank[std::min(rank, nkeys - 1)];
      if (int(rng() % 100) >= get_percent) op |= put_bit;
    }
    return ops;
  }

  // A value got for key k: its length, its key, its bytes; the stamp names
  // the preload (0) or a writer process.
  bool check(u32 k, const char* v, std::size_t n, int procs) const {
    if (n != length[k]) return false;
    u32 key = 0, stamp = 0;
    std::memcpy(&key, v, 4);
    std::memcpy(&stamp, v + 4, 4);
    if (key != k || (stamp != 0 && ((stamp >> 24) == 0 || int(stamp >> 24) > procs))) return false;
    return std::memcmp(v + 8, value(k) + 8, n - 8) == 0;
  }
};

// ---------------------------------------------------------------------------
// Servers started by the benchmark, stopped by pid.

struct temp_dir {
  std::string path;
  temp_dir() {
    char tmpl[] = "/tmp/cache-bench-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) die("mkdtemp failed");
    path = tmpl;
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

pid_t spawn(const std::vector<std::string>& args, const std::string& log) {
  const pid_t pid = fork();
  if (pid < 0) die("fork failed");
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlives the benchmark
    const int in = open("/dev/null", O_RDONLY);
    const int out = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (in >= 0) dup2(in, STDIN_FILENO);
    if (out >= 0) dup2(out, STDOUT_FILENO), dup2(out, STDERR_FILENO);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execvp(argv[0], argv.data());
    std::fprintf(stderr, "cannot run %s: %s\n", argv[0], std::strerror(errno));
    _exit(127);
  }
  return pid;
}

std::string slurp(const std::string& path) {
  std::string s;
  if (FILE* f = std::fopen(path.c_str(), "r")) {
    char buf[4096];
    std::size_t n = 0;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    std::fclose(f);
  }
  return s;
}

// Waits until connect() succeeds (the server listens) or the server exits.
void wait_listening(pid_t pid, const std::function<bool()>& probe, const std::string& what, const std::string& log) {
  for (int i = 0; i < 1000; ++i) {
    if (probe()) return;
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) die(what + " exited at start:\n" + slurp(log));
    usleep(5000);
  }
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  die(what + " did not listen within 5 s:\n" + slurp(log));
}

void stop(pid_t pid, const std::string& what) {
  kill(pid, SIGTERM);
  int status = 0;
  for (int i = 0; i < 1000; ++i) {  // 10 s, then SIGKILL
    if (waitpid(pid, &status, WNOHANG) == pid) return;
    usleep(10000);
  }
  std::fprintf(stderr, "cache_bench: %s did not stop on SIGTERM; killed\n", what.c_str());
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
}

int free_tcp_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0)
    die("cannot find a free port");
  close(fd);
  return ntohs(a.sin_port);
}

int tcp_connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(std::uint16_t(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

// ---------------------------------------------------------------------------
// A connection with a read buffer, for the text protocols.

struct connection {
  int fd = -1;
  std::vector<char> in = std::vector<char>(1 << 16);
  std::size_t pos = 0, end = 0;
  std::string out;

  explicit connection(int port) : fd(tcp_connect(port)) {
    if (fd < 0) throw std::runtime_error("cannot connect to 127.0.0.1:" + std::to_string(port));
  }
  connection(const connection&) = delete;
  ~connection() { close(fd); }

  void flush() {
    std::size_t done = 0;
    while (done < out.size()) {
      const ssize_t n = send(fd, out.data() + done, out.size() - done, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw std::runtime_error(std::string("send: ") + std::strerror(errno));
      done += std::size_t(n);
    }
    out.clear();
  }
  void fill() {
    if (pos == end) pos = end = 0;
    if (end == in.size()) {  // compact
      std::memmove(in.data(), in.data() + pos, end - pos);
      end -= pos;
      pos = 0;
    }
    ssize_t n;
    do n = recv(fd, in.data() + end, in.size() - end, 0);
    while (n < 0 && errno == EINTR);
    if (n <= 0) throw std::runtime_error(n == 0 ? "the server closed the connection" : std::strerror(errno));
    end += std::size_t(n);
  }
  // The next line, without its \r\n.
  std::string_view line() {
    for (std::size_t scanned = pos;;) {
      if (const void* nl = std::memchr(in.data() + scanned, '\n', end - scanned)) {
        const auto at = std::size_t(static_cast<const char*>(nl) - in.data());
        const std::string_view l(in.data() + pos, at - pos - (at > pos && in[at - 1] == '\r'));
        pos = at + 1;
        return l;
      }
      scanned = end - pos;
      fill();
      scanned += pos;
    }
  }
  void read(char* dst, std::size_t n) {
    while (n > 0) {
      if (pos == end) fill();
      const std::size_t k = std::min(n, end - pos);
      if (dst != nullptr) std::memcpy(dst, in.data() + pos, k), dst += k;
      pos += k;
      n -= k;
    }
  }
  void expect(std::string_view want) {
    const std::string_view got = line();
    if (got != want)
      throw std::runtime_error("expected \"" + std::string(want) + "\", got \"" + std::string(got) + "\"");
  }
};

std::size_t parse_size(std::string_view s, const char* what) {
  std::size_t n = 0;
  if (s.empty()) throw std::runtime_error(std::string("bad reply: ") + what);
  for (char c : s) {
    if (c < '0' || c > '9') throw std::runtime_error(std::string("bad reply: ") + what);
    n = n * 10 + std::size_t(c - '0');
  }
  return n;
}

// Reads a value of n bytes into buf (cap bytes); -2 if it did not fit.
long read_value(connection& c, std::size_t n, char* buf, std::size_t cap) {
  if (n > cap) {
    c.read(nullptr, n);
    return -2;
  }
  c.read(buf, n);
  return long(n);
}

// ---------------------------------------------------------------------------
// Clients: connect() in the client process; get returns the value's length,
// -1 on a miss; put stores. Each throws on a protocol or connection error.

// Preloading a text-protocol server: batches of 256 sets sent at once, then
// their replies (each `ok`).
template <class Client>
void preload_pipelined(Client& cl, const workload& w, std::string_view ok) {
  for (u32 k = 0; k < w.nkeys;) {
    const u32 batch_end = std::min(w.nkeys, k + 256);
    for (u32 j = k; j < batch_end; ++j) cl.send_set(w.keys[j], w.value(j), w.length[j]);
    cl.c->flush();
    for (; k < batch_end; ++k) cl.c->expect(ok);
  }
}

// memcached's text protocol.
struct memcached_client {
  int port;
  std::shared_ptr<connection> c;
  void connect() { c = std::make_shared<connection>(port); }
  void send_set(std::string_view key, const char* v, std::size_t n) {
    c->out.append("set ").append(key).append(" 0 0 ").append(std::to_string(n)).append("\r\n");
    c->out.append(v, n).append("\r\n");
  }
  void put(std::string_view key, const char* v, std::size_t n) {
    send_set(key, v, n);
    c->flush();
    c->expect("STORED");
  }
  long get(std::string_view key, char* buf, std::size_t cap, const char**) {
    c->out.append("get ").append(key).append("\r\n");
    c->flush();
    const std::string_view l = c->line();
    if (l == "END") return -1;
    // VALUE <key> <flags> <bytes>
    if (l.substr(0, 6) != "VALUE ") throw std::runtime_error("memcached: unexpected reply " + std::string(l));
    const std::size_t sp = l.rfind(' ');
    const long n = read_value(*c, parse_size(l.substr(sp + 1), "memcached value length"), buf, cap);
    c->expect("");
    c->expect("END");
    return n;
  }
  void preload(const workload& w) { preload_pipelined(*this, w, "STORED"); }
  void finish() { c.reset(); }
};

// Redis's RESP.
struct redis_client {
  int port;
  std::shared_ptr<connection> c;
  void connect() { c = std::make_shared<connection>(port); }
  void bulk(std::string_view s) {
    c->out.append("$").append(std::to_string(s.size())).append("\r\n").append(s).append("\r\n");
  }
  void send_set(std::string_view key, const char* v, std::size_t n) {
    c->out.append("*3\r\n$3\r\nSET\r\n");
    bulk(key);
    bulk(std::string_view(v, n));
  }
  void put(std::string_view key, const char* v, std::size_t n) {
    send_set(key, v, n);
    c->flush();
    c->expect("+OK");
  }
  long get(std::string_view key, char* buf, std::size_t cap, const char**) {
    c->out.append("*2\r\n$3\r\nGET\r\n");
    bulk(key);
    c->flush();
    const std::string_view l = c->line();
    if (l == "$-1") return -1;
    if (l.empty() || l[0] != '$') throw std::runtime_error("redis: unexpected reply " + std::string(l));
    const long n = read_value(*c, parse_size(l.substr(1), "redis bulk length"), buf, cap);
    c->expect("");
    return n;
  }
  void preload(const workload& w) { preload_pipelined(*this, w, "+OK"); }
  void finish() { c.reset(); }
};

// Boost.Interprocess: an unordered_map of shared-memory strings in a
// managed_shared_memory segment, one interprocess_mutex around every get and
// put. A put of an existing key assigns in place (lengths follow from the
// key, so it does not allocate).
namespace bip = boost::interprocess;
using segment_manager = bip::managed_shared_memory::segment_manager;
using shm_string = bip::basic_string<char, std::char_traits<char>, bip::allocator<char, segment_manager>>;
std::string_view as_view(std::string_view s) { return s; }
std::string_view as_view(const shm_string& s) { return {s.data(), s.size()}; }
struct view_hash {
  template <class S>
  std::size_t operator()(const S& s) const {
    return std::hash<std::string_view>{}(as_view(s));
  }
};
struct view_equal {
  template <class A, class B>
  bool operator()(const A& a, const B& b) const {
    return as_view(a) == as_view(b);
  }
};
using shm_map = boost::unordered_map<shm_string, shm_string, view_hash, view_equal,
                                     bip::allocator<std::pair<const shm_string, shm_string>, segment_manager>>;
struct shm_table {
  bip::interprocess_mutex mutex;
  shm_map map;
  shm_table(std::size_t buckets, segment_manager* m) : map(buckets, view_hash(), view_equal(), m) {}
};

struct boostipc_client {
  std::string segment_name;
  std::shared_ptr<bip::managed_shared_memory> segment;
  shm_table* table = nullptr;
  void connect() {
    segment = std::make_shared<bip::managed_shared_memory>(bip::open_only, segment_name.c_str());
    table = segment->find<shm_table>("table").first;
    if (table == nullptr) throw std::runtime_error("boostipc: no table in the segment");
  }
  void create(const workload& w, std::size_t bytes) {
    segment = std::make_shared<bip::managed_shared_memory>(bip::create_only, segment_name.c_str(), bytes);
    table = segment->construct<shm_table>("table")(std::size_t(w.nkeys) * 2, segment->get_segment_manager());
  }
  void put(std::string_view key, const char* v, std::size_t n) {
    bip::scoped_lock<bip::interprocess_mutex> lock(table->mutex);
    auto it = table->map.find(key, view_hash(), view_equal());
    if (it != table->map.end()) {
      it->second.assign(v, v + n);
    } else {
      auto* m = segment->get_segment_manager();
      table->map.emplace(shm_string(key.data(), key.size(), m), shm_string(v, n, m));
    }
  }
  long get(std::string_view key, char* buf, std::size_t cap, const char**) {
    bip::scoped_lock<bip::interprocess_mutex> lock(table->mutex);
    auto it = table->map.find(key, view_hash(), view_equal());
    if (it == table->map.end()) return -1;
    const std::size_t n = it->second.size();
    if (n > cap) return -2;
    std::memcpy(buf, it->second.data(), n);
    return long(n);
  }
  void preload(const workload& w) {
    for (u32 k = 0; k < w.nkeys; ++k) put(w.keys[k], w.value(k), w.length[k]);
  }
  void finish() {
    table = nullptr;
    segment.reset();
  }
};

#ifndef CACHE_BENCH_NO_SHMALLOC
// The shared cache: attach to the benchmark's daemon, open the cache.
const char* cache_name = "cache-bench";
struct shmalloc_client {
  std::string socket;
  u64 budget = 0;  // the preloading process creates the cache with it
  bool zero_copy = false;
  shmalloc_cache* cache = nullptr;
  bool pinned = false;
  static void check(int rc, const char* what) {
    if (rc != 0) throw std::runtime_error(std::string(what) + ": " + shmalloc_strerror(rc));
  }
  void connect() {
    check(shmalloc_attach(socket.c_str()), "shmalloc_attach");
    check(shmalloc_cache_open(cache_name, budget, &cache), "shmalloc_cache_open");
  }
  void put(std::string_view key, const char* v, std::size_t n) {
    check(shmalloc_cache_put(cache, key.data(), key.size(), v, n, 0), "shmalloc_cache_put");
  }
  long get(std::string_view key, char* buf, std::size_t cap, const char** data) {
    std::size_t n = 0;
    if (zero_copy) {  // the value where it lies, pinned until release()
      const void* v = nullptr;
      const int rc = shmalloc_cache_pin(cache, key.data(), key.size(), &v, &n);
      if (rc == -7) return -1;
      check(rc, "shmalloc_cache_pin");
      pinned = true;
      *data = static_cast<const char*>(v);
      return long(n);
    }
    const int rc = shmalloc_cache_get(cache, key.data(), key.size(), buf, cap, &n);
    if (rc == -7) return -1;
    if (rc == -16) return -2;
    check(rc, "shmalloc_cache_get");
    return long(n);
  }
  void release() {
    if (pinned) shmalloc_cache_unpin(cache), pinned = false;
  }
  void preload(const workload& w) {
    for (u32 k = 0; k < w.nkeys; ++k) put(w.keys[k], w.value(k), w.length[k]);
  }
  void finish() {
    shmalloc_cache_close(cache);
    cache = nullptr;
    shmalloc_detach();
  }
};
#endif

// ---------------------------------------------------------------------------
// Client processes.

struct proc_result {
  u64 ops, gets, puts, misses, bad, elapsed_ns, get_samples, put_samples;
  int failed;
  char error[200];
};
struct shared_area {
  std::atomic<int> ready;
  std::atomic<u64> start_ns;
  proc_result result[max_procs];
};

template <class T>
T* shared_map(std::size_t count) {
  void* m = mmap(nullptr, sizeof(T) * count, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) die("mmap failed");
  return static_cast<T*>(m);
}

struct counts {
  u64 ops = 0, gets = 0, puts = 0, misses = 0, bad = 0, get_samples = 0, put_samples = 0;
};

// Runs ops from `at` until end_ns (checked at every timed operation) or
// max_ops. Samples go to get_ns / put_ns when given.
template <class Client>
u64 run_ops(Client& c, const workload& w, const std::vector<u32>& ops, u64 at, u64 end_ns, u64 max_ops, int self,
            int procs, counts& n, u32* get_ns, u32* put_ns) {
  alignas(64) char buf[max_value + 64];
  alignas(64) char put_buf[max_value];
  u32 put_counter = 0;
  for (u64 i = 0; i < max_ops; ++i, ++at) {
    const u32 op = ops[at & (ops_length - 1)];
    const u32 k = op & ~put_bit;
    const std::string_view key = w.keys[k];
    const bool timed = (i % sample_every) == 0;
    if (op & put_bit) {
      std::memcpy(put_buf, w.value(k), w.length[k]);
      const u32 stamp = (u32(self + 1) << 24) | (++put_counter & 0xffffff);
      std::memcpy(put_buf + 4, &stamp, 4);
      const u64 t0 = timed ? now_ns() : 0;
      if (timed && t0 >= end_ns) break;
      c.put(key, put_buf, w.length[k]);
      if (timed) {
        const u64 t1 = now_ns();
        if (put_ns != nullptr && n.put_samples < max_samples) put_ns[n.put_samples++] = clamp_ns(t1 - t0);
      }
      ++n.puts;
    } else {
      const u64 t0 = timed ? now_ns() : 0;
      if (timed && t0 >= end_ns) break;
      const char* data = buf;
      const long got = c.get(key, buf, sizeof buf, &data);
      if (timed) {
        const u64 t1 = now_ns();
        if (get_ns != nullptr && n.get_samples < max_samples) get_ns[n.get_samples++] = clamp_ns(t1 - t0);
      }
      ++n.gets;
      if (got == -1) ++n.misses;
      else if (got < 0 || !w.check(k, data, std::size_t(got), procs)) ++n.bad;
      if constexpr (requires { c.release(); }) c.release();
    }
    ++n.ops;
  }
  return at;
}

template <class Client>
[[noreturn]] void client_process(Client c, const workload& w, const options& o, int self, int procs, shared_area* area,
                                 u32* get_ns, u32* put_ns) {
  proc_result& r = area->result[self];
  try {
    c.connect();
    const auto ops = w.operations(u64(procs) * 1000 + u64(self), o.get_percent);
    // Warm up (the connection, the caches, the pages): 100 ms or 20,000
    // operations, checked like the rest.
    counts warm;
    u64 at = run_ops(c, w, ops, 0, now_ns() + 100'000'000, 20'000, self, procs, warm, nullptr, nullptr);
    if (warm.bad != 0) throw std::runtime_error("a get returned a wrong value during warm-up");
    area->ready.fetch_add(1);
    u64 start = 0;
    while ((start = area->start_ns.load()) == 0) usleep(100);
    while (now_ns() < start) {
    }
    counts n;
    const u64 end = start + u64(o.seconds * 1e9);
    at = run_ops(c, w, ops, at, end, ~u64(0), self, procs, n, get_ns, put_ns);
    r.elapsed_ns = now_ns() - start;
    r.ops = n.ops, r.gets = n.gets, r.puts = n.puts, r.misses = n.misses, r.bad = n.bad;
    r.get_samples = n.get_samples, r.put_samples = n.put_samples;
    c.finish();
  } catch (const std::exception& e) {
    r.failed = 1;
    std::snprintf(r.error, sizeof r.error, "%s", e.what());
    area->ready.fetch_add(1);  // do not hold the others back
    _exit(1);
  }
  _exit(0);
}

double percentile(std::vector<u32>& v, double p) {
  if (v.empty()) return 0;
  const auto at = std::size_t(p * double(v.size() - 1));
  std::nth_element(v.begin(), v.begin() + long(at), v.end());
  return v[at];
}

double mean(const std::vector<u32>& v) {
  double sum = 0;
  for (u32 x : v) sum += x;
  return v.empty() ? 0 : sum / double(v.size());
}

// The ns that two back-to-back clock reads add to a timed operation.
double clock_pair_ns() {
  std::vector<u32> d(100'000);
  for (u32& x : d) {
    const u64 t0 = now_ns();
    x = u32(now_ns() - t0);
  }
  return percentile(d, 0.5);
}

// requests: the daemon's count of control requests (round trips), for
// shmalloc; reported per process count as "daemon,procs,requests,puts".
template <class Client>
bool run_all(const Client& proto, const workload& w, const options& o, const std::function<bool()>& alive,
             const std::function<u64()>& requests = {}) {
  shared_area* area = shared_map<shared_area>(1);
  u32* get_ns = shared_map<u32>(max_procs * max_samples);
  u32* put_ns = shared_map<u32>(max_procs * max_samples);
  bool ok = true;
  for (int procs : o.procs) {
    std::memset(static_cast<void*>(area), 0, sizeof *area);
    std::vector<pid_t> pids;
    for (int i = 0; i < procs; ++i) {
      const pid_t pid = fork();
      if (pid < 0) die("fork failed");
      if (pid == 0)
        client_process(proto, w, o, i, procs, area, get_ns + std::size_t(i) * max_samples,
                       put_ns + std::size_t(i) * max_samples);
      pids.push_back(pid);
    }
    // All start together once all are ready (a client that failed counts as
    // ready; one that crashed is noticed here).
    std::vector<bool> reaped(pids.size());
    while (area->ready.load() < procs) {
      for (std::size_t i = 0; i < pids.size(); ++i)
        if (!reaped[i] && waitpid(pids[i], nullptr, WNOHANG) == pids[i]) {
          reaped[i] = true;
          if (area->result[i].failed == 0) area->ready.fetch_add(1);
        }
      usleep(1000);
    }
    // Round trips from here on: the timed run, and each client's goodbye.
    const u64 requests_before = requests ? requests() : 0;
    area->start_ns.store(now_ns() + 20'000'000);
    for (std::size_t i = 0; i < pids.size(); ++i)
      if (!reaped[i]) waitpid(pids[i], nullptr, 0);
    counts total;
    double gets_per_s = 0, ops_per_s = 0;
    std::vector<u32> gs, ps;
    for (int i = 0; i < procs; ++i) {
      const proc_result& r = area->result[i];
      if (r.failed != 0 || r.elapsed_ns == 0) {
        std::fprintf(stderr, "cache_bench: %s, %d processes: client %d failed: %s\n", o.system.c_str(), procs, i,
                     r.failed != 0 ? r.error : "no result");
        ok = false;
        continue;
      }
      const double secs = double(r.elapsed_ns) / 1e9;
      gets_per_s += double(r.gets) / secs;
      ops_per_s += double(r.ops) / secs;
      total.gets += r.gets, total.puts += r.puts, total.misses += r.misses, total.bad += r.bad;
      gs.insert(gs.end(), get_ns + std::size_t(i) * max_samples, get_ns + std::size_t(i) * max_samples + r.get_samples);
      ps.insert(ps.end(), put_ns + std::size_t(i) * max_samples, put_ns + std::size_t(i) * max_samples + r.put_samples);
    }
    if (total.bad != 0) {
      std::fprintf(stderr, "cache_bench: %s, %d processes: %llu of %llu gets returned a wrong value\n",
                   o.system.c_str(), procs, (unsigned long long)total.bad, (unsigned long long)total.gets);
      ok = false;
    }
    if (!alive()) {
      std::fprintf(stderr, "cache_bench: %s: the server died\n", o.system.c_str());
      ok = false;
    }
    if (!ok) break;
    std::printf("%s,%d,%.0f,%.0f,%.0f,%.0f,%.0f,%.0f,%llu,%llu,%.0f,%.0f\n", o.system.c_str(), procs, gets_per_s,
                ops_per_s, percentile(gs, 0.5), percentile(gs, 0.99), percentile(ps, 0.5), percentile(ps, 0.99),
                (unsigned long long)total.misses, (unsigned long long)total.gets, mean(gs), mean(ps));
    if (requests) {
      // Less the stats request itself.
      const u64 n = requests() - requests_before - 1;
      std::printf("daemon,%d,%llu,%llu\n", procs, (unsigned long long)n, (unsigned long long)total.puts);
      std::fprintf(stderr, "cache_bench: %d processes made %llu control requests to shmallocd (%.1f per 1,000 puts)\n",
                   procs, (unsigned long long)n, 1000.0 * double(n) / double(std::max<u64>(total.puts, 1)));
    }
    std::fflush(stdout);
    std::fprintf(stderr, "cache_bench: %-9s %d processes: %11.0f gets/s, get p50 %.0f ns p99 %.0f ns, %llu misses\n",
                 o.system.c_str(), procs, gets_per_s, percentile(gs, 0.5), percentile(gs, 0.99),
                 (unsigned long long)total.misses);
  }
  munmap(area, sizeof *area);
  munmap(get_ns, sizeof(u32) * max_procs * max_samples);
  munmap(put_ns, sizeof(u32) * max_procs * max_samples);
  return ok;
}

// Preloads in a process of its own (the parent never connects, so every
// client process starts from the same state).
template <class Client>
void preload(Client c, const workload& w) {
  const pid_t pid = fork();
  if (pid == 0) {
    try {
      c.connect();
      c.preload(w);
      c.finish();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cache_bench: preload: %s\n", e.what());
      _exit(1);
    }
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) die("preload failed");
}

bool process_alive(pid_t pid) {
  int status = 0;
  return waitpid(pid, &status, WNOHANG) == 0;
}

std::vector<int> parse_procs(const std::string& s) {
  std::vector<int> v;
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t j = std::min(s.find(',', i), s.size());
    const int p = std::atoi(s.substr(i, j - i).c_str());
    if (p < 1 || p > max_procs) die("--procs: counts from 1 to 16");
    v.push_back(p);
    i = j + 1;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value after " + a);
      return argv[++i];
    };
    if (a == "--procs") o.procs = parse_procs(next());
    else if (a == "--seconds") o.seconds = std::atof(next().c_str());
    else if (a == "--keys") o.keys = u32(std::atol(next().c_str()));
    else if (a == "--get-percent") o.get_percent = std::atoi(next().c_str());
    else if (a == "--zipf") o.zipf = std::atof(next().c_str());
    else if (a == "--daemon") o.daemon = next();
    else if (a == "--budget-mb") o.budget_mb = u64(std::atoll(next().c_str()));
    else if (a == "--memcached-threads") o.memcached_threads = std::atoi(next().c_str());
    else if (a[0] != '-' && o.system.empty()) o.system = a;
    else die("usage: cache_bench shmalloc|memcached|redis|boostipc [--procs 1,2,4] [--seconds S] [--keys N] "
             "[--get-percent P] [--zipf S] [--daemon PATH] [--budget-mb M] [--memcached-threads T]");
  }
  if (o.keys < 1 || o.seconds <= 0 || o.get_percent < 0 || o.get_percent > 100) die("bad options");
  signal(SIGPIPE, SIG_IGN);
  const workload w(o.keys, o.zipf);
  std::printf("clock,%.1f\n", clock_pair_ns());
  temp_dir dir;
  const std::string log = dir.path + "/server.log";
  bool ok = false;

  if (o.system == "memcached" || o.system == "redis") {
    const int port = free_tcp_port();
    std::vector<std::string> args;
    if (o.system == "memcached") {
      // -m: room for every key (the default 64 MB would evict); as root it
      // needs a user to run as.
      args = {"memcached", "-p", std::to_string(port), "-l", "127.0.0.1", "-U", "0", "-m", "1024",
              "-t", std::to_string(o.memcached_threads)};
      if (geteuid() == 0) args.insert(args.end(), {"-u", "nobody"});
    } else {
      args = {"redis-server", "--port", std::to_string(port), "--bind", "127.0.0.1", "--save", "",
              "--appendonly", "no", "--dir", dir.path, "--daemonize", "no"};
    }
    const pid_t server = spawn(args, log);
    wait_listening(
        server,
        [port] {
          const int fd = tcp_connect(port);
          if (fd >= 0) close(fd);
          return fd >= 0;
        },
        o.system, log);
    const auto alive = [server] { return process_alive(server); };
    if (o.system == "memcached") {
      memcached_client c{port, nullptr};
      preload(c, w);
      ok = run_all(c, w, o, alive);
    } else {
      redis_client c{port, nullptr};
      preload(c, w);
      ok = run_all(c, w, o, alive);
    }
    stop(server, o.system);
  } else if (o.system == "boostipc") {
    const std::string name = "cache-bench-bip-" + std::to_string(getpid());
    bip::shared_memory_object::remove(name.c_str());
    struct remover {
      std::string name;
      ~remover() { bip::shared_memory_object::remove(name.c_str()); }
    } remove_at_exit{name};
    {
      boostipc_client creator{name, nullptr, nullptr};
      creator.create(w, std::size_t(512) << 20);
      creator.finish();
    }
    boostipc_client c{name, nullptr, nullptr};
    preload(c, w);
    ok = run_all(c, w, o, [] { return true; });
#ifndef CACHE_BENCH_NO_SHMALLOC
  } else if (o.system == "shmalloc" || o.system == "shmalloc-zerocopy") {
    if (o.daemon.empty()) die("--daemon: the path of shmallocd");
    const std::string heap = "cache-bench-" + std::to_string(getpid());
    const std::string socket = dir.path + "/shmallocd.sock";
    const pid_t daemon = spawn({o.daemon, "--heap", heap, "--socket", socket, "--metrics", "off", "--log-level",
                                "warn", "--capacity", "4G"},
                               log);
    wait_listening(
        daemon,
        [&socket] {
          const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
          sockaddr_un a{};
          a.sun_family = AF_UNIX;
          std::snprintf(a.sun_path, sizeof a.sun_path, "%s", socket.c_str());
          const bool up = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
          close(fd);
          return up;
        },
        "shmallocd", log);
    preload(shmalloc_client{socket, o.budget_mb << 20, false, nullptr, false}, w);
    shmalloc_client c{socket, 0, false, nullptr, false};
    c.zero_copy = o.system == "shmalloc-zerocopy";
    const auto requests = [&socket]() -> u64 {
      shmalloc::control_client cc(socket);
      auto body = cc.request(shmalloc::proto::msg::stats);
      const auto st = body ? shmalloc::proto::decode_stats(body.value()) : std::nullopt;
      return st ? st->control_requests_total : 0;
    };
    ok = run_all(c, w, o, [daemon] { return process_alive(daemon); }, requests);
    stop(daemon, "shmallocd");
    // Nothing of this heap may stay in /dev/shm.
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
      const std::string f = e.path().filename().string();
      if (f.rfind(heap, 0) == 0) {
        std::fprintf(stderr, "cache_bench: shmallocd left /dev/shm/%s; removed\n", f.c_str());
        std::filesystem::remove(e.path(), ec);
        ok = false;
      }
    }
#endif
  } else {
    die("unknown system '" + o.system + "' (shmalloc, memcached, redis, boostipc, shmalloc-zerocopy)");
  }
  if (!ok) {
    const std::string l = slurp(log);
    if (!l.empty()) std::fprintf(stderr, "cache_bench: the server's log:\n%s", l.c_str());
  }
  return ok ? 0 : 1;
}
