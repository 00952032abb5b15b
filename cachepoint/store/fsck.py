"""Integrity check: every manifest and every referenced block is read back and verified.

Reports each problem with the object it concerns and the versions it touches. Unreferenced blocks
and interrupted ingests are not problems (GC removes them) but are reported.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cachepoint.blocks import decode_verified
from cachepoint.errors import BlockCorrupt, BlockUnreadable
from cachepoint.ids import BlockId
from cachepoint.model import Manifest
from cachepoint.store.store import Store
from cachepoint.wire import manifest_digest, manifest_from_bytes

BATCH = 64
ProgressFn = Callable[[int, int], None]


@dataclass
class Problem:
    kind: str  # missing-block, corrupt-block, unreadable-block, manifest, layer, tag, image
    subject: str
    detail: str
    versions: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail, "versions": self.versions}


@dataclass
class FsckReport:
    versions: int = 0
    blocks_checked: int = 0
    bytes_verified: int = 0
    unreferenced_blocks: int = 0
    interrupted_ingests: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "versions": self.versions,
            "blocks_checked": self.blocks_checked,
            "bytes_verified": self.bytes_verified,
            "unreferenced_blocks": self.unreferenced_blocks,
            "interrupted_ingests": self.interrupted_ingests,
            "problems": [p.as_json() for p in self.problems],
        }


def _check_batch(store: Store, digests: list[bytes]) -> tuple[int, list[tuple[bytes, str, str]]]:
    """Verify a batch; returns (bytes verified, [(digest, kind, detail)])."""
    problems: list[tuple[bytes, str, str]] = []
    verified = 0
    try:
        values = store.blocks.raw_many(digests)
    except BlockUnreadable:  # look at each block alone, so that every unreadable one is named
        values = []
        for digest in digests:
            try:
                values.append(store.blocks.raw(digest))
            except BlockUnreadable as err:
                problems.append((digest, "unreadable-block", f"the database cannot read it: {err.args[1]}"))
                values.append(None)
    unreadable = {digest for digest, _, _ in problems}
    for digest, value in zip(digests, values, strict=True):
        if digest in unreadable:
            continue
        if value is None:
            problems.append((digest, "missing-block", "referenced but not in the store"))
            continue
        try:
            verified += len(decode_verified(digest, value))
        except BlockCorrupt as err:
            problems.append((digest, "corrupt-block", str(err)))
    return verified, problems


def fsck(store: Store, progress: ProgressFn | None = None) -> FsckReport:
    report = FsckReport()
    catalog = store.catalog
    manifests: dict[bytes, Manifest] = {}
    users: dict[bytes, list[str]] = {}  # manifest digest -> versions using it
    for layer in catalog.layers():
        versions = catalog.versions(layer.name)
        numbers = [v.number for v in versions]
        if not numbers or max(numbers) != layer.latest:
            report.problems.append(
                Problem(
                    "layer",
                    layer.name,
                    f"records latest version {layer.latest}, has {numbers[-1:] or 'none'}",
                )
            )
        for tag, number in catalog.tags(layer.name).items():
            if number not in numbers:
                report.problems.append(
                    Problem("tag", f"{layer.name}:{tag}", f"points at missing version {number}")
                )
        for info in versions:
            report.versions += 1
            users.setdefault(info.manifest_digest, []).append(info.ref)
    for digest, refs in users.items():
        try:
            raw = catalog.manifest_bytes(digest)
            if manifest_digest(raw) != digest:
                raise ValueError("its bytes do not match its digest")
            manifests[digest] = manifest_from_bytes(raw)
        except Exception as err:
            report.problems.append(Problem("manifest", str(BlockId(digest)), str(err), list(refs)))
    for image in catalog.images():
        for ref in image.refs:
            try:
                catalog.resolve(ref)
            except Exception as err:
                report.problems.append(Problem("image", image.name, f"{ref}: {err}"))

    referenced: set[bytes] = set()
    for manifest in manifests.values():
        referenced |= manifest.block_ids()
    ordered = sorted(referenced)
    bad: dict[bytes, tuple[str, str]] = {}
    batches = [ordered[i : i + BATCH] for i in range(0, len(ordered), BATCH)]
    with ThreadPoolExecutor(2, thread_name_prefix="fsck") as pool:
        for batch, (verified, problems) in zip(
            batches, pool.map(lambda b: _check_batch(store, b), batches), strict=True
        ):
            report.blocks_checked += len(batch)
            report.bytes_verified += verified
            for digest, kind, detail in problems:
                bad[digest] = (kind, detail)
            if progress is not None:
                progress(report.blocks_checked, len(ordered))
    if bad:
        touched: dict[bytes, list[str]] = {d: [] for d in bad}
        for digest, manifest in manifests.items():
            hit = manifest.block_ids() & bad.keys()
            for block in hit:
                touched[block].extend(users[digest])
        for block, (kind, detail) in sorted(bad.items()):
            report.problems.append(Problem(kind, str(BlockId(block)), detail, sorted(touched[block])))
    # Blocks named by attached disks' working maps are in use, not garbage (GC keeps them too).
    referenced |= store.working_block_ids()
    report.unreferenced_blocks = sum(1 for d in store.blocks.scan_ids() if d not in referenced)
    report.interrupted_ingests = [
        f"{i.layer} (pid {i.pid}, started {i.started_ns})" for i in store.interrupted_ingests()
    ]
    return report
