"""The "Desktop microphone" panel: record from this computer's microphone with app/mic.py
(sounddevice), for when the browser microphone is unavailable (e.g. the native --desktop window).

The take goes into the Chat tab's audio input as (rate, samples), so Gradio writes it to its own
upload cache like any browser recording; nothing else is stored. The panel is only built when
sounddevice is importable and finds an input device, and only for a locally bound app (the
launcher turns it off with --share or a non-local --host: remote visitors must never be able to
switch on the host's microphone).
"""
from __future__ import annotations

import threading

import gradio as gr
import numpy as np

try:
    from . import mic
except ImportError:          # app/mic.py absent: no panel
    mic = None

METER_MIN_DB, METER_MAX_DB = -60.0, 0.0


def input_devices() -> list[dict]:
    """Recording devices sounddevice can see (empty when unavailable)."""
    if mic is None or not mic.available():
        return []
    try:
        return mic.list_input_devices()
    except Exception:  # noqa: BLE001 - a broken audio stack means no panel, not a crash
        return []


def device_label(d: dict) -> str:
    return f"{d['name']} (#{d['index']}, {d['samplerate']} Hz{', default' if d['default'] else ''})"


def meter_html(db: float, recording: bool, seconds: float = 0.0) -> str:
    frac = (min(max(db, METER_MIN_DB), METER_MAX_DB) - METER_MIN_DB) / (METER_MAX_DB - METER_MIN_DB)
    color = "#e4572e" if db > -6 else "#4daf4a"
    state = f"● recording {seconds:4.1f} s" if recording else "idle"
    return (f'<div style="display:flex;align-items:center;gap:8px"><div style="flex:1;height:12px;'
            f'background:#ddd;border-radius:6px;overflow:hidden"><div class="mic-level" style="width:{frac * 100:.0f}%;'
            f'height:100%;background:{color}"></div></div><span style="font-size:.85em;min-width:140px">'
            f'{state} · {db:5.1f} dBFS</span></div>')


class DesktopMic:
    """One MicRecorder per browser session (a session can only stop its own take)."""

    def __init__(self):
        self._recorders: dict[str, "mic.MicRecorder"] = {}
        self._lock = threading.Lock()

    def start(self, session: str, device: int | str | None, stop_on_silence: bool, silence_s: float,
              max_seconds: float = 60.0) -> None:
        if mic is None:
            raise RuntimeError("app/mic.py is missing")
        self.stop(session)
        rec = mic.MicRecorder(device=device, max_seconds=max_seconds,
                              silence_stop=float(silence_s) if stop_on_silence else None)
        rec.start()
        with self._lock:
            self._recorders[session] = rec

    def poll(self, session: str) -> tuple[float, bool, float, tuple[int, np.ndarray] | None]:
        """(level dBFS, still recording?, seconds, audio if the take just ended by itself)."""
        with self._lock:
            rec = self._recorders.get(session)
        if rec is None:
            return mic.FLOOR_DB if mic else -100.0, False, 0.0, None
        if rec.recording:
            return rec.level_db(), True, rec.seconds, None
        return rec.level_db(), False, rec.seconds, self._finish(session)

    def stop(self, session: str) -> tuple[int, np.ndarray] | None:
        with self._lock:
            rec = self._recorders.get(session)
        if rec is None:
            return None
        rec.stop()
        return self._finish(session)

    def _finish(self, session: str) -> tuple[int, np.ndarray] | None:
        with self._lock:
            rec = self._recorders.pop(session, None)
        if rec is None:
            return None
        rec.close()
        rate, wav = rec.audio()
        return (rate, wav) if wav.size else None


def build_mic_panel(audio_in: gr.Audio, devices: list[dict], origin: gr.State | None = None) -> None:
    """Render the panel (inside the current Blocks context); recordings go to `audio_in`, and `origin`
    (when given) is set to "microphone" as a take starts."""
    recorders = DesktopMic()
    choices = [(device_label(d), d["index"]) for d in devices]
    default = next((d["index"] for d in devices if d["default"]), devices[0]["index"])

    def session_of(request: gr.Request) -> str:
        return getattr(request, "session_hash", None) or "default"

    def start(device, on_silence, silence_s, request: gr.Request):
        try:
            recorders.start(session_of(request), device, on_silence, silence_s)
        except Exception as err:  # noqa: BLE001 - MicError explains what to do
            gr.Warning(str(err))
            return meter_html(-100.0, False), gr.Timer(active=False)
        return meter_html(-100.0, True), gr.Timer(active=True)

    def tick(request: gr.Request):
        db, recording, seconds, audio = recorders.poll(session_of(request))
        if recording:
            return meter_html(db, True, seconds), gr.skip(), gr.skip()
        return meter_html(db, False, seconds), (audio if audio is not None else gr.skip()), gr.Timer(active=False)

    def stop(request: gr.Request):
        audio = recorders.stop(session_of(request))
        if audio is None:
            gr.Warning("Nothing was recorded.")
        return meter_html(-100.0, False), (audio if audio is not None else gr.skip()), gr.Timer(active=False)

    with gr.Accordion("Desktop microphone (this computer)", open=False):
        gr.Markdown("Records from a microphone attached to the computer running the app; the take "
                    "goes into the audio box above. Use it when the browser microphone is unavailable.")
        device = gr.Dropdown(choices, value=default, label="Input device")
        with gr.Row():
            on_silence = gr.Checkbox(value=True, label="Stop on silence")
            silence_s = gr.Slider(0.5, 5.0, value=1.5, step=0.5, label="Silence (s)")
        meter = gr.HTML(meter_html(-100.0, False), elem_id="mic-meter")
        with gr.Row():
            start_btn = gr.Button("Start recording", variant="primary", size="sm")
            stop_btn = gr.Button("Stop", size="sm")
        timer = gr.Timer(0.15, active=False)
    started = start_btn.click(start, [device, on_silence, silence_s], [meter, timer], api_visibility="private",
                              concurrency_limit=None)
    if origin is not None:
        started.then(lambda: "microphone", None, origin, api_visibility="private", queue=False)
    timer.tick(tick, None, [meter, audio_in, timer], api_visibility="private", concurrency_limit=None,
               show_progress="hidden")
    stop_btn.click(stop, None, [meter, audio_in, timer], api_visibility="private", concurrency_limit=None)
