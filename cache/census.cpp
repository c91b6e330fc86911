#include "cache/census.hpp"

#include <cstring>
#include <string_view>

#include "cache/layout.hpp"

namespace shmalloc {

namespace {

// The header at h, or nullptr if h cannot be a cache header of this layout.
const cache_header* header_at(const segment& seg, handle_t h) noexcept {
  const region& arenas = seg.regions().arenas;
  if (h < arenas.offset || h > seg.size() || seg.size() - h < sizeof(cache_header) || h % 64 != 0) return nullptr;
  const auto* c = seg.at<const cache_header>(h);
  if (c->magic != cache_magic || c->layout_version != cache_layout_version || c->nshards != cache_shards ||
      c->max_readers != cache_max_readers)
    return nullptr;
  return c;
}

void add_shard(cache_census& out, const cache_shard& s) noexcept {
  constexpr auto r = std::memory_order_relaxed;
  out.items += s.items.load(r);
  out.bytes += s.bytes.load(r);
  out.retired_items += s.retired_items.load(r);
  out.retired_bytes += s.retired_bytes.load(r);
  out.puts += s.puts.load(r);
  out.erases += s.erases.load(r);
  out.evictions += s.evictions.load(r);
  out.expirations += s.expirations.load(r);
  out.repairs += s.repairs.load(r);
}

}  // namespace

std::vector<cache_census> read_caches(const segment& seg) {
  std::vector<cache_census> out;
  const auto* roots = seg.at<const root_entry>(seg.regions().roots.offset);
  const std::string_view prefix(cache_root_prefix);
  for (std::uint32_t i = 0; i < max_roots; ++i) {
    const root_entry& root = roots[i];
    if (root.handle == null_handle) continue;
    const std::string_view name(root.name, strnlen(root.name, sizeof root.name));
    if (!name.starts_with(prefix)) continue;
    const cache_header* c = header_at(seg, root.handle);
    if (c == nullptr) continue;
    cache_census k;
    k.name = std::string(name.substr(prefix.size()));
    k.max_bytes = c->max_bytes;
    for (const cache_shard& s : c->shards) add_shard(k, s);
    const std::uint32_t used = c->readers_used.load(std::memory_order_acquire);
    k.readers = used < cache_max_readers ? used : cache_max_readers;
    for (std::uint32_t r = 0; r < k.readers; ++r) {
      k.hits += c->readers[r].hits.load(std::memory_order_relaxed);
      k.misses += c->readers[r].misses.load(std::memory_order_relaxed);
    }
    out.push_back(std::move(k));
  }
  return out;
}

}  // namespace shmalloc
