/*
 * uffd-minor-loop: the clean-fault baseline for postcopy-bench.
 *
 * The smallest C program doing what postcopyd's FaultLoop does for a clean
 * page, with the same set-up: a memfd (MFD_HUGETLB for 2 MiB pages) filled
 * through an alias mapping, a second mapping registered MINOR | MISSING, a
 * fault thread that polls the userfaultfd and a stop eventfd, reads up to 64
 * messages at once and resolves each with UFFDIO_CONTINUE, and a toucher
 * thread reading the first word of every page in order.
 *
 *   usage: uffd-minor-loop shmem|hugetlb SIZE_BYTES
 *   prints: ns_per_fault=<toucher wall time / pages>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/memfd.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

static int uffd, stop_fd;
static char *guest;
static uint64_t page_size, pages, faults;
static volatile uint64_t sink;
static uint64_t elapsed_ns;

static void die(const char *what) {
    fprintf(stderr, "uffd-minor-loop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int open_uffd(void) {
    int flags = O_CLOEXEC | O_NONBLOCK;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        close(dev);
        if (fd >= 0) return fd;
    }
    return (int)syscall(__NR_userfaultfd, flags);
}

static void *fault_thread(void *arg) {
    (void)arg;
    struct uffd_msg msgs[64];
    struct pollfd fds[2] = { { .fd = uffd, .events = POLLIN }, { .fd = stop_fd, .events = POLLIN } };
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (fds[1].revents) return NULL;
        ssize_t n = read(uffd, msgs, sizeof(msgs));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            die("read");
        }
        for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
            faults++;
            uint64_t start = msgs[i].arg.pagefault.address & ~(page_size - 1);
            struct uffdio_continue cont = { .range = { .start = start, .len = page_size } };
            while (ioctl(uffd, UFFDIO_CONTINUE, &cont) < 0) {
                if (errno == EEXIST) {
                    struct uffdio_range range = { .start = start, .len = page_size };
                    ioctl(uffd, UFFDIO_WAKE, &range);
                    break;
                }
                if (errno != EAGAIN && errno != EINTR) die("UFFDIO_CONTINUE");
            }
        }
    }
}

static void *toucher(void *arg) {
    (void)arg;
    uint64_t start = now_ns(), acc = 0;
    for (uint64_t p = 0; p < pages; p++) acc ^= *(volatile uint64_t *)(guest + p * page_size);
    elapsed_ns = now_ns() - start;
    sink = acc;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "shmem") && strcmp(argv[1], "hugetlb"))) {
        fprintf(stderr, "usage: uffd-minor-loop shmem|hugetlb SIZE_BYTES\n");
        return 2;
    }
    int huge = !strcmp(argv[1], "hugetlb");
    uint64_t size = strtoull(argv[2], NULL, 10);
    page_size = huge ? 2u << 20 : 4096;
    if (size == 0 || size % page_size) { fprintf(stderr, "size must be a multiple of the page size\n"); return 2; }
    pages = size / page_size;

    int fd = memfd_create("uffd-minor-loop", MFD_CLOEXEC | (huge ? MFD_HUGETLB | MFD_HUGE_2MB : 0));
    if (fd < 0) die("memfd_create");
    if (ftruncate(fd, (off_t)size) < 0) die("ftruncate");
    char *alias = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    guest = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (alias == MAP_FAILED || guest == MAP_FAILED) die("mmap");
    if (!huge && (madvise(alias, size, MADV_NOHUGEPAGE) || madvise(guest, size, MADV_NOHUGEPAGE))) die("madvise");
    for (uint64_t off = 0; off < size; off += 8) *(uint64_t *)(alias + off) = off | 1;

    /* Probe on one descriptor, enable on a fresh one, as postcopyd does. */
    uint64_t want = huge ? UFFD_FEATURE_MINOR_HUGETLBFS | UFFD_FEATURE_MISSING_HUGETLBFS
                         : UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_MISSING_SHMEM;
    int probe = open_uffd();
    if (probe < 0) die("userfaultfd");
    struct uffdio_api api = { .api = UFFD_API };
    if (ioctl(probe, UFFDIO_API, &api) < 0) die("UFFDIO_API probe");
    close(probe);
    if ((api.features & want) != want) { fprintf(stderr, "kernel lacks minor-fault features\n"); return 1; }
    uffd = open_uffd();
    if (uffd < 0) die("userfaultfd");
    api = (struct uffdio_api){ .api = UFFD_API, .features = want };
    if (ioctl(uffd, UFFDIO_API, &api) < 0) die("UFFDIO_API");
    struct uffdio_register reg = {
        .range = { .start = (uint64_t)(uintptr_t)guest, .len = size },
        .mode = UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) die("UFFDIO_REGISTER");
    stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (stop_fd < 0) die("eventfd");

    pthread_t handler, vcpu;
    if (pthread_create(&handler, NULL, fault_thread, NULL)) die("pthread_create");
    if (pthread_create(&vcpu, NULL, toucher, NULL)) die("pthread_create");
    pthread_join(vcpu, NULL);
    uint64_t one = 1;
    if (write(stop_fd, &one, 8) != 8) die("write eventfd");
    pthread_join(handler, NULL);
    if (faults != pages) { fprintf(stderr, "expected %lu faults, saw %lu\n", pages, faults); return 1; }
    printf("ns_per_fault=%.1f\n", (double)elapsed_ns / (double)pages);
    return 0;
}
