// CRC-32C with the CPU's own instruction (SSE4.2 `crc32` on x86-64, the CRC
// extension on AArch64): Swift cannot emit these instructions, so this is a
// thin C shim. Pure computation, no system calls; PostcopyCore's CRC32C
// uses it when the CPU has it and its own table-driven code otherwise.
#ifndef CCRC32C_H
#define CCRC32C_H

#include <stddef.h>
#include <stdint.h>

/// 1 when ccrc32c_advance can run on this CPU, 0 otherwise.
int ccrc32c_available(void);

/// Advances a CRC-32C register (not inverted) over `count` bytes at `bytes`.
/// Call only when ccrc32c_available() returned 1.
uint32_t ccrc32c_advance(uint32_t crc, const void *bytes, size_t count);

#endif
