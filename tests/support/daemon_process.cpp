#include "support/daemon_process.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
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
#include "shm/mheap.hpp"
#include "shm/verify.hpp"
#include "shm/segment.hpp"
#include "support/test_heap.hpp"

namespace shmalloc::test {

namespace {
struct exec_request {
  std::vector<char*> argv;
  const rlimit* nofile;
};

// In the child: exec the daemon.
[[noreturn]] void exec_daemon(const exec_request& r) {
  // The daemon dies with the test (a crashed test must not leave it
  // running), and never holds the test's output pipe open: ctest waits
  // for that pipe to close.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (r.nofile && setrlimit(RLIMIT_NOFILE, r.nofile) != 0) _exit(126);
  const int devnull = open("/dev/null", O_RDWR);
  if (devnull >= 0) {
    dup2(devnull, STDIN_FILENO);
    dup2(devnull, STDOUT_FILENO);
    dup2(devnull, STDERR_FILENO);
  }
  execv(r.argv[0], r.argv.data());
  _exit(127);
}

int exec_daemon_in_clone(void* r) { exec_daemon(*static_cast<const exec_request*>(r)); }
}  // namespace

pid_t spawn_daemon(const std::vector<std::string>& args, const std::string& socket, int* stderr_fd,
                   const rlimit* nofile, bool own_pid_namespace) {
  // Built before the fork: the child only calls what is safe after one.
  static std::string path = SHMALLOC_DAEMON_PATH;
  exec_request r{{path.data()}, nofile};
  for (const auto& a : args) r.argv.push_back(const_cast<char*>(a.c_str()));
  // Tests run in parallel: none may take the default metrics port.
  static std::string metrics_flag = "--metrics", metrics_off = "off";
  if (std::find(args.begin(), args.end(), metrics_flag) == args.end()) {
    r.argv.push_back(metrics_flag.data());
    r.argv.push_back(metrics_off.data());
  }
  r.argv.push_back(nullptr);
  pid_t pid = -1;
  if (own_pid_namespace) {
    // clone, not unshare: the test's own later children must stay in its namespace.
    std::vector<char> stack(256 << 10);
    pid = clone(&exec_daemon_in_clone, stack.data() + stack.size(), CLONE_NEWPID | SIGCHLD, &r);
    if (pid < 0) return -1;
  } else {
    pid = fork();
    if (pid == 0) exec_daemon(r);
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
    : daemon_process(std::move(extra), what, spawn_options{nofile, false}) {}

daemon_process::daemon_process(std::vector<std::string> extra, const std::string& what, const spawn_options& how)
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
  pid_ = spawn_daemon(args, socket, nullptr, how.nofile ? &*how.nofile : nullptr, how.own_pid_namespace);
}

int daemon_process::stop(int sig) {
  if (pid_ <= 0) return -1;
  kill(pid_, sig);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

void check_heap_after(daemon_process& d) {
  REQUIRE(d.stop(SIGTERM) == 0);
  check_heap_after(0, d.heap);
}

void check_heap_after(pid_t daemon, const std::string& heap) {
  if (daemon > 0) {
    kill(daemon, SIGTERM);
    waitpid(daemon, nullptr, 0);
  }
  auto seg = segment::attach(heap);
  REQUIRE(seg);
  mheap h(*seg.value());
  const verify_report r = verify_heap(h);
  CHECK_MESSAGE(r.ok(), r.summary());
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
