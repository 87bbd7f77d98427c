"""The phone's `benchmark_model`: given, cached, or fetched once from Google's prebuilts.

Lookup (`resolve_binary`), first hit wins:
1. --benchmark-binary PATH;
2. $BENCHMARK_MODEL;
3. the per-user cache, CACHE/mnv2-compress/benchmark_model/<abi>/benchmark_model, where CACHE is
   $XDG_CACHE_HOME or ~/.cache, when its record (benchmark_model.json beside it) still matches it;
4. a download of the prebuilt for the phone's ABI into that cache.

Where the prebuilts come from. TensorFlow Lite's "Performance measurement" page
(tensorflow.org/lite/performance/measurement, section "Native benchmark binary") lists nightly
native `benchmark_model` binaries for Android at OFFICIAL_URL, named android_aarch64_benchmark_model
and android_arm_benchmark_model; its LiteRT successor, "Benchmark Interpreter API"
(ai.google.dev/edge/litert/models/measurement), still links the benchmark apps under the same
prefix. That is the Interpreter-API tool whose flags (--use_xnnpack, --enable_op_profiling) and log
lines bench.device and bench.parse use. LiteRT's CompiledModel tool
(storage.googleapis.com/litert/binaries/<version>/android_arm64/benchmark_model, what
`litert benchmark --android` fetches) is another program with other flags, so it is not used. No
x86_64 or x86 build is published; for those ABIs (emulators) the same naming scheme is looked up
on a mirror named by $MNV2_BENCHMARK_MODEL_URL, which replaces OFFICIAL_URL.

Integrity. The location publishes no checksums and `latest` changes every night, so no sha256 can
be pinned here. Checked instead, before anything is written to the cache:
- the body has exactly Content-Length bytes (a chunked body must end with its last chunk);
- its MD5 equals the one Google Cloud Storage sends in x-goog-hash, when the server sends one;
- it is a little-endian ELF executable of the class (32/64 bit) and e_machine of the phone's ABI,
  so an HTML error page or a build for another CPU is refused.
The sha256 of the accepted file is recorded beside it with the URL and the date, and checked on
every later use: a cached file that was truncated or changed is removed and fetched again. This
catches damage, not a compromised server (the first download is trusted).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import struct
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common.files import atomic_write_bytes, atomic_write_text, remove_stale_temporaries

__all__ = ["BinaryError", "Abi", "ABIS", "OFFICIAL_URL", "URL_ENV", "BINARY_ENV", "Resolved",
           "elf_kind", "check_elf", "cache_path", "base_url", "binary_url", "given_binary",
           "resolve_binary", "download_binary", "warn_if_foreign"]

BINARY_ENV = "BENCHMARK_MODEL"              # path of a local benchmark_model
URL_ENV = "MNV2_BENCHMARK_MODEL_URL"        # replaces OFFICIAL_URL (a mirror; the tests' local server)
OFFICIAL_URL = ("https://storage.googleapis.com/tensorflow-nightly-public/prod/tensorflow/"
                "release/lite/tools/nightly/latest")
MAX_BYTES = 512 * 2**20     # refuse bodies above this (the arm64 tool is tens of MB)
TIMEOUT_S = 30.0            # per connect / read on the socket, not for the whole download
CHUNK = 2**20


@dataclass(frozen=True)
class Abi:
    bits: int        # ELF class: 32 or 64
    machine: int     # ELF e_machine
    stem: str        # file-name prefix of the prebuilt: <stem>_benchmark_model


# Android ABI -> the ELF its executables are. Every Android ABI is little-endian.
ABIS = {
    "arm64-v8a": Abi(64, 183, "android_aarch64"),    # EM_AARCH64
    "armeabi-v7a": Abi(32, 40, "android_arm"),       # EM_ARM
    "x86_64": Abi(64, 62, "android_x86_64"),         # EM_X86_64
    "x86": Abi(32, 3, "android_x86"),                # EM_386
}
PUBLISHED = ("arm64-v8a", "armeabi-v7a")            # what OFFICIAL_URL carries
# e_machine of a binary -> phone ABIs that can run it (most arm64 phones also run 32-bit ARM).
RUNS_ON = {183: {"arm64-v8a"}, 40: {"armeabi-v7a", "armeabi", "arm64-v8a"},
           62: {"x86_64"}, 3: {"x86", "x86_64"}}
GET_IT = "pass --benchmark-binary PATH or set BENCHMARK_MODEL=PATH (see docs/phone.md)"


class BinaryError(Exception):
    """No usable benchmark_model could be found or fetched; the message says what to do."""


@dataclass(frozen=True)
class Resolved:
    path: str
    source: str      # where it came from, for the log and the saved config


# ---------------------------------------------------------------------------- ELF
def elf_kind(head: bytes) -> tuple[int, str, int, int] | None:
    """(bits, "little"/"big", e_type, e_machine) of an ELF header's first 20 bytes; None if not ELF."""
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return None
    order = "<" if head[5] == 1 else ">"
    e_type, e_machine = struct.unpack(order + "HH", head[16:20])
    return (32 if head[4] == 1 else 64), ("little" if order == "<" else "big"), e_type, e_machine


def check_elf(head: bytes, abi: str, what: str) -> None:
    """BinaryError unless `head` starts an executable ELF for `abi` (class, byte order, machine)."""
    want = ABIS[abi]
    kind = elf_kind(head)
    if kind is None:
        raise BinaryError(f"{what} is not an ELF executable (it starts with {head[:16]!r})")
    bits, order, e_type, machine = kind
    if (bits, order, machine) != (want.bits, "little", want.machine):
        raise BinaryError(f"{what} is a {bits}-bit {order}-endian ELF for e_machine {machine}; "
                          f"the phone's ABI {abi} needs {want.bits}-bit little-endian e_machine {want.machine}")
    if e_type not in (2, 3):       # ET_EXEC, ET_DYN (Android executables are PIE, ET_DYN)
        raise BinaryError(f"{what} is an ELF of type {e_type}, not an executable")


def warn_if_foreign(path: str, abi: str) -> None:
    """For a binary the user named: warn (do not refuse) when its ELF machine cannot run on `abi`."""
    with open(path, "rb") as f:
        kind = elf_kind(f.read(20))
    if kind is not None and abi and abi not in RUNS_ON.get(kind[3], {abi}):
        print(f"warning: {path} is built for ELF machine {kind[3]}, the phone's ABI is {abi}; "
              "it will likely fail to run", file=sys.stderr)


# ---------------------------------------------------------------------------- where
def cache_path(abi: str) -> Path:
    """CACHE/mnv2-compress/benchmark_model/<abi>/benchmark_model (XDG base directory rules)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"   # a relative value is ignored
    return root / "mnv2-compress" / "benchmark_model" / abi / "benchmark_model"


def base_url() -> str:
    return (os.environ.get(URL_ENV) or OFFICIAL_URL).rstrip("/")


def binary_url(abi: str, base: str) -> str:
    return f"{base}/{ABIS[abi].stem}_benchmark_model"


def given_binary(path: str | None) -> Resolved | None:
    """--benchmark-binary, else $BENCHMARK_MODEL; ValueError if the one named is not a readable file."""
    for value, name in ((path, "--benchmark-binary"), (os.environ.get(BINARY_ENV), "$" + BINARY_ENV)):
        if not value:
            continue
        if not os.path.isfile(value):
            raise ValueError(f"benchmark binary not found: {value} (from {name})")
        if not os.access(value, os.R_OK):
            raise ValueError(f"cannot read benchmark binary {value} (from {name})")
        return Resolved(value, name)
    return None


# ---------------------------------------------------------------------------- lookup
def resolve_binary(path: str | None, abi: str, timeout: float = TIMEOUT_S) -> Resolved:
    """Steps 1-4 of the module docstring for a phone of ABI `abi`."""
    given = given_binary(path)
    if given:
        warn_if_foreign(given.path, abi)
        return given
    if abi not in ABIS:
        raise BinaryError(f"no prebuilt benchmark_model for the phone's ABI {abi!r} "
                          f"(known: {', '.join(ABIS)}); build one for it and {GET_IT}")
    base = base_url()
    url = binary_url(abi, base)
    dest = cache_path(abi)
    cached = _cached(dest, abi, url)
    if cached:
        return cached
    if base == OFFICIAL_URL and abi not in PUBLISHED:
        raise BinaryError(f"Google publishes no prebuilt benchmark_model for {abi} (only "
                          f"{', '.join(PUBLISHED)}); build it with `bazel build -c opt --config=android_"
                          f"{abi.replace('-', '_')} //tensorflow/lite/tools/benchmark:benchmark_model` and {GET_IT}")
    return download_binary(url, abi, dest, timeout)


def _record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".json")


def _drop(dest: Path, why: str) -> None:
    print(f"warning: cached {dest} {why}; removing it and fetching it again", file=sys.stderr)
    dest.unlink(missing_ok=True)
    _record_path(dest).unlink(missing_ok=True)


def _cached(dest: Path, abi: str, url: str) -> Resolved | None:
    """The cached binary if it and its record agree (sha256, size, URL); otherwise None, cache cleared."""
    record_file = _record_path(dest)
    if not dest.exists() and not record_file.exists():
        return None
    try:
        record = json.loads(record_file.read_text())
        data = dest.read_bytes()
    except (OSError, ValueError) as e:
        _drop(dest, f"or its record cannot be read ({e})")
        return None
    if record.get("url") != url:
        _drop(dest, f"came from {record.get('url')}, not {url}")
        return None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != record.get("bytes") or digest != record.get("sha256"):
        _drop(dest, f"has {len(data)} bytes, sha256 {digest[:12]}..., but {record.get('bytes')} bytes, "
                    f"sha256 {str(record.get('sha256'))[:12]}... were recorded")
        return None
    try:
        check_elf(data[:20], abi, f"cached {dest}")
    except BinaryError as e:
        _drop(dest, str(e))
        return None
    return Resolved(str(dest), f"cache: {url}, downloaded {record.get('downloaded_utc')}, "
                               f"sha256 {digest}")


# ---------------------------------------------------------------------------- download
def _fetch(url: str, timeout: float) -> tuple[bytes, http.client.HTTPMessage]:
    """The body and headers of a GET, with its length checked; BinaryError when it cannot be had."""
    req = urllib.request.Request(url, headers={"User-Agent": "mnv2-compress bench"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            length = r.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            if expected is not None and expected > MAX_BYTES:
                raise BinaryError(f"{url} is {expected} bytes, more than the {MAX_BYTES} a "
                                  "benchmark_model can be; refusing it")
            chunks, got = [], 0
            while chunk := r.read(CHUNK):
                chunks.append(chunk)
                got += len(chunk)
                if got > MAX_BYTES:
                    raise BinaryError(f"{url} sends more than {MAX_BYTES} bytes; refusing it")
            # http.client returns short data when a connection with a Content-Length closes
            # early; it raises IncompleteRead only for a chunked body cut before its last chunk.
            if expected is not None and got != expected:
                raise BinaryError(f"download of {url} is truncated: {got} of {expected} bytes; "
                                  f"nothing was cached. Try again, or {GET_IT}")
            return b"".join(chunks), r.headers
    except urllib.error.HTTPError as e:
        raise BinaryError(f"cannot download benchmark_model: {url} answered HTTP {e.code} {e.reason}. "
                          f"Get the binary another way and {GET_IT}") from None
    except http.client.IncompleteRead as e:
        raise BinaryError(f"download of {url} is truncated after {len(e.partial)} bytes; "
                          f"nothing was cached. Try again, or {GET_IT}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        # Offline: DNS failure, connection refused, timeout, network unreachable, reset.
        reason = getattr(e, "reason", None) or e
        raise BinaryError(f"cannot download benchmark_model: {url} is unreachable ({reason}). "
                          f"Download it from there on a machine that is online and {GET_IT}") from None


def _goog_md5(headers: http.client.HTTPMessage) -> str | None:
    """The base64 MD5 in Google Cloud Storage's `x-goog-hash: crc32c=...,md5=...`, if sent."""
    for value in headers.get_all("x-goog-hash") or []:
        for part in value.split(","):
            name, _, digest = part.strip().partition("=")
            if name == "md5":
                return digest
    return None


def download_binary(url: str, abi: str, dest: Path, timeout: float = TIMEOUT_S) -> Resolved:
    """Fetch `url`, check it (module docstring), then write it to `dest` with its record."""
    print(f"benchmark_model: downloading {url}", file=sys.stderr)
    data, headers = _fetch(url, timeout)
    md5 = _goog_md5(headers)
    if md5 is not None and base64.b64encode(hashlib.md5(data).digest()).decode() != md5:
        raise BinaryError(f"download of {url} does not match the MD5 the server sent ({md5}); "
                          f"nothing was cached. Try again, or {GET_IT}")
    check_elf(data[:20], abi, f"the file at {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest.parent)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(data, dest)                   # temporary file, then rename
    os.chmod(dest, 0o755)
    atomic_write_text(json.dumps({
        "url": url, "abi": abi, "bytes": len(data), "sha256": digest,
        "downloaded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "last_modified": headers.get("Last-Modified"), "server_md5": md5}, indent=1) + "\n",
        _record_path(dest))
    return Resolved(str(dest), f"downloaded from {url}, sha256 {digest}")
