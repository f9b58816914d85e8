// See include/ccrc32c.h.
#include "ccrc32c.h"

#include <string.h>

#if defined(__x86_64__)

int ccrc32c_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
}

__attribute__((target("sse4.2")))
uint32_t ccrc32c_advance(uint32_t crc, const void *bytes, size_t count) {
    const unsigned char *p = bytes;
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
