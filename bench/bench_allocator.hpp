// bench_allocator.hpp: the allocator a benchmark binary is built for, one
// per binary (bench/CMakeLists.txt): BENCH_SHMALLOC, BENCH_BOOST_IPC, or a
// malloc linked in (BENCH_ALLOCATOR names it). Each gives BENCH_ALLOC,
// BENCH_FREE, allocator_name, and handles that another process can turn
// back into pointers (the process-private allocators' are addresses).
#pragma once

#include <dlfcn.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#ifdef BENCH_SHMALLOC
#include "proto/control_client.hpp"
#include "shmalloc/shmalloc.h"
#define BENCH_ALLOC(n) shmalloc_alloc(n)
#define BENCH_FREE(p) shmalloc_free(p)
#define BENCH_SHARED 1
static const char* allocator_name = "shmalloc";
static std::uint64_t to_handle(void* p) { return shmalloc_handle(p); }
static void* from_handle(std::uint64_t h) { return shmalloc_pointer(h); }
#elif defined(BENCH_BOOST_IPC)
// Boost.Interprocess managed_shared_memory: its default rbtree_best_fit
// segment manager behind a process-shared mutex (what people use today).
#include <boost/interprocess/managed_shared_memory.hpp>
namespace bip = boost::interprocess;
static bip::managed_shared_memory* segment;
#define BENCH_ALLOC(n) segment->allocate(n)
#define BENCH_FREE(p) segment->deallocate(p)
#define BENCH_SHARED 1
static const char* allocator_name = "boost.interprocess";
static std::uint64_t to_handle(void* p) { return static_cast<std::uint64_t>(segment->get_handle_from_address(p)); }
static void* from_handle(std::uint64_t h) {
  return segment->get_address_from_handle(static_cast<bip::managed_shared_memory::handle_t>(h));
}
#else
#define BENCH_ALLOC(n) std::malloc(n)
#define BENCH_FREE(p) std::free(p)
static const char* allocator_name = BENCH_ALLOCATOR;
static std::uint64_t to_handle(void* p) { return reinterpret_cast<std::uintptr_t>(p); }
static void* from_handle(std::uint64_t h) { return reinterpret_cast<void*>(h); }
#endif

// Who serves malloc in this process (the anchors' binaries check that it is
// the allocator they were built for).
inline std::string malloc_provider() {
#ifdef BENCH_SHMALLOC
  return "libshmalloc (C API)";
#elif defined(BENCH_BOOST_IPC)
  return "boost::interprocess::managed_shared_memory (rbtree_best_fit, interprocess mutex)";
#else
  Dl_info info{};
  void* sym = dlsym(RTLD_DEFAULT, "malloc");
  if (sym == nullptr || dladdr(sym, &info) == 0 || info.dli_fname == nullptr) return "unknown";
  return info.dli_fname;
#endif
}

// Makes the binary's allocator ready: attaches to shmallocd (SHMALLOC_SOCKET),
// creates the Boost.Interprocess segment (removed when this goes), or checks
// that malloc comes from the library the binary was linked with. ok() false:
// the reason went to stderr, under `program`'s name.
class allocator_setup {
 public:
  explicit allocator_setup(const char* program) {
    const std::string provider = malloc_provider();
    std::fprintf(stderr, "%s: malloc is served by %s\n", allocator_name, provider.c_str());
#ifdef BENCH_SHMALLOC
    if (int rc = shmalloc_attach(nullptr); rc != 0) {
      std::fprintf(stderr, "%s: cannot attach to shmallocd: %s\n", program, shmalloc_strerror(rc));
      return;
    }
#elif defined(BENCH_BOOST_IPC)
    segment_name_ = "shmalloc-" + std::string(program) + "-bip-" + std::to_string(getpid());
    bip::shared_memory_object::remove(segment_name_.c_str());
    segment_ = std::make_unique<bip::managed_shared_memory>(bip::create_only, segment_name_.c_str(), 3ULL << 30);
    segment = segment_.get();
#else
    const std::string want = BENCH_LIBRARY;
    if (provider.find(want) == std::string::npos) {
      std::fprintf(stderr, "%s: %s expected malloc from %s, got %s\n", program, allocator_name, want.c_str(),
                   provider.c_str());
      return;
    }
#endif
    ok_ = true;
  }
  allocator_setup(const allocator_setup&) = delete;
  allocator_setup& operator=(const allocator_setup&) = delete;
  ~allocator_setup() {
#ifdef BENCH_BOOST_IPC
    segment = nullptr;
    segment_.reset();
    bip::shared_memory_object::remove(segment_name_.c_str());
#endif
  }
  bool ok() const { return ok_; }

 private:
  bool ok_ = false;
#ifdef BENCH_BOOST_IPC
  std::string segment_name_;
  std::unique_ptr<bip::managed_shared_memory> segment_;
#endif
};
