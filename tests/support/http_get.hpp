// http_get.hpp: a plain HTTP/1.0 GET on loopback, enough to scrape /metrics
// without a client library. Returns the whole response, headers included
// (empty if nothing answered).
#pragma once

#include <cstdint>
#include <string>

namespace shmalloc::test {

std::string http_get(std::uint16_t port, const std::string& path = "/metrics");
// A TCP connection to 127.0.0.1:port that sends nothing; -1 on failure.
int tcp_connect(std::uint16_t port);

}  // namespace shmalloc::test
