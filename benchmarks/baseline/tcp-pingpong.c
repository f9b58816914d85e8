/*
 * tcp-pingpong: the request/response baseline for postcopy-bench.
 *
 * The least a page fetch over loopback TCP can cost: a 16-byte request, a
 * RESPONSE_BYTES reply, no protocol, no parsing. A listening socket on
 * 127.0.0.1 (port 0) is created, then the process forks. The child is the
 * server: it accepts one connection and, until EOF, reads exactly 16 bytes
 * and answers with exactly RESPONSE_BYTES bytes from a pre-filled buffer.
 * The parent is the client: it reads each response straight into a
 * pre-faulted MAP_SHARED memfd mapping of RESPONSE_BYTES (as a page fetch
 * lands in guest memory). TCP_NODELAY on both ends. After 200 untimed
 * warm-up round trips, every round trip is timed with CLOCK_MONOTONIC from
 * just before the request is sent to just after the last response byte is
 * read.
 *
 *   usage: tcp-pingpong RESPONSE_BYTES ITERATIONS
 *   prints: iterations=, response_bytes=, p50_ns=, p99_ns=, p999_ns=,
 *           max_ns=, mean_ns= (percentile q = sorted[floor(q * (N - 1))])
 */
#define _GNU_SOURCE
#define BASELINE_NAME "tcp-pingpong"
#include "baseline.h"
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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

#define REQUEST_BYTES 16
#define WARMUP 200
#define MAX_RESPONSE (64u << 20)
#define MAX_ITERATIONS 100000000u

/* Reads exactly len bytes; returns 0 on EOF before the first byte, 1 when
 * done. EOF in the middle is an error. */
static int read_full(int fd, void *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, (char *)buf + got, len - got);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("read");
        }
        if (n == 0) {
            if (got == 0) return 0;
            fail("connection closed in the middle of a message");
        }
        got += (size_t)n;
    }
    return 1;
}

static void write_full(int fd, const void *buf, size_t len) {
    size_t put = 0;
    while (put < len) {
        ssize_t n = write(fd, (const char *)buf + put, len - put);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("write");
        }
        put += (size_t)n;
    }
}

static void set_nodelay(int fd) {
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0) die("setsockopt TCP_NODELAY");
}

static unsigned char pattern_byte(size_t i) {
    return (unsigned char)(((i * 131u) ^ (i >> 12)) | 1u); /* never zero */
}

static int parse_count(const char *s, uint64_t max, uint64_t *out) {
    char *end;
    if (*s < '0' || *s > '9') return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v == 0 || v > max) return -1;
    *out = v;
    return 0;
}

static void serve(int listener, size_t response_bytes) {
    unsigned char *reply = malloc(response_bytes);
    if (!reply) die("malloc");
    for (size_t i = 0; i < response_bytes; i++) reply[i] = pattern_byte(i);
    int conn;
    while ((conn = accept(listener, NULL, NULL)) < 0)
        if (errno != EINTR) die("accept");
    close(listener);
    set_nodelay(conn);
    unsigned char req[REQUEST_BYTES];
    while (read_full(conn, req, sizeof(req))) write_full(conn, reply, response_bytes);
    close(conn);
    free(reply);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    uint64_t response_bytes, iterations;
    if (argc != 3 || parse_count(argv[1], MAX_RESPONSE, &response_bytes) ||
        parse_count(argv[2], MAX_ITERATIONS, &iterations)) {
        fprintf(stderr,
                "usage: tcp-pingpong RESPONSE_BYTES ITERATIONS\n"
                "  RESPONSE_BYTES: positive integer, at most %u (64 MiB), e.g. 4096 or 2097152\n"
                "  ITERATIONS:     positive integer, at most %u, e.g. 20000\n",
                MAX_RESPONSE, MAX_ITERATIONS);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    struct sockaddr_in addr;
    int listener = listen_loopback(&addr);

    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        child_role = "server";
        serve(listener, response_bytes);
        _exit(0);
    }
    child_pid = pid;
    close(listener);

    /* Client: the response lands in a pre-faulted shared memfd mapping. */
    int mfd = memfd_create("tcp-pingpong", MFD_CLOEXEC);
    if (mfd < 0) die("memfd_create");
    if (ftruncate(mfd, (off_t)response_bytes) < 0) die("ftruncate");
    unsigned char *page = mmap(NULL, response_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (page == MAP_FAILED) die("mmap memfd");
    for (size_t off = 0; off < response_bytes; off += 4096) page[off] = 0xEE;
    page[response_bytes - 1] = 0xEE;

    uint64_t *samples = malloc(iterations * sizeof(uint64_t));
    if (!samples) die("malloc samples");
    for (uint64_t i = 0; i < iterations; i++) samples[i] = 0; /* fault the array in */

    int sock = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) die("socket");
    while (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        if (errno != EINTR) die("connect");
    set_nodelay(sock);

    unsigned char req[REQUEST_BYTES] = { 0 };
    for (uint64_t i = 0; i < WARMUP + iterations; i++) {
        memcpy(req, &i, sizeof(i));
        uint64_t t0 = now_ns();
        write_full(sock, req, sizeof(req));
        if (!read_full(sock, page, response_bytes)) fail("server closed the connection");
        uint64_t t1 = now_ns();
        if (i >= WARMUP) samples[i - WARMUP] = t1 - t0;
    }
    for (size_t i = 0; i < response_bytes; i++)
        if (page[i] != pattern_byte(i)) fail("response does not match the server's pattern");

    close(sock);
    reap_child(pid, "server");

    uint64_t sum = 0;
    for (uint64_t i = 0; i < iterations; i++) sum += samples[i];
    qsort(samples, iterations, sizeof(uint64_t), cmp_u64);
    uint64_t last = iterations - 1;
    printf("iterations=%llu\n", (unsigned long long)iterations);
    printf("response_bytes=%llu\n", (unsigned long long)response_bytes);
    printf("p50_ns=%llu\n", (unsigned long long)samples[last * 500 / 1000]);
    printf("p99_ns=%llu\n", (unsigned long long)samples[last * 990 / 1000]);
    printf("p999_ns=%llu\n", (unsigned long long)samples[last * 999 / 1000]);
    printf("max_ns=%llu\n", (unsigned long long)samples[last]);
    printf("mean_ns=%llu\n", (unsigned long long)(sum / iterations));
    free(samples);
    return 0;
}
