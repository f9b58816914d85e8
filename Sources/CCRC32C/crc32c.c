// See include/ccrc32c.h.
#include "ccrc32c.h"

#include <string.h>

#if defined(__x86_64__)

// The crc32 instruction takes 3 cycles and can start one every cycle, so
// one dependent chain runs at a third of what the CPU can do. Long buffers
// are cut into three lanes of LANE bytes, checksummed side by side and
// joined: advance(r, A || B) = shift(advance(r, A), |B|) ^ advance(0, B),
// where shift(r, n) = advance(r, n zero bytes) is linear in r, so four
// 256-entry tables (one per byte of r) give it for n = LANE.
#define LANE 8192

static uint32_t lane_shift[4][256];
static int have_sse42;

__attribute__((target("sse4.2")))
static uint32_t advance_one_lane(uint32_t crc, const unsigned char *p, size_t count) {
    uint64_t wide = crc;
    while (count >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);  // unaligned-safe; compiles to one load
        wide = __builtin_ia32_crc32di(wide, word);
        p += 8;
        count -= 8;
    }
    uint32_t narrow = (uint32_t)wide;
    while (count > 0) {
        narrow = __builtin_ia32_crc32qi(narrow, *p);
        p += 1;
        count -= 1;
    }
    return narrow;
}

static uint32_t shift_lane(uint32_t crc) {
    return lane_shift[0][crc & 0xFF] ^ lane_shift[1][(crc >> 8) & 0xFF]
         ^ lane_shift[2][(crc >> 16) & 0xFF] ^ lane_shift[3][crc >> 24];
}

__attribute__((constructor))
static void build_lane_shift(void) {
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    if (!have_sse42) return;
    static const unsigned char zeros[LANE];
    for (int byte = 0; byte < 4; byte++)
        for (uint32_t value = 0; value < 256; value++)
            lane_shift[byte][value] = advance_one_lane(value << (8 * byte), zeros, LANE);
}

int ccrc32c_available(void) {
    return have_sse42;
}

__attribute__((target("sse4.2")))
uint32_t ccrc32c_advance(uint32_t crc, const void *bytes, size_t count) {
    const unsigned char *p = bytes;
    while (count >= 3 * LANE) {
        uint64_t a = crc, b = 0, c = 0;
        for (size_t offset = 0; offset < LANE; offset += 8) {
            uint64_t x, y, z;
            memcpy(&x, p + offset, 8);
            memcpy(&y, p + LANE + offset, 8);
            memcpy(&z, p + 2 * LANE + offset, 8);
            a = __builtin_ia32_crc32di(a, x);
            b = __builtin_ia32_crc32di(b, y);
            c = __builtin_ia32_crc32di(c, z);
        }
        crc = shift_lane(shift_lane((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
        p += 3 * LANE;
        count -= 3 * LANE;
    }
    return advance_one_lane(crc, p, count);
}

#elif defined(__aarch64__)

#include <sys/auxv.h>
#include <asm/hwcap.h>

int ccrc32c_available(void) {
    return (getauxval(AT_HWCAP) & HWCAP_CRC32) ? 1 : 0;
}

__attribute__((target("+crc")))
uint32_t ccrc32c_advance(uint32_t crc, const void *bytes, size_t count) {
    const unsigned char *p = bytes;
    while (count >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        crc = __builtin_aarch64_crc32cx(crc, word);
        p += 8;
        count -= 8;
    }
    while (count > 0) {
        crc = __builtin_aarch64_crc32cb(crc, *p);
        p += 1;
        count -= 1;
    }
    return crc;
}

#else

int ccrc32c_available(void) { return 0; }

uint32_t ccrc32c_advance(uint32_t crc, const void *bytes, size_t count) {
    (void)bytes;
    (void)count;
    return crc;
}

#endif
