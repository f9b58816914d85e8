#!/usr/bin/env python3
"""postcopyd's end of the VMM socket, driven by hand, for adapter-test.sh.

Speaks the frame format of docs/protocol.md ("Frames") with the real
codec's rules: magic, version (postcopy_wire.h's), type, no flags,
length, CRC-32C. Steps wait for files to appear in WORKDIR, so the test
says when each happens; what happened is appended, one word a line, to
WORKDIR/fake.log.

After each VMM_RESUME it sends, it waits (up to 5 s) for the VMM's
VMM_RESUMED, as postcopyd does before it tells the source the guest
resumed: "resumed-acked" when it came, empty and without a descriptor;
otherwise a line "no-resumed-ack: why", and it goes on as if it had.

  fake-daemon.py SOCKET RAM SIZE WORKDIR error-in-postcopy
      offers RAM (SIZE bytes, 4 KiB pages), takes VMM_ATTACH, sends
      VMM_RESUME (a memfd as the page-state record), then at go-error sends
      ERROR (cancelled) and closes, as a postcopyd stopped during postcopy
      does, and goes away; at go-reattach it listens again and takes a
      reattachment (VMM_HANDBACK x2, VMM_REATTACH) and at go-complete sends
      VMM_RESUME and VMM_COMPLETE and reads the answer.
  fake-daemon.py SOCKET RAM SIZE WORKDIR discarded-in-postcopy
      offers, takes VMM_ATTACH, sends VMM_RESUME, then at go-discard sends
      ERROR (discarded) and closes, as postcopyd does when the hand-over
      failed and the source runs the guest again; it goes on listening,
      logging "connected" for each connection (a reattachment it must not
      get).
  fake-daemon.py SOCKET RAM SIZE WORKDIR discarded-before-resume
      the same, but ERROR (discarded) right after VMM_ATTACH, before any
      VMM_RESUME.
  fake-daemon.py SOCKET RAM SIZE WORKDIR offer
      offers RAM to each connection, logging "connected".
"""
import os
import socket
import struct
import sys
import time



def wire_constants():
    """The CPC_WIRE_ constants of the wire's one definition, the C header
    postcopyd and the adapter are built with (a `#define NAME value` each):
    a copy beside this script, else the repository's."""
    here = os.path.dirname(os.path.abspath(__file__))
    header = os.path.join(here, "postcopy_wire.h")
    if not os.path.exists(header):
        header = os.path.join(here, "..", "..", "..", "Sources", "CPostcopy", "include", "postcopy_wire.h")
    constants = {}
    with open(header) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "#define" and fields[1].startswith("CPC_WIRE_"):
                constants[fields[1][len("CPC_WIRE_"):]] = int(fields[2].rstrip("uU"), 0)
    return constants


WIRE = wire_constants()
MAGIC, VERSION = WIRE["MAGIC"], WIRE["VERSION"]
ERROR, OFFER, ATTACH, RESUME, COMPLETE, HANDBACK, REATTACH, RESUMED = (
    WIRE["TYPE_" + name] for name in
    ("ERROR", "VMM_OFFER", "VMM_ATTACH", "VMM_RESUME", "VMM_COMPLETE", "VMM_HANDBACK", "VMM_REATTACH", "VMM_RESUMED"))
CANCELLED, DISCARDED = WIRE["CODE_CANCELLED"], WIRE["CODE_DISCARDED"]


def crc32c(data, crc=WIRE["CRC32C_INITIAL"]):
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (WIRE["CRC32C_POLYNOMIAL"] & -(crc & 1))
    return crc


def send(sock, kind, payload=b"", fd=None):
    header = struct.pack("<IBBHI", MAGIC, VERSION, kind, 0, len(payload))
    crc = crc32c(payload, crc32c(header)) ^ 0xFFFFFFFF
    frame = header + struct.pack("<I", crc) + payload
    if fd is None:
        sock.sendall(frame)
    else:
        socket.send_fds(sock, [frame], [fd])


def receive_exact(sock, count, fds):
    data = b""
    while len(data) < count:
        chunk, got, _, _ = socket.recv_fds(sock, count - len(data), 4)
        fds.extend(got)
        if not chunk:
            raise EOFError("closed")
        data += chunk
    return data


def receive(sock):
    fds = []
    header = receive_exact(sock, 16, fds)
    magic, version, kind, flags, length, crc = struct.unpack("<IBBHII", header)
    payload = receive_exact(sock, length, fds)
    if magic != MAGIC or version != VERSION or flags or crc != crc32c(payload, crc32c(header[:12])) ^ 0xFFFFFFFF:
        raise ValueError("malformed frame")
    return kind, payload, fds


def log(workdir, word):
    with open(os.path.join(workdir, "fake.log"), "a") as f:
        f.write(word + "\n")


def wait_for(workdir, name):
    while not os.path.exists(os.path.join(workdir, name)):
        time.sleep(0.02)


def resume(conn, record, workdir):
    """VMM_RESUME with the record, then the VMM's VMM_RESUMED."""
    send(conn, RESUME, b"", record)
    conn.settimeout(5)
    try:
        kind, payload, fds = receive(conn)
    except socket.timeout:
        log(workdir, "no-resumed-ack: nothing within 5 s of VMM_RESUME")
        return
    except (EOFError, OSError, ValueError) as error:
        log(workdir, "no-resumed-ack: %s after VMM_RESUME" % error)
        return
    finally:
        conn.settimeout(None)
    for fd in fds:
        os.close(fd)
    if kind != RESUMED or payload or fds:
        log(workdir, "no-resumed-ack: frame type %d (%d bytes, %d descriptors) instead of VMM_RESUMED"
            % (kind, len(payload), len(fds)))
    else:
        log(workdir, "resumed-acked")


def attach(listener, offer, ram_fd, workdir):
    conn, _ = listener.accept()
    send(conn, OFFER, offer, ram_fd)
    kind, payload, fds = receive(conn)
    assert kind == ATTACH and len(fds) == 1, (kind, fds)
    log(workdir, "attached")
    return conn


def fail(conn, code, text):
    """ERROR with `code` and `text`, then the socket closes."""
    send(conn, ERROR, struct.pack("<H", code) + text)
    conn.shutdown(socket.SHUT_RDWR)
    conn.close()


def discarded(listener, offer, ram_fd, workdir, resumed):
    conn = attach(listener, offer, ram_fd, workdir)
    if resumed:
        resume(conn, os.memfd_create("page-state"), workdir)
        log(workdir, "resumed")
        wait_for(workdir, "go-discard")
    fail(conn, DISCARDED, b"the hand-over failed: the destination QEMU did not load the device state")
    log(workdir, "discard-sent")
    # Someone is there to take a reattachment; the VMM must not try.
    while True:
        conn, _ = listener.accept()
        log(workdir, "connected")
        conn.close()


def main():
    path, ram, size, workdir, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    ram_fd = os.open(ram, os.O_RDWR)
    offer = struct.pack("<QIQ", size, 4096, 0)
    log(workdir, "listening")
    if mode == "offer":
        while True:
            conn, _ = listener.accept()
            log(workdir, "connected")
            try:
                send(conn, OFFER, offer, ram_fd)
            except OSError:
                pass
            conn.close()
    if mode in ("discarded-in-postcopy", "discarded-before-resume"):
        discarded(listener, offer, ram_fd, workdir, mode == "discarded-in-postcopy")
    assert mode == "error-in-postcopy", mode
    conn = attach(listener, offer, ram_fd, workdir)
    record = os.memfd_create("page-state")
    resume(conn, record, workdir)
    log(workdir, "resumed")
    wait_for(workdir, "go-error")
    fail(conn, CANCELLED, b"stopped by SIGTERM during postcopy")
    log(workdir, "error-sent")
    # No postcopyd at all until go-reattach, then a restarted one.
    listener.close()
    os.unlink(path)
    wait_for(workdir, "go-reattach")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    conn, _ = listener.accept()
    kinds = []
    for _ in range(3):
        kind, payload, fds = receive(conn)
        kinds.append((kind, len(fds)))
    if kinds == [(HANDBACK, 1), (HANDBACK, 1), (REATTACH, 1)]:
        log(workdir, "handed-back")
    else:
        log(workdir, "bad-handback %r" % kinds)
    wait_for(workdir, "go-complete")
    resume(conn, record, workdir)
    send(conn, COMPLETE, bytes(32))
    kind, payload, fds = receive(conn)
    log(workdir, "complete-answered" if kind == COMPLETE else "answered %d" % kind)
    time.sleep(60)


if __name__ == "__main__":
    main()
