// shmallocctl leaks and advise (issue 16, parts 1 and 2), against
// workloads made through libshmalloc: a process that leaks on purpose is
// named first and a process that frees what it allocates is not a grower;
// a workload of 33-byte objects shows the waste of the 48-byte class and the
// boundary that would save it.
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "shmalloc/shmalloc.h"
#include "support/daemon_process.hpp"

using namespace shmalloc::test;
using json = nlohmann::json;

namespace {
json ctl_json(const daemon_process& d, const std::string& command) {
  std::string out, err;
  const int status = run_ctl(command + " --json --socket " + d.socket, &out, &err);
  INFO(err);
  REQUIRE(status == 0);
  return json::parse(out);
}

const json* find_class(const json& rows, int cls) {
  for (const json& r : rows)
    if (r["class"] == cls) return &r;
  return nullptr;
}

const json* find_pid(const json& rows, pid_t pid) {
  for (const json& r : rows)
    if (r["pid"] == pid) return &r;
  return nullptr;
}

std::vector<void*> kept;  // the leaker's objects: never freed

__attribute__((noinline)) void leak_on_purpose(int n) {
  for (int i = 0; i < n; ++i) kept.push_back(shmalloc_alloc(100));
}

__attribute__((noinline)) void churn(int n) {
  std::vector<void*> v;
  for (int i = 0; i < n; ++i) v.push_back(shmalloc_alloc(100));
  for (void* p : v) shmalloc_free(p);
}

// A forked worker on the daemon: runs step(1), says so, waits for the test's
// go, runs step(2), says so, and waits to be told to exit. Caches never
// decay, so what it holds changes only with what it allocates.
class worker {
 public:
  // profile_rate: the child's SHMALLOC_PROFILE_RATE (nullptr: unset).
  worker(const std::string& socket, void (*step)(int phase), const char* profile_rate = nullptr) {
    REQUIRE(pipe(to_) == 0);
    REQUIRE(pipe(from_) == 0);
    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      setenv("SHMALLOC_CACHE_DECAY_MS", "3600000", 1);
      if (profile_rate != nullptr) setenv("SHMALLOC_PROFILE_RATE", profile_rate, 1);
      if (shmalloc_attach(socket.c_str()) != 0) _exit(1);
      char c = 0;
      for (int phase = 1; phase <= 2; ++phase) {
        step(phase);
        if (write(from_[1], "r", 1) != 1 || read(to_[0], &c, 1) != 1) _exit(2);
      }
      _exit(0);
    }
    wait_ready();
  }
  ~worker() {
    if (pid_ > 0) {
      go();
      go();
      int status = 0;
      waitpid(pid_, &status, 0);
    }
  }
  void go() { (void)!write(to_[1], "g", 1); }
  void wait_ready() {
    char c = 0;
    REQUIRE(read(from_[0], &c, 1) == 1);
  }
  pid_t pid() const { return pid_; }

 private:
  int to_[2] = {-1, -1}, from_[2] = {-1, -1};
  pid_t pid_ = -1;
};
}  // namespace

TEST_SUITE("leaks") {
  TEST_CASE("a process that leaks on purpose is named first; one that frees what it allocates is not a grower") {
    daemon_process d;
    REQUIRE(d.started());
    // 1,500 objects of 112 bytes fit a thread's spares: the churner's spans
    // never leave it.
    worker leaker(d.socket, [](int phase) { leak_on_purpose(phase == 1 ? 1500 : 20000); });
    worker churner(d.socket, [](int) { churn(1500); });
    ctl_json(d, "leaks --window 1");  // a sample of every client, the window's start
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // so that it is a window (1 s) old
    leaker.go();
    churner.go();
    leaker.wait_ready();
    churner.wait_ready();
    const json j = ctl_json(d, "leaks --window 1");
    INFO(j.dump());
    REQUIRE(j["clients"].size() == 2);
    const json& first = j["clients"][0];
    CHECK(first["pid"] == leaker.pid());
    CHECK(first["growth_bytes"].get<std::int64_t>() >= 20000 * 112);
    CHECK(first["live_bytes"].get<std::uint64_t>() >= 21500u * 112);
    CHECK(first["classes"][0]["object_size"] == 112);
    CHECK(first["classes"][0]["objects"].get<std::uint64_t>() >= 21500);
    const json* other = find_pid(j["clients"], churner.pid());
    REQUIRE(other != nullptr);
    CHECK((*other)["growth_bytes"].get<std::int64_t>() <= 0);
    CHECK((*other)["live_bytes"].get<std::uint64_t>() < 1500u * 112);

    const json one = ctl_json(d, "leaks --pid " + std::to_string(churner.pid()));
    REQUIRE(one["clients"].size() == 1);
    CHECK(one["clients"][0]["pid"] == churner.pid());
    std::string text;
    REQUIRE(run_ctl("leaks --socket " + d.socket, &text) == 0);
    CHECK(text.find("growth_bytes") != std::string::npos);
    CHECK(text.find("112x") != std::string::npos);
  }
}

TEST_SUITE("leaks --sites") {
  TEST_CASE("sampled sites: the leaking process's top site is leak_on_purpose; what is freed leaves no sample") {
    daemon_process d;
    REQUIRE(d.started());
    // 3,000 objects of 100 bytes a phase, one sample per 8 KiB on average:
    // about 37 samples a phase.
    worker leaker(d.socket, [](int) { leak_on_purpose(3000); }, "8192");
    worker churner(d.socket, [](int) { churn(3000); }, "8192");
    const auto gap = std::chrono::milliseconds(1500);
    std::this_thread::sleep_for(gap);  // phase 1's objects are at least this old when phase 2 runs
    leaker.go();
    churner.go();
    leaker.wait_ready();
    churner.wait_ready();

    const json j = ctl_json(d, "leaks --sites");
    INFO(j.dump(1));
    CHECK(j["table_capacity"].get<int>() > 0);
    REQUIRE(j["sites"].size() >= 1);
    const json& top = j["sites"][0];
    CHECK(top["pid"] == leaker.pid());
    CHECK(top["site"].get<std::string>().find("leak_on_purpose") != std::string::npos);
    CHECK(top["frames"].size() >= 2);
    // 6,000 objects of 100 bytes: the estimate is within a factor of two
    // (the sample count is Poisson with a mean near 73).
    CHECK(top["estimated_bytes"].get<std::uint64_t>() >= 300'000u);
    CHECK(top["estimated_bytes"].get<std::uint64_t>() <= 1'200'000u);
    CHECK(top["sampled_bytes"].get<std::uint64_t>() == top["samples"].get<std::uint64_t>() * 100);
    // Both phases are there, a gap apart however slow the machine.
    CHECK(top["oldest_seconds"].get<double>() - top["newest_seconds"].get<double>() >= 1.4);
    for (const json& row : j["sites"]) CHECK(row["pid"] != churner.pid());  // it freed everything it sampled

    // Ages: every phase-1 object is at least `gap` old, no object a day old.
    const json old = ctl_json(d, "leaks --sites --older-than 1.4 --pid " + std::to_string(leaker.pid()));
    REQUIRE(old["sites"].size() >= 1);
    CHECK(old["sites"][0]["samples"].get<int>() <= top["samples"].get<int>());
    CHECK(old["sites"][0]["newest_seconds"].get<double>() >= 1.4);
    CHECK(ctl_json(d, "leaks --sites --older-than 86400")["sites"].empty());

    // leaks says, per client, what its samples tell of ages.
    const json plain = ctl_json(d, "leaks");
    const json* l = find_pid(plain["clients"], leaker.pid());
    REQUIRE(l != nullptr);
    REQUIRE((*l)["sampled_live"].is_object());
    CHECK((*l)["sampled_live"]["estimated_bytes"] == top["estimated_bytes"]);
    CHECK((*l)["sampled_live"]["older_than_10s"].get<std::uint64_t>() <= top["estimated_bytes"].get<std::uint64_t>());
    const json* c = find_pid(plain["clients"], churner.pid());
    REQUIRE(c != nullptr);
    CHECK((*c)["sampled_live"].is_null());

    std::string text;
    REQUIRE(run_ctl("leaks --sites --socket " + d.socket, &text) == 0);
    CHECK(text.find("leak_on_purpose") != std::string::npos);
    std::string err;
    CHECK(run_ctl("leaks --older-than 5 --socket " + d.socket, &text, &err) == 2);  // --older-than needs --sites
  }
}

TEST_SUITE("advise") {
  TEST_CASE("33-byte objects: the 48-byte class wastes 15/48, and a boundary at 40 would save most of it") {
    daemon_process d;
    REQUIRE(d.started());
    REQUIRE(shmalloc_attach(d.socket.c_str()) == 0);
    std::vector<void*> kept;
    for (int i = 0; i < 20000; ++i) {
      void* p = shmalloc_alloc(33);
      REQUIRE(p != nullptr);
      kept.push_back(p);
    }
    const json j = ctl_json(d, "advise");
    const json* c = find_class(j["classes"], 5);  // 48 bytes
    REQUIRE(c != nullptr);
    CHECK((*c)["object_size"] == 48);
    CHECK((*c)["samples"].get<int>() > 0);
    CHECK((*c)["mean_request"].get<double>() == doctest::Approx(33.0));
    CHECK((*c)["waste_pct"].get<double>() == doctest::Approx(31.2).epsilon(0.01));  // 15/48
    CHECK((*c)["live_bytes"].get<std::uint64_t>() >= 20000u * 48);
    CHECK((*c)["wasted_bytes"].get<std::uint64_t>() >= 20000u * 15);
    CHECK((*c)["split_at"] == 40);
    CHECK((*c)["split_covers"] == "33..40");
    CHECK((*c)["saved_bytes"].get<std::uint64_t>() >= 20000u * 8);
    CHECK((*c)["saved_heap_pct"].get<double>() > 0);
    CHECK(j["classes"][0]["class"] == 5);  // the most wasted bytes first
    std::string text;
    REQUIRE(run_ctl("advise --socket " + d.socket, &text) == 0);
    CHECK(text.find("split_covers") != std::string::npos);
    CHECK(text.find("33..40") != std::string::npos);
    for (void* p : kept) shmalloc_free(p);
    shmalloc_detach();
  }
}
