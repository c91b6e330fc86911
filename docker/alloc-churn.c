/* alloc-churn: a libshmalloc workload for docker/compose.yaml, so the
 * dashboard's allocation panels have something to show (span_workers speaks
 * the protocol directly and never goes through the library's counters).
 *
 * Two processes on the daemon's heap. The child allocates a batch of objects
 * every round and sends their handles to the parent over a pipe; the parent
 * frees them (cross-process, remote frees) and keeps a ring of objects of its
 * own, replacing the oldest each round, so the heap holds a steady set of
 * live objects across the size classes, with now and then a large one
 * (over 32 KiB) and tiny pointer-free ones.
 *
 * Usage: alloc-churn [INTERVAL_MS [BATCH]]   (defaults 200 and 256; the
 * socket is SHMALLOC_SOCKET). Runs until SIGTERM or SIGINT.
 */
#include <shmalloc/shmalloc.h>

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { ring_size = 4096, max_batch = 4096 };

static volatile sig_atomic_t stopping;
static void on_stop(int sig) { (void)sig; stopping = 1; }

/* Mostly small sizes, spread over the classes (8 B to 16 KiB), one in 64 a
 * tiny pointer-free object, one in 200 a large object. */
static void *alloc_some(unsigned *seed) {
  const unsigned r = (unsigned)rand_r(seed);
  if (r % 200 == 0) return shmalloc_alloc(40960 + r % (200 * 1024));
  if (r % 64 == 1) return shmalloc_alloc_noscan(1 + r % 15);
  const size_t base = (size_t)1 << (3 + r % 12);
  return shmalloc_alloc(base + (r >> 8) % base);
}

static void sleep_ms(long ms) {
  struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
  while (!stopping && nanosleep(&t, &t) != 0 && errno == EINTR) {
  }
}

static int producer(int out, long interval_ms, int batch) {
  unsigned seed = (unsigned)getpid();
  uint64_t handles[max_batch];
  while (!stopping) {
    for (int i = 0; i < batch; ++i) {
      void *p = alloc_some(&seed);
      if (p) memset(p, 0x5a, 8);
      handles[i] = shmalloc_handle(p);
    }
    const size_t bytes = (size_t)batch * sizeof handles[0];
    if (write(out, handles, bytes) != (ssize_t)bytes) break;
    sleep_ms(interval_ms);
  }
  shmalloc_detach();
  return 0;
}

static int consumer(int in, pid_t child, int batch) {
  unsigned seed = (unsigned)getpid();
  static void *ring[ring_size];
  size_t next = 0, rounds = 0;
  uint64_t handles[max_batch];
  const size_t bytes = (size_t)batch * sizeof handles[0];
  int rc = 0;
  while (!stopping) {
    size_t got = 0;
    while (got < bytes && !stopping) {
      const ssize_t n = read(in, (char *)handles + got, bytes - got);
      if (n > 0) got += (size_t)n;
      else if (n == 0 || errno != EINTR) break;
    }
    if (got < bytes) {
      if (!stopping) fprintf(stderr, "alloc-churn: the producer (pid %d) went away\n", (int)child);
      rc = stopping ? 0 : 1;
      break;
    }
    for (int i = 0; i < batch; ++i)
      if (handles[i] != 0) shmalloc_free(shmalloc_pointer(handles[i]));
    for (int i = 0; i < batch; ++i, next = (next + 1) % ring_size) {
      shmalloc_free(ring[next]);
      ring[next] = alloc_some(&seed);
    }
    if (++rounds % 300 == 1) printf("alloc-churn: round %zu, %d objects freed across processes\n", rounds, batch);
    fflush(stdout);
  }
  kill(child, SIGTERM);
  waitpid(child, NULL, 0);
  for (size_t i = 0; i < ring_size; ++i) shmalloc_free(ring[i]);
  shmalloc_detach();
  return rc;
}

int main(int argc, char **argv) {
  const long interval_ms = argc > 1 ? atol(argv[1]) : 200;
  const int batch = argc > 2 ? atoi(argv[2]) : 256;
  if (interval_ms < 1 || batch < 1 || batch > max_batch) {
    fprintf(stderr, "usage: alloc-churn [INTERVAL_MS [BATCH (1..%d)]]\n", max_batch);
    return 2;
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_stop; /* no SA_RESTART: a blocked read returns */
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  const int err = shmalloc_attach(NULL);
  if (err != 0) {
    fprintf(stderr, "alloc-churn: %s\n", shmalloc_strerror(err));
    return 1;
  }
  int fds[2];
  if (pipe(fds) != 0) return 1;
  const pid_t child = fork();
  if (child < 0) return 1;
  if (child == 0) {
    close(fds[0]);
    _exit(producer(fds[1], interval_ms, batch));
  }
  close(fds[1]);
  return consumer(fds[0], child, batch);
}
