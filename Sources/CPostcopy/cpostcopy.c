/*
 * CPostcopy: one function per kernel call; see cpostcopy.h.
 */
#include "cpostcopy.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/vfs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
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
