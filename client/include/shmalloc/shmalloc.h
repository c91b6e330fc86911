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
 * Profiling: with SHMALLOC_PROFILE_RATE=BYTES (read at attach; unset or 0:
 * off), one allocation per that many bytes on average is sampled with its
 * call stack, for `shmallocctl leaks --sites`. A sampled object gets whole
 * pages of its own (its shmalloc_usable_size says so) and counts as a large
 * object; the other allocations are unchanged.
 *
 * fork(): the child never uses the parent's caches or connection; they are
 * reset in the child, which attaches again on first use. Pointers the child
 * inherited stay valid (the mapping is kept).
 *
 * Bad input. What each call does with what it should not be given
 * (tests/security/ checks every case; error codes are negative, -13 is
 * permission_denied and -14 unavailable). shmalloc_free aborts the process
 * with "shmalloc: free(<p>): <why>" on stderr where it can tell:
 *   - a pointer the heap never gave out: malloc's, the stack's, the heap's
 *     own metadata, or any pointer in a process not attached (never
 *     attached, or after shmalloc_detach, which unmaps the heap): "not a
 *     pointer into the shared heap";
 *   - a pointer into the heap where no span is in use (a page never used, a
 *     large object already freed): "not inside an allocated span (already
 *     freed?)";
 *   - a pointer inside a small or large object: "not the start of an object";
 *   - a double free by the thread holding the object's span: "double free";
 *     by another thread or process while the first free still waits in the
 *     span's remote-free bitmap: "double free (freed before by another
 *     thread or process, and not yet reclaimed)", in the process freeing;
 *   - a large object freed twice: "double free (of a large object)" while
 *     it waits in the freeing process's cache; once the daemon has it back
 *     (freed from another process, or past the cache's 8 objects), a second
 *     free anywhere: "not inside an allocated span (already freed?)".
 * Not fatal: a second free from another thread or process after the
 * holder took the first in is dropped when the holder folds its span's
 * remote frees, which prints "object <i> of span at page <n> was freed twice
 * (remote free of a free object)" on the holder's stderr and counts it.
 *   - a tiny object (shmalloc_alloc_noscan under 16 bytes, packed in
 *     16-byte blocks) freed twice, by any thread or process, while its block
 *     is in use: "double free (of a tiny object)".
 * Not caught, so never do them: a second free after the object was
 * allocated again (it frees the new object, as in any allocator); and a
 * pointer inside a tiny object (objects within a block are not recorded:
 * it counts as a free of whatever starts there).
 * The other calls never abort on bad input; see each below. A peer whose uid
 * or gid the daemon does not allow (shmallocd --allow-uid, --allow-gid) gets
 * no heap: shmalloc_attach fails with -13 (permission_denied; the daemon's
 * reason, which names the uid, is printed on stderr) and allocations
 * return NULL. An allowed peer must also be able to open the heap's
 * shared-memory object (shmallocd --heap-mode, default 0600: the daemon's
 * uid only), else shmalloc_attach fails with -13.
 */
#ifndef SHMALLOC_SHMALLOC_H
#define SHMALLOC_SHMALLOC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

int shmalloc_attach(const char *socket_path); /* NULL: SHMALLOC_SOCKET or the default; 0 or a negative code */
/* Gives everything back and unmaps the heap: every pointer into it is dead
 * (freeing one aborts: not a pointer into the shared heap). */
void shmalloc_detach(void);
const char *shmalloc_strerror(int code);
void *shmalloc_alloc(size_t size);                          /* at least 8-byte aligned; NULL on failure */
/* Pointer-free object: under 16 bytes it is a tiny object, whose interior
 * free is not caught (see Bad input). */
void *shmalloc_alloc_noscan(size_t size);
void *shmalloc_alloc_aligned(size_t size, size_t alignment); /* power of two up to 8192 */
/* Any thread, any process; NULL is a no-op. Anything but NULL or an
 * object's start that is allocated aborts with a message, except the cases
 * Bad input lists as not caught. */
void shmalloc_free(void *p);
void shmalloc_trim(void); /* give back the calling thread's empty spans, the pool and cached large objects */
/* The object's size (a tiny object's: to the end of its 16-byte block).
 * 0 for NULL, when not attached, and for anything but an allocated
 * object's start: a pointer outside the heap, into its metadata or a free
 * page, inside an object (a caller would overrun into the next one), or to
 * a freed object. */
size_t shmalloc_usable_size(const void *p);
/* Position-independent; 0 for NULL, for a pointer outside this process's
 * mapping of the heap, and when not attached. */
uint64_t shmalloc_handle(const void *p);
/* This process's address for a handle (attaching first if needed). NULL for
 * 0, when attach fails, and for any handle that is not an allocated
 * object's start when asked (outside the heap, its metadata, a free page,
 * inside an object, a freed object). A handle into a tiny object's 16-byte
 * block is accepted while the block holds any object. */
void *shmalloc_pointer(uint64_t handle);
int shmalloc_publish(const char *name, uint64_t handle);
int shmalloc_lookup(const char *name, uint64_t *handle);
int shmalloc_unpublish(const char *name);

#ifdef __cplusplus
}
#endif

#endif /* SHMALLOC_SHMALLOC_H */
