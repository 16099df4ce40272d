"""The Gradio app: Chat (audio in, streamed answers, what the model sees), Scale lab, Model.

`build_app(pipeline, extra_pipelines)` builds the Blocks from ready Pipelines (the launcher loads
them; tests pass the tiny random model): the handlers are the studio's (`studio.Studio` with
`view.View`, `chat.Chat` and `lab.Lab`), laid out and wired here. `launch(demo, ...)` applies the
safe serving defaults. Every model call goes through `model.pipeline.Pipeline`; user audio only ever
lives in Gradio's upload cache and in per-session state.
"""
from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping

import gradio as gr

from model.config import GENERATE_LIMITS
from model.pipeline import Pipeline

from . import presets
from .chat import Chat
from .lab import Lab
from .runner import ModelGate
from .studio import Studio
from .view import View

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

def span(setting: str) -> tuple[float, float]:
    """A decoding control's (minimum, maximum): the pipeline's accepted range, so they always agree."""
    limit = GENERATE_LIMITS[setting]
    return limit.low, limit.high


def _checked_by_the_pipeline(*controls) -> None:
    """Hand these controls' values to our function as sent: the pipeline's one check names the setting
    and its range, where Gradio's own would round 2.5 beams to 2 or fail on a string with a generic error."""
    for control in controls:
        control.preprocess = lambda payload: payload


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


class StudioApp(View, Chat, Lab, Studio):
    """The studio with all its handlers."""


def build_app(pipeline: Pipeline, extra_pipelines: Mapping[str, Pipeline] | None = None, *,
              primary_name: str | None = None, queue_size: int = 16,
              desktop_mic: bool | None = None) -> gr.Blocks:
    """Build the UI around ready pipelines. `extra_pipelines` (e.g. {"instruction-tuned": pipe})
    are offered as alternatives in the chat and compared side by side in the scale lab.
    `desktop_mic`: add the local-microphone panel (None = when sounddevice finds an input device;
    pass False whenever people other than the host can reach the app)."""
    s = StudioApp(pipeline, extra_pipelines, primary_name=primary_name, queue_size=queue_size)
    from .mic_panel import input_devices
    mic_devices = input_devices() if desktop_mic is not False else []
    # Gradio's temp cache (uploads, rendered audio/images) is cleaned: files older than an hour every
    # ten minutes, and everything this app wrote when it shuts down.
    with gr.Blocks(title="SALMONN Studio", delete_cache=(600, 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(_summary_line(s.name0, pipeline)
                    + (f" · also loaded: {', '.join(s.names[1:])}" if len(s.names) > 1 else ""))
        c = SimpleNamespace(history=gr.State([]), view_state=gr.State({}), origin=gr.State("upload"))
        with gr.Tab("Chat", id="chat"):
            _chat_tab(s, c, mic_devices)
            _view_panel(s, c)
        with gr.Tab("Scale lab", id="lab"):
            _lab_tab(s, c)
        with gr.Tab("Model", id="model"):
            c.info_md = [gr.Markdown(_info_markdown(n, p)) for n, p in s.pipes.items()]
            refresh = gr.Button("Refresh (memory use changes as you go)", size="sm")
            refresh.click(lambda: [_info_markdown(n, p) for n, p in s.pipes.items()], None, c.info_md,
                          api_visibility="private", queue=False)
        _wire_view(s, c)
        _wire_chat(s, c)
        _wire_lab(s, c)
    # Gradio's own bound is only a backstop: past `queue_size` waiting, the gate answers "busy" itself.
    demo.queue(default_concurrency_limit=1, max_size=2 * s.slots + 8)
    GATES[demo] = s.gate
    return demo


def _chat_tab(s: StudioApp, c: SimpleNamespace, mic_devices: list) -> None:
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            c.audio_in = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                  label="Audio: upload a file or record", elem_id="audio-in")
            c.video_in = gr.UploadButton("Upload a video or another file (mp4, mov, mkv, webm, …)", size="sm",
                                         file_types=["audio", "video"], elem_id="video-in")
            c.heard = gr.Audio(label="What the model hears (16 kHz mono, the part used)", type="numpy",
                               interactive=False, elem_id="heard")
            c.audio_info = gr.Markdown(elem_id="audio-info")
            if mic_devices:
                from .mic_panel import build_mic_panel
                build_mic_panel(c.audio_in, mic_devices, c.origin)
            c.model_pick = gr.Radio(s.names, value=s.name0, label="Model", visible=len(s.names) > 1)
            c.preset_dd = gr.Dropdown([p.label for p in presets.PRESETS], value=None, label="Task preset",
                                      info="Fills the question; L1 = trained tasks, L2/L3 = emergent abilities",
                                      elem_id="preset")
            c.preset_note = gr.Markdown(elem_id="preset-note")
            c.scale = gr.Slider(0, s.pipeline.scale_limit.high, value=s.trained, step=0.1, label="LoRA scale",
                                info=f"trained scale = {s.trained:g}; 0 = LoRA off. Applied instantly, no reload.",
                                elem_id="lora-scale")
            c.scale_hint = gr.Button("Use the preset's suggested scale and decoding", size="sm")
            with gr.Accordion("Decoding", open=False):
                _decoding_controls(s, c)
        with gr.Column(scale=3, min_width=400):
            c.chatbot = gr.Chatbot(label="SALMONN", height=460, buttons=["copy"], elem_id="chatbot",
                                   placeholder="Pick an example or upload audio, then ask a question.")
            c.question = gr.Textbox(label="Your question", placeholder="Ask about the audio…", lines=2,
                                    elem_id="question")
            with gr.Row():
                c.send = gr.Button("Send", variant="primary", elem_id="send")
                c.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                c.regen = gr.Button("Regenerate", elem_id="regenerate")
                c.clear = gr.Button("Clear chat", elem_id="clear")
            with gr.Accordion("Prompt sent & timings", open=False):
                c.prompt_sent = gr.Textbox(label="Exact text sent to the LLM (the audio tokens replace "
                                                 "<SpeechHere>)", interactive=False, lines=4, elem_id="prompt-sent")
                c.details = gr.JSON(label="Last answer: LoRA scale, tokens, timings, decoding")
            gr.Examples(
                examples=[[str(e.path), presets.PRESETS_BY_KEY[e.preset].label] for e in presets.EXAMPLES
                          if e.path.is_file()],
                inputs=[c.audio_in, c.preset_dd], examples_per_page=len(presets.EXAMPLES),
                label="Examples: bundled clips (speech, sound scene, music, speech over rain). Any task "
                      "preset works with any clip.")


def _decoding_controls(s: StudioApp, c: SimpleNamespace) -> None:
    g = s.gen0
    c.beams = gr.Slider(*span("num_beams"), value=1, step=1, label="Beams",
                        info="1 streams each token; >1 = beam search, streamed as the beams agree "
                             "(the official SALMONN decodes with 4)")
    c.sample = gr.Checkbox(value=g.do_sample, label="Sampling (off = greedy / beam)")
    c.temperature = gr.Slider(*span("temperature"), value=g.temperature, step=0.01, label="Temperature",
                              info="used when sampling")
    c.top_p = gr.Slider(*span("top_p"), value=g.top_p, step=0.01, label="Top-p", info="used when sampling")
    c.top_k = gr.Slider(*span("top_k"), value=g.top_k, step=1, label="Top-k (0 = off)", info="used when sampling")
    c.rep = gr.Slider(*span("repetition_penalty"), value=g.repetition_penalty, step=0.05, label="Repetition penalty")
    c.max_new = gr.Slider(*span("max_new_tokens"), value=g.max_new_tokens, step=1, label="Max new tokens")
    c.seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", info="makes sampling repeatable")
    c.ctc = gr.Slider(*span("ctc_weight"), value=0.0, step=0.05, label="CTC guidance (transcripts only)",
                      interactive=s.guidable,
                      info="weighs each word by how well the audio tokens spell it (the checkpoint's CTC head): "
                           "fewer misheard words in a transcript; any other answer would be forced toward the "
                           "transcript. 0 = off" + ("" if s.guidable else ". This checkpoint has no CTC head."))
    c.clean = gr.Checkbox(value=True, label="Block offensive words",
                          info="the model writes another word where it would write a swear word or slur "
                               "(small models mishear speech as words that were never said)")
    c.dec = [c.beams, c.sample, c.temperature, c.top_p, c.top_k, c.rep, c.max_new, c.seed, c.ctc, c.clean]


def _view_panel(s: StudioApp, c: SimpleNamespace) -> None:
    layer_choices, head_choices = _layer_choices(s.pipeline)
    with gr.Accordion("What the model sees", open=True):
        gr.Markdown("Click the spectrogram or the attention map to pick a window. Each Q-Former window "
                    "(thin lines) becomes one audio token per query for the LLM (the paper's model: 1 per window; "
                    "SALMONN-tiny: 2). The map averages the queries.")
        c.spec_img = gr.Image(label="Log-mel spectrogram (model input)", show_label=False, type="numpy", format="png",
                              interactive=False, elem_id="spectrogram", buttons=["download", "fullscreen"])
        c.attn_img = gr.Image(label="Q-Former window attention", show_label=False, type="numpy", format="png",
                              interactive=False, elem_id="attention", buttons=["download", "fullscreen"])
        with gr.Row():
            c.layer = gr.Dropdown(layer_choices, value="all", label="Q-Former layer", scale=1)
            c.head = gr.Dropdown(head_choices, value="average", label="Attention head", scale=1)
            c.window = gr.Slider(0, 87, value=0, step=1, label="Window", scale=2, elem_id="window")
        c.bar = gr.Plot(label="Selected window: attention over its frames", elem_id="window-bar")


def _lab_tab(s: StudioApp, c: SimpleNamespace) -> None:
    gr.Markdown(LAB_TEXT)
    with gr.Row():
        c.lab_preset_dd = gr.Dropdown([p.label for p in presets.PRESETS], label="Task preset",
                                      value=presets.PRESETS_BY_KEY["story"].label, scale=1)
        c.lab_prompt = gr.Textbox(label="Question (uses the audio from the Chat tab)",
                                  value=presets.PRESETS_BY_KEY["story"].prompt, lines=2, scale=3, elem_id="lab-prompt")
    with gr.Row():
        c.lab_scales = gr.Textbox(label="LoRA scales (comma list)", value=presets.default_scales(s.trained),
                                  elem_id="lab-scales", scale=3)
        c.lab_run = gr.Button("Answer at every scale", variant="primary", elem_id="lab-run", scale=1)
        c.lab_stop = gr.Button("Stop", variant="stop", elem_id="lab-stop", scale=0, min_width=80)
    c.lab_audio = gr.Markdown("*No audio yet: load one on the Chat tab.*", elem_id="lab-audio")
    c.lab_status = gr.Markdown(elem_id="lab-status")
    c.lab_html = gr.HTML(elem_id="lab-answers")
    with gr.Accordion("Raw results", open=False):
        c.lab_json = gr.JSON()
    gr.Markdown("### Perplexity of reference answers versus LoRA scale\nFor each bundled clip and task we "
                "wrote a reference answer; the model scores it token by token (teacher forcing) at each "
                "scale, all scales in one batch.")
    with gr.Row():
        c.ppl_items = gr.CheckboxGroup([i.label for i in presets.LAB_ITEMS], value=presets.DEFAULT_LAB_ITEMS,
                                       label="Clips and tasks", scale=3)
        with gr.Column(scale=1):
            c.ppl_scales = gr.Textbox(label="LoRA scales", value=presets.sweep_scales(s.trained))
            with gr.Row():
                c.ppl_run = gr.Button("Measure perplexity", elem_id="ppl-run")
                c.ppl_stop = gr.Button("Stop", variant="stop", elem_id="ppl-stop", min_width=80)
    c.ppl_status = gr.Markdown(elem_id="ppl-status")
    c.ppl_plot = gr.Plot(label="Perplexity vs LoRA scale", elem_id="ppl-plot")
    with gr.Accordion("Values", open=False):
        c.ppl_table = gr.Dataframe(headers=["model", "clip · task", "LoRA scale", "perplexity", "NLL"],
                                   label="Values", interactive=False)
    from .sweep_panel import build_sweep_panel
    build_sweep_panel(s.pipes, gate=s.gate, stops=s.stops, concurrency_id=MODEL_LOCK_ID, concurrency_limit=s.slots)


def _wire_view(s: StudioApp, c: SimpleNamespace) -> None:
    _checked_by_the_pipeline(c.scale, *c.dec)
    # where the audio came from words the messages about it (a silent recording vs a silent file)
    c.audio_in.start_recording(lambda: "microphone", None, c.origin, api_visibility="private", queue=False)
    c.audio_in.upload(lambda: "upload", None, c.origin, api_visibility="private", queue=False)
    c.video_in.upload(lambda f: (f, "upload"), c.video_in, [c.audio_in, c.origin], api_visibility="private",
                      queue=False)
    view_in = [c.audio_in, c.model_pick, c.layer, c.head, c.window]
    view_out = [c.spec_img, c.attn_img, c.bar, c.view_state, c.window]
    c.audio_in.change(s.load_audio, [c.audio_in, c.model_pick, c.layer, c.head, c.origin],
                      [c.heard, c.audio_info, c.spec_img, c.attn_img, c.window, c.bar, c.view_state,
                       c.chatbot, c.history, c.prompt_sent, c.details],
                      api_name="load_audio", concurrency_id=MODEL_LOCK_ID, concurrency_limit=s.slots
                      ).then(lambda info: f"Audio for the lab: {info}" if info else "*No audio yet: load one on "
                             "the Chat tab.*", c.audio_info, c.lab_audio, api_visibility="private", queue=False)
    c.model_pick.change(s.redraw, view_in, view_out, api_visibility="private", concurrency_id=MODEL_LOCK_ID,
                        concurrency_limit=s.slots)
    for ctl in (c.layer, c.head):
        ctl.change(s.redraw, view_in, view_out, api_visibility="private", concurrency_id=VIEW_LOCK_ID,
                   concurrency_limit=2, trigger_mode="always_last")
    c.window.release(s.redraw, view_in, view_out, api_name="view", concurrency_id=VIEW_LOCK_ID, concurrency_limit=2,
                     trigger_mode="always_last")
    for img in (c.spec_img, c.attn_img):
        img.select(s.pick_window, [c.audio_in, c.model_pick, c.layer, c.head, c.view_state], view_out,
                   api_visibility="private", concurrency_id=VIEW_LOCK_ID, concurrency_limit=2,
                   trigger_mode="always_last")


def _wire_chat(s: StudioApp, c: SimpleNamespace) -> None:
    c.preset_dd.change(s.apply_preset, c.preset_dd, [c.question, c.preset_note], api_name="preset", queue=False)
    # picking the preset already shown (after a new upload, say) fires no change: fill the question again
    c.preset_dd.select(s.apply_preset, c.preset_dd, [c.question, c.preset_note], api_visibility="private",
                       queue=False)
    c.scale_hint.click(s.suggested_settings, c.preset_dd, [c.scale, c.beams, c.ctc], api_name="suggested",
                       queue=False)
    chat_in = [c.question, c.history, c.audio_in, c.model_pick, c.scale] + c.dec + [c.origin]
    chat_out = [c.chatbot, c.history, c.question, c.prompt_sent, c.details]
    c.send.click(s.respond, chat_in, chat_out, api_name="ask", concurrency_id=MODEL_LOCK_ID,
                 concurrency_limit=s.slots)
    c.question.submit(s.respond, chat_in, chat_out, api_visibility="private", concurrency_id=MODEL_LOCK_ID,
                      concurrency_limit=1)
    c.regen.click(s.regenerate, [c.history, c.audio_in, c.model_pick, c.scale] + c.dec + [c.origin], chat_out,
                  api_name="regenerate", concurrency_id=MODEL_LOCK_ID, concurrency_limit=s.slots)
    # Stop must not wait in the model queue behind the answer it stops.
    c.stop_btn.click(s.stop_answer, None, None, api_name="stop", concurrency_limit=None)
    c.clear.click(s.clear_chat, None, [c.chatbot, c.history, c.prompt_sent, c.details], api_name="clear", queue=False)


def _wire_lab(s: StudioApp, c: SimpleNamespace) -> None:
    c.lab_preset_dd.change(s.lab_preset, c.lab_preset_dd, c.lab_prompt, api_visibility="private", queue=False)
    c.lab_run.click(s.run_lab, [c.audio_in, c.lab_prompt, c.lab_scales] + c.dec, [c.lab_html, c.lab_json, c.lab_status],
                    api_name="scale_lab", concurrency_id=MODEL_LOCK_ID, concurrency_limit=s.slots)
    c.ppl_run.click(s.run_sweep, [c.ppl_items, c.ppl_scales], [c.ppl_plot, c.ppl_table, c.ppl_status],
                    api_name="perplexity", concurrency_id=MODEL_LOCK_ID, concurrency_limit=s.slots)
    for stop_control in (c.lab_stop, c.ppl_stop):    # like the chat's Stop: never waits behind what it stops
        stop_control.click(s.stop_answer, None, None, api_visibility="private", concurrency_limit=None)


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
