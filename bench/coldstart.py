"""App cold start, run in a fresh process by bench.cpu: what `python launch_app.py` does up to
"serving" (configs, every pipeline, the Gradio UI, the server on a free local port), then it closes.

Prints one JSON line of stage times. With --tiny-test DIR it uses the tests' random tiny model."""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny-test", metavar="DIR")
    p.add_argument("--no-server", action="store_true")
    p.add_argument("--separate", action="store_true",
                   help="load every checkpoint as its own full model (the path before variants shared one)")
    args = p.parse_args()
    out: dict = {}
    import torch

    torch.set_num_threads(args.threads)
    from launch_app import build_configs, load_pipelines, parse_args
    import model.pipeline  # noqa: F401,E402 - imported here so import time is its own stage

    out["import_s"] = time.perf_counter() - T_START
    t = time.perf_counter()
    if args.tiny_test:
        configs = build_configs(parse_args(["--tiny-test-model", args.tiny_test, "--device", "cpu"]))
        out["config"] = "tests' tiny random model"
    else:
        try:
            configs = build_configs(parse_args(["--device", "cpu"]))
            out["config"] = "embedded default (trained weights): " + ", ".join(label for label, _ in configs)
        except Exception as err:  # noqa: BLE001 - weights not trained yet: same compute without them
            from model.defaults import bundled_config

            cfg = bundled_config(device="cpu")
            configs = [("activation-tuned", cfg), ("instruction-tuned", cfg)]
            out["config"] = f"SALMONN-tiny without trained weights x2 (as launch_app's two variants; {err.__class__.__name__})"
    if args.separate:
        from model.pipeline import Pipeline

        pipes = [(label, Pipeline.from_config(cfg)) for label, cfg in configs]
    else:
        pipes = load_pipelines(configs)
    out["models"] = len({id(pipe.model) for _, pipe in pipes})
    out["checkpoints"] = len(pipes)
    out["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        from app.ui import build_app, launch

        demo = build_app(pipes[0][1], dict(pipes[1:]), primary_name=pipes[0][0])
        out["build_app_s"] = time.perf_counter() - t
        if not args.no_server:
            t = time.perf_counter()
            launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True)
            out["server_s"] = time.perf_counter() - t
            demo.close()
    except Exception as err:  # noqa: BLE001 - the app is someone else's work in progress: report, don't fail
        out["app_error"] = f"{type(err).__name__}: {err}"
    out["ready_s"] = out["import_s"] + out["load_s"] + out.get("build_app_s", 0) + out.get("server_s", 0)
    import resource

    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB
    print("COLDSTART " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
