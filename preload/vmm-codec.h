/*
 * The frame codec of libpostcopy-vmm.so: the frames it sends and receives
 * on postcopyd's VMM socket (docs/protocol.md, "Frames" and "Messages"),
 * and the source VMM's offer it sends the agent. Pure functions on bytes,
 * no system calls, so that the libFuzzer target preload/fuzz/codec-fuzz.c
 * runs exactly what the adapter runs. The numbers are those of the wire's
 * definition, Sources/CPostcopy/include/postcopy_wire.h.
 *
 * Everything is static: nothing of it is exported into the VMM, whose own
 * symbols (QEMU has a crc32c) must not be interposed.
 */
#ifndef POSTCOPY_VMM_CODEC_H
#define POSTCOPY_VMM_CODEC_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "postcopy_wire.h"

enum {
    /* The largest payload postcopyd sends a VMM: ERROR with the longest text. */
    CODEC_MAX_PAYLOAD = CPC_WIRE_ERROR_TEXT_OFFSET + CPC_WIRE_ERROR_MAX_TEXT,
    /* The largest payload the adapter sends: VMM_ATTACH and VMM_REATTACH. */
    CODEC_MAX_SENT = CPC_WIRE_VMM_ATTACH_BYTES,
    CODEC_SOURCE_OFFER_MAX_BYTES = CPC_WIRE_SOURCE_OFFER_HEADER_BYTES + CPC_WIRE_SOURCE_OFFER_MAX_REASON,
};
_Static_assert(CODEC_MAX_PAYLOAD <= CPC_WIRE_VMM_MAX_PAYLOAD, "postcopyd's VMM socket takes the longest ERROR");
_Static_assert(CPC_WIRE_VMM_REATTACH_BYTES == CPC_WIRE_VMM_ATTACH_BYTES, "VMM_REATTACH repeats VMM_ATTACH");

struct frame {
    uint8_t type;
    uint32_t length;
    uint8_t payload[CODEC_MAX_PAYLOAD];
    int fd; /* passed with the frame, or -1 */
};

static inline void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t get64(const uint8_t *p)
{
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* CRC-32C, bit by bit: the frames here are a few dozen bytes. */
static inline uint32_t crc32c_update(uint32_t crc, const uint8_t *bytes, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        crc ^= bytes[i];
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (CPC_WIRE_CRC32C_POLYNOMIAL & (0u - (crc & 1u)));
    }
    return crc;
}

/* The checksum a frame carries: its first header bytes, then its payload. */
static inline uint32_t frame_checksum(const uint8_t header[CPC_WIRE_HEADER_BYTES], const uint8_t *payload,
                                      uint32_t length)
{
    uint32_t crc = crc32c_update(CPC_WIRE_CRC32C_INITIAL, header, CPC_WIRE_CHECKSUMMED_BYTES);
    return crc32c_update(crc, payload, length) ^ CPC_WIRE_CRC32C_INITIAL;
}

/* Writes one whole frame into `out` (room for `capacity` bytes) and returns
 * its length; 0 when it does not fit. */
static inline size_t encode_frame(uint8_t *out, size_t capacity, uint8_t type, const uint8_t *payload,
                                  uint32_t length)
{
    if (capacity < CPC_WIRE_HEADER_BYTES || length > capacity - CPC_WIRE_HEADER_BYTES)
        return 0;
    put32(out + CPC_WIRE_HEADER_MAGIC_OFFSET, CPC_WIRE_MAGIC);
    out[CPC_WIRE_HEADER_VERSION_OFFSET] = CPC_WIRE_VERSION;
    out[CPC_WIRE_HEADER_TYPE_OFFSET] = type;
    put16(out + CPC_WIRE_HEADER_FLAGS_OFFSET, 0);
    put32(out + CPC_WIRE_HEADER_LENGTH_OFFSET, length);
    if (length > 0)
        memcpy(out + CPC_WIRE_HEADER_BYTES, payload, length);
    put32(out + CPC_WIRE_HEADER_CHECKSUM_OFFSET, frame_checksum(out, out + CPC_WIRE_HEADER_BYTES, length));
    return CPC_WIRE_HEADER_BYTES + (size_t)length;
}

/* Whether postcopyd may send a frame of `type` with `length` bytes of
 * payload: the codec's length rule (docs/protocol.md, "Messages") for each
 * frame this adapter receives. VMM_COMPLETE from postcopyd carries the
 * source's image digest, which the adapter does not check (its answer is
 * empty); VMM_RESUME carries only the page-state record's descriptor. */
static inline int payload_length_fits(uint8_t type, uint32_t length)
{
    switch (type) {
    case CPC_WIRE_TYPE_VMM_OFFER:
        return length == CPC_WIRE_VMM_OFFER_BYTES;
    case CPC_WIRE_TYPE_VMM_RESUME:
        return length == CPC_WIRE_VMM_RESUME_BYTES;
    case CPC_WIRE_TYPE_HEARTBEAT:
        return length == CPC_WIRE_HEARTBEAT_BYTES;
    case CPC_WIRE_TYPE_VMM_COMPLETE:
        return length == CPC_WIRE_VMM_COMPLETE_BYTES;
    case CPC_WIRE_TYPE_ERROR:
        return length >= CPC_WIRE_ERROR_TEXT_OFFSET && length <= CODEC_MAX_PAYLOAD;
    default:
        return 1; /* not a frame postcopyd sends a VMM: the caller says so */
    }
}

/* The checks a header passes before any of its payload is read: magic,
 * version, flags, a payload that fits `struct frame`, and the length its
 * type requires. 0 with frame->type and frame->length set, or -EPROTO. */
static inline int decode_header(const uint8_t header[CPC_WIRE_HEADER_BYTES], struct frame *frame)
{
    frame->type = header[CPC_WIRE_HEADER_TYPE_OFFSET];
    frame->length = get32(header + CPC_WIRE_HEADER_LENGTH_OFFSET);
    if (get32(header + CPC_WIRE_HEADER_MAGIC_OFFSET) != CPC_WIRE_MAGIC || header[CPC_WIRE_HEADER_VERSION_OFFSET] != CPC_WIRE_VERSION
        || get16(header + CPC_WIRE_HEADER_FLAGS_OFFSET) != 0 || frame->length > CODEC_MAX_PAYLOAD
        || !payload_length_fits(frame->type, frame->length))
        return -EPROTO;
    return 0;
}

/* Whether the checksum `header` carries is that of the header and the
 * frame's payload, once the payload is in. */
static inline int checksum_matches(const uint8_t header[CPC_WIRE_HEADER_BYTES], const struct frame *frame)
{
    return frame_checksum(header, frame->payload, frame->length) == get32(header + CPC_WIRE_HEADER_CHECKSUM_OFFSET);
}

/* What VMM_OFFER offers. */
struct offer {
    uint64_t region_size, page_size, file_offset;
};

/* VMM_OFFER's fields: 0, or -EINVAL when they make no sense (a page size
 * neither 4 KiB nor 2 MiB, an empty region, a size or an offset that is
 * not a whole number of pages), with `offer` filled in all the same for
 * the caller to say so; -EPROTO for any other frame. */
static inline int decode_offer(const struct frame *frame, struct offer *offer)
{
    if (frame->type != CPC_WIRE_TYPE_VMM_OFFER || frame->length != CPC_WIRE_VMM_OFFER_BYTES)
        return -EPROTO;
    offer->region_size = get64(frame->payload + CPC_WIRE_VMM_OFFER_REGION_SIZE_OFFSET);
    offer->page_size = get32(frame->payload + CPC_WIRE_VMM_OFFER_PAGE_SIZE_OFFSET);
    offer->file_offset = get64(frame->payload + CPC_WIRE_VMM_OFFER_FILE_OFFSET_OFFSET);
    if ((offer->page_size != CPC_WIRE_PAGE_BYTES && offer->page_size != CPC_WIRE_HUGE_PAGE_BYTES)
        || offer->region_size == 0 || offer->region_size % offer->page_size || offer->file_offset % offer->page_size)
        return -EINVAL;
    return 0;
}

/* The payloads the adapter sends. */
static inline void encode_attach(uint8_t payload[CPC_WIRE_VMM_ATTACH_BYTES], uint64_t guest_base, uint64_t features,
                                 uint64_t register_mode)
{
    put64(payload + CPC_WIRE_VMM_ATTACH_GUEST_BASE_OFFSET, guest_base);
    put64(payload + CPC_WIRE_VMM_ATTACH_FEATURES_OFFSET, features);
    put64(payload + CPC_WIRE_VMM_ATTACH_REGISTER_MODE_OFFSET, register_mode);
}

static inline void encode_handback(uint8_t payload[CPC_WIRE_VMM_HANDBACK_BYTES], uint32_t kind)
{
    put32(payload + CPC_WIRE_VMM_HANDBACK_KIND_OFFSET, kind);
}

/* An ERROR frame's code, and its text (not NUL-terminated); 0 and "" for
 * any other frame. */
static inline unsigned error_code(const struct frame *frame)
{
    if (frame->type != CPC_WIRE_TYPE_ERROR || frame->length < CPC_WIRE_ERROR_TEXT_OFFSET)
        return 0;
    return get16(frame->payload + CPC_WIRE_ERROR_CODE_OFFSET);
}

static inline int error_text_length(const struct frame *frame)
{
    if (frame->type != CPC_WIRE_TYPE_ERROR || frame->length < CPC_WIRE_ERROR_TEXT_OFFSET)
        return 0;
    return (int)(frame->length - CPC_WIRE_ERROR_TEXT_OFFSET);
}

static inline const char *error_text(const struct frame *frame)
{
    return (const char *)frame->payload + CPC_WIRE_ERROR_TEXT_OFFSET;
}

/* The code's name, as docs/protocol.md's table of ERROR codes gives it. */
static inline const char *error_name(unsigned code)
{
    static const char *const names[] = {
        [CPC_WIRE_CODE_PROTOCOL] = "protocol",
        [CPC_WIRE_CODE_INCOMPATIBLE] = "incompatible",
        [CPC_WIRE_CODE_OUT_OF_RANGE] = "outOfRange",
        [CPC_WIRE_CODE_CHECKSUM] = "checksum",
        [CPC_WIRE_CODE_UNEXPECTED_MESSAGE] = "unexpectedMessage",
        [CPC_WIRE_CODE_INTERNAL] = "internal",
        [CPC_WIRE_CODE_CANCELLED] = "cancelled",
        [CPC_WIRE_CODE_PEER_LOST] = "peerLost",
        [CPC_WIRE_CODE_REFUSED] = "refused",
        [CPC_WIRE_CODE_DISCARDED] = "discarded",
    };
    return code < sizeof names / sizeof names[0] && names[code] ? names[code] : "unknown code";
}

/* The source VMM's offer (docs/protocol.md, "The source VMM's offer") into
 * `out`; returns its length. Armed: the mapping [address, address+length);
 * else unavailable, for the first `reason_length` bytes of `reason` (at
 * most CPC_WIRE_SOURCE_OFFER_MAX_REASON of them are sent). */
static inline size_t encode_source_offer(uint8_t out[CODEC_SOURCE_OFFER_MAX_BYTES], int armed, uint64_t address,
                                         uint64_t length, const char *reason, size_t reason_length)
{
    size_t reason_bytes = armed ? 0
        : reason_length < CPC_WIRE_SOURCE_OFFER_MAX_REASON ? reason_length : CPC_WIRE_SOURCE_OFFER_MAX_REASON;
    put32(out + CPC_WIRE_SOURCE_OFFER_MAGIC_OFFSET, CPC_WIRE_SOURCE_OFFER_MAGIC);
    put16(out + CPC_WIRE_SOURCE_OFFER_VERSION_OFFSET, CPC_WIRE_SOURCE_OFFER_VERSION);
    put16(out + CPC_WIRE_SOURCE_OFFER_STATUS_OFFSET,
          armed ? CPC_WIRE_SOURCE_OFFER_ARMED : CPC_WIRE_SOURCE_OFFER_UNAVAILABLE);
    put64(out + CPC_WIRE_SOURCE_OFFER_ADDRESS_OFFSET, armed ? address : 0);
    put64(out + CPC_WIRE_SOURCE_OFFER_LENGTH_OFFSET, armed ? length : 0);
    put16(out + CPC_WIRE_SOURCE_OFFER_REASON_LENGTH_OFFSET, (uint16_t)reason_bytes);
    if (reason_bytes > 0)
        memcpy(out + CPC_WIRE_SOURCE_OFFER_HEADER_BYTES, reason, reason_bytes);
    return CPC_WIRE_SOURCE_OFFER_HEADER_BYTES + reason_bytes;
}

#endif
