"""Temporary folders of writers killed outright (merge_graphs.io.atomic): the next write removes them, unless
their writer still runs. Real processes, killed with SIGKILL."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import merge_graphs
from merge_graphs.io import atomic
from merge_graphs.io.writer import write_tensor_folder
from merge_graphs.tensors import infos

pytestmark = pytest.mark.skipif(os.name != "posix", reason="writers are told apart by POSIX pids")

# A writer that stops after two tensors: it kills itself ("die") or waits to be killed ("wait").
WRITER = """
import os, signal, sys, time
import torch, transformers
from merge_graphs.io.writer import write_tensor_folder
from merge_graphs.tensors import infos

parent, mode = sys.argv[1], sys.argv[2]
state = {f"t{i}": torch.ones(10_000) for i in range(4)}

def tensors():
    for i, item in enumerate(state.items()):
        if i == 2:
            if mode == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            print("writing", flush=True)
            time.sleep(600)
        yield item

write_tensor_folder(tensors(), infos(state), transformers.BertConfig(), os.path.join(parent, "out"), shard_size="50KB")
"""


def start_writer(parent: Path, mode: str) -> subprocess.Popen:
    package_root = str(Path(merge_graphs.__file__).parent.parent)  # this checkout, not an installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(parent), mode], env=env, stdout=subprocess.PIPE,
                            text=True)


def write(parent: Path, name: str) -> None:
    state = {"w": torch.ones(3)}
    write_tensor_folder(state.items(), infos(state), transformers.BertConfig(), parent / name)


def leftovers(parent: Path) -> list[Path]:
    return sorted(parent.glob(".*.tmp-*"))


def test_the_next_write_removes_the_folder_of_a_killed_writer(tmp_path, caplog):
    child = start_writer(tmp_path, "die")
    assert child.wait(timeout=300) == -signal.SIGKILL
    [left] = leftovers(tmp_path)
    assert list(left.glob("*.safetensors")), "the killed writer had started writing"
    assert f"-{child.pid}-" in left.name

    with caplog.at_level(logging.INFO, logger=atomic.__name__):
        write(tmp_path, "next")
    assert sorted(os.listdir(tmp_path)) == ["next"]
    removed = [r.getMessage() for r in caplog.records if str(left) in r.getMessage()]
    assert len(removed) == 1 and str(child.pid) in removed[0]


def test_the_folder_of_a_running_writer_is_kept_until_it_is_killed(tmp_path):
    child = start_writer(tmp_path, "wait")
    try:
        ready, _, _ = select.select([child.stdout], [], [], 300)
        assert ready and child.stdout.readline() == "writing\n"
        [left] = leftovers(tmp_path)
        write(tmp_path, "meanwhile")
        assert leftovers(tmp_path) == [left] and child.poll() is None
    finally:
        child.kill()
        child.wait(timeout=60)
    write(tmp_path, "after")
    assert sorted(os.listdir(tmp_path)) == ["after", "meanwhile"]


def make_leftover(parent: Path, machine: str, pid: int, start: int) -> Path:
    folder = parent / f".model.tmp-{machine}-{pid}-{start}-0123abcd"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"partial")
    return folder


def test_a_pid_is_its_writer_only_with_the_writer_start_time_and_machine(tmp_path):
    """A process that got a killed writer's pid later is not that writer; other machines' writers are left alone."""
    stat = atomic._proc_stat(os.getpid())
    if stat is None:
        pytest.skip("no /proc: start times unknown")
    me, machine = os.getpid(), atomic._machine()
    mine = make_leftover(tmp_path, machine, me, stat[1])
    unknown_start = make_leftover(tmp_path, machine, me, 0)
    recycled = make_leftover(tmp_path, machine, me, stat[1] + 1)
    elsewhere = make_leftover(tmp_path, "f" * 8 if machine != "f" * 8 else "e" * 8, 2**22 + 1, 1)
    unrelated = tmp_path / ".model.tmp-0123abcd"  # not a name this writer makes: not ours to judge
    unrelated.mkdir()
    write(tmp_path, "out")
    assert sorted(tmp_path.iterdir()) == sorted([mine, unknown_start, elsewhere, unrelated, tmp_path / "out"])
    assert not recycled.exists()
