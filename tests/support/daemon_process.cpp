#include "support/daemon_process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>

#include "shm/layout.hpp"
#include "shm/segment.hpp"
#include "support/test_heap.hpp"

namespace shmalloc::test {

pid_t spawn_daemon(const std::vector<std::string>& args, const std::string& socket, int* stderr_fd) {
  const pid_t pid = fork();
  if (pid == 0) {
    // The daemon dies with the test (a crashed test must not leave it
    // running), and never holds the test's output pipe open: ctest waits
    // for that pipe to close.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
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

daemon_process::daemon_process(std::vector<std::string> extra, const std::string& what)
    : heap(unique_heap_name(what)) {
  char tmpl[] = "/tmp/shmalloc-test-XXXXXX";
  dir = mkdtemp(tmpl);
  socket = dir + "/shmallocd.sock";
  for (const auto& a : extra) keep_heap_ = keep_heap_ || a == "--keep-heap";
  std::vector<std::string> args{"--heap", heap, "--socket", socket, "--capacity", "256M", "--metrics", "off",
                                "--log-level", "warn"};
  args.insert(args.end(), extra.begin(), extra.end());
  pid_ = spawn_daemon(args, socket);
}

int daemon_process::stop(int sig) {
  if (pid_ <= 0) return -1;
  kill(pid_, sig);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

daemon_process::~daemon_process() {
  if (pid_ > 0) stop(SIGKILL);
  segment::remove(heap);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

raw_client::raw_client(const std::string& path) {
  fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (fd_ >= 0 && ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

raw_client::~raw_client() {
  if (fd_ >= 0) ::close(fd_);
}

bool raw_client::send_bytes(const std::vector<std::uint8_t>& bytes) {
  std::size_t at = 0;
  while (at < bytes.size()) {
    const ssize_t n = ::send(fd_, bytes.data() + at, bytes.size() - at, MSG_NOSIGNAL);
    if (n <= 0) return false;
    at += static_cast<std::size_t>(n);
  }
  return true;
}

namespace {
bool read_exact(int fd, std::uint8_t* out, std::size_t n, int timeout_ms) {
  std::size_t at = 0;
  while (at < n) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    const ssize_t got = ::recv(fd, out + at, n - at, 0);
    if (got <= 0) return false;
    at += static_cast<std::size_t>(got);
  }
  return true;
}
}  // namespace

std::optional<raw_client::frame> raw_client::read_frame(int timeout_ms) {
  std::uint8_t head[proto::header_bytes];
  if (!read_exact(fd_, head, sizeof head, timeout_ms)) return std::nullopt;
  frame f;
  f.header = proto::decode_header(head);
  if (f.header.length > proto::max_payload) return std::nullopt;
  f.payload.resize(f.header.length);
  if (!read_exact(fd_, f.payload.data(), f.payload.size(), timeout_ms)) return std::nullopt;
  return f;
}

std::optional<raw_client::frame> raw_client::call(proto::msg type, const std::vector<std::uint8_t>& body) {
  if (!send_bytes(proto::make_request(type, next_id_++, body))) return std::nullopt;
  return read_frame();
}

std::optional<proto::welcome_msg> raw_client::hello(const std::string& name) {
  auto f = call(proto::msg::hello, proto::encode(proto::hello_msg{layout_version, static_cast<std::uint32_t>(getpid()), name}));
  if (!f || f->status() != errc::ok) return std::nullopt;
  auto parts = proto::split_reply(f->payload);
  if (!parts) return std::nullopt;
  return proto::decode_welcome(parts->body);
}

bool raw_client::drain() {
  std::uint8_t b[4096];
  for (;;) {
    const ssize_t n = ::recv(fd_, b, sizeof b, MSG_DONTWAIT);
    if (n > 0) continue;
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
}

bool raw_client::eof(int timeout_ms) {
  std::uint8_t b[256];
  for (;;) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    const ssize_t n = ::recv(fd_, b, sizeof b, 0);
    if (n <= 0) return true;
  }
}

}  // namespace shmalloc::test
