"""``python -m worker.images.decode_child``: a decode subprocess of ``worker.images.decode_pool``.

It imports Pillow and numpy only. Its address space is capped (RLIMIT_AS) at what it held after
start-up plus the decode byte budget, and its CPU time (RLIMIT_CPU) at the per-image budget past
what it has used, so that even an orphaned child stops. Each image comes in on a pipe; the decoded
8-bit RGB pixels are written to a memfd (no name to leak if the child is killed) that the worker
got once, at start-up, over a Unix socket, and the status goes back as JSON on that socket. The
memfd is reused: allocating fresh shared-memory pages for every image cost 2.6 ms per 1024-px
image, more than half of decoding it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import sys
import time
from multiprocessing.connection import Connection

from PIL import Image, ImageFile

from shared.errors import ErrorCode
from worker.errors import ImageInputError
from worker.images.decode import DecodeLimits, decode_image
from worker.images.decode_pool import READY

# Room above the image budget for libjpeg/libpng/libtiff working buffers and Python's own growth.
ADDRESS_SPACE_SLACK = 128 * 2**20
# Pixels of a larger image are released before the next image rather than kept for reuse.
KEEP_PIXEL_BYTES = 16 * 2**20


def _address_space() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _write_rgb(image: Image.Image, pixels: int) -> None:
    """The image's RGB bytes from offset 0 of ``pixels``, written by Pillow's raw encoder straight to it."""
    os.lseek(pixels, 0, os.SEEK_SET)
    with os.fdopen(os.dup(pixels), "wb") as out:
        ImageFile._save(image, out, [ImageFile._Tile("raw", (0, 0, *image.size), 0, ("RGB", 0, 1))])


def _decode(data: bytes, limits: DecodeLimits, replies: socket.socket, pixels: int) -> None:
    try:
        image = decode_image(data, limits)
        _write_rgb(image, pixels)
        reply: dict[str, object] = {"ok": True, "width": image.width, "height": image.height}
    except ImageInputError as exc:
        reply = {"ok": False, "code": exc.code, "message": exc.message}
    except MemoryError:
        message = "decoding the image needs more memory than its budget (IMBEDDINGS_DECODE_MAX_BYTES)"
        reply = {"ok": False, "code": ErrorCode.IMAGE_TOO_LARGE, "message": message}
    except Exception as exc:  # a decoder's unexpected error is still this image's fault
        reply = {"ok": False, "code": ErrorCode.INVALID_IMAGE, "message": f"image could not be decoded: {type(exc).__name__}: {exc}"}
    replies.sendall(json.dumps(reply).encode())


def main(request_fd: int, reply_fd: int, max_bytes: int) -> None:
    requests = Connection(request_fd, writable=False)
    replies = socket.socket(fileno=reply_fd)
    limit = _address_space() + max_bytes + ADDRESS_SPACE_SLACK
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    pixels = os.memfd_create("imbeddings-rgb", os.MFD_CLOEXEC)
    socket.send_fds(replies, [READY], [pixels])
    while True:
        try:
            limits, cpu_seconds = requests.recv()
            data = requests.recv_bytes()
        except (EOFError, OSError):  # the worker is gone or closed the pool
            return
        # The worker's watchdog stops an image at its budget; this stops the child too if the
        # worker died meanwhile (SIGXCPU ends the process).
        soft = math.ceil(time.process_time() + cpu_seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))
        # The worker has copied the previous image out by now: it sends the next one only after.
        if os.fstat(pixels).st_size > KEEP_PIXEL_BYTES:
            os.ftruncate(pixels, 0)
        _decode(data, limits, replies, pixels)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
