#include "shm/control_client.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "shm/layout.hpp"

namespace shmalloc {

std::string default_socket_path() {
  if (const char* s = std::getenv("SHMALLOC_SOCKET"); s && *s) return s;
  if (const char* x = std::getenv("XDG_RUNTIME_DIR"); x && *x) return std::string(x) + "/shmalloc/shmallocd.sock";
  if (geteuid() == 0) return "/run/shmalloc/shmallocd.sock";
  return "/tmp/shmalloc-" + std::to_string(geteuid()) + "/shmallocd.sock";
}



control_client::control_client(const std::string& path) {
  fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (fd_ >= 0 && ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

control_client::~control_client() {
  if (fd_ >= 0) ::close(fd_);
}

bool control_client::send_bytes(const std::vector<std::uint8_t>& bytes) {
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

std::optional<control_client::frame> control_client::read_frame(int timeout_ms) {
  std::uint8_t head[proto::header_bytes];
  if (!read_exact(fd_, head, sizeof head, timeout_ms)) return std::nullopt;
  frame f;
  f.header = proto::decode_header(head);
  if (f.header.length > proto::max_payload) return std::nullopt;
  f.payload.resize(f.header.length);
  if (!read_exact(fd_, f.payload.data(), f.payload.size(), timeout_ms)) return std::nullopt;
  return f;
}

std::optional<control_client::frame> control_client::call(proto::msg type, const std::vector<std::uint8_t>& body) {
  // Even if the send fails, read: a daemon that refuses a peer says why
  // before it closes, and that reply may already be waiting.
  const bool sent = send_bytes(proto::make_request(type, next_id_++, body));
  return read_frame(sent ? 5000 : 0);
}

std::optional<proto::welcome_msg> control_client::hello(const std::string& name) {
  auto f = call(proto::msg::hello, proto::encode(proto::hello_msg{layout_version, static_cast<std::uint32_t>(getpid()), name}));
  if (!f || f->status() != errc::ok) return std::nullopt;
  auto parts = proto::split_reply(f->payload);
  if (!parts) return std::nullopt;
  return proto::decode_welcome(parts->body);
}

bool control_client::drain() {
  std::uint8_t b[4096];
  for (;;) {
    const ssize_t n = ::recv(fd_, b, sizeof b, MSG_DONTWAIT);
    if (n > 0) continue;
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
}

bool control_client::eof(int timeout_ms) {
  std::uint8_t b[256];
  for (;;) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    const ssize_t n = ::recv(fd_, b, sizeof b, 0);
    if (n <= 0) return true;
  }
}

result<std::vector<std::uint8_t>> control_client::request(proto::msg type, const std::vector<std::uint8_t>& body) {
  if (fd_ < 0) return error{errc::unavailable, "not connected to shmallocd"};
  auto f = call(type, body);
  if (!f) return error{errc::unavailable, "shmallocd did not answer"};
  auto parts = proto::split_reply(f->payload);
  if (!parts) return error{errc::protocol_error, "malformed reply from shmallocd"};
  if (f->status() != errc::ok) return error{f->status(), parts->message.empty() ? to_string(f->status()) : parts->message};
  return std::vector<std::uint8_t>(parts->body.begin(), parts->body.end());
}

}  // namespace shmalloc
