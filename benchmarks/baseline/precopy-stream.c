/*
 * precopy-stream: the precopy throughput baseline for postcopyd.
 *
 * What plain TCP or TLS over loopback achieves when the receiver writes
 * every byte into guest RAM that has never been touched, as the daemon's
 * precopy receiver does: the first touch of each page (allocating and
 * zeroing it, and on a VM the hypervisor backing it) is part of the figure.
 *
 * The parent creates a fresh memfd of BYTES (MFD_CLOEXEC; MFD_HUGETLB |
 * MFD_HUGE_2MB for hugetlb) and ftruncate()s it; nothing pre-faults it.
 * shmem: nothing is mapped, the receiver pwrite()s at consecutive offsets
 * (as the daemon writes shmem; which page size shmem uses is the host's
 * /sys/kernel/mm/transparent_hugepage/shmem_enabled). hugetlb: hugetlbfs
 * has no write(2), so the memfd is mapped MAP_SHARED (which reserves the
 * hugepages but faults none in) and the receiver memcpy()s into the mapping.
 *
 * The parent listens on 127.0.0.1 and forks the sender. The sender
 * fills a source memfd of BYTES first (untimed, before it connects: the
 * agent too sends from a shmem file of guest RAM, and the same footprint
 * keeps the receiver's memfd as cold as the daemon's), each MiB stamped
 * with its index so that every MiB of the stream differs, then connects
 * and write()s (tcp) or SSL_write()s (tls) it in 1 MiB calls. The parent is the
 * receiver and, for tls, the server: it reads into a 1 MiB buffer and
 * writes each chunk into the memfd at the next offset straight away.
 *   tcp: one recv() of up to 1 MiB per chunk, whatever it returns.
 *        Default socket buffers, Nagle on: an ordinary bulk stream.
 *   tls: TLS 1.3 (OpenSSL libssl, its default cipher suites, as the daemon),
 *        with the daemon's context options: read-ahead on with the default
 *        read buffer (about one 16 KiB record: each read(2) takes what
 *        fits, rather than a 5-byte header and then the record's body),
 *        SSL_OP_NO_TICKET (in TLS 1.3 the server still sends its session
 *        tickets after the handshake; the sender reads them at the end).
 *        A chunk is SSL_read() calls into the 1 MiB buffer for as long as
 *        OpenSSL holds bytes it has read ahead (SSL_has_pending), as the
 *        daemon's receive does; then it is written (on loopback mostly
 *        one or two records, so many small writes). The server's key
 *        (EC P-256) and self-signed certificate are made in memory before
 *        the fork; the client verifies nothing.
 * Timed with CLOCK_MONOTONIC from accept() returning (tcp) or SSL_accept()
 * completing (tls) to the last byte written into the memfd; the receiver's
 * own CPU time (getrusage RUSAGE_SELF, user + sys) is sampled at the same
 * two points. It does not include the sender's, and on loopback the
 * receive-side protocol processing mostly runs in the sender's context.
 * Afterwards (untimed) the stream must end there, and the memfd is read
 * back (pread, or the mapping) and compared with the pattern.
 *
 * With `fallocate` or `populate-write` (an experiment for issue 20: does
 * making the pages exist ahead of the writes, on a second thread, take the
 * first touch off the receiver?), a helper thread makes the memfd's pages
 * in 64 MiB pieces from the start, never more than 256 MiB ahead of what
 * the receiver has written: fallocate(2) (on shmem this allocates the
 * pages but leaves them to be zeroed on first use), or MADV_POPULATE_WRITE
 * on a shared mapping of its own (which writes each page: allocated and
 * zeroed). The receiver's figures then count both threads, and
 * populate_cpu_s_per_gib= says what the helper's share was.
 *
 * One run per invocation, since the memfd must be fresh: repeat it.
 *
 *   usage: precopy-stream BYTES tcp|tls [shmem|hugetlb] [fallocate|populate-write]
 *          (BYTES a multiple of 2 MiB; default shmem)
 *   prints: bytes=, mode=tcp|tls, memory=shmem|hugetlb,
 *           populate=no|fallocate|populate-write,
 *           seconds=, mib_per_s=, receiver_cpu_s_per_gib=
 *           [, populate_cpu_s_per_gib=] (MiB = 2^20, GiB = 2^30)
 */
#define _GNU_SOURCE
#define BASELINE_NAME "precopy-stream"
#include "baseline.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/memfd.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1u << 20)
#define HUGE_2M (2u << 20)
#define PAGE 4096u

/* ---- the pattern ---- */

/* The base pattern: position-dependent within the MiB, every 8-byte word
 * non-zero. */
static void fill_base(char *buf) {
    for (uint64_t off = 0; off < CHUNK; off += 8) *(uint64_t *)(buf + off) = (off + 8) * 0x9E3779B97F4A7C15ull;
}

/* Makes a base-filled buffer MiB number `index` of the stream: the first
 * word of every 4 KiB page carries the index (and the page's offset). */
static void stamp(char *buf, uint64_t index) {
    for (uint64_t off = 0; off < CHUNK; off += PAGE)
        *(uint64_t *)(buf + off) = ((index << 20 | off) + 1) * 0xBF58476D1CE4E5B9ull;
}

/* ---- OpenSSL failures ---- */

/* Fails with `what` and OpenSSL's queued error reasons. */
static void ssl_fail(const char *what) {
    char msg[1024];
    size_t used = (size_t)snprintf(msg, sizeof(msg), "%s", what);
    unsigned long code;
    int any = 0;
    while ((code = ERR_get_error()) != 0 && used + 3 < sizeof(msg)) {
        memcpy(msg + used, any ? "; " : ": ", 2);
        used += 2;
        ERR_error_string_n(code, msg + used, sizeof(msg) - used);
        used += strlen(msg + used);
        any = 1;
    }
    if (!any) snprintf(msg + used, sizeof(msg) - used, ": (no OpenSSL error queued)");
    fail(msg);
}

/* Fails for an SSL_* I/O call that returned `ret` <= 0. */
static void ssl_io_fail(SSL *ssl, int ret, const char *what) {
    int code = SSL_get_error(ssl, ret);
    char msg[256];
    if (code == SSL_ERROR_SYSCALL && errno != 0) die(what);
    if (code == SSL_ERROR_SYSCALL || code == SSL_ERROR_ZERO_RETURN) {
        snprintf(msg, sizeof(msg), "%s: the peer closed the connection", what);
        fail(msg);
    }
    if (code == SSL_ERROR_SSL) ssl_fail(what);
    snprintf(msg, sizeof(msg), "%s: SSL_get_error %d", what, code);
    fail(msg);
}

/* ---- TLS setup ---- */

/* TLS 1.3 only, library default cipher suites, and the daemon's options. */
static SSL_CTX *tls_context(const SSL_METHOD *method) {
    SSL_CTX *ctx = SSL_CTX_new(method);
    if (!ctx) ssl_fail("SSL_CTX_new");
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION)) ssl_fail("SSL_CTX_set_min_proto_version TLS 1.3");
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET | SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_CTX_set_read_ahead(ctx, 1);
    return ctx;
}

/* The server's context with a throwaway EC P-256 key and a self-signed
 * certificate for it, made in memory. */
static SSL_CTX *server_context(void) {
    EVP_PKEY *key = EVP_EC_gen("P-256");
    if (!key) ssl_fail("generate an EC P-256 key");
    X509 *cert = X509_new();
    if (!cert) ssl_fail("X509_new");
    if (!X509_set_version(cert, 2)) ssl_fail("X509_set_version");
    if (!ASN1_INTEGER_set(X509_get_serialNumber(cert), 1)) ssl_fail("set the certificate's serial number");
    if (!X509_gmtime_adj(X509_getm_notBefore(cert), -60) || !X509_gmtime_adj(X509_getm_notAfter(cert), 86400))
        ssl_fail("set the certificate's validity");
    X509_NAME *name = X509_get_subject_name(cert);
    if (!X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"precopy-stream", -1, -1, 0))
        ssl_fail("set the certificate's subject");
    if (!X509_set_issuer_name(cert, name)) ssl_fail("set the certificate's issuer");
    if (!X509_set_pubkey(cert, key)) ssl_fail("X509_set_pubkey");
    if (!X509_sign(cert, key, EVP_sha256())) ssl_fail("sign the certificate");

    SSL_CTX *ctx = tls_context(TLS_server_method());
    if (SSL_CTX_use_certificate(ctx, cert) != 1) ssl_fail("SSL_CTX_use_certificate");
    if (SSL_CTX_use_PrivateKey(ctx, key) != 1) ssl_fail("SSL_CTX_use_PrivateKey");
    if (SSL_CTX_check_private_key(ctx) != 1) ssl_fail("SSL_CTX_check_private_key");
    X509_free(cert);
    EVP_PKEY_free(key);
    return ctx;
}

/* ---- the sender (child) ---- */

static void send_stream(int listener, const struct sockaddr_in *addr, int tls, uint64_t bytes) {
    close(listener);
    /* The whole source, filled before connecting (untimed): as the agent
     * sends guest RAM from a shmem file, the same bytes take the same
     * memory, so the receiver's fresh memfd is no warmer than the
     * daemon's (on a VM, memory freed a moment ago is cheaper to touch
     * than memory the host has taken back). */
    int source = memfd_create("precopy-stream-source", MFD_CLOEXEC);
    if (source < 0) die("memfd_create for the source");
    if (ftruncate(source, (off_t)bytes) < 0) die("ftruncate the source");
    char *all = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, source, 0);
    if (all == MAP_FAILED) die("mmap the source");
    char *base = malloc(CHUNK);
    if (!base) die("malloc");
    fill_base(base);
    for (uint64_t off = 0; off < bytes; off += CHUNK) {
        memcpy(all + off, base, CHUNK);
        stamp(all + off, off / CHUNK);
    }
    free(base);

    SSL_CTX *ctx = NULL;
    SSL *ssl = NULL;
    if (tls) {
        ctx = tls_context(TLS_client_method());
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    }
    int sock = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) die("socket");
    while (connect(sock, (const struct sockaddr *)addr, sizeof(*addr)) < 0)
        if (errno != EINTR) die("connect");
    if (tls) {
        ssl = SSL_new(ctx);
        if (!ssl) ssl_fail("SSL_new");
        if (!SSL_set_fd(ssl, sock)) ssl_fail("SSL_set_fd");
        errno = 0;
        int ret = SSL_connect(ssl);
        if (ret != 1) ssl_io_fail(ssl, ret, "TLS handshake (SSL_connect)");
    }

    for (uint64_t off = 0; off < bytes; off += CHUNK) {
        size_t len = bytes - off < CHUNK ? (size_t)(bytes - off) : CHUNK, put = 0;
        const char *src = all + off;
        while (put < len) {
            if (tls) {
                errno = 0;
                int n = SSL_write(ssl, src + put, (int)(len - put));
                if (n <= 0) ssl_io_fail(ssl, n, "SSL_write");
                put += (size_t)n;
            } else {
                ssize_t n = write(sock, src + put, len - put);
                if (n < 0) {
                    if (errno == EINTR) continue;
                    die("write");
                }
                put += (size_t)n;
            }
        }
    }
    if (tls) {
        errno = 0;
        int ret = SSL_shutdown(ssl); /* sends close_notify */
        if (ret < 0) ssl_io_fail(ssl, ret, "SSL_shutdown");
        /* Read until the receiver closes: what it sent after the handshake
         * (its session tickets) must not be left unread here, or closing
         * would reset the connection before the receiver has read it all. */
        char extra;
        errno = 0;
        int n = SSL_read(ssl, &extra, 1);
        if (n > 0) fail("the receiver sent data");
        if (SSL_get_error(ssl, n) != SSL_ERROR_ZERO_RETURN) ssl_io_fail(ssl, n, "SSL_read after the stream");
        SSL_free(ssl);
        SSL_CTX_free(ctx);
    }
    if (close(sock) < 0) die("close");
    munmap(all, bytes);
    close(source);
}

/* ---- the receiver (parent) ---- */

static double cpu_seconds(void) {
    struct rusage usage;
    if (getrusage(RUSAGE_SELF, &usage) < 0) die("getrusage");
    return (double)(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
           (double)(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

/* Writes buf[0..len) into the memfd at off: pwrite for shmem, memcpy into
 * the mapping for hugetlb. */
static void store(int fd, char *map, const char *buf, size_t len, uint64_t off) {
    if (map) {
        memcpy(map + off, buf, len);
        return;
    }
    size_t put = 0;
    while (put < len) {
        ssize_t n = pwrite(fd, buf + put, len - put, (off_t)(off + put));
        if (n < 0) {
            if (errno == EINTR) continue;
            die("pwrite memfd");
        }
        if (n == 0) fail("pwrite memfd wrote nothing");
        put += (size_t)n;
    }
}

/* ---- populating ahead (the fallocate and populate-write experiment) ---- */

#define POPULATE_PIECE (64ull << 20)
#define POPULATE_LEAD (256ull << 20)

struct populate {
    int fd;
    char *map; /* populate-write: the helper's own mapping; fallocate: NULL */
    uint64_t bytes;
    _Atomic uint64_t written; /* what the receiver has stored so far */
    double cpu_seconds;       /* the helper's own, when it ends */
};

static double thread_cpu_seconds(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) < 0) die("clock_gettime CLOCK_THREAD_CPUTIME_ID");
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Allocates the memfd's pages piece by piece, staying at most
 * POPULATE_LEAD ahead of the receiver (polling every 200 µs when it is). */
static void *populate_ahead(void *arg) {
    struct populate *p = arg;
    for (uint64_t off = 0; off < p->bytes; off += POPULATE_PIECE) {
        while (off >= atomic_load(&p->written) + POPULATE_LEAD) usleep(200);
        uint64_t len = p->bytes - off < POPULATE_PIECE ? p->bytes - off : POPULATE_PIECE;
        if (p->map) {
            while (madvise(p->map + off, len, MADV_POPULATE_WRITE) < 0)
                if (errno != EINTR && errno != EAGAIN) die("madvise MADV_POPULATE_WRITE (populate ahead)");
        } else {
            while (fallocate(p->fd, 0, (off_t)off, (off_t)len) < 0)
                if (errno != EINTR) die("fallocate (populate ahead)");
        }
    }
    p->cpu_seconds = thread_cpu_seconds();
    return NULL;
}

/* Reads once from the connection into buf (room bytes free): one recv for
 * tcp; for tls, SSL_read for as long as OpenSSL already holds more. Fails
 * on EOF. Returns the count read. */
static size_t receive(int conn, SSL *ssl, char *buf, size_t room) {
    if (!ssl) {
        for (;;) {
            ssize_t n = recv(conn, buf, room, 0);
            if (n > 0) return (size_t)n;
            if (n == 0) fail("the sender closed the connection early");
            if (errno != EINTR) die("recv");
        }
    }
    size_t got = 0;
    while (got < room) {
        errno = 0;
        int n = SSL_read(ssl, buf + got, (int)(room - got));
        if (n <= 0) ssl_io_fail(ssl, n, "SSL_read");
        got += (size_t)n;
        if (!SSL_has_pending(ssl)) break;
    }
    return got;
}

/* After BYTES: the stream must end (EOF, or close_notify for tls). */
static void expect_end(int conn, SSL *ssl) {
    char extra;
    if (ssl) {
        errno = 0;
        int n = SSL_read(ssl, &extra, 1);
        if (n > 0) fail("the sender sent more than BYTES");
        int code = SSL_get_error(ssl, n);
        if (code != SSL_ERROR_ZERO_RETURN) ssl_io_fail(ssl, n, "SSL_read after the stream");
        return;
    }
    ssize_t n;
    while ((n = recv(conn, &extra, 1, 0)) < 0 && errno == EINTR) {}
    if (n < 0) die("recv after the stream");
    if (n > 0) fail("the sender sent more than BYTES");
}

/* Reads the memfd back and compares it with the pattern. */
static void verify(int fd, const char *map, uint64_t bytes) {
    char *expected = malloc(CHUNK), *got = map ? NULL : malloc(CHUNK);
    if (!expected || (!map && !got)) die("malloc verification buffers");
    fill_base(expected);
    for (uint64_t off = 0; off < bytes; off += CHUNK) {
        size_t len = bytes - off < CHUNK ? (size_t)(bytes - off) : CHUNK;
        stamp(expected, off / CHUNK);
        const char *have = map ? map + off : got;
        if (!map) {
            size_t read_so_far = 0;
            while (read_so_far < len) {
                ssize_t n = pread(fd, got + read_so_far, len - read_so_far, (off_t)(off + read_so_far));
                if (n < 0) {
                    if (errno == EINTR) continue;
                    die("pread memfd (verification)");
                }
                if (n == 0) fail("pread memfd (verification): unexpected end of file");
                read_so_far += (size_t)n;
            }
        }
        if (memcmp(have, expected, len)) {
            size_t at = 0;
            while (have[at] == expected[at]) at++;
            char msg[160];
            snprintf(msg, sizeof(msg), "the memfd does not match the pattern at byte %llu",
                     (unsigned long long)(off + at));
            fail(msg);
        }
    }
    free(expected);
    free(got);
}

int main(int argc, char **argv) {
    const char *populate = NULL;
    if (argc >= 4 && (!strcmp(argv[argc - 1], "fallocate") || !strcmp(argv[argc - 1], "populate-write")))
        populate = argv[--argc];
    int bad = argc != 3 && argc != 4;
    uint64_t bytes = 0;
    if (!bad) {
        char *end;
        errno = 0;
        bytes = strtoull(argv[1], &end, 10);
        bad = argv[1][0] < '0' || argv[1][0] > '9' || errno || *end || bytes == 0 || bytes % HUGE_2M ||
              (strcmp(argv[2], "tcp") && strcmp(argv[2], "tls")) ||
              (argc == 4 && strcmp(argv[3], "shmem") && strcmp(argv[3], "hugetlb"));
    }
    if (bad) {
        fprintf(stderr,
                "usage: precopy-stream BYTES tcp|tls [shmem|hugetlb] [fallocate|populate-write]\n"
                "  BYTES: positive multiple of 2 MiB (2097152), e.g. 1073741824\n"
                "  memory: shmem (default) or hugetlb (2 MiB hugepages)\n"
                "  fallocate, populate-write: a second thread makes the pages ahead of the writes\n");
        return 2;
    }
    int tls = !strcmp(argv[2], "tls");
    int huge = argc == 4 && !strcmp(argv[3], "hugetlb");
    signal(SIGPIPE, SIG_IGN);

    /* Target: the guest-RAM stand-in, fresh and never touched. */
    int fd = guest_ram_memfd("precopy-stream", bytes, huge);
    char *map = NULL;
    if (huge) {
        map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
            char msg[200];
            snprintf(msg, sizeof(msg),
                     "mmap hugetlb memfd: %s (no free 2 MiB hugepages? %llu needed, see /proc/sys/vm/nr_hugepages "
                     "and HugePages_Free in /proc/meminfo)",
                     strerror(errno), (unsigned long long)(bytes / HUGE_2M));
            fail(msg);
        }
    }

    /* The receive buffer, touched now so only the memfd's first touch is
     * timed. */
    char *buf = malloc(CHUNK);
    if (!buf) die("malloc receive buffer");
    memset(buf, 0, CHUNK);

    SSL_CTX *ctx = tls ? server_context() : NULL;
    struct sockaddr_in addr;
    int listener = listen_loopback(&addr);

    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        child_role = "sender";
        close(fd);
        send_stream(listener, &addr, tls, bytes);
        _exit(0);
    }
    child_pid = pid;

    int conn;
    while ((conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC)) < 0)
        if (errno != EINTR) die("accept");
    close(listener);
    SSL *ssl = NULL;
    if (tls) {
        ssl = SSL_new(ctx);
        if (!ssl) ssl_fail("SSL_new");
        if (!SSL_set_fd(ssl, conn)) ssl_fail("SSL_set_fd");
        errno = 0;
        int ret = SSL_accept(ssl);
        if (ret != 1) ssl_io_fail(ssl, ret, "TLS handshake (SSL_accept)");
    }

    uint64_t t0 = now_ns(), got = 0;
    double cpu0 = cpu_seconds();
    struct populate ahead = {.fd = fd, .bytes = bytes};
    if (populate && !strcmp(populate, "populate-write")) {
        ahead.map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (ahead.map == MAP_FAILED) die("mmap the memfd for MADV_POPULATE_WRITE");
    }
    pthread_t helper;
    if (populate && (errno = pthread_create(&helper, NULL, populate_ahead, &ahead)) != 0) die("pthread_create");
    while (got < bytes) {
        size_t room = bytes - got < CHUNK ? (size_t)(bytes - got) : CHUNK;
        size_t n = receive(conn, ssl, buf, room);
        store(fd, map, buf, n, got);
        got += n;
        atomic_store(&ahead.written, got);
    }
    if (populate && (errno = pthread_join(helper, NULL)) != 0) die("pthread_join");
    uint64_t t1 = now_ns();
    double cpu1 = cpu_seconds();

    expect_end(conn, ssl);
    if (ssl) {
        SSL_free(ssl);
        SSL_CTX_free(ctx);
    }
    close(conn);
    reap_child(pid, "sender");
    verify(fd, map, bytes);

    double seconds = (double)(t1 - t0) / 1e9, gib = (double)bytes / (double)(1u << 30);
    printf("bytes=%llu\n", (unsigned long long)bytes);
    printf("mode=%s\n", tls ? "tls" : "tcp");
    printf("memory=%s\n", huge ? "hugetlb" : "shmem");
    printf("populate=%s\n", populate ? populate : "no");
    printf("seconds=%.3f\n", seconds);
    printf("mib_per_s=%.1f\n", ((double)bytes / (double)(1u << 20)) / seconds);
    printf("receiver_cpu_s_per_gib=%.3f\n", (cpu1 - cpu0) / gib);
    if (populate) printf("populate_cpu_s_per_gib=%.3f\n", ahead.cpu_seconds / gib);
    return 0;
}
