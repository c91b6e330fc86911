#include "support/http_get.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

namespace shmalloc::test {

int tcp_connect(std::uint16_t port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) return fd;
  close(fd);
  return -1;
}

std::string http_get(std::uint16_t port, const std::string& path) {
  const int fd = tcp_connect(port);
  if (fd < 0) return {};
  std::string response;
  const std::string get = "GET " + path + " HTTP/1.0\r\n\r\n";
  if (write(fd, get.data(), get.size()) == static_cast<ssize_t>(get.size())) {
    char buf[4096];
    for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) response.append(buf, static_cast<std::size_t>(n));
  }
  close(fd);
  return response;
}

}  // namespace shmalloc::test
