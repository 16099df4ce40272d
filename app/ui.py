"""The Gradio app: Chat (audio in, streamed answers, what the model sees), Scale lab, Model.

`build_app(pipeline, extra_pipelines)` builds the Blocks from ready Pipelines (the launcher loads
them; tests pass the tiny random model). `launch(demo, ...)` applies the safe serving defaults.
Every model call goes through `model.pipeline.Pipeline`; user audio only ever lives in Gradio's
upload cache and in per-session state.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import weakref
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Mapping

import gradio as gr
import numpy as np

from model.audio import SAMPLE_RATE
from model.config import GENERATE_LIMITS
from model.errors import AudioError, SalmonnError
from model.pipeline import Encoding, Pipeline

from . import lab, plots, presets
from .runner import Busy, ModelGate, StopRegistry, generate_config

log = logging.getLogger("salmonn.app")

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
MODEL_LOCK_ID = "model"        # every event that runs the model: they take turns through one ModelGate
VIEW_LOCK_ID = "view"          # plot re-renders (CPU only) get their own

INTRO = """\
# SALMONN Studio
Ask SALMONN about any sound: speech, sound scenes, music, or speech over background noise.
Upload a file or record with your microphone, pick a task preset or type your own question.
Below the chat you can see exactly what the model hears: the log-mel spectrogram and how each
Q-Former window (~0.33 s; each of its queries becomes one audio token) spreads its attention over the
encoder frames.
"""

LAB_TEXT = """\
### Why a LoRA scale slider?
SALMONN's connection to the language model is a LoRA adapter: the LLM's weights become
`W + s·BA`, where `s` (the *scale*) is fixed during training (alpha/rank = 4.0 for SALMONN).
Instruction tuning on a handful of tasks (speech recognition, captioning, ...) teaches the adapter
those tasks *too* well: asked to tell a story or answer a spoken question, the model just
transcribes or gives a short caption. The paper calls this **task over-fitting**.

Turning the scale down at test time weakens that bias: around half the trained value the model
starts following new instructions again, but it gets worse at the trained tasks. Scale 0 switches
LoRA off completely (the plain LLM plus the audio tokens). **Activation tuning** fixes the problem
properly: a few training steps on long, diverse answers (stories the model wrote itself at a
reduced scale) restore instruction following at the full scale without hurting recognition.

Try it below: the same audio and question answered at several scales side by side, and how likely
the model finds reference answers (perplexity; lower is better) as the scale changes. With both an
instruction-tuned and an activation-tuned checkpoint loaded you can compare the two directly.
"""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _warn(err: Exception) -> str:
    """Show an error to the user as a toast; return the text for inline display."""
    if isinstance(err, SalmonnError):
        text = str(err)
    else:   # a bug, not a user mistake: keep the traceback in the server log only
        log.exception("unexpected error")
        text = f"Internal error ({type(err).__name__}): {err}"
    gr.Warning(text)
    return text


def span(setting: str) -> tuple[float, float]:
    """A decoding control's (minimum, maximum): the pipeline's accepted range, so they always agree."""
    limit = GENERATE_LIMITS[setting]
    return limit.low, limit.high


def _checked_by_the_pipeline(*controls) -> None:
    """Hand these controls' values to our function as sent: the pipeline's one check names the setting
    and its range, where Gradio's own would round 2.5 beams to 2 or fail on a string with a generic error."""
    for control in controls:
        control.preprocess = lambda payload: payload


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _fmt_seconds(s: float) -> str:
    return f"{s:.2f} s"


def _answer_footer(answer, gen) -> str:
    mode = f"beam search ({gen.num_beams})" if gen.num_beams > 1 else ("sampling" if gen.do_sample else "greedy")
    if gen.ctc_weight:
        mode += f", CTC-guided ({gen.ctc_weight:g})"
    bits = [f"LoRA scale {answer.lora_scale:g}", mode, f"{answer.num_tokens} tokens"]
    if "total_s" in answer.timings:
        bits.append(_fmt_seconds(answer.timings["total_s"]))
    if answer.stopped:
        bits.append("stopped")
    return "*(" + " · ".join(bits) + ")*"


def _audio_notes(enc: Encoding) -> str:
    """What the user should know about their audio (cut, clipped, scaled), under the answer."""
    return "".join(f"\n\n⚠️ {note}" for note in enc.audio.notes)


def _messages(history: list[dict]) -> list[dict]:
    out = []
    for turn in history:
        out.append({"role": "user", "content": turn["q"]})
        out.append({"role": "assistant", "content": turn["shown"]})
    return out


def _loudest_window(enc: Encoding) -> int:
    """A sensible first window to show: the one over the loudest part of the audio."""
    tokens = enc.tokens
    energy = np.asarray(tokens.mel).mean(axis=0)
    t = float(np.argmax(energy)) / 100.0 if energy.size else 0.0
    return plots.window_at(tokens, t) or 0


def _layer_choices(pipe: Pipeline) -> tuple[list[str], list[str]]:
    q = pipe.cfg.qformer
    layers = ["all", "average"] + [str(i) for i in range(1, q.num_layers + 1)]
    heads = ["average", "all"] + [str(i) for i in range(1, q.num_heads + 1)]
    return layers, heads


def _info_markdown(name: str, pipe: Pipeline) -> str:
    info = pipe.info()
    rows = [("Model", info.get("name")), ("Speech encoder", info.get("speech_encoder")),
            ("Audio encoder", info.get("audio_encoder")), ("LLM", info.get("llm")),
            ("Checkpoint", info.get("checkpoint")), ("LoRA", info.get("lora")),
            ("Q-Former window", info.get("window")), ("Device", info.get("device")), ("dtype", info.get("dtype")),
            ("Parameters", f"{info.get('parameters', 0):,} ({info.get('trainable_parameters', 0):,} trained by SALMONN)")]
    if "gpu_memory_gb" in info:
        rows.append(("GPU memory in use", f"{info['gpu_memory_gb']} GB"))
    if "process_memory_gb" in info:
        rows.append(("Process memory (peak)", f"{info['process_memory_gb']} GB"))
    table = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)
    extra = "\n\n**Speech encoder only**: no BEATs audio encoder is loaded, so non-speech sounds are heard " \
            "through Whisper alone." if info.get("speech_only") else ""
    return f"### {name}\n| Item | Value |\n|---|---|\n{table}{extra}"


def _summary_line(name: str, pipe: Pipeline) -> str:
    info = pipe.info()
    enc = "speech encoder only" if info.get("speech_only") else "Whisper + BEATs"
    return (f"**Model:** {name} · {enc} · {info.get('device')} · {info.get('dtype')} · "
            f"trained LoRA scale {pipe.trained_scale:g}")


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------

GATES: "weakref.WeakKeyDictionary[gr.Blocks, ModelGate]" = weakref.WeakKeyDictionary()   # each app's line


def gate_of(demo: gr.Blocks) -> ModelGate:
    """The app's line for model jobs (tests look at who waits)."""
    return GATES[demo]


def build_app(pipeline: Pipeline, extra_pipelines: Mapping[str, Pipeline] | None = None, *,
              primary_name: str | None = None, queue_size: int = 16,
              desktop_mic: bool | None = None) -> gr.Blocks:
    """Build the UI around ready pipelines. `extra_pipelines` (e.g. {"instruction-tuned": pipe})
    are offered as alternatives in the chat and compared side by side in the scale lab.
    `desktop_mic`: add the local-microphone panel (None = when sounddevice finds an input device;
    pass False whenever people other than the host can reach the app)."""
    name0 = primary_name or pipeline.cfg.name or "model"
    pipes: dict[str, Pipeline] = {name0: pipeline}
    for name, pipe in (extra_pipelines or {}).items():
        pipes[name if name not in pipes else f"{name} (2)"] = pipe
    names = list(pipes)
    trained = pipeline.trained_scale
    trained_of = {n: p.trained_scale for n, p in pipes.items()}
    gen0 = pipeline.default_generate
    guidable = any(p.has_ctc_head for p in pipes.values())     # a checkpoint with a CTC head
    layer_choices, head_choices = _layer_choices(pipeline)
    stops = StopRegistry()
    gate = ModelGate(queue_size)      # one model job at a time; a bounded line with a "busy, N ahead" message
    slots = queue_size + 2            # Gradio runs this many model events at once: the gate orders them
    from .mic_panel import build_mic_panel, input_devices
    mic_devices = input_devices() if desktop_mic is not False else []

    def pipe_of(name) -> Pipeline:
        return pipes.get(name) or pipeline

    # -------------------------------------------------------------- view (spectrogram + attention)
    def render_view(enc: Encoding, layer, head, window):
        tokens = enc.tokens
        window = int(min(max(int(window or 0), 0), len(tokens.window_starts) - 1))
        spec_fig, axis = plots.spectrogram_figure(tokens, selected=window)
        attn_fig, _ = plots.attention_figure(tokens, layer or "all", head or "average", selected=window)
        bar = plots.window_bar_figure(tokens, window, layer or "all", head or "average")
        view = {"axis": axis.to_dict(), "windows": len(tokens.window_starts)}
        return plots.render(spec_fig), plots.render(attn_fig), bar, view, window

    def audio_summary(enc: Encoding) -> str:
        tokens = enc.tokens
        pad = plots.padding_windows(tokens)
        windows = len(tokens.window_starts)
        n_tokens = int(tokens.embeds.shape[0])
        text = f"**Heard:** {enc.audio.describe()}. **Audio tokens:** {n_tokens}"
        if n_tokens != windows:
            text += f" ({n_tokens // max(1, windows)} per Q-Former window, {windows} windows)"
        if pad:
            text += f"; {pad} window(s) cover Whisper's silent padding up to the end of the 30 s chunk"
        if len(tokens.chunk_starts) > 1:
            text += f"; encoded as {len(tokens.chunk_starts)} chunks of 30 s"
        if tokens.lead_in > 0.005:   # the model padded an abrupt start (cfg.lead_in_seconds); the plots show it
            text += f"; {tokens.lead_in:.2f} s of quiet added in front, as every training clip starts quietly"
        return text + "."

    def load_audio(path, model_name, layer, head, origin="file"):
        """New audio: encode it, show what the model hears, start a fresh conversation."""
        fresh = ([], [], "", None)   # chatbot, history, prompt sent, details
        if not path:
            return (None, "", None, None, gr.Slider(value=0, maximum=87), None, {}) + fresh
        try:
            pipe = pipe_of(model_name)
            audio = pipe.prepare(path, origin)       # bad audio is told at once, without waiting in line
            enc = gate.run(pipe.encode, audio)
            window = _loudest_window(enc)
            spec, attn, bar, view, window = render_view(enc, layer, head, window)
        except Exception as err:  # noqa: BLE001 - shown to the user
            text = _warn(err)
            return (None, f"⚠️ {text}", None, None, gr.skip(), None, {}) + fresh
        for note in enc.audio.notes:       # cut, clipped, scaled: said, not silent
            gr.Warning(note)
        heard = (SAMPLE_RATE, (np.clip(enc.audio.wav, -1, 1) * 32767).astype(np.int16))
        slider = gr.Slider(value=window, maximum=max(view["windows"] - 1, 1))
        return (heard, audio_summary(enc), spec, attn, slider, bar, view) + fresh

    def seen(model_name, path) -> Encoding:
        """What the model heard in this file: its cached encoding at once (redraws never wait for the
        model), else encoded now."""
        pipe = pipe_of(model_name)
        return pipe.cached(path) or pipe.encode(path)

    def redraw(path, model_name, layer, head, window):
        if not path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            enc = seen(model_name, path)
            spec, attn, bar, view, window = render_view(enc, layer, head, window)
        except Exception as err:  # noqa: BLE001
            _warn(err)
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return spec, attn, bar, view, gr.Slider(value=window, maximum=max(view["windows"] - 1, 1))

    def pick_window(path, model_name, layer, head, view, evt: gr.SelectData):
        """A click on the spectrogram or attention image selects the window under it."""
        if not path or not view or not isinstance(evt.index, (list, tuple)):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        axis = plots.TimeAxis(**view["axis"])
        t = axis.time_at(float(evt.index[0]))
        enc = seen(model_name, path)
        window = plots.window_at(enc.tokens, t)
        if window is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return redraw(path, model_name, layer, head, window)

    # -------------------------------------------------------------- chat
    def gen_from(beams, sample, temperature, top_p, top_k, rep, max_new, seed, ctc=0.0):
        return generate_config(gen0, num_beams=beams, do_sample=sample, temperature=temperature, top_p=top_p,
                               top_k=top_k, repetition_penalty=rep, max_new_tokens=max_new, seed=seed,
                               ctc_weight=ctc)

    def respond(question, history, path, model_name, scale, beams, sample, temperature, top_p, top_k, rep,
                max_new, seed, ctc=0.0, origin="file", request: gr.Request = None):
        """Stream one answer. Yields (chatbot, history, prompt box, prompt sent, details)."""
        history = list(history or [])
        question = str(question or "").strip()
        echo = question if len(question) <= 2000 else question[:2000] + " …"   # what the chat shows of it
        pipe = pipe_of(model_name)
        try:    # the pipeline's front door checks everything before the request waits for the model
            if not path:
                raise AudioError("Upload or record some audio first (or click one of the examples).")
            past = [(t["q"], t["a"]) for t in history]
            req = pipe.check_request(path, question, past, scale,
                                     gen_from(beams, sample, temperature, top_p, top_k, rep, max_new, seed, ctc), origin)
            gen, sent, scale = req.gen, req.text, req.scale
        except Exception as err:  # noqa: BLE001
            text = _warn(err)
            yield _messages(history) + [{"role": "user", "content": echo},
                                        {"role": "assistant", "content": f"⚠️ {text}"}], history, gr.skip(), \
                gr.skip(), gr.skip()
            return
        waiting = "…" if gen.num_beams == 1 else "… (beam search: words appear once every beam that could win agrees)"
        shown = _messages(history) + [{"role": "user", "content": echo}, {"role": "assistant", "content": waiting}]
        yield shown, history, "", sent, gr.skip()
        session = _session(request)
        stop = stops.start(session)
        answer, text, enc, ticket, events = None, "", None, None, None
        room = ExitStack()
        try:
            if gen.num_beams > 1:       # beam search runs alone: it waits its turn in the line
                ticket = gate.join()                    # Busy (a message) when the line is full
                for ahead in gate.waiting(ticket, stop):
                    shown[-1] = {"role": "assistant", "content": f"⏳ Waiting for the model: {ahead} ahead of you…"}
                    yield shown, gr.skip(), gr.skip(), gr.skip(), gr.skip()
            else:                       # answered in the shared batch, beside every other user's answer
                room.enter_context(room_in_the_batch(pipe))
            if not stop.is_set():
                shown[-1] = {"role": "assistant", "content": waiting}
                yield shown, gr.skip(), gr.skip(), gr.skip(), gr.skip()
                enc = pipe.encode(req.audio)
                events = pipe.stream_shared(dataclasses.replace(req, audio=enc), stop=stop)
                for ev in events:
                    text = ev.text
                    if ev.done:
                        answer = ev.answer
                        break
                    shown[-1] = {"role": "assistant", "content": text + " ▌"}
                    yield shown, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        except Exception as err:  # noqa: BLE001
            msg = _warn(err)
            shown[-1] = {"role": "assistant", "content": (text + "\n\n" if text else "") + f"⚠️ {msg}"}
            yield shown, history, gr.skip(), gr.skip(), gr.skip()
            return
        finally:
            # Also runs when Gradio closes this generator (the client cancelled or went away): closing
            # the stream stops the model at the next token, and the next in line gets its turn.
            if events is not None:
                events.close()
            if ticket is not None:
                gate.leave(ticket)
            room.close()
            stops.finish(session, stop)
        if answer is None:   # stopped before the worker delivered its final answer
            footer = f"*(LoRA scale {scale:g} · stopped)*"
            details = {"lora_scale": scale, "stopped": True, "prompt": sent}
            final_text = text
        else:
            footer = _answer_footer(answer, gen)
            details = {"lora_scale": answer.lora_scale, "num_tokens": answer.num_tokens, "stopped": answer.stopped,
                       "timings": answer.timings, "generate": gen.__dict__}
            final_text = answer.text
            sent = answer.prompt
        body = final_text if final_text else "*(empty answer)*"
        if enc is not None:
            footer += _audio_notes(enc)
            details["audio"] = enc.audio.describe()
        history.append({"q": question, "a": final_text, "shown": f"{body}\n\n{footer}",
                        "scale": details["lora_scale"]})
        yield _messages(history), history, gr.skip(), sent, details

    shared = {"answers": 0}            # chat answers in the shared batch (written or waiting)
    shared_lock = threading.Lock()

    @contextmanager
    def room_in_the_batch(pipe: Pipeline):
        """The shared batch takes `max_batch_rows` answers at once and `queue_size` more waiting."""
        with shared_lock:
            taken, most = shared["answers"], pipe.max_batch_rows + gate.max_waiting
            if taken >= most:
                raise Busy(f"The model is busy: {taken} answers are being written or waiting, and at most "
                           f"{most} may. Please try again in a minute.")
            shared["answers"] += 1
        try:
            yield
        finally:
            with shared_lock:
                shared["answers"] -= 1

    def regenerate(history, path, model_name, scale, beams, sample, temperature, top_p, top_k, rep, max_new, seed,
                   ctc=0.0, origin="file", request: gr.Request = None):
        """Ask the last question again (with the current settings), replacing its answer."""
        history = list(history or [])
        if not history:
            gr.Warning("Nothing to regenerate yet: ask a question first.")
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        last = history.pop()
        yield from respond(last["q"], history, path, model_name, scale, beams, sample, temperature, top_p, top_k,
                           rep, max_new, seed, ctc, origin, request)

    def stop_answer(request: gr.Request):
        stops.stop(_session(request))

    def clear_chat():
        return [], [], "", None

    # -------------------------------------------------------------- presets
    def apply_preset(label):
        preset = presets.PRESETS_BY_LABEL.get(label)
        if preset is None:
            return gr.skip(), ""
        return preset.prompt, preset.note

    def suggested_settings(label):
        preset = presets.PRESETS_BY_LABEL.get(label)
        scale, beams, ctc = preset.suggested(trained) if preset else (round(trained, 1), 1, 0.0)
        return scale, beams, ctc if guidable else 0.0

    # -------------------------------------------------------------- scale lab
    def take_turn(stop, ticket):
        """While this request waits for the model: how many are ahead, as a status line."""
        for ahead in gate.waiting(ticket, stop):
            yield f"⏳ Waiting for the model: {ahead} ahead of you…"

    def run_lab(path, prompt, scales_text, beams, sample, temperature, top_p, top_k, rep, max_new, seed, ctc=0.0,
                request: gr.Request = None):
        """Every checkpoint answers at every scale, shown as it is written. Yields (answers, raw, status)."""
        if not path:
            gr.Warning("Upload or record some audio on the Chat tab first (or click an example there).")
            yield gr.skip(), gr.skip(), gr.skip()
            return
        try:       # every check before the request waits for the model
            scales = lab.parse_scales(scales_text, pipeline.scale_limit)
            gen = gen_from(beams, sample, temperature, top_p, top_k, rep, max_new, seed, ctc)
            for p in pipes.values():
                p.check_generate(gen)
            gen = pipeline.check_generate(gen)
            lab.check_budget(scales, gen, len(pipes))
            audio = pipeline.prepare(path)
            for p in pipes.values():
                p.prompt_text(prompt)
        except Exception as err:  # noqa: BLE001
            text = _warn(err)
            yield f"<p>⚠️ {text}</p>", None, ""
            return
        session = _session(request)
        stop = stops.start(session)
        ticket, progress, t0 = None, {}, None
        try:
            ticket = gate.join()
            for status in take_turn(stop, ticket):
                yield gr.skip(), gr.skip(), status
            t0 = time.monotonic()
            with closing(lab.compare_scales(pipes, audio, prompt, scales, generate=gen, stop=stop)) as runs:
                for progress in runs:
                    yield lab.answers_html(progress, scales, trained_of), gr.skip(), lab_progress_line(progress, scales, t0)
        except Exception as err:  # noqa: BLE001
            text = _warn(err)
            yield (lab.answers_html(progress, scales, trained_of) + f"<p>⚠️ {text}</p>"), None, ""
            return
        finally:     # also when Gradio closes this generator (cancelled, tab closed): the model is freed
            if ticket is not None:
                gate.leave(ticket)
            stops.finish(session, stop)
        yield (lab.answers_html(progress, scales, trained_of), lab.answers_json(progress),
               lab_progress_line(progress, scales, t0, stopped=stop.is_set()))

    def lab_progress_line(progress, scales, t0, stopped=False) -> str:
        done = sum(sum(e.finished) for e in progress.values())
        total = len(scales) * len(pipes)
        took = f" in {time.monotonic() - t0:.1f} s" if t0 is not None else ""
        if stopped:
            return f"⏹ Stopped: {done} of {total} answers finished{took}."
        if done == total and all(e.answers for e in progress.values()):
            return f"✅ Done: {total} answers{took}."
        running = next((n for n, e in progress.items() if not e.answers), "")
        return f"⏳ Answering{f' ({running})' if len(pipes) > 1 else ''}: {done} of {total} answers finished{took}…"

    def run_sweep(items, scales_text, request: gr.Request = None):
        """Perplexity vs LoRA scale, drawn as each clip is measured. Yields (plot, table, status)."""
        try:
            scales = lab.parse_scales(scales_text, pipeline.scale_limit)
            lab.check_items(items)
        except Exception as err:  # noqa: BLE001
            text = _warn(err)
            yield gr.skip(), gr.skip(), f"⚠️ {text}"
            return
        session = _session(request)
        stop = stops.start(session)
        ticket, done, total, t0 = None, 0, len(items) * len(pipes), None
        figure, table = gr.skip(), gr.skip()
        try:
            ticket = gate.join()
            for status in take_turn(stop, ticket):
                yield gr.skip(), gr.skip(), status
            t0 = time.monotonic()
            with closing(lab.perplexity_sweep(pipes, items, scales, stop=stop)) as sweep:
                for curves, table, done, total in sweep:
                    figure = plots.perplexity_figure(curves, trained)
                    yield figure, table, f"⏳ Measured {done} of {total} clips ({time.monotonic() - t0:.1f} s)…"
        except Exception as err:  # noqa: BLE001
            text = _warn(err)
            yield gr.skip(), gr.skip(), f"⚠️ {text}"
            return
        finally:     # also when Gradio closes this generator (cancelled, tab closed)
            if ticket is not None:
                gate.leave(ticket)
            stops.finish(session, stop)
        took = f" in {time.monotonic() - t0:.1f} s" if t0 is not None else ""
        word = "⏹ Stopped" if stop.is_set() else "✅ Done"
        yield figure, table, f"{word}: {done} of {total} clips measured{took}."

    def lab_preset(label):
        preset = presets.PRESETS_BY_LABEL.get(label)
        return preset.prompt if preset else gr.skip()

    # -------------------------------------------------------------- layout
    # Gradio's temp cache (uploads, rendered audio/images) is cleaned: files older than an hour every
    # ten minutes, and everything this app wrote when it shuts down.
    with gr.Blocks(title="SALMONN Studio", delete_cache=(600, 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(_summary_line(name0, pipeline)
                    + (f" · also loaded: {', '.join(names[1:])}" if len(names) > 1 else ""))
        history = gr.State([])
        view_state = gr.State({})
        origin = gr.State("upload")

        with gr.Tab("Chat", id="chat"):
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    audio_in = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                        label="Audio: upload a file or record", elem_id="audio-in")
                    video_in = gr.UploadButton("Upload a video or another file (mp4, mov, mkv, webm, …)", size="sm",
                                               file_types=["audio", "video"], elem_id="video-in")
                    heard = gr.Audio(label="What the model hears (16 kHz mono, the part used)", type="numpy",
                                     interactive=False, elem_id="heard")
                    audio_info = gr.Markdown(elem_id="audio-info")
                    if mic_devices:
                        build_mic_panel(audio_in, mic_devices, origin)
                    model_pick = gr.Radio(names, value=name0, label="Model", visible=len(names) > 1)
                    preset_dd = gr.Dropdown([p.label for p in presets.PRESETS], value=None, label="Task preset",
                                            info="Fills the question; L1 = trained tasks, L2/L3 = emergent abilities",
                                            elem_id="preset")
                    preset_note = gr.Markdown(elem_id="preset-note")
                    scale = gr.Slider(0, pipeline.scale_limit.high, value=trained, step=0.1, label="LoRA scale",
                                      info=f"trained scale = {trained:g}; 0 = LoRA off. Applied instantly, no reload.",
                                      elem_id="lora-scale")
                    scale_hint = gr.Button("Use the preset's suggested scale and decoding", size="sm")
                    with gr.Accordion("Decoding", open=False):
                        beams = gr.Slider(*span("num_beams"), value=1, step=1, label="Beams",
                                          info="1 streams each token; >1 = beam search, streamed as the beams agree "
                                               "(the official SALMONN decodes with 4)")
                        sample = gr.Checkbox(value=gen0.do_sample, label="Sampling (off = greedy / beam)")
                        temperature = gr.Slider(*span("temperature"), value=gen0.temperature, step=0.01,
                                                label="Temperature",
                                                info="used when sampling")
                        top_p = gr.Slider(*span("top_p"), value=gen0.top_p, step=0.01, label="Top-p",
                                          info="used when sampling")
                        top_k = gr.Slider(*span("top_k"), value=gen0.top_k, step=1, label="Top-k (0 = off)",
                                          info="used when sampling")
                        rep = gr.Slider(*span("repetition_penalty"), value=gen0.repetition_penalty, step=0.05,
                                        label="Repetition penalty")
                        max_new = gr.Slider(*span("max_new_tokens"), value=gen0.max_new_tokens, step=1,
                                            label="Max new tokens")
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)",
                                         info="makes sampling repeatable")
                        ctc = gr.Slider(*span("ctc_weight"), value=0.0, step=0.05, label="CTC guidance (transcripts only)",
                                        interactive=guidable,
                                        info="weighs each word by how well the audio tokens spell it (the "
                                             "checkpoint's CTC head): fewer misheard words in a transcript; "
                                             "any other answer would be forced toward the transcript. 0 = off"
                                             + ("" if guidable else ". This checkpoint has no CTC head."))
                with gr.Column(scale=3, min_width=400):
                    chatbot = gr.Chatbot(label="SALMONN", height=460, buttons=["copy"], elem_id="chatbot",
                                         placeholder="Pick an example or upload audio, then ask a question.")
                    question = gr.Textbox(label="Your question", placeholder="Ask about the audio…", lines=2,
                                          elem_id="question")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                        regen = gr.Button("Regenerate", elem_id="regenerate")
                        clear = gr.Button("Clear chat", elem_id="clear")
                    with gr.Accordion("Prompt sent & timings", open=False):
                        prompt_sent = gr.Textbox(label="Exact text sent to the LLM (the audio tokens replace "
                                                       "<SpeechHere>)", interactive=False, lines=4,
                                                 elem_id="prompt-sent")
                        details = gr.JSON(label="Last answer: LoRA scale, tokens, timings, decoding")
                    gr.Examples(
                        examples=[[str(e.path), presets.PRESETS_BY_KEY[e.preset].label] for e in presets.EXAMPLES
                                  if e.path.is_file()],
                        inputs=[audio_in, preset_dd], examples_per_page=len(presets.EXAMPLES),
                        label="Examples: bundled clips (speech, sound scene, music, speech over rain). Any task "
                              "preset works with any clip.")
            with gr.Accordion("What the model sees", open=True):
                gr.Markdown("Click the spectrogram or the attention map to pick a window. Each Q-Former window "
                            "(thin lines) becomes one audio token per query for the LLM (the paper's model: 1 per window; "
                            "SALMONN-tiny: 2). The map averages the queries.")
                spec_img = gr.Image(label="Log-mel spectrogram (model input)", show_label=False, type="numpy",
                                    format="png",
                                    interactive=False, elem_id="spectrogram", buttons=["download", "fullscreen"])
                attn_img = gr.Image(label="Q-Former window attention", show_label=False, type="numpy",
                                    format="png",
                                    interactive=False, elem_id="attention", buttons=["download", "fullscreen"])
                with gr.Row():
                    layer = gr.Dropdown(layer_choices, value="all", label="Q-Former layer", scale=1)
                    head = gr.Dropdown(head_choices, value="average", label="Attention head", scale=1)
                    window = gr.Slider(0, 87, value=0, step=1, label="Window", scale=2, elem_id="window")
                bar = gr.Plot(label="Selected window: attention over its frames", elem_id="window-bar")

        with gr.Tab("Scale lab", id="lab"):
            gr.Markdown(LAB_TEXT)
            with gr.Row():
                lab_preset_dd = gr.Dropdown([p.label for p in presets.PRESETS], label="Task preset",
                                            value=presets.PRESETS_BY_KEY["story"].label, scale=1)
                lab_prompt = gr.Textbox(label="Question (uses the audio from the Chat tab)",
                                        value=presets.PRESETS_BY_KEY["story"].prompt, lines=2, scale=3,
                                        elem_id="lab-prompt")
            with gr.Row():
                lab_scales = gr.Textbox(label="LoRA scales (comma list)", value=presets.default_scales(trained),
                                        elem_id="lab-scales", scale=3)
                lab_run = gr.Button("Answer at every scale", variant="primary", elem_id="lab-run", scale=1)
                lab_stop = gr.Button("Stop", variant="stop", elem_id="lab-stop", scale=0, min_width=80)
            lab_audio = gr.Markdown("*No audio yet: load one on the Chat tab.*", elem_id="lab-audio")
            lab_status = gr.Markdown(elem_id="lab-status")
            lab_html = gr.HTML(elem_id="lab-answers")
            with gr.Accordion("Raw results", open=False):
                lab_json = gr.JSON()
            gr.Markdown("### Perplexity of reference answers versus LoRA scale\nFor each bundled clip and task we "
                        "wrote a reference answer; the model scores it token by token (teacher forcing) at each "
                        "scale, all scales in one batch.")
            with gr.Row():
                ppl_items = gr.CheckboxGroup([i.label for i in presets.LAB_ITEMS], value=presets.DEFAULT_LAB_ITEMS,
                                             label="Clips and tasks", scale=3)
                with gr.Column(scale=1):
                    ppl_scales = gr.Textbox(label="LoRA scales", value=presets.sweep_scales(trained))
                    with gr.Row():
                        ppl_run = gr.Button("Measure perplexity", elem_id="ppl-run")
                        ppl_stop = gr.Button("Stop", variant="stop", elem_id="ppl-stop", min_width=80)
            ppl_status = gr.Markdown(elem_id="ppl-status")
            ppl_plot = gr.Plot(label="Perplexity vs LoRA scale", elem_id="ppl-plot")
            with gr.Accordion("Values", open=False):
                ppl_table = gr.Dataframe(headers=["model", "clip · task", "LoRA scale", "perplexity", "NLL"],
                                         label="Values", interactive=False)
            from .sweep_panel import build_sweep_panel
            build_sweep_panel(pipes, gate=gate, stops=stops, concurrency_id=MODEL_LOCK_ID, concurrency_limit=slots)

        with gr.Tab("Model", id="model"):
            info_md = [gr.Markdown(_info_markdown(n, p)) for n, p in pipes.items()]
            refresh = gr.Button("Refresh (memory use changes as you go)", size="sm")

        # ---------------------------------------------------------- wiring
        dec = [beams, sample, temperature, top_p, top_k, rep, max_new, seed, ctc]
        _checked_by_the_pipeline(scale, *dec)
        # where the audio came from words the messages about it (a silent recording vs a silent file)
        audio_in.start_recording(lambda: "microphone", None, origin, api_visibility="private", queue=False)
        audio_in.upload(lambda: "upload", None, origin, api_visibility="private", queue=False)
        video_in.upload(lambda f: (f, "upload"), video_in, [audio_in, origin], api_visibility="private", queue=False)
        view_out = [spec_img, attn_img, bar, view_state, window]
        audio_in.change(load_audio, [audio_in, model_pick, layer, head, origin],
                        [heard, audio_info, spec_img, attn_img, window, bar, view_state,
                         chatbot, history, prompt_sent, details],
                        api_name="load_audio", concurrency_id=MODEL_LOCK_ID, concurrency_limit=slots
                        ).then(lambda info: f"Audio for the lab: {info}" if info else "*No audio yet: load one on "
                               "the Chat tab.*", audio_info, lab_audio, api_visibility="private", queue=False)
        model_pick.change(redraw, [audio_in, model_pick, layer, head, window], view_out,
                          api_visibility="private", concurrency_id=MODEL_LOCK_ID, concurrency_limit=slots)
        for ctl in (layer, head):
            ctl.change(redraw, [audio_in, model_pick, layer, head, window], view_out, api_visibility="private",
                       concurrency_id=VIEW_LOCK_ID, concurrency_limit=2, trigger_mode="always_last")
        window.release(redraw, [audio_in, model_pick, layer, head, window], view_out, api_name="view",
                       concurrency_id=VIEW_LOCK_ID, concurrency_limit=2, trigger_mode="always_last")
        for img in (spec_img, attn_img):
            img.select(pick_window, [audio_in, model_pick, layer, head, view_state], view_out,
                       api_visibility="private", concurrency_id=VIEW_LOCK_ID, concurrency_limit=2,
                       trigger_mode="always_last")

        preset_dd.change(apply_preset, preset_dd, [question, preset_note], api_name="preset", queue=False)
        # picking the preset already shown (after a new upload, say) fires no change: fill the question again
        preset_dd.select(apply_preset, preset_dd, [question, preset_note], api_visibility="private", queue=False)
        scale_hint.click(suggested_settings, preset_dd, [scale, beams, ctc], api_name="suggested", queue=False)

        chat_in = [question, history, audio_in, model_pick, scale] + dec + [origin]
        chat_out = [chatbot, history, question, prompt_sent, details]
        send.click(respond, chat_in, chat_out, api_name="ask", concurrency_id=MODEL_LOCK_ID, concurrency_limit=slots)
        question.submit(respond, chat_in, chat_out, api_visibility="private", concurrency_id=MODEL_LOCK_ID,
                        concurrency_limit=1)
        regen.click(regenerate, [history, audio_in, model_pick, scale] + dec + [origin], chat_out, api_name="regenerate",
                    concurrency_id=MODEL_LOCK_ID, concurrency_limit=slots)
        # Stop must not wait in the model queue behind the answer it stops.
        stop_btn.click(stop_answer, None, None, api_name="stop", concurrency_limit=None)
        clear.click(clear_chat, None, [chatbot, history, prompt_sent, details], api_name="clear", queue=False)

        lab_preset_dd.change(lab_preset, lab_preset_dd, lab_prompt, api_visibility="private", queue=False)
        lab_run.click(run_lab, [audio_in, lab_prompt, lab_scales] + dec, [lab_html, lab_json, lab_status],
                      api_name="scale_lab", concurrency_id=MODEL_LOCK_ID, concurrency_limit=slots)
        ppl_run.click(run_sweep, [ppl_items, ppl_scales], [ppl_plot, ppl_table, ppl_status], api_name="perplexity",
                      concurrency_id=MODEL_LOCK_ID, concurrency_limit=slots)
        for stop_control in (lab_stop, ppl_stop):    # like the chat's Stop: never waits behind what it stops
            stop_control.click(stop_answer, None, None, api_visibility="private", concurrency_limit=None)
        refresh.click(lambda: [_info_markdown(n, p) for n, p in pipes.items()], None, info_md,
                      api_visibility="private", queue=False)

    # Gradio's own bound is only a backstop: past `queue_size` waiting, the gate answers "busy" itself.
    demo.queue(default_concurrency_limit=1, max_size=2 * slots + 8)
    GATES[demo] = gate
    return demo


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------

# The audio box refuses other file types with a raw list of MIME types (its own client-side check, not
# ours); say the same in one plain sentence that points to the button that takes videos.
REFUSED_TYPE_TEXT = ("This file type can't go in the audio box. For a video (mp4, mov, mkv, webm) use \"Upload a "
                     "video or another file\"; audio files: wav, flac, mp3, ogg, m4a, opus, aiff.")
HEAD = """<script>
(() => {
  const plain = %s;
  const fix = () => document.querySelectorAll('[data-testid="toast-text"]').forEach((el) => {
    if (el.textContent.startsWith("Invalid file type")) el.textContent = plain;
  });
  new MutationObserver(fix).observe(document.documentElement, {childList: true, subtree: true, characterData: true});
})();
</script>""" % json.dumps(REFUSED_TYPE_TEXT)


def launch_kwargs(host: str = "127.0.0.1", port: int | None = None, share: bool = False,
                  auth: tuple[str, str] | None = None, max_file_size: str = "50mb") -> dict:
    """Safe launch() settings: local bind, size cap, only our own assets served, no share link
    unless asked for."""
    return dict(
        server_name=host, server_port=port, share=share, auth=auth,
        max_file_size=max_file_size,
        allowed_paths=[str(ASSETS_DIR / "examples")],
        show_error=False,           # errors reach users as warnings we word ourselves
        footer_links=["api", "gradio"],
        head=HEAD,
    )


def launch(demo: gr.Blocks, **kwargs):
    """demo.launch with `launch_kwargs` defaults; extra keywords pass through (e.g. prevent_thread_lock)."""
    import inspect

    ours = set(inspect.signature(launch_kwargs).parameters)
    passthrough = {k: kwargs.pop(k) for k in list(kwargs) if k not in ours}
    gate = GATES.get(demo)
    if gate is not None:   # requests waiting in the gate each hold a worker thread; keep others free
        passthrough.setdefault("max_threads", 40 + gate.max_waiting)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    return demo.launch(**launch_kwargs(**kwargs), **passthrough)


__all__ = ["build_app", "launch", "launch_kwargs"]
