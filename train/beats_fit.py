"""Train a small BEATs audio encoder on the synthetic clips' labels, for SALMONN-tiny's audio slot.

No BEATs weights exist offline, and Whisper tiny.en's frames do not hold key or major/minor at all
(linear probes, docs/EXPERIMENTS.md). This fits our BEATs implementation (model/beats.py, the official
architecture at a small size) from scratch, **supervised** on the labels `make_data` writes (sound
kind, event count, key, mode, tempo, timbre, drums, speaker gender, ...) rather than by BEATs'
self-supervised pre-training with an acoustic tokenizer: say so wherever it is used.

Every token is trained to predict its clip's labels (the loss is averaged over tokens, not over a
pooled vector), so each ~0.33 s Q-Former window sees them, whatever part of the clip it covers.
The label heads are thrown away; the file holds the encoder only, in safetensors with its cfg.

    python -m train.beats_fit --data data data2 --out assets/beats-tiny.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn

from model.audio import prepare_audio
from model.beats import BEATs, BEATsConfig, save_beats
from model.fbank import BEATS_FBANK_STD, beats_fbank

# Classification heads: label name -> classes (a clip without the label is ignored by that head).
SOUND_KINDS = ["none", "music", "sweep", "knock", "clap", "dog_bark", "beeps", "bird", "engine", "wind", "rain",
               "alarm", "waves", "crowd"]
HEADS: dict[str, list] = {
    "kind": SOUND_KINDS,                     # the sound (or the background under speech); "none": speech alone
    "count": [1, 2, 3, 4, 5, 6],
    "key": ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"],
    "mode": ["major", "minor"],
    "tempo": ["slow", "medium", "fast"],
    "timbre": ["sine", "square", "organ", "pluck", "bell"],
    "drums": [False, True],
    "texture": ["melody", "chords", "melody and chords"],
    "pitch": ["low", "medium", "high"],
    "direction": ["rising", "falling"],
    "pattern": ["pulsing", "two-tone", "continuous"],
    "speech": [False, True],
    "gender": ["male", "female"],
    "rate": ["slow", "normal", "fast"],
}
SOUND_FIELDS = {"count": "count", "key": "key", "mode": "mode", "tempo": "tempo", "timbre": "timbre",
                "drums": "has_drums", "texture": "texture", "pitch": "pitch", "direction": "direction",
                "pattern": "pattern"}


def small_config() -> BEATsConfig:
    """The official BEATs architecture (16x16 patches, post-LN DeepNet layers, gated relative position
    bias) at ~1.7 M parameters, sized for 2 CPU cores."""
    return BEATsConfig(input_patch_size=16, embed_dim=192, encoder_layers=3, encoder_embed_dim=192,
                       encoder_ffn_embed_dim=768, encoder_attention_heads=4, conv_pos=32, conv_pos_groups=8,
                       relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
                       deep_norm=True, layer_norm_first=False, dropout=0.1, attention_dropout=0.0)


def clip_targets(labels: dict) -> dict[str, float]:
    """Class index per head (-100 where the clip has no such label) and log-BPM (nan without music)."""
    sound, speech = labels.get("sound") or {}, labels.get("speech")
    out = {name: -100 for name in HEADS}
    out["kind"] = SOUND_KINDS.index(sound["kind"]) if sound else 0
    for head, field in SOUND_FIELDS.items():
        if field in sound and sound[field] in HEADS[head]:
            out[head] = HEADS[head].index(sound[field])
    out["speech"] = int(speech is not None)
    if speech:
        out["gender"] = HEADS["gender"].index(speech["gender"])
        out["rate"] = HEADS["rate"].index(speech["rate_label"])
    out["log_bpm"] = math.log(sound["bpm"]) if "bpm" in sound else float("nan")
    return out


class LabelHeads(nn.Module):
    """Per-token linear heads over the encoder's features (training only)."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(dim, len(classes)) for name, classes in HEADS.items()})
        self.bpm = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {name: head(x) for name, head in self.heads.items()}
        out["log_bpm"] = self.bpm(x)[..., 0] + math.log(110.0)
        return out


def load_clips(folders: list[str], split: str, max_seconds: float) -> list[dict]:
    """Each clip's normalised fbank (float16) and targets."""
    clips = []
    for folder in map(Path, folders):
        for line in (folder / "clips.jsonl").read_text().splitlines():
            c = json.loads(line)
            if c["split"] != split:
                continue
            wav = prepare_audio(str(folder / c["path"]), max_seconds=max_seconds).wav
            fbank = beats_fbank(torch.from_numpy(wav)[None].float())[0].half()
            clips.append({"id": f"{folder.name}/{c['id']}", "fbank": fbank, "targets": clip_targets(c["labels"])})
    return clips


def batch_of(clips: list[dict], patch: int, gain_db: float = 0.0, rng: random.Random | None = None):
    frames = torch.tensor([c["fbank"].shape[0] // patch * patch for c in clips])
    fb = torch.zeros(len(clips), int(frames.max()), clips[0]["fbank"].shape[1])
    for i, c in enumerate(clips):
        f = c["fbank"][: frames[i]].float()
        if rng is not None and gain_db:
            # a gain of g dB adds g ln(10) / 10 to every log-mel bin, then beats_fbank's normalisation
            f = f + rng.uniform(-gain_db, gain_db) * math.log(10) / 10 / (2 * BEATS_FBANK_STD)
        fb[i, : frames[i]] = f
    targets = {k: torch.tensor([c["targets"][k] for c in clips]) for k in list(HEADS) + ["log_bpm"]}
    return fb, frames, targets


def length_batches(clips: list[dict], size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches, clips of similar length together (padding costs attention time)."""
    idx = rng.sample(range(len(clips)), len(clips))
    batches = []
    for s in range(0, len(idx), size * 50):
        pool = sorted(idx[s:s + size * 50], key=lambda i: clips[i]["fbank"].shape[0])
        batches += [pool[j:j + size] for j in range(0, len(pool), size)]
    rng.shuffle(batches)
    return batches


def losses(out: dict[str, torch.Tensor], mask: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over heads of the per-token loss, each token predicting its clip's labels."""
    valid = (~mask).float()
    total = []
    for name in HEADS:
        t = targets[name]
        keep = t >= 0
        if not keep.any():
            continue
        logits = out[name][keep]                                          # [b, T, C]
        ce = nn.functional.cross_entropy(logits.transpose(1, 2), t[keep][:, None].expand(-1, logits.shape[1]),
                                         reduction="none")
        total.append((ce * valid[keep]).sum() / valid[keep].sum())
    t = targets["log_bpm"]
    keep = ~torch.isnan(t)
    if keep.any():
        err = (out["log_bpm"][keep] - t[keep][:, None]).abs() * 10       # 10 % off costs about one nat
        total.append((err * valid[keep]).sum() / valid[keep].sum())
    return torch.stack(total).mean()


@torch.no_grad()
def evaluate(beats: BEATs, heads: LabelHeads, clips: list[dict], batch: int = 32) -> dict[str, float]:
    """Clip-level accuracy per head (token logits averaged), and BPM within 4 %."""
    beats.eval(), heads.eval()
    right: dict[str, list] = {name: [] for name in list(HEADS) + ["bpm"]}
    for s in range(0, len(clips), batch):
        fb, frames, targets = batch_of(clips[s:s + batch], beats.cfg.input_patch_size)
        x, mask = beats.encode_fbank(fb, frames)
        out = heads(x)
        valid = (~mask).float()[..., None]
        for name in HEADS:
            pooled = (out[name] * valid).sum(1) / valid.sum(1)
            keep = targets[name] >= 0
            right[name] += (pooled.argmax(-1)[keep] == targets[name][keep]).tolist()
        bpm = ((out["log_bpm"][..., None] * valid).sum(1) / valid.sum(1))[:, 0]
        keep = ~torch.isnan(targets["log_bpm"])
        right["bpm"] += ((bpm[keep] - targets["log_bpm"][keep]).abs() < math.log(1.04)).tolist()
    return {k: round(sum(v) / len(v), 4) for k, v in right.items() if v}


def fit(train: list[dict], cfg: BEATsConfig, steps: int, batch_size: int, lr: float, seed: int = 0,
        log=print) -> tuple[BEATs, LabelHeads, list[dict]]:
    """A BEATs encoder (and its throw-away label heads) trained from scratch on `train` clips:
    AdamW, linear warm-up over the first 5 % of steps, cosine decay to zero."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    beats, heads = BEATs(cfg), LabelHeads(cfg.encoder_embed_dim)
    params = list(beats.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    order: list[list[int]] = []
    history = []
    for step in range(steps):
        beats.train(), heads.train()
        if not order:
            order = length_batches(train, batch_size, rng)
        fb, frames, targets = batch_of([train[i] for i in order.pop()], cfg.input_patch_size, gain_db=6.0, rng=rng)
        x, mask = beats.encode_fbank(fb, frames)
        loss = losses(heads(x), mask, targets)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4)})
            log(f"step {step} loss {loss.item():.4f}")
    return beats.eval(), heads.eval(), history


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=["data", "data2"], help="make_data folders: their training clips")
    ap.add_argument("--dev", default="data2", help="folder whose held-out clips measure the fit")
    ap.add_argument("--out", default="assets/beats-tiny.safetensors")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-seconds", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    train = load_clips(args.data, "train", args.max_seconds)
    dev = load_clips([args.dev], "eval", args.max_seconds)
    print(f"{len(train)} training clips, {len(dev)} development clips, fbanks in {time.perf_counter() - t0:.0f} s", flush=True)
    beats, heads, history = fit(train, small_config(), args.steps, args.batch_size, args.lr, args.seed,
                                log=lambda msg: print(f"{msg} ({time.perf_counter() - t0:.0f} s)", flush=True))
    scores = evaluate(beats, heads, dev)
    print("development accuracy:", json.dumps(scores), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_beats(beats.eval(), args.out, metadata={
        "training": {"method": "supervised on make_data labels (not BEATs' self-supervised pre-training)",
                     "data": args.data, "clips": len(train), "steps": args.steps, "batch_size": args.batch_size,
                     "lr": args.lr, "seconds": round(time.perf_counter() - t0), "history": history},
        "development": {"folder": args.dev, "clips": len(dev), "accuracy": scores}})
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
