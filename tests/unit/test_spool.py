"""The spool: generated names, durable commit, recovery sweep (DESIGN §3.1, catalogue B.5)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from router.settings import SpoolSettings
from router.spool import Spool, SpoolFull


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", SpoolSettings(min_free_bytes=0))
    s.create_layout()
    return s


def test_temp_file_is_private_and_generated(spool: Spool) -> None:
    temp = spool.create_temp()
    os.write(temp.fd, b"x")
    mode = stat.S_IMODE(os.stat(temp.path).st_mode)
    assert mode == 0o600
    assert temp.path.parent == spool.tmp_dir
    assert spool.path_for(temp.spool_name).parent.parent == spool.store_dir
    spool.discard(temp)
    assert not temp.path.exists()


def test_commit_moves_the_file_into_the_store(spool: Spool) -> None:
    temp = spool.create_temp()
    os.write(temp.fd, b"dataset")
    final = spool.commit(temp)
    spool.sync_directories([temp.spool_name])
    assert final.read_bytes() == b"dataset"
    assert not temp.path.exists()
    assert list(spool.stored_names()) == [temp.spool_name]


def test_pt09_planted_symlink_is_never_followed(spool: Spool, tmp_path: Path) -> None:
    # Names are random, so a planted link cannot be predicted; and O_EXCL|O_NOFOLLOW
    # refuses to open through one even if a name were guessed.
    victim = tmp_path / "victim"
    victim.write_text("keep")
    temp = spool.create_temp()
    spool.discard(temp)
    temp.path.symlink_to(victim)
    with pytest.raises(FileExistsError):
        os.open(temp.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
    assert victim.read_text() == "keep"


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "ab/../../x.dcm", "", "ab/cd.dcm"])
def test_path_for_refuses_anything_but_a_generated_name(spool: Spool, name: str) -> None:
    with pytest.raises(ValueError):
        spool.path_for(name)


def test_recovery_removes_unfinished_and_unrecorded_files(spool: Spool) -> None:
    unfinished = spool.create_temp()
    os.close(unfinished.fd)
    kept, orphan = spool.create_temp(), spool.create_temp()
    spool.commit(kept)
    spool.commit(orphan)
    assert spool.remove_temporary_files() == 1
    assert spool.remove_orphans({kept.spool_name}) == [orphan.spool_name]
    assert list(spool.stored_names()) == [kept.spool_name]


def test_rx13_spool_below_free_space_minimum_is_full(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", SpoolSettings(min_free_bytes=1 << 62))
    spool.create_layout()
    with pytest.raises(SpoolFull):
        spool.check_room()


def test_files_received_together_share_a_directory(spool: Spool) -> None:
    """One directory fsync then covers a group commit, and the janitor's removals of
    files received together (in the same minute) touch few directories."""
    temps = [spool.create_temp() for _ in range(20)]
    directories = {temp.spool_name[:2] for temp in temps}
    assert len(directories) <= 2  # 2 only when a minute turned meanwhile
    for temp in temps:
        spool.path_for(temp.spool_name)  # still a name the spool accepts
        spool.discard(temp)
