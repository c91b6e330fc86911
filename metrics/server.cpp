#include "metrics/server.hpp"

#include <prometheus/exposer.h>

#include <exception>
#include <vector>

namespace shmalloc::metrics {

result<std::unique_ptr<metrics_server>> metrics_server::start(
    const std::string& listen, const std::vector<std::shared_ptr<prometheus::Collectable>>& collectables) {
  std::unique_ptr<metrics_server> s(new metrics_server);
  try {
    // civetweb serves one connection per worker thread, so a few idle
    // connections could starve scrapes (any local user can open them): four
    // workers, and a connection that sends nothing for 3 s is dropped.
    // Keep-alive stays off: Prometheus opens a connection per scrape anyway.
    s->exposer_ = std::make_unique<prometheus::Exposer>(std::vector<std::string>{
        "listening_ports", listen, "num_threads", "4", "request_timeout_ms", "3000", "enable_keep_alive", "no"});
  } catch (const std::exception& e) {
    return error{errc::os_error, "cannot serve metrics on " + listen +
                                     ": the address is in use or not an address of this host (" + e.what() + ")"};
  }
  for (const auto& c : collectables) s->exposer_->RegisterCollectable(c);
  const std::vector<int> ports = s->exposer_->GetListeningPorts();
  s->port_ = ports.empty() ? 0 : static_cast<std::uint16_t>(ports.front());
  return s;
}

metrics_server::~metrics_server() = default;

}  // namespace shmalloc::metrics
