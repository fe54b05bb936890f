"""``python -m worker.decode_child``: a decode subprocess of ``worker.decode_pool``.

It imports Pillow and numpy only. Its address space is capped (RLIMIT_AS) at what it held after
start-up plus the decode byte budget, and its CPU time (RLIMIT_CPU) at the per-image budget past
what it has used, so that even an orphaned child stops. Each image comes in on a pipe; the decoded
8-bit RGB pixels go back in a memfd (no name to leak if the child is killed) passed over a Unix
socket with a JSON status.
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

from worker.decode import DecodeLimits, decode_image
from worker.decode_pool import READY
from worker.errors import ImageInputError

# Room above the image budget for libjpeg/libpng/libtiff working buffers and Python's own growth.
ADDRESS_SPACE_SLACK = 128 * 2**20


def _address_space() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _write_rgb(image: Image.Image) -> int:
    """The image's RGB bytes in a new memfd, written by Pillow's raw encoder straight to it."""
    fd = os.memfd_create("imbeddings-rgb", os.MFD_CLOEXEC)
    with os.fdopen(os.dup(fd), "wb") as out:
        ImageFile._save(image, out, [ImageFile._Tile("raw", (0, 0, *image.size), 0, ("RGB", 0, 1))])
    return fd


def _decode(data: bytes, limits: DecodeLimits, replies: socket.socket) -> None:
    fd = None
    try:
        image = decode_image(data, limits)
        fd = _write_rgb(image)
        reply: dict[str, object] = {"ok": True, "width": image.width, "height": image.height}
    except ImageInputError as exc:
        reply = {"ok": False, "code": exc.code, "message": exc.message}
    except MemoryError:
        reply = {"ok": False, "code": "image_too_large", "message": "decoding the image needs more memory than its budget (IMBEDDINGS_DECODE_MAX_BYTES)"}
    except Exception as exc:  # a decoder's unexpected error is still this image's fault
        reply = {"ok": False, "code": "invalid_image", "message": f"image could not be decoded: {type(exc).__name__}: {exc}"}
    payload = json.dumps(reply).encode()
    if fd is None:
        replies.sendall(payload)
    else:
        socket.send_fds(replies, [payload], [fd])
        os.close(fd)


def main(request_fd: int, reply_fd: int, max_bytes: int) -> None:
    requests = Connection(request_fd, writable=False)
    replies = socket.socket(fileno=reply_fd)
    limit = _address_space() + max_bytes + ADDRESS_SPACE_SLACK
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    replies.sendall(READY)
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
        _decode(data, limits, replies)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
