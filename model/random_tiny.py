"""A tiny SALMONN with random weights: stand-ins for Whisper and a LLaMA LLM written as real local HF
directories, so the same loading code as for the official weights runs (tests, benchmark smoke runs,
`launch_app.py --tiny-test-model DIR`) without any download. It answers nonsense."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a dog cat bird rain wind music speech speaker says hello world one two three four five "
         "beep siren story describe audio recognize transcription listen sound loud quiet happy sad "
         "USER ASSISTANT Speech SpeechHere < > / : ? . , ! please give me write in detail").split()


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def make_llm_dir(path: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger random weights so different inputs give clearly different tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(path)
    return path


def make_whisper_dir(path: Path, d_model: int = 32, seed: int = 0) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = WhisperConfig(d_model=d_model, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=d_model * 2, decoder_ffn_dim=d_model * 2,
                        num_mel_bins=80, vocab_size=64, max_source_positions=1500, max_target_positions=32,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperModel(cfg).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


def tiny_config(root: Path, **changes):
    """A SALMONN config over tiny random parts (speech encoder only)."""
    from model.config import LoRAConfig, QFormerConfig, SALMONNConfig

    whisper = root / "whisper"
    llm = root / "llm"
    if not (whisper / "config.json").exists():
        make_whisper_dir(whisper)
    if not (llm / "config.json").exists():
        make_llm_dir(llm)
    cfg = SALMONNConfig(name="tiny-test", whisper_path=str(whisper), llama_path=str(llm),
                        qformer=QFormerConfig(hidden_size=32, num_heads=4, intermediate_size=64),
                        lora=LoRAConfig(rank=4, alpha=8), device="cpu", dtype="float32")
    return cfg.replace(**changes)
