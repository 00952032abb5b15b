"""Generated sample disk images (for the demo, tests and benchmarks): holes, compressible text and
random data.

Blocks come in runs of 1-32 of one kind (40% zero, 30% text-like, 30% random by default), as real
images cluster their free space and file data. Deterministic for a given seed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

BLOCK = 64 * 1024
_WORDS = [
    "the",
    "of",
    "and",
    "disk",
    "layer",
    "version",
    "block",
    "image",
    "user",
    "system",
    "config",
    "data",
    "kernel",
    "driver",
    "service",
    "window",
    "registry",
    "profile",
    "cache",
    "update",
    "network",
    "file",
]


def _text(rng: random.Random, size: int) -> bytes:
    """Text-like bytes: Zipf-ish words, numbers and hex (zstd-1 compresses it about 2x)."""
    parts: list[str] = []
    length = 0
    while length <= size:
        pick = rng.random()
        if pick < 0.7:
            word = _WORDS[min(int(rng.paretovariate(1.2)) - 1, len(_WORDS) - 1)]
        elif pick < 0.85:
            word = str(rng.randrange(1_000_000))
        else:
            word = rng.randbytes(6).hex()
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts).encode()[:size]


_CORPUS_SIZE = 4 * 1024 * 1024
_corpus: list[bytes] = []


def text_block(rng: random.Random, size: int = BLOCK) -> bytes:
    """A text-like block: a random window of one generated corpus (fast, and compresses like text;
    windows at different offsets are different blocks)."""
    if not _corpus:
        _corpus.append(_text(random.Random(0), _CORPUS_SIZE + BLOCK * 64))
    start = rng.randrange(_CORPUS_SIZE)
    return _corpus[0][start : start + size]


def block_kinds(
    blocks: int, rng: random.Random, mix: tuple[float, float, float] = (0.4, 0.3, 0.3)
) -> list[str]:
    kinds: list[str] = []
    while len(kinds) < blocks:
        pick = rng.random()
        kind = "zero" if pick < mix[0] else "text" if pick < mix[0] + mix[1] else "random"
        kinds.extend([kind] * rng.randint(1, 32))
    return kinds[:blocks]


def make_block(kind: str, rng: random.Random, size: int = BLOCK) -> bytes:
    if kind == "zero":
        return bytes(size)
    if kind == "text":
        return text_block(rng, size)
    return rng.randbytes(size)


def generate(path: Path, size: int, seed: int = 1, block: int = BLOCK) -> None:
    """Write an image of ``size`` bytes; zero runs are written as zeros (not sparse), like a raw dd copy."""
    rng = random.Random(seed)
    blocks = size // block
    with open(path, "wb") as out:
        for kind in block_kinds(blocks, rng):
            out.write(make_block(kind, rng, block))


def mutate(
    src: Path, dst: Path, fraction: float, seed: int = 2, block: int = BLOCK, like_image: bool = False
) -> int:
    """Copy ``src`` to ``dst`` with ``fraction`` of its blocks rewritten.

    By default every rewritten block gets fresh text or random data (the worst case for storage:
    each change is a new block). With ``like_image`` the new content follows the image's own mix,
    as writes to a cloned disk do: a data block may be zeroed (40%) or get new text or random data
    (30% each), a free (zero) block gets new text or random data. A rewritten block always differs.
    """
    rng = random.Random(seed)
    size = os.path.getsize(src)
    blocks = size // block
    chosen = rng.sample(range(blocks), int(blocks * fraction))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(64 * 1024 * 1024):
            fout.write(chunk)
    with open(dst, "r+b") as fout:
        for index in chosen:
            fout.seek(index * block)
            kind = rng.choice(("text", "random"))
            if like_image and rng.random() < 0.4 and fout.read(block) != bytes(block):
                kind = "zero"
            fout.seek(index * block)
            fout.write(make_block(kind, rng, block))
    return len(chosen)
