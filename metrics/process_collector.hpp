// process_collector.hpp: the standard process_* metrics, which prometheus-cpp
// does not provide (jupp0r/prometheus-cpp#649) and Go dashboards expect:
// CPU seconds, resident and virtual memory, open and maximum fds, start time.
// Read from /proc/self at each scrape (Linux).
#pragma once

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include <vector>

namespace shmalloc::metrics {

class process_collector final : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override;
};

}  // namespace shmalloc::metrics
