// server.hpp: the HTTP endpoint, prometheus-cpp's Exposer (civetweb), with
// the failure modes an operator needs: an address that cannot be bound is an
// error the daemon reports at startup, never an uncaught exception
// (jupp0r/prometheus-cpp#560, civetweb#1062).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "shm/errc.hpp"

namespace prometheus {
class Collectable;
class Exposer;
}  // namespace prometheus

namespace shmalloc::metrics {

class metrics_server {
 public:
  // Serves GET /metrics on listen ("127.0.0.1:9464"; port 0 picks a free
  // one) from the collectables, which must outlive the server.
  static result<std::unique_ptr<metrics_server>> start(
      const std::string& listen, const std::vector<std::shared_ptr<prometheus::Collectable>>& collectables);
  ~metrics_server();  // stops the HTTP threads; no scrape runs after it returns

  std::uint16_t port() const noexcept { return port_; }

 private:
  metrics_server() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::uint16_t port_ = 0;
};

}  // namespace shmalloc::metrics
