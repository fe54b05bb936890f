"""Decoding in subprocesses that can be abandoned: a per-image budget of CPU seconds and bytes.

A decoder running in a thread cannot be stopped: a hostile file that slips past the structural
checks would hold its thread (and, in Celery's warm shutdown, the worker) as long as the decoder
likes. Here each decode runs in one of a few long-lived child processes (``worker.images.decode_child``,
Pillow and numpy only, never torch). The calling thread watches the child's CPU time in
``/proc/<pid>/stat`` while it waits and kills it past the budget or the request's deadline; the
child's address space is capped, so a decode past the byte budget fails inside it with
MemoryError. A killed or crashed child is replaced by a fresh one. Pixels come back as 8-bit RGB
in the child's memfd, which the worker reads into an array of its own before the child may take
the next image.

Small JPEGs and PNGs (``IN_PLACE_MAX_BYTES``, ``IN_PLACE_MAX_PIXELS``) are decoded in the calling
thread instead: their bytes and pixels bound their decode far below the CPU and byte budgets
(``tests/unit/test_decode_budget.py`` decodes the heaviest such file), and the round trip to a
child would cost more than the decode itself. Only libjpeg's and libpng's decoders, the most
exercised ones, run in the worker this way; every other format always goes to a child.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from shared.errors import ErrorCode
from worker.errors import ImageInputError
from worker.images.decode import DecodeLimits, decode_image

log = logging.getLogger(__name__)

# How often a waiting thread looks at its child's CPU time: a check costs ~20 us, and the budget is
# overshot by at most this much.
WATCH_INTERVAL_S = 0.05
# A fresh child (interpreter, Pillow, numpy) starts in well under a second; waiting longer means it is broken.
CHILD_START_TIMEOUT_S = 30.0
# How long decodes go on once the worker is told to stop. The API checks every 2 s (WAIT_SLICE_S)
# that a request's worker is alive, and sends the request elsewhere or withdraws it when it is not:
# a decode that finishes later only delays the worker's exit.
STOP_GRACE_S = 2.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_ROOT = Path(__file__).resolve().parents[2]
READY = b"ready"
# A JPEG or PNG at most this large, declaring at most this many pixels, is decoded in the calling thread.
IN_PLACE_MAX_BYTES = 64 * 1024
IN_PLACE_MAX_PIXELS = 512 * 512


class DecodeAbandoned(Exception):
    """The worker is stopping: the image was not judged, only left undone."""


class _ChildGone(Exception):
    """The child died while idle (killed from outside): the image is not to blame."""


def _readable(sock: socket.socket, timeout_s: float) -> bool:
    # poll, not select: a worker may hold more than select's 1024 file descriptors.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


class _DecodeProcess:
    """One child and the two channels to it."""

    def __init__(self, max_bytes: int) -> None:
        request_read, request_write = os.pipe()
        reply_parent, reply_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker.images.decode_child", str(request_read), str(reply_child.fileno()), str(max_bytes)],
                pass_fds=(request_read, reply_child.fileno()),
                stdin=subprocess.DEVNULL,
                cwd=_ROOT,
                env=env,
            )
        finally:
            os.close(request_read)
            reply_child.close()
        self.requests = Connection(request_write, readable=False)
        self.replies = reply_parent
        self.pixels: int | None = None  # the child's memfd, once it is ready

    def wait_ready(self) -> None:
        """Wait for the child's start-up (imports, limits), so its CPU time is not billed to an image."""
        if _readable(self.replies, CHILD_START_TIMEOUT_S):
            message, fds, _, _ = socket.recv_fds(self.replies, 64, 1)
            if message == READY and fds:
                self.pixels = fds[0]
                return
        raise ImageInputError(ErrorCode.DECODER_UNAVAILABLE, f"the image decoder process did not start ({_describe_exit(self)})")

    def cpu_seconds(self) -> float:
        try:
            with open(f"/proc/{self.process.pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone, or not Linux: the child's own RLIMIT_CPU still stops it
            return 0.0
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()
        self.requests.close()
        self.replies.close()
        if self.pixels is not None:
            os.close(self.pixels)
            self.pixels = None


class DecodePool:
    """``size`` decode children shared by the threads that call ``decode``."""

    def __init__(self, size: int, cpu_seconds: float, max_bytes: int) -> None:
        self.cpu_seconds = cpu_seconds
        self.max_bytes = max_bytes
        self._idle: queue.SimpleQueue[_DecodeProcess] = queue.SimpleQueue()
        self._all: set[_DecodeProcess] = set()
        self._closed = False
        self._stop_at: float | None = None
        for _ in range(size):
            self._idle.put(self._spawn())

    def _spawn(self) -> _DecodeProcess:
        child = _DecodeProcess(self.max_bytes)
        self._all.add(child)
        return child

    def _retire(self, child: _DecodeProcess) -> None:
        child.kill()
        self._all.discard(child)

    def decode(self, data: bytes, limits: DecodeLimits, deadline: float | None = None) -> np.ndarray:
        """The image as an ``(H, W, 3)`` uint8 array; ``ImageInputError`` when it cannot be used,
        including when its decode ran past the CPU budget or ``deadline`` (epoch seconds)."""
        if decodes_in_place(data):
            if self._stopped():
                raise DecodeAbandoned
            return np.asarray(decode_image(data, limits))
        child = self._take()
        try:
            try:
                outcome = self._run(child, data, limits, deadline)
            except _ChildGone:
                self._retire(child)
                child = self._spawn()
                outcome = self._run(child, data, limits, deadline)
        except BaseException:
            # Killed, crashed or interrupted: whatever it was doing is abandoned with it.
            self._retire(child)
            if not self._closed:
                child = self._spawn()
            raise
        finally:
            if not self._closed:
                self._idle.put(child)
        if isinstance(outcome, ImageInputError):
            raise outcome
        return outcome

    def _stopped(self) -> bool:
        return self._closed or (self._stop_at is not None and time.monotonic() >= self._stop_at)

    def _take(self) -> _DecodeProcess:
        while True:
            if self._stopped():
                raise DecodeAbandoned
            try:
                return self._idle.get(timeout=WATCH_INTERVAL_S)
            except queue.Empty:
                continue

    def _run(self, child: _DecodeProcess, data: bytes, limits: DecodeLimits, deadline: float | None) -> np.ndarray | ImageInputError:
        """The decoded array or the child's verdict on the image; raises when the child must go."""
        if child.pixels is None:
            child.wait_ready()
        assert child.pixels is not None
        started = child.cpu_seconds()
        try:
            child.requests.send((limits, self.cpu_seconds))
            child.requests.send_bytes(data)
        except OSError:
            raise _ChildGone from None
        while not _readable(child.replies, WATCH_INTERVAL_S):
            if self._stopped():
                raise DecodeAbandoned
            used = child.cpu_seconds() - started
            if used > self.cpu_seconds:
                log.warning("decode abandoned past its CPU budget", extra={"cpu_seconds": round(used, 2), "image_bytes": len(data)})
                raise ImageInputError(
                    ErrorCode.DECODE_BUDGET_EXCEEDED,
                    f"decoding the image took more than {self.cpu_seconds:g} CPU seconds (IMBEDDINGS_DECODE_CPU_SECONDS) and was abandoned",
                )
            if deadline is not None and time.time() > deadline:
                raise ImageInputError(ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed while the image was being decoded")
        payload = child.replies.recv(65536)
        if not payload and self._closed:
            raise DecodeAbandoned
        if not payload:
            raise ImageInputError(ErrorCode.INVALID_IMAGE, f"the image decoder died on this image ({_describe_exit(child)})")
        reply = json.loads(payload)
        if not reply["ok"]:
            return ImageInputError(ErrorCode(reply["code"]), reply["message"])
        return _read_rgb(child.pixels, reply["width"], reply["height"])

    def stop_after(self, grace_s: float) -> None:
        """Decodes running or asked for within ``grace_s`` go on; later, they raise ``DecodeAbandoned``."""
        self._stop_at = time.monotonic() + grace_s

    def close(self) -> None:
        """Kill every child: decodes in progress and new ones raise ``DecodeAbandoned``."""
        self._closed = True
        for child in list(self._all):
            self._retire(child)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (the frame header holds the size); C4, C8 and CC share the range but are not frames.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def decodes_in_place(data: bytes) -> bool:
    """A JPEG or PNG small enough in bytes and in the pixels its header declares to skip the child."""
    if len(data) > IN_PLACE_MAX_BYTES:
        return False
    size = _declared_size(data)
    return size is not None and 0 < size[0] * size[1] <= IN_PLACE_MAX_PIXELS


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR or a JPEG's first frame header; None for anything else."""
    if data.startswith(_PNG_SIGNATURE):
        return struct.unpack_from(">II", data, 16) if len(data) >= 24 and data[12:16] == b"IHDR" else None
    if not data.startswith(b"\xff\xd8"):
        return None
    position = 2
    while position + 9 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker in _JPEG_FRAMES:
            height, width = struct.unpack_from(">HH", data, position + 5)
            return width, height
        elif marker in (0xDA, 0xD9):  # scan data or the end before any frame header
            return None
        elif marker in _JPEG_STANDALONE:
            position += 2
        else:
            position += 2 + struct.unpack_from(">H", data, position + 2)[0]
    return None


def _read_rgb(pixels: int, width: int, height: int) -> np.ndarray:
    array = np.empty((height, width, 3), dtype=np.uint8)
    if os.preadv(pixels, [array], 0) != array.nbytes:
        raise ImageInputError(ErrorCode.INVALID_IMAGE, "the image decoder returned fewer pixels than the image has")
    return array


def _describe_exit(child: _DecodeProcess) -> str:
    if child.alive():
        return "it did not answer"
    code = child.process.wait()
    if code < 0:
        name = signal.Signals(-code).name
        return f"{name}: over its CPU budget" if -code == signal.SIGXCPU else name
    return f"exit code {code}"
