/*
 * A stand-in for the source QEMU, for Tests/Integration/adapter/adapter-test.sh: maps
 * PATH shared the way QEMU's memory-backend-file does (a reservation, then
 * the file over it with MAP_FIXED) and says where on stdout, one
 * "mapped 0xADDRESS LENGTH" line per mapping, then "ready". With "write"
 * it then writes a few random pages of every mapping each millisecond,
 * with random bytes, until killed (postcopy-push --pause-pid stops it with
 * SIGSTOP); otherwise it waits until killed.
 *
 *   whole   the whole file from offset 0 (what the write log needs)
 *   offset  the file from offset 4096 to its end
 *   twice   the whole file, twice
 *
 * With "later" it first prints "waiting" and maps nothing until SIGUSR1.
 * With "create" it creates PATH (16 MiB), as QEMU creates a mem-path that
 * does not exist, after the adapter loaded.
 *
 *   write-pages PATH whole|offset|twice [create] [later] [write]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void *map_at_2m(int fd, size_t size, off_t offset)
{
    void *reserved = mmap(NULL, size + (2u << 20), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (reserved == MAP_FAILED)
        return MAP_FAILED;
    void *at = (void *)(((uintptr_t)reserved + (2u << 20) - 1) & ~((uintptr_t)(2u << 20) - 1));
    return mmap(at, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, offset);
}

static uint64_t next_random(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: write-pages PATH whole|offset|twice [later] [write]\n");
        return 2;
    }
    int later = 0, write = 0, create = 0;
    for (int i = 3; i < argc; i++) {
        later |= strcmp(argv[i], "later") == 0;
        write |= strcmp(argv[i], "write") == 0;
        create |= strcmp(argv[i], "create") == 0;
    }
    int fd = open(argv[1], O_RDWR | (create ? O_CREAT | O_EXCL : 0), 0600);
    if (fd >= 0 && create && ftruncate(fd, 16 << 20) < 0)
        fd = -1;
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        printf("open failed: %s\n", strerrorname_np(errno));
        return 1;
    }
    if (later) {
        sigset_t usr1;
        sigemptyset(&usr1);
        sigaddset(&usr1, SIGUSR1);
        sigprocmask(SIG_BLOCK, &usr1, NULL);
        printf("waiting\n");
        fflush(stdout);
        int signal;
        sigwait(&usr1, &signal);
    }
    size_t size = (size_t)st.st_size;
    off_t offset = strcmp(argv[2], "offset") == 0 ? 4096 : 0;
    int count = strcmp(argv[2], "twice") == 0 ? 2 : 1;
    unsigned char *mapped[2];
    for (int i = 0; i < count; i++) {
        mapped[i] = map_at_2m(fd, size - (size_t)offset, offset);
        if (mapped[i] == MAP_FAILED) {
            printf("mmap failed: %s\n", strerrorname_np(errno));
            return 1;
        }
        printf("mapped %p %zu\n", (void *)mapped[i], size - (size_t)offset);
    }
    printf("ready\n");
    fflush(stdout);
    if (!write)
        for (;;)
            pause();
    uint64_t state = (uint64_t)getpid() * 0x9E3779B97F4A7C15ull | 1;
    size_t pages = (size - (size_t)offset) / 4096;
    struct timespec tick = { .tv_nsec = 1000000 };
    for (;;) {
        for (int i = 0; i < 4; i++) {
            uint64_t r = next_random(&state);
            unsigned char *page = mapped[r % (uint64_t)count] + (r >> 8) % pages * 4096;
            uint64_t word = next_random(&state);
            memcpy(page + (word >> 56) * 8 % 4096, &word, sizeof word);
        }
        nanosleep(&tick, NULL);
    }
}
