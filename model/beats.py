"""BEATs audio encoder (Chen et al. 2022, "BEATs: Audio Pre-Training with Acoustic Tokenizers").

Our own implementation, written to load the official `{'cfg': dict, 'model': state_dict}` files
strictly: module and parameter names follow the official state-dict keys. Only feature
extraction is implemented; the AudioSet classifier head (`predictor.*`) is loaded but unused.

Pipeline: waveform -> Kaldi fbank [T_f, 128] -> 16x16 patches (8 frequency patches per 160 ms)
-> LayerNorm -> Linear -> convolutional position embedding -> post-LN Transformer with a
gated, bucketed relative position bias -> [B, 8 * (T_f // 16), encoder_embed_dim].
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import AudioError, CheckpointError
from .fbank import BEATS_NUM_MEL_BINS, beats_fbank


@dataclass
class BEATsConfig:
    # Field names and defaults are those of the official config dict (defaults are the code's,
    # not the released checkpoint's: always build from the file's `cfg`).
    input_patch_size: int = -1
    embed_dim: int = 512  # patch embedding width
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0  # only scales gradients; not implemented
    layer_norm_first: bool = False
    deep_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0  # training-time layer skipping; not implemented
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False  # True: the file also holds the classifier `predictor`
    predictor_dropout: float = 0.1
    predictor_class: int = 527

    @classmethod
    def from_dict(cls, cfg: dict) -> "BEATsConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def relative_position_buckets(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Map key_pos - query_pos to bucket ids (T5-style, bidirectional).

    Half the buckets for each direction (the upper half for keys after the query). Within a
    direction, distances below a quarter of num_buckets get their own bucket; longer ones share
    logarithmically wider buckets, all distances >= max_distance landing in the last one.
    """
    half = num_buckets // 2
    exact = half // 2
    distance = relative_position.abs()
    # Same float32 operation order as the reference so bucket boundaries agree exactly.
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    bucket = torch.where(distance < exact, distance, far)
    return bucket + (relative_position > 0).long() * half


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d with weight = g * v / ||v||, the norm taken per kernel tap (dim=2).

    Stored as `weight_g` / `weight_v`, the names the legacy `torch.nn.utils.weight_norm` used
    when the official checkpoints were saved. Output has T + 1 frames for an even kernel.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.padding, self.groups = kernel_size // 2, groups
        v = torch.randn(channels, channels // groups, kernel_size) * math.sqrt(4 / (kernel_size * channels))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        v = self.weight_v
        weight = v * (self.weight_g / v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class MultiheadAttention(nn.Module):
    def __init__(self, cfg: BEATsConfig, has_relative_attention_bias: bool):
        super().__init__()
        dim, self.n_head = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.head_dim = dim // self.n_head
        self.dropout = cfg.attention_dropout
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if cfg.gru_rel_pos:
            # Per-head, per-query gate on the relative position bias, computed from the query.
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.n_head, 1, 1))
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, self.n_head)

    def position_bias(self, length: int) -> Tensor:
        """[n_head, T, T] bias for query i and key j from the bucket of j - i."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_buckets(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(self, x: Tensor, position_bias: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))

        mask = None
        if position_bias is not None:
            mask = position_bias
            if hasattr(self, "grep_linear"):
                # Two sigmoids from the unscaled query: gate = a * (b * grep_a - 1) + 2, in (1, ...).
                a, b = torch.sigmoid(self.grep_linear(q).unflatten(-1, (2, 4)).sum(-1)).chunk(2, dim=-1)
                mask = (a * (b * self.grep_a - 1.0) + 2.0) * mask  # [B, H, T, T]
        if key_padding_mask is not None:
            pad = q.new_zeros(B, 1, 1, T).masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            mask = pad if mask is None else mask + pad
        if mask is not None:
            mask = mask.to(q.dtype)

        # softmax(q k^T / sqrt(head_dim) + bias) v; the reference's max-subtraction is only for stability.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BEATsConfig, has_relative_attention_bias: bool):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.self_attn = MultiheadAttention(cfg, has_relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.layer_norm_first
        self.dropout, self.activation_dropout = cfg.dropout, cfg.activation_dropout
        # DeepNet: up-weight the residual branch of post-LN layers so deep stacks train stably.
        self.alpha = math.pow(2 * cfg.encoder_layers, 1 / 4) if cfg.deep_norm else 1.0

    def ffn(self, x: Tensor) -> Tensor:
        h = F.gelu(self.fc1(x).float()).type_as(x)  # exact (erf) GELU in fp32, as trained
        h = F.dropout(h, self.activation_dropout, self.training)
        return self.fc2(h)

    def forward(self, x: Tensor, position_bias: Optional[Tensor], padding_mask: Optional[Tensor]) -> Tensor:
        def drop(h):
            return F.dropout(h, self.dropout, self.training)

        if self.layer_norm_first:
            x = x + drop(self.self_attn(self.self_attn_layer_norm(x), position_bias, padding_mask))
            return x + drop(self.ffn(self.final_layer_norm(x)))
        x = self.self_attn_layer_norm(self.alpha * x + drop(self.self_attn(x, position_bias, padding_mask)))
        return self.final_layer_norm(self.alpha * x + drop(self.ffn(x)))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        # A one-element Sequential only to keep the official key names `pos_conv.0.*`.
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups))
        use_bias = cfg.relative_position_embedding
        self.layers = nn.ModuleList(EncoderLayer(cfg, use_bias and i == 0) for i in range(cfg.encoder_layers))
        if use_bias:
            # One bias table shared by all layers; sharing the module keeps a copy of it under
            # every layer in the state dict, as in the official files.
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first, self.dropout = cfg.layer_norm_first, cfg.dropout
        self.use_bias = use_bias

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        T = x.shape[1]
        # Even kernel + padding k//2 gives T + 1 outputs: keep the first T so frame t sees t-k/2..t+k/2-1.
        pos = self.pos_conv(x.transpose(1, 2))[..., :T].transpose(1, 2)
        x = x + F.gelu(pos)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, self.dropout, self.training)

        # Relative position bias from layer 0's table, computed once; each layer gates it itself.
        position_bias = self.layers[0].self_attn.position_bias(T) if self.use_bias else None
        for layer in self.layers:
            x = layer(x, position_bias, padding_mask)

        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATs(nn.Module):
    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        if cfg.input_patch_size <= 0 or BEATS_NUM_MEL_BINS % cfg.input_patch_size:
            raise ValueError(f"input_patch_size must divide {BEATS_NUM_MEL_BINS}, got {cfg.input_patch_size}")
        if cfg.encoder_embed_dim % cfg.encoder_attention_heads:
            raise ValueError("encoder_embed_dim must be a multiple of encoder_attention_heads")
        if cfg.activation_fn != "gelu":
            raise ValueError(f"only activation_fn 'gelu' is supported, got {cfg.activation_fn!r}")
        if cfg.deep_norm and cfg.layer_norm_first:
            raise ValueError("deep_norm applies to post-LN layers: it needs layer_norm_first False")
        self.cfg = cfg
        self.embed_dim = cfg.encoder_embed_dim
        p = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if cfg.embed_dim != cfg.encoder_embed_dim else None
        )
        self.encoder = TransformerEncoder(cfg)
        self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class) if cfg.finetuned_model else None

    def extract_features(
        self, wav: Tensor, padding_mask: Optional[Tensor] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Encode 16 kHz audio in [-1, 1].

        wav: [B, N] (or [N]). padding_mask: bool [B, N], True on padding, which must be at the end.
        Returns features [B, T_b, embed_dim] with T_b = 8 * (T_f // 16), T_f = 1 + (N - 400) // 160,
        and a bool [B, T_b] token padding mask (None without padding_mask). Padded tokens are
        excluded from attention and set to zero in the output, so each element's valid tokens
        equal those of a run on that element alone.
        """
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)
        if padding_mask is None:
            fbank, frames = beats_fbank(wav), None
        else:
            fbank, frames = beats_fbank(wav, lengths=_valid_lengths(padding_mask, wav))
        if fbank.shape[1] < self.cfg.input_patch_size:
            raise AudioError(
                f"audio too short for BEATs: {wav.shape[-1]} samples give {fbank.shape[1]} fbank frames, "
                f"need at least {self.cfg.input_patch_size} (400 + {self.cfg.input_patch_size - 1} * 160 samples at 16 kHz)"
            )
        return self.encode_fbank(fbank, frames)

    def encode_fbank(self, fbank: Tensor, frames: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """The encoder on normalised fbank [B, T_f, 128] (`frames`: valid frames per element, None if
        all are): what `extract_features` does after its front end (training feeds cached fbanks here)."""
        p = self.cfg.input_patch_size
        x = self.patch_embedding(fbank.unsqueeze(1).to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, T_f//p * 128//p, C], time-major: band changes fastest
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        x = F.dropout(x, self.cfg.dropout_input, self.training)

        token_mask = None
        if frames is not None:
            # A token is valid only if its whole 16-frame time patch lies inside the audio. (The
            # official code instead splits the sample mask evenly over frames, then over tokens,
            # which ignores the time-major token order; it agrees when nothing is padded.)
            valid_tokens = (frames // p) * (BEATS_NUM_MEL_BINS // p)
            if bool((valid_tokens == 0).any()):
                raise AudioError(f"an element of the batch is too short for BEATs (under {p} fbank frames)")
            token_mask = torch.arange(x.shape[1], device=x.device) >= valid_tokens[:, None]
            x = x.masked_fill(token_mask[..., None], 0.0)

        x = self.encoder(x, token_mask)
        if token_mask is not None:
            x = x.masked_fill(token_mask[..., None], 0.0)
        return x, token_mask


def _valid_lengths(padding_mask: Tensor, wav: Tensor) -> Tensor:
    """Valid samples per element of a right-padded batch."""
    padding_mask = padding_mask.to(device=wav.device, dtype=torch.bool).reshape(-1, padding_mask.shape[-1])
    if padding_mask.shape != wav.shape:
        raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} does not match audio {tuple(wav.shape)}")
    lengths = (~padding_mask).sum(-1)
    positions = torch.arange(wav.shape[-1], device=wav.device)
    if not torch.equal(padding_mask, positions >= lengths[:, None]):
        raise ValueError("padding_mask must be True only on trailing padding (a right-padded batch)")
    return lengths


def save_beats(model: BEATs, path: str, metadata: dict | None = None) -> None:
    """Write the official layout {'cfg': dict, 'model': state_dict} (CPU tensors), or, for a
    `.safetensors` path, the same tensors with the cfg (and `metadata`) as JSON in the header."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        # the shared relative-position table is one tensor under several names: store each copy
        header = {"beats_cfg": json.dumps(model.cfg.to_dict())}
        header.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
        save_file({k: v.clone() for k, v in state.items()}, path, metadata=header)
        return
    torch.save({"cfg": model.cfg.to_dict(), "model": state}, path)


def _read_safetensors(path: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: say which
        raise CheckpointError(f"could not read BEATs safetensors file {path}: {e}") from e
    if "beats_cfg" not in header:
        raise CheckpointError(f"{path} is not a BEATs checkpoint: its safetensors header has no 'beats_cfg' "
                              "(written by model.beats.save_beats)")
    return {"cfg": json.loads(header["beats_cfg"]), "model": state}


def load_beats(path: str, device="cpu", dtype: torch.dtype = torch.float32) -> BEATs:
    """Load a BEATs checkpoint strictly: an official .pt (with a safe, weights-only unpickler) or a
    .safetensors file written by `save_beats`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"BEATs checkpoint not found: {path}")
    if str(path).endswith(".safetensors"):
        ckpt = _read_safetensors(path)
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the weights-only unpickler refuses arbitrary objects, and so do we
            raise CheckpointError(
                f"could not load BEATs checkpoint {path} as plain weights (torch.load weights_only=True): {e}"
            ) from e
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("cfg"), dict) and isinstance(ckpt.get("model"), dict)):
        found = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a BEATs checkpoint: expected a dict with a 'cfg' dict and a 'model' "
            f"state dict, found {found}"
        )
    try:
        model = BEATs(BEATsConfig.from_dict(ckpt["cfg"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"BEATs checkpoint {path} has an unusable cfg: {e}") from e

    _check_state_dict(model, ckpt["model"], path)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(device=device, dtype=dtype).eval()


def _check_state_dict(model: nn.Module, state: dict, path: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for key, shape in expected.items():
        if key not in state:
            problems.append(f"missing key '{key}' (expected shape {list(shape)})")
        elif not isinstance(state[key], Tensor):
            problems.append(f"key '{key}' is a {type(state[key]).__name__}, not a tensor")
        elif tuple(state[key].shape) != shape:
            problems.append(f"key '{key}' has shape {list(state[key].shape)}, the cfg implies {list(shape)}")
    problems += [f"unexpected key '{key}'" for key in state if key not in expected]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(
            f"BEATs checkpoint {path} does not match its cfg: " + "; ".join(problems[:5]) + more
        )
