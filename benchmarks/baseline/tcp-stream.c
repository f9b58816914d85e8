/*
 * tcp-stream: the back-fill throughput baselines for postcopy-bench.
 *
 * Moves BYTES into a MAP_SHARED memfd mapping (the stand-in for guest RAM;
 * MFD_HUGETLB | MFD_HUGE_2MB for hugetlb, MADV_NOHUGEPAGE for shmem as
 * postcopyd does) two ways:
 *   (a) tcp:    a forked sender child connects to 127.0.0.1 and write()s a
 *               pattern-filled source buffer in 1 MiB calls; the parent
 *               recv()s straight into the mapping at consecutive offsets,
 *               timed from accept() returning to the last byte arriving.
 *               Default socket buffers, Nagle on: an ordinary bulk stream.
 *   (b) memcpy: the same source copied into the mapping in 1 MiB pieces.
 * The target is pre-faulted (one write per 4 KiB) before anything is timed,
 * as guest RAM already exists after precopy, and is memset to a different
 * byte before every run (untimed) so each run really writes it; each run is
 * verified with memcmp. (a) and (b) alternate, 3 runs each.
 *
 *   usage: tcp-stream BYTES shmem|hugetlb      (BYTES a multiple of 2 MiB)
 *   prints: bytes=, tcp_gib_per_s=, memcpy_gib_per_s= (medians, GiB = 2^30),
 *           tcp_gib_per_s_runs=x,y,z, memcpy_gib_per_s_runs=x,y,z
 */
#define _GNU_SOURCE
#define BASELINE_NAME "tcp-stream"
#include "baseline.h"
#include <errno.h>
#include <linux/memfd.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1u << 20)
#define HUGE_2M (2u << 20)
#define RUNS 3

static double gib_per_s(uint64_t bytes, uint64_t ns) {
    return ((double)bytes / (double)(1u << 30)) / ((double)ns / 1e9);
}

static void send_all(int listener, const struct sockaddr_in *addr, const char *src, uint64_t bytes) {
    close(listener);
    int sock = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) die("socket");
    while (connect(sock, (const struct sockaddr *)addr, sizeof(*addr)) < 0)
        if (errno != EINTR) die("connect");
    for (uint64_t off = 0; off < bytes; off += CHUNK) {
        size_t len = bytes - off < CHUNK ? (size_t)(bytes - off) : CHUNK, put = 0;
        while (put < len) {
            ssize_t n = write(sock, src + off + put, len - put);
            if (n < 0) {
                if (errno == EINTR) continue;
                die("write");
            }
            put += (size_t)n;
        }
    }
    if (close(sock) < 0) die("close");
}

/* One TCP run; returns the receive time in ns. */
static uint64_t tcp_run(int listener, const struct sockaddr_in *addr, const char *src, char *dst, uint64_t bytes) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        child_role = "sender";
        send_all(listener, addr, src, bytes);
        _exit(0);
    }
    child_pid = pid;

    int conn;
    while ((conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC)) < 0)
        if (errno != EINTR) die("accept");
    uint64_t t0 = now_ns(), got = 0;
    while (got < bytes) {
        size_t want = bytes - got < CHUNK ? (size_t)(bytes - got) : CHUNK;
        ssize_t n = recv(conn, dst + got, want, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("recv");
        }
        if (n == 0) fail("sender closed the connection early");
        got += (uint64_t)n;
    }
    uint64_t t1 = now_ns();
    char extra;
    ssize_t n;
    while ((n = recv(conn, &extra, 1, 0)) < 0 && errno == EINTR) {}
    if (n != 0) fail(n < 0 ? "recv after the stream" : "sender sent more than BYTES");
    close(conn);

    reap_child(pid, "sender");
    if (memcmp(dst, src, bytes)) fail("tcp: target does not match the source");
    return t1 - t0;
}

/* One memcpy run; returns the copy time in ns. */
static uint64_t memcpy_run(const char *src, char *dst, uint64_t bytes) {
    uint64_t t0 = now_ns();
    for (uint64_t off = 0; off < bytes; off += CHUNK)
        memcpy(dst + off, src + off, bytes - off < CHUNK ? (size_t)(bytes - off) : CHUNK);
    uint64_t t1 = now_ns();
    if (memcmp(dst, src, bytes)) fail("memcpy: target does not match the source");
    return t1 - t0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void print_results(const char *name, const double *runs) {
    double sorted[RUNS];
    memcpy(sorted, runs, sizeof(sorted));
    qsort(sorted, RUNS, sizeof(double), cmp_double);
    printf("%s_gib_per_s=%.3f\n", name, sorted[RUNS / 2]);
}

static void print_runs(const char *name, const double *runs) {
    printf("%s_gib_per_s_runs=", name);
    for (int i = 0; i < RUNS; i++) printf("%s%.3f", i ? "," : "", runs[i]);
    printf("\n");
}

int main(int argc, char **argv) {
    int bad = argc != 3;
    uint64_t bytes = 0;
    if (!bad) {
        char *end;
        errno = 0;
        bytes = strtoull(argv[1], &end, 10);
        bad = argv[1][0] < '0' || argv[1][0] > '9' || errno || *end || bytes == 0 || bytes % HUGE_2M ||
              (strcmp(argv[2], "shmem") && strcmp(argv[2], "hugetlb"));
    }
    if (bad) {
        fprintf(stderr,
                "usage: tcp-stream BYTES shmem|hugetlb\n"
                "  BYTES: positive multiple of 2 MiB (2097152), e.g. 1073741824\n");
        return 2;
    }
    int huge = !strcmp(argv[2], "hugetlb");
    signal(SIGPIPE, SIG_IGN);

    /* Target: the guest-RAM stand-in. */
    int fd = guest_ram_memfd("tcp-stream", bytes, huge);
    char *dst = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (dst == MAP_FAILED) {
        if (huge) {
            char msg[200];
            snprintf(msg, sizeof(msg),
                     "mmap hugetlb memfd: %s (no free 2 MiB hugepages? %llu needed, see /proc/sys/vm/nr_hugepages "
                     "and HugePages_Free in /proc/meminfo)",
                     strerror(errno), (unsigned long long)(bytes / HUGE_2M));
            fail(msg);
        }
        die("mmap memfd");
    }
    if (!huge && madvise(dst, bytes, MADV_NOHUGEPAGE) < 0) die("madvise MADV_NOHUGEPAGE");
    for (uint64_t off = 0; off < bytes; off += 4096) dst[off] = 1;

    /* Source: position-dependent, every 8-byte word non-zero. */
    char *src = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (src == MAP_FAILED) die("mmap source");
    for (uint64_t off = 0; off < bytes; off += 8) *(uint64_t *)(src + off) = (off + 8) * 0x9E3779B97F4A7C15ull;

    struct sockaddr_in addr;
    int listener = listen_loopback(&addr);

    double tcp[RUNS], copy[RUNS];
    for (int r = 0; r < RUNS; r++) {
        memset(dst, 0xA5, bytes);
        tcp[r] = gib_per_s(bytes, tcp_run(listener, &addr, src, dst, bytes));
        memset(dst, 0x5A, bytes);
        copy[r] = gib_per_s(bytes, memcpy_run(src, dst, bytes));
    }
    close(listener);

    printf("bytes=%llu\n", (unsigned long long)bytes);
    print_results("tcp", tcp);
    print_results("memcpy", copy);
    print_runs("tcp", tcp);
    print_runs("memcpy", copy);
    return 0;
}
