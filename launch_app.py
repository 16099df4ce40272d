#!/usr/bin/env python
"""Start SALMONN Studio.

    python launch_app.py                         # the embedded default model (GPU if present, else CPU)
    python launch_app.py --config decode_config.yaml --options model.ckpt=/w/salmonn_v1.pth
    python launch_app.py --llama-path /w/vicuna-13b --whisper-path /w/whisper-large-v2 \\
        --beats-path /w/BEATs.pt --ckpt /w/salmonn_v1.pth --dtype float16 --8bit

Serves on http://127.0.0.1:7860 by default (this machine only). A bad path or checkpoint stops with
a message naming it and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SALMONN Studio: a local web demo for the SALMONN audio-language model.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    m = p.add_argument_group("model")
    from model.cli import add_model_args

    add_model_args(m)     # the same model flags as `python -m model.cli`
    m.add_argument("--compare-ckpt", metavar="PATH",
                   help="a second SALMONN checkpoint (e.g. instruction-tuned) to compare in the scale lab")
    m.add_argument("--compare-name", default="instruction-tuned", help="label for --compare-ckpt")
    m.add_argument("--no-compare", action="store_true",
                   help="default model only: do not also load the instruction-tuned variant")
    m.add_argument("--tiny-test-model", metavar="DIR", help=argparse.SUPPRESS)   # tests: random tiny model
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to your network)")
    s.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    s.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    s.add_argument("--auth", metavar="USER:PASS", help="require this login (recommended with --share)")
    s.add_argument("--max-file-size", default="50mb", help="upload size limit (default 50mb)")
    s.add_argument("--queue-size", type=int, default=16, help="waiting requests beyond which new ones are refused")
    s.add_argument("--api-only", action="store_true",
                   help="serve only the OpenAI-compatible API (/v1/...), no web UI")
    s.add_argument("--api-key", default=os.environ.get("SALMONN_API_KEY"),
                   help="key the API requires (Authorization: Bearer KEY; default $SALMONN_API_KEY). Needed to "
                        "serve the API on any address other than this machine's loopback")
    s.add_argument("--desktop", action="store_true",
                   help="open in a native window (pywebview) if installed, else in the browser")
    return p.parse_args(argv)


class Progress:
    """Loading progress with elapsed time, to stderr."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)


def build_configs(args) -> list[tuple[str, object]]:
    """(label, SALMONNConfig) for the main model and, when available, a comparison model."""
    from model.cli import config_from_args

    if args.tiny_test_model:
        from model.random_tiny import tiny_config

        flags = {"ckpt": args.ckpt, "device": args.device, "dtype": args.dtype}
        return [("tiny-test", tiny_config(Path(args.tiny_test_model)).replace(**{k: v for k, v in flags.items() if v}))]
    cfg = config_from_args(args)
    default = not (args.config or args.llama_path or args.whisper_path or args.ckpt)
    label = f"{args.variant}-tuned" if default else cfg.name
    configs = [(label, cfg)]
    if args.compare_ckpt:
        configs.append((args.compare_name, cfg.replace(ckpt=args.compare_ckpt)))
    elif default and not args.no_compare:
        from model.defaults import CHECKPOINTS

        other = "instruction" if args.variant == "activation" else "activation"
        if CHECKPOINTS[other].is_file():      # the same model with the other shipped weights
            configs.append((f"{other}-tuned", cfg.replace(ckpt=str(CHECKPOINTS[other]))))
        else:
            print(f"note: {other}-tuned variant not loaded ({CHECKPOINTS[other]} is missing)", file=sys.stderr)
    return configs


def load_pipelines(configs, say=lambda message: None) -> list[tuple[str, object]]:
    """A pipeline per config; a config that differs from the first only by its checkpoint becomes a
    variant of the first (its trained weights only, sharing the loaded encoders and LLM)."""
    from model.checkpoint import loaded_config
    from model.pipeline import Pipeline

    pipes: list[tuple[str, Pipeline]] = []
    for label, cfg in configs:
        first = pipes[0][1] if pipes else None
        if first is not None and cfg.ckpt and loaded_config(cfg).replace(ckpt=first.cfg.ckpt) == first.cfg:
            say(f"loading {label} (its trained weights only, sharing the loaded model)")
            pipes.append((label, first.variant(cfg.ckpt)))
        else:
            say(f"loading {label}")
            pipes.append((label, Pipeline.from_config(cfg, progress=say)))
    return pipes


def parse_auth(text: str | None):
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        from model.errors import ConfigError

        raise ConfigError("--auth must look like user:password")
    return user, password


def parse_size(text: str) -> int:
    """'50mb' -> bytes (b, kb, mb, gb; 1 kb = 1024 b, as Gradio counts)."""
    import re

    match = re.fullmatch(r"\s*(\d+)\s*(b|kb|mb|gb)?\s*", str(text).lower())
    if not match or float(match.group(1)) <= 0:
        from model.errors import ConfigError

        raise ConfigError(f"--max-file-size must look like 50mb or 2gb (got {text!r})")
    unit = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30}[match.group(2) or "b"]
    return int(match.group(1)) * unit


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def main(argv=None) -> int:
    from app import tempfiles

    tempfiles.setup()     # before gradio is imported (it reads GRADIO_TEMP_DIR then): a temp folder of our own
    args = parse_args(argv)
    say = Progress()
    loaded = load(args, say)
    if isinstance(loaded, int):
        return loaded
    pipes, auth, max_bytes = loaded
    api = api_of(args, pipes)
    if api is None and args.api_only:
        print(f"error: serving the API on {args.host} needs a key: --api-key KEY (or SALMONN_API_KEY).",
              file=sys.stderr)
        return 2
    if args.api_only:
        return serve_api(api, args.host, args.port, say)
    return serve_app(args, pipes, api, auth, max_bytes, say)


def load(args, say):
    """(pipelines, auth, upload cap) ready to serve, or the exit code after a message."""
    from model.errors import SalmonnError

    try:
        auth = parse_auth(args.auth)
        max_bytes = parse_size(args.max_file_size)
        configs = build_configs(args)
        say("importing the model code")
        import model.pipeline  # noqa: F401 - its own progress step

        pipes = load_pipelines(configs, say)
    except SalmonnError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - any load failure: a message and no half-working UI
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            print("error: out of memory while loading the model: try --8bit, --dtype float16, --no-compare "
                  "or --device cpu.", file=sys.stderr)
        else:
            print(f"error: the model could not be loaded ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    for label, pipe in pipes:
        pipe.max_file_bytes = max_bytes       # the same cap for uploads and for the pipeline's own reads
        info = pipe.info()
        say(f"ready: {label} on {info['device']} ({info['dtype']}), "
            f"{'speech encoder only' if info['speech_only'] else 'Whisper + BEATs'}")
    return pipes, auth, max_bytes


def api_of(args, pipes):
    """The OpenAI-compatible API over the pipelines: on loopback, or elsewhere only with a key."""
    if args.host in LOOPBACK or args.api_key:
        from app.api import Api

        return Api(dict(pipes), api_key=args.api_key, max_waiting=args.queue_size)
    if not args.api_only:
        print(f"note: the OpenAI-compatible API is off: on {args.host} it needs --api-key KEY (or SALMONN_API_KEY).",
              file=sys.stderr)
    return None


def serve_app(args, pipes, api, auth, max_bytes: int, say) -> int:
    """The studio (and the API beside it) until Ctrl+C, SIGTERM or its window closes."""
    say("building the interface")
    from app.ui import build_app, launch

    local_only = args.host in LOOPBACK and not args.share
    demo = build_app(pipes[0][1], dict(pipes[1:]), primary_name=pipes[0][0], queue_size=args.queue_size,
                     desktop_mic=None if local_only else False)
    if args.share:
        print("WARNING: --share puts this demo on a public gradio.live address for 72 hours. Anyone with the link "
              "can use your machine's model" + ("" if auth else " (no --auth given: no login required!)") + ".",
              file=sys.stderr)
    if args.host not in LOOPBACK:   # (the desktop microphone panel is off then)
        print(f"WARNING: binding {args.host} makes the demo reachable from other machines. Browsers only allow the "
              "microphone on https or localhost.", file=sys.stderr)
    desktop = args.desktop and _has_webview()
    _, url, share_url = launch(demo, host=args.host, port=args.port, share=args.share, auth=auth,
                               max_file_size=max_bytes, prevent_thread_lock=True,
                               inbrowser=args.desktop and not desktop)
    if api is not None:
        api.mount(demo.app)
    say(f"serving on {url}" + (f" and {share_url}" if share_url else "")
        + (f"; API at {url}v1" if api is not None else ""))
    try:
        if desktop:
            import webview

            webview.create_window("SALMONN Studio", url, width=1400, height=950)
            webview.start()          # returns when the window is closed
        else:
            demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


def serve_api(api, host: str, port: int, say) -> int:
    """The API alone (no UI) on uvicorn, until Ctrl+C or SIGTERM."""
    import uvicorn

    say(f"serving the API on http://{host}:{port}/v1")
    uvicorn.run(api.asgi(), host=host, port=port, log_level="warning")
    return 0


def _has_webview() -> bool:
    try:
        import webview  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no native window
        print("note: pywebview is not installed; opening the browser instead (pip install pywebview).",
              file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
