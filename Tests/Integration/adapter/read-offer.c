/*
 * The agent's end of the source VMM's offer, for
 * Tests/Integration/adapter/adapter-test.sh: connects to SOCKET, reads until the VMM
 * closes, checks the message as docs/protocol.md ("The source VMM's
 * offer") and SourceTrackingOffer do, and prints one line:
 *
 *   armed 0xADDRESS LENGTH
 *   unavailable: REASON
 *   no offer: <why>            (refused, closed without a word, malformed)
 *
 *   read-offer SOCKET
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

static uint64_t get(const unsigned char *p, int bytes)
{
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: read-offer SOCKET\n");
        return 2;
    }
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = { .sun_family = AF_UNIX };
    snprintf(address.sun_path, sizeof address.sun_path, "%s", argv[1]);
    if (connect(s, (struct sockaddr *)&address, sizeof address) < 0) {
        printf("no offer: connect: %s\n", strerrorname_np(errno));
        return 1;
    }
    struct timeval patience = { .tv_sec = 10 };
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
    unsigned char message[26 + 1024 + 1];
    size_t count = 0;
    for (;;) {
        ssize_t n = recv(s, message + count, sizeof message - count, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            printf("no offer: recv: %s\n", strerrorname_np(errno));
            return 1;
        }
        if (n == 0 || (count += (size_t)n) == sizeof message)
            break;
    }
    if (count == 0) {
        printf("no offer: closed without a word\n");
        return 1;
    }
    if (count < 26 || memcmp(message, "PCWP", 4) != 0 || get(message + 4, 2) != 1) {
        printf("no offer: malformed (%zu bytes)\n", count);
        return 1;
    }
    uint64_t status = get(message + 6, 2), at = get(message + 8, 8), length = get(message + 16, 8);
    uint64_t reason = get(message + 24, 2);
    if (reason > 1024 || count != 26 + reason) {
        printf("no offer: %zu bytes with a %" PRIu64 "-byte reason\n", count, reason);
        return 1;
    }
    if (status == 0 && reason == 0 && length > 0 && at % 4096 == 0 && length % 4096 == 0) {
        printf("armed 0x%" PRIx64 " %" PRIu64 "\n", at, length);
        return 0;
    }
    if (status == 1 && at == 0 && length == 0) {
        printf("unavailable: %.*s\n", (int)reason, (const char *)message + 26);
        return 0;
    }
    printf("no offer: status %" PRIu64 ", range 0x%" PRIx64 "+%" PRIu64 ", %" PRIu64 "-byte reason\n", status,
           at, length, reason);
    return 1;
}
