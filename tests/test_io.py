"""Artifacts: a flipped byte is caught by the checksums, the umask is honoured, a killed writer's
temp files are removed on the next write, a directory is named as such."""
import os
import subprocess
import sys

import pytest
import torch

from persona_kernels.io import ArtifactError, load_artifact, save_artifact


def test_a_flipped_byte_is_caught(tmp_path):
    p = tmp_path / "a.safetensors"
    save_artifact(p, {"x": torch.arange(1000, dtype=torch.float32), "y": torch.ones(7, dtype=torch.uint8)}, "masks", {})
    tensors, meta = load_artifact(p, "masks")
    assert set(meta["checksums"]) == {"x", "y"}
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0x01  # a bit of the last tensor's data
    p.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="checksum"):
        load_artifact(p, "masks")


def test_umask_is_honoured(tmp_path):
    old = os.umask(0o027)
    try:
        p = save_artifact(tmp_path / "b.safetensors", {"x": torch.zeros(2)}, "masks", {})
    finally:
        os.umask(old)
    assert os.stat(p).st_mode & 0o777 == 0o640


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path):
    target = tmp_path / "c.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-c.safetensors-{int(dead.stdout)}-abcd"
    stale.write_bytes(b"x" * 100)
    other = tmp_path / ".tmp-other.safetensors-1-abcd"  # another target's: left alone
    other.write_bytes(b"y")
    save_artifact(target, {"x": torch.zeros(2)}, "masks", {})
    assert not stale.exists() and other.exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == [".tmp-other.safetensors-1-abcd", "c.safetensors"]


def test_a_directory_is_named_as_such(tmp_path):
    with pytest.raises(ArtifactError, match="is a directory"):
        load_artifact(tmp_path, "masks")
    with pytest.raises(IsADirectoryError):
        save_artifact(tmp_path, {"x": torch.zeros(1)}, "masks", {})


def test_sigterm_during_a_write_leaves_no_temp_file(tmp_path):
    """The CLI turns SIGTERM into SystemExit, so a writer killed that way removes its temp file."""
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "big.bin"
    code = ("import time; from persona_kernels.app.cli import exit_on_sigterm; from persona_kernels.io import atomic_write\n"
            "exit_on_sigterm()\n"
            f"atomic_write({str(target)!r}, lambda f: (f.write(b'x' * 1000), time.sleep(60)))\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not any(p.name.startswith(".tmp-big.bin-") for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None, "the writer never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
