"""Many users at once through the OpenAI-compatible API, side by side in one run (embedded default, CPU):

    python -m bench.api [--clients 8] [--tokens 64] [--clip 10] [--threads 2]

Each client asks about its own clip (a speech-like test signal, its own seed) for exactly `--tokens`
tokens (EOS forbidden until then, `min_tokens`), greedy, through the official `openai` client over
HTTP. The same requests run one after another and all at once (decoded together in the shared
batch); encodings are cleared before each, so both pay the same encoder work. Reports aggregate
tokens/s and its ratio, time to first token (median, p95), and one client through the API against
the studio's single-answer path (`Pipeline.stream`) on the same request.
"""
from __future__ import annotations

import argparse
import io
import socket
import statistics
import threading
import time

import numpy as np
import soundfile as sf
import torch

from bench.common import RESULTS, Table, append_results, check, environment

PROMPT = "Describe the audio in detail."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(pipes: dict) -> tuple[str, object]:
    """The API alone on a local uvicorn thread: (base URL, server)."""
    import uvicorn

    from app.api import Api

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(Api(pipes, max_waiting=64).asgi(), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server


def wav_b64(wav: np.ndarray) -> str:
    import base64

    buf = io.BytesIO()
    sf.write(buf, wav, 16000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode()


def one_request(client, model: str, audio: str, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds in all, completion tokens) of one streamed answer."""
    t0 = time.perf_counter()
    first, count = None, 0
    stream = client.chat.completions.create(
        model=model, stream=True, temperature=0, max_tokens=tokens, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
                                               {"type": "text", "text": PROMPT}]}],
        extra_body={"min_tokens": tokens})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return first or total, total, count


def run_clients(client, model, audios, tokens, together: bool) -> tuple[float, list[tuple[float, float, int]]]:
    """(wall seconds, per-request results), one after another or all at once."""
    results: list = [None] * len(audios)
    t0 = time.perf_counter()
    if together:
        start = threading.Barrier(len(audios))

        def go(i):
            start.wait()
            results[i] = one_request(client, model, audios[i], tokens)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(audios))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, audio in enumerate(audios):
            results[i] = one_request(client, model, audio, tokens)
    return time.perf_counter() - t0, results


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def load(args):
    """(pipeline, model name) of the model the run serves."""
    from pathlib import Path

    from model.pipeline import Pipeline

    if args.shape:
        import tempfile

        from bench.gpu import DTYPES, build
        device = torch.device(args.device)
        model, _ = build(args.shape, DTYPES[args.dtype], device, tiny=args.shape == "tiny", tokens=args.tokens,
                         workdir=Path(tempfile.mkdtemp()), official=False)
        return Pipeline(model), f"{args.shape}-shapes"
    if args.tiny_test:
        from model.random_tiny import tiny_config
        return Pipeline.from_config(tiny_config(Path(args.tiny_test))), "tiny-test"
    from model.defaults import default_config
    return Pipeline.from_config(default_config("activation", device=args.device)), "activation-tuned"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--clip", type=float, default=10.0, help="seconds of audio per client")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny-test", metavar="DIR", help="a tiny random model (smoke test of this script)")
    p.add_argument("--shape", choices=["tiny", "7b", "13b"],
                   help="SALMONN at these shapes with random weights (bench.gpu's model) instead of the default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="with --shape on a GPU")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import openai

    from bench.measure import fixed_length, test_audio

    pipe, name = load(args)
    url, server = serve({name: pipe})
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    wavs = [test_audio(args.clip, seed=i) for i in range(args.clients)]
    audios = [wav_b64(w) for w in wavs]
    one_request(client, name, audios[0], 4)                   # warm-up
    rows = {}
    for together in (False, True):
        pipe.clear_caches()
        rows[together] = run_clients(client, name, audios, args.tokens, together)
    # one client: the API against the studio's single-answer path, same request, caches cleared
    gen = fixed_length(pipe.default_generate, args.tokens)
    pipe.clear_caches()
    t0 = time.perf_counter()
    for _ in pipe.stream(wavs[0], PROMPT, generate=gen):
        pass
    direct = time.perf_counter() - t0
    pipe.clear_caches()
    _, api_one = one_request(client, name, audios[0], args.tokens)[:2]
    server.should_exit = True

    table = Table(f"{args.clients} clients, {args.clip:g} s clip each, {args.tokens} tokens each (greedy)",
                  ["served", "wall s", "aggregate tokens/s", "TTFT median s", "TTFT p95 s", "tokens"])
    rate = {}
    for together, (wall, results) in rows.items():
        tokens = sum(r[2] for r in results)
        rate[together] = tokens / wall
        firsts = [r[0] for r in results]
        table.add("all at once (shared batch)" if together else "one after another", wall, rate[together],
                  statistics.median(firsts), p95(firsts), tokens)
    ratio = rate[True] / rate[False]
    single = Table("One client: the API vs the studio's single-answer path (same request)",
                   ["path", "seconds", "API / studio"])
    single.add("Pipeline.stream (studio)", direct, 1.0)
    single.add("API (shared batch, HTTP)", api_one, api_one / direct)
    targets = Table("API targets", ["target", "measured", "status"])
    targets.add(f"{args.clients} clients together >= 3x one after another (tokens/s)", ratio, check(ratio, 3.0, "higher"))
    targets.add("1 client within 10 % of the studio's path", api_one / direct, check(api_one / direct, 1.1, "lower"))
    for t in (table, single, targets):
        t.print()
    append_results("API, many clients at once" + (" (tiny test model)" if args.tiny_test else ""),
                   environment(torch.device(args.device), args.dtype if args.shape else "float32"),
                   [table, single, targets],
                   [f"decoded together: at most {pipe.batch.max_batch} rows in one step"], path=args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
