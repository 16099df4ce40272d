"""What the model sees: a new audio encoded and shown (log-mel spectrogram with the Q-Former windows,
each window's cross-attention, the selected window's bars), redrawn for another layer, head or window."""
from __future__ import annotations

import gradio as gr
import numpy as np

from model.audio import SAMPLE_RATE
from model.pipeline import Encoding

from . import plots
from .studio import warn


def loudest_window(enc: Encoding) -> int:
    """A sensible first window to show: the one over the loudest part of the audio."""
    tokens = enc.tokens
    energy = np.asarray(tokens.mel).mean(axis=0)
    t = float(np.argmax(energy)) / 100.0 if energy.size else 0.0
    return plots.window_at(tokens, t) or 0


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


def render_view(enc: Encoding, layer, head, window):
    """(spectrogram image, attention image, window bars, view state, window shown)."""
    tokens = enc.tokens
    window = int(min(max(int(window or 0), 0), len(tokens.window_starts) - 1))
    spec_fig, axis = plots.spectrogram_figure(tokens, selected=window)
    attn_fig, _ = plots.attention_figure(tokens, layer or "all", head or "average", selected=window)
    bar = plots.window_bar_figure(tokens, window, layer or "all", head or "average")
    view = {"axis": axis.to_dict(), "windows": len(tokens.window_starts)}
    return plots.render(spec_fig), plots.render(attn_fig), bar, view, window


class View:
    """The handlers of "What the model sees" (mixed into the studio)."""

    def load_audio(self, path, model_name, layer, head, origin="file"):
        """New audio: encode it, show what the model hears, start a fresh conversation."""
        fresh = ([], [], "", None)   # chatbot, history, prompt sent, details
        if not path:
            return (None, "", None, None, gr.Slider(value=0, maximum=87), None, {}) + fresh
        try:
            pipe = self.pipe_of(model_name)
            audio = pipe.prepare(path, origin)       # bad audio is told at once, without waiting in line
            enc = self.gate.run(pipe.encode, audio)
            spec, attn, bar, view, window = render_view(enc, layer, head, loudest_window(enc))
        except Exception as err:  # noqa: BLE001 - shown to the user
            text = warn(err)
            return (None, f"⚠️ {text}", None, None, gr.skip(), None, {}) + fresh
        for note in enc.audio.notes:       # cut, clipped, scaled: said, not silent
            gr.Warning(note)
        heard = (SAMPLE_RATE, (np.clip(enc.audio.wav, -1, 1) * 32767).astype(np.int16))
        slider = gr.Slider(value=window, maximum=max(view["windows"] - 1, 1))
        return (heard, audio_summary(enc), spec, attn, slider, bar, view) + fresh

    def seen(self, model_name, path) -> Encoding:
        """What the model heard in this file: its cached encoding at once (redraws never wait for the
        model), else encoded now."""
        pipe = self.pipe_of(model_name)
        return pipe.cached(path) or pipe.encode(path)

    def redraw(self, path, model_name, layer, head, window):
        if not path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            spec, attn, bar, view, window = render_view(self.seen(model_name, path), layer, head, window)
        except Exception as err:  # noqa: BLE001
            warn(err)
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return spec, attn, bar, view, gr.Slider(value=window, maximum=max(view["windows"] - 1, 1))

    def pick_window(self, path, model_name, layer, head, view, evt: gr.SelectData):
        """A click on the spectrogram or attention image selects the window under it."""
        if not path or not view or not isinstance(evt.index, (list, tuple)):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        t = plots.TimeAxis(**view["axis"]).time_at(float(evt.index[0]))
        window = plots.window_at(self.seen(model_name, path).tokens, t)
        if window is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return self.redraw(path, model_name, layer, head, window)
