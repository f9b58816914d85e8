#!/usr/bin/env python3
"""postcopyd's end of the VMM socket, driven by hand, for adapter-test.sh.

Speaks the frame format of docs/protocol.md ("Frames") with the real
codec's rules: magic, version 3, type, no flags, length, CRC-32C. Steps
wait for files to appear in WORKDIR, so the test says when each happens;
what happened is appended, one word a line, to WORKDIR/fake.log.

  fake-daemon.py SOCKET RAM SIZE WORKDIR error-in-postcopy
      offers RAM (SIZE bytes, 4 KiB pages), takes VMM_ATTACH, sends
      VMM_RESUME (a memfd as the page-state record), then at go-error sends
      ERROR (cancelled) and closes, as a postcopyd stopped during postcopy
      does, and goes away; at go-reattach it listens again and takes a reattachment (VMM_HANDBACK x2, VMM_REATTACH) and at
      go-complete sends VMM_RESUME and VMM_COMPLETE and reads the answer.
  fake-daemon.py SOCKET RAM SIZE WORKDIR offer
      offers RAM to each connection, logging "connected".
"""
import os
import socket
import struct
import sys
import time

MAGIC, VERSION = 0x59504350, 3
ERROR, OFFER, ATTACH, RESUME, COMPLETE, HANDBACK, REATTACH = 11, 32, 33, 34, 35, 36, 37


def crc32c(data, crc=0xFFFFFFFF):
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
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
    assert mode == "error-in-postcopy", mode
    conn, _ = listener.accept()
    send(conn, OFFER, offer, ram_fd)
    kind, payload, fds = receive(conn)
    assert kind == ATTACH and len(fds) == 1, (kind, fds)
    log(workdir, "attached")
    record = os.memfd_create("page-state")
    send(conn, RESUME, b"", record)
    log(workdir, "resumed")
    wait_for(workdir, "go-error")
    text = b"stopped by SIGTERM during postcopy"
    send(conn, ERROR, struct.pack("<H", 7) + text)
    log(workdir, "error-sent")
    conn.shutdown(socket.SHUT_RDWR)
    conn.close()
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
    send(conn, RESUME, b"", record)
    send(conn, COMPLETE, bytes(32))
    kind, payload, fds = receive(conn)
    log(workdir, "complete-answered" if kind == COMPLETE else "answered %d" % kind)
    time.sleep(60)


if __name__ == "__main__":
    main()
