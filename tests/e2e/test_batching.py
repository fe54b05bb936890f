"""Cross-request batching: images from concurrent requests share forward passes, and every result
goes back to the right request in the right order."""

from __future__ import annotations

import io
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.photos import EXAMPLES, encode
from tests.support.images import data_uri
from tests.support.reference import reference_vectors
from tests.support.stack import Stack
from worker.batching import BULK, INTERACTIVE, Admission, Batcher
from worker.model.compute import compute_executor
from worker.model.loader import LoadedModel, load_model
from worker.model.preprocess import ProcessorPreprocessor
from worker.tickets import Ticket, Withdrawn


def _distinct_images(count: int, seed: int) -> list[Image.Image]:
    """Different crops of real photos, so a mix-up between requests cannot go unnoticed."""
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted(EXAMPLES.iterdir())]
    images = []
    for _ in range(count):
        photo = rng.choice(photos)
        w, h = rng.randint(photo.width // 2, photo.width), rng.randint(photo.height // 2, photo.height)
        x, y = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        images.append(photo.crop((x, y, x + w, y + h)))
    return images


def test_batch_runner_coalesces_and_routes_results(tiny_models: dict[str, Path]) -> None:
    model = load_model(str(tiny_models["dinov2-registers-tiny"]), torch.device("cpu"), torch.float32, None, warmup_batch=1)
    preprocess = ProcessorPreprocessor(model.processor)
    images = _distinct_images(48, seed=1)
    pixels = [preprocess(image) for image in images]
    sizes: list[int] = []
    lock = threading.Lock()

    def observe(size: int, seconds: float) -> None:
        with lock:
            sizes.append(size)

    compute = compute_executor()
    admission = Admission(max_batch_size=8)
    runner = Batcher(admission, model.embedder, compute, model.info, max_wait_s=0.005, observe=observe)
    try:
        with ThreadPoolExecutor(max_workers=12) as pool:
            embeddings = list(pool.map(lambda p: admission.submit(admission.reserve(), p).result(timeout=60), pixels))
    finally:
        runner.stop()
        compute.shutdown()
    assert sum(sizes) == 48 and max(sizes) > 1 and max(sizes) <= 8
    for image, embedding in zip(images, embeddings):
        cls, mean = reference_vectors(tiny_models["dinov2-registers-tiny"], image)
        assert np.abs(embedding.cls.numpy() - cls).max() < 1e-5
        assert np.abs(embedding.mean.numpy() - mean).max() < 1e-5


@pytest.fixture
def vit_runner_parts(tiny_models: dict[str, Path]) -> Iterator[tuple[LoadedModel, ThreadPoolExecutor, torch.Tensor]]:
    model = load_model(str(tiny_models["vit-tiny"]), torch.device("cpu"), torch.float32, None, warmup_batch=1)
    pixels = ProcessorPreprocessor(model.processor)(_distinct_images(1, seed=3)[0])
    compute = compute_executor()
    yield model, compute, pixels
    compute.shutdown()


def test_interactive_images_go_before_bulk_ones(vit_runner_parts: tuple[LoadedModel, ThreadPoolExecutor, torch.Tensor]) -> None:
    model, compute, pixels = vit_runner_parts
    order: list[str] = []
    admission = Admission(max_batch_size=1)
    runner = Batcher(admission, model.embedder, compute, model.info, max_wait_s=0)
    model_free = threading.Event()
    compute.submit(model_free.wait)  # the model is busy while the images arrive
    try:
        futures = {}
        for name, priority in (("first", INTERACTIVE), ("bulk-1", BULK), ("bulk-2", BULK), ("interactive", INTERACTIVE)):
            futures[name] = admission.submit(admission.reserve(priority), pixels)
            futures[name].add_done_callback(lambda _, name=name: order.append(name))
        model_free.set()
        for future in futures.values():
            future.result(timeout=60)
    finally:
        runner.stop()
    # "first" was taken before the others arrived; the interactive image then passes both bulk ones.
    assert order == ["first", "interactive", "bulk-1", "bulk-2"]


def test_batch_waits_for_announced_images_and_not_for_withdrawn_ones(vit_runner_parts: tuple[LoadedModel, ThreadPoolExecutor, torch.Tensor]) -> None:
    model, compute, pixels = vit_runner_parts
    sizes: list[int] = []
    # A wait far longer than the test: if a batch ran only after it, the futures would time out.
    admission = Admission(max_batch_size=8)
    runner = Batcher(admission, model.embedder, compute, model.info, max_wait_s=600, observe=lambda size, _: sizes.append(size))
    try:
        one, two = admission.reserve(), admission.reserve()
        first = admission.submit(one, pixels)
        time.sleep(0.3)  # the second image is still "decoding": the batch waits for it
        assert not first.done()
        second = admission.submit(two, pixels)
        first.result(timeout=30)
        second.result(timeout=30)

        three, four = admission.reserve(), admission.reserve()
        third = admission.submit(three, pixels)
        admission.cancel(four, Withdrawn())  # the other image could not be decoded: nothing left to wait for
        third.result(timeout=30)

        # nothing else reserved: runs at once
        assert admission.submit(admission.reserve(), pixels).result(timeout=30) is not None
    finally:
        runner.stop()
    assert sizes == [2, 1, 1]


def test_images_of_withdrawn_requests_are_dropped_when_a_batch_is_formed(vit_runner_parts: tuple[LoadedModel, ThreadPoolExecutor, torch.Tensor]) -> None:
    model, compute, pixels = vit_runner_parts
    sizes: list[int] = []
    checked: list[list[str | None]] = []
    left, stays = Ticket("reply:left"), Ticket("reply:stays")

    def check(tickets: list[Ticket]) -> None:
        """Stands where Redis answers which requests the API withdrew: the client of 'left' hung up."""
        checked.append([t.reply_key for t in tickets])
        for ticket in tickets:
            ticket.withdrawn = ticket.reply_key == "reply:left"

    released: list[str] = []
    admission = Admission(max_batch_size=8)
    runner = Batcher(admission, model.embedder, compute, model.info, max_wait_s=0, observe=lambda size, _: sizes.append(size), check_withdrawn=check)
    model_free = threading.Event()
    compute.submit(model_free.wait)
    try:
        first = admission.submit(admission.reserve(ticket=stays), pixels)  # taken at once, before the others arrive
        time.sleep(0.2)
        futures = []
        for ticket in (left, stays, left, Ticket(deadline=time.time() - 1)):
            futures.append(admission.submit(admission.reserve(ticket=ticket), pixels))
            futures[-1].add_done_callback(lambda _, k=ticket.reply_key: released.append(k))
        model_free.set()
        first.result(timeout=30)
        assert futures[1].result(timeout=30) is not None
        for dropped in (futures[0], futures[2], futures[3]):
            with pytest.raises(Withdrawn):
                dropped.result(timeout=30)
    finally:
        runner.stop()
    # One check per batch, for the distinct requests in it; the expired job-less ticket needs none.
    assert checked == [["reply:stays"], ["reply:left", "reply:stays"]]
    assert sizes == [1, 1]
    # Every image leaves the model's hands once, computed or dropped (the expired one has no reply key).
    assert sorted(map(str, released)) == ["None", "reply:left", "reply:left", "reply:stays"]


def test_concurrent_requests_each_get_their_own_vectors(service: Stack) -> None:
    family = "vit-tiny"
    requests = [_distinct_images(random.Random(i).randint(1, 4), seed=100 + i) for i in range(24)]

    def send(images: list[Image.Image]) -> list[dict]:
        with service.client() as client:
            body = {"model": service.model(family), "input": [data_uri(encode(im, "PNG"), "image/png") for im in images], "encoding_format": "float"}
            response = client.post("/v1/embeddings", json=body)
        assert response.status_code == 200, response.text
        return response.json()["data"]

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(send, requests))
    for images, items in zip(requests, answers):
        assert [item["index"] for item in items] == list(range(len(images)))
        for image, item in zip(images, items):
            # The client sent PNG, so the reference sees the same pixels.
            sent = Image.open(io.BytesIO(encode(image, "PNG")))
            cls, mean = reference_vectors(service.models[family], sent)
            assert np.abs(np.asarray(item["embeddings"]["cls"]) - cls).max() < 1e-5
            assert np.abs(np.asarray(item["embeddings"]["mean"]) - mean).max() < 1e-5
