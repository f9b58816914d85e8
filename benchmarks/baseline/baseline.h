/*
 * What the loopback baselines (tcp-pingpong, tcp-stream, precopy-stream)
 * share: failing with a clear message (and taking the forked peer down with
 * the program), the monotonic clock, and the memfd that stands in for guest
 * RAM. Each program defines _GNU_SOURCE and BASELINE_NAME before including
 * this.
 */
#ifndef BASELINE_H
#define BASELINE_H

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/memfd.h>

static pid_t child_pid;         /* in the parent, while the forked peer runs */
static const char *child_role;  /* in the child: "server", "sender", … */

static void fail(const char *msg) {
    if (child_role)
        fprintf(stderr, "%s (%s): %s\n", BASELINE_NAME, child_role, msg);
    else
        fprintf(stderr, "%s: %s\n", BASELINE_NAME, msg);
    if (child_pid > 0) kill(child_pid, SIGKILL);
    exit(1);
}

static void die(const char *what) {
    char msg[256];
    snprintf(msg, sizeof(msg), "%s: %s", what, strerror(errno));
    fail(msg);
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Waits for the forked peer `pid` (the `role` it plays, for the message)
 * and fails unless it exited 0. */
static void reap_child(pid_t pid, const char *role) {
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) die("waitpid");
    child_pid = 0;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        char msg[64];
        snprintf(msg, sizeof(msg), "%s child failed (status 0x%x)", role, status);
        fail(msg);
    }
}

/* A memfd of `bytes` standing in for guest RAM (`name` shows in
 * /proc/PID/fd): shmem, or 2 MiB hugetlbfs pages when `huge`; nothing in it
 * touched yet. Fails saying what is missing. */
static inline int guest_ram_memfd(const char *name, uint64_t bytes, int huge) {
    int fd = memfd_create(name, MFD_CLOEXEC | (huge ? MFD_HUGETLB | MFD_HUGE_2MB : 0));
    if (fd < 0) {
        if (huge) die("memfd_create MFD_HUGETLB|MFD_HUGE_2MB (kernel without hugetlbfs?)");
        die("memfd_create");
    }
    if (ftruncate(fd, (off_t)bytes) < 0) {
        if (huge) die("ftruncate hugetlb memfd (no free 2 MiB hugepages? see /proc/sys/vm/nr_hugepages)");
        die("ftruncate");
    }
    return fd;
}

/* A TCP socket listening on 127.0.0.1 at a free port, written to *addr. */
static int listen_loopback(struct sockaddr_in *addr) {
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0) die("socket");
    *addr = (struct sockaddr_in){ .sin_family = AF_INET, .sin_port = 0, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(listener, (struct sockaddr *)addr, sizeof(*addr)) < 0) die("bind 127.0.0.1:0");
    if (listen(listener, 1) < 0) die("listen");
    socklen_t length = sizeof(*addr);
    if (getsockname(listener, (struct sockaddr *)addr, &length) < 0) die("getsockname");
    return listener;
}

#endif
