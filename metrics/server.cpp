#include "metrics/server.hpp"

#include <prometheus/exposer.h>

#include <exception>
#include <vector>

namespace shmalloc::metrics {

result<std::unique_ptr<metrics_server>> metrics_server::start(
    const std::string& listen, const std::vector<std::shared_ptr<prometheus::Collectable>>& collectables) {
  std::unique_ptr<metrics_server> s(new metrics_server);
  try {
    // Two civetweb workers: scrapes are rare and each is short.
    s->exposer_ = std::make_unique<prometheus::Exposer>(listen, 2);
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
