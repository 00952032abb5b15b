"""Chunks assembled from their units, in threads: each unit received checked against its digest,
each chunk against its SHA-256 id (docs/design.md "Unit fetch"). No I/O but the seed's reads of the
chunks held here."""

from __future__ import annotations

from dataclasses import dataclass, field

import xxhash

from cachepoint.blocks import block_digest, decode_block, decode_verified, encode_block, size_problem
from cachepoint.chunking import UNIT_DIGEST_SIZE, unit_digests
from cachepoint.errors import BlockCorrupt
from cachepoint.ids import BlockId
from cachepoint.replication.seed import Piece, Place, Seed
from cachepoint.replication.sources import Part
from cachepoint.store.units import encode_record

# What a window's answer brought: units checked against their digests, by place; whole chunks checked
# against their ids (their values as stored, and their bytes); and why any answer was refused.
Received = tuple[dict[Place, Piece], dict[bytes, tuple[bytes, bytes]], list[str]]


@dataclass
class Window:
    ids: list[bytes]
    plans: dict[bytes, list[Place | None]] = field(default_factory=dict)  # None: fetched with this window
    fetch: dict[bytes, list[int]] = field(default_factory=dict)  # unit indexes asked for, per chunk
    received: dict[bytes, Part] = field(default_factory=dict)  # the answer for each chunk asked


class Assembler:
    def __init__(self, unit: int, block_size: int, digests: dict[bytes, bytes], seed: Seed) -> None:
        self.unit = unit
        self.block_size = block_size
        self.digests = digests  # chunk id -> the packed unit digests its source gave
        self.seed = seed

    def received(self, window: Window, lengths: dict[bytes, int]) -> Received:
        """The units a window's answer brought (each checked against its digest), the whole chunks it
        brought (verified against their ids: their stored values are kept as they are), and why any
        answer was refused. Runs in a thread."""
        fetched: dict[Place, Piece] = {}
        whole: dict[bytes, tuple[bytes, bytes]] = {}
        bad: list[str] = []
        unit = self.unit
        for chunk, part in window.received.items():
            if part.partial:
                pieces, problem = self._split(chunk, part.value, window.fetch[chunk], lengths[chunk])
                if problem:
                    bad.append(problem)
                fetched.update(pieces)
                continue
            if problem := size_problem(part.value, self.block_size):
                bad.append(f"block {BlockId(chunk)} is refused: {problem}")
                continue
            try:
                data = decode_verified(chunk, part.value, self.block_size)
            except BlockCorrupt as err:
                bad.append(str(err))
                continue
            whole[chunk] = (part.value, data)
            # Views, not copies: a whole chunk's units are most of the bytes a pull receives, and
            # copying them held the GIL that the other threads' assembly waits for.
            view = memoryview(data)
            fetched.update(
                ((chunk, i), view[i * unit : (i + 1) * unit]) for i in range(len(window.plans[chunk]))
            )
        return fetched, whole, bad

    def assembled(
        self,
        window: Window,
        ids: list[bytes],
        lengths: dict[bytes, int],
        fetched: dict[Place, Piece],
        whole: dict[bytes, tuple[bytes, bytes]],
    ) -> tuple[list[tuple[bytes, bytes, bytes]], list[bytes], list[str]]:
        """(stored chunks: id, value, unit record), chunks that failed, and why those that did not
        match failed. Runs in a thread."""
        unit = self.unit
        in_window = window.plans.keys()
        held = self.seed.read(
            place for chunk in ids for place in window.plans[chunk] if place and place[0] not in in_window
        )
        good: list[tuple[bytes, bytes, bytes]] = []
        failed: list[bytes] = []
        bad: list[str] = []
        for chunk in ids:
            if chunk in whole:
                value, data = whole[chunk]
                good.append((chunk, value, encode_record(unit, unit_digests(data, unit))))
                continue
            pieces: list[Piece] = []
            for index, place in enumerate(window.plans[chunk]):
                if place is None:
                    piece = fetched.get((chunk, index))
                else:
                    piece = (fetched if place[0] in in_window else held).get(place)
                if piece is None:
                    break
                pieces.append(piece)
            else:
                data = b"".join(pieces)
                if len(data) == lengths[chunk] and block_digest(data) == chunk:
                    packed = self.digests[chunk]
                    good.append((chunk, encode_block(data), encode_record(unit, packed)))
                    continue
                if chunk in window.fetch:  # units held here are not the source's doing
                    bad.append(f"chunk {BlockId(chunk)} assembled from its units does not match its id")
            failed.append(chunk)
        return good, failed, bad

    def _split(
        self, chunk: bytes, value: bytes, indexes: list[int], length: int
    ) -> tuple[dict[Place, Piece], str]:
        """The units of an answer, each checked against its digest; or why the answer is refused."""
        unit = self.unit
        sizes = [min(unit, length - index * unit) for index in indexes]
        expected = sum(sizes)
        if problem := size_problem(value, expected):  # before a byte of it is decoded
            return {}, f"units of chunk {BlockId(chunk)} refused: {problem}"
        try:
            data = decode_block(value, expected)
        except Exception as err:
            return {}, f"units of chunk {BlockId(chunk)} cannot be decoded: {err}"
        if len(data) != expected:
            return {}, f"units of chunk {BlockId(chunk)}: {len(data)} bytes, {expected} asked for"
        packed = self.digests[chunk]
        pieces: dict[Place, Piece] = {}
        view = memoryview(data)
        at = 0
        for index, size in zip(indexes, sizes, strict=True):
            piece = view[at : at + size]
            at += size
            if (
                xxhash.xxh3_128_digest(piece)
                != packed[index * UNIT_DIGEST_SIZE : (index + 1) * UNIT_DIGEST_SIZE]
            ):
                return {}, f"unit {index} of chunk {BlockId(chunk)} does not match its digest"
            pieces[(chunk, index)] = piece
        return pieces, ""
