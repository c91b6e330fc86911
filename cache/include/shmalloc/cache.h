/* cache.h: the C API of the shared cache (libshmalloc_cache).
 *
 * A key/value cache in the shared heap, used at once by every process
 * attached to one shmallocd: one process puts, any process gets. Keys and
 * values are byte strings; each pair lives in one heap object. Reads take
 * no lock; writes take one of 64 per-shard robust mutexes, so a process
 * killed at any instruction leaves the cache consistent (the next writer of
 * that shard repairs it). The cache keeps to a byte budget by CLOCK
 * eviction; entries may carry a time to live. Hits, misses and evictions
 * are counted in shared memory, and shmallocd exports them (shmalloc_cache_*
 * metrics; `shmallocctl caches`). See cache/layout.hpp for the design.
 *
 * Link: pkg-config --libs shmalloc (which includes -lshmalloc_cache).
 * Errors are negative codes; shmalloc_strerror names them:
 *   -7  (not found)   no such key, no such cache
 *   -15 (too large)   an empty or over-long key (1..4096 bytes), or a value
 *                     over the cache's limit (max_bytes / 64)
 *   -16 (too small)   the buffer given to get cannot hold the value
 *   -4  (invalid)     a bad name or argument
 *   -1  (no memory)   the heap could not hold the entry, or all 512 reader
 *                     slots of the cache are held (one per thread using it)
 *
 * A cache lives as long as its heap; there is no call that deletes one
 * (other processes may be reading it).
 *
 * Threads: each thread that uses a cache holds one of its 512 reader slots,
 * and may use at most 16 caches at once (-1 past either). A thread gives its
 * slot back when it exits; shmalloc_cache_close gives back only the calling
 * thread's (after its last pin, if it still holds one). So a long-lived
 * thread that used a handle another thread closed keeps its slot until it
 * exits. A thread may outlive shmalloc_detach(): its exit gives back
 * nothing in the unmapped heap (the daemon takes back what the process
 * held), but it must not use a cache handle opened before the detach.
 */
#ifndef SHMALLOC_CACHE_H
#define SHMALLOC_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "shmalloc/shmalloc.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct shmalloc_cache shmalloc_cache;

typedef struct shmalloc_cache_stats {
  uint64_t max_bytes;     /* the byte budget */
  uint64_t items;         /* entries that can be found */
  uint64_t bytes;         /* bytes those entries take in the heap */
  uint64_t retired_items; /* replaced or evicted, waiting for readers to move on */
  uint64_t retired_bytes;
  uint64_t hits;
  uint64_t misses;        /* expired entries count as misses */
  uint64_t puts;
  uint64_t erases;
  uint64_t evictions;     /* taken out by CLOCK to keep to the budget */
  uint64_t expirations;   /* taken out because their time to live passed */
  uint64_t repairs;       /* shards repaired after a writer died holding them */
  uint64_t readers;       /* reader slots ever claimed (of 512; a thread holds one per cache) */
} shmalloc_cache_stats;

/* Opens the cache called name (1 to 57 characters, no spaces), creating it
 * with a budget of max_bytes (at least 1 MiB) if it does not exist. An
 * existing cache keeps the budget it was made with. max_bytes == 0 opens an
 * existing cache only (-7 if there is none). Attaches to the daemon on
 * first use, like shmalloc_alloc. */
int shmalloc_cache_open(const char *name, uint64_t max_bytes, shmalloc_cache **cache);
void shmalloc_cache_close(shmalloc_cache *cache);

/* Copies the value into buf. 0 and *value_len = its length; -16 and
 * *value_len = the length needed if buf_len is too small; -7 on a miss. */
int shmalloc_cache_get(shmalloc_cache *cache, const void *key, size_t key_len, void *buf, size_t buf_len,
                       size_t *value_len);

/* Zero-copy get: on a hit, *value and *value_len point at the value in the
 * shared heap, valid until shmalloc_cache_unpin(cache) by the same thread.
 * Pins nest; while a thread holds one, values replaced or evicted anywhere
 * in the cache wait to be freed, so hold pins briefly. */
int shmalloc_cache_pin(shmalloc_cache *cache, const void *key, size_t key_len, const void **value,
                       size_t *value_len);
void shmalloc_cache_unpin(shmalloc_cache *cache);

/* Inserts or replaces. ttl_ms == 0: no expiry. */
int shmalloc_cache_put(shmalloc_cache *cache, const void *key, size_t key_len, const void *value, size_t value_len,
                       uint64_t ttl_ms);
/* 0 if the key was there, -7 if not. */
int shmalloc_cache_erase(shmalloc_cache *cache, const void *key, size_t key_len);
int shmalloc_cache_stats_get(shmalloc_cache *cache, shmalloc_cache_stats *stats);

/* Takes back reader slots of dead threads, repairs every shard a dead
 * writer left, and checks each chain (entries in the right shard and
 * bucket, counts that add up). Returns the number of inconsistencies found
 * that could not be repaired (0 when healthy), or a negative code. For
 * tests and operators; it takes each shard's lock in turn. */
int shmalloc_cache_check(shmalloc_cache *cache);

#ifdef __cplusplus
}
#endif

#endif /* SHMALLOC_CACHE_H */
