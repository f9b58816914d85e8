/*
 * libpostcopy-vmm.so: puts an unmodified VMM (QEMU) on postcopyd.
 *
 * Preloaded into the destination VMM (LD_PRELOAD) with
 * POSTCOPY_VMM_SOCKET naming postcopyd's VMM socket. At load it connects
 * and takes VMM_OFFER: the guest RAM file's descriptor and geometry. When
 * the VMM later maps that file (the same device and inode, whatever path
 * it opened), the adapter registers the mapping with a userfaultfd of the
 * VMM's process in minor and missing mode and sends VMM_ATTACH with it,
 * before the VMM gets the address back, so no touch precedes the
 * registration. From then on postcopyd resolves the guest's faults; a thread
 * of the adapter answers VMM_COMPLETE (unregister, wake, reply), releases
 * the range on ERROR, and hands everything back to a restarted postcopyd
 * when the first dies. This is the handshake of docs/protocol.md, the same
 * one `postcopy-guest vmm` speaks.
 *
 * Rules for code that runs inside someone else's process:
 *  - a mapping of any other file, and any process without
 *    POSTCOPY_VMM_SOCKET, is left exactly as it was;
 *  - the interposed mmap does a few system calls and no allocation;
 *  - a matched mapping that cannot be registered fails (ENOTSUP): a guest
 *    running on RAM that is not tracked would read stale pages silently;
 *  - everything said goes to stderr, prefixed "postcopy-vmm: ".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- the frame codec (docs/protocol.md, "Frames") ---- */

enum {
    FRAME_MAGIC = 0x59504350u, /* "PCPY" read as a little-endian word */
    FRAME_VERSION = 3,
    HEADER_BYTES = 16,
    MAX_PAYLOAD = 1026, /* the largest frame the VMM socket carries: ERROR */
    DIGEST_BYTES = 32,
    TYPE_ERROR = 11,
    TYPE_HEARTBEAT = 12,
    TYPE_VMM_OFFER = 32,
    TYPE_VMM_ATTACH = 33,
    TYPE_VMM_RESUME = 34,
    TYPE_VMM_COMPLETE = 35,
    TYPE_VMM_HANDBACK = 36,
    TYPE_VMM_REATTACH = 37,
    HANDBACK_RAM = 1,
    HANDBACK_PAGE_STATE = 2,
};

struct frame {
    uint8_t type;
    uint32_t length;
    uint8_t payload[MAX_PAYLOAD];
    int fd; /* passed with the frame, or -1 */
};

static void say(const char *format, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *format, ...)
{
    char line[1400];
    int n = snprintf(line, sizeof line, "postcopy-vmm: ");
    va_list args;
    va_start(args, format);
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, format, args);
    va_end(args);
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t ignored = write(STDERR_FILENO, line, (size_t)n);
    (void)ignored;
}

/* CRC-32C, bit by bit: the frames here are a few dozen bytes. */
static uint32_t crc32c(uint32_t crc, const uint8_t *bytes, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        crc ^= bytes[i];
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return crc;
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* Sends one frame, with `fd` as SCM_RIGHTS when it is not -1. */
static int send_frame(int sock, uint8_t type, const uint8_t *payload, uint32_t length, int fd)
{
    uint8_t bytes[HEADER_BYTES + 32];
    if (length > sizeof bytes - HEADER_BYTES)
        return -EINVAL;
    put32(bytes, FRAME_MAGIC);
    bytes[4] = FRAME_VERSION;
    bytes[5] = type;
    bytes[6] = bytes[7] = 0;
    put32(bytes + 8, length);
    memcpy(bytes + HEADER_BYTES, payload, length);
    uint32_t crc = crc32c(0xFFFFFFFFu, bytes, 12);
    crc = crc32c(crc, payload, length) ^ 0xFFFFFFFFu;
    put32(bytes + 12, crc);

    struct iovec io = { .iov_base = bytes, .iov_len = HEADER_BYTES + length };
    union {
        struct cmsghdr header;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr message = { .msg_iov = &io, .msg_iovlen = 1 };
    if (fd >= 0) {
        memset(&control, 0, sizeof control);
        message.msg_control = control.space;
        message.msg_controllen = sizeof control.space;
        struct cmsghdr *c = CMSG_FIRSTHDR(&message);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    size_t sent = 0;
    while (sent < io.iov_len) {
        ssize_t n = sendmsg(sock, &message, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EPIPE;
        sent += (size_t)n;
        io.iov_base = bytes + sent;
        io.iov_len -= (size_t)n;
        message.msg_control = NULL; /* the descriptor went with the first byte */
        message.msg_controllen = 0;
    }
    return 0;
}

/* Reads `count` bytes, keeping the first descriptor that arrives with them. */
static int receive_bytes(int sock, uint8_t *into, size_t count, int *fd)
{
    size_t done = 0;
    while (done < count) {
        union {
            struct cmsghdr header;
            char space[CMSG_SPACE(sizeof(int) * 4)];
        } control;
        struct iovec io = { .iov_base = into + done, .iov_len = count - done };
        struct msghdr message = { .msg_iov = &io, .msg_iovlen = 1,
                                  .msg_control = control.space, .msg_controllen = sizeof control.space };
        ssize_t n = recvmsg(sock, &message, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&message); c; c = CMSG_NXTHDR(&message, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t fds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < fds; i++) {
                int received;
                memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof received);
                if (*fd < 0)
                    *fd = received;
                else
                    close(received);
            }
        }
        if (n == 0)
            return done == 0 ? 0 : -EPIPE;
        done += (size_t)n;
    }
    return 1;
}

/* Whether postcopyd may send a frame of `type` with `length` bytes of
 * payload: the codec's length rule (docs/protocol.md, "Messages") for each
 * frame this adapter receives. VMM_COMPLETE from postcopyd carries the
 * source's image digest, which the adapter does not check (its answer is
 * empty); VMM_RESUME carries only the page-state record's descriptor. */
static int payload_length_fits(uint8_t type, uint32_t length)
{
    switch (type) {
    case TYPE_VMM_OFFER:
        return length == 20;
    case TYPE_VMM_RESUME:
    case TYPE_HEARTBEAT:
        return length == 0;
    case TYPE_VMM_COMPLETE:
        return length == DIGEST_BYTES;
    case TYPE_ERROR:
        return length >= 2 && length <= MAX_PAYLOAD;
    default:
        return 1; /* not a frame postcopyd sends a VMM: the caller says so */
    }
}

/* 1: a frame; 0: the peer closed the socket; < 0: -errno, or -EPROTO for
 * a frame that fails the codec's checks (bad magic, version, flags,
 * length or checksum). The length is checked against the type before any
 * of the payload is read. */
static int receive_frame(int sock, struct frame *frame)
{
    uint8_t header[HEADER_BYTES];
    frame->fd = -1;
    int rc = receive_bytes(sock, header, HEADER_BYTES, &frame->fd);
    if (rc <= 0)
        return rc;
    frame->type = header[5];
    frame->length = get32(header + 8);
    if (get32(header) != FRAME_MAGIC || header[4] != FRAME_VERSION || header[6] || header[7]
        || frame->length > MAX_PAYLOAD || !payload_length_fits(frame->type, frame->length))
        goto malformed;
    rc = receive_bytes(sock, frame->payload, frame->length, &frame->fd);
    if (rc <= 0)
        goto broken;
    uint32_t crc = crc32c(0xFFFFFFFFu, header, 12);
    crc = crc32c(crc, frame->payload, frame->length) ^ 0xFFFFFFFFu;
    if (crc != get32(header + 12))
        goto malformed;
    return 1;
malformed:
    rc = -EPROTO;
broken:
    if (frame->fd >= 0)
        close(frame->fd);
    frame->fd = -1;
    return rc == 0 ? -EPIPE : rc;
}

static void report_error_frame(const struct frame *frame, const char *when)
{
    static const char *const names[] = { "", "protocol", "incompatible", "outOfRange", "checksum",
        "unexpectedMessage", "internal", "cancelled", "peerLost", "refused" };
    unsigned code = frame->length >= 2 ? (unsigned)(frame->payload[0] | frame->payload[1] << 8) : 0;
    int text = frame->length >= 2 ? (int)frame->length - 2 : 0;
    const char *name = code > 0 && code < sizeof names / sizeof names[0] ? names[code] : "unknown code";
    say("postcopyd sent ERROR %u (%s)%s%s: %.*s", code, name, *when ? " " : "", when, text,
        (const char *)frame->payload + 2);
}

/* ---- state ---- */

static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static int (*real_madvise)(void *, size_t, int);

static char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static double reattach_seconds = 60;

/* Set by the constructor once VMM_OFFER arrived; cleared by the mapping
 * that claims the offer, so exactly one mapping is registered. */
static atomic_int offered;
/* The guest range is registered and not yet released. */
static atomic_int registered;

static int sock = -1;
static int ram_fd = -1;       /* VMM_OFFER's descriptor, kept for a handback */
static int page_state_fd = -1; /* VMM_RESUME's descriptor, kept for a handback */
static int uffd = -1;
static dev_t ram_dev;
static ino_t ram_ino;
static uint64_t region_size, page_size, file_offset;
static uint64_t guest_base, features, register_mode;

/* VMM_ATTACH's payload, which VMM_REATTACH repeats. */
static void attach_payload(uint8_t payload[24])
{
    put64(payload, guest_base);
    put64(payload + 8, features);
    put64(payload + 16, register_mode);
}

static int connect_socket(void)
{
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -errno;
    struct sockaddr_un address = { .sun_family = AF_UNIX };
    memcpy(address.sun_path, socket_path, sizeof address.sun_path);
    if (connect(s, (struct sockaddr *)&address, sizeof address) < 0) {
        int saved = errno;
        close(s);
        return -saved;
    }
    return s;
}

/* ---- at load: take the offer ---- */

__attribute__((constructor)) static void postcopy_vmm_load(void)
{
    real_mmap = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
    real_madvise = (int (*)(void *, size_t, int))dlsym(RTLD_NEXT, "madvise");
    const char *path = getenv("POSTCOPY_VMM_SOCKET");
    if (!path || !*path)
        return;
    if (!real_mmap || !real_madvise) {
        say("cannot find the C library's mmap and madvise; not attaching to postcopyd");
        return;
    }
    if (strlen(path) >= sizeof socket_path) {
        say("POSTCOPY_VMM_SOCKET is longer than a unix socket path may be (%zu bytes): %s",
            sizeof socket_path - 1, path);
        return;
    }
    strcpy(socket_path, path);
    const char *seconds = getenv("POSTCOPY_VMM_REATTACH_SECONDS");
    if (seconds && *seconds)
        reattach_seconds = strtod(seconds, NULL);

    int s = connect_socket();
    if (s < 0) {
        say("cannot connect to postcopyd's VMM socket %s: %s; guest RAM will not be served by postcopyd",
            socket_path, strerror(-s));
        return;
    }
    /* postcopyd answers at once; a VMM must not hang at start if it does not. */
    struct timeval patience = { .tv_sec = 10 }, forever = { 0 };
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
    struct frame offer;
    int rc = receive_frame(s, &offer);
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &forever, sizeof forever);
    if (rc <= 0) {
        say("no VMM_OFFER from postcopyd's VMM socket %s: %s", socket_path,
            rc == 0 ? "it closed the connection" : rc == -EAGAIN ? "none within 10 s" : strerror(-rc));
        close(s);
        return;
    }
    if (offer.type == TYPE_ERROR) {
        report_error_frame(&offer, "instead of VMM_OFFER");
        close(s);
        return;
    }
    struct stat st;
    if (offer.type != TYPE_VMM_OFFER || offer.length != 20 || offer.fd < 0 || fstat(offer.fd, &st) < 0) {
        say("expected VMM_OFFER with the RAM file from postcopyd, got frame type %u (%u bytes%s)",
            offer.type, offer.length, offer.fd < 0 ? ", no descriptor" : "");
        if (offer.fd >= 0)
            close(offer.fd);
        close(s);
        return;
    }
    region_size = get64(offer.payload);
    page_size = get32(offer.payload + 8);
    file_offset = get64(offer.payload + 12);
    if ((page_size != 4096 && page_size != 2u << 20) || region_size == 0 || region_size % page_size
        || file_offset % page_size) {
        say("VMM_OFFER makes no sense (%" PRIu64 " bytes at offset %" PRIu64 " in %" PRIu64
            "-byte pages); not attaching", region_size, file_offset, page_size);
        close(offer.fd);
        close(s);
        return;
    }
    sock = s;
    ram_fd = offer.fd;
    ram_dev = st.st_dev;
    ram_ino = st.st_ino;
    atomic_store(&offered, 1);
    say("postcopyd offered guest RAM: %" PRIu64 " MiB in %" PRIu64 " KiB pages, file device %u:%u inode %lu;"
        " waiting for the VMM to map it", region_size >> 20, page_size >> 10, major(st.st_dev),
        minor(st.st_dev), (unsigned long)st.st_ino);
}

/* ---- the interposed calls ---- */

static int open_userfaultfd(void)
{
    int flags = O_CLOEXEC | O_NONBLOCK;
    int device = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (device >= 0) {
        int fd = ioctl(device, USERFAULTFD_IOC_NEW, flags);
        close(device);
        if (fd >= 0)
            return fd;
    }
    int fd = (int)syscall(SYS_userfaultfd, flags);
    return fd < 0 ? -errno : fd;
}

static void *attach_mapping(void *address, size_t length, off_t offset);

void *mmap(void *address, size_t length, int prot, int flags, int fd, off_t offset)
{
    if (!real_mmap) /* a call before the constructor ran */
        return (void *)syscall(SYS_mmap, address, length, prot, flags, fd, offset);
    void *mapped = real_mmap(address, length, prot, flags, fd, offset);
    if (mapped == MAP_FAILED || fd < 0 || !(flags & MAP_SHARED)
        || !(atomic_load(&offered) || atomic_load(&registered)))
        return mapped;
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_dev != ram_dev || st.st_ino != ram_ino)
        return mapped;
    return attach_mapping(mapped, length, offset);
}

void *mmap64(void *address, size_t length, int prot, int flags, int fd, off_t offset)
    __attribute__((alias("mmap")));

/* THP on the guest range would let khugepaged map pages behind minor-fault
 * tracking: a VMM asking for huge pages there is told yes and ignored. */
int madvise(void *address, size_t length, int advice)
{
    if (!real_madvise)
        return (int)syscall(SYS_madvise, address, length, advice);
    if (advice == MADV_HUGEPAGE && atomic_load(&registered)) {
        uintptr_t start = (uintptr_t)address, end = start + length;
        if (start < guest_base + region_size && guest_base < end) {
            say("ignoring MADV_HUGEPAGE on guest RAM while postcopy runs");
            return 0;
        }
    }
    return real_madvise(address, length, advice);
}

/* Undoes a matched mapping that cannot be served. The offer stands, so a
 * later mapping of the file is checked (and refused) the same way rather
 * than passed through untracked. */
static void *refuse_mapping(void *mapped, size_t length)
{
    munmap(mapped, length);
    if (!atomic_load(&registered))
        atomic_store(&offered, 1);
    errno = ENOTSUP;
    return MAP_FAILED;
}

static void *release_thread(void *);

/* The VMM mapped the offered file: register it and send VMM_ATTACH. */
static void *attach_mapping(void *mapped, size_t length, off_t offset)
{
    if (!atomic_exchange(&offered, 0)) {
        if (atomic_load(&registered)) {
            say("the VMM maps guest RAM a second time while postcopy runs; refusing that mapping,"
                " whose pages would not be tracked");
            return refuse_mapping(mapped, length);
        }
        return mapped; /* postcopy is over: an ordinary shared file */
    }
    if ((uint64_t)offset != file_offset || (uint64_t)length != region_size) {
        say("the VMM maps %zu bytes of guest RAM at file offset %lld, but postcopyd serves %" PRIu64
            " bytes at offset %" PRIu64 "; give the VMM the same size (QEMU: size= of the memory backend)",
            length, (long long)offset, region_size, file_offset);
        return refuse_mapping(mapped, length);
    }
    if ((uintptr_t)mapped % page_size) {
        say("the VMM's mapping of guest RAM at %p is not aligned to %" PRIu64 " bytes", mapped, page_size);
        return refuse_mapping(mapped, length);
    }
    int fd = open_userfaultfd();
    if (fd < 0) {
        say("cannot open a userfaultfd in the VMM (%s): it needs /dev/userfaultfd access or CAP_SYS_PTRACE",
            strerror(-fd));
        return refuse_mapping(mapped, length);
    }
    int hugetlb = page_size != 4096;
    uint64_t wanted = hugetlb ? UFFD_FEATURE_MINOR_HUGETLBFS | UFFD_FEATURE_MISSING_HUGETLBFS
                              : UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_MISSING_SHMEM;
    struct uffdio_api api = { .api = UFFD_API, .features = wanted };
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        say("the kernel's userfaultfd lacks %s (minor faults need Linux %s): %s",
            hugetlb ? "MINOR_HUGETLBFS|MISSING_HUGETLBFS" : "MINOR_SHMEM|MISSING_SHMEM",
            hugetlb ? "5.13" : "5.14", strerror(errno));
        close(fd);
        return refuse_mapping(mapped, length);
    }
    struct uffdio_register reg = {
        .range = { .start = (uintptr_t)mapped, .len = length },
        .mode = UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0 || !(reg.ioctls & (1ull << _UFFDIO_CONTINUE))) {
        say("cannot register guest RAM for minor faults: %s",
            errno ? strerror(errno) : "the kernel offers no UFFDIO_CONTINUE on it");
        close(fd);
        return refuse_mapping(mapped, length);
    }
    if (!hugetlb)
        real_madvise(mapped, length, MADV_NOHUGEPAGE);
    uffd = fd;
    guest_base = (uintptr_t)mapped;
    features = api.features;
    register_mode = reg.mode;
    uint8_t payload[24];
    attach_payload(payload);
    int rc = send_frame(sock, TYPE_VMM_ATTACH, payload, sizeof payload, uffd);
    if (rc < 0) {
        say("cannot send VMM_ATTACH to postcopyd: %s", strerror(-rc));
        struct uffdio_range range = { .start = guest_base, .len = region_size };
        ioctl(uffd, UFFDIO_UNREGISTER, &range);
        close(uffd);
        uffd = -1;
        return refuse_mapping(mapped, length);
    }
    atomic_store(&registered, 1);
    pthread_t thread;
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    int failed = pthread_create(&thread, &attributes, release_thread, NULL);
    pthread_attr_destroy(&attributes);
    if (failed)
        say("cannot start the adapter's thread (%s): the range will not be released at the end",
            strerror(failed));
    say("guest RAM at %p registered (minor|missing) and handed to postcopyd", mapped);
    return mapped;
}

/* ---- after the attachment: the adapter's own thread ---- */

static void release_range(const char *why)
{
    struct uffdio_range range = { .start = guest_base, .len = region_size };
    if (ioctl(uffd, UFFDIO_UNREGISTER, &range) < 0)
        say("UFFDIO_UNREGISTER of guest RAM failed: %s", strerror(errno));
    if (ioctl(uffd, UFFDIO_WAKE, &range) < 0 && errno != ENOENT && errno != EINVAL)
        say("UFFDIO_WAKE of guest RAM failed: %s", strerror(errno));
    atomic_store(&registered, 0);
    say("guest RAM released: %s", why);
}

static void keep_page_state(int fd)
{
    if (page_state_fd >= 0)
        close(page_state_fd);
    page_state_fd = fd;
}

static double seconds_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Hands the RAM file, the page-state record and the userfaultfd to a
 * restarted postcopyd. Returns the new socket once one answers VMM_RESUME,
 * or -1 when the time is up. */
static int reattach(void)
{
    double deadline = seconds_now() + reattach_seconds;
    useconds_t delay = 50000;
    while (seconds_now() < deadline) {
        int s = connect_socket();
        if (s >= 0) {
            uint8_t kind[4], payload[24];
            attach_payload(payload);
            put32(kind, HANDBACK_RAM);
            int rc = send_frame(s, TYPE_VMM_HANDBACK, kind, 4, ram_fd);
            put32(kind, HANDBACK_PAGE_STATE);
            if (rc == 0)
                rc = send_frame(s, TYPE_VMM_HANDBACK, kind, 4, page_state_fd);
            if (rc == 0)
                rc = send_frame(s, TYPE_VMM_REATTACH, payload, sizeof payload, uffd);
            struct frame frame;
            while (rc == 0 && receive_frame(s, &frame) == 1) {
                if (frame.type == TYPE_VMM_RESUME && frame.fd >= 0) {
                    keep_page_state(frame.fd);
                    say("reattached to a restarted postcopyd");
                    return s;
                }
                if (frame.fd >= 0)
                    close(frame.fd); /* a new migration's VMM_OFFER: not ours */
                if (frame.type == TYPE_ERROR) {
                    report_error_frame(&frame, "to the reattachment");
                    break;
                }
            }
            close(s);
        }
        usleep(delay);
        if (delay < 2000000)
            delay *= 2;
    }
    return -1;
}

static void *release_thread(void *unused)
{
    (void)unused;
    pthread_setname_np(pthread_self(), "postcopy-vmm");
    int resumed = 0;
    for (;;) {
        struct frame frame;
        int rc = receive_frame(sock, &frame);
        if (rc == 1 && frame.type == TYPE_HEARTBEAT)
            continue;
        if (rc == 1 && frame.type == TYPE_VMM_RESUME && frame.fd >= 0) {
            keep_page_state(frame.fd);
            resumed = 1;
            say("postcopyd serves guest RAM now (VMM_RESUME)");
            continue;
        }
        if (rc == 1 && frame.type == TYPE_VMM_COMPLETE) {
            /* Its payload is the source's image digest; the answer is empty. */
            release_range("postcopy is complete; guest RAM is an ordinary shared mapping again");
            if (send_frame(sock, TYPE_VMM_COMPLETE, NULL, 0, -1) < 0)
                say("cannot answer VMM_COMPLETE: %s", strerror(errno));
            break;
        }
        if (rc == 1 && frame.type == TYPE_ERROR) {
            report_error_frame(&frame, "");
            release_range(resumed ? "the migration failed during postcopy: guest RAM is INCOMPLETE;"
                                    " stop this guest, the source holds the only good copy"
                                  : "the migration failed before the guest ran here");
            break;
        }
        if (rc == 1) {
            if (frame.fd >= 0)
                close(frame.fd);
            say("unexpected frame type %u from postcopyd; ignored", frame.type);
            continue;
        }
        /* The socket closed or broke without ERROR: postcopyd died. */
        if (resumed && page_state_fd >= 0 && reattach_seconds > 0) {
            say("postcopyd went away during postcopy (%s); the guest's stale faults wait while this"
                " VMM reattaches to a restarted postcopyd, for up to %.0f s",
                rc == 0 ? "end of file" : strerror(-rc), reattach_seconds);
            close(sock);
            sock = reattach();
            if (sock >= 0)
                continue;
            release_range("no postcopyd took the guest back in time: guest RAM is INCOMPLETE;"
                          " stop this guest");
        } else {
            release_range(resumed ? "postcopyd went away during postcopy: guest RAM is INCOMPLETE"
                                  : "postcopyd went away before the guest ran here");
        }
        break;
    }
    /* Nothing is left to hand back: the range is released. */
    if (sock >= 0)
        close(sock);
    sock = -1;
    close(uffd);
    uffd = -1;
    close(ram_fd);
    ram_fd = -1;
    if (page_state_fd >= 0)
        close(page_state_fd);
    page_state_fd = -1;
    return NULL;
}
