/*
 * postcopy_wire.h: the wire protocol of docs/protocol.md, as C constants.
 *
 * The one definition of the wire for C. libpostcopy-vmm.so
 * (preload/postcopy-vmm.c) includes it instead of numbers of its own; the
 * Swift codec (PostcopyCore's Protocol/ and SourceTrackingOffer) is pinned
 * to it by Tests/PostcopyOSTests/WireDefinitionTests.swift, which fails
 * when a value here and its Swift counterpart differ, and when either side
 * has one the other lacks. A change to the wire changes both, and
 * docs/protocol.md.
 *
 * Constants only: no code, no includes, nothing a program that links only
 * libc cannot take. Every integer is little-endian on the wire; an
 * _OFFSET is a byte offset in the frame (header fields) or in the payload
 * (message fields), and the comment gives the field's width.
 */
#ifndef POSTCOPY_WIRE_H
#define POSTCOPY_WIRE_H

/* ---- frames (docs/protocol.md, "Frames") ---------------------------------- */

#define CPC_WIRE_MAGIC 0x59504350u /* the bytes "PCPY" read as a little-endian word */
#define CPC_WIRE_VERSION 5 /* 4 had one bulk stream: a HELLO of 62 bytes, without its last two */
#define CPC_WIRE_HEADER_BYTES 16
#define CPC_WIRE_HEADER_MAGIC_OFFSET 0     /* 4 bytes */
#define CPC_WIRE_HEADER_VERSION_OFFSET 4   /* 1 byte */
#define CPC_WIRE_HEADER_TYPE_OFFSET 5      /* 1 byte: a CPC_WIRE_TYPE_ below */
#define CPC_WIRE_HEADER_FLAGS_OFFSET 6     /* 2 bytes, 0: none are defined */
#define CPC_WIRE_HEADER_LENGTH_OFFSET 8    /* 4 bytes: the payload's length */
#define CPC_WIRE_HEADER_CHECKSUM_OFFSET 12 /* 4 bytes: CRC-32C of the first CHECKSUMMED_BYTES, then the payload */
#define CPC_WIRE_CHECKSUMMED_BYTES 12

/* CRC-32C (Castagnoli), bit-reflected; the register starts at INITIAL and
 * the result is XORed with it ("123456789" gives 0xE3069283). */
#define CPC_WIRE_CRC32C_POLYNOMIAL 0x82F63B78u
#define CPC_WIRE_CRC32C_INITIAL 0xFFFFFFFFu

/* ---- message types (docs/protocol.md, "Messages"): MessageType ----------- */

/* Between the source's agent and postcopyd (TCP). */
#define CPC_WIRE_TYPE_HELLO 1
#define CPC_WIRE_TYPE_WELCOME 2
#define CPC_WIRE_TYPE_PAGES 3
#define CPC_WIRE_TYPE_ZERO_PAGES 4
#define CPC_WIRE_TYPE_ROUND_END 5
#define CPC_WIRE_TYPE_DIRTY_BITMAP 6
#define CPC_WIRE_TYPE_SWITCHOVER 7
#define CPC_WIRE_TYPE_RESUMED 8
#define CPC_WIRE_TYPE_PAGE_REQUEST 9
#define CPC_WIRE_TYPE_COMPLETE 10
#define CPC_WIRE_TYPE_ERROR 11     /* also on the VMM socket */
#define CPC_WIRE_TYPE_HEARTBEAT 12 /* also on the VMM socket */
#define CPC_WIRE_TYPE_RESYNC 13
#define CPC_WIRE_TYPE_IMAGE_DIGEST 14
#define CPC_WIRE_TYPE_HANDED_OVER 15
#define CPC_WIRE_TYPE_DISCARD 16
/* Between postcopyd and the VMM (the unix socket). */
#define CPC_WIRE_TYPE_VMM_OFFER 32
#define CPC_WIRE_TYPE_VMM_ATTACH 33
#define CPC_WIRE_TYPE_VMM_RESUME 34
#define CPC_WIRE_TYPE_VMM_COMPLETE 35
#define CPC_WIRE_TYPE_VMM_HANDBACK 36
#define CPC_WIRE_TYPE_VMM_REATTACH 37
#define CPC_WIRE_TYPE_VMM_RESUMED 38

/* ---- ERROR: its codes (ErrorCode) and payload ---------------------------- */

#define CPC_WIRE_CODE_PROTOCOL 1
#define CPC_WIRE_CODE_INCOMPATIBLE 2
#define CPC_WIRE_CODE_OUT_OF_RANGE 3
#define CPC_WIRE_CODE_CHECKSUM 4
#define CPC_WIRE_CODE_UNEXPECTED_MESSAGE 5
#define CPC_WIRE_CODE_INTERNAL 6
#define CPC_WIRE_CODE_CANCELLED 7
#define CPC_WIRE_CODE_PEER_LOST 8
#define CPC_WIRE_CODE_REFUSED 9
#define CPC_WIRE_CODE_DISCARDED 10

#define CPC_WIRE_ERROR_CODE_OFFSET 0 /* 2 bytes: a CPC_WIRE_CODE_ */
#define CPC_WIRE_ERROR_TEXT_OFFSET 2 /* the rest: UTF-8, up to ERROR_MAX_TEXT bytes */
#define CPC_WIRE_ERROR_MAX_TEXT 1024

/* ---- limits ---------------------------------------------------------------- */

/* The unit of every page index, and the two page sizes a region may have. */
#define CPC_WIRE_PAGE_BYTES 4096
#define CPC_WIRE_HUGE_PAGE_BYTES 2097152
/* The largest payload a header may announce: on the agent's connections by
 * default (one PAGES frame of 1024 pages and then some), and on the VMM
 * socket. */
#define CPC_WIRE_MAX_PAYLOAD 4259840
#define CPC_WIRE_VMM_MAX_PAYLOAD 4096
/* The image digest (IMAGE_DIGEST, VMM_COMPLETE from postcopyd): SHA-256. */
#define CPC_WIRE_DIGEST_BYTES 32
/* The most bulk streams a migration may have (HELLO's bulkStreams). */
#define CPC_WIRE_MAX_BULK_STREAMS 8

/* ---- HELLO, the agent's first frame on each TCP connection ---------------- */

#define CPC_WIRE_HELLO_BYTES 64
#define CPC_WIRE_HELLO_BULK_STREAMS_OFFSET 62 /* 1 byte: 1 .. MAX_BULK_STREAMS, the migration's bulk streams */
#define CPC_WIRE_HELLO_STREAM_INDEX_OFFSET 63 /* 1 byte: which bulk stream (0 on the urgent connection) */

/* ---- the VMM messages' payloads -------------------------------------------- */

#define CPC_WIRE_VMM_OFFER_BYTES 20
#define CPC_WIRE_VMM_OFFER_REGION_SIZE_OFFSET 0 /* 8 bytes */
#define CPC_WIRE_VMM_OFFER_PAGE_SIZE_OFFSET 8   /* 4 bytes: PAGE_BYTES or HUGE_PAGE_BYTES */
#define CPC_WIRE_VMM_OFFER_FILE_OFFSET_OFFSET 12 /* 8 bytes */

/* VMM_REATTACH repeats VMM_ATTACH's payload. */
#define CPC_WIRE_VMM_ATTACH_BYTES 24
#define CPC_WIRE_VMM_ATTACH_GUEST_BASE_OFFSET 0    /* 8 bytes */
#define CPC_WIRE_VMM_ATTACH_FEATURES_OFFSET 8      /* 8 bytes: UFFD_FEATURE_* */
#define CPC_WIRE_VMM_ATTACH_REGISTER_MODE_OFFSET 16 /* 8 bytes: UFFDIO_REGISTER_MODE_* */
#define CPC_WIRE_VMM_REATTACH_BYTES 24

#define CPC_WIRE_VMM_RESUME_BYTES 0
#define CPC_WIRE_VMM_RESUMED_BYTES 0
/* From postcopyd: the image digest; the VMM's answer is empty. */
#define CPC_WIRE_VMM_COMPLETE_BYTES 32
#define CPC_WIRE_VMM_COMPLETE_ANSWER_BYTES 0
#define CPC_WIRE_HEARTBEAT_BYTES 0

#define CPC_WIRE_VMM_HANDBACK_BYTES 4
#define CPC_WIRE_VMM_HANDBACK_KIND_OFFSET 0 /* 4 bytes: a CPC_WIRE_HANDBACK_ (HandbackKind) */
#define CPC_WIRE_HANDBACK_RAM 1        /* the guest RAM file of VMM_OFFER */
#define CPC_WIRE_HANDBACK_PAGE_STATE 2 /* the page-state record of VMM_RESUME */

/* ---- the source VMM's offer (docs/protocol.md): SourceTrackingOffer ------- */

/* Not a frame: one message on the source host's dirty-log socket. */
#define CPC_WIRE_SOURCE_OFFER_MAGIC 0x50574350u /* the bytes "PCWP" read as a little-endian word */
#define CPC_WIRE_SOURCE_OFFER_VERSION 1
#define CPC_WIRE_SOURCE_OFFER_HEADER_BYTES 26
#define CPC_WIRE_SOURCE_OFFER_MAX_REASON 1024
#define CPC_WIRE_SOURCE_OFFER_MAGIC_OFFSET 0          /* 4 bytes */
#define CPC_WIRE_SOURCE_OFFER_VERSION_OFFSET 4        /* 2 bytes */
#define CPC_WIRE_SOURCE_OFFER_STATUS_OFFSET 6         /* 2 bytes */
#define CPC_WIRE_SOURCE_OFFER_ADDRESS_OFFSET 8        /* 8 bytes */
#define CPC_WIRE_SOURCE_OFFER_LENGTH_OFFSET 16        /* 8 bytes */
#define CPC_WIRE_SOURCE_OFFER_REASON_LENGTH_OFFSET 24 /* 2 bytes; the reason follows the header */
#define CPC_WIRE_SOURCE_OFFER_ARMED 0
#define CPC_WIRE_SOURCE_OFFER_UNAVAILABLE 1

#endif
