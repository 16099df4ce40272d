"""No upload outlives the app: each studio process keeps Gradio's cache in a folder of its own,
removed on normal exit, Ctrl+C and SIGTERM, and swept at the next start after a kill or crash,
without touching anything else in the temp folder or the folder of a studio still running."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from app import tempfiles

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers

def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def studio_folder(base: Path, name: str, pid: int, started: str | None, host: str | None = None) -> Path:
    folder = base / f"{tempfiles.PREFIX}{name}"
    (folder / "upload").mkdir(parents=True)
    (folder / "upload" / "clip.wav").write_bytes(b"RIFF")
    tempfiles.write_marker(folder, pid, started, host)
    return folder


def others(base: Path) -> list[Path]:
    """What another program keeps in the temp folder: a file, a folder, and an unmarked folder with
    our prefix."""
    (base / "other-program.txt").write_text("not ours")
    (base / "other-folder").mkdir()
    (base / "other-folder" / "data.bin").write_bytes(b"x")
    unmarked = base / f"{tempfiles.PREFIX}{dead_pid()}-nomarker"
    unmarked.mkdir()
    (unmarked / "keep.wav").write_bytes(b"RIFF")
    return [base / "other-program.txt", base / "other-folder" / "data.bin", unmarked / "keep.wav"]


def read(folder: Path) -> dict:
    return json.loads((folder / tempfiles.MARKER).read_text())


# ------------------------------------------------------------------------------------------ the sweep

def test_sweep_removes_only_folders_of_ended_runs(tmp_path):
    me = os.getpid()
    dead = studio_folder(tmp_path, "dead", dead_pid(), "0:1")
    reused = studio_folder(tmp_path, "reused-pid", me, "another-boot:1")   # our pid, another process's start
    live = studio_folder(tmp_path, "live", me, tempfiles.start_id(me))
    elsewhere = studio_folder(tmp_path, "other-host", dead_pid(), "0:1", host="another-machine")
    kept = others(tmp_path)

    removed = tempfiles.sweep(tmp_path)

    assert sorted(removed) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    assert (live / "upload" / "clip.wav").is_file() and (live / tempfiles.MARKER).is_file()
    assert (elsewhere / "upload" / "clip.wav").is_file()
    assert all(path.is_file() for path in kept)


def test_a_live_studio_folder_is_kept(tmp_path):
    """Another studio running right now (a child process here) keeps its folder."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = studio_folder(tmp_path, "running", child.pid, tempfiles.start_id(child.pid))
        assert tempfiles.sweep(tmp_path) == []
        child.kill()
        child.wait()
        assert tempfiles.sweep(tmp_path) == [folder] and not folder.exists()
    finally:
        child.kill()
        child.wait()


def test_a_removal_cut_short_keeps_the_marker_and_is_finished_later(tmp_path, monkeypatch):
    folder = studio_folder(tmp_path, "cut", dead_pid(), "0:1")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt       # a second Ctrl+C in the middle of the removal

    with monkeypatch.context() as m:
        m.setattr(tempfiles.shutil, "rmtree", interrupted)
        with pytest.raises(KeyboardInterrupt):
            tempfiles.remove(folder)
    assert read(folder)["pid"] > 0, "the marker goes last, so the folder is still known to be ours"
    assert tempfiles.sweep(tmp_path) == [folder] and not folder.exists()


# ------------------------------------------------------------------------------------------ exits (no model)

CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from app import tempfiles
folder = tempfiles.setup()
(folder / "upload.wav").write_bytes(b"RIFF")
assert (folder / tempfiles.MARKER).is_file()
try:
    print(folder, flush=True)       # inside the try: a signal right after it still reaches the finally
    if sys.argv[1] == "exit":
        sys.exit(0)
    time.sleep(60)
except KeyboardInterrupt:
    pass
finally:
    if sys.argv[1] == "slow-close":
        print("closing", flush=True)
        time.sleep(60)          # a close that hangs: a second signal must still clean up
"""


def run_child(base: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "GRADIO_TEMP_DIR": str(base)}
    # a test run under nohup would hand the child an ignored SIGHUP, which it rightly keeps ignoring
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO)), mode], env=env,
                            stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    folder = Path(proc.stdout.readline().strip())     # (with "exit" it may be gone already)
    assert folder.parent == base and folder.name.startswith(f"{tempfiles.PREFIX}{proc.pid}-")
    return proc, folder


@pytest.mark.parametrize("mode, signals", [("exit", []), ("wait", [signal.SIGINT]), ("wait", [signal.SIGTERM]),
                                           ("wait", [signal.SIGHUP]), ("slow-close", [signal.SIGTERM, signal.SIGTERM])])
def test_the_folder_is_removed_on_every_exit_the_process_sees(tmp_path, mode, signals):
    kept = others(tmp_path)
    proc, folder = run_child(tmp_path, mode)
    for i, sig in enumerate(signals):
        if i:
            assert proc.stdout.readline().strip() == "closing"
        proc.send_signal(sig)
    proc.wait(timeout=30)
    if signals and signals[0] != signal.SIGINT:
        assert proc.returncode == 128 + signals[-1], "the signal should end the process through SystemExit"
    assert not folder.exists()
    assert all(path.is_file() for path in kept)


def test_setup_does_not_move_the_cache_of_an_imported_gradio(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", sys.modules.get("gradio") or object())
    monkeypatch.setattr(tempfiles, "_folder", None)
    before = os.environ.get("GRADIO_TEMP_DIR")
    assert tempfiles.setup() is None
    assert os.environ.get("GRADIO_TEMP_DIR") == before


# ------------------------------------------------------------------------------------------ the app

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(tiny_root: Path, base: Path, log: Path) -> tuple[subprocess.Popen, str, Path]:
    """The studio on the tiny model, serving; (process, url, its temp folder)."""
    import httpx

    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(base), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(REPO / "launch_app.py"), "--tiny-test-model", str(tiny_root),
                             "--port", str(port)], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the app exited ({proc.returncode}):\n{log.read_text()}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the app did not start:\n{log.read_text()}")
    (folder,) = base.glob(f"{tempfiles.PREFIX}{proc.pid}-*")
    return proc, url, folder


def upload(url: str, clip: Path, downloads: Path) -> None:
    """Load a clip as a user would: Gradio stores the upload and renders what the model hears."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=str(downloads))
    client.predict(path=handle_file(str(clip)), api_name="/load_audio")


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_the_app_leaves_no_files_after_sigterm_and_sweeps_a_killed_run(tiny_cfg, tiny_root, tmp_path):
    pytest.importorskip("gradio_client")
    base = tmp_path / "gradio-temp"
    base.mkdir()
    kept = others(base)
    clip = tmp_path / "my-upload-clip.wav"
    sf.write(clip, (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32), 16000)

    # a run killed outright (SIGKILL, or a crash) cannot clean up: its folder stays
    killed, url, killed_folder = start_app(tiny_root, base, tmp_path / "killed.log")
    try:
        upload(url, clip, tmp_path / "downloads")
        assert clip.name in files_in(killed_folder)
    finally:
        killed.kill()
        killed.wait(timeout=30)
    assert clip.name in files_in(killed_folder)

    # the next start removes it, and nothing else; at SIGTERM it removes its own folder
    proc, url, folder = start_app(tiny_root, base, tmp_path / "app.log")
    try:
        assert not killed_folder.exists()
        assert all(path.is_file() for path in kept)
        upload(url, clip, tmp_path / "downloads")
        names = files_in(folder)
        assert clip.name in names, "the upload"
        assert any(n.endswith(".png") for n in names), "the spectrogram and attention images"
        assert "audio.wav" in names, "what the model hears"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert not folder.exists()
    assert sorted(base.rglob("*")) == sorted({*kept, *(p.parent for p in kept)} - {base})
