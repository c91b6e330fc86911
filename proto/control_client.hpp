// control_client.hpp: the client end of the control protocol, blocking.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "proto/control_protocol.hpp"
#include "shm/errc.hpp"

namespace shmalloc {

// The socket path a daemon and its clients use when none is given:
// $SHMALLOC_SOCKET, else $XDG_RUNTIME_DIR/shmalloc/shmallocd.sock, else
// /run/shmalloc/shmallocd.sock for root and /tmp/shmalloc-$UID/shmallocd.sock
// otherwise.
std::string default_socket_path();

// A blocking client of the control socket, without Asio: shmallocctl's,
// and the tests'. Every read waits at most timeout_ms, so a daemon that is
// gone or stalled is an error within a bounded time, never a hang. Replies
// are read through a buffer of one frame, so a round trip is one send and
// (usually) one recv.
class control_client {
 public:
  explicit control_client(const std::string& socket_path);
  ~control_client();
  control_client(const control_client&) = delete;
  control_client& operator=(const control_client&) = delete;
  bool connected() const noexcept { return fd_ >= 0; }
  // In a forked child: closes the child's copy of the socket (the parent's
  // connection stays open), so the daemon sees the parent go when it goes.
  // Touches nothing else: async-signal-safe, fit for an atfork handler.
  void close_inherited() noexcept;
  bool send_bytes(const std::vector<std::uint8_t>& bytes);
  // Reads one reply frame; nullopt on EOF or error (or after timeout_ms).
  struct frame {
    proto::frame_header header;
    std::vector<std::uint8_t> payload;
    errc status() const { return static_cast<errc>(header.status); }
  };
  std::optional<frame> read_frame(int timeout_ms = 5000);
  std::optional<frame> call(proto::msg type, const std::vector<std::uint8_t>& body = {});
  // hello with this build's layout version; returns the welcome.
  std::optional<proto::welcome_msg> hello(const std::string& name = "test");
  // A call whose reply must be ok: the reply's body, or the error it carried
  // (errc::unavailable if the daemon did not answer).
  result<std::vector<std::uint8_t>> request(proto::msg type, const std::vector<std::uint8_t>& body = {});
  bool eof(int timeout_ms = 5000);
  // Reads and drops whatever has arrived, without waiting: true while the
  // connection is open, false once the daemon has closed it.
  bool drain();

 private:
  static constexpr std::size_t capacity = proto::header_bytes + proto::max_payload;  // one whole frame
  bool fill(std::size_t want, int timeout_ms);
  bool set_timeout(int timeout_ms);

  int fd_ = -1;
  std::uint32_t next_id_ = 1;
  int timeout_ms_ = 0;  // SO_RCVTIMEO now set (0: none)
  std::unique_ptr<std::uint8_t[]> in_;  // bytes received; [begin_, end_) not yet read
  std::size_t begin_ = 0;
  std::size_t end_ = 0;
};

}  // namespace shmalloc
