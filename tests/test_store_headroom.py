"""The store's reserve (STORE/reserve) and the min_free setting, on the test's own file system.

On a full disk the reserve is what lets gc open the store and log its deletions (see
tests/test_disk_headroom.py); here: it is made of real blocks, sized by the setting and the store,
released by headroom() for the duration of a command and put back by the outermost one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cachepoint.errors import InvalidInput
from cachepoint.status import status_of
from cachepoint.store.headroom import ensure_reserve, headroom, reserve_on_disk
from cachepoint.store.space import SpaceLimit
from cachepoint.store.store import Store
from tests.conftest import daemon, run_cli
from tests.fleet import random_image

MiB = 1 << 20


def write_config(store: Path, text: str) -> None:
    """The config file the commands of tests.conftest.run_cli read for ``store``."""
    path = store.parent / "xdg-config" / "cachepoint" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_writable_command_makes_a_reserve_of_real_blocks_and_a_read_only_one_does_not(
    store_dir: Path,
) -> None:
    run_cli(store_dir, "init")
    reserve = store_dir / "reserve"
    st = reserve.stat()
    # A new store is small: the reserve is the 1 MiB floor, every byte of it allocated.
    assert st.st_size == 1 * MiB
    assert st.st_blocks * 512 >= st.st_size
    reserve.unlink()
    run_cli(store_dir, "ls")
    run_cli(store_dir, "fsck")
    assert not reserve.exists()
    run_cli(store_dir, "gc")  # gc releases it while it runs, then puts it back
    assert reserve.stat().st_size == 1 * MiB


def test_the_reserve_grows_with_the_store_up_to_the_setting_and_zero_removes_it(
    store_dir: Path, tmp_path: Path
) -> None:
    image = tmp_path / "image.img"
    random_image(image, 4 * MiB, seed=5)
    write_config(store_dir, 'reserve = "2M"\n')
    run_cli(store_dir, "ingest", "os/x", image)
    run_cli(store_dir, "tag", "os/x@1", "production")  # a writable open after the store has grown
    assert reserve_on_disk(store_dir) == 2 * MiB
    write_config(store_dir, 'reserve = "0"\n')
    run_cli(store_dir, "tag", "os/x@1", "staging")
    assert not (store_dir / "reserve").exists()
    write_config(store_dir, 'reserve = "a lot"\n')
    bad = run_cli(store_dir, "tag", "os/x@1", "staging", check=False)
    assert bad.code == 4 and "reserve" in bad.err, bad


def test_headroom_releases_the_reserve_while_it_lasts_and_only_the_outermost_puts_it_back(
    store_dir: Path,
) -> None:
    with Store.open(store_dir, writable=True, create=True):
        held = ensure_reserve(store_dir)
    assert held == 1 * MiB
    with headroom(store_dir) as released:
        assert released == held and reserve_on_disk(store_dir) == 0
        with headroom(store_dir) as inner:
            assert inner == 0
        assert reserve_on_disk(store_dir) == 0  # still released: the outer command is running
        assert ensure_reserve(store_dir) == 0  # nor does a writable open inside it make it again
    assert reserve_on_disk(store_dir) == held


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [("5%", 1000 * MiB, 50 * MiB), ("0.5%", 1000 * MiB, 5 * MiB), ("2G", 1000 * MiB, 2 << 30), ("0", 10, 0)],
)
def test_min_free_is_a_share_of_the_file_system_or_a_size(text: str, total: int, expected: int) -> None:
    assert SpaceLimit.parse(text, "min_free").of(total) == expected


@pytest.mark.parametrize("text", ["100%", "150%", "lots", "-5%", "5 percent"])
def test_min_free_that_is_not_a_size_or_a_share_below_100_percent_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="min_free"):
        SpaceLimit.parse(text, "min_free")


def test_serve_refuses_a_bad_min_free_naming_it(store_dir: Path) -> None:
    write_config(store_dir, 'min_free = "most of it"\n')
    bad = run_cli(store_dir, "serve", "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert bad.code == 4, bad
    assert "min_free" in bad.err and "5%" in bad.err, bad.err


def test_serve_min_free_flag_wins_over_the_file_and_a_bad_one_is_refused_naming_it(store_dir: Path) -> None:
    write_config(store_dir, 'min_free = "10%"\n')
    with daemon(store_dir, "--min-free", "3G") as ready:
        space = status_of(store_dir)["space"]
    assert ready["listening"]
    assert space["min_free"] == "3G" and space["min_free_bytes"] == 3 << 30, space
    serve = ("serve", "--listen", "127.0.0.1:0")
    bad = run_cli(store_dir, *serve, "--min-free", "lots", check=False, timeout=60)
    assert bad.code == 4 and "--min-free" in bad.err, bad
    # The file's value is still read under the flag: a bad one is refused, not hidden.
    write_config(store_dir, 'min_free = "most of it"\n')
    hidden = run_cli(store_dir, *serve, "--min-free", "3G", check=False, timeout=60)
    assert hidden.code == 4 and "min_free" in hidden.err, hidden
