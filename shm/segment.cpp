#include "shm/segment.hpp"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <thread>

#include "shm/page_alloc.hpp"

namespace bip = boost::interprocess;

namespace shmalloc {

struct segment::impl {
  bip::shared_memory_object shm;
  bip::mapped_region region;
  int fd() const { return shm.get_mapping_handle().handle; }
};

namespace {

std::uint64_t round_up(std::uint64_t v, std::uint64_t to) { return (v + to - 1) / to * to; }

std::string quoted(const std::string& name) { return "'" + name + "'"; }

std::uint64_t random_instance_id() {
  std::uint64_t id = 0;
  if (getrandom(&id, sizeof id, 0) != sizeof id) {
    id = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
         (static_cast<std::uint64_t>(getpid()) << 32);
  }
  return id | 1;  // never 0, so 0 can mean "no heap"
}

std::uint64_t unix_now_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
}

// Maps bytes of the object at a 64 MiB-aligned address: reserve an oversized
// PROT_NONE range, map the object over its aligned middle with MAP_FIXED, and
// hand the unused head and tail back.
bip::mapped_region map_aligned(const bip::shared_memory_object& shm, std::uint64_t bytes, bip::mode_t mode) {
  const std::size_t span = bytes + arena_bytes;
  void* reservation = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reservation == MAP_FAILED) throw bip::interprocess_exception(bip::error_info(bip::system_error_code()));
  auto* lo = static_cast<std::byte*>(reservation);
  auto* aligned = reinterpret_cast<std::byte*>(round_up(reinterpret_cast<std::uintptr_t>(lo), arena_bytes));
  try {
    bip::mapped_region region(shm, mode, 0, bytes, aligned, MAP_FIXED | MAP_NORESERVE);
    if (aligned > lo) munmap(lo, static_cast<std::size_t>(aligned - lo));
    std::byte* tail = aligned + bytes;
    if (tail < lo + span) munmap(tail, static_cast<std::size_t>(lo + span - tail));
    return region;
  } catch (...) {
    munmap(reservation, span);
    throw;
  }
}

error os_failure(const std::string& what, int err) {
  return {err == ENOSPC ? errc::no_space : errc::os_error, what + ": " + std::strerror(err)};
}

// Checks one header field against this build's value, naming both.
template <class T>
bool field_matches(const std::string& name, const char* what, T in_segment, T here, error* out) {
  if (in_segment == here) return true;
  *out = {errc::layout_mismatch, "heap " + quoted(name) + " was made by an incompatible build: " + what + " is " +
                                     std::to_string(in_segment) + " in the segment but " + std::to_string(here) +
                                     " in this process"};
  return false;
}

bool header_matches(const std::string& name, const segment_header& h, std::uint64_t object_bytes, error* out) {
  if (!field_matches(name, "magic", h.magic, heap_magic, out)) {
    out->message = "shared-memory object " + quoted(name) + " is not a shmalloc heap (bad magic)";
    return false;
  }
  if (!field_matches(name, "layout version", h.layout_version, layout_version, out) ||
      !field_matches(name, "page size", h.page_size, static_cast<std::uint32_t>(page_size), out) ||
      !field_matches(name, "arena size", h.arena_bytes, arena_bytes, out) ||
      !field_matches(name, "size-class table checksum", h.size_class_checksum, size_class_table_checksum(), out) ||
      !field_matches(name, "mspan size", h.mspan_size, static_cast<std::uint32_t>(sizeof(mspan)), out) ||
      !field_matches(name, "mcache slot size", h.mcache_slot_size, static_cast<std::uint32_t>(sizeof(mcache_slot)),
                     out) ||
      !field_matches(name, "object size", h.segment_bytes, object_bytes, out))
    return false;
  std::uint32_t leaves = 0;
  const region_map want = compute_layout(h.capacity, h.max_caches, &leaves);
  if (std::memcmp(&want, &h.regions, sizeof want) != 0 || leaves != h.summary_leaves ||
      want.arenas.offset + want.arenas.bytes != h.segment_bytes) {
    *out = {errc::layout_mismatch, "heap " + quoted(name) + " has a segment map this build does not compute"};
    return false;
  }
  return true;
}

}  // namespace

std::string validate_heap_name(const std::string& name) {
  if (name.empty() || name.size() > 200) return "a heap name has 1 to 200 characters";
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-';
    if (!ok) return "a heap name may use only letters, digits, '.', '_' and '-'";
  }
  if (name == "." || name == "..") return "a heap name may not be '.' or '..'";
  return {};
}

region_map compute_layout(std::uint64_t capacity, std::uint32_t max_caches, std::uint32_t* summary_leaves) {
  const std::uint64_t heap_bytes = round_up(capacity, arena_bytes);
  const std::uint64_t max_pages = heap_bytes / page_size;
  std::uint64_t leaves = 1;
  while (leaves * 64 < max_pages) leaves *= 2;
  *summary_leaves = static_cast<std::uint32_t>(leaves);

  region_map m{};
  std::uint64_t at = 0;
  auto place = [&at](std::uint64_t bytes, std::uint64_t align) {
    at = round_up(at, align);
    region r{at, round_up(bytes, os_page)};
    at += r.bytes;
    return r;
  };
  // Committed at creation, in one contiguous prefix:
  m.fixed = place(sizeof(segment_fixed), os_page);
  m.page_bits = place(leaves * 8, os_page);
  m.page_summary = place(2 * leaves * sizeof(page_summary), os_page);
  m.chunks = place((max_pages / chunk_pages) * sizeof(chunk_info), os_page);
  m.released = place(leaves * 8, os_page);
  m.roots = place(std::uint64_t{max_roots} * sizeof(root_entry), os_page);
  m.profile = place(std::uint64_t{max_profile_samples} * sizeof(profile_sample), os_page);
  // Committed as they are needed:
  m.page_map = place(max_pages * sizeof(std::uint32_t), os_page);
  m.spans = place(max_pages * sizeof(mspan), os_page);  // at most one span per page
  m.caches = place(std::uint64_t{max_caches} * sizeof(mcache_slot), os_page);
  m.arenas = place(heap_bytes, arena_bytes);
  return m;
}

segment::segment(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
segment::~segment() = default;

bool segment::remove(const std::string& name) noexcept {
  return validate_heap_name(name).empty() && bip::shared_memory_object::remove(name.c_str());
}

bool segment::exists(const std::string& name) noexcept {
  if (!validate_heap_name(name).empty()) return false;
  try {
    bip::shared_memory_object shm(bip::open_only, name.c_str(), bip::read_only);
    return true;
  } catch (const bip::interprocess_exception&) {
    return false;
  }
}

result<std::unique_ptr<segment>> segment::map(std::unique_ptr<impl> p, std::uint64_t bytes) {
  p->region = map_aligned(p->shm, bytes, bip::read_write);
  std::unique_ptr<segment> s(new segment(std::move(p)));
  s->base_ = static_cast<std::byte*>(s->impl_->region.get_address());
  s->size_ = bytes;
  return s;
}

result<std::unique_ptr<segment>> segment::create(const heap_options& o) {
  if (auto why = validate_heap_name(o.name); !why.empty()) return error{errc::invalid_argument, why};
  if (o.capacity < min_capacity || o.capacity > max_capacity)
    return error{errc::invalid_argument, "heap capacity must be between 4 MiB and 1 TiB"};
  if ((o.mode & ~mode_t{0777}) != 0) return error{errc::invalid_argument, "heap mode must be within 0777"};
  if (o.max_caches < 1 || o.max_caches > 65536)
    return error{errc::invalid_argument, "max caches must be between 1 and 65536"};

  std::uint32_t leaves = 0;
  const region_map m = compute_layout(o.capacity, o.max_caches, &leaves);
  const std::uint64_t bytes = m.arenas.offset + m.arenas.bytes;
  auto p = std::make_unique<impl>();
  try {
    p->shm = bip::shared_memory_object(bip::create_only, o.name.c_str(), bip::read_write,
                                       bip::permissions(static_cast<unsigned>(o.mode)));
  } catch (const bip::interprocess_exception& e) {
    if (e.get_error_code() == bip::already_exists_error)
      return error{errc::exists, "heap " + quoted(o.name) + " already exists"};
    return error{errc::os_error, "cannot create heap " + quoted(o.name) + ": " + e.what()};
  }
  auto fail = [&o](error e) {
    bip::shared_memory_object::remove(o.name.c_str());
    return e;
  };
  result<std::unique_ptr<segment>> made{errc::os_error, ""};
  try {
    p->shm.truncate(static_cast<bip::offset_t>(bytes));
    made = map(std::move(p), bytes);
  } catch (const bip::interprocess_exception& e) {
    return fail({errc::os_error, "cannot size or map heap " + quoted(o.name) + ": " + e.what()});
  }
  segment& s = *made.value();
  s.name_ = o.name;
  const std::uint64_t fixed_end = m.profile.offset + m.profile.bytes;
  if (error e = s.commit(0, fixed_end); e.code != errc::ok) return fail(e);

  segment_header& h = s.header();
  h.magic = heap_magic;
  h.layout_version = layout_version;
  h.page_size = page_size;
  h.arena_bytes = arena_bytes;
  h.capacity = m.arenas.bytes;
  h.size_class_checksum = size_class_table_checksum();
  h.instance_id = random_instance_id();
  h.segment_bytes = bytes;
  h.max_pages = static_cast<std::uint32_t>(m.arenas.bytes / page_size);
  h.max_spans = h.max_pages;
  h.max_caches = o.max_caches;
  h.summary_leaves = leaves;
  h.creator_pid = static_cast<std::uint32_t>(getpid());
  h.created_unix_ns = unix_now_ns();
  h.mspan_size = sizeof(mspan);
  h.mcache_slot_size = sizeof(mcache_slot);
  h.regions = m;
  // The mheap state starts zeroed (fresh tmpfs pages); only the non-zero
  // initial values are stored.
  page_alloc(s.at<std::uint64_t>(m.page_bits.offset), s.at<page_summary>(m.page_summary.offset), leaves).init();
  mheap_state& heap = s.heap();
  heap.span_pool.free_head = span_id::nil();
  for (auto& c : heap.central) c.partial = c.full = span_id::nil();
  heap.accounts.metadata_committed_bytes.store(fixed_end, std::memory_order_relaxed);
  h.state.store(segment_state::ready, std::memory_order_release);
  return made;
}

result<std::unique_ptr<segment>> segment::attach(const std::string& name) {
  if (auto why = validate_heap_name(name); !why.empty()) return error{errc::invalid_argument, why};
  auto p = std::make_unique<impl>();
  bip::offset_t object_bytes = 0;
  try {
    p->shm = bip::shared_memory_object(bip::open_only, name.c_str(), bip::read_write);
    p->shm.get_size(object_bytes);
  } catch (const bip::interprocess_exception& e) {
    if (e.get_native_error() == ENOENT) return error{errc::not_found, "no heap named " + quoted(name)};
    if (e.get_native_error() == EACCES) return error{errc::permission_denied, "no access to heap " + quoted(name)};
    return error{errc::os_error, "cannot open heap " + quoted(name) + ": " + e.what()};
  }
  if (static_cast<std::uint64_t>(object_bytes) < sizeof(segment_fixed))
    return error{errc::layout_mismatch, "shared-memory object " + quoted(name) + " is not a shmalloc heap (too small)"};
  try {
    // Read the header through a small mapping first: the full map's size
    // comes from it, and a foreign object must not be mapped whole.
    bip::mapped_region head(p->shm, bip::read_only, 0, sizeof(segment_fixed));
    const auto& h = *static_cast<const segment_header*>(head.get_address());
    for (int i = 0; i < 5000 && h.state.load(std::memory_order_acquire) != segment_state::ready; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (h.state.load(std::memory_order_acquire) != segment_state::ready)
      return error{errc::unavailable, "heap " + quoted(name) + " is still being created (waited 5 s)"};
    error mismatch;
    if (!header_matches(name, h, static_cast<std::uint64_t>(object_bytes), &mismatch)) return mismatch;
    auto made = map(std::move(p), static_cast<std::uint64_t>(object_bytes));
    if (made) made.value()->name_ = name;
    return made;
  } catch (const bip::interprocess_exception& e) {
    return error{errc::os_error, "cannot map heap " + quoted(name) + ": " + e.what()};
  }
}

error segment::commit(std::uint64_t offset, std::uint64_t bytes) noexcept {
  if (bytes == 0) return {};
  const int rc = posix_fallocate(impl_->fd(), static_cast<off_t>(offset), static_cast<off_t>(bytes));
  if (rc != 0)
    return os_failure("cannot commit " + std::to_string(bytes) + " bytes of heap " + quoted(name_) +
                          " (posix_fallocate)", rc);
  return {};
}

error segment::release(std::uint64_t offset, std::uint64_t bytes) noexcept {
  if (bytes == 0) return {};
  if (fallocate(impl_->fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                static_cast<off_t>(bytes)) != 0)
    return os_failure("cannot release pages of heap " + quoted(name_) + " (fallocate punch hole)", errno);
  return {};
}

std::uint64_t segment::backed_bytes() const noexcept {
  struct stat st {};
  if (fstat(impl_->fd(), &st) != 0) return 0;
  return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

bool segment::try_lock_exclusive() noexcept { return flock(impl_->fd(), LOCK_EX | LOCK_NB) == 0; }

namespace {
// Past any size a heap can have (1 TiB), so the locks never cover data.
constexpr off_t liveness_lock_base = off_t{1} << 48;

struct flock liveness_byte(short type, std::uint32_t slot) noexcept {
  struct flock l {};
  l.l_type = type;
  l.l_whence = SEEK_SET;
  l.l_start = liveness_lock_base + static_cast<off_t>(slot);
  l.l_len = 1;
  return l;
}
}  // namespace

bool segment::liveness_held(std::uint32_t slot) const noexcept {
  struct flock l = liveness_byte(F_WRLCK, slot);
  // An error leaves the answer "alive": keeping an orphan's spans a while
  // longer is safe, handing them out while it allocates from them is not.
  if (fcntl(impl_->fd(), F_OFD_GETLK, &l) != 0) return true;
  return l.l_type != F_UNLCK;
}

int segment::open_liveness() const noexcept {
  return shm_open(("/" + name_).c_str(), O_RDONLY | O_CLOEXEC, 0);
}

bool segment::liveness_lock(int fd, std::uint32_t slot) noexcept {
  struct flock l = liveness_byte(F_RDLCK, slot);
  return fcntl(fd, F_OFD_SETLK, &l) == 0;
}

std::uint64_t segment::filesystem_avail_bytes() const noexcept {
  struct statvfs st {};
  if (fstatvfs(impl_->fd(), &st) != 0) return 0;
  return static_cast<std::uint64_t>(st.f_bavail) * st.f_frsize;
}

}  // namespace shmalloc
