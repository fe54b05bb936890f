"""Structural pre-checks, the decode memory estimate, deep modes by range, and the decode
subprocesses' CPU and byte budgets, checked with the default settings' limits."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from devtools.photos import BENCH, encode
from shared.settings import REPO_ROOT, Settings
from tests.support import hostile_images as hostile
from worker.errors import ImageInputError
from worker.images.decode import DecodeLimits, ResizeRule, decode_image
from worker.images.decode_pool import DecodePool, decodes_in_place
from worker.images.limits import InputLimits

DEFAULTS = Settings()
# What a worker applies to a DINOv2 model (shortest edge 256) with the default settings.
LIMITS = replace(InputLimits.from_settings(DEFAULTS).decode, resize=ResizeRule(shortest_edge=256))


@pytest.mark.parametrize("name", sorted(hostile.refused_by_structure()))
def test_refused_before_decoding_with_the_limit_named(name: str) -> None:
    data, code, phrase = hostile.refused_by_structure()[name]
    started = time.process_time()
    with pytest.raises(ImageInputError) as error:
        decode_image(data, LIMITS)
    spent = time.process_time() - started
    print(f"{name}: {len(data)} bytes refused in {spent * 1000:.1f} ms CPU: {error.value.code}: {error.value.message}")
    assert (error.value.code, phrase in error.value.message) == (code, True), error.value.message
    assert spent < 1.0


def test_ordinary_files_pass_the_structure_checks() -> None:
    """Real photos, a progressive JPEG at the usual scan count, APNG frames, EXIF, ICC."""
    photo = Image.open(BENCH / "coffee_1600x1200.jpg")
    files = [p.read_bytes() for p in sorted(BENCH.iterdir())]
    files += [encode(photo, "JPEG", progressive=True, quality=90), encode(photo, "PNG"), encode(photo, "TIFF", compression="tiff_lzw", tile=(256, 256))]
    files += [hostile.accepted()[name] for name in sorted(hostile.accepted())]
    for data in files:
        assert decode_image(data, LIMITS).mode == "RGB"


def test_size_after_the_models_resize_is_what_counts() -> None:
    """1x16384 is refused for a shortest-edge model; for a fixed-size one (ViT: 224x224) it is not."""
    fixed = replace(LIMITS, resize=ResizeRule(height=224, width=224))
    assert decode_image(hostile.png_gray(1, 16_384), fixed).size == (1, 16_384)
    wide = encode(Image.new("RGB", (4000, 20)), "PNG")  # 200:1 stays within the budget at shortest edge 256
    assert decode_image(wide, LIMITS).size == (4000, 20)


@pytest.mark.parametrize(
    ("values", "expected"),
    [(0.5, 128), (1.0, 255), (128.0, 128), (32768.0, 128), (-1.0, 0)],
    ids=["float-0..1", "float-one", "float-0..255", "float-0..65535", "float-negative-min"],
)
def test_float_images_are_scaled_by_their_range(values: float, expected: int) -> None:
    """Mode F is not clipped to 0..255 (a 0..1 image used to turn black)."""
    ramp = np.full((4, 8), values, dtype=np.float32)
    ramp[0, 0] = min(values, 0.0)  # the range's low end
    out = np.asarray(decode_image(hostile.tiff_float(ramp), LIMITS))
    assert int(out[2, 2, 0]) == expected


def test_int32_image_wider_than_16_bits_is_stretched() -> None:
    values = np.zeros((4, 8), dtype=np.int32)
    values[0, 0], values[2, 2] = 1_000_000, 400_000
    out = np.asarray(decode_image(encode(Image.fromarray(values, mode="I"), "TIFF"), LIMITS))
    assert (int(out[0, 0, 0]), int(out[2, 2, 0]), int(out[3, 3, 0])) == (255, 102, 0)


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    decode_pool = DecodePool(1, DEFAULTS.decode_cpu_seconds, DEFAULTS.decode_max_bytes)
    yield decode_pool
    decode_pool.close()


def test_pool_returns_the_same_pixels_as_decoding_in_process(pool: DecodePool) -> None:
    for path in sorted(BENCH.iterdir())[:3]:
        data = path.read_bytes()
        assert np.array_equal(pool.decode(data, LIMITS), np.asarray(decode_image(data, LIMITS)))
    refused = hostile.refused_by_structure()["jpeg-10000-scans"][0]
    with pytest.raises(ImageInputError, match="IMBEDDINGS_JPEG_MAX_SCANS"):
        pool.decode(refused, LIMITS)


def test_cpu_budget_abandons_the_decode_and_replaces_the_child() -> None:
    pool = DecodePool(1, 0.3, DEFAULTS.decode_max_bytes)
    try:
        pool.decode((BENCH / "horse_800x600.jpg").read_bytes(), LIMITS)  # the child is up
        (child,) = pool._all
        heavy = hostile.heavy_jpeg()
        started = time.monotonic()
        with pytest.raises(ImageInputError) as error:
            pool.decode(heavy, LIMITS)
        print(f"abandoned after {time.monotonic() - started:.2f} s wall: {error.value.message}")
        assert error.value.code == "decode_budget_exceeded" and "IMBEDDINGS_DECODE_CPU_SECONDS" in error.value.message
        assert child.process.returncode is not None and child not in pool._all
        assert pool.decode((BENCH / "horse_800x600.jpg").read_bytes(), LIMITS).shape == (600, 800, 3)
    finally:
        pool.close()


def test_byte_budget_is_enforced_inside_the_child_even_past_the_estimate() -> None:
    """With the estimate switched off, the child's capped address space still stops the decode."""
    pool = DecodePool(1, DEFAULTS.decode_cpu_seconds, 32 * 2**20)
    unchecked = DecodeLimits(LIMITS.max_bytes, LIMITS.max_pixels, LIMITS.max_side)
    try:
        with pytest.raises(ImageInputError) as error:
            pool.decode(hostile.png_gray(8000, 6000), unchecked)  # 48 MP: 48 MB stored, 192 MB as RGB
        assert error.value.code == "image_too_large", error.value.message
        assert pool.decode((BENCH / "horse_800x600.jpg").read_bytes(), unchecked).shape == (600, 800, 3)
    finally:
        pool.close()


def test_decode_children_never_import_torch() -> None:
    code = "import sys, worker.images.decode_child; print(sorted(m for m in ('torch', 'transformers', 'celery') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_deadline_abandons_a_decode_in_progress(pool: DecodePool) -> None:
    """The request's deadline stops a decode that is still within its CPU budget."""
    pool.decode((BENCH / "horse_800x600.jpg").read_bytes(), LIMITS)  # the child is up
    heavy = hostile.heavy_jpeg()
    started = time.monotonic()
    with pytest.raises(ImageInputError) as error:
        pool.decode(heavy, LIMITS, deadline=time.time() + 0.2)
    print(f"abandoned {time.monotonic() - started:.2f} s after it started")
    assert error.value.code == "deadline_exceeded"
    assert pool.decode((BENCH / "horse_800x600.jpg").read_bytes(), LIMITS).shape == (600, 800, 3)


def test_a_child_killed_while_idle_is_replaced_without_failing_the_image(pool: DecodePool) -> None:
    photo = (BENCH / "horse_800x600.jpg").read_bytes()
    pool.decode(photo, LIMITS)
    (child,) = pool._all
    child.process.kill()
    child.process.wait()
    assert pool.decode(photo, LIMITS).shape == (600, 800, 3)
    assert child not in pool._all


def test_small_jpegs_and_pngs_are_decoded_in_place_within_a_small_share_of_the_budget(pool: DecodePool) -> None:
    """Small JPEGs and PNGs skip the child (it may be dead: it is not asked) and give the same pixels;
    the heaviest JPEG that qualifies (the largest size, the most scans allowed) costs a small share of
    the CPU budget, and small hostile files are refused in place with the limit named."""
    photo = Image.open(BENCH / "horse_800x600.jpg")
    small = [encode(photo.resize((256, 192)), "JPEG", quality=90), encode(photo.resize((512, 384)), "PNG")]
    (child,) = pool._all
    child.process.kill()
    child.process.wait()
    for data in small:
        assert decodes_in_place(data)
        assert np.array_equal(pool.decode(data, LIMITS), np.asarray(decode_image(data, LIMITS)))
    assert child in pool._all  # never asked, so never replaced
    heaviest = hostile.jpeg_many_scans(DEFAULTS.jpeg_max_scans, (512, 512))
    assert decodes_in_place(heaviest)
    started = time.process_time()
    assert pool.decode(heaviest, LIMITS).shape == (512, 512, 3)
    spent = time.process_time() - started
    print(f"heaviest in-place JPEG: {len(heaviest)} bytes, {DEFAULTS.jpeg_max_scans} scans, {spent * 1000:.1f} ms CPU")
    assert spent < DEFAULTS.decode_cpu_seconds / 10
    with pytest.raises(ImageInputError, match="IMBEDDINGS_JPEG_MAX_SCANS"):
        pool.decode(hostile.jpeg_many_scans(DEFAULTS.jpeg_max_scans + 1, (256, 192)), LIMITS)
    assert not decodes_in_place((BENCH / "horse_800x600.jpg").read_bytes())  # 800x600: over the pixels
    assert not decodes_in_place(hostile.tiff_gray16(64))  # not JPEG or PNG
