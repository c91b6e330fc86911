// daemon_process.hpp: shmallocd as a subprocess of a test, on a unique heap
// name and a temp socket; stopped by pid (never by name) and cleaned up.
#pragma once

#include <sys/resource.h>
#include <sys/types.h>

#include <csignal>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "proto/control_client.hpp"
#include "proto/control_protocol.hpp"

namespace shmalloc::test {

// How the daemon is started: nofile, its RLIMIT_NOFILE, set in the child
// before exec; own_pid_namespace, in a PID namespace of its own (as pid 1:
// a daemon in a container of its own), which needs root. The test's
// processes are then not in its namespace: the daemon reads their pids from
// its sockets as 0, as a containerised daemon does its workers'.
struct spawn_options {
  std::optional<rlimit> nofile;
  bool own_pid_namespace = false;
};

class daemon_process {
 public:
  explicit daemon_process(std::vector<std::string> extra_args = {}, const std::string& what = "daemon",
                          std::optional<rlimit> nofile = std::nullopt);
  daemon_process(std::vector<std::string> extra_args, const std::string& what, const spawn_options& how);
  ~daemon_process();
  daemon_process(const daemon_process&) = delete;
  daemon_process& operator=(const daemon_process&) = delete;

  bool started() const noexcept { return pid_ > 0; }
  // Sends sig and waits; returns the exit status (128 + signal if killed).
  int stop(int sig = SIGTERM);
  pid_t pid() const noexcept { return pid_; }

  std::string heap;
  std::string socket;
  std::string dir;

 private:
  pid_t pid_ = -1;
  bool keep_heap_ = false;
};

// Starts shmallocd with args (and nofile as its RLIMIT_NOFILE, if given)
// and waits for its socket; returns pid (in the test's PID namespace) or -1.
pid_t spawn_daemon(const std::vector<std::string>& args, const std::string& socket, int* stderr_fd = nullptr,
                   const rlimit* nofile = nullptr, bool own_pid_namespace = false);

// The tests speak raw frames through the same client shmallocctl uses.
using raw_client = control_client;

// Stops a daemon started with --keep-heap (SIGTERM) and runs the heap
// checker on the heap it left (doctest checks).
void check_heap_after(daemon_process& d);
// The same for a daemon spawned by pid (spawn_daemon) on heap `heap`.
void check_heap_after(pid_t daemon, const std::string& heap);

// The daemon's stats reply (a doctest REQUIRE fails if there is none).
proto::stats_msg daemon_stats(raw_client& c);

// Runs shmallocctl with args (a shell word list); returns its exit code
// (-1 if it did not exit) and its stdout in *out, its stderr in *err if given.
int run_ctl(const std::string& args, std::string* out, std::string* err = nullptr);

}  // namespace shmalloc::test
