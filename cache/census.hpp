// census.hpp: what the daemon reads of the shared caches (cache/layout.hpp).
//
// The daemon never writes a cache, and never trusts one: the bytes are
// written by clients. read_caches() finds caches through the named roots
// ("cache:<name>"), checks each header (bounds, magic, version, geometry)
// before reading it, and sums the counters with relaxed atomic loads, so a
// census taken while clients run is a consistent-enough snapshot (each
// counter is exact; they may be from slightly different moments).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "shm/segment.hpp"

namespace shmalloc {

struct cache_census {
  std::string name;
  std::uint64_t max_bytes = 0;
  std::uint64_t items = 0;
  std::uint64_t bytes = 0;
  std::uint64_t retired_items = 0;
  std::uint64_t retired_bytes = 0;
  std::uint64_t hits = 0;
  std::uint64_t misses = 0;
  std::uint64_t puts = 0;
  std::uint64_t erases = 0;
  std::uint64_t evictions = 0;
  std::uint64_t expirations = 0;
  std::uint64_t repairs = 0;
  std::uint64_t readers = 0;  // reader slots ever claimed (live or not)
};

// Every cache published in seg, in root-table order. Roots that name
// something that is not a cache header are skipped.
std::vector<cache_census> read_caches(const segment& seg);

}  // namespace shmalloc
