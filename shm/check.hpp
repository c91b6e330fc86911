// check.hpp: integrity checks and fast/slow path markers used across shmalloc.
//
// SHMALLOC_CHECK stays on in release builds. Use it wherever we read shared
// memory another process wrote, or where continuing would corrupt the heap
// (tcmalloc's TC_CHECK). SHMALLOC_ASSERT is on at SHMALLOC_DEBUG_LEVEL >= 1 and
// SHMALLOC_ASSERT_EXPENSIVE at >= 2 (mimalloc's three assertion levels).
#pragma once

#include <cstdio>
#include <cstdlib>

#ifndef SHMALLOC_DEBUG_LEVEL
#define SHMALLOC_DEBUG_LEVEL 0
#endif

#define SHMALLOC_LIKELY(x) __builtin_expect(!!(x), 1)
#define SHMALLOC_UNLIKELY(x) __builtin_expect(!!(x), 0)
// The fast path is forced inline; everything it falls back to is out of line
// and cold, so the fast path's prologue stays small (snmalloc's markers).
#define SHMALLOC_FAST_PATH inline __attribute__((always_inline))
#define SHMALLOC_SLOW_PATH __attribute__((noinline, cold))

namespace shmalloc::detail {
[[noreturn]] SHMALLOC_SLOW_PATH inline void check_failed(const char* expr, const char* file, int line,
                                                         const char* why) {
  std::fprintf(stderr, "shmalloc: fatal: check failed: %s (%s) at %s:%d\n", why, expr, file, line);
  std::abort();
}
}  // namespace shmalloc::detail

#define SHMALLOC_CHECK(cond, why)                                                    \
  do {                                                                               \
    if (SHMALLOC_UNLIKELY(!(cond))) ::shmalloc::detail::check_failed(#cond, __FILE__, __LINE__, why); \
  } while (0)

#if SHMALLOC_DEBUG_LEVEL >= 1
#define SHMALLOC_ASSERT(cond) SHMALLOC_CHECK(cond, "assertion")
#else
#define SHMALLOC_ASSERT(cond) ((void)0)
#endif

#if SHMALLOC_DEBUG_LEVEL >= 2
#define SHMALLOC_ASSERT_EXPENSIVE(cond) SHMALLOC_CHECK(cond, "expensive assertion")
#else
#define SHMALLOC_ASSERT_EXPENSIVE(cond) ((void)0)
#endif
