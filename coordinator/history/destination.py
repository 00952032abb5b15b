"""Writing what the coordinator sends (a file of `history get`, an export's tar) on the client, never
outside the destination the user named.

The bytes go to a temporary file created exclusively in the destination directory, then take their
final name with a rename (which replaces a symlink itself, never what it points at) or, for exports,
with a hard link that fails when the name exists (never overwriting evidence). A transfer that stops
midway leaves no file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from cachepoint.errors import InvalidInput
from cachepoint.model import check_relative_path

TEMP_PREFIX = ".cachepoint-partial-"


def file_target(dest: Path, path: str) -> Path:
    """Where `history get` writes ``path``: into ``dest`` under the path's last segment when ``dest``
    is a directory, else at ``dest`` itself. The last segment of a checked manifest path is never
    empty, '.', '..' or anything with a '/'."""
    name = check_relative_path(path).rsplit("/", 1)[-1]
    if dest.is_dir():
        return dest / name
    if not dest.parent.is_dir():
        raise InvalidInput(f"cannot write {dest}: directory {dest.parent} does not exist")
    return dest


async def receive(chunks: AsyncIterator[bytes], target: Path, *, overwrite: bool, mode: int = 0o600) -> int:
    """Write the chunks next to ``target`` and give them its name at the end; returns bytes written.
    ``mode`` keeps permission bits only (no setuid, setgid or sticky bit from a stored file)."""
    if target.is_dir() and not target.is_symlink():
        raise InvalidInput(f"cannot write {target}: it is a directory")
    if not overwrite and os.path.lexists(target):
        raise InvalidInput(f"{target} exists: choose a new name (an export never overwrites a file)")
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
            out.flush()
            os.fchmod(out.fileno(), mode & 0o777)
            os.fsync(out.fileno())
        if overwrite:
            os.replace(temp, target)
        else:
            try:
                os.link(temp, target)
            except FileExistsError as err:
                raise InvalidInput(f"{target} exists: choose a new name") from err
            os.unlink(temp)
    except BaseException:
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    return written
