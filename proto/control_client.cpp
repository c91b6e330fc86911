#include "proto/control_client.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
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

control_client::control_client(const std::string& path) : in_(new std::uint8_t[capacity]) {
  fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (fd_ >= 0 && ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

void control_client::close_inherited() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
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

bool control_client::set_timeout(int timeout_ms) {
  if (timeout_ms == timeout_ms_) return true;
  timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  if (setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) return false;
  timeout_ms_ = timeout_ms;
  return true;
}

// Reads until the buffer holds want bytes from its start. One recv takes
// whatever has arrived, usually a whole reply: a round trip costs one
// blocking recv, with the timeout set on the socket rather than by poll.
bool control_client::fill(std::size_t want, int timeout_ms) {
  if (timeout_ms > 0 && !set_timeout(timeout_ms)) return false;
  // A signal interrupting recv restarts it with the whole timeout: keep the
  // deadline, and give a retry only what is left of it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (end_ - begin_ < want) {
    if (begin_ != 0) {  // keep what is unread at the front
      std::memmove(in_.get(), in_.get() + begin_, end_ - begin_);
      end_ -= begin_;
      begin_ = 0;
    }
    const ssize_t got = ::recv(fd_, in_.get() + end_, capacity - end_, timeout_ms > 0 ? 0 : MSG_DONTWAIT);
    if (got < 0 && errno == EINTR) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (timeout_ms > 0 && (left.count() <= 0 || !set_timeout(static_cast<int>(left.count())))) return false;
      continue;
    }
    if (got <= 0) return false;  // closed, timed out, or an error
    end_ += static_cast<std::size_t>(got);
  }
  return true;
}

std::optional<control_client::frame> control_client::read_frame(int timeout_ms) {
  if (fd_ < 0 || !fill(proto::header_bytes, timeout_ms)) return std::nullopt;
  frame f;
  f.header = proto::decode_header(in_.get() + begin_);
  if (f.header.length > proto::max_payload) return std::nullopt;
  if (!fill(proto::header_bytes + f.header.length, timeout_ms)) return std::nullopt;
  const std::uint8_t* payload = in_.get() + begin_ + proto::header_bytes;
  f.payload.assign(payload, payload + f.header.length);
  begin_ += proto::header_bytes + f.header.length;
  if (begin_ == end_) begin_ = end_ = 0;
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
  begin_ = end_ = 0;
  std::uint8_t b[4096];
  for (;;) {
    const ssize_t n = ::recv(fd_, b, sizeof b, MSG_DONTWAIT);
    if (n > 0) continue;
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
}

bool control_client::eof(int timeout_ms) {
  begin_ = end_ = 0;  // unread replies are dropped
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
