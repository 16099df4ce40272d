"""SALMONN-tiny's three-stage recipe, end to end, in one command:

    python -m train.recipe            # data -> features -> stage 0 -> 1 -> 2 -> 3 -> assets/

0. (ours, not the paper's) a CTC-only warm-up of the Q-Former and projection on the ASR rows, without
   the LLM: the audio tokens learn to spell the spoken words cheaply before the LM loss starts;
1. pre-training on ASR + audio/music captioning;
2. instruction tuning on all tasks (short, exact answers: this is where task over-fitting comes from);
3. activation tuning on a few long, diverse answers (stories, detailed descriptions) that the LLM
   itself writes from each clip's labels, mixed with replayed stage-2 examples; by default LoRA only,
   with the loss averaged per example so the short replayed answers keep the trained tasks.
Each stage resumes from its last checkpoint if interrupted. On a CPU with native bfloat16 (AVX512-BF16
or AMX) the frozen LLM runs in bfloat16 (about 4x cheaper per step there than float32); elsewhere in
float32, since emulated bfloat16 is far slower. The trained weights stay float32.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from model.checkpoint import (checkpoint_lora, load_checkpoint, match_weights, read_state_dict, save_checkpoint,
                              set_trainable, to_official)
from model.config import LoRAConfig
from model.defaults import CHECKPOINTS, TINY_LORA, beats_for, bundled_config
from model.salmonn import SALMONN
from train.grounding import clip_labels
from train.stories import write_activation_data
from train.tasks import background_questions, sound_spelling
from train.trainer import (Trainer, TrainConfig, ctc_head_for, ctc_targets, encode_clips,
                           fit_ctc_head, load_annotations, reference_tokens)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def frozen_llm_dtype(name: str = "auto") -> torch.dtype:
    """The frozen LLM's training dtype. auto: bfloat16 where the CPU computes it natively (AVX512-BF16
    or AMX), else float32: on an AVX2-only CPU (an AMD EPYC here) bfloat16 matmuls are emulated and
    a SmolLM2 backward pass took 125 s instead of 2.4 s."""
    if name != "auto":
        return getattr(torch, name)
    native = any(getattr(torch.cpu, probe, lambda: False)()
                 for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else torch.float32


def build_model(llm_dtype: torch.dtype, beats_path: str = "", ckpt: str = "", lora: LoRAConfig | None = None) -> SALMONN:
    changes = {"lora": lora} if lora else {}
    model = SALMONN.from_config(bundled_config(ckpt, beats_path=beats_path, **changes))
    # The frozen LLM may run in bf16; what we train stays fp32 for the optimiser.
    for name, p in model.llama_model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(llm_dtype)
    return model


def init_weights(model: SALMONN, path: str, audio_init: float = 0.0, audio_from: str = "") -> str:
    """Start from earlier trainable weights. If they make fewer audio tokens per window than this
    model (SALMONN-tiny went from 1 to 2), each learned query is repeated, with a little noise so the
    copies can part; everything else must match exactly. With `audio_from`, everything but the LoRA
    (the Q-Former, projection and CTC head) comes from those weights instead, e.g. a spelling stage's."""
    raw = read_state_dict(path)
    key, note = "speech_query_tokens", path
    if audio_from:
        audio = read_state_dict(audio_from)
        missing = sorted(k for k in raw if "lora_" not in k and k not in audio)
        if missing:
            raise SystemExit(f"--init-audio {audio_from}: lacks {len(missing)} of --init's weights, e.g. {missing[:3]}")
        raw = {k: v if "lora_" in k else audio[k] for k, v in raw.items()}
        note = f"{path}, its Q-Former, projection and CTC head from {audio_from}"
    want = model.window_qformer.query_tokens.shape
    if key in raw and raw[key].shape != want and raw[key].shape[2] == want[2] and want[1] % raw[key].shape[1] == 0:
        reps = want[1] // raw[key].shape[1]
        noise = 0.02 * torch.randn(want, generator=torch.Generator().manual_seed(0))
        raw[key] = raw[key].repeat(1, reps, 1) + noise
        note = f"{path} (queries repeated {reps}x)"
    if model.window_qformer.ln_audio is not None and "ln_audio.weight" not in raw:
        raw = add_audio_stream(model, raw, audio_init)
        how = f"at {audio_init:g} x the speech columns' scale" if audio_init else "starting at zero"
        note = f"{note} (BEATs stream added, {how})"
    grown = grow_lora(model, raw, lora_of(raw, path, model.cfg.lora))
    if grown:
        note = f"{note} (LoRA widened: {grown})"
    weights, _ = match_weights(model, raw, path)
    set_trainable(model, weights)
    return note


def lora_of(raw: dict[str, torch.Tensor], path: str, like: LoRAConfig) -> LoRAConfig:
    """The LoRA of weights `raw` read from `path`: as its file records it, else rank and targets from the
    tensors at `like`'s trained scale (files written before checkpoints recorded their LoRA)."""
    recorded = checkpoint_lora(path, like)
    if recorded is not like:            # checkpoint_lora hands `like` back itself when the file records none
        return recorded
    ranks = {t.shape[0] for k, t in raw.items() if ".lora_A." in k}
    targets = tuple(t for t in LLAMA_LINEAR if any(f".{t}.lora_A." in k for k in raw))
    if len(ranks) != 1 or not targets:
        return like
    rank = ranks.pop()
    return dataclasses.replace(like, rank=rank, alpha=like.scaling * rank, target_modules=targets)


def grow_lora(model: SALMONN, raw: dict[str, torch.Tensor], old: LoRAConfig) -> str:
    """Fit a narrower LoRA (`old`: lower rank, fewer target modules) into the model's wider one, in place
    in `raw`, so the model computes what the old weights did: their A and B fill the first rows and
    columns (B rescaled from the old scale alpha/rank to the new one); the new A rows keep peft's random
    start and the new B columns are zero. Returns what changed ("" if nothing did)."""
    new = model.cfg.lora
    if (old.rank, tuple(old.target_modules)) == (new.rank, tuple(new.target_modules)):
        return ""
    if old.rank > new.rank or not set(old.target_modules) <= set(new.target_modules):
        raise SystemExit(f"--init's LoRA (rank {old.rank} on {', '.join(old.target_modules)}) does not fit in the "
                         f"LoRA to train (rank {new.rank} on {', '.join(new.target_modules)}): it may only grow")
    ratio = old.scaling / new.scaling
    for name, param in model.trainable_parameters().items():
        if "lora_" not in name:
            continue
        key = to_official(name)
        start = param.detach().float().cpu().clone()
        if ".lora_B." in name:
            start.zero_()
        if key in raw:
            if ".lora_A." in name:
                start[: old.rank] = raw[key]
            else:
                start[:, : old.rank] = raw[key] * ratio
        raw[key] = start
    return f"rank {old.rank} -> {new.rank}, {'/'.join(old.target_modules)} -> {'/'.join(new.target_modules)}"


def add_audio_stream(model: SALMONN, raw: dict[str, torch.Tensor], scale: float = 0.0) -> dict[str, torch.Tensor]:
    """Speech-only trainable weights for a model that also reads BEATs frames: the Q-Former's
    cross-attention keys and values get new columns for the new channels, and the audio LayerNorm
    its fresh values. Zero columns (`scale` 0) keep the model answering exactly as before; but
    under AdamW with weight decay they grew to only a tenth of the speech columns' size in 450
    stage-2 steps (docs/EXPERIMENTS.md, "Our BEATs"), so `scale` > 0 starts them random at that fraction of it."""
    raw = dict(raw)
    speech, audio = model.speech_encoder.dim, model.audio_encoder.dim
    gen = torch.Generator().manual_seed(0)
    for key, tensor in raw.items():
        if ".crossattention.self." in key and key.endswith(("key.weight", "value.weight")):
            if tensor.shape[1] != speech:
                raise SystemExit(f"--init: {key} reads {tensor.shape[1]}-wide frames, not Whisper's {speech}")
            new = torch.randn(tensor.shape[0], audio, generator=gen) * scale * tensor.float().pow(2).mean().sqrt()
            raw[key] = torch.cat([tensor, new.to(tensor.dtype)], dim=1)
    raw["ln_audio.weight"] = model.window_qformer.ln_audio.weight.detach().clone()
    raw["ln_audio.bias"] = model.window_qformer.ln_audio.bias.detach().clone()
    return raw


def run_stage(model, name: str, rows: list[dict], feats: dict, cfg: TrainConfig, runs: Path,
              ctc_head=None, anchors: dict | None = None, reference: SALMONN | None = None) -> Trainer:
    trainer = Trainer(model, rows, feats, cfg, runs / name, log=log, ctc_head=ctc_head, anchors=anchors,
                      reference=reference)
    log(f"stage {name}: {len(trainer.rows)} examples, {cfg.steps} steps x batch {cfg.batch_size}")
    if trainer.resume():
        log(f"  resumed at step {trainer.step}")
    if trainer.step < cfg.steps:
        trainer.train()
    return trainer


@torch.no_grad()
def spell_out(model: SALMONN, trainer: Trainer, tokens: list[torch.Tensor]) -> list[str]:
    """What each clip's audio tokens spell under the trainer's CTC head (best path, no LLM)."""
    from train.trainer import ctc_spell

    return ctc_spell(model, trainer.ctc_head, tokens, trainer.ctc_vocab)


def spelled_wer(model: SALMONN, trainer: Trainer, refs: list[str], tokens: list[torch.Tensor]) -> float:
    """Word error rate of what audio tokens spell under the CTC head (no LLM)."""
    from model.metrics import wer

    return wer(refs, spell_out(model, trainer, tokens))


def spelled_sounds(model: SALMONN, trainer: Trainer, rows: list[dict], tokens: list[torch.Tensor]) -> dict:
    """For sound clips (rows with make_data labels): how often their audio tokens spell the events exactly
    under the CTC head (``tasks.sound_spelling``, e.g. "knock knock knock"), and how often the number of
    counted events is right."""
    exact, count = [], []
    for r, text in zip(rows, spell_out(model, trainer, tokens)):
        want, got = sound_spelling(r["labels"]).split(), text.split()
        exact.append(got == want)
        if "count" in r["labels"]["sound"]:
            count.append(got.count(want[-1]) == r["labels"]["sound"]["count"])
    return {"exact": sum(exact) / max(1, len(exact)), "count": sum(count) / max(1, len(count)), "clips": len(rows)}


@torch.no_grad()
def cached_tokens(model: SALMONN, rows: list[dict], feats: dict) -> list[torch.Tensor]:
    """The current Q-Former's audio tokens for rows whose encoder features are cached."""
    model.eval()
    return [t for i in range(0, len(rows), 32) for t in model.clip_tokens([feats[r["path"]] for r in rows[i:i + 32]])]


@torch.no_grad()
def everyday_tokens(model: SALMONN) -> tuple[list[str], list[torch.Tensor]]:
    """The out-of-grammar evaluation sentences (train.evaluate.OPEN_EVAL_SENTENCES) and their audio
    tokens as the model hears them at inference: does the Q-Former spell open vocabulary, not just
    the template grammar?"""
    from train.evaluate import OPEN_EVAL_SENTENCES, open_eval_clips

    model.eval()
    clips = open_eval_clips(len(OPEN_EVAL_SENTENCES))
    return [text for text, _ in clips], [model.encode_audio(wav, output_attentions=False).embeds for _, wav in clips]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train SALMONN-tiny's connection modules in three stages.")
    ap.add_argument("--data", default="data", help="data folder (generated by train.make_data if missing)")
    ap.add_argument("--extra-data", nargs="*", default=[],
                    help="more folders made by train.make_data with other seeds: their training rows join stages "
                         "0-2 (their held-out splits are not used; held-out voices and sentences are seed-independent)")
    ap.add_argument("--runs", default="runs", help="stage checkpoints (resumable)")
    ap.add_argument("--assets", default=str(CHECKPOINTS["activation"].parent))
    ap.add_argument("--align-steps", type=int, default=1500,
                    help="stage 0: CTC-only warm-up of the Q-Former and projection on ASR rows, without the LLM "
                         "(~0.3 s per step on 2 cores); 0 skips it")
    ap.add_argument("--align-lr", type=float, default=1e-3)
    ap.add_argument("--feature-masking", type=float, default=1.0,
                    help="SpecAugment-style masking of the cached encoder frames in stages 0-2 (0 = off)")
    ap.add_argument("--stage1-steps", type=int, default=600)
    ap.add_argument("--stage2-steps", type=int, default=450)
    ap.add_argument("--stage2-asr-repeat", type=int, default=2,
                    help="stage 2 sees each ASR row this many times: word-level transcription needs the most "
                         "grounding of all tasks, and is a fifth of the rows")
    ap.add_argument("--stage2-qa-repeat", type=int, default=1,
                    help="stage 2 sees each sound/music question (QA) row this many times")
    ap.add_argument("--stage2-transcript-noise", type=float, default=0.0,
                    help="stage 2 swaps this share of each transcript's teacher-forced tokens for random transcript "
                         "tokens (the targets stay), so the LLM leans on the audio rather than the sentence so far")
    ap.add_argument("--stage2-background-qa", action=argparse.BooleanOptionalAction, default=False,
                    help="add one question about the sound or music to every training clip that has one in the "
                    "background but no question about it (tasks.background_questions)")
    ap.add_argument("--sound-spelling", action=argparse.BooleanOptionalAction, default=False,
                    help="the auxiliary CTC loss also on sound clips: their audio tokens spell the events "
                    "(tasks.sound_spelling: 'knock knock knock', 'rising rising', 'rain'), as speech tokens spell words")
    ap.add_argument("--keep-sounds", type=float, default=0.0,
                    help="weight of an anchor term in stage 2 that holds the audio tokens of sound and music clips "
                         "(no speech) near the initial weights' (0 = off, the paper's recipe)")
    ap.add_argument("--stage3-steps", type=int, default=160)
    ap.add_argument("--stage1-lr", type=float, default=1e-3, help="peak LR of stage 1 (cosine to a tenth)")
    ap.add_argument("--stage2-lr", type=float, default=5e-4, help="peak LR of stage 2 (cosine to a tenth)")
    ap.add_argument("--stage3-lr", type=float, default=2e-4)
    ap.add_argument("--stage3-batch", type=int, default=4)
    ap.add_argument("--stage2-example-mean", action=argparse.BooleanOptionalAction, default=False,
                    help="stage 2 averages the LM loss per example: under the token mean a one-word answer to an "
                         "attribute question weighs a fifth of a transcript, and the model answered them by prior")
    ap.add_argument("--stage3-example-mean", action=argparse.BooleanOptionalAction, default=True,
                    help="stage 3 averages the LM loss per example, so the short replayed answers weigh as much "
                         "as the long stories (the token mean gives the stories nearly all the weight)")
    ap.add_argument("--stage3-lora-only", action=argparse.BooleanOptionalAction, default=True,
                    help="stage 3 trains only LoRA; the Q-Former and projection stay as instruction tuning left them")
    ap.add_argument("--replay", type=float, default=3.0,
                    help="stage 3 mixes in this many stage-2 examples per activation example, so the trained "
                         "tasks are kept while instruction following comes back (0 = activation data only)")
    ap.add_argument("--replay-extra", action=argparse.BooleanOptionalAction, default=True,
                    help="replay may draw --extra-data rows too; --no-replay-extra keeps to --data's task mix "
                         "(extra speech folders would otherwise fill the replay with transcripts)")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="stage 3 holds the answers to the replayed examples near the instruction-tuned model's: "
                         "the KL divergence from its next-token distributions, at this weight (0 = off)")
    ap.add_argument("--ctc-weight", type=float, default=1.0,
                    help="weight of the auxiliary CTC loss on ASR rows' audio tokens in stages 1 and 2 (0 = the paper's LM loss only)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--stories", type=int, default=32)
    ap.add_argument("--details", type=int, default=16)
    ap.add_argument("--grounded-stories", action=argparse.BooleanOptionalAction, default=True,
                    help="stage 3 keeps only answers that name the clip's main sound (train.grounding), writing "
                         "the others again: stories that ignore the sound teach the model to ignore the audio")
    ap.add_argument("--grounded-within", type=int, default=0,
                    help="with --grounded-stories: the answer must name the sound within its first N words (0: anywhere)")
    ap.add_argument("--sound-word-weight", type=float, default=1.0,
                    help="stage 3 weighs the story tokens that name the clip's sound (train.grounding's keywords) "
                         "this many times the others in the LM loss (1 = off)")
    ap.add_argument("--activation", default="",
                    help="stage 3's self-written answers: this file (written there when missing; default "
                         "DATA/activation.json)")
    ap.add_argument("--llm-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="the frozen LLM's dtype (auto: bfloat16 where the CPU has native bfloat16, else float32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beats", default="",
                    help="a BEATs checkpoint for the audio slot (e.g. one from train.beats_fit): the Q-Former reads "
                         "Whisper and BEATs frames; with --init from speech-only weights the BEATs stream starts at zero")
    ap.add_argument("--beats-init", type=float, default=0.0,
                    help="with --beats and speech-only --init weights: the new BEATs columns of the Q-Former's "
                         "cross-attention start random at this fraction of the speech columns' scale (0: zeros)")
    ap.add_argument("--init", default="", help="start stage 1 from these trainable weights (e.g. a shipped "
                    "checkpoint, to continue training it) instead of from scratch; --stage1-steps 0 skips to stage 2")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="the LoRA's rank (default: --init's, else SALMONN-tiny's 8); alpha follows at the same trained "
                         "scale. A wider LoRA than --init's starts as it (grow_lora)")
    ap.add_argument("--lora-targets", default="",
                    help="comma-separated LLM modules the LoRA adapts, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                         "down_proj (default: --init's, else q_proj,v_proj as the official model)")
    ap.add_argument("--lora-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="how the written checkpoints store the LoRA matrices; bfloat16 halves their size "
                         "(training and the loaded model compute in their own dtype either way)")
    ap.add_argument("--init-audio", default="",
                    help="with --init: take everything but the LoRA (Q-Former, projection, CTC head) from these "
                         "weights, e.g. the best.safetensors of a spelling stage (python -m train.spell)")
    ap.add_argument("--ctc-head", default="", help="with --init: take over the CTC head kept in an earlier run's "
                    "trainer state (e.g. runs/stage2/latest_state.pt) instead of starting a fresh one")
    ap.add_argument("--ctc-head-fit", type=int, default=300,
                    help="with --init and no --ctc-head: first fit a fresh CTC head alone (this many steps) to the "
                         "initial weights' audio tokens, so its random blank does not pull on the trained Q-Former")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data, runs, assets = Path(args.data), Path(args.runs), Path(args.assets)
    check_inputs(args)
    t0 = time.perf_counter()
    if not (data / "stage2_instruct.json").is_file():
        from train.make_data import generate

        log("generating synthetic data")
        generate(data, seed=args.seed)
    args.beats = beats_for(args.init, args.beats)      # weights trained with our BEATs continue with it
    model = build_model(frozen_llm_dtype(args.llm_dtype), args.beats, lora=lora_to_train(args))
    if args.init:
        log(f"initialised from {init_weights(model, args.init, args.beats_init, args.init_audio)}")
    stage1, stage2 = training_rows(args, data)
    log("caching frozen-encoder features")
    feats = encode_clips(model, sorted({r["path"] for r in stage2}), cache_file=runs / "features-train.pt", log=log)
    # taken before any stage moves the model, so a resumed run holds the same reference
    anchors = reference_tokens(model, feats, sound_clip_paths(stage2)) if args.keep_sounds > 0 else None
    card: dict = {"init": args.init, "lora": asdict(model.cfg.lora), "beats": args.beats, "ctc_head": args.ctc_head, "keep_sounds": args.keep_sounds,
                  "sound_spelling": args.sound_spelling, "grounded_stories": args.grounded_stories,
                  "grounded_within": args.grounded_within, "stages": {}, "data": _meta(data),
                  "extra_data": {e: _meta(Path(e)) for e in args.extra_data}}
    head = initial_ctc_head(model, args, stage2, feats, card)
    if args.align_steps:
        head = stage0(model, args, data, runs, stage1, feats, head, card)
    stage1_2(model, args, runs, stage1, stage2, feats, head, card, anchors)
    assets.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, assets / CHECKPOINTS["instruction"].name, metadata={"stage": "instruction-tuned"},
                    lora_dtype=getattr(torch, args.lora_dtype))
    log(f"saved {assets / CHECKPOINTS['instruction'].name}")
    main_rows = [r for r in stage2 if Path(r["path"]).is_relative_to(data.resolve())]   # already loaded: no re-read
    stage3(model, args, data, runs, stage2 if args.replay_extra else main_rows, feats, card)
    save_checkpoint(model, assets / CHECKPOINTS["activation"].name, metadata={"stage": "activation-tuned"},
                    lora_dtype=getattr(torch, args.lora_dtype))
    log(f"saved {assets / CHECKPOINTS['activation'].name}")
    card["seconds"] = round(time.perf_counter() - t0, 1)
    (runs / "training_log.json").write_text(json.dumps(card, indent=1))
    log(f"done in {card['seconds']:.0f} s")
    return 0


# the linear layers of a LLaMA-family decoder block that a LoRA may adapt
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_to_train(args) -> LoRAConfig:
    """--init's LoRA (SALMONN-tiny's without --init), with --lora-rank / --lora-targets applied at its trained scale."""
    base = checkpoint_lora(args.init, TINY_LORA) if args.init else TINY_LORA
    rank = args.lora_rank or base.rank
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) or base.target_modules
    return dataclasses.replace(base, rank=rank, alpha=base.scaling * rank, target_modules=targets)


def check_inputs(args) -> None:
    """Fail before minutes of model loading and encoding."""
    for extra in map(Path, args.extra_data):
        if not (extra / "stage2_instruct.json").is_file():
            raise SystemExit(f"--extra-data {extra}: no stage2_instruct.json there (make it with "
                             f"python -m train.make_data --out {extra} --seed N)")
    if args.init_audio and not (args.init and Path(args.init_audio).is_file()):
        raise SystemExit(f"--init-audio {args.init_audio}: needs --init and an existing weights file")
    if args.ctc_head and not Path(args.ctc_head).is_file():
        raise SystemExit(f"--ctc-head {args.ctc_head}: no such trainer state file")
    if args.lora_rank < 0:
        raise SystemExit(f"--lora-rank {args.lora_rank}: must be 1 or more")
    if not 0 <= args.stage2_transcript_noise < 1:
        raise SystemExit(f"--stage2-transcript-noise {args.stage2_transcript_noise}: must be at least 0 and below 1")
    if not args.sound_word_weight > 0:
        raise SystemExit(f"--sound-word-weight {args.sound_word_weight}: must be above 0 (1 = off)")
    unknown = {t.strip() for t in args.lora_targets.split(",") if t.strip()} - set(LLAMA_LINEAR)
    if unknown:
        raise SystemExit(f"--lora-targets: {', '.join(sorted(unknown))} not among the LLM's layers ({', '.join(LLAMA_LINEAR)})")


def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}


def training_rows(args, data: Path) -> tuple[list[dict], list[dict]]:
    """Stage 1 and stage 2 rows of the data folders (sound clips' spelled events added with --sound-spelling)."""
    stage1, stage2 = (load_annotations(data / "stage1_pretrain.json"), load_annotations(data / "stage2_instruct.json"))
    for extra in map(Path, args.extra_data):
        stage1 += load_annotations(extra / "stage1_pretrain.json")
        stage2 += load_annotations(extra / "stage2_instruct.json")
    if args.sound_spelling:
        for r in stage1 + stage2:
            spelled = sound_spelling(r.get("labels") or {})
            if spelled:
                r["ctc_text"] = spelled
    return stage1, stage2


def initial_ctc_head(model: SALMONN, args, stage2: list[dict], feats: dict, card: dict):
    """The CTC head the stages start with: an earlier run's, the initial weights' own, a fresh one
    fitted alone to the initial weights' audio tokens, or None (the first stage makes a fresh one)."""
    if args.ctc_head:
        log(f"CTC head taken over from {args.ctc_head}")
        return ctc_head_for(model, args.ctc_head)
    if model.ctc_head is not None:
        log(f"CTC head taken over from {args.init_audio or args.init}")
        return model.ctc_head
    if not (args.init and args.ctc_head_fit and args.ctc_weight > 0):
        return None
    head = ctc_head_for(model)
    rows = [r for r in stage2 if Trainer.spells(r, TrainConfig())]
    rows = random.Random(args.seed + 5).sample(rows, min(len(rows), 1024))
    before, after = fit_ctc_head(head, cached_tokens(model, rows, feats), ctc_targets(model.tokenizer, rows, 96),   # 96: the stages' max_txt_len
                                 model.llama_model.get_input_embeddings().weight, steps=args.ctc_head_fit,
                                 seed=args.seed)
    log(f"CTC head fitted to the initial weights' audio tokens ({len(rows)} clips): loss {before:.3f} -> {after:.3f}")
    card["ctc_head_fit"] = {"clips": len(rows), "steps": args.ctc_head_fit, "loss_before": before, "loss_after": after}
    return head


def stage0(model: SALMONN, args, data: Path, runs: Path, stage1: list[dict], feats: dict, head, card: dict):
    """CTC-only warm-up of the Q-Former and projection, then what the audio tokens spell. Returns the head."""
    s0 = TrainConfig(steps=args.align_steps, batch_size=32, init_lr=args.align_lr, min_lr=0.0, warmup_start_lr=1e-5,
                     warmup_steps=50, max_txt_len=96, seed=args.seed + 4, log_every=50, save_every=250,
                     ctc_weight=1.0, lm_weight=0.0, feature_masking=args.feature_masking)
    trainer = run_stage(model, "stage0", stage1, feats, s0, runs, head)
    eval_rows = load_annotations(data / "eval.json")
    held_out = [r for r in eval_rows if r["task"] == "asr"]
    # one audiocaption row per held-out sound clip, for what their tokens spell with --sound-spelling
    sounds = [r for r in eval_rows if r["task"] == "audiocaption"] if args.sound_spelling else []
    eval_feats = encode_clips(model, sorted({r["path"] for r in held_out + sounds}), cache_file=runs / "features-eval.pt", log=log)
    seen = [r for r in trainer.rows if not r.get("ctc_text")][:180]   # transcripts, not spelled sounds
    spelled = {"train": spelled_wer(model, trainer, [r["text"] for r in seen], cached_tokens(model, seen, feats)),
               "held_out": spelled_wer(model, trainer, [r["text"] for r in held_out],
                                       cached_tokens(model, held_out, eval_feats)),
               "everyday": spelled_wer(model, trainer, *everyday_tokens(model))}
    log(f"  the audio tokens spell the transcript with WER {spelled['train']:.1%} (train) / "
        f"{spelled['held_out']:.1%} (held out) / {spelled['everyday']:.1%} (everyday sentences)")
    if sounds:
        spelled["sounds"] = spelled_sounds(model, trainer, sounds, cached_tokens(model, sounds, eval_feats))
        log(f"  held-out sound clips spelled exactly: {spelled['sounds']['exact']:.1%}, "
            f"event counts right: {spelled['sounds']['count']:.1%}")
    card["stages"]["0_align"] = {"config": asdict(s0), "history": trainer.history, "spelled_wer": spelled}
    return trainer.ctc_head


def sound_clip_paths(rows: list[dict]) -> list[str]:
    """The clips of `rows` that hold a sound or music and no speech."""
    return sorted({r["path"] for r in rows if "sound" in r.get("labels", {}) and "speech" not in r.get("labels", {})})


def stage1_2(model: SALMONN, args, runs: Path, stage1: list[dict], stage2: list[dict], feats: dict, head, card: dict,
             anchors: dict | None = None):
    """Pre-training, then instruction tuning on all tasks."""
    s1 = TrainConfig(steps=args.stage1_steps, batch_size=args.batch_size, init_lr=args.stage1_lr, min_lr=args.stage1_lr / 10,
                     warmup_start_lr=1e-5, warmup_steps=20, max_txt_len=96, seed=args.seed, log_every=10, save_every=50,
                     ctc_weight=args.ctc_weight, feature_masking=args.feature_masking)
    trainer = run_stage(model, "stage1", stage1, feats, s1, runs, head)
    card["stages"]["1_pretrain"] = {"config": asdict(s1), "history": trainer.history}

    s2 = TrainConfig(steps=args.stage2_steps, batch_size=args.batch_size, init_lr=args.stage2_lr, min_lr=args.stage2_lr / 10,
                     warmup_start_lr=1e-5, warmup_steps=20, max_txt_len=96, seed=args.seed + 1, log_every=10, save_every=50,
                     ctc_weight=args.ctc_weight, feature_masking=args.feature_masking,
                     example_mean=args.stage2_example_mean, anchor_weight=args.keep_sounds if anchors else 0.0,
                     transcript_noise=args.stage2_transcript_noise)
    if not (runs / "stage2" / "latest.safetensors").exists() and (runs / "stage1" / "latest.safetensors").exists():
        load_checkpoint(model, runs / "stage1" / "latest.safetensors")
    repeat = {"asr": args.stage2_asr_repeat, "QA": args.stage2_qa_repeat}
    extra_qa = background_questions(stage2, args.seed) if args.stage2_background_qa else []
    if extra_qa:
        log(f"  {len(extra_qa)} questions added about background sounds")
    stage2_rows = [r for r in stage2 + extra_qa for _ in range(repeat.get(r["task"], 1))]
    trainer = run_stage(model, "stage2", stage2_rows, feats, s2, runs, trainer.ctc_head, anchors)
    card["stages"]["2_instruct"] = {"config": asdict(s2), "history": trainer.history, "asr_repeat": args.stage2_asr_repeat,
                                    "qa_repeat": args.stage2_qa_repeat,
                                    "background_qa": len(extra_qa)}


def stage3(model: SALMONN, args, data: Path, runs: Path, stage2: list[dict], feats: dict, card: dict) -> None:
    """Activation tuning on the LLM's own long answers, with stage-2 examples replayed."""
    act_file = Path(args.activation) if args.activation else data / "activation.json"
    if act_file.is_file():
        act = json.loads(act_file.read_text())["annotation"]
    else:
        log("the LLM writes activation answers (stories, detailed descriptions) from clip labels")
        clips = [json.loads(line) for line in (data / "clips.jsonl").read_text().splitlines()]
        for c in clips:
            c["path"] = str((data / c["path"]).resolve())
        act = write_activation_data(model, clips, args.stories, args.details, args.seed,
                                    grounded_only=args.grounded_stories, within=args.grounded_within)
        act_file.parent.mkdir(parents=True, exist_ok=True)
        act_file.write_text(json.dumps({"annotation": act}, indent=1, ensure_ascii=False))
    s3 = TrainConfig(steps=args.stage3_steps, batch_size=args.stage3_batch, init_lr=args.stage3_lr, min_lr=args.stage3_lr,
                     warmup_start_lr=args.stage3_lr, warmup_steps=0, max_txt_len=256, seed=args.seed + 2, log_every=4,
                     save_every=args.stage3_steps, lora_only=args.stage3_lora_only,
                     example_mean=args.stage3_example_mean, distill_weight=args.distill,
                     sound_word_weight=args.sound_word_weight)
    if args.sound_word_weight != 1:
        act = with_sound_labels(act, data)
    replay = random.Random(args.seed + 3).sample(stage2, min(len(stage2), int(round(args.replay * len(act)))))
    if args.distill > 0:
        replay = [dict(r, distill=True) for r in replay]
    done = Trainer.saved_step(runs / "stage3")
    if not done and (runs / "stage2" / "latest.safetensors").exists():
        load_checkpoint(model, runs / "stage2" / "latest.safetensors")   # none: --stage2-steps 0, the model is as is
    # the instruction-tuned model as it enters stage 3 (stage 2's weights, also when stage 3 resumes);
    # a finished stage 3 needs none
    reference = copy.deepcopy(model) if args.distill > 0 and done < s3.steps else None
    card["stages"]["3_activation"] = {"config": asdict(s3), "examples": len(act), "replay": len(replay),
                                      "replay_extra": args.replay_extra,
                                      "history": run_stage(model, "stage3", act + replay, feats, s3, runs,
                                                           reference=reference).history}


def with_sound_labels(act: list[dict], data: Path) -> list[dict]:
    """Stage-3 rows with their clip's sound labels (``train.grounding``, speech left out: its keywords
    are every story's) under "sound_labels", for the weighted sound words."""
    labels = {str((data / c["path"]).resolve()): c.get("labels") or {}
              for c in map(json.loads, (data / "clips.jsonl").read_text().splitlines())}
    return [dict(r, sound_labels=[lab for lab in clip_labels(labels.get(r["path"], {})) if lab != "speech"])
            for r in act]


if __name__ == "__main__":
    raise SystemExit(main())
