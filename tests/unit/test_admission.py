"""The batcher's admission: images on their way to the model are bounded per priority, a slot comes
back when its image leaves (computed, dropped or cancelled), and the scheduler never imports torch."""

from __future__ import annotations

import subprocess
import sys
import threading

from shared.settings import REPO_ROOT
from worker.batching import BULK, INTERACTIVE, Admission
from worker.tickets import Withdrawn


def test_the_scheduler_never_imports_torch() -> None:
    code = "import sys, worker.batching; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


def test_job_images_wait_for_their_share_while_requests_still_get_slots() -> None:
    admission = Admission(max_batch_size=2)
    bulk = [admission.reserve(BULK) for _ in range(4)]  # the bulk share: two batches
    interactive = [admission.reserve(INTERACTIVE) for _ in range(8)]  # its own, larger share
    waiting = threading.Thread(target=admission.reserve, args=(BULK,), daemon=True)
    waiting.start()
    waiting.join(timeout=0.5)
    assert waiting.is_alive()  # a fifth job image waits for a slot

    admission.cancel(bulk[0], Withdrawn())  # an image that will not come gives its slot back
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    assert isinstance(bulk[0].future.exception(timeout=0), Withdrawn)

    # A queued image keeps its slot until it has left the model; batches come out best first.
    admission.submit(bulk[1], "job pixels")
    admission.submit(interactive[0], "request pixels")
    for reservation in [*bulk[2:], *interactive[1:]]:
        admission.cancel(reservation, Withdrawn())
    batch = admission.next_batch(max_wait_s=0)
    assert [queued.pixels for queued in batch] == ["request pixels", "job pixels"]
    for _ in range(2):  # the share is full again: the one that waited, the queued one and these two
        admission.reserve(BULK)
    waiting = threading.Thread(target=admission.reserve, args=(BULK,), daemon=True)
    waiting.start()
    waiting.join(timeout=0.5)
    assert waiting.is_alive()
    admission.finish(batch[1], Withdrawn())  # the job image left the model: its slot is taken at once
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    assert isinstance(batch[1].reservation.future.exception(timeout=0), Withdrawn)
