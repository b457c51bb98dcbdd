"""An index changed by several processes at once: no update is lost, and a reader sees whole versions.

`strop rag index` and `rag remove` hold the index's lock from reading it to writing it; `load` reads
the three files of one version. Both are checked with real processes and with a writer racing readers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import run_cli
from strop.core.errors import StropError
from strop.rag import index as ix
from strop.rag.chunk import Chunk


def _rows(path, ids: list[str]) -> str:
    path.write_text(
        "".join(json.dumps({"id": i, "text": f"Document {i} talks about {i}."}) + "\n" for i in ids)
    )
    return str(path)


def _wait_for(predicate, seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_two_processes_updating_one_index_at_once_both_land(tiny_bert, tmp_path, capsys):
    index = tmp_path / "idx"
    first = ["rag", "index", _rows(tmp_path / "base.jsonl", ["base"]), "--index", str(index)]
    rc, _, err = run_cli([*first, "--model", str(tiny_bert), "--no-progress"], capsys)
    assert rc == 0, err
    sets = {name: [f"{name}{k}" for k in range(20)] for name in ("a", "b")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs, logs = [], []
    with ix.locked(index):  # both start while the index is busy, so both must wait, then both read and write
        for name, ids in sets.items():
            log = tmp_path / f"{name}.err"
            argv = [
                "rag",
                "index",
                _rows(tmp_path / f"{name}.jsonl", ids),
                "--index",
                str(index),
                "--no-progress",
            ]
            with open(log, "w") as f:
                procs.append(
                    subprocess.Popen([sys.executable, "-m", "strop.cli.main", *argv], stderr=f, env=env)
                )
            logs.append(log)
        _wait_for(
            lambda: all("waiting for another process" in p.read_text() for p in logs), 300, "both to wait"
        )
    for p, log in zip(procs, logs, strict=True):
        assert p.wait(timeout=300) == 0, log.read_text()
    assert set(ix.load(index).documents) == {"base", *sets["a"], *sets["b"]}
    assert not ix.lock_path(index).exists()  # the lock file goes with its last holder


def test_a_lock_held_past_the_timeout_is_a_clear_error(tmp_path):
    (tmp_path / "idx").mkdir()
    with ix.locked(tmp_path / "idx"), pytest.raises(StropError, match="another process has been changing it"):
        with ix.locked(tmp_path / "idx", timeout=0.5):
            pass
    with ix.locked(tmp_path / "idx", timeout=0.5):  # released: free again
        pass


def _version(n: int, dim: int = 4) -> ix.Index:
    """An index of `n` one-chunk documents whose vectors and texts all say `n`."""
    chunks = [Chunk(f"d{k}", 0, 0, 1, f"version {n}", 1) for k in range(n)]
    docs = {f"d{k}": {"digest": str(n), "source": "x", "chunks": 1} for k in range(n)}
    return ix.Index("m", 8, 0, docs, chunks, torch.full((n, dim), float(n)))


def test_readers_see_whole_versions_while_a_writer_replaces_the_index(tmp_path):
    folder = tmp_path / "idx"
    ix.save(_version(3), folder)
    stop = threading.Event()

    def write() -> None:
        n = 3
        while not stop.is_set():
            n = 7 if n == 3 else 3
            ix.save(_version(n), folder)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        seen = set()
        for _ in range(300):
            got = ix.load(folder)  # never "not a strop index", never a mix of two versions
            n = len(got.chunks)
            assert len(got.documents) == n and got.vectors.shape[0] == n
            assert {c.text for c in got.chunks} == {f"version {n}"} and bool((got.vectors == n).all())
            seen.add(n)
    finally:
        stop.set()
        writer.join()
    assert seen == {3, 7}
