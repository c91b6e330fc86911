#include "support/daemon_process.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>

#include "shm/layout.hpp"
#include "shm/segment.hpp"
#include "support/test_heap.hpp"

namespace shmalloc::test {

pid_t spawn_daemon(const std::vector<std::string>& args, const std::string& socket, int* stderr_fd,
                   const rlimit* nofile) {
  const pid_t pid = fork();
  if (pid == 0) {
    // The daemon dies with the test (a crashed test must not leave it
    // running), and never holds the test's output pipe open: ctest waits
    // for that pipe to close.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (nofile && setrlimit(RLIMIT_NOFILE, nofile) != 0) _exit(126);
    const int devnull = open("/dev/null", O_RDWR);
    if (devnull >= 0) {
      dup2(devnull, STDIN_FILENO);
      dup2(devnull, STDOUT_FILENO);
      dup2(devnull, STDERR_FILENO);
    }
    std::vector<char*> argv;
    static std::string path = SHMALLOC_DAEMON_PATH;
    argv.push_back(path.data());
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    // Tests run in parallel: none may take the default metrics port.
    static std::string metrics_flag = "--metrics", metrics_off = "off";
    if (std::find(args.begin(), args.end(), metrics_flag) == args.end()) {
      argv.push_back(metrics_flag.data());
      argv.push_back(metrics_off.data());
    }
    argv.push_back(nullptr);
    execv(path.c_str(), argv.data());
    _exit(127);
  }
  (void)stderr_fd;
  for (int i = 0; i < 500; ++i) {  // up to 5 s for the socket to answer
    raw_client probe(socket);
    if (probe.connected()) return pid;
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return -1;  // it exited
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  return -1;
}

daemon_process::daemon_process(std::vector<std::string> extra, const std::string& what, std::optional<rlimit> nofile)
    : heap(unique_heap_name(what)) {
  char tmpl[] = "/tmp/shmalloc-test-XXXXXX";
  dir = mkdtemp(tmpl);
  socket = dir + "/shmallocd.sock";
  bool capacity_given = false;
  for (const auto& a : extra) {
    keep_heap_ = keep_heap_ || a == "--keep-heap";
    capacity_given = capacity_given || a == "--capacity";
  }
  std::vector<std::string> args{"--heap", heap, "--socket", socket, "--metrics", "off", "--log-level", "warn"};
  if (!capacity_given) args.insert(args.end(), {"--capacity", "256M"});  // a flag may be given once
  args.insert(args.end(), extra.begin(), extra.end());
  pid_ = spawn_daemon(args, socket, nullptr, nofile ? &*nofile : nullptr);
}

int daemon_process::stop(int sig) {
  if (pid_ <= 0) return -1;
  kill(pid_, sig);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

proto::stats_msg daemon_stats(raw_client& c) {
  auto f = c.call(proto::msg::stats);
  REQUIRE(f);
  auto parts = proto::split_reply(f->payload);
  REQUIRE(parts);
  auto s = proto::decode_stats(parts->body);
  REQUIRE(s);
  return *s;
}

daemon_process::~daemon_process() {
  if (pid_ > 0) stop(SIGKILL);
  segment::remove(heap);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

namespace {
std::string slurp(FILE* f) {
  std::string s;
  char buf[4096];
  std::size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
  return s;
}
}  // namespace

int run_ctl(const std::string& args, std::string* out, std::string* err) {
  char err_path[] = "/tmp/shmalloc-test-ctl-XXXXXX";
  const int err_fd = err ? mkstemp(err_path) : -1;
  if (err && err_fd < 0) return -1;
  const std::string redirect = err ? std::string(" 2>") + err_path : " 2>/dev/null";
  FILE* p = popen((std::string(SHMALLOC_CTL_PATH) + " " + args + redirect).c_str(), "r");
  int status = -1;
  if (p) {
    *out = slurp(p);
    status = pclose(p);
  }
  if (err) {
    FILE* e = fdopen(err_fd, "r");
    *err = e ? slurp(e) : std::string();
    if (e) std::fclose(e);
    else close(err_fd);
    unlink(err_path);
  }
  return p && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace shmalloc::test
