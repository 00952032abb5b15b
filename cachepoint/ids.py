"""Typed identifiers: block ids, layer names, tags and refs. Values only, no I/O."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cachepoint.errors import InvalidLayerName, InvalidRef, InvalidTag

DIGEST_SIZE = 32  # bytes of SHA-256
HOLE_DIGEST = bytes(DIGEST_SIZE)  # marks an all-zero block in a packed list; no real digest is all zero


@dataclass(frozen=True, slots=True)
class BlockId:
    """The identity of a block on every machine: the SHA-256 of its raw bytes.

    Printed as ``sha256:<hex>``; held as the 32 raw digest bytes so that packed lists and store keys
    need no conversion.
    """

    digest: bytes

    ALGORITHM = "sha256"

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"a sha256 block id has {DIGEST_SIZE} bytes, got {len(self.digest)}")

    @classmethod
    def of(cls, data: bytes | memoryview) -> BlockId:
        return cls(hashlib.sha256(data).digest())

    @classmethod
    def parse(cls, text: str) -> BlockId:
        algorithm, sep, hexpart = text.partition(":")
        if sep != ":" or algorithm != cls.ALGORITHM:
            raise ValueError(f"block id {text!r} must look like sha256:<64 hex digits>")
        try:
            digest = bytes.fromhex(hexpart)
        except ValueError as err:
            raise ValueError(f"block id {text!r} must look like sha256:<64 hex digits>") from err
        return cls(digest)

    def __str__(self) -> str:
        return f"{self.ALGORITHM}:{self.digest.hex()}"

    def short(self) -> str:
        return f"{self.ALGORITHM}:{self.digest.hex()[:12]}"


def pack_ids(ids: list[bytes]) -> bytes:
    return b"".join(ids)


def unpack_ids(packed: bytes) -> list[bytes]:
    if len(packed) % DIGEST_SIZE:
        raise ValueError(f"packed block ids must be a multiple of {DIGEST_SIZE} bytes, got {len(packed)}")
    return [packed[i : i + DIGEST_SIZE] for i in range(0, len(packed), DIGEST_SIZE)]


# Layer names: slash-separated segments of lowercase letters, digits, '.', '_' and '-',
# each starting with a letter or digit: os/win10, app/office, user/alice/desktop.
_SEGMENT = r"[a-z0-9][a-z0-9._-]{0,63}"
_LAYER_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT}){{0,7}}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_LAYER_NAME = 255


def validate_layer_name(name: str) -> str:
    if not name:
        raise InvalidLayerName(name, "it is empty")
    if len(name) > MAX_LAYER_NAME:
        raise InvalidLayerName(name, f"longer than {MAX_LAYER_NAME} characters")
    if ".." in name.split("/"):
        raise InvalidLayerName(name, "'..' is not a segment")
    if not _LAYER_RE.match(name):
        raise InvalidLayerName(
            name,
            "use up to 8 '/'-separated segments of lowercase letters, digits, '.', '_' and '-', "
            "each starting with a letter or digit (e.g. os/win10, user/alice/desktop)",
        )
    return name


def validate_tag(tag: str) -> str:
    if not _TAG_RE.match(tag):
        raise InvalidTag(tag, "use letters, digits, '.', '_' and '-', starting with a letter or digit")
    if tag.isdigit():
        raise InvalidTag(tag, "a tag cannot be all digits (it would read as a version number)")
    return tag


LATEST = "latest"


@dataclass(frozen=True, slots=True)
class Ref:
    """``layer@N`` (a version number) or ``layer:tag``; a bare layer means ``layer:latest``."""

    layer: str
    number: int | None = None
    tag: str | None = None

    def __post_init__(self) -> None:
        if (self.number is None) == (self.tag is None):
            raise ValueError("a ref has exactly one of a version number and a tag")

    @classmethod
    def parse(cls, text: str) -> Ref:
        if "@" in text:
            layer, _, number_text = text.partition("@")
            if not number_text.isdigit() or int(number_text) < 1:
                raise InvalidRef(text, "the version after '@' must be a whole number from 1")
            cls._check_layer(text, layer)
            return cls(layer, number=int(number_text))
        layer, sep, tag = text.partition(":")
        cls._check_layer(text, layer)
        if not sep:
            return cls(layer, tag=LATEST)
        try:
            validate_tag(tag)
        except InvalidTag as err:
            raise InvalidRef(text, str(err)) from err
        return cls(layer, tag=tag)

    @staticmethod
    def _check_layer(text: str, layer: str) -> None:
        try:
            validate_layer_name(layer)
        except InvalidLayerName as err:
            raise InvalidRef(text, str(err)) from err

    def __str__(self) -> str:
        return f"{self.layer}@{self.number}" if self.number is not None else f"{self.layer}:{self.tag}"
