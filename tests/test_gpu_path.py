"""The GPU path, checked on the CPU wherever the mechanism allows: per-row LoRA scales on each
layer's own device and in float32, the prefix cache's held bytes, static runners reused across
answers, out-of-memory from every source, the worker thread's device guard, LoRA in the LLM's
dtype under a device map; and CUDA-only checks (skipped without a GPU)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from model import decoding
from model.config import GenerateConfig
from model.errors import OutOfMemory
from model.fastdecode import RunnerPool, single_device, static_length
from model.kvcache import PrefixCache
from model.llm import LoraScale, current_scale, lora_layers, lora_scale
from model.guards import is_out_of_memory as _is_out_of_memory
from model.pipeline import Pipeline

LONG = GenerateConfig(max_new_tokens=8, num_beams=1, min_length=8)
GREEDY = GenerateConfig(max_new_tokens=8, num_beams=1)


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def prompt_embeds(m, rows: int = 1, question: str = "Describe the audio.", seconds: float = 1.0):
    enc = m.encode_audio(tone(seconds, 300), output_attentions=False)
    embeds, _, _ = m.assemble([enc.embeds] * rows, [m.prompt.conversation([question])] * rows)
    return embeds


LAST: dict = {}       # the path the last `tokens` call took (decode_steps' trace)


def tokens(m, embeds, scale, gen=LONG, **kwargs) -> list[list[int]]:
    LAST.clear()
    with lora_scale(m.llama_model, scale), torch.no_grad():
        return [s.tolist() for s in decoding.decode_steps(m, embeds, None, gen, trace=LAST, **kwargs)]


# ---------------------------------------------------------------- per-row LoRA scales
def test_per_row_scale_is_placed_on_each_layers_device(tiny_model):
    m = copy.deepcopy(tiny_model)
    layers = lora_layers(m.llama_model)
    layers[1].to("meta")                   # as a layer on another GPU of a split LLM
    scale = m._scale_tensor([0.5, 1.3], 2)
    assert isinstance(scale, LoraScale)
    with lora_scale(m.llama_model, scale):
        for layer in layers:
            device = next(layer.parameters()).device
            for value in layer.scaling.values():
                assert value.tensor.device == device and value.tensor.dtype == torch.float32
        x = torch.empty(2, 3, layers[1].in_features, device="meta")
        assert layers[1](x).device.type == "meta"       # the layer's own copy: no cross-device multiply
        assert current_scale(m.llama_model, 2) == pytest.approx([0.5, 1.3])
        assert scale.on("cpu").tensor.flatten().tolist() == [np.float32(0.5), np.float32(1.3)]   # not fp16's 1.2998
    assert all(isinstance(v, float) for layer in layers for v in layer.scaling.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_row_scale_in_half_precision_equals_a_float_scale(tiny_model, dtype):
    """A batched sweep must give each row exactly what one answer at that scale gives."""
    layer = copy.deepcopy(lora_layers(tiny_model.llama_model)[0]).to(dtype)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    rows = LoraScale([1.3, 0.7])
    with torch.no_grad():
        per_row = _run_at(layer, x, rows.on("cpu"))
        for i, s in enumerate([1.3, 0.7]):
            one = _run_at(layer, x, s)
            assert one.dtype == dtype and torch.equal(per_row[i], one[i])


def _run_at(layer, x, scale):
    saved = dict(layer.scaling)
    layer.scaling.update({k: scale for k in layer.scaling})
    try:
        return layer(x)
    finally:
        layer.scaling.update(saved)


# ---------------------------------------------------------------- prefix cache: held bytes = counted bytes
def _held_bytes(cache: PrefixCache) -> int:
    storages = {}
    for entry in cache._entries.values():
        for k, v in entry.kv:
            for t in (k, v):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_prefix_cache_holds_the_bytes_it_counts_after_evictions():
    cache = PrefixCache(max_entries=2, max_bytes=1 << 20)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        batch = [(torch.randn(4, 2, 12, 8, generator=gen), torch.randn(4, 2, 12, 8, generator=gen)) for _ in range(3)]
        for row in range(4):              # each row a slice (padding cut off) of the batch's tensors
            pad = row % 3
            kv = [(k[row:row + 1, :, pad:], v[row:row + 1, :, pad:]) for k, v in batch]
            cache.store(f"audio{step}", float(row), tuple(range(100 * row, 100 * row + 12 - pad)), kv)
            assert _held_bytes(cache) == cache.nbytes
    assert len(cache) == 2


def test_prefix_cache_after_a_scale_sweep_holds_what_it_counts(tiny_model):
    pipe = Pipeline(tiny_model)
    pipe.prefix_cache = PrefixCache(max_entries=1)
    pipe.answer_many(tone(1.0), "Describe the audio.", lora_scales=[0.0, 1.0, 2.0, 4.0], generate=GREEDY)
    assert len(pipe.prefix_cache) == 1 and _held_bytes(pipe.prefix_cache) == pipe.prefix_cache.nbytes


# ---------------------------------------------------------------- static runners reused across answers
def test_one_runner_serves_several_answers_as_fresh_runners_do(tiny_model):
    m = copy.deepcopy(tiny_model)
    m.runners.max_bytes = 1 << 30          # the tiny model's cache is large beside its weights: keep it anyway
    one = prompt_embeds(m, 1)
    three = prompt_embeds(m, 3, "What do you hear?")
    asks = [(one, 4.0), (three, m._scale_tensor([0.0, 1.0, 4.0], 3)), (one, 0.0),
            (three, m._scale_tensor([4.0, 2.0, 0.0], 3)), (one, 4.0)]
    fresh = []
    for embeds, scale in asks:
        m.runners.clear()
        fresh.append(tokens(m, embeds, scale, static=True))
        assert LAST["answers_on_runner"] == 1
    m.runners.clear()
    reused = [tokens(m, embeds, scale, static=True) for embeds, scale in asks]
    assert reused == fresh
    assert LAST["answers_on_runner"] == 3 and len(m.runners) == 2     # one per rows x length bucket
    assert reused[0] == tokens(m, one, 4.0, static=False)
    # from a reused prompt prefix, and after an answer cut short
    record = {}
    with lora_scale(m.llama_model, 4.0), torch.no_grad():
        steps = decoding.decode_steps(m, one, None, LONG, static=True, record=record)
        next(steps)
        steps.close()
    cut = one.shape[1] - 3
    past = [(k[:, :, :cut], v[:, :, :cut]) for k, v in record["kv"]]
    assert tokens(m, one[:, cut:], 4.0, static=True, past=past) == fresh[0]


def test_runner_pool_is_bounded_and_keyed():
    assert [static_length(n) for n in (1, 256, 257, 1000)] == [256, 256, 512, 1024]
    pool = RunnerPool(max_entries=1)
    assert len(copy.deepcopy(pool)) == 0


def test_static_decoding_only_where_the_cache_is_small_beside_the_weights(tiny_model):
    pool = tiny_model.runners
    llm = tiny_model.llama_model
    weights = pool.weight_bytes(llm)
    cfg = llm.get_base_model().config
    per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    fits = int(weights / 8 // per_position)
    assert pool.static_pays(llm, 1, 1) == (256 <= fits)
    assert not pool.static_pays(llm, 10, 2048 + 100)
    assert single_device(llm) == torch.device("cpu")
    m = copy.deepcopy(tiny_model)
    lora_layers(m.llama_model)[0].to("meta")
    assert single_device(m.llama_model) is None


# ---------------------------------------------------------------- out of memory from every source
@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 2.00 GiB",
                                     "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate",
                                     "cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation",
                                     "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"])
def test_out_of_memory_is_recognised_from_every_source(message):
    assert _is_out_of_memory(RuntimeError(message))
    assert _is_out_of_memory(MemoryError()) and _is_out_of_memory(torch.OutOfMemoryError("x"))
    assert not _is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))


def test_cublas_alloc_failure_while_decoding_is_a_message_and_clears_the_caches(tiny_model, monkeypatch):
    pipe = Pipeline(copy.deepcopy(tiny_model))
    wav = tone(1.2, 500)
    before = pipe.answer(wav, "Describe the audio.", generate=GREEDY)
    assert len(pipe.prefix_cache) > 0
    real = decoding.decode_steps

    def failing(*args, **kwargs):
        for i, step in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
            yield step

    monkeypatch.setattr(decoding, "decode_steps", failing)
    with pytest.raises(OutOfMemory, match=r"Out of memory while answering: try shorter audio.*ask again"):
        pipe.answer(wav, "What do you hear?", generate=GREEDY)
    assert len(pipe.prefix_cache) == 0 and len(pipe.model.runners) == 0
    monkeypatch.undo()
    assert pipe._lock.acquire(timeout=1)
    pipe._lock.release()
    assert pipe.answer(wav, "Describe the audio.", generate=GREEDY).text == before.text


def test_other_errors_are_not_turned_into_out_of_memory(tiny_model, monkeypatch):
    pipe = Pipeline(copy.deepcopy(tiny_model))

    def failing(*args, **kwargs):
        raise RuntimeError("Expected all tensors to be on the same device")
        yield

    monkeypatch.setattr(decoding, "decode_steps", failing)
    with pytest.raises(RuntimeError, match="same device"):
        pipe.answer(tone(1.0), "Describe the audio.", generate=GREEDY)


# ---------------------------------------------------------------- the answer worker's device guard
def test_answer_worker_runs_under_the_models_device_guard(tiny_pipeline, monkeypatch):
    import contextlib

    import model.pipeline as pipeline_module

    seen = []

    @contextlib.contextmanager
    def guard(device):
        seen.append((torch.device(device), threading.current_thread().name))
        yield

    monkeypatch.setattr(pipeline_module, "device_guard", guard)
    tiny_pipeline.answer(tone(1.0), "Describe the audio.", generate=GREEDY)
    assert seen == [(tiny_pipeline.model.llm_device, "salmonn-worker")]


# ---------------------------------------------------------------- LoRA in the LLM's dtype under a device map
def test_lora_follows_the_llm_dtype_under_a_device_map(tiny_cfg):
    from model.salmonn import SALMONN

    m = SALMONN.from_config(tiny_cfg.replace(device_map="cpu", dtype="bfloat16"))
    lora = {p.dtype for n, p in m.llama_model.named_parameters() if "lora_" in n}
    assert m.llm_dtype == torch.bfloat16 and lora == {torch.bfloat16}


# ---------------------------------------------------------------- the one-shot GPU check, CPU smoke run
def test_gpu_check_script_smoke_run(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    run = subprocess.run(["bash", str(script), "--smoke"], env={**os.environ, "OUT": str(tmp_path)},
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"static tokens = dynamic tokens (first 4)", "4-scale sweep batched = one by one"} <= set(report["checks"])
    assert report["results"]["static_dynamic_first_difference"] is None
    assert all(report["checks"].values()) and report["results"]["decode_ms_per_token"] > 0
    assert "static cache + CUDA graph" in (tmp_path / "bench_gpu.md").read_text()


# ---------------------------------------------------------------- CUDA only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_graph_is_captured_once_and_reused(tiny_model):
    m = copy.deepcopy(tiny_model).place(torch.device("cuda"), torch.float16)
    m.runners.max_bytes = 1 << 30
    embeds = prompt_embeds(m, 1)
    first = tokens(m, embeds, 4.0, static=True)
    assert LAST["cuda_graph"], LAST["graph_error"]
    (runner,) = m.runners._runners.values()
    graph = runner.graph
    assert tokens(m, embeds, 4.0, static=True) == first == tokens(m, embeds, 4.0, static=False)
    other = tokens(m, embeds, 1.0, static=True)          # a new scale: the same graph, other tokens
    assert LAST["answers_on_runner"] == 3 and runner.graph is graph
    assert other == tokens(m, embeds, 1.0, static=False)


@cuda
def test_cuda_loads_straight_onto_the_gpu(tiny_cfg):
    from model.salmonn import SALMONN

    m = SALMONN.from_config(tiny_cfg.replace(device="cuda", dtype="float16"))
    assert {p.device.type for p in m.llama_model.parameters()} == {"cuda"}
    assert {p.dtype for n, p in m.llama_model.named_parameters() if "lora_" in n} == {torch.float16}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_answers_equal_a_synchronous_reference(tiny_model):
    m = copy.deepcopy(tiny_model).place(torch.device("cuda:1"), torch.float16)
    m.runners.max_bytes = 1 << 30
    pipe = Pipeline(m, prefix_cache=False)
    wav = tone(1.0, 300)
    enc = pipe.encode(wav)
    embeds, _, _ = m.assemble([enc.tokens.embeds], [pipe.prompt_text("Describe the audio.")])

    def reference(scale):       # on this thread, cuda:1 current, the host waiting for every token
        with torch.cuda.device(1):
            return m.decode_text([t[0] for t in tokens(m, embeds, scale, gen=GREEDY, static=False, lookahead=False)])

    for _ in range(2):          # on the worker thread: lookahead, events, the static runner reused
        assert pipe.answer(wav, "Describe the audio.", generate=GREEDY).text == reference(pipe.trained_scale)
    scales = [0.0, 1.0, 2.0]
    batch = pipe.answer_many(wav, "Describe the audio.", lora_scales=scales, generate=GREEDY)
    assert [a.text for a in batch] == [reference(s) for s in scales]
