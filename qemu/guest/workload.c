/*
 * The guest's workload: /init of a small initramfs, run by a real Linux
 * kernel inside QEMU.
 *
 * It fills most of the guest's RAM with self-verifying 4 KiB pages, then
 * keeps rewriting a hot set of them while it measures how long each rewrite
 * waits (a page fault served from another host shows up here as a stall).
 * Every page records its own index and generation, and the generation each
 * page should have is kept in a separate table, so a page that came back
 * stale (an older, still self-consistent version) is caught as well as a
 * page that came back damaged.
 *
 * It talks on the serial console (ttyS0), one line per event, each starting
 * with "POSTCOPY-GUEST":
 *   READY pages=N hot=H            the fill is done; the hot loop runs
 *   VERIFY PASS pages=N ...        answer to 'v': every page checked
 *   VERIFY FAIL bad=K first=I ...  answer to 'v': K pages are wrong
 *   STALLS longest-stall-us=…      after each verdict, and answer to 's': the
 *                                  longest gap between two hot writes, how
 *                                  many exceeded 1, 10 and 100 ms, and how
 *                                  often the clock stepped back
 *   RESET                          answer to 'r': stall figures zeroed
 * Commands are single bytes read from the console: 'v' verify, 'r' reset
 * the stall figures, 's' print them without verifying.
 *
 * Static, no libc beyond what glibc's static build brings; it never exits
 * (init must not), so after a verdict it goes on running its hot loop.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / 8u)
/* Left to the kernel and page tables; the rest of RAM is the pattern. */
#define RESERVE_BYTES (40u << 20)
/* The hot set: pages rewritten over and over, spread across the region. */
#define HOT_PAGES 8192u
#define STRIDE_SEED 0x9E3779B97F4A7C15ull

static int console = -1;

static void say(const char *format, ...)
{
    char line[256];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(line, sizeof line - 1, format, args);
    va_end(args);
    if (n < 0)
        return;
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    for (int done = 0; done < n;) {
        ssize_t w = write(console, line + done, (size_t)(n - done));
        if (w <= 0 && errno != EINTR)
            return;
        if (w > 0)
            done += (int)w;
    }
}

static uint64_t mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return x;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static uint64_t *pages;  /* pageCount pages of PAGE_WORDS words */
static uint32_t *generation;  /* the generation every page must have */
static uint64_t page_count;
static uint64_t seed;

/* Word 0: the page's index; word 1: its generation; the rest follow from
 * both, so any mix of two versions, or of two pages, fails. */
static void write_page(uint64_t index, uint32_t gen)
{
    uint64_t *page = pages + index * PAGE_WORDS;
    uint64_t key = mix(seed ^ (index << 20) ^ gen);
    page[0] = index;
    page[1] = gen;
    for (unsigned w = 2; w < PAGE_WORDS; w++)
        page[w] = key + w * STRIDE_SEED;
}

/* 0 when the page holds exactly what its table entry says. */
static int check_page(uint64_t index, uint64_t *found_index, uint64_t *found_gen)
{
    const uint64_t *page = pages + index * PAGE_WORDS;
    uint32_t gen = generation[index];
    *found_index = page[0];
    *found_gen = page[1];
    if (page[0] != index || page[1] != gen)
        return 1;
    uint64_t key = mix(seed ^ (index << 20) ^ gen);
    for (unsigned w = 2; w < PAGE_WORDS; w++)
        if (page[w] != key + w * STRIDE_SEED)
            return 1;
    return 0;
}

struct stalls {
    uint64_t clock_back; /* times CLOCK_MONOTONIC went backwards */
    uint64_t longest_ns;
    uint64_t over_1ms;
    uint64_t over_10ms;
    uint64_t over_100ms;
    uint64_t writes;
    uint64_t since_ns;
};

static void reset(struct stalls *s)
{
    memset(s, 0, sizeof *s);
    s->since_ns = now_ns();
}

static void note_gap(struct stalls *s, uint64_t gap)
{
    if (gap > s->longest_ns)
        s->longest_ns = gap;
    s->over_1ms += gap > 1000000ull;
    s->over_10ms += gap > 10000000ull;
    s->over_100ms += gap > 100000000ull;
}

static void report_stalls(const char *what, const struct stalls *s)
{
    say("POSTCOPY-GUEST %s longest-stall-us=%" PRIu64 " stalls-over-1ms=%" PRIu64
        " over-10ms=%" PRIu64 " over-100ms=%" PRIu64 " hot-writes=%" PRIu64 " clock-back=%" PRIu64
        " seconds=%" PRIu64,
        what, s->longest_ns / 1000, s->over_1ms, s->over_10ms, s->over_100ms, s->writes, s->clock_back,
        (now_ns() - s->since_ns) / 1000000000ull);
}

static void verify(struct stalls *s)
{
    uint64_t bad = 0, first = 0, first_index = 0, first_gen = 0;
    uint64_t start = now_ns();
    for (uint64_t i = 0; i < page_count; i++) {
        uint64_t found_index, found_gen;
        if (check_page(i, &found_index, &found_gen)) {
            if (bad++ == 0) {
                first = i;
                first_index = found_index;
                first_gen = found_gen;
            }
        }
    }
    uint64_t ms = (now_ns() - start) / 1000000ull;
    if (bad == 0) {
        say("POSTCOPY-GUEST VERIFY PASS pages=%" PRIu64 " verify-ms=%" PRIu64, page_count, ms);
    } else {
        say("POSTCOPY-GUEST VERIFY FAIL bad=%" PRIu64 " of pages=%" PRIu64 " first=%" PRIu64
            " expected-gen=%" PRIu32 " found-index=%" PRIu64 " found-gen=%" PRIu64,
            bad, page_count, first, generation[first], first_index, first_gen);
    }
    report_stalls("STALLS", s);
}

static void open_console(void)
{
    mkdir("/dev", 0755);
    mkdir("/proc", 0755);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    mount("proc", "/proc", "proc", 0, NULL);
    console = open("/dev/ttyS0", O_RDWR | O_NOCTTY);
    if (console < 0)
        console = open("/dev/console", O_RDWR | O_NOCTTY);
    struct termios t;
    if (tcgetattr(console, &t) == 0) {
        cfmakeraw(&t);
        t.c_oflag |= OPOST | ONLCR;
        tcsetattr(console, TCSANOW, &t);
    }
}

int main(void)
{
    open_console();
    struct sysinfo info;
    sysinfo(&info);
    uint64_t free_bytes = (uint64_t)info.freeram * info.mem_unit;
    if (free_bytes < RESERVE_BYTES + (64u << 20)) {
        say("POSTCOPY-GUEST FAIL too little memory: %" PRIu64 " bytes free", free_bytes);
        for (;;)
            pause();
    }
    /* pages + generation table = page_count * (4096 + 4) bytes */
    page_count = (free_bytes - RESERVE_BYTES) / (PAGE_BYTES + 4);
    seed = mix(now_ns());
    pages = mmap(NULL, page_count * PAGE_BYTES, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    generation = mmap(NULL, page_count * 4, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (pages == MAP_FAILED || generation == MAP_FAILED) {
        say("POSTCOPY-GUEST FAIL mmap of %" PRIu64 " pages: %s", page_count, strerror(errno));
        for (;;)
            pause();
    }
    say("POSTCOPY-GUEST FILLING pages=%" PRIu64 " (%" PRIu64 " MiB)", page_count,
        page_count * PAGE_BYTES >> 20);
    uint64_t start = now_ns();
    for (uint64_t i = 0; i < page_count; i++) {
        generation[i] = 1;
        write_page(i, 1);
    }
    uint64_t hot = page_count < HOT_PAGES ? page_count : HOT_PAGES;
    /* The hot set is every step-th page: spread over the whole region. */
    uint64_t step = page_count / hot | 1;
    say("POSTCOPY-GUEST READY pages=%" PRIu64 " hot=%" PRIu64 " fill-ms=%" PRIu64, page_count, hot,
        (now_ns() - start) / 1000000ull);

    struct stalls s;
    reset(&s);
    uint64_t last = now_ns();
    for (uint64_t k = 0;; k++) {
        uint64_t index = (k % hot) * step % page_count;
        generation[index] += 1;
        write_page(index, generation[index]);
        s.writes++;
        uint64_t t = now_ns();
        if (t >= last)
            note_gap(&s, t - last);
        else
            s.clock_back++; /* a guest clock stepped back by a migration */
        last = t;
        if ((k & 255) == 0) {
            struct pollfd p = { .fd = console, .events = POLLIN };
            char command;
            if (poll(&p, 1, 0) == 1 && read(console, &command, 1) == 1) {
                if (command == 'v')
                    verify(&s);
                else if (command == 'r') {
                    reset(&s);
                    say("POSTCOPY-GUEST RESET");
                } else if (command == 's')
                    report_stalls("STALLS", &s);
                last = now_ns();
            }
        }
    }
}
