/*
 * A stand-in for a VMM's guest-RAM setup, for Tests/Integration/adapter/adapter-test.sh:
 * maps SIZE bytes of PATH shared, the way QEMU's memory-backend-file does
 * (a reservation, then the file mapped over it with MAP_FIXED), writes and
 * reads back its first byte unless told not to touch it, and says what
 * happened on stdout: "mapped", "wrote" or "mmap failed: <errno name>".
 *
 * Several sizes, comma-separated, map the file once for each, in turn.
 * With "hold" it then stays until killed, as a VMM runs on while
 * postcopyd serves its guest RAM. With "read-on-usr1" it holds too, and
 * at each SIGUSR1 reads the first byte of the (last) mapping, as a vCPU
 * would, and says "read N": a read that faults on a page postcopyd has not
 * served blocks, and says nothing until it is. With "thp" each mapping is
 * then advised MADV_HUGEPAGE, as QEMU advises its RAM blocks. Each mapping
 * starts at a multiple of 2 MiB, as QEMU's with align=2M; with
 * MAP_FILE_MISALIGN=1 in the environment 4 KiB past one, as QEMU's without.
 *
 *   map-file PATH SIZE[,SIZE...] [touch|no-touch] [hold|read-on-usr1] [thp]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile char *last;
static int advise_hugepage;

/* One mapping of `size` bytes; 0 when it worked. */
static int map_once(int fd, size_t size, int touch)
{
    const char *misalign = getenv("MAP_FILE_MISALIGN");
    unsigned long skew = misalign && strcmp(misalign, "1") == 0 ? 4096 : 0;
    void *reserved = mmap(NULL, size + (4u << 20), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    void *at = (void *)((((unsigned long)reserved + (2u << 20) - 1) & ~((2ul << 20) - 1)) + skew);
    void *mapped = mmap(at, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    if (mapped == MAP_FAILED) {
        printf("mmap failed: %s\n", strerrorname_np(errno));
        return 1;
    }
    printf("mapped\n");
    fflush(stdout);
    last = mapped;
    if (advise_hugepage && madvise(mapped, size, MADV_HUGEPAGE) != 0)
        printf("madvise MADV_HUGEPAGE failed: %s\n", strerrorname_np(errno));
    if (touch) {
        volatile char *first = mapped;
        *first = 42;
        printf(*first == 42 ? "wrote\n" : "read back something else\n");
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: map-file PATH SIZE[,SIZE...] [touch|no-touch] [hold|read-on-usr1] [thp]\n");
        return 2;
    }
    int touch = argc < 4 || strcmp(argv[3], "no-touch") != 0;
    int read_on_signal = argc > 4 && strcmp(argv[4], "read-on-usr1") == 0;
    advise_hugepage = argc > 5 && strcmp(argv[5], "thp") == 0;
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    if (read_on_signal) /* before any thread exists, the adapter's too */
        sigprocmask(SIG_BLOCK, &usr1, NULL);
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        printf("open failed: %s\n", strerrorname_np(errno));
        return 1;
    }
    int failed = 0;
    for (char *size = strtok(argv[2], ","); size; size = strtok(NULL, ","))
        failed |= map_once(fd, strtoull(size, NULL, 0), touch);
    if (argc > 4 && strcmp(argv[4], "hold") == 0)
        for (;;)
            pause();
    while (read_on_signal && last) {
        int signal;
        sigwait(&usr1, &signal);
        printf("read %d\n", *last);
        fflush(stdout);
    }
    return failed;
}
