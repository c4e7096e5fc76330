// Reference reader for bench_disk_read.py --c-pread: the read_now path with nothing around it. Reads `total`
// bytes of random, distinct `bs`-sized blocks of [data_start, data_start + data_bytes) of `path` with O_DIRECT,
// one blocking pread() at a time (QD 1) into one aligned buffer, and prints GB/s (1e9 bytes/s).
//   pread_loop PATH DATA_START DATA_BYTES BS TOTAL SEED
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char** argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s PATH DATA_START DATA_BYTES BS TOTAL SEED\n", argv[0]);
    return 2;
  }
  const char* path = argv[1];
  const long long start = atoll(argv[2]), data = atoll(argv[3]), bs = atoll(argv[4]), total = atoll(argv[5]);
  srand48(atol(argv[6]));
  const long long blocks = data / bs, n = total / bs < blocks ? total / bs : blocks;
  long long* order = malloc(sizeof(long long) * blocks);
  void* buf = NULL;
  if (!order || posix_memalign(&buf, 4096, bs) != 0) return 1;
  for (long long i = 0; i < blocks; i++) order[i] = i;
  for (long long i = 0; i < n; i++) {  // partial Fisher-Yates: the first n entries are n distinct blocks
    long long j = i + (long long)(drand48() * (blocks - i)), t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  int fd = open(path, O_RDONLY | O_DIRECT);
  if (fd < 0) {
    perror(path);
    return 1;
  }
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long long i = 0; i < n; i++) {
    if (pread(fd, buf, bs, start + order[i] * bs) != bs) {
      perror("pread");
      return 1;
    }
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  const double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
  printf("%.6f\n", n * bs / s / 1e9);
  close(fd);
  return 0;
}
