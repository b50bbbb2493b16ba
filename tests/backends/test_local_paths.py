"""The local backend never reads or writes outside its root."""

import os
import shutil
from pathlib import Path

import pytest

from storage.backends import fsutil
from storage.backends.base import ObjectMissing, StoreUnavailable
from storage.backends.local import LocalBackend
from storage.config import Config


@pytest.fixture
async def backend(tmp_path):
    b = LocalBackend(Config(storage_local_base_path=tmp_path / "root"))
    await b.start()
    return b


@pytest.mark.parametrize("relpath", ["../a", "/etc/passwd", "a/../../b", "a//b", "", "a/./b",
                                     "a\x00b", "..", "2026/.."])
def test_lexically_unsafe_paths_are_refused(backend, relpath):
    with pytest.raises(ObjectMissing):
        backend.path(relpath)


async def test_symlink_planted_in_the_tree_is_not_followed(backend, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (backend.root / "2026/01/01/00").mkdir(parents=True)
    os.symlink(secret, backend.root / "2026/01/01/00/evil.txt")
    os.symlink(tmp_path, backend.root / "2026/01/01/00/dir")
    with pytest.raises(ObjectMissing):
        await backend.open("2026/01/01/00/evil.txt")
    with pytest.raises(ObjectMissing):
        await backend.open("2026/01/01/00/dir/secret.txt")


async def test_regular_file_inside_is_served(backend):
    async with backend.create("2026/01/01/00/ok.txt") as w:
        await w.write(b"fine")
        await w.commit()
    reader = await backend.open("2026/01/01/00/ok.txt")
    try:
        assert b"".join([c async for c in reader.iter_range(0, 3, 2)]) == b"fine"
        assert reader.info.path == Path(backend.root, "2026/01/01/00/ok.txt")
    finally:
        await reader.close()


async def test_attr_listing_skips_dot_dirs_and_reports_unreadable_dirs(backend):
    for rel in ("2026/01/01/00/a.txt", "2026/01/01/01/b.txt", ".quarantine/2026/x.txt"):
        path = backend.root / (rel + ".attr.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    (backend.root / "2026/01/01/00/.tmp_attr_x.json.attr.json").write_text("{}")
    assert [p async for p in backend.iter_attr_paths()] == [
        "2026/01/01/00/a.txt", "2026/01/01/01/b.txt"]
    shutil.rmtree(backend.root)  # what a vanished mount looks like to os.walk
    with pytest.raises(StoreUnavailable, match="list the stored files"):
        [p async for p in backend.iter_attr_paths()]


async def test_attr_listing_can_stop_early(backend):
    for i in range(1200):
        path = backend.root / f"2026/01/01/00/f{i:04}.attr.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    seen = []
    async for relpath in backend.iter_attr_paths():
        seen.append(relpath)
        if len(seen) == 3:
            break
    assert seen == ["2026/01/01/00/f0000", "2026/01/01/00/f0001", "2026/01/01/00/f0002"]
    assert len([p async for p in backend.iter_attr_paths()]) == 1200


def test_a_directory_found_already_there_has_its_entry_made_durable(tmp_path):
    """A writer that finds a new hour directory already there (made by another writer,
    whose fsync of the parent may not have happened yet, or who died before it) fsyncs
    the parents itself, the first time it uses the directory (issue 22)."""
    root = tmp_path / "root"
    hour = root / "2026" / "12" / "08" / "01"
    hour.mkdir(parents=True)  # no fsync of any parent
    synced: list = []
    fsutil.ensure_durable(hour, root, fsync=synced.append)
    assert synced == [root, root / "2026", root / "2026" / "12", root / "2026" / "12" / "08"]
    synced.clear()
    fsutil.ensure_durable(hour, root, fsync=synced.append)
    assert synced == []  # once per directory and process
    other = root / "2026" / "12" / "08" / "02"
    other.mkdir()
    fd = fsutil.open_dir(other, root)  # what a writer opens its directory with
    os.close(fd)
    assert str(other) in fsutil._DURABLE
