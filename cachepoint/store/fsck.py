"""Integrity check: the catalog's census (every record read with checks, cross-checked and compared
with the catalog journal), then every referenced block read back and verified.

Reports each problem with the object it concerns and the versions it touches. Unreadable records are
reported as unreadable, never as absent. Unreferenced blocks and interrupted ingests are not problems
(GC removes them) but are reported.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cachepoint.blocks import decode_verified
from cachepoint.errors import BlockCorrupt, BlockUnreadable, RecordsUnreadable
from cachepoint.ids import BlockId
from cachepoint.store import census
from cachepoint.store import format as fmt
from cachepoint.store.store import Store

BATCH = 64
ProgressFn = Callable[[int, int], None]


@dataclass
class Problem:
    # missing-block, corrupt-block, unreadable-block, manifest, layer, tag, image, unreadable-records,
    # missing-record, journal, database (see cachepoint/store/census.py for the catalog kinds)
    kind: str
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
    unreferenced_exact: bool = True
    interrupted_ingests: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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
            "unreferenced_exact": self.unreferenced_exact,
            "interrupted_ingests": self.interrupted_ingests,
            "problems": [p.as_json() for p in self.problems],
            "notes": self.notes,
        }


def check_blocks(store: Store, digests: list[bytes]) -> tuple[int, list[tuple[bytes, str, str]]]:
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
    found = census.take(store)
    report.versions = len(found.versions)
    for finding in found.findings:
        report.problems.append(Problem(finding.kind, finding.subject, finding.detail, list(finding.versions)))
    try:
        images = store.catalog.images()
    except RecordsUnreadable as err:
        images = []
        report.problems.append(Problem("unreadable-records", fmt.CF_IMAGES, str(err.args[2])))
    for image in images:
        for ref in image.refs:
            try:
                store.catalog.resolve(ref)
            except Exception as err:
                report.problems.append(Problem("image", image.name, f"{ref}: {err}"))
    manifests = found.manifests
    users = found.users

    referenced: set[bytes] = set()
    for manifest in manifests.values():
        referenced |= manifest.block_ids()
    ordered = sorted(referenced)
    bad: dict[bytes, tuple[str, str]] = {}
    batches = [ordered[i : i + BATCH] for i in range(0, len(ordered), BATCH)]
    with ThreadPoolExecutor(2, thread_name_prefix="fsck") as pool:
        for batch, (verified, problems) in zip(
            batches, pool.map(lambda b: check_blocks(store, b), batches), strict=True
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
    try:
        referenced |= store.working_block_ids()
    except RecordsUnreadable:
        pass  # reported by the census
    try:
        for digest in store.blocks.scan_ids():
            if digest not in referenced:
                report.unreferenced_blocks += 1
    except RecordsUnreadable as err:
        # Every referenced block was read on its own above, so a damaged stretch of the blocks family
        # hides only unreferenced ones (or ones already named): the count is a lower bound.
        report.unreferenced_exact = False
        report.notes.append(f"unreferenced blocks counted up to damage in the blocks family: {err.args[2]}")
    try:
        report.interrupted_ingests = [
            f"{i.layer} (pid {i.pid}, started {i.started_ns})" for i in store.interrupted_ingests()
        ]
    except RecordsUnreadable as err:
        report.problems.append(Problem("unreadable-records", fmt.CF_INGESTS, str(err.args[2])))
    return report
