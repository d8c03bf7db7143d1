"""router/failpoints.py: the DICOM_ROUTER_FAILPOINT syntax, and that an armed place
kills the process on its Nth arrival only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from router.failpoints import _parse


def test_names_with_and_without_a_count() -> None:
    assert _parse("") == {}
    assert _parse("listener.after_rename") == {"listener.after_rename": 1}
    assert _parse(" a@3 , b ,c@0,d@x") == {"a": 3, "b": 1, "c": 1, "d": 1}


def test_an_armed_place_kills_on_its_nth_arrival() -> None:
    code = (
        "from router import failpoints\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    failpoints.hit('here')\n"
        "    failpoints.hit('elsewhere')\n"
    )
    env = {**os.environ, "DICOM_ROUTER_FAILPOINT": "here@3"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["0", "1", "2"]


def test_with_a_once_directory_each_place_fires_for_one_process_only(tmp_path: Path) -> None:
    code = (
        "from router import failpoints\n"
        "print(failpoints.armed('here'), failpoints.armed('nowhere'), flush=True)\n"
        "failpoints.hit('here')\n"
        "print('passed', flush=True)\n"
    )
    env = {
        **os.environ,
        "DICOM_ROUTER_FAILPOINT": "here",
        "DICOM_ROUTER_FAILPOINT_ONCE": str(tmp_path),
    }
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        for _ in range(2)
    ]
    assert runs[0].returncode == -signal.SIGKILL
    assert runs[0].stdout.split() == ["True", "False"]
    assert (tmp_path / "here").exists()  # the mark the first process left
    assert runs[1].returncode == 0, runs[1].stderr
    assert runs[1].stdout.split() == ["False", "False", "passed"]


def test_a_keyed_place_fires_for_its_key_only() -> None:
    code = (
        "from router import failpoints\n"
        "for uid in ('1.2.3', '1.2.4', '1.2.4'):\n"
        "    print(uid, flush=True)\n"
        "    failpoints.hit_for('worker.sending', uid)\n"
    )
    env = {**os.environ, "DICOM_ROUTER_FAILPOINT": "worker.sending=1.2.4"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["1.2.3", "1.2.4"]
