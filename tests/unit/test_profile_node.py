"""tests/benchmarks/profile_node.py's summary of py-spy's raw output (the profiling run
itself is on demand): each sample is charged to the layer nearest its leaf, and our
functions are counted once per sample however deep they recurse."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_node

LOOP = "run_forever (/usr/lib/python3.11/asyncio/base_events.py:607)"
COMMIT = "GroupCommitter._commit (/work/main/router/listener.py:120)"
RECORD = "Repository.record_instances (/work/main/router/db/repository.py:427)"
EXECUTE = "Connection.execute (/venv/lib/site-packages/sqlalchemy/engine/base.py:1412)"
FEED = "DatasetWalker.feed (router/walker.py:88)"  # py-spy: relative under the cwd
PDU = "Connection.receive_data (/work/main/protocol/connection.py:61)"


def _raw(tmp_path: Path, lines: list[tuple[list[str], int]]) -> Path:
    raw = tmp_path / "listener.raw"
    raw.write_text("".join(";".join(frames) + f" {n}\n" for frames, n in lines))
    return raw


def test_a_sample_is_charged_to_the_layer_nearest_its_leaf() -> None:
    assert profile_node._layer([LOOP, COMMIT, RECORD, EXECUTE]) == "database"
    assert profile_node._layer([LOOP, PDU, FEED]) == "ours"
    assert profile_node._layer([LOOP, FEED, PDU]) == "dicom"
    assert profile_node._layer([LOOP]) == "asyncio"
    assert profile_node._layer(["<module> (<string>:1)"]) == "other"


def test_summary_gives_milliseconds_per_instance_layers_and_our_functions(
    tmp_path: Path,
) -> None:
    raw = _raw(tmp_path, [([LOOP, COMMIT, RECORD, EXECUTE], 30), ([LOOP, PDU, FEED, FEED], 10)])
    text = profile_node.summarise(raw, rate=100, instances=20, cpu_s=1.0, top=5)
    # 40 samples at 100 Hz = 0.4 s over 20 instances; 1 s of CPU over 20 instances.
    assert "GIL held 20.00 ms/instance (40 samples)" in text
    assert "process CPU 50.00 ms/instance" in text
    assert "database 75%, ours 25%" in text
    assert " 75.0%  Repository.record_instances (router/db/repository.py)" in text
    # FEED appears twice in one stack: counted once, 10 of 40 samples.
    assert " 25.0%  DatasetWalker.feed (router/walker.py)" in text


def test_an_empty_profile_says_so(tmp_path: Path) -> None:
    raw = _raw(tmp_path, [])
    assert "no samples" in profile_node.summarise(raw, rate=100, instances=1, cpu_s=0, top=5)
