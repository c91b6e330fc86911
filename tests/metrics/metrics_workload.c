/* metrics_workload: a client of a live shmallocd that leaves a known mark on
 * the heap's statistics: it allocates `count` small objects (sizes 8..2048,
 * some pointer-free and tiny) and 4 large ones, frees every other one, and
 * exits with the rest still allocated. Written in C against the C API. */
#include <shmalloc/shmalloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: metrics_workload SOCKET COUNT\n");
    return 2;
  }
  const int rc = shmalloc_attach(argv[1]);
  if (rc != 0) {
    fprintf(stderr, "metrics_workload: %s\n", shmalloc_strerror(rc));
    return 1;
  }
  const int count = atoi(argv[2]);
  void **objects = calloc((size_t)count + 4, sizeof *objects);
  for (int i = 0; i < count; ++i) {
    const size_t size = (size_t)8 << (i % 9); /* 8 .. 2048 */
    objects[i] = (i % 3 == 0) ? shmalloc_alloc_noscan(i % 2 ? 5 : size) : shmalloc_alloc(size);
    if (objects[i] == NULL) return 1;
    memset(objects[i], 0xab, i % 2 && i % 3 == 0 ? 5 : size);
  }
  for (int i = 0; i < 4; ++i)
    if ((objects[count + i] = shmalloc_alloc(100000)) == NULL) return 1;
  for (int i = 0; i < count + 4; i += 2) shmalloc_free(objects[i]);
  free(objects);
  shmalloc_detach();
  return 0;
}
