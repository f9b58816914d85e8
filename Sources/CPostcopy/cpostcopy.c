/*
 * CPostcopy: one function per kernel call; see cpostcopy.h.
 */
#include "cpostcopy.h"

#include <sched.h>
#include <sys/resource.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <arpa/inet.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/vfs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The uapi layout the Swift decoder relies on. */
_Static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg is 32 bytes");
_Static_assert(offsetof(struct uffd_msg, arg.pagefault.address) == 16, "uffd_msg.address at 16");
_Static_assert(sizeof(struct uffdio_continue) == 32, "uffdio_continue is 32 bytes");

#ifndef __NR_userfaultfd
#error "this architecture's headers lack __NR_userfaultfd"
#endif

static int neg_errno(int rc) { return rc < 0 ? -errno : rc; }

int cpc_uffd_open_device(int flags) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int saved = errno;
    close(dev);
    return fd < 0 ? -saved : fd;
}

int cpc_uffd_open_syscall(int flags) {
    return neg_errno((int)syscall(__NR_userfaultfd, flags));
}

int cpc_memfd_create(const char *name, unsigned int flags) {
    return neg_errno((int)syscall(__NR_memfd_create, name, flags));
}

#ifndef F_ADD_SEALS
#define F_ADD_SEALS (1024 + 9)
#endif
_Static_assert(CPC_F_SEAL_SHRINK == 0x0002 && CPC_F_SEAL_GROW == 0x0004, "the kernel's F_SEAL_SHRINK and F_SEAL_GROW");

_Static_assert(CPC_SEEK_DATA == SEEK_DATA && CPC_SEEK_HOLE == SEEK_HOLE, "the kernel's SEEK_DATA and SEEK_HOLE");

int cpc_add_seals(int fd, unsigned int seals) {
    return neg_errno(fcntl(fd, F_ADD_SEALS, seals));
}

int cpc_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return neg_errno(fallocate(fd, mode, (off_t)offset, (off_t)length));
}

int cpc_fstatfs(int fd, int64_t *magic, int64_t *block_size) {
    struct statfs info;
    if (fstatfs(fd, &info) < 0) return -errno;
    *magic = (int64_t)info.f_type;
    *block_size = (int64_t)info.f_bsize;
    return 0;
}

int cpc_eventfd(void) {
    return neg_errno(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
}

int cpc_thread_set_name(const char *name) {
    return -pthread_setname_np(pthread_self(), name);
}

int cpc_thread_set_scheduling(int nice) {
    struct sched_param param = { .sched_priority = 0 };
    pid_t tid = gettid();
    if (nice < 0) return neg_errno(sched_setscheduler(tid, SCHED_IDLE, &param));
    if (sched_setscheduler(tid, SCHED_OTHER, &param) != 0) return -errno;
    return neg_errno(setpriority(PRIO_PROCESS, (id_t)tid, nice));
}

int cpc_uffdio_api(int fd, uint64_t *features, uint64_t *ioctls) {
    struct uffdio_api api;
    memset(&api, 0, sizeof(api));
    api.api = UFFD_API;
    api.features = *features;
    int rc = ioctl(fd, UFFDIO_API, &api);
    if (rc < 0) return -errno;
    *features = api.features;
    *ioctls = api.ioctls;
    return 0;
}

int cpc_uffdio_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls) {
    struct uffdio_register reg;
    memset(&reg, 0, sizeof(reg));
    reg.range.start = start;
    reg.range.len = len;
    reg.mode = mode;
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0) return -errno;
    *ioctls = reg.ioctls;
    return 0;
}

int cpc_uffdio_unregister(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range range = { .start = start, .len = len };
    return neg_errno(ioctl(fd, UFFDIO_UNREGISTER, &range));
}

int cpc_uffdio_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *mapped) {
    struct uffdio_continue cont;
    memset(&cont, 0, sizeof(cont));
    cont.range.start = start;
    cont.range.len = len;
    cont.mode = mode;
    int rc = ioctl(fd, UFFDIO_CONTINUE, &cont);
    int saved = errno;
    *mapped = cont.mapped;
    return rc < 0 ? -saved : 0;
}

int cpc_uffdio_wake(int fd, uint64_t start, uint64_t len) {
    struct uffdio_range range = { .start = start, .len = len };
    return neg_errno(ioctl(fd, UFFDIO_WAKE, &range));
}

int cpc_accept_cloexec(int sock) {
    return neg_errno(accept4(sock, NULL, NULL, SOCK_CLOEXEC));
}

int cpc_peer_address(int sock, char *out, uint64_t capacity, uint16_t *port) {
    struct sockaddr_storage address;
    socklen_t len = sizeof(address);
    if (getpeername(sock, (struct sockaddr *)&address, &len) < 0) return -errno;
    const void *host;
    if (address.ss_family == AF_INET) {
        struct sockaddr_in *v4 = (struct sockaddr_in *)&address;
        host = &v4->sin_addr;
        *port = ntohs(v4->sin_port);
    } else if (address.ss_family == AF_INET6) {
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&address;
        host = &v6->sin6_addr;
        *port = ntohs(v6->sin6_port);
    } else {
        return -EAFNOSUPPORT;
    }
    if (inet_ntop(address.ss_family, host, out, (socklen_t)capacity) == NULL) return -errno;
    return 0;
}

int cpc_termination_signalfd(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    int error = pthread_sigmask(SIG_BLOCK, &set, NULL);
    if (error != 0) return -error;
    return neg_errno(signalfd(-1, &set, SFD_CLOEXEC));
}

int cpc_signalfd_read(int fd) {
    struct signalfd_siginfo info;
    ssize_t got = read(fd, &info, sizeof(info));
    if (got < 0) return -errno;
    if (got != (ssize_t)sizeof(info)) return -EIO;
    return (int)info.ssi_signo;
}

int cpc_peer_credentials(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid) {
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return -errno;
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
    return 0;
}

int64_t cpc_send_with_fd(int sock, const void *bytes, uint64_t length, int fd) {
    struct iovec iov = { .iov_base = (void *)bytes, .iov_len = length };
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd >= 0) {
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    }
    ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    return sent < 0 ? -errno : (int64_t)sent;
}

int64_t cpc_recv_with_fd(int sock, void *bytes, uint64_t capacity, int *fd) {
    struct iovec iov = { .iov_base = bytes, .iov_len = capacity };
    union { char buf[CMSG_SPACE(sizeof(int) * 4)]; struct cmsghdr align; } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    *fd = -1;
    ssize_t received = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (received < 0) return -errno;
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *fds = (int *)CMSG_DATA(cmsg);
        for (size_t i = 0; i < count; i++) {
            int one;
            memcpy(&one, fds + i, sizeof(int));
            if (*fd < 0) *fd = one; else close(one);
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
        if (*fd >= 0) close(*fd);
        *fd = -1;
        return -EPROTO;
    }
    return (int64_t)received;
}

int cpc_tcp_tune(int sock, int idle_seconds, int interval_seconds, int probes) {
    int one = 1;
    if (setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0) return -errno;
    if (setsockopt(sock, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) < 0) return -errno;
    if (setsockopt(sock, IPPROTO_TCP, TCP_KEEPIDLE, &idle_seconds, sizeof(idle_seconds)) < 0) return -errno;
    if (setsockopt(sock, IPPROTO_TCP, TCP_KEEPINTVL, &interval_seconds, sizeof(interval_seconds)) < 0) return -errno;
    if (setsockopt(sock, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof(probes)) < 0) return -errno;
    return 0;
}

/* The uapi layout of PAGEMAP_SCAN (include/uapi/linux/fs.h, Linux 6.7). */
struct cpc_pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};
_Static_assert(sizeof(struct cpc_pm_scan_arg) == 96, "pm_scan_arg is 96 bytes");
_Static_assert(sizeof(struct cpc_page_region) == 24, "page_region is 24 bytes");

#define CPC_PAGEMAP_SCAN _IOWR('f', 16, struct cpc_pm_scan_arg)
#define CPC_PM_SCAN_WP_MATCHING (1 << 0)
#define CPC_PM_SCAN_CHECK_WPASYNC (1 << 1)
#ifdef PAGEMAP_SCAN
_Static_assert(PAGEMAP_SCAN == CPC_PAGEMAP_SCAN, "PAGEMAP_SCAN matches the kernel's");
#endif

int64_t cpc_pagemap_scan_written(int pagemap_fd, uint64_t start, uint64_t end, int protect,
                                 struct cpc_page_region *regions, uint64_t capacity, uint64_t *walk_end) {
    struct cpc_pm_scan_arg arg = {
        .size = sizeof(arg),
        .flags = CPC_PM_SCAN_CHECK_WPASYNC | (protect ? CPC_PM_SCAN_WP_MATCHING : 0),
        .start = start,
        .end = end,
        .vec = (uint64_t)(uintptr_t)regions,
        .vec_len = capacity,
        .category_mask = CPC_PAGE_IS_WRITTEN,
        .return_mask = CPC_PAGE_IS_WRITTEN,
    };
    /* No retry on EINTR: the kernel returns it only for a fatal signal, and
     * the regions of a walk cut short that way are gone with the caller. */
    long rc = ioctl(pagemap_fd, CPC_PAGEMAP_SCAN, &arg);
    if (rc < 0) return -errno;
    *walk_end = arg.walk_end;
    return rc;
}
