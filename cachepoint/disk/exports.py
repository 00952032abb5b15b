"""The daemon's attached disks, exported over NBD by name.

Read-only attachments export an image under its own name; a user's attachment exports
``USER/IMAGE`` and writes into the layer ``user/USER/IMAGE``. A ref (``os/win10:production``) can be
attached read-only too, even when its blocks are not here: they are fetched as reads need them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from cachepoint.blocksource import BlockSource, CachedSource, StoreSource, WriteBack
from cachepoint.blocksource.recode import Recoder
from cachepoint.disk.attach import open_disk
from cachepoint.disk.composite import CompositeDisk
from cachepoint.disk.nbd import NbdLimits, NbdServer, NbdTls, start_nbd
from cachepoint.disk.nbd.transmission import Observe
from cachepoint.disk.readcache import DecodedCache
from cachepoint.disk.snapshot import snapshot
from cachepoint.errors import CachepointError, ImageNotFound, InvalidInput, NotFound
from cachepoint.ids import Ref, validate_layer_name
from cachepoint.model import Manifest, VersionInfo
from cachepoint.store.store import IngestPins, Store

READ_CACHE_FILE = "read-cache"  # in the store directory, rebuilt empty by each daemon


class ExportNotFound(NotFound):
    """no disk is attached as {!r} (attached: {})"""


def user_layer_of(user: str, image: str) -> str:
    return validate_layer_name(f"user/{user}/{image}")


# Lazy boot: given a ref this store does not hold, the daemon resolves it at the coordinator and
# returns the version, its manifest, and the fleet as a source of its blocks (TieredSource).
RemoteOpener = Callable[[Ref], Awaitable[tuple[VersionInfo, Manifest, BlockSource]]]


def _same_ref(wanted: Ref, name: str) -> bool:
    try:
        return Ref.parse(name) == wanted
    except (CachepointError, ValueError):
        return False


class Disks:
    def __init__(
        self,
        store: Store,
        remote: RemoteOpener | None = None,
        read_cache: int = 0,
        recoder: Recoder | None = None,
    ) -> None:
        """``recoder``: blocks the disks and the HTTP reader decode from zstd again are re-stored in
        lz4 (cachepoint/blocksource/recode.py; the daemon's ``hot_codec``)."""
        self.store = store
        self.recoder = recoder
        self.remote = remote
        self.attached: dict[str, CompositeDisk] = {}
        self._lock = threading.Lock()
        self.server: NbdServer | None = None
        self._read_cache = read_cache
        self.decoded: DecodedCache | None = None
        self._pins: dict[int, IngestPins] = {}  # lazily booted disks' blocks, by id(disk)
        self._layers: dict[str, tuple[str, ...]] = {}  # every layer under each export, for NBD's TLS
        self._tls = False

    async def open_cache(self) -> None:
        """Create the decoded-block cache (once): one for every disk and the HTTP reader, so images
        that share an OS layer share its warm blocks."""
        if self._read_cache > 0 and self.decoded is None:
            path = self.store.root / READ_CACHE_FILE
            self.decoded = await asyncio.to_thread(DecodedCache, path, self._read_cache)

    def local_source(self) -> BlockSource:
        """The store's blocks, through the decoded cache when there is one."""
        local = StoreSource(self.store, recoder=self.recoder)
        return local if self.decoded is None else CachedSource(local, self.decoded)

    def lazy_version(self, ref: str) -> tuple[VersionInfo, Manifest, BlockSource] | None:
        """The version, manifest and block source of a lazily attached ``ref`` (as attached, or by its
        version's own ref), for the HTTP reader; None when no such disk is attached."""
        try:
            wanted = Ref.parse(ref)
        except (CachepointError, ValueError):
            return None
        with self._lock:
            disks = list(self.attached.items())
        for name, disk in disks:
            if id(disk) not in self._pins:  # not lazily booted
                continue
            info, manifest = disk.stack[0]
            if _same_ref(wanted, name) or (wanted.layer, wanted.number) == (info.layer, info.number):
                return info, manifest, disk.source
        return None

    async def serve(
        self,
        tcp: str | None,
        unix_path: str | None,
        limits: NbdLimits | None = None,
        tls: NbdTls | None = None,
        observe: Observe | None = None,
    ) -> list[str]:
        await self.open_cache()
        if unix_path is not None and not Path(unix_path).parent.is_dir():
            raise InvalidInput(
                f"--nbd-socket {unix_path}: the directory {Path(unix_path).parent} does not exist "
                "(the daemon makes the socket, not its directory)"
            )
        try:
            self.server = await start_nbd(
                self.attached.get, lambda: sorted(self.attached), tcp, unix_path, limits, tls, observe
            )
        except OSError as err:  # in use, not ours, no permission: name what was asked for
            asked = " and ".join(
                [f"--nbd {tcp}"] * bool(tcp) + [f"--nbd-socket {unix_path}"] * bool(unix_path)
            )
            raise InvalidInput(f"cannot serve NBD on {asked}: {err.strerror or err}") from err
        self._tls = tls is not None
        return self.server.addresses

    def layers_of(self, name: str) -> tuple[str, ...] | None:
        """The layers export ``name`` reads (its user's layer included); None when it is not attached."""
        with self._lock:
            return self._layers.get(name) if name in self.attached else None

    def uris(self, name: str) -> list[str]:
        uris = []
        for address in self.server.addresses if self.server else []:
            if address.startswith("unix:"):
                uris.append(f"nbd+unix:///{name}?socket={address[len('unix:') :]}")
            else:
                uris.append(f"{'nbds' if self._tls else 'nbd'}://{address}/{name}")
        return uris

    async def attach(self, image: str, user: str) -> tuple[str, CompositeDisk]:
        if self.server is None:
            raise InvalidInput(
                "this daemon serves no NBD exports: start it with --nbd HOST:PORT or --nbd-socket"
            )
        name = f"{user}/{image}" if user else image
        layer = user_layer_of(user, image) if user else None
        with self._lock:
            if name in self.attached:
                return name, self.attached[name]
        if not user and "/" in image and self.remote is not None:
            ref = Ref.parse(image)
            layers: tuple[str, ...] = (ref.layer,)
            disk = await self._attach_ref(ref)
        else:
            refs = self._local_refs(image)
            layers = tuple(Ref.parse(r).layer for r in refs) + ((layer,) if layer else ())
            disk = await asyncio.to_thread(
                open_disk,
                self.store,
                refs,
                user_layer=layer,
                name=name,
                decoded=self.decoded,
                source=StoreSource(self.store, recoder=self.recoder),
            )
        with self._lock:
            self._layers[name] = layers
            self.attached[name] = disk
        return name, disk

    def _local_refs(self, image: str) -> tuple[str, ...]:
        """The refs of the image named ``image``; else, without a coordinator to ask, the version held
        here that ``image`` names as a ref (os/win10:production), so a daemon serving its own store
        alone attaches what it holds."""
        try:
            return self.store.catalog.image(image).refs
        except ImageNotFound:
            if not any(mark in image for mark in "/@:"):
                raise  # a name, not a ref: the image is what is missing
        self.store.catalog.resolve(image)  # the ref's own NotFound (layer, version or tag) when absent
        return (image,)

    async def _attach_ref(self, ref: Ref) -> CompositeDisk:
        """A read-only disk of one version, booted lazily: blocks not here are fetched on first read."""
        assert self.remote is not None
        info, manifest, fleet = await self.remote(ref)
        source = WriteBack(StoreSource(self.store, manifest.block_size, self.recoder), fleet)
        disk = CompositeDisk(self.store, [(info, manifest)], source=source, decoded=self.decoded)
        # No local version names these blocks: pinned while the disk is attached, or GC would take
        # what the reads fetched.
        pins = self.store.register_pins(info.layer)
        self.store.pin(pins, manifest.block_ids())
        self._pins[id(disk)] = pins
        return disk

    def get(self, name: str) -> CompositeDisk:
        disk = self.attached.get(name)
        if disk is None:
            raise ExportNotFound(name, ", ".join(sorted(self.attached)) or "none")
        return disk

    async def detach(self, name: str, discard: bool) -> None:
        disk = self.get(name)
        with self._lock:
            self.attached.pop(name, None)
            self._layers.pop(name, None)
        if discard and disk.working is not None:
            await asyncio.to_thread(disk.working.discard)
        await asyncio.to_thread(disk.close)
        self._unpin(disk)

    async def snapshot(self, name: str, message: str, author: str, device: str) -> VersionInfo:
        disk = self.get(name)
        if disk.working is None:
            raise InvalidInput(f"{name} is attached read-only: there is nothing to snapshot")
        return await asyncio.to_thread(
            snapshot, self.store, disk, disk.working.layer, message, author=author, device=device
        )

    def _unpin(self, disk: CompositeDisk) -> None:
        pins = self._pins.pop(id(disk), None)
        if pins is not None:
            self.store.end_ingest(pins, committed=True)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
        for name in list(self.attached):
            disk = self.attached.pop(name)
            await asyncio.to_thread(disk.close)
            self._unpin(disk)
        if self.decoded is not None:
            self.decoded.close()
