"""Command-line inference, like the official cli_inference.py but streaming and with a LoRA scale.

    python -m model.cli --config decode_config.yaml --audio clip.wav --prompt "Describe the audio."
    python -m model.cli --audio clip.wav --prompt "..." --lora-scale 2.0       # embedded default model
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .config import GenerateConfig, SALMONNConfig, load_config
from .errors import SalmonnError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Model-selection flags shared by the CLI and the app launcher."""
    parser.add_argument("--config", help="official decode_config.yaml (model paths, LoRA, generate.*)")
    parser.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. model.ckpt=/path/salmonn_v1.pth generate.num_beams=1")
    parser.add_argument("--llama-path", help="local HF LLM directory (e.g. vicuna-13b-v1.1)")
    parser.add_argument("--whisper-path", help="local HF Whisper directory (e.g. whisper-large-v2)")
    parser.add_argument("--beats-path", help="BEATs checkpoint (.pt)")
    parser.add_argument("--ckpt", help="SALMONN checkpoint (.pth or .safetensors)")
    parser.add_argument("--variant", default="activation", choices=["activation", "instruction"],
                        help="which shipped SALMONN-tiny checkpoint the embedded default uses")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=None, help="auto | float32 | float16 | bfloat16")
    parser.add_argument("--8bit", dest="load_in_8bit", action="store_true", help="8-bit LLM weights: bitsandbytes on a GPU, torch int8 kernels on "
                        "the CPU (about 2x faster decoding there; answers can differ from fp32)")
    parser.add_argument("--device-map", default=None, help='e.g. "auto" to split the LLM over several GPUs')


def config_from_args(args: argparse.Namespace) -> SALMONNConfig:
    if args.config:
        cfg = load_config(args.config, args.options)
    elif args.llama_path or args.whisper_path:
        # official weights given by flags: the official architecture (SALMONNConfig defaults)
        from .config import config_from_dict

        cfg = config_from_dict({}, args.options)
    else:
        from .defaults import default_config

        cfg = default_config(args.variant)
        if args.options:
            from .config import config_from_dict

            cfg = config_from_dict({}, args.options, base=cfg)
    changes = {k: v for k, v in {
        "llama_path": args.llama_path, "whisper_path": args.whisper_path, "beats_path": args.beats_path,
        "ckpt": args.ckpt, "device": args.device, "dtype": args.dtype, "device_map": args.device_map,
    }.items() if v is not None}
    if args.load_in_8bit:
        changes["load_in_8bit"] = True
    return cfg.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask SALMONN about an audio file.")
    add_model_args(parser)
    parser.add_argument("--audio", required=True, help="audio file (any format soundfile/ffmpeg reads)")
    parser.add_argument("--prompt", required=True, help="instruction, e.g. 'Recognize the speech and give me the transcription.'")
    parser.add_argument("--lora-scale", type=float, default=None, help="LoRA scaling (default: alpha/rank)")
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ctc-weight", type=float, default=None,
                        help="CTC-guided transcription, 0-1 (checkpoints with a CTC head, e.g. SALMONN-tiny's: 0.5)")
    parser.add_argument("--show-prompt", action="store_true", help="print the exact text sent to the LLM")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = config_from_args(args)
        from .pipeline import Pipeline

        pipe = Pipeline.from_config(cfg, progress=lambda msg: print(f"[load] {msg}", file=sys.stderr))
        gen: GenerateConfig = pipe.default_generate
        given = {name: getattr(args, name) for name in ("num_beams", "max_new_tokens", "temperature", "top_p",
                                                        "top_k", "repetition_penalty", "seed", "ctc_weight")}
        gen = dataclasses.replace(gen, **{k: v for k, v in given.items() if v is not None},
                                  do_sample=gen.do_sample or args.do_sample)
        gen = pipe.check_generate(gen)
        audio = pipe.prepare(args.audio)
        print(f"[audio] {audio.describe()}", file=sys.stderr)
        final = None
        for event in pipe.stream(audio, args.prompt, lora_scale=args.lora_scale, generate=gen):
            print(event.delta, end="", flush=True)
            final = event.answer
        print()
        if args.show_prompt and final is not None:
            print(f"[prompt] {final.prompt!r}  [lora scale] {final.lora_scale:g}  [timings] {final.timings}", file=sys.stderr)
    except SalmonnError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
