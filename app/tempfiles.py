"""A private temp folder per studio process for Gradio's cache (uploads, the audio and images the app
renders), removed when the process exits; folders of earlier runs that could not clean up (killed,
crashed) are removed at the next start.

    <base>/salmonn-studio-<pid>-<random>/.salmonn-studio     base: $GRADIO_TEMP_DIR, else <tmp>/gradio

Gradio only deletes the files of its own run, and none on SIGTERM or a crash, so without this they
pile up in its shared folder. `setup()` must run before gradio is imported: some gradio modules read
GRADIO_TEMP_DIR at import time.

The marker records the owner's pid and start time (a reused pid is not the owner), the host (a pid
means nothing on another machine or container sharing the folder) and is written first and removed
last, so a folder without it is never ours to delete and one cut short mid-removal is finished later.
Only the standard library: Linux reads /proc, macOS and BSD ask `ps`; where neither works a run is
assumed alive and its folder kept.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PREFIX = "salmonn-studio-"
MARKER = ".salmonn-studio"
_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")     # held off while the folder is being removed

_folder: Path | None = None


def base_dir() -> Path:
    """Where Gradio would put its cache without us: the user's GRADIO_TEMP_DIR, else <tmp>/gradio."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


# ------------------------------------------------------------------------------------------ processes

def pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name != "posix":      # os.kill(pid, 0) would send Ctrl+C on Windows: cannot tell, so alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's process, but it exists
        return True
    return True


def start_id(pid: int) -> str | None:
    """When `pid` started, as an opaque string (None: no such process, or cannot tell)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        stat = None
    if stat is not None:        # Linux: field 22 (clock ticks since boot); the comm field may hold spaces
        return f"{_boot_id()}:{stat[stat.rindex(')') + 2:].split()[19]}"
    if Path("/proc/self/stat").exists():
        return None             # Linux, and the process is gone
    try:
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _boot_id() -> str:
    """Tick counts restart at boot; the boot id keeps ids of different boots apart."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def owner_alive(pid: int, started: str | None) -> bool:
    """Whether the process that wrote a marker is still running. When in doubt: yes."""
    if not pid_exists(pid):
        return False
    now = start_id(pid)
    return started is None or now is None or now == started


# ------------------------------------------------------------------------------------------ folders

def write_marker(folder: Path, pid: int, started: str | None, host: str | None = None) -> None:
    """Atomically, so a sweep never reads half a marker."""
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"pid": pid, "started": started, "host": host or socket.gethostname()}))
    os.replace(tmp, folder / MARKER)


def read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def is_stale(folder: Path) -> bool:
    """A studio folder of ours whose owner process has ended. Anything else is left alone."""
    if not folder.name.startswith(PREFIX) or folder.is_symlink() or not folder.is_dir():
        return False
    if hasattr(os, "getuid") and folder.stat().st_uid != os.getuid():
        return False            # another user's run: not ours to judge
    marker = read_marker(folder)
    if marker is None or marker.get("host") != socket.gethostname():
        return False
    return not owner_alive(marker["pid"], marker.get("started"))


def remove(folder: Path) -> None:
    """Delete the folder, its marker last: cut short, the marker stays and the next start finishes."""
    try:
        for child in folder.iterdir():
            if child.name == MARKER:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        (folder / MARKER).unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        pass                    # gone already, or still in use: nothing better to do at exit


def sweep(base: Path) -> list[Path]:
    """Remove the folders earlier studio runs left in `base`; returns them."""
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        try:
            stale = is_stale(entry)
        except OSError:         # vanished meanwhile (another studio swept it)
            continue
        if stale:
            remove(entry)
            removed.append(entry)
    return removed


# ------------------------------------------------------------------------------------------ this process

def setup() -> Path | None:
    """Give this process its own Gradio temp folder, removed at exit, and sweep earlier runs' leftovers.

    Returns the folder; None when gradio is already imported (then moving its cache would split it, so
    the caller's setting stays) or the base folder cannot be written. Calling it again is a no-op."""
    global _folder
    if _folder is not None:
        return _folder
    if "gradio" in sys.modules:
        return None
    base = base_dir()
    try:
        base.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))   # private (0700)
        write_marker(folder, os.getpid(), start_id(os.getpid()))
    except OSError as err:
        print(f"note: cannot create a temp folder in {base} ({err}); Gradio uses it directly.", file=sys.stderr)
        return None
    _folder = folder
    atexit.register(_remove_own)
    _exit_cleanly_on("SIGTERM")
    _exit_cleanly_on("SIGHUP")          # the terminal window closed
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    sweep(base)
    return folder


def _exit_cleanly_on(name: str) -> None:
    """Turn a stop signal into SystemExit in the main thread, so `finally` blocks and atexit run.
    A signal someone chose to ignore (nohup) stays ignored."""
    sig = getattr(signal, name, None)
    if sig is None or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(sig) == signal.SIG_DFL:
        signal.signal(sig, _raise_exit)


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)      # the shell's code for "ended by signal N"


def _remove_own() -> None:
    """At exit: remove this process's folder with stop signals held off (a second Ctrl+C or SIGTERM
    would otherwise cut the removal short)."""
    if _folder is None:
        return
    held = _hold_signals()
    try:
        remove(_folder)
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)


def _hold_signals() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    held = {}
    for name in _STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            handler = signal.getsignal(sig)
            if handler is not None:       # None: installed outside Python, cannot be restored
                held[sig] = handler
                signal.signal(sig, signal.SIG_IGN)
    return held
