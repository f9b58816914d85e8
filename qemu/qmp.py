#!/usr/bin/env python3
"""A minimal QMP client for the QEMU migration flow (qemu/migrate.sh).

    qmp.py SOCKET COMMAND [ARGUMENTS-AS-JSON]   run one command, print its
                                               "return" as JSON
    qmp.py SOCKET wait-migration [SECONDS]     poll query-migrate until the
                                               migration completes (exit 0)
                                               or fails (exit 1)
    qmp.py SOCKET wait-status STATUS [SECONDS] poll query-status until the
                                               VM's status is STATUS
    qmp.py SOURCE hand-over DESTINATION URI    migrate the device state from
                                               the paused source to URI (the
                                               destination's migrate-incoming),
                                               wait for both ends, then 'cont'
                                               the destination; prints the
                                               times as JSON

Exit status 1 with the error QEMU gave when a command fails.
"""
import json
import socket
import sys
import time


class QMPError(Exception):
    pass


class QMP:
    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""
        greeting = self._message()
        if "QMP" not in greeting:
            raise QMPError(f"{path}: not a QMP socket (greeting {greeting})")
        self.execute("qmp_capabilities")

    def _message(self):
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QMPError("QEMU closed the QMP socket")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command, arguments=None):
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._message()
            if "event" in message:
                continue
            if "error" in message:
                error = message["error"]
                raise QMPError(f"{command}: {error.get('class')}: {error.get('desc')}")
            return message.get("return")


def wait(qmp, query, done, failed, seconds):
    deadline = time.monotonic() + seconds
    while True:
        answer = qmp.execute(query)
        if done(answer):
            return answer
        if failed(answer):
            raise QMPError(f"{query}: {json.dumps(answer)}")
        if time.monotonic() > deadline:
            raise QMPError(f"{query}: still {json.dumps(answer)} after {seconds:.0f} s")
        time.sleep(0.01)


def hand_over(source, destination, uri):
    """The device state alone: the guest's RAM is shared (x-ignore-shared)."""
    started = time.monotonic()
    source.execute("migrate", {"uri": uri})
    migrated = wait(source, "query-migrate", lambda a: a.get("status") == "completed",
                    lambda a: a.get("status") in ("failed", "cancelled"), 120)
    wait(destination, "query-status", lambda a: a.get("status") == "paused",
         lambda a: a.get("status") not in ("inmigrate", "paused", "prelaunch"), 120)
    loaded = time.monotonic()
    destination.execute("cont")
    done = time.monotonic()
    return {"migrateMs": round((loaded - started) * 1000, 1), "contMs": round((done - loaded) * 1000, 1),
            "totalMs": round((done - started) * 1000, 1), "qemuDowntimeMs": migrated.get("downtime"),
            "sourceStatus": source.execute("query-status").get("status")}


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, command = argv[1], argv[2]
    try:
        qmp = QMP(path)
        if command == "wait-migration":
            seconds = float(argv[3]) if len(argv) > 3 else 300
            answer = wait(qmp, "query-migrate", lambda a: a.get("status") == "completed",
                          lambda a: a.get("status") in ("failed", "cancelled"), seconds)
        elif command == "hand-over":
            answer = hand_over(qmp, QMP(argv[3]), argv[4])
        elif command == "wait-status":
            seconds = float(argv[4]) if len(argv) > 4 else 60
            answer = wait(qmp, "query-status", lambda a: a.get("status") == argv[3],
                          lambda a: False, seconds)
        else:
            arguments = json.loads(argv[3]) if len(argv) > 3 else None
            answer = qmp.execute(command, arguments)
    except (OSError, QMPError, json.JSONDecodeError) as error:
        print(f"qmp: {path}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
