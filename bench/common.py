"""Shared benchmark helpers: timing (median of repeats, device-synchronised), tables, environment
facts, and appending a dated section to bench/RESULTS.md."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable, repeats: int = 3, warmup: int = 1, device=None) -> tuple[float, object]:
    """Median wall seconds of `fn()` over `repeats` runs (after `warmup`), and its last result.
    Each run is on a fresh thread, as the app runs each request (see in_worker_thread)."""
    def once():
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        return time.perf_counter() - t0, result

    out = None
    for _ in range(warmup):
        out = in_worker_thread(once)[1]
    times = []
    for _ in range(max(1, repeats)):
        seconds, out = in_worker_thread(once)
        times.append(seconds)
    return statistics.median(times), out


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


class Table:
    def __init__(self, title: str, columns: Sequence[str]):
        self.title = title
        self.columns = list(columns)
        self.rows: list[list[str]] = []

    def add(self, *values) -> None:
        self.rows.append([fmt(v) for v in values])

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        rule = "|" + "|".join("---" for _ in self.columns) + "|"
        body = ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join([f"**{self.title}**", "", head, rule, *body])

    def print(self) -> None:
        print(self.markdown() + "\n", flush=True)


def in_worker_thread(fn, *args):
    """Run fn on a fresh thread and return its result (re-raising its error). The app runs each
    answer on a fresh worker thread (Pipeline.stream). Under CPU contention (another process busy
    on the same cores), a thread that has already run large multi-threaded ops ran later small ops
    up to ~50x slower than a fresh thread, so every timed call here gets a fresh thread: the
    compared paths are measured alike, and as the app runs them."""
    import threading

    box: dict = {}
    grad = torch.is_grad_enabled()      # grad mode is per thread: carry the caller's (no_grad) over

    def run():
        try:
            with torch.set_grad_enabled(grad):
                box["out"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            box["err"] = err

    t = threading.Thread(target=run, name="bench")
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "model", "bench"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+local changes" if dirty else "")
    except OSError:
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(device: torch.device, dtype_note: str) -> dict:
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "missing"
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else
                   f"{cpu_name()} ({torch.get_num_threads()} threads, {os.cpu_count()} cores visible)"),
        "dtype": dtype_note,
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
                    f"transformers {transformers.__version__}, peft {peft_version}",
        "commit": git_commit(),
    }
    if device.type == "cuda":
        env["versions"] += f", CUDA {torch.version.cuda}"
    try:
        env["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return env


def append_results(title: str, env: dict, tables: Sequence[Table], notes: Sequence[str] = (),
                   path: Path | str = RESULTS) -> Path:
    path = Path(path)
    lines = [f"## {title} — {env['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if k != "date"]
    lines.append("")
    for t in tables:
        lines += [t.markdown(), ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a") as fh:
        if new:
            fh.write("# Benchmark results\n\nAppended by `python -m bench.cpu` and `python -m bench.gpu`; "
                     "every ratio compares figures measured in the same run.\n\n")
        fh.write("\n".join(lines) + "\n")
    return path


def check(value: float | None, target: float, better: str) -> str:
    """'met' / 'MISSED' against a target; better is 'lower' or 'higher'."""
    if value is None or value != value:
        return "n/a"
    ok = value <= target if better == "lower" else value >= target
    return "met" if ok else "MISSED"
