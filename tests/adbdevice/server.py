"""A small Android test device that speaks the adb wire protocol on 127.0.0.1.

Run as a subprocess by the bench tests:

    python tests/adbdevice/server.py --root DIR [--port 0] [--model NAME] [--unauthorized]

It prints ``PORT <n>`` on stdout once it listens; the adb server then reaches it with
``adb connect 127.0.0.1:<n>``. It is a device, not a mock of a client library: the real
adb server talks to it over TCP exactly as it would to a phone in wireless debugging.

What it implements (protocol as in AOSP packages/modules/adb/protocol.txt, SERVICES.TXT,
SYNC.TXT):
- CNXN handshake without auth (or, with --unauthorized, AUTH tokens that are never
  accepted, so the adb server lists the device as "unauthorized");
- streams: OPEN / OKAY / WRTE / CLSE with one outstanding WRTE per stream;
- ``shell:CMD`` (raw output, then close) and ``shell,v2[,...]:CMD`` (stdout, stderr and
  exit-code packets);
- ``sync:`` with STAT, LIST, SEND, RECV and QUIT.

Commands run on the host with ``sh -c`` inside ``--root``: device paths under /data,
/sdcard and /storage are rewritten to ``ROOT/data`` and so on, and ``ROOT/system/bin``
(with a ``getprop`` of this device's properties) is first on PATH. Only the loopback
address is ever bound.

The device's "CPU": the host cannot run an ELF built for the phone, so a program that a
command runs by its path (first word, after ; & | or `taskset MASK`) runs with the host Python
when it is an ELF executable of this device's ABI (class and e_machine, as a phone's kernel
checks them) whose body is a zip application: an ELF header followed by a zip holding
__main__.py (Python runs a zip with data before it). That is how a downloaded
`benchmark_model`, checked as an ELF, still runs here. Other files (#! scripts) run as they are.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import socket
import struct
import subprocess
import sys
import threading
import zipfile

__all__ = ["TestDevice", "main"]

# Message commands: the four ASCII letters read as a little-endian uint32.
A_CNXN, A_AUTH, A_OPEN, A_OKAY, A_CLSE, A_WRTE = (
    struct.unpack("<I", c)[0] for c in (b"CNXN", b"AUTH", b"OPEN", b"OKAY", b"CLSE", b"WRTE"))
A_VERSION = 0x01000001          # skips payload checksums (adb >= 1.0.39 accepts 0)
MAX_PAYLOAD = 256 * 1024        # bytes per message we announce
AUTH_TOKEN, AUTH_SIGNATURE, AUTH_RSAPUBLICKEY = 1, 2, 3
SYNC_CHUNK = 64 * 1024          # bytes per sync DATA block (protocol maximum)
DEVICE_DIRS = ("data", "sdcard", "storage")   # device top-level dirs mapped into --root
# shell v2 packet ids
V2_STDIN, V2_STDOUT, V2_STDERR, V2_EXIT = 0, 1, 2, 3
# ABI -> (ELF class byte: 1 = 32-bit, 2 = 64-bit; e_machine) of the executables it runs.
ABI_ELF = {"arm64-v8a": (2, 183), "armeabi-v7a": (1, 40), "x86_64": (2, 62), "x86": (1, 3)}


def _header(cmd: int, arg0: int, arg1: int, payload: bytes) -> bytes:
    check = sum(payload) & 0xFFFFFFFF
    return struct.pack("<6I", cmd, arg0, arg1, len(payload), check, cmd ^ 0xFFFFFFFF)


class Stream:
    """One adb stream: data from the host arrives in a queue; writes wait for OKAY."""

    def __init__(self, conn: "Connection", local_id: int, remote_id: int):
        self.conn, self.local_id, self.remote_id = conn, local_id, remote_id
        self.inbox: queue.Queue[bytes | None] = queue.Queue()   # None = closed by host
        self.acked = threading.Semaphore(0)
        self.write_lock = threading.Lock()
        self.closed = threading.Event()
        self.proc: subprocess.Popen | None = None
        self._buf = b""

    def write(self, data: bytes) -> None:
        with self.write_lock:
            for i in range(0, len(data), self.conn.max_payload):
                if self.closed.is_set():
                    return
                self.conn.send(A_WRTE, self.local_id, self.remote_id, data[i:i + self.conn.max_payload])
                while not self.acked.acquire(timeout=0.2):   # one WRTE in flight at a time
                    if self.closed.is_set():
                        return

    def read_exact(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            chunk = self.inbox.get()
            if chunk is None:
                return None
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.conn.send(A_CLSE, self.local_id, self.remote_id)


class Connection:
    """One TCP connection from the adb server (one transport)."""

    def __init__(self, sock: socket.socket, device: "TestDevice"):
        self.sock, self.device = sock, device
        self.max_payload = 4096
        self.send_lock = threading.Lock()
        self.streams: dict[int, Stream] = {}
        self.next_id = 1

    def send(self, cmd: int, arg0: int, arg1: int, payload: bytes = b"") -> None:
        with self.send_lock:
            self.sock.sendall(_header(cmd, arg0, arg1, payload) + payload)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("adb server closed the connection")
            buf += chunk
        return buf

    def serve(self) -> None:
        try:
            while True:
                cmd, arg0, arg1, length, _check, _magic = struct.unpack("<6I", self._recv_exact(24))
                payload = self._recv_exact(length) if length else b""
                self.handle(cmd, arg0, arg1, payload)
        except (ConnectionError, OSError):
            pass
        finally:
            for s in list(self.streams.values()):
                s.closed.set()
                s.inbox.put(None)
                if s.proc and s.proc.poll() is None:
                    s.proc.kill()
            self.sock.close()

    def handle(self, cmd: int, arg0: int, arg1: int, payload: bytes) -> None:
        if cmd == A_CNXN:
            self.max_payload = min(arg1, MAX_PAYLOAD)
            if self.device.unauthorized:
                self.send(A_AUTH, AUTH_TOKEN, 0, os.urandom(20))
            else:
                self.send(A_CNXN, A_VERSION, MAX_PAYLOAD, self.device.banner())
        elif cmd == A_AUTH:
            # A signature is never valid here: ask again, as adbd does. A public key would
            # bring up the "Allow USB debugging?" prompt, which nobody answers.
            if arg0 == AUTH_SIGNATURE:
                self.send(A_AUTH, AUTH_TOKEN, 0, os.urandom(20))
        elif cmd == A_OPEN:
            self.open(remote_id=arg0, service=payload.rstrip(b"\0").decode())
        elif cmd == A_OKAY:
            s = self.streams.get(arg1)
            if s:
                s.acked.release()
        elif cmd == A_WRTE:
            s = self.streams.get(arg1)
            if s:
                self.send(A_OKAY, s.local_id, s.remote_id)
                s.inbox.put(payload)
        elif cmd == A_CLSE:
            s = self.streams.pop(arg1, None)
            if s:
                s.closed.set()
                s.inbox.put(None)
                if s.proc and s.proc.poll() is None:
                    s.proc.kill()

    def open(self, remote_id: int, service: str) -> None:
        if service.startswith("shell"):
            head, _, command = service.partition(":")
            target = self.device.shell
            args = (command, "v2" in head.split(",")[1:])
        elif service == "sync:":
            target, args = self.device.sync, ()
        else:
            self.send(A_CLSE, 0, remote_id)     # unknown service: refuse
            return
        s = Stream(self, self.next_id, remote_id)
        self.next_id += 1
        self.streams[s.local_id] = s
        self.send(A_OKAY, s.local_id, remote_id)
        threading.Thread(target=self._run, args=(target, s, *args), daemon=True).start()

    def _run(self, target, s: Stream, *args) -> None:
        try:
            target(s, *args)
        finally:
            s.close()
            self.streams.pop(s.local_id, None)


class TestDevice:
    """Device state: its root directory on the host and its properties."""

    def __init__(self, root: str, model: str, abi: str, unauthorized: bool):
        self.root = os.path.realpath(root)
        self.abi = abi
        self.unauthorized = unauthorized
        self.props = {
            "ro.product.cpu.abi": abi,
            "ro.product.model": model,
            "ro.product.name": "testphone",
            "ro.product.device": "testphone",
            "ro.build.version.sdk": "34",
        }
        for d in ("data/local/tmp", "sdcard", "storage", "system/bin"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        lines = "\n".join(f'  {k}) echo "{v}" ;;' for k, v in self.props.items())
        listing = "\n".join(f'  echo "[{k}]: [{v}]"' for k, v in self.props.items())
        getprop = os.path.join(self.root, "system/bin/getprop")
        with open(getprop, "w") as f:
            f.write(f'#!/bin/sh\nif [ $# -eq 0 ]; then\n{listing}\n  exit 0\nfi\n'
                    f'case "$1" in\n{lines}\n  *) echo "" ;;\nesac\n')
        os.chmod(getprop, 0o755)
        self._dir_re = re.compile(r"(?<![\w./-])/(%s)(?=/|\s|$|[\"';])" % "|".join(DEVICE_DIRS))
        # a host path in command position: first word, after ; & | or after `taskset MASK`
        self._exec_re = re.compile(r"(^\s*|[;&|]\s*|\btaskset\s+\S+\s+)(%s/[^\s\"';|&<>]+)" % re.escape(self.root))

    def banner(self) -> bytes:
        keys = ("ro.product.name", "ro.product.model", "ro.product.device")
        props = "".join(f"{k}={self.props[k]};" for k in keys)
        return f"device::{props}features=shell_v2,cmd".encode()

    # ---------------------------------------------------------------- paths
    def host_path(self, device_path: str) -> str:
        """Device absolute path -> path under root; refuses paths that climb out."""
        p = os.path.normpath(os.path.join(self.root, device_path.lstrip("/")))
        if p != self.root and not p.startswith(self.root + os.sep):
            raise PermissionError(f"path outside the device: {device_path!r}")
        return p

    def rewrite(self, command: str) -> str:
        """Device paths to host paths, and the device's own executables run by the host Python."""
        command = self._dir_re.sub(lambda m: f"{self.root}/{m.group(1)}", command)
        return self._exec_re.sub(
            lambda m: m.group(1) + (f"{sys.executable} " if self.native(m.group(2)) else "") + m.group(2), command)

    def native(self, path: str) -> bool:
        """An ELF executable for this device's ABI carrying a zip application (module docstring)."""
        try:
            with open(path, "rb") as f:
                head = f.read(20)
        except OSError:
            return False
        if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] != 1:   # Android ABIs are little-endian
            return False
        return (head[4], struct.unpack("<H", head[18:20])[0]) == ABI_ELF.get(self.abi) and zipfile.is_zipfile(path)

    # ---------------------------------------------------------------- shell
    def shell(self, s: Stream, command: str, v2: bool) -> None:
        if not command.strip():
            if v2:
                s.write(struct.pack("<BI", V2_EXIT, 1) + b"\0")
            return
        env = {
            "PATH": os.pathsep.join([os.path.join(self.root, "system/bin"),
                                     os.path.dirname(sys.executable), "/usr/bin", "/bin"]),
            "HOME": self.host_path("/data/local/tmp"),
            "TMPDIR": self.host_path("/data/local/tmp"),
            "LANG": "C.UTF-8",
        }
        for k, v in os.environ.items():     # test knobs for the stand-in binary
            if k.startswith("BENCH_STANDIN_"):
                env[k] = v
        s.proc = subprocess.Popen(
            ["sh", "-c", self.rewrite(command)], cwd=self.root, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if v2 else subprocess.STDOUT)

        def pump(pipe, packet_id: int) -> None:
            for chunk in iter(lambda: pipe.read1(65536), b""):
                s.write(struct.pack("<BI", packet_id, len(chunk)) + chunk if v2 else chunk)

        pumps = [threading.Thread(target=pump, args=(s.proc.stdout, V2_STDOUT))]
        if v2:
            pumps.append(threading.Thread(target=pump, args=(s.proc.stderr, V2_STDERR)))
        for t in pumps:
            t.start()
        rc = s.proc.wait()
        for t in pumps:
            t.join()
        code = 128 - rc if rc < 0 else rc    # killed by a signal: report it as sh does
        if v2:
            s.write(struct.pack("<BIB", V2_EXIT, 1, code & 0xFF))

    # ---------------------------------------------------------------- sync
    def sync(self, s: Stream) -> None:
        while True:
            req = s.read_exact(8)
            if req is None:
                return
            ident, length = req[:4], struct.unpack("<I", req[4:])[0]
            if ident == b"QUIT":
                return
            arg = s.read_exact(length)
            if arg is None:
                return
            handler = {b"STAT": self._stat, b"LIST": self._list,
                       b"SEND": self._send, b"RECV": self._recv}.get(ident)
            if handler is None:
                _fail(s, f"unknown sync request {ident!r}")
                return
            try:
                handler(s, arg.decode())
            except OSError as e:
                _fail(s, f"{e.strerror or e}")

    def _stat(self, s: Stream, path: str) -> None:
        try:
            st = os.stat(self.host_path(path))
            s.write(b"STAT" + struct.pack("<III", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime)))
        except OSError:
            s.write(b"STAT" + struct.pack("<III", 0, 0, 0))

    def _list(self, s: Stream, path: str) -> None:
        d = self.host_path(path)
        for name in [".", ".."] + sorted(os.listdir(d)):
            st = os.stat(os.path.join(d, name))
            raw = name.encode()
            s.write(b"DENT" + struct.pack("<IIII", st.st_mode, st.st_size & 0xFFFFFFFF,
                                          int(st.st_mtime), len(raw)) + raw)
        s.write(b"DONE" + bytes(16))

    def _send(self, s: Stream, arg: str) -> None:
        path, _, mode = arg.rpartition(",")
        target = self.host_path(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".sync-tmp"
        with open(tmp, "wb") as f:
            while True:
                head = s.read_exact(8)
                if head is None:
                    return
                ident, n = head[:4], struct.unpack("<I", head[4:])[0]
                if ident == b"DONE":     # n is the mtime here
                    break
                if ident != b"DATA":
                    _fail(s, f"unexpected {ident!r} during SEND")
                    return
                f.write(s.read_exact(n) or b"")
        os.chmod(tmp, int(mode) & 0o7777 if mode else 0o644)
        os.replace(tmp, target)
        s.write(b"OKAY" + bytes(4))

    def _recv(self, s: Stream, path: str) -> None:
        with open(self.host_path(path), "rb") as f:
            for chunk in iter(lambda: f.read(SYNC_CHUNK), b""):
                s.write(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
        s.write(b"DONE" + bytes(4))


def _fail(s: Stream, message: str) -> None:
    raw = message.encode()
    s.write(b"FAIL" + struct.pack("<I", len(raw)) + raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="host directory that stands for the device's /")
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1; 0 = any free port")
    p.add_argument("--model", default="Test Phone", help="ro.product.model")
    p.add_argument("--abi", default="arm64-v8a", help="ro.product.cpu.abi")
    p.add_argument("--unauthorized", action="store_true", help="never accept the host's key")
    args = p.parse_args(argv)
    if 5555 <= args.port <= 5585:
        p.error(f"port {args.port} is in 5555-5585, which the adb server scans for emulators")
    device = TestDevice(args.root, args.model, args.abi, args.unauthorized)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))      # loopback only
    srv.listen(8)
    print(f"PORT {srv.getsockname()[1]}", flush=True)
    while True:
        sock, _ = srv.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=Connection(sock, device).serve, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
