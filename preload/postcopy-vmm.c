/*
 * libpostcopy-vmm.so: puts an unmodified VMM (QEMU) on postcopyd.
 *
 * Destination mode. Preloaded into the destination VMM (LD_PRELOAD) with
 * POSTCOPY_VMM_SOCKET naming postcopyd's VMM socket. At load it connects
 * and takes VMM_OFFER: the guest RAM file's descriptor and geometry. When
 * the VMM later maps that file (the same device and inode, whatever path
 * it opened), the adapter registers the mapping with a userfaultfd of the
 * VMM's process in minor and missing mode and sends VMM_ATTACH with it,
 * before the VMM gets the address back, so no touch precedes the
 * registration. From then on postcopyd resolves the guest's faults; a thread
 * of the adapter acknowledges each VMM_RESUME with VMM_RESUMED once it kept
 * the page-state record, and answers VMM_COMPLETE (unregister, wake,
 * reply). From VMM_RESUME until VMM_COMPLETE it never releases the range
 * (issue 18): on ERROR, when postcopyd dies, or when VMM_RESUMED cannot be
 * sent, the guest's faults wait and the thread hands everything back to a
 * restarted postcopyd, retrying until one comes. ERROR discarded (the
 * device-state hand-over failed, the source runs the guest again) is the
 * exception: the range stays registered, nothing reattaches, and the
 * adapter says to stop this QEMU. Before VMM_RESUME (the guest never ran
 * here) ERROR releases the range. This is the handshake of
 * docs/protocol.md, the same one `postcopy-guest vmm` speaks. Once
 * VMM_COMPLETE released the range (and only then), a thread of its own at
 * nice 19 puts shmem guest RAM back into 2 MiB pages with MADV_COLLAPSE,
 * as the VMM's own MADV_HUGEPAGE, ignored during postcopy, asked
 * (POSTCOPY_VMM_COLLAPSE=0 turns that off; issue 22).
 *
 * Source mode. Preloaded into the source VMM with POSTCOPY_SOURCE_RAM (the
 * guest RAM file) and POSTCOPY_SOURCE_SOCKET (a unix socket to listen on).
 * When the VMM maps that file shared, whole and from offset 0, the adapter
 * registers the mapping with a userfaultfd for asynchronous write-protect
 * (WP_ASYNC, Linux >= 6.7), so that postcopy-push can read the VMM's writes
 * with PAGEMAP_SCAN instead of hashing RAM, and a thread answers each
 * connection to the socket with the offer of docs/protocol.md ("The source
 * VMM's offer"): the mapping, or why there is none. WriteTracking and
 * SourceTrackingServer are the Swift implementation of the same.
 * The two modes exclude each other.
 *
 * Rules for code that runs inside someone else's process:
 *  - a mapping of any other file, and any process without POSTCOPY_VMM_SOCKET
 *    or POSTCOPY_SOURCE_*, is left exactly as it was;
 *  - the interposed mmap does a few system calls and no allocation;
 *  - on the destination, a matched mapping that cannot be registered fails
 *    (ENOTSUP): a guest running on RAM that is not tracked would read stale
 *    pages silently;
 *  - on the source, tracking never fails the VMM's mmap: the mapping stays,
 *    and the offer says why there is no write log (the agent then hashes);
 *  - everything said goes to stderr, prefixed "postcopy-vmm: ".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "vmm-codec.h"

/* uapi constants newer than Debian 12's kernel headers (6.1), as in
 * Sources/CPostcopy/include/cpostcopy.h. */
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25 /* Linux 6.1; Debian 12's glibc headers lack it */
#endif

/* ---- the frame codec: preload/vmm-codec.h, on the wire's definition ---- */

enum {
    /* The longest frame the adapter sends (VMM_ATTACH, VMM_REATTACH). */
    SENT_FRAME_BYTES = CPC_WIRE_HEADER_BYTES + CODEC_MAX_SENT,
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

/* Sends one frame, with `fd` as SCM_RIGHTS when it is not -1. */
static int send_frame(int sock, uint8_t type, const uint8_t *payload, uint32_t length, int fd)
{
    uint8_t bytes[SENT_FRAME_BYTES];
    size_t count = encode_frame(bytes, sizeof bytes, type, payload, length);
    if (count == 0)
        return -EINVAL;

    struct iovec io = { .iov_base = bytes, .iov_len = count };
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

/* 1: a frame; 0: the peer closed the socket; < 0: -errno, or -EPROTO for
 * a frame that fails the codec's checks (bad magic, version, flags,
 * length or checksum). The length is checked against the type before any
 * of the payload is read. */
static int receive_frame(int sock, struct frame *frame)
{
    uint8_t header[CPC_WIRE_HEADER_BYTES];
    frame->fd = -1;
    int rc = receive_bytes(sock, header, sizeof header, &frame->fd);
    if (rc <= 0)
        return rc;
    if (decode_header(header, frame) < 0)
        goto malformed;
    rc = receive_bytes(sock, frame->payload, frame->length, &frame->fd);
    if (rc <= 0)
        goto broken;
    if (!checksum_matches(header, frame))
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
    unsigned code = error_code(frame);
    say("postcopyd sent ERROR %u (%s)%s%s: %.*s", code, error_name(code), *when ? " " : "", when,
        error_text_length(frame), error_text(frame));
}

/* ERROR discarded: the hand-over of the device state failed before the
 * point of no return, and the source QEMU runs the guest again. This copy
 * must never run, whatever its RAM holds: two guests would then write the
 * same disks. Only the operator can stop this QEMU, so the line says so. */
static void say_discarded(const struct frame *frame)
{
    say("postcopyd discarded the migration before this guest ran here (%.*s): the source runs it again;"
        " stop this QEMU, its guest must not run here", error_text_length(frame),
        error_text(frame));
}

/* ---- state ---- */

static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static int (*real_madvise)(void *, size_t, int);

static char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static double reattach_seconds = 60;
static int collapse_enabled = 1; /* POSTCOPY_VMM_COLLAPSE */
/* The VMM's last THP advice on guest RAM while it was registered:
 * MADV_HUGEPAGE (ignored then, re-applied after postcopy), MADV_NOHUGEPAGE
 * (passed through, and then no collapse), or 0 for none. */
static atomic_int vmm_thp_advice;

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

/* Source mode (the end of this file): set once the dirty-log socket
 * listens, in the process that created it; the interposed mmap then looks
 * for shared mappings of POSTCOPY_SOURCE_RAM. */
static atomic_int source_mode;
static atomic_int source_known; /* source_dev and source_ino are set */
static dev_t source_dev;
static ino_t source_ino;
static int source_file_appeared(void);
static void source_load(int destination);
static void track_source_mapping(void *mapped, size_t length, off_t offset, const struct stat *st);

/* VMM_ATTACH's payload, which VMM_REATTACH repeats. */
static void attach_payload(uint8_t payload[CPC_WIRE_VMM_ATTACH_BYTES])
{
    encode_attach(payload, guest_base, features, register_mode);
}

/* The peer of postcopyd's VMM socket must be root or this process's own
 * user: anyone else could pose as postcopyd and be handed guest RAM's
 * userfaultfd. Returns the connected socket; -EACCES for a peer of another
 * user, with `peer` filled in (pid and uid -1 when the kernel would not
 * say); or -errno. */
static int connect_socket(struct ucred *peer)
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
    socklen_t size = sizeof *peer;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, peer, &size) < 0) {
        peer->pid = -1;
        peer->uid = (uid_t)-1;
        close(s);
        return -EACCES;
    }
    if (peer->uid != 0 && peer->uid != geteuid()) {
        close(s);
        return -EACCES;
    }
    return s;
}

/* Says why a socket connect_socket returned -EACCES for was refused. */
static void refuse_peer(const struct ucred *peer, const char *consequence)
{
    if (peer->uid == (uid_t)-1)
        say("refusing postcopyd's VMM socket %s: cannot read its peer's credentials (SO_PEERCRED); %s",
            socket_path, consequence);
    else
        say("refusing postcopyd's VMM socket %s: it is served by pid %d uid %u, but only root or this VMM's"
            " uid %u may serve it; %s", socket_path, (int)peer->pid, (unsigned)peer->uid, (unsigned)geteuid(),
            consequence);
}

/* ---- at load: take the offer ---- */

__attribute__((constructor)) static void postcopy_vmm_load(void)
{
    real_mmap = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
    real_madvise = (int (*)(void *, size_t, int))dlsym(RTLD_NEXT, "madvise");
    const char *path = getenv("POSTCOPY_VMM_SOCKET");
    int destination = path && *path;
    source_load(destination);
    if (!destination)
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
    const char *collapse = getenv("POSTCOPY_VMM_COLLAPSE");
    if (collapse && strcmp(collapse, "0") == 0)
        collapse_enabled = 0;
    else if (collapse && *collapse && strcmp(collapse, "1") != 0)
        say("POSTCOPY_VMM_COLLAPSE is '%s', neither 0 nor 1: collapsing guest RAM into 2 MiB pages after"
            " postcopy, the default", collapse);

    struct ucred peer;
    int s = connect_socket(&peer);
    if (s == -EACCES) {
        refuse_peer(&peer, "treating it as no postcopyd: guest RAM will not be served by postcopyd");
        return;
    }
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
    if (offer.type == CPC_WIRE_TYPE_ERROR) {
        report_error_frame(&offer, "instead of VMM_OFFER");
        close(s);
        return;
    }
    struct stat st;
    struct offer offered_ram;
    int decoded = decode_offer(&offer, &offered_ram);
    if (decoded == -EPROTO || offer.fd < 0 || fstat(offer.fd, &st) < 0) {
        say("expected VMM_OFFER with the RAM file from postcopyd, got frame type %u (%u bytes%s)",
            offer.type, offer.length, offer.fd < 0 ? ", no descriptor" : "");
        if (offer.fd >= 0)
            close(offer.fd);
        close(s);
        return;
    }
    region_size = offered_ram.region_size;
    page_size = offered_ram.page_size;
    file_offset = offered_ram.file_offset;
    if (decoded < 0) {
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
    if (mapped == MAP_FAILED || fd < 0 || !(flags & MAP_SHARED))
        return mapped;
    int destination = atomic_load(&offered) || atomic_load(&registered);
    int source = atomic_load(&source_mode);
    if (!destination && !source)
        return mapped;
    struct stat st;
    int saved_errno = errno;
    if (fstat(fd, &st) < 0) {
        errno = saved_errno;
        return mapped;
    }
    errno = saved_errno;
    if (destination && st.st_dev == ram_dev && st.st_ino == ram_ino)
        return attach_mapping(mapped, length, offset);
    if (source && (atomic_load(&source_known) || source_file_appeared()) && st.st_dev == source_dev
        && st.st_ino == source_ino)
        track_source_mapping(mapped, length, offset, &st); /* never fails the mapping */
    return mapped;
}

void *mmap64(void *address, size_t length, int prot, int flags, int fd, off_t offset)
    __attribute__((alias("mmap")));

/* THP on the guest range would let khugepaged map pages behind minor-fault
 * tracking: a VMM asking for huge pages there is told yes and ignored, and
 * its wish kept for after postcopy (collapse_thread). MADV_NOHUGEPAGE goes
 * through, and is kept too: guest RAM then stays in 4 KiB pages. */
int madvise(void *address, size_t length, int advice)
{
    if (!real_madvise)
        return (int)syscall(SYS_madvise, address, length, advice);
    if ((advice == MADV_HUGEPAGE || advice == MADV_NOHUGEPAGE) && atomic_load(&registered)) {
        uintptr_t start = (uintptr_t)address, end = start + length;
        if (start < guest_base + region_size && guest_base < end) {
            atomic_store(&vmm_thp_advice, advice);
            if (advice == MADV_HUGEPAGE) {
                say("ignoring MADV_HUGEPAGE on guest RAM while postcopy runs%s",
                    collapse_enabled && page_size == 4096 ? "; it is applied once postcopy is complete" : "");
                return 0;
            }
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

/* Starts `body` on a detached thread that takes no signal meant for the
 * process: a VMM that blocks some to read them from a signalfd must not
 * lose one to the adapter. 0, or pthread_create's error. */
static int start_quiet_thread(void *(*body)(void *))
{
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    pthread_t thread;
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    int failed = pthread_create(&thread, &attributes, body, NULL);
    pthread_attr_destroy(&attributes);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    return failed;
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
    uint8_t payload[CPC_WIRE_VMM_ATTACH_BYTES];
    attach_payload(payload);
    int rc = send_frame(sock, CPC_WIRE_TYPE_VMM_ATTACH, payload, sizeof payload, uffd);
    if (rc < 0) {
        say("cannot send VMM_ATTACH to postcopyd: %s", strerror(-rc));
        struct uffdio_range range = { .start = guest_base, .len = region_size };
        ioctl(uffd, UFFDIO_UNREGISTER, &range);
        close(uffd);
        uffd = -1;
        return refuse_mapping(mapped, length);
    }
    atomic_store(&registered, 1);
    int failed = start_quiet_thread(release_thread);
    if (failed)
        say("cannot start the adapter's thread (%s): the range will not be released at the end, and the"
            " guest will wait on its stale pages until it is stopped",
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

/* What the operator must do while no postcopyd serves a guest whose RAM is
 * incomplete: said when postcopyd is lost during postcopy, and again every
 * POSTCOPY_VMM_REATTACH_SECONDS until one takes the guest over. */
static void say_incomplete(const char *cause)
{
    say("%s; guest RAM is incomplete: the guest waits (its faults stay unresolved); restart postcopyd to take"
        " it over (postcopyd serve --takeover, or systemctl restart postcopyd@NAME), or stop this VM", cause);
}

/* Hands the RAM file, the page-state record and the userfaultfd to a
 * restarted postcopyd, and returns the new socket once one answers
 * VMM_RESUME and took its VMM_RESUMED. It never gives up: guest RAM is
 * incomplete, so the range stays registered and the guest's faults wait,
 * as QEMU's own postcopy-paused does, for as long as it takes (or until
 * the VM is stopped). Every POSTCOPY_VMM_REATTACH_SECONDS without a
 * postcopyd it says so again; a refused peer, a refusing postcopyd or a
 * lost acknowledgement is said once per such period. The one answer that
 * ends it is ERROR discarded: no postcopyd will ever take this migration
 * over, so it returns -1 with the range still registered. */
static int reattach(void)
{
    double period = reattach_seconds;
    double next_warning = seconds_now() + period;
    useconds_t delay = 50000;
    int said = 0;
    for (;;) {
        struct ucred peer;
        int s = connect_socket(&peer);
        if (s == -EACCES && !said++)
            refuse_peer(&peer, "treating it as no postcopyd; still waiting for a restarted one");
        if (s >= 0) {
            /* A restarted postcopyd answers the reattachment at once; one
               that accepts and then says nothing must not keep this loop
               (and its warnings) waiting: give it up and try again. */
            struct timeval patience = { .tv_sec = 10 }, forever = { 0 };
            setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
            uint8_t kind[CPC_WIRE_VMM_HANDBACK_BYTES], payload[CPC_WIRE_VMM_ATTACH_BYTES];
            attach_payload(payload);
            encode_handback(kind, CPC_WIRE_HANDBACK_RAM);
            int rc = send_frame(s, CPC_WIRE_TYPE_VMM_HANDBACK, kind, sizeof kind, ram_fd);
            encode_handback(kind, CPC_WIRE_HANDBACK_PAGE_STATE);
            if (rc == 0)
                rc = send_frame(s, CPC_WIRE_TYPE_VMM_HANDBACK, kind, sizeof kind, page_state_fd);
            if (rc == 0)
                rc = send_frame(s, CPC_WIRE_TYPE_VMM_REATTACH, payload, sizeof payload, uffd);
            struct frame frame;
            int received = 0;
            while (rc == 0 && (received = receive_frame(s, &frame)) == 1) {
                if (frame.type == CPC_WIRE_TYPE_VMM_RESUME && frame.fd >= 0) {
                    keep_page_state(frame.fd);
                    rc = send_frame(s, CPC_WIRE_TYPE_VMM_RESUMED, NULL, 0, -1);
                    if (rc == 0) {
                        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &forever, sizeof forever);
                        say("reattached to a restarted postcopyd");
                        return s;
                    }
                    /* Unacknowledged, it is not ours: as if it died here. */
                    if (!said++)
                        say("cannot acknowledge VMM_RESUME (VMM_RESUMED) to the restarted postcopyd: %s;"
                            " trying again", strerror(-rc));
                    break;
                }
                if (frame.fd >= 0)
                    close(frame.fd); /* a new migration's VMM_OFFER: not ours */
                if (frame.type == CPC_WIRE_TYPE_ERROR && error_code(&frame) == CPC_WIRE_CODE_DISCARDED) {
                    say_discarded(&frame);
                    close(s);
                    return -1;
                }
                if (frame.type == CPC_WIRE_TYPE_ERROR) {
                    if (!said++)
                        report_error_frame(&frame, "to the reattachment");
                    break;
                }
            }
            if (rc == 0 && received == -EAGAIN && !said++)
                say("postcopyd accepted the reattachment but did not answer within 10 s; trying again");
            close(s);
        }
        if (seconds_now() >= next_warning) {
            char cause[128];
            snprintf(cause, sizeof cause, "still no postcopyd took the guest over, %.0f s on", period);
            say_incomplete(cause);
            next_warning = seconds_now() + period;
            said = 0;
        }
        usleep(delay);
        delay = delay * 2 > 2000000 ? 2000000 : delay * 2;
    }
}

/* ---- after a completed postcopy: guest RAM back into 2 MiB pages (issue 22) ----
 *
 * During postcopy the adapter keeps THP off guest RAM (MADV_NOHUGEPAGE,
 * and the VMM's MADV_HUGEPAGE ignored), so it ends in 4 KiB pages and the
 * guest pays in TLB misses. Once VMM_COMPLETE released the range, this
 * thread asks MADV_COLLAPSE (Linux 6.1) for each 2 MiB extent that has a
 * page in memory, as HugepageCollapser does in Swift (same rules: an empty
 * extent is left alone, EAGAIN tried 3 times, EINVAL and ENOMEM stop,
 * another error skips one extent), and says how many extents
 * /proc/self/smaps shows PMD-mapped before and after. */

enum { EXTENT_BYTES = 2u << 20, COLLAPSE_ATTEMPTS = 3 };

#define THP_SHMEM_ENABLED "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
#define THP_SHMEM_ENABLED_2M "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled"

/* The selected value of a sysfs choice file ("always [never] deny" gives
 * "never") into `out`; an empty string when the file cannot be read. */
static void sysfs_choice(const char *path, char *out, size_t size)
{
    char text[256];
    *out = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return;
    text[n] = 0;
    char *open_bracket = strchr(text, '['), *close_bracket = open_bracket ? strchr(open_bracket, ']') : NULL;
    if (!close_bracket)
        return;
    snprintf(out, size, "%.*s", (int)(close_bracket - open_bracket - 1), open_bracket + 1);
}

/* Why the shmem THP settings make the kernel refuse MADV_COLLAPSE on shmem
 * (EINVAL), into `why`; 0 when they allow it. As measured on Linux 6.18
 * (docs/kernel.md; ShmemHugepageSettings in Swift): shmem_enabled 'deny'
 * refuses; hugepages-2048kB/shmem_enabled 'never' refuses whatever the
 * top one says; every other value allows it, 'never' included. */
static int shmem_collapse_refused(char *why, size_t size)
{
    char top[32], pmd[32];
    sysfs_choice(THP_SHMEM_ENABLED, top, sizeof top);
    sysfs_choice(THP_SHMEM_ENABLED_2M, pmd, sizeof pmd);
    if (strcmp(top, "deny") == 0) {
        snprintf(why, size, THP_SHMEM_ENABLED " is 'deny', which refuses MADV_COLLAPSE on shmem; any other value"
                 " allows it (e.g. echo never > " THP_SHMEM_ENABLED ")");
        return 1;
    }
    if (strcmp(pmd, "never") == 0) {
        snprintf(why, size, THP_SHMEM_ENABLED_2M " is 'never', which refuses MADV_COLLAPSE on shmem whatever"
                 " shmem_enabled says; 'inherit' (with shmem_enabled not 'deny') or 'advise' allows it");
        return 1;
    }
    snprintf(why, size, "the shmem THP settings allow it (shmem_enabled %s, hugepages-2048kB/shmem_enabled %s), so"
             " the range is MADV_NOHUGEPAGE, THP is off for the process (prctl PR_SET_THP_DISABLE), or the kernel"
             " lacks MADV_COLLAPSE (Linux < 6.1)", *top ? top : "absent", *pmd ? pmd : "absent");
    return 0;
}

/* Bytes of guest RAM mapped by 2 MiB page-table entries, from
 * /proc/self/smaps: ShmemPmdMapped + FilePmdMapped of every mapping that
 * overlaps it (a mapping partly inside counts whole, as SmapsRange does).
 * -1 when smaps cannot be read. */
static long long pmd_mapped_bytes(void)
{
    FILE *smaps = fopen("/proc/self/smaps", "re");
    if (!smaps)
        return -1;
    char line[PATH_MAX + 256];
    int inside = 0;
    long long bytes = 0;
    while (fgets(line, sizeof line, smaps)) {
        unsigned long long low, high, kb;
        if (sscanf(line, "%llx-%llx ", &low, &high) == 2)
            inside = low < guest_base + region_size && guest_base < high;
        else if (inside && (sscanf(line, "ShmemPmdMapped: %llu kB", &kb) == 1
                            || sscanf(line, "FilePmdMapped: %llu kB", &kb) == 1))
            bytes += (long long)kb * 1024;
    }
    fclose(smaps);
    return bytes;
}

static double thread_cpu_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Whether any 4 KiB page of the extent at `start` is in memory (the file's
 * page cache): MADV_COLLAPSE answers EINVAL for an extent that is all
 * hole, which must not read as a refusal of the whole range. 1 when
 * mincore fails: let MADV_COLLAPSE say. */
static int extent_has_pages(uintptr_t start)
{
    unsigned char pages[EXTENT_BYTES / 4096];
    if (mincore((void *)start, EXTENT_BYTES, pages) < 0)
        return 1;
    for (size_t i = 0; i < sizeof pages; i++)
        if (pages[i] & 1)
            return 1;
    return 0;
}

/* MADV_COLLAPSE of one extent, EINTR retried: 0 or errno. */
static int collapse_extent(uintptr_t start)
{
    while (real_madvise((void *)start, EXTENT_BYTES, MADV_COLLAPSE) < 0)
        if (errno != EINTR)
            return errno;
    return 0;
}

static void *collapse_thread(void *unused)
{
    (void)unused;
    pthread_setname_np(pthread_self(), "postcopy-thp");
    /* Nice 19, not SCHED_IDLE: MADV_COLLAPSE holds the extent's 512 page
     * locks while it copies them into the new 2 MiB page, and a vCPU that
     * touches one waits for them. Under SCHED_IDLE busy vCPUs could keep
     * this thread off the CPU with the locks held, stalling themselves;
     * at nice 19 it still gets a small share, the guest nearly all. */
    if (setpriority(PRIO_PROCESS, (id_t)gettid(), 19) < 0)
        say("cannot lower the collapsing thread to nice 19 (%s); collapsing at the VMM's priority", strerror(errno));
    char why[512];
    if (shmem_collapse_refused(why, sizeof why)) {
        say("guest RAM stays in 4 KiB pages: %s", why);
        return NULL;
    }
    /* A 2 MiB page can be mapped only where the address and the file
     * offset (0 here) agree modulo 2 MiB; the kernel answers EINVAL for
     * every extent of a mapping that is out of phase. */
    if (guest_base & (EXTENT_BYTES - 1)) {
        say("guest RAM stays in 4 KiB pages: the VMM mapped it at %p, not at a multiple of 2 MiB, so no 2 MiB page"
            " can be mapped there (QEMU: give the memory backend align=2M)", (void *)guest_base);
        return NULL;
    }
    uintptr_t first = (guest_base + EXTENT_BYTES - 1) & ~(uintptr_t)(EXTENT_BYTES - 1);
    uint64_t extents = first - guest_base < region_size ? (region_size - (first - guest_base)) / EXTENT_BYTES : 0;
    long long before = pmd_mapped_bytes();
    double started = seconds_now(), cpu_started = thread_cpu_seconds();
    /* MADV_COLLAPSE refuses (EINVAL) a VM_NOHUGEPAGE range, and madvise has
     * no neutral setting: MADV_HUGEPAGE is what clears the adapter's
     * MADV_NOHUGEPAGE, whether or not the VMM asked for it. */
    int asked = atomic_load(&vmm_thp_advice) == MADV_HUGEPAGE;
    if (real_madvise((void *)guest_base, region_size, MADV_HUGEPAGE) < 0) {
        say("guest RAM stays in 4 KiB pages: MADV_HUGEPAGE on it failed: %s", strerror(errno));
        return NULL;
    }
    unsigned collapsed = 0, empty = 0, failed = 0, retries = 0;
    uint64_t stopped_at = extents;
    int first_error = 0;
    uint64_t first_failed = 0;
    for (uint64_t i = 0; i < extents; i++) {
        uintptr_t start = first + i * EXTENT_BYTES;
        if (!extent_has_pages(start)) {
            empty++;
            continue;
        }
        int error = collapse_extent(start);
        for (int attempt = 1; error == EAGAIN && attempt < COLLAPSE_ATTEMPTS; attempt++) {
            retries++;
            usleep(1000);
            error = collapse_extent(start);
        }
        if (error == 0) {
            collapsed++;
        } else if (error == EINVAL) {
            shmem_collapse_refused(why, sizeof why);
            say("MADV_COLLAPSE refused (EINVAL) at extent %" PRIu64 " of guest RAM: %s", i, why);
            stopped_at = i;
            break;
        } else if (error == ENOMEM) {
            say("MADV_COLLAPSE failed (ENOMEM) at extent %" PRIu64 " of guest RAM: no free 2 MiB page could be made"
                " (or guest RAM was unmapped); the rest stay in 4 KiB pages", i);
            stopped_at = i;
            break;
        } else {
            if (!failed++) {
                first_error = error;
                first_failed = i;
            }
        }
    }
    double seconds = seconds_now() - started, cpu = thread_cpu_seconds() - cpu_started;
    long long after = pmd_mapped_bytes();
    char failure[128] = "";
    if (failed)
        snprintf(failure, sizeof failure, "; first failure: extent %" PRIu64 ", %s", first_failed,
                 strerror(first_error));
    say("guest RAM collapsed into 2 MiB pages%s: %lld of %" PRIu64 " extents mapped huge (%lld before; %u collapsed,"
        " %u empty, %u failed, %u retried%s%s) in %.2f s, %.2f CPU s (%s)", stopped_at < extents ? " in part" : "",
        after < 0 ? -1 : after / EXTENT_BYTES, extents, before < 0 ? -1 : before / EXTENT_BYTES, collapsed, empty,
        failed, retries, stopped_at < extents ? ", stopped early" : "", failure, seconds, cpu,
        asked ? "MADV_HUGEPAGE re-applied, as the VMM asked"
              : "MADV_HUGEPAGE set to clear the adapter's MADV_NOHUGEPAGE; the VMM had not asked for it");
    return NULL;
}

/* Called on the thread that answered VMM_COMPLETE, after the release: the
 * collapse runs on a thread of its own, so nothing waits for it. Only
 * shmem needs it, and not when turned off or when the VMM asked
 * MADV_NOHUGEPAGE itself. */
static void start_collapse(void)
{
    if (page_size != 4096)
        return; /* hugetlbfs: already 2 MiB pages */
    if (!collapse_enabled) {
        say("POSTCOPY_VMM_COLLAPSE=0: guest RAM stays in 4 KiB pages");
        return;
    }
    if (atomic_load(&vmm_thp_advice) == MADV_NOHUGEPAGE) {
        say("the VMM asked MADV_NOHUGEPAGE on guest RAM: it stays in 4 KiB pages");
        return;
    }
    int failed = start_quiet_thread(collapse_thread);
    if (failed)
        say("cannot start the thread that collapses guest RAM into 2 MiB pages (%s); it stays in 4 KiB pages",
            strerror(failed));
}

static void *release_thread(void *unused)
{
    (void)unused;
    pthread_setname_np(pthread_self(), "postcopy-vmm");
    int resumed = 0;
    for (;;) {
        struct frame frame;
        char cause[1200];
        int rc = receive_frame(sock, &frame);
        if (rc == 1 && frame.type == CPC_WIRE_TYPE_HEARTBEAT)
            continue;
        if (rc == 1 && frame.type == CPC_WIRE_TYPE_VMM_RESUME && frame.fd >= 0) {
            keep_page_state(frame.fd);
            resumed = 1;
            /* postcopyd tells the source that the guest resumed only once
             * this acknowledgement arrives: it says that the record is kept
             * and the range stays registered until VMM_COMPLETE. */
            int sent = send_frame(sock, CPC_WIRE_TYPE_VMM_RESUMED, NULL, 0, -1);
            if (sent == 0) {
                say("postcopyd serves guest RAM now (VMM_RESUME); acknowledged (VMM_RESUMED)");
                continue;
            }
            /* postcopyd may have served pages already: a lost postcopyd. */
            snprintf(cause, sizeof cause, "cannot acknowledge VMM_RESUME (VMM_RESUMED) to postcopyd: %s",
                     strerror(-sent));
        } else if (rc == 1 && frame.type == CPC_WIRE_TYPE_VMM_COMPLETE) {
            /* Its payload is the source's image digest; the answer is empty. */
            release_range("postcopy is complete; guest RAM is an ordinary shared mapping again");
            if (send_frame(sock, CPC_WIRE_TYPE_VMM_COMPLETE, NULL, 0, -1) < 0)
                say("cannot answer VMM_COMPLETE: %s", strerror(errno));
            start_collapse(); /* every page is in place, and the range released */
            break;
        } else if (rc == 1 && frame.type != CPC_WIRE_TYPE_ERROR) {
            if (frame.fd >= 0)
                close(frame.fd);
            say("unexpected frame type %u from postcopyd; ignored", frame.type);
            continue;
        } else if (!resumed) {
            /* The guest never ran here: nothing it could read is lost. */
            if (rc == 1) {
                if (frame.fd >= 0)
                    close(frame.fd);
                if (error_code(&frame) == CPC_WIRE_CODE_DISCARDED)
                    say_discarded(&frame);
                else
                    report_error_frame(&frame, "");
                release_range("the migration failed before the guest ran here");
            } else {
                release_range("postcopyd went away before the guest ran here");
            }
            break;
        } else if (rc == 1 && error_code(&frame) == CPC_WIRE_CODE_DISCARDED) {
            /* Discarded after VMM_RESUME: the source runs the guest again,
             * and pages here may be stale. The range stays registered, so a
             * vCPU that touches one waits instead of running on it, and no
             * reattaching: no postcopyd will take this migration over. The
             * userfaultfd, the RAM file and the record stay open: closing
             * the userfaultfd would let the guest's faults through. */
            if (frame.fd >= 0)
                close(frame.fd);
            say_discarded(&frame);
            close(sock);
            sock = -1;
            return NULL;
        } else if (rc == 1) {
            unsigned code = error_code(&frame);
            if (frame.fd >= 0)
                close(frame.fd);
            snprintf(cause, sizeof cause, "postcopyd sent ERROR %u (%s) during postcopy: %.*s", code,
                     error_name(code), error_text_length(&frame), error_text(&frame));
        } else {
            snprintf(cause, sizeof cause, "postcopyd went away during postcopy (%s)",
                     rc == 0 ? "end of file" : strerror(-rc));
        }
        /* ERROR, the socket closed or broke, or VMM_RESUMED could not be
         * sent, during postcopy: pages may still be stale, so the range
         * stays registered, whatever happens (issue 18). A postcopyd that
         * failed is treated as one that died: a restarted one takes the
         * guest over from what this VMM keeps. */
        say_incomplete(cause);
        close(sock);
        sock = -1;
        if (reattach_seconds <= 0) {
            /* No reattaching: the guest stays paused until it is stopped.
             * The userfaultfd, the RAM file and the record stay open:
             * closing the userfaultfd would let the guest's faults through. */
            say("POSTCOPY_VMM_REATTACH_SECONDS is 0: not reattaching; the guest stays paused until it is stopped");
            return NULL;
        }
        say("reattaching to a restarted postcopyd, for as long as it takes (said again every %.0f s)",
            reattach_seconds);
        sock = reattach();
        if (sock < 0)
            return NULL; /* discarded: registered and paused, as above */
    }
    /* Postcopy is complete, or the guest never ran here: the range is
     * released, and nothing is left to hand back. */
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

/* ---- source mode: the source VMM's write log (docs/architecture.md,
 * "Dirty tracking on the source") ---- */

/* What asynchronous write-protect of shared memory needs from UFFDIO_API,
 * as WriteTracking.requiredFeatures: WP_ASYNC (no fault reaches anyone),
 * WP_UNPOPULATED (a page never touched is protected too), WP_HUGETLBFS_SHMEM
 * (write-protect on shmem and hugetlbfs, not only anonymous memory). */
static const struct {
    uint64_t bit;
    const char *name;
} wp_features[] = {
    { UFFD_FEATURE_WP_ASYNC, "WP_ASYNC" },
    { UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED" },
    { UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM" },
};
#define WP_FEATURES ((uint64_t)(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM))

static char source_ram_path[PATH_MAX];
static char source_socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static int source_listener = -1;
static pid_t source_pid;           /* the process that listens (and is scanned) */
static dev_t source_socket_dev;    /* the socket file this process bound, */
static ino_t source_socket_ino;    /* removed at exit if it is still that one */

/* The offer, and what the interposed mmap has seen: under offer_lock. */
static pthread_mutex_t offer_lock = PTHREAD_MUTEX_INITIALIZER;
static int offer_armed;
static uint64_t offer_address, offer_length;
static char offer_reason[CPC_WIRE_SOURCE_OFFER_MAX_REASON + 1];
static unsigned source_mappings; /* shared mappings of the RAM file so far */
static int source_uffd = -1;     /* open for the life of the process: closing it ends the tracking */

/* Makes the offer "unavailable" with the reason, and says it (once: each
 * call is one change of the offer). Called with offer_lock held, or
 * before the accept thread exists. */
static void offer_unavailable(const char *format, ...) __attribute__((format(printf, 1, 2)));
static void offer_unavailable(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(offer_reason, sizeof offer_reason, format, args);
    va_end(args);
    offer_armed = 0;
    offer_address = offer_length = 0;
    say("no write log for the agent: %s", offer_reason);
}

/* The offer as docs/protocol.md encodes it; returns its length. */
static size_t encode_offer(uint8_t out[CODEC_SOURCE_OFFER_MAX_BYTES])
{
    pthread_mutex_lock(&offer_lock);
    size_t count = encode_source_offer(out, offer_armed, offer_address, offer_length, offer_reason,
                                       strnlen(offer_reason, sizeof offer_reason));
    pthread_mutex_unlock(&offer_lock);
    return count;
}

/* Registers [mapped, mapped+length) for asynchronous write-protect, as
 * WriteTracking does: features probed on one userfaultfd, enabled on a
 * fresh one, then UFFDIO_REGISTER in WP mode. Nothing is protected yet: the
 * agent's first PAGEMAP_SCAN protects every page. 0, or -1 with the offer
 * made unavailable. Called with offer_lock held. */
static int register_write_tracking(void *mapped, size_t length)
{
    int probe = open_userfaultfd();
    if (probe < 0) {
        offer_unavailable("cannot open a userfaultfd in the source VMM (%s): it needs read-write access to"
                          " /dev/userfaultfd or CAP_SYS_PTRACE", strerror(-probe));
        return -1;
    }
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    if (ioctl(probe, UFFDIO_API, &api) < 0) {
        int saved = errno;
        close(probe);
        offer_unavailable("UFFDIO_API (probing the userfaultfd features) failed: %s", strerror(saved));
        return -1;
    }
    close(probe);
    if ((api.features & WP_FEATURES) != WP_FEATURES) {
        char missing[96] = "";
        for (size_t i = 0; i < sizeof wp_features / sizeof wp_features[0]; i++)
            if (!(api.features & wp_features[i].bit))
                snprintf(missing + strlen(missing), sizeof missing - strlen(missing), "%s%s",
                         *missing ? " " : "", wp_features[i].name);
        offer_unavailable("the kernel's userfaultfd lacks %s (it offers features 0x%llx); asynchronous"
                          " write-protect of shared memory needs Linux >= 6.7",
                          missing, (unsigned long long)api.features);
        return -1;
    }
    int fd = open_userfaultfd();
    if (fd < 0) {
        offer_unavailable("cannot open a second userfaultfd in the source VMM: %s", strerror(-fd));
        return -1;
    }
    api = (struct uffdio_api){ .api = UFFD_API, .features = WP_FEATURES };
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int saved = errno;
        close(fd);
        offer_unavailable("UFFDIO_API enabling WP_ASYNC WP_UNPOPULATED WP_HUGETLBFS_SHMEM failed: %s",
                          strerror(saved));
        return -1;
    }
    struct uffdio_register reg = {
        .range = { .start = (uintptr_t)mapped, .len = length },
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0) {
        int saved = errno;
        close(fd);
        offer_unavailable("UFFDIO_REGISTER (mode WP) of the guest RAM mapping at %p (%zu bytes) failed: %s",
                          mapped, length, strerror(saved));
        return -1;
    }
    source_uffd = fd;
    return 0;
}

/* The interposed mmap found a shared mapping of POSTCOPY_SOURCE_RAM: the
 * first is registered, if it maps the whole file from offset 0; any later
 * one makes the offer unavailable, since writes through it would not be in
 * the log. The VMM keeps its mapping whatever happens here. */
static void track_source_mapping(void *mapped, size_t length, off_t offset, const struct stat *st)
{
    int saved_errno = errno;
    pthread_mutex_lock(&offer_lock);
    unsigned seen = ++source_mappings;
    if (seen == 1) {
        if (offset != 0 || (uint64_t)length != (uint64_t)st->st_size) {
            offer_unavailable("the source VMM maps %zu bytes of %s from file offset %lld at %p, but the write log"
                              " needs one mapping of the whole file (%lld bytes) from offset 0",
                              length, source_ram_path, (long long)offset, mapped, (long long)st->st_size);
        } else if (length == 0 || length % 4096 || (uintptr_t)mapped % 4096) {
            offer_unavailable("the source VMM's mapping of %s at %p is %zu bytes, not a whole number of 4 KiB pages",
                              source_ram_path, mapped, length);
        } else if (register_write_tracking(mapped, length) == 0) {
            offer_armed = 1;
            offer_address = (uintptr_t)mapped;
            offer_length = length;
            say("guest RAM %s at %p (%zu MiB) registered for asynchronous write-protect; the write log is"
                " offered on %s", source_ram_path, mapped, length >> 20, source_socket_path);
        }
    } else if (seen == 2) {
        if (offer_armed)
            offer_unavailable("the source VMM maps %s a second time (%zu bytes at %p, file offset %lld); writes"
                              " through that mapping would not be in the write log, which tracks only the"
                              " mapping at 0x%" PRIx64, source_ram_path, length, mapped, (long long)offset,
                              offer_address);
        else
            say("the source VMM maps %s a second time (%zu bytes at %p); there is no write log already",
                source_ram_path, length, mapped);
    }
    pthread_mutex_unlock(&offer_lock);
    errno = saved_errno;
}

/* Answers each connection with the offer and closes it: root and this
 * process's own user only, as SourceTrackingServer does. */
static void *source_offer_thread(void *unused)
{
    (void)unused;
    pthread_setname_np(pthread_self(), "postcopy-wp");
    int said_busy = 0;
    for (;;) {
        int c = accept4(source_listener, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                if (!said_busy++)
                    say("cannot accept on the dirty-log socket %s (%s); retrying", source_socket_path,
                        strerror(errno));
                usleep(100000);
                continue;
            }
            say("accept on the dirty-log socket %s failed: %s; it answers no more", source_socket_path,
                strerror(errno));
            return NULL;
        }
        said_busy = 0;
        struct ucred peer;
        socklen_t size = sizeof peer;
        if (getsockopt(c, SOL_SOCKET, SO_PEERCRED, &peer, &size) < 0) {
            say("cannot read the peer credentials of a dirty-log request: %s; refused", strerror(errno));
            close(c);
            continue;
        }
        if (peer.uid != 0 && peer.uid != geteuid()) {
            say("refused a dirty-log request from pid %d uid %u: only root and uid %u may ask", (int)peer.pid,
                (unsigned)peer.uid, (unsigned)geteuid());
            close(c);
            continue;
        }
        uint8_t message[CODEC_SOURCE_OFFER_MAX_BYTES];
        size_t count = encode_offer(message), sent = 0;
        struct timeval patience = { .tv_sec = 5 };
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &patience, sizeof patience);
        while (sent < count) {
            ssize_t n = send(c, message + sent, count - sent, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            sent += (size_t)n;
        }
        if (sent < count)
            say("could not answer the agent (pid %d uid %u) on the dirty-log socket: %s", (int)peer.pid,
                (unsigned)peer.uid, strerror(errno));
        else
            say("told the agent (pid %d uid %u) about write tracking: %s", (int)peer.pid, (unsigned)peer.uid,
                get16(message + CPC_WIRE_SOURCE_OFFER_STATUS_OFFSET) == CPC_WIRE_SOURCE_OFFER_ARMED
                    ? "armed" : "unavailable");
        close(c);
    }
}

/* Listens on `path` with mode 0600 from the start (bound under a umask).
 * A socket file nothing listens on is replaced; a socket something listens
 * on, or any other file, is left alone and source mode stays off. */
static int listen_source_socket(const char *path)
{
    struct sockaddr_un address = { .sun_family = AF_UNIX };
    memcpy(address.sun_path, path, strlen(path) + 1);
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            say("POSTCOPY_SOURCE_SOCKET %s exists and is not a socket; leaving it alone, no source mode", path);
            return -1;
        }
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe < 0) {
            say("cannot create a unix socket: %s; no source mode", strerror(errno));
            return -1;
        }
        int rc = connect(probe, (struct sockaddr *)&address, sizeof address), saved = errno;
        close(probe);
        if (rc == 0) {
            say("another process listens on POSTCOPY_SOURCE_SOCKET %s (a second source VMM?); no source mode",
                path);
            return -1;
        }
        if (saved != ECONNREFUSED) {
            say("cannot tell whether anything listens on POSTCOPY_SOURCE_SOCKET %s (%s); leaving it alone,"
                " no source mode", path, strerror(saved));
            return -1;
        }
        if (unlink(path) < 0 && errno != ENOENT) {
            say("cannot remove the stale socket %s: %s; no source mode", path, strerror(errno));
            return -1;
        }
    } else if (errno != ENOENT) {
        say("cannot look at POSTCOPY_SOURCE_SOCKET %s: %s; no source mode", path, strerror(errno));
        return -1;
    }
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        say("cannot create a unix socket: %s; no source mode", strerror(errno));
        return -1;
    }
    mode_t previous = umask(0177);
    int rc = bind(s, (struct sockaddr *)&address, sizeof address), saved = errno;
    umask(previous);
    if (rc < 0) {
        say("cannot bind POSTCOPY_SOURCE_SOCKET %s: %s; no source mode", path, strerror(saved));
        close(s);
        return -1;
    }
    if (lstat(path, &st) < 0 || listen(s, 16) < 0) {
        say("cannot listen on POSTCOPY_SOURCE_SOCKET %s: %s; no source mode", path, strerror(errno));
        close(s);
        unlink(path);
        return -1;
    }
    source_socket_dev = st.st_dev;
    source_socket_ino = st.st_ino;
    return s;
}

/* A child of the VMM is not the process the agent scans, and the accept
 * thread does not exist in it: nothing of source mode carries over. */
static void source_forked(void)
{
    atomic_store(&source_mode, 0);
    if (source_listener >= 0)
        close(source_listener);
    source_listener = -1;
}

/* Called by the constructor. */
static void source_load(int destination)
{
    const char *ram = getenv("POSTCOPY_SOURCE_RAM"), *path = getenv("POSTCOPY_SOURCE_SOCKET");
    int has_ram = ram && *ram, has_socket = path && *path;
    if (!has_ram && !has_socket)
        return;
    if (!has_ram || !has_socket) {
        say("%s is set but %s is not: source mode needs both; the source VMM's writes are not tracked",
            has_ram ? "POSTCOPY_SOURCE_RAM" : "POSTCOPY_SOURCE_SOCKET",
            has_ram ? "POSTCOPY_SOURCE_SOCKET" : "POSTCOPY_SOURCE_RAM");
        return;
    }
    if (destination) {
        say("POSTCOPY_SOURCE_RAM/POSTCOPY_SOURCE_SOCKET and POSTCOPY_VMM_SOCKET are both set, but a VMM is"
            " either a migration's source or its destination: refusing source mode (no dirty-log socket,"
            " no write tracking); destination mode goes on");
        return;
    }
    if (!real_mmap) {
        say("cannot find the C library's mmap; no source mode");
        return;
    }
    if (strlen(path) >= sizeof source_socket_path) {
        say("POSTCOPY_SOURCE_SOCKET is longer than a unix socket path may be (%zu bytes): %s; no source mode",
            sizeof source_socket_path - 1, path);
        return;
    }
    if (strlen(ram) >= sizeof source_ram_path) {
        say("POSTCOPY_SOURCE_RAM is longer than PATH_MAX; no source mode");
        return;
    }
    /* QEMU creates a mem-path that does not exist: its device and inode
     * are then taken at the first shared file mapping after it appeared. */
    struct stat st;
    int exists = stat(ram, &st) == 0;
    if (!exists && errno != ENOENT) {
        say("cannot stat POSTCOPY_SOURCE_RAM %s: %s; no source mode", ram, strerror(errno));
        return;
    }
    strcpy(source_ram_path, ram);
    strcpy(source_socket_path, path);
    if (exists) {
        source_dev = st.st_dev;
        source_ino = st.st_ino;
        atomic_store(&source_known, 1);
    }
    snprintf(offer_reason, sizeof offer_reason, "the source QEMU has not mapped %s yet", source_ram_path);

    source_listener = listen_source_socket(path);
    if (source_listener < 0)
        return;
    source_pid = getpid();
    int failed = start_quiet_thread(source_offer_thread);
    if (failed) {
        say("cannot start the adapter's dirty-log thread (%s); no source mode", strerror(failed));
        close(source_listener);
        source_listener = -1;
        unlink(path);
        return;
    }
    pthread_atfork(NULL, NULL, source_forked);
    atomic_store(&source_mode, 1);
    if (exists)
        say("source mode: writes to %s (device %u:%u inode %lu) will be tracked once the VMM maps it; the"
            " offer is on %s", source_ram_path, major(st.st_dev), minor(st.st_dev), (unsigned long)st.st_ino,
            source_socket_path);
    else
        say("source mode: writes to %s (not there yet: the VMM is to create it) will be tracked once the VMM"
            " maps it; the offer is on %s", source_ram_path, source_socket_path);
}

/* The interposed mmap, for a shared file mapping while POSTCOPY_SOURCE_RAM
 * did not exist yet: whether it exists now, and if so its device and
 * inode are kept. One stat per shared file mapping until then. */
static int source_file_appeared(void)
{
    struct stat st;
    int saved_errno = errno;
    int exists = stat(source_ram_path, &st) == 0;
    errno = saved_errno;
    if (!exists)
        return 0;
    pthread_mutex_lock(&offer_lock);
    if (!atomic_load(&source_known)) {
        source_dev = st.st_dev;
        source_ino = st.st_ino;
        atomic_store(&source_known, 1);
    }
    pthread_mutex_unlock(&offer_lock);
    return 1;
}

/* At exit, the socket file goes, if it is still the one this process bound
 * (not in a child, which never listened). */
__attribute__((destructor)) static void postcopy_vmm_unload(void)
{
    if (source_listener < 0 || getpid() != source_pid)
        return;
    struct stat st;
    if (lstat(source_socket_path, &st) == 0 && st.st_dev == source_socket_dev && st.st_ino == source_socket_ino)
        unlink(source_socket_path);
}
