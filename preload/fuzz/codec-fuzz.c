/*
 * libFuzzer target `adapter`: the preload adapter's frame codec
 * (preload/vmm-codec.h, the very functions libpostcopy-vmm.so runs) on
 * an arbitrary byte stream, as postcopyd's end of the VMM socket could
 * send it. Built and run by scripts/fuzz.sh (make fuzz-adapter) with
 * -fsanitize=fuzzer,address,undefined; docs/fuzzing.md.
 *
 * Input: the layout of the Swift `frames` target (Sources/PostcopyFuzz/
 * FrameFuzzer.swift), so that its corpus, made by the Swift encoder,
 * seeds this one as it is:
 *
 *     byte 0     options: bit 0 repairs each whole frame's checksum
 *                before decoding (so mutations get past it); the others
 *                are the Swift target's and ignored here
 *     bytes 1-9  the Swift target's split seed and region: ignored
 *     the rest   the stream
 *
 * Frames are decoded one after another as receive_frame does (header,
 * then payload, then checksum) until one is refused or the stream ends;
 * each accepted frame goes where the adapter sends it (VMM_OFFER to
 * decode_offer, ERROR to error_code/error_text and the adapter's report).
 *
 * Properties checked besides "no sanitizer report": an accepted header
 * announces a payload that fits `struct frame`; every accepted frame is what encode_frame makes of its type and payload,
 * byte for byte; an offer decode_offer takes has a page size of 4 KiB or
 * 2 MiB and a region and file offset in whole pages; an ERROR's text lies
 * inside its payload; the source VMM's offer, made from the stream's
 * bytes, has its fields where the header says.
 */
#include <stdio.h>
#include <stdlib.h>

#include "../vmm-codec.h"

enum { PREFIX_BYTES = 10, REPAIR_CHECKSUMS = 1 };

/* Stops the process with the broken property, which libFuzzer reports as a crash. */
#define REQUIRE(condition, ...)                                                   \
    do {                                                                          \
        if (!(condition)) {                                                       \
            fprintf(stderr, "fuzz property broken: " __VA_ARGS__);                \
            fputc('\n', stderr);                                                  \
            abort();                                                              \
        }                                                                         \
    } while (0)

/* Rewrites the checksum of every whole frame in `stream`, as the Swift
 * target's repairFrameChecksums does: frames are walked by their announced
 * lengths, whatever else their headers say. */
static void repair_checksums(uint8_t *stream, size_t size)
{
    size_t at = 0;
    while (size - at >= CPC_WIRE_HEADER_BYTES) {
        uint32_t length = get32(stream + at + CPC_WIRE_HEADER_LENGTH_OFFSET);
        if (length > size - at - CPC_WIRE_HEADER_BYTES)
            return;
        uint8_t *header = stream + at;
        put32(header + CPC_WIRE_HEADER_CHECKSUM_OFFSET,
              frame_checksum(header, header + CPC_WIRE_HEADER_BYTES, length));
        at += CPC_WIRE_HEADER_BYTES + (size_t)length;
    }
}

static void check_offer(const struct frame *frame)
{
    struct offer offer;
    int rc = decode_offer(frame, &offer);
    REQUIRE(rc == 0 || rc == -EINVAL, "decode_offer of an accepted VMM_OFFER returned %d", rc);
    if (rc == 0) {
        REQUIRE(offer.page_size == CPC_WIRE_PAGE_BYTES || offer.page_size == CPC_WIRE_HUGE_PAGE_BYTES,
                "offer taken with a page size of %llu", (unsigned long long)offer.page_size);
        REQUIRE(offer.region_size > 0 && offer.region_size % offer.page_size == 0
                    && offer.file_offset % offer.page_size == 0,
                "offer taken of %llu bytes at %llu", (unsigned long long)offer.region_size,
                (unsigned long long)offer.file_offset);
    }
}

static void check_error(const struct frame *frame)
{
    int length = error_text_length(frame);
    const char *text = error_text(frame);
    REQUIRE(length >= 0 && length <= CPC_WIRE_ERROR_MAX_TEXT, "ERROR text of %d bytes", length);
    REQUIRE((const uint8_t *)text + length <= frame->payload + frame->length, "ERROR text past its payload");
    /* What the adapter says of it (report_error_frame, say_discarded). */
    char line[1400];
    unsigned code = error_code(frame);
    snprintf(line, sizeof line, "postcopyd sent ERROR %u (%s): %.*s", code, error_name(code), length, text);
}

/* The adapter's offer to the agent, from `bytes`: its fields where the wire's definition puts them. */
static void check_source_offer(const uint8_t *bytes, size_t size)
{
    static uint8_t out[CODEC_SOURCE_OFFER_MAX_BYTES];
    int armed = size > 0 && bytes[0] & 1;
    uint64_t address = size >= 8 ? get64(bytes) : 0, length = size >= 16 ? get64(bytes + 8) : 0;
    size_t count = encode_source_offer(out, armed, address, length, (const char *)bytes, size);
    size_t reason = armed ? 0 : size < CPC_WIRE_SOURCE_OFFER_MAX_REASON ? size : CPC_WIRE_SOURCE_OFFER_MAX_REASON;
    REQUIRE(count == CPC_WIRE_SOURCE_OFFER_HEADER_BYTES + reason, "source offer of %zu bytes", count);
    REQUIRE(get32(out + CPC_WIRE_SOURCE_OFFER_MAGIC_OFFSET) == CPC_WIRE_SOURCE_OFFER_MAGIC
                && get16(out + CPC_WIRE_SOURCE_OFFER_VERSION_OFFSET) == CPC_WIRE_SOURCE_OFFER_VERSION
                && get16(out + CPC_WIRE_SOURCE_OFFER_STATUS_OFFSET)
                       == (armed ? CPC_WIRE_SOURCE_OFFER_ARMED : CPC_WIRE_SOURCE_OFFER_UNAVAILABLE)
                && get64(out + CPC_WIRE_SOURCE_OFFER_ADDRESS_OFFSET) == (armed ? address : 0)
                && get64(out + CPC_WIRE_SOURCE_OFFER_LENGTH_OFFSET) == (armed ? length : 0)
                && get16(out + CPC_WIRE_SOURCE_OFFER_REASON_LENGTH_OFFSET) == reason
                && memcmp(out + CPC_WIRE_SOURCE_OFFER_HEADER_BYTES, bytes, reason) == 0,
            "source offer fields are not where postcopy_wire.h puts them");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < PREFIX_BYTES)
        return 0;
    int repair = data[0] & REPAIR_CHECKSUMS;
    size -= PREFIX_BYTES;
    /* A copy of the stream's own size, so that ASan sees any read past it. */
    uint8_t *stream = malloc(size ? size : 1);
    if (!stream)
        return 0;
    memcpy(stream, data + PREFIX_BYTES, size);
    if (repair)
        repair_checksums(stream, size);

    static struct frame frame;
    static uint8_t encoded[CPC_WIRE_HEADER_BYTES + CODEC_MAX_PAYLOAD];
    size_t at = 0;
    while (size - at >= CPC_WIRE_HEADER_BYTES) {
        const uint8_t *header = stream + at;
        frame.fd = -1;
        if (decode_header(header, &frame) < 0)
            break;
        REQUIRE(frame.length <= sizeof frame.payload, "accepted a header announcing %u bytes", frame.length);
        if (frame.length > size - at - CPC_WIRE_HEADER_BYTES)
            break; /* the stream ends inside the payload */
        memcpy(frame.payload, header + CPC_WIRE_HEADER_BYTES, frame.length);
        if (!checksum_matches(header, &frame))
            break;
        size_t count = encode_frame(encoded, sizeof encoded, frame.type, frame.payload, frame.length);
        REQUIRE(count == CPC_WIRE_HEADER_BYTES + (size_t)frame.length && memcmp(encoded, header, count) == 0,
                "type %u frame of %u bytes is not what encode_frame makes of it", frame.type, frame.length);
        if (frame.type == CPC_WIRE_TYPE_VMM_OFFER)
            check_offer(&frame);
        else if (frame.type == CPC_WIRE_TYPE_ERROR)
            check_error(&frame);
        at += count;
    }
    check_source_offer(stream, size);
    free(stream);
    return 0;
}
