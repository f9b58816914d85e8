/*
 * CPostcopy: the thin C layer under postcopyd.
 *
 * Only what Swift cannot call directly lives here: the variadic syscall(2)
 * and ioctl(2), the userfaultfd uapi structs, and constants that older
 * kernel headers (Debian 12 ships 6.1's) do not define. No policy: every
 * function does one kernel operation and returns 0 or -errno.
 *
 * Every exported symbol carries the `cpc_` prefix.
 */
#ifndef CPOSTCOPY_H
#define CPOSTCOPY_H

#include <stdint.h>
#include <stddef.h>
#include <linux/memfd.h>
#include <linux/userfaultfd.h>

/* The wire protocol's constants (docs/protocol.md), which the preload
 * adapter includes too; Swift's codec is pinned to them by a test. */
#include "postcopy_wire.h"

/* ---- uapi constants newer than the build host's headers ---------------- */

#ifndef UFFD_FEATURE_EXACT_ADDRESS
#define UFFD_FEATURE_EXACT_ADDRESS (1 << 11)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

/* Flags and numbers re-exported as plain integers so Swift sees them. */
enum {
    CPC_UFFD_API = UFFD_API,
    CPC_UFFD_MSG_SIZE = sizeof(struct uffd_msg),
    CPC_UFFD_EVENT_PAGEFAULT = UFFD_EVENT_PAGEFAULT,
    CPC_UFFD_EVENT_FORK = UFFD_EVENT_FORK,
    CPC_UFFD_EVENT_REMAP = UFFD_EVENT_REMAP,
    CPC_UFFD_EVENT_REMOVE = UFFD_EVENT_REMOVE,
    CPC_UFFD_EVENT_UNMAP = UFFD_EVENT_UNMAP,
    CPC_UFFD_PAGEFAULT_FLAG_WRITE = UFFD_PAGEFAULT_FLAG_WRITE,
    CPC_UFFD_PAGEFAULT_FLAG_WP = UFFD_PAGEFAULT_FLAG_WP,
    CPC_UFFD_PAGEFAULT_FLAG_MINOR = UFFD_PAGEFAULT_FLAG_MINOR,
    CPC_UFFDIO_REGISTER_MODE_MISSING = UFFDIO_REGISTER_MODE_MISSING,
    CPC_UFFDIO_REGISTER_MODE_WP = UFFDIO_REGISTER_MODE_WP,
    CPC_UFFDIO_REGISTER_MODE_MINOR = UFFDIO_REGISTER_MODE_MINOR,
    CPC_UFFDIO_CONTINUE_MODE_DONTWAKE = UFFDIO_CONTINUE_MODE_DONTWAKE,
    CPC_UFFD_USER_MODE_ONLY = UFFD_USER_MODE_ONLY,
};

/* memfd_create(2) flags; glibc hides them behind _GNU_SOURCE. */
enum {
    CPC_MFD_CLOEXEC = MFD_CLOEXEC,
    CPC_MFD_ALLOW_SEALING = MFD_ALLOW_SEALING,
    CPC_MFD_HUGETLB = MFD_HUGETLB,
    CPC_MFD_HUGE_2MB = MFD_HUGE_2MB,
};

/* File seals (fcntl F_ADD_SEALS), behind _GNU_SOURCE in glibc too. */
enum {
    CPC_F_SEAL_SHRINK = 0x0002,
    CPC_F_SEAL_GROW = 0x0004,
};

/* lseek(2) whences that find a file's data and holes, behind _GNU_SOURCE
 * in glibc too. */
enum {
    CPC_SEEK_DATA = 3,
    CPC_SEEK_HOLE = 4,
};

/* madvise(2) MADV_COLLAPSE (Linux 6.1): make a range's pages into
 * 2 MiB pages now, synchronously. Debian 12's glibc headers lack it; the
 * value is the kernel's (include/uapi/asm-generic/mman-common.h). */
#include <sys/mman.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
_Static_assert(MADV_COLLAPSE == 25, "MADV_COLLAPSE is 25 in the kernel's uapi");
enum {
    CPC_MADV_COLLAPSE = MADV_COLLAPSE,
};

/* Byte offsets inside struct uffd_msg, so Swift can decode a batch in place. */
enum {
    CPC_UFFD_MSG_OFF_EVENT = offsetof(struct uffd_msg, event),
    CPC_UFFD_MSG_OFF_FLAGS = offsetof(struct uffd_msg, arg.pagefault.flags),
    CPC_UFFD_MSG_OFF_ADDRESS = offsetof(struct uffd_msg, arg.pagefault.address),
    CPC_UFFD_MSG_OFF_PTID = offsetof(struct uffd_msg, arg.pagefault.feat.ptid),
};

/* The bit for each ioctl in uffdio_api.ioctls / uffdio_register.ioctls. */
enum {
    CPC_UFFDIO_IOCTL_BIT_WAKE = _UFFDIO_WAKE,
    CPC_UFFDIO_IOCTL_BIT_COPY = _UFFDIO_COPY,
    CPC_UFFDIO_IOCTL_BIT_CONTINUE = _UFFDIO_CONTINUE,
};

/* ---- opening ----------------------------------------------------------- */

/* A new userfaultfd from /dev/userfaultfd (USERFAULTFD_IOC_NEW).
 * Returns the fd, or -errno (-ENOENT when the device is absent). */
int cpc_uffd_open_device(int flags);

/* A new userfaultfd from the userfaultfd(2) syscall. Returns fd or -errno. */
int cpc_uffd_open_syscall(int flags);

/* memfd_create(2). Returns fd or -errno. */
int cpc_memfd_create(const char *name, unsigned int flags);

/* fcntl(fd, F_ADD_SEALS, seals) on a memfd made with MFD_ALLOW_SEALING.
 * Returns 0 or -errno. */
int cpc_add_seals(int fd, unsigned int seals);

/* fallocate(2), which glibc declares only under _GNU_SOURCE. Returns 0 or -errno. */
int cpc_fallocate(int fd, int mode, int64_t offset, int64_t length);

/* fstatfs(2): the filesystem's magic number and block (page) size. 0 or -errno. */
int cpc_fstatfs(int fd, int64_t *magic, int64_t *block_size);

/* A non-blocking, close-on-exec eventfd(2). Returns fd or -errno. */
int cpc_eventfd(void);

/* Names the calling thread (pthread_setname_np; 15 bytes show). 0 or -errno. */
int cpc_thread_set_name(const char *name);

/* Moves the calling thread to SCHED_IDLE (nice < 0) or to SCHED_OTHER at
   `nice` (0…19); both need _GNU_SOURCE names. 0 or -errno. */
int cpc_thread_set_scheduling(int nice);

/* ---- unix sockets ---------------------------------------------------- */

/* accept4(2) with SOCK_CLOEXEC, which glibc declares only under _GNU_SOURCE.
 * Returns the connection's fd or -errno. */
int cpc_accept_cloexec(int sock);

/* The peer's pid, uid and gid of a connected unix socket (SO_PEERCRED). 0 or -errno. */
int cpc_peer_credentials(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid);

/* sendmsg(2) of [bytes, bytes+length) with `fd` attached as SCM_RIGHTS
 * (fd < 0: none). MSG_NOSIGNAL. Returns bytes sent or -errno. */
int64_t cpc_send_with_fd(int sock, const void *bytes, uint64_t length, int fd);

/* recvmsg(2) into [bytes, bytes+capacity); a received SCM_RIGHTS descriptor
 * (close-on-exec) is stored in *fd, else *fd = -1. Extra descriptors are
 * closed; a truncated control message is reported as -EPROTO. Returns bytes
 * received (0 at end of stream) or -errno. */
int64_t cpc_recv_with_fd(int sock, void *bytes, uint64_t capacity, int *fd);

/* ---- TCP ---------------------------------------------------------------- */

/* Turns on TCP keepalive with the given idle time, probe interval (seconds)
 * and probe count, and TCP_NODELAY. 0 or -errno. */
int cpc_tcp_tune(int sock, int idle_seconds, int interval_seconds, int probes);

/* The peer's numeric address of a connected TCP socket (getpeername +
 * inet_ntop) into out[0..capacity), and its port. 0 or -errno. */
int cpc_peer_address(int sock, char *out, uint64_t capacity, uint16_t *port);

/* ---- signals ------------------------------------------------------------ */

/* Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (threads started
 * later inherit the mask) and returns a close-on-exec signalfd(2) that
 * reads them, or -errno. */
int cpc_termination_signalfd(void);

/* Reads one signal from a signalfd: its number, or -errno. */
int cpc_signalfd_read(int fd);

/* ---- ioctls (each returns 0 or -errno) ------------------------------------ */

/* UFFDIO_API: on entry *features is what to enable; on return it holds what
 * the kernel offers and *ioctls the ioctl bitmask. */
int cpc_uffdio_api(int fd, uint64_t *features, uint64_t *ioctls);

/* UFFDIO_REGISTER over [start, start+len) with a mode bitmask; *ioctls gets
 * the ioctls the range supports. */
int cpc_uffdio_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);

/* UFFDIO_UNREGISTER over [start, start+len). */
int cpc_uffdio_unregister(int fd, uint64_t start, uint64_t len);

/* UFFDIO_CONTINUE over [start, start+len). *mapped gets the kernel's count of
 * bytes it mapped (negative errno on failure, as the kernel reports it). */
int cpc_uffdio_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *mapped);

/* UFFDIO_WAKE over [start, start+len). */
int cpc_uffdio_wake(int fd, uint64_t start, uint64_t len);

/* ---- PAGEMAP_SCAN (Linux 6.7), which Debian 12's linux/fs.h lacks ------- */

/* struct page_region of include/uapi/linux/fs.h: [start, end) and the
 * PAGE_IS_* categories the range shares. */
struct cpc_page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

enum {
    CPC_PAGE_IS_WPALLOWED = 1 << 0,
    CPC_PAGE_IS_WRITTEN = 1 << 1,
};

/* PAGEMAP_SCAN on an open /proc/PID/pagemap: the pages of [start, end) that
 * were written since they were last write-protected (PAGE_IS_WRITTEN), as
 * up to `capacity` regions. With `protect`, the ranges reported are
 * write-protected again in the same walk (PM_SCAN_WP_MATCHING). Every page
 * must lie in a range registered for asynchronous write-protect
 * (PM_SCAN_CHECK_WPASYNC), else the scan fails. The walk stops early when
 * the regions run out: *walk_end says where, and a caller goes on from
 * there. Returns the number of regions filled, or -errno. */
int64_t cpc_pagemap_scan_written(int pagemap_fd, uint64_t start, uint64_t end, int protect,
                                 struct cpc_page_region *regions, uint64_t capacity, uint64_t *walk_end);

#endif /* CPOSTCOPY_H */
