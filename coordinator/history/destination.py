"""Writing what the coordinator sends (a file of `history get`, an export's tar) on the client, never
outside the destination the user named.

The bytes go to a temporary file beside the destination and take its name only once complete and
synced (``cachepoint.atomic``, whose rules say what may be replaced: nothing non-empty without
``force``, a symlink replaced and never followed, never a device). A transfer that stops midway leaves
nothing behind, and a file it was to replace is left as it was.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from cachepoint.atomic import new_file
from cachepoint.errors import InvalidInput
from cachepoint.model import check_relative_path


def file_target(dest: str | Path, path: str) -> Path:
    """Where `history get` writes ``path``: into ``dest`` under the path's last segment when ``dest``
    is a directory, or names one with a trailing slash (made here if its parent exists), else at
    ``dest`` itself. The last segment of a checked manifest path is never empty, '.', '..' or
    anything with a '/'."""
    name = check_relative_path(path).rsplit("/", 1)[-1]
    directory = Path(dest)
    if str(dest).endswith(os.sep) and not directory.is_dir():
        if not directory.parent.is_dir():
            raise InvalidInput(f"cannot make directory {dest}: its parent {directory.parent} does not exist")
        try:
            directory.mkdir()
        except OSError as err:
            raise InvalidInput(f"cannot make directory {dest}: {err.strerror or err}") from err
    if directory.is_dir():
        return directory / name
    if not directory.parent.is_dir():
        raise InvalidInput(f"cannot write {dest}: directory {directory.parent} does not exist")
    return directory


async def receive(chunks: AsyncIterator[bytes], target: Path, *, force: bool, mode: int = 0o600) -> int:
    """Write the chunks next to ``target`` and give them its name at the end; returns bytes written.
    ``mode`` keeps permission bits only (no setuid, setgid or sticky bit from a stored file)."""
    written = 0
    with new_file(target, force=force, mode=mode & 0o777) as fd:
        async for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            written += len(chunk)
    return written
