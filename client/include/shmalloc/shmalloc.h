/* shmalloc.h: the C API of libshmalloc, the client of shmallocd.
 *
 * Objects live in a heap of shared memory that several processes map at
 * once, each at its own address; pass handles (offsets), not pointers,
 * between processes. Any thread of any process may free any object.
 *
 * Allocation attaches on first use (SHMALLOC_SOCKET, else the default socket
 * path). Errors are negative codes; shmalloc_strerror names them.
 *
 * Caches: each thread keeps spans per size class, the process keeps a pool
 * of spans and up to 8 freed large objects, so that most calls need no
 * round trip to the daemon. What sits unused for SHMALLOC_CACHE_DECAY_MS
 * (default 500; "off": never) goes back to the daemon, checked when a thread
 * next allocates through its slow path (there is no background thread).
 * shmalloc_trim gives back at once what no live object needs.
 *
 * fork(): the child never uses the parent's caches or connection; they are
 * reset in the child, which attaches again on first use. Pointers the child
 * inherited stay valid (the mapping is kept).
 */
#ifndef SHMALLOC_SHMALLOC_H
#define SHMALLOC_SHMALLOC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

int shmalloc_attach(const char *socket_path); /* NULL: SHMALLOC_SOCKET or the default; 0 or a negative code */
void shmalloc_detach(void);
const char *shmalloc_strerror(int code);
void *shmalloc_alloc(size_t size);                          /* at least 8-byte aligned; NULL on failure */
void *shmalloc_alloc_noscan(size_t size);                   /* pointer-free object: may use the tiny allocator */
void *shmalloc_alloc_aligned(size_t size, size_t alignment); /* power of two up to 8192 */
void shmalloc_free(void *p);                                /* any thread, any process; NULL is a no-op */
void shmalloc_trim(void); /* give back the calling thread's empty spans, the pool and cached large objects */
size_t shmalloc_usable_size(const void *p);
uint64_t shmalloc_handle(const void *p); /* position-independent; 0 for NULL */
void *shmalloc_pointer(uint64_t handle); /* this process's address for a handle */
int shmalloc_publish(const char *name, uint64_t handle);
int shmalloc_lookup(const char *name, uint64_t *handle);
int shmalloc_unpublish(const char *name);

#ifdef __cplusplus
}
#endif

#endif /* SHMALLOC_SHMALLOC_H */
