"""Figures for the "what the model sees" panel: the log-mel spectrogram, the Q-Former window
attention laid out on the same time axis, one window's 17-frame distribution, and the scale lab's
perplexity curves.

Figures are built with matplotlib's object API (no pyplot global state, so concurrent sessions are
safe). The spectrogram and attention images share fixed axes positions, so when they are shown one
above the other at the same width their time axes line up, and a click on either maps to seconds
(`TimeAxis.time_at`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIG_WIDTH = 10.0            # inches; at DPI below -> 1000 px wide images
DPI = 100
# The images are shown scaled to their column (about half of a 800 px wide window): titles and legends
# are set large enough to stay readable there, and titles short enough to fit on one line.
TITLE_SIZE = 14
LEGEND_SIZE = 11
AX_LEFT, AX_RIGHT = 0.1, 0.905      # data axes span (figure fractions), identical in both images
CBAR_LEFT, CBAR_WIDTH = 0.92, 0.012


@dataclass
class TimeAxis:
    """Pixel <-> seconds mapping of a rendered image's data axes."""
    x0_px: float
    x1_px: float
    t0: float
    t1: float
    width_px: int

    def time_at(self, x_px: float) -> float:
        frac = (x_px - self.x0_px) / max(self.x1_px - self.x0_px, 1e-9)
        return self.t0 + frac * (self.t1 - self.t0)

    def to_dict(self) -> dict:
        return dict(x0_px=self.x0_px, x1_px=self.x1_px, t0=self.t0, t1=self.t1, width_px=self.width_px)


def render(fig: Figure) -> np.ndarray:
    """Figure -> RGB uint8 array [H, W, 3]."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _time_axis(fig: Figure, ax, t1: float) -> TimeAxis:
    width = int(round(fig.get_figwidth() * fig.dpi))
    return TimeAxis(x0_px=ax.get_position().x0 * width, x1_px=ax.get_position().x1 * width,
                    t0=0.0, t1=t1, width_px=width)


# ---------------------------------------------------------------------------------------------
# Geometry helpers (pure numpy; tested directly)
# ---------------------------------------------------------------------------------------------

def view_end(tokens) -> float:
    """Right edge of the time axis: the audio, extended to the end of the window it ends in.

    Windows that lie entirely in Whisper's zero padding (the official model keeps 88 per 30 s
    chunk even for a 3 s clip) are left off the picture; `padding_windows` counts them."""
    starts = np.asarray(tokens.window_starts, dtype=float)
    covering = starts[starts < tokens.seconds]
    if covering.size == 0:
        return float(tokens.seconds)
    return float(max(tokens.seconds, covering[-1] + tokens.window_seconds))


def padding_windows(tokens) -> int:
    return int(np.sum(np.asarray(tokens.window_starts) >= tokens.seconds))


def window_at(tokens, t: float) -> int | None:
    """Index of the window covering time `t` (seconds), or None between/after windows."""
    starts = np.asarray(tokens.window_starts, dtype=float)
    i = int(np.searchsorted(starts, t, side="right")) - 1
    if i < 0 or t >= starts[i] + tokens.window_seconds:
        return None
    return i


def _pick(n: int, choice: str | int) -> tuple[list[int], bool]:
    """("all" | "average" | 1-based index) -> (indices, average them?)."""
    if choice in ("all", None):
        return list(range(n)), False
    if choice == "average":
        return list(range(n)), True
    i = int(choice) - 1
    if not 0 <= i < n:
        raise ValueError(f"index {choice} out of range 1..{n}")
    return [i], False


def attention_rows(cross_attentions, layer: str | int = "all", head: str | int = "average"):
    """[W, layers, heads, N_query, F] -> (rows [R, W, F], labels [R]).

    Queries are averaged (the paper's SALMONN has one per window, SALMONN-tiny two). `layer`/`head` are "all" (one row each),
    "average", or a 1-based index."""
    attn = np.asarray(cross_attentions, dtype=np.float32)
    if attn.ndim != 5:
        raise ValueError(f"cross attentions must be [W, layers, heads, queries, frames]; got {attn.shape}")
    attn = attn.mean(axis=3)                      # [W, L, H, F]
    layers, avg_l = _pick(attn.shape[1], layer)
    heads, avg_h = _pick(attn.shape[2], head)
    rows, labels = [], []
    l_groups = [layers] if avg_l else [[i] for i in layers]
    h_groups = [heads] if avg_h else [[i] for i in heads]
    for lg in l_groups:
        for hg in h_groups:
            rows.append(attn[:, lg][:, :, hg].mean(axis=(1, 2)))
            l_name = "L avg" if avg_l else f"L{lg[0] + 1}"
            h_name = "H avg" if avg_h else f"H{hg[0] + 1}"
            labels.append(f"{l_name} · {h_name}")
    return np.stack(rows), labels


def attention_timeline(rows: np.ndarray, window_starts, window_seconds: float, t_end: float):
    """Lay each window's F frame weights at their times: [R, W, F] -> ([R, T], frame_seconds).

    Column j covers [j*dt, (j+1)*dt); columns no window covers (the gap between 30 s chunks) are NaN."""
    rows = np.asarray(rows, dtype=np.float32)
    n_frames = rows.shape[2]
    dt = window_seconds / n_frames
    cols = max(1, int(math.ceil(t_end / dt - 1e-6)))
    total = np.zeros((rows.shape[0], cols), dtype=np.float64)
    count = np.zeros(cols, dtype=np.int64)
    for w, start in enumerate(np.asarray(window_starts, dtype=float)):
        idx = int(round(start / dt)) + np.arange(n_frames)
        keep = idx < cols
        if not keep.any():
            continue
        total[:, idx[keep]] += rows[:, w, keep]
        np.add.at(count, idx[keep], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out.astype(np.float32), dt


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def _mark_windows(ax, tokens, t_end: float, selected: int | None, light: bool) -> None:
    starts = np.asarray(tokens.window_starts, dtype=float)
    shown = starts[starts < t_end]
    color = "white" if light else "#555555"
    # One faint line per window boundary: the Q-Former turns each strip into one audio token per query.
    # (Skipped for long audio, where hundreds of lines would only grey the picture out.)
    if len(shown) <= 150:
        ax.vlines(np.concatenate([shown, shown + tokens.window_seconds]), *ax.get_ylim(), colors=color,
                  linewidth=0.4, alpha=0.35)
    for c, start in enumerate(np.asarray(tokens.chunk_starts, dtype=float)[1:], start=2):
        if start < t_end:
            ax.axvline(start, color="#e4572e", linewidth=2.0, linestyle="--")
            ax.text(start, ax.get_ylim()[1], f" chunk {c}", color="#e4572e", va="top", ha="left", fontsize=8)
    if selected is not None and 0 <= selected < len(starts) and starts[selected] < t_end:
        ax.axvspan(starts[selected], starts[selected] + tokens.window_seconds, facecolor="none",
                   edgecolor="#00e5ff", linewidth=1.8)


def spectrogram_figure(tokens, selected: int | None = None) -> tuple[Figure, TimeAxis]:
    """The log-mel features the speech encoder receives, with the Q-Former windows drawn on top."""
    mel = np.asarray(tokens.mel, dtype=np.float32)
    t_end = view_end(tokens)
    fig = Figure(figsize=(FIG_WIDTH, 2.8), dpi=DPI)
    ax = fig.add_axes((AX_LEFT, 0.2, AX_RIGHT - AX_LEFT, 0.66))
    cax = fig.add_axes((CBAR_LEFT, 0.2, CBAR_WIDTH, 0.66))
    # mel frames are 10 ms hops: frame i covers [i/100, (i+1)/100).
    im = ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                   extent=(0, mel.shape[1] / 100.0, 0, mel.shape[0]))
    ax.set_xlim(0, t_end)
    ax.set_ylim(0, mel.shape[0])
    ax.set_ylabel("mel bin")
    ax.set_xlabel("time (s)")
    n_win = int(np.sum(np.asarray(tokens.window_starts) < t_end))
    title = f"Log-mel spectrogram ({mel.shape[0]} bins) · {n_win} windows of {tokens.window_seconds:.2f} s"
    if len(tokens.chunk_starts) > 1:
        title += f" · {len(tokens.chunk_starts)} chunks of 30 s"
    ax.set_title(title, fontsize=TITLE_SIZE, loc="left")
    _mark_windows(ax, tokens, t_end, selected, light=True)
    fig.colorbar(im, cax=cax).set_label("log power", fontsize=7)
    cax.tick_params(labelsize=7)
    return fig, _time_axis(fig, ax, t_end)


def attention_figure(tokens, layer: str | int = "all", head: str | int = "average",
                     selected: int | None = None) -> tuple[Figure, TimeAxis]:
    """Q-Former cross-attention: within each window, how much the window's query attends to each
    of its encoder frames, placed at the frames' times (one strip per layer/head choice)."""
    if tokens.cross_attentions is None:
        raise ValueError("this encoding has no attention weights")
    rows, labels = attention_rows(tokens.cross_attentions, layer, head)
    t_end = view_end(tokens)
    matrix, dt = attention_timeline(rows, tokens.window_starts, tokens.window_seconds, t_end)
    height = min(9.0, 1.3 + 0.3 * len(labels))
    fig = Figure(figsize=(FIG_WIDTH, height), dpi=DPI)
    bottom = 0.55 / height
    top = 1 - 0.4 / height
    ax = fig.add_axes((AX_LEFT, bottom, AX_RIGHT - AX_LEFT, top - bottom))
    cax = fig.add_axes((CBAR_LEFT, bottom, CBAR_WIDTH, top - bottom))
    cmap = _cmap_with_gaps("viridis")
    im = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap=cmap, interpolation="nearest",
                   extent=(0, matrix.shape[1] * dt, len(labels), 0), vmin=0.0)
    ax.set_xlim(0, t_end)
    ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize=7 if len(labels) > 6 else 8)
    ax.set_xlabel("time (s)")
    ax.set_title(f"Window attention over {rows.shape[2]} frames of {dt * 1000:.0f} ms (each window sums to 1)",
                 fontsize=TITLE_SIZE, loc="left")
    _mark_windows(ax, tokens, t_end, selected, light=True)
    fig.colorbar(im, cax=cax).set_label("weight", fontsize=7)
    cax.tick_params(labelsize=7)
    return fig, _time_axis(fig, ax, t_end)


def _cmap_with_gaps(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#d9d9d9")     # grey: frames no window covers


def window_bar_figure(tokens, window: int, layer: str | int = "all", head: str | int = "average") -> Figure:
    """One window's attention over its frames: a bar per frame at the frame's time."""
    rows, labels = attention_rows(tokens.cross_attentions, layer, head)
    n_win, n_frames = rows.shape[1], rows.shape[2]
    window = int(min(max(window, 0), n_win - 1))
    start = float(tokens.window_starts[window])
    dt = tokens.window_seconds / n_frames
    times = start + (np.arange(n_frames) + 0.5) * dt
    fig = Figure(figsize=(FIG_WIDTH / 2, 2.8), dpi=DPI)
    ax = fig.add_axes((0.13, 0.2, 0.83, 0.66))
    mean = rows[:, window].mean(axis=0)
    ax.bar(times, mean, width=dt * 0.85, color="#3b75af", label="mean of shown rows" if len(labels) > 1 else labels[0])
    if 1 < len(labels) <= 24:
        for r in range(len(labels)):
            ax.plot(times, rows[r, window], color="#888888", linewidth=0.7, alpha=0.6)
    ax.axhline(1.0 / n_frames, color="#e4572e", linestyle=":", linewidth=1, label="uniform (1/%d)" % n_frames)
    ax.set_xlim(start, start + tokens.window_seconds)
    ax.set_ylim(0, max(float(rows[:, window].max()), 1.0 / n_frames) * 1.4)   # headroom for the legend
    ax.set_xlabel("time (s)")
    ax.set_ylabel("attention")
    where = " (Whisper padding)" if start >= tokens.seconds else ""
    ax.set_title(f"Window {window}: {start:.2f}-{start + tokens.window_seconds:.2f} s{where}", fontsize=TITLE_SIZE,
                 loc="left")
    ax.legend(fontsize=LEGEND_SIZE - 2, loc="upper right", ncols=2, frameon=False)
    return fig


def perplexity_figure(curves: dict[str, dict[str, list[tuple[float, float]]]], trained_scale: float) -> Figure:
    """Perplexity of reference answers versus LoRA scale: one colour per task, one line style per
    model (solid for the first, dashed for the second, ...). The legend sits under the plot, inside
    the image, one entry per task and one per model."""
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(FIG_WIDTH * 0.8, 5.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    colors: dict[str, str] = {}
    palette = ["#3b75af", "#e4572e", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#555555"]
    for m, tasks in enumerate(curves.values()):
        for task, points in tasks.items():
            color = colors.setdefault(task, palette[len(colors) % len(palette)])
            xs, ys = zip(*sorted(points)) if points else ((), ())
            ax.plot(xs, ys, styles[m % len(styles)], marker="o", markersize=4, color=color)
    ax.axvline(trained_scale, color="#888888", linestyle=":", linewidth=1)
    ax.text(trained_scale, 1.0, " trained scale", transform=ax.get_xaxis_transform(), fontsize=LEGEND_SIZE - 1,
            color="#555555", va="top")
    ax.set_yscale("log")
    ax.set_xlabel("LoRA scale (test time)", fontsize=LEGEND_SIZE)
    ax.set_ylabel("perplexity (lower = more likely)", fontsize=LEGEND_SIZE)
    ax.set_title("Perplexity of the reference answers", fontsize=TITLE_SIZE, loc="left")
    ax.grid(True, which="both", alpha=0.25)
    handles = [Line2D([], [], color=c, marker="o", label=task) for task, c in colors.items()]
    if len(curves) > 1:
        handles += [Line2D([], [], color="#444444", linestyle=styles[m % len(styles)], label=model)
                    for m, model in enumerate(curves)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=LEGEND_SIZE, frameon=False)
    return fig
