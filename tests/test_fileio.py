"""fileio.py's writes: atomic, a full disk said in one clear sentence, and the leftovers of dead processes
cleaned up (downloads: test_prepare.py)."""
import errno
import os
import subprocess
import sys

import pytest
import torch

from tritongpt import checkpoint as ckpt
from tritongpt import fileio
from tritongpt.configurator import UserError
from model import GPT, GPTConfig


class FillsUp:
    """A file whose writes fail with ENOSPC once `capacity` bytes are in."""

    def __init__(self, file, capacity: int):
        self.file, self.capacity = file, capacity

    def write(self, data) -> int:
        if self.file.tell() + len(data) > self.capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.fixture
def small_disk(monkeypatch):
    """Every file atomic_open writes holds 1000 bytes at most, as on a nearly full disk."""
    monkeypatch.setattr(fileio, "_WriteRecorder", lambda f, wrap=fileio._WriteRecorder: wrap(FillsUp(f, 1000)))


def test_a_full_disk_names_the_file_and_the_space_and_keeps_the_old_file(tmp_path, small_disk):
    (tmp_path / "ckpt.pt").write_bytes(b"the previous checkpoint")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16), "sdpa", "torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = ckpt.train_state(model, 3, 1.0, {}, {}, {})
    with pytest.raises(fileio.DiskFullError) as error:  # torch.save itself reports a RuntimeError about positions
        ckpt.save(tmp_path, False, model, optimizer, state, sharded=False, master=True)
    message = str(error.value)
    needed = ckpt.tensor_bytes(model.state_dict())
    assert f"no space left on the device holding {tmp_path}: writing ckpt.pt stopped after" in message
    assert f"of the about {needed:,} it needs" in message and "bytes are free there now" in message
    assert (tmp_path / "ckpt.pt").read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left
    assert isinstance(error.value, UserError) and error.value.errno == errno.ENOSPC


def test_other_write_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with fileio.atomic_open(tmp_path / "x") as f:
            f.write(b"partial")
            1 / 0
    assert list(tmp_path.iterdir()) == []


def a_dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    host = fileio._host()
    dead, alive = a_dead_pid(), os.getpid()
    names = {
        f".ckpt.pt.{dead}.0123abcd.{host}.tmp": True,  # this machine, a dead process: stale
        f".loss.png.{dead}.89abcdef.{host}.tmp": True,
        f".ckpt.pt.{dead}.0123abcd.tmp": True,  # the name before the host was added
        f".ckpt.pt.{alive}.0123abcd.{host}.tmp": False,  # a running process may still be writing it
        f".ckpt.pt.{dead}.0123abcd.another-node.tmp": False,  # another machine's process: cannot tell
        ".something.tmp": False,  # not ours
        "ckpt.pt": False,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = fileio.remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted(name for name, stale in names.items() if stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, stale in names.items() if not stale)
    assert fileio.remove_stale_temp_files(tmp_path / "missing") == []


def test_atomic_open_names_its_temp_file_so_it_can_be_told_apart(tmp_path):
    with fileio.atomic_open(tmp_path / "ckpt.pt") as f:
        (temp,) = [p for p in tmp_path.iterdir()]
        match = fileio.TEMP_NAME.fullmatch(temp.name)
        assert match["name"] == "ckpt.pt" and int(match["pid"]) == os.getpid() and match["host"] == fileio._host()
        f.write(b"done")
    assert (tmp_path / "ckpt.pt").read_bytes() == b"done"


def test_an_out_dir_that_cannot_hold_files_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"out_dir='.*a_file' is a file, not a directory; choose another out_dir"):
        fileio.writable_directory(tmp_path / "a_file", "out_dir")
    assert fileio.writable_directory(tmp_path / "new" / "dir", "out_dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the check leaves nothing behind

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fileio, "open", read_only, raising=False)  # root may write anywhere: pretend it cannot
    with pytest.raises(UserError, match=r"cannot write to out_dir='.*' \(Read-only file system\); choose a directory"):
        fileio.writable_directory(tmp_path / "new" / "dir", "out_dir")
