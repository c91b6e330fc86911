// daemon_process.hpp: shmallocd as a subprocess of a test, on a unique heap
// name and a temp socket; stopped by pid (never by name) and cleaned up.
#pragma once

#include <sys/types.h>

#include <csignal>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "shm/control_protocol.hpp"

namespace shmalloc::test {

class daemon_process {
 public:
  explicit daemon_process(std::vector<std::string> extra_args = {}, const std::string& what = "daemon");
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

// Starts shmallocd with args and waits for its socket; returns pid or -1.
pid_t spawn_daemon(const std::vector<std::string>& args, const std::string& socket, int* stderr_fd = nullptr);

// A blocking control-socket client speaking raw frames.
class raw_client {
 public:
  explicit raw_client(const std::string& socket_path);
  ~raw_client();
  bool connected() const noexcept { return fd_ >= 0; }
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
  bool eof(int timeout_ms = 5000);
  // Reads and drops whatever has arrived, without waiting; false on EOF.
  bool drain();  // true once the daemon has closed the connection

 private:
  int fd_ = -1;
  std::uint32_t next_id_ = 1;
};

}  // namespace shmalloc::test
