import math
import os

import pytest
import torch
import torch.nn.functional as F

from model.beats import (
    BEATs,
    BEATsConfig,
    WeightNormConv1d,
    load_beats,
    relative_position_buckets,
    save_beats,
)
from model.errors import AudioError, CheckpointError
from model.fbank import beats_fbank
from tests.conftest import assert_near


pytestmark = pytest.mark.usefixtures("single_thread")

# Small but complete: relative bias + GRU gate + deep norm + classifier head, like the real file.
TINY = dict(
    input_patch_size=16, embed_dim=32, conv_bias=False,
    encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
    layer_norm_first=False, deep_norm=True, conv_pos=16, conv_pos_groups=4,
    relative_position_embedding=True, num_buckets=32, max_distance=64, gru_rel_pos=True,
    finetuned_model=True, predictor_class=5,
    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.05,
)
# The other branches: pre-LN, no relative bias, no projection (embed_dim == encoder_embed_dim).
TINY_PRE_LN = dict(
    TINY, embed_dim=64, layer_norm_first=True, deep_norm=False,
    relative_position_embedding=False, gru_rel_pos=False, finetuned_model=False,
)
FULL = dict(
    input_patch_size=16, embed_dim=512, encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12, deep_norm=True, conv_pos=128, conv_pos_groups=16,
    relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
    finetuned_model=True, predictor_class=527,
)


def official_key_shapes(c: dict) -> dict:
    """Key -> shape of an official BEATs state dict, written out from the reference key table."""
    e, d, f, h, L = c["embed_dim"], c["encoder_embed_dim"], c["encoder_ffn_embed_dim"], c["encoder_attention_heads"], c["encoder_layers"]
    p, k, g = c["input_patch_size"], c["conv_pos"], c["conv_pos_groups"]
    keys = {
        "patch_embedding.weight": (e, 1, p, p),
        "layer_norm.weight": (e,), "layer_norm.bias": (e,),
        "encoder.pos_conv.0.bias": (d,), "encoder.pos_conv.0.weight_g": (1, 1, k),
        "encoder.pos_conv.0.weight_v": (d, d // g, k),
        "encoder.layer_norm.weight": (d,), "encoder.layer_norm.bias": (d,),
    }
    if e != d:
        keys.update({"post_extract_proj.weight": (d, e), "post_extract_proj.bias": (d,)})
    for i in range(L):
        a = f"encoder.layers.{i}."
        for proj in "qkv":
            keys.update({a + f"self_attn.{proj}_proj.weight": (d, d), a + f"self_attn.{proj}_proj.bias": (d,)})
        keys.update({a + "self_attn.out_proj.weight": (d, d), a + "self_attn.out_proj.bias": (d,)})
        if c.get("gru_rel_pos"):
            keys.update({a + "self_attn.grep_linear.weight": (8, d // h), a + "self_attn.grep_linear.bias": (8,),
                         a + "self_attn.grep_a": (1, h, 1, 1)})
        if c.get("relative_position_embedding"):
            keys[a + "self_attn.relative_attention_bias.weight"] = (c["num_buckets"], h)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            keys.update({a + ln + ".weight": (d,), a + ln + ".bias": (d,)})
        keys.update({a + "fc1.weight": (f, d), a + "fc1.bias": (f,), a + "fc2.weight": (d, f), a + "fc2.bias": (d,)})
    if c.get("finetuned_model"):
        keys.update({"predictor.weight": (c["predictor_class"], d), "predictor.bias": (c["predictor_class"],)})
    return keys


def random_official_state(c: dict, seed: int = 0) -> dict:
    """A state dict as an official file would hold it: plain key names, one bias table copied per layer."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_key_shapes(c).items():
        if key.endswith("weight_g"):
            state[key] = 0.5 + torch.rand(shape, generator=gen)
        elif "layer_norm.weight" in key or key.endswith("grep_a"):
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1] if len(shape) == 2 else (math.prod(shape[1:]) if len(shape) > 2 else 4)
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        if key.endswith("relative_attention_bias.weight"):
            state[key] = 2.0 * torch.randn(shape, generator=gen)
    tables = [k for k in state if k.endswith("relative_attention_bias.weight")]
    for key in tables[1:]:
        state[key] = state[tables[0]].clone()
    return state


def tiny_model(cfg: dict = TINY, seed: int = 0) -> BEATs:
    model = BEATs(BEATsConfig.from_dict(cfg))
    model.load_state_dict(random_official_state(cfg, seed), strict=True)
    return model.eval()


def audio(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / 16000
    return 0.3 * torch.sin(2 * math.pi * (200 + 900 * seed) * t) + 0.05 * torch.randn(n, generator=gen)


# ---------------------------------------------------------------- independent reference maths


def reference_bucket(rel: int, num_buckets: int, max_distance: int) -> int:
    half = num_buckets // 2
    exact = half // 2
    bucket = half if rel > 0 else 0
    d = abs(rel)
    if d < exact:
        return bucket + d
    return bucket + min(half - 1, exact + int(math.log(d / exact) / math.log(max_distance / exact) * (half - exact)))


def reference_forward(state: dict, c: dict, wav: torch.Tensor) -> torch.Tensor:
    """Straight transcription of the reference maths (official formulation, [T, C] per example)."""
    cfg = BEATsConfig.from_dict(c)
    fb = beats_fbank(wav)  # [T_f, 128]
    p, d, H = cfg.input_patch_size, cfg.encoder_embed_dim, cfg.encoder_attention_heads
    dh = d // H
    patches = F.conv2d(fb[None, None], state["patch_embedding.weight"], stride=p)[0]  # [E, T', 8]
    x = patches.permute(1, 2, 0).reshape(-1, patches.shape[0])  # token = time * 8 + band
    x = F.layer_norm(x, x.shape[-1:], state["layer_norm.weight"], state["layer_norm.bias"])
    if "post_extract_proj.weight" in state:
        x = x @ state["post_extract_proj.weight"].T + state["post_extract_proj.bias"]
    T = x.shape[0]

    v, g = state["encoder.pos_conv.0.weight_v"], state["encoder.pos_conv.0.weight_g"]
    w = g * v / v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
    conv = F.conv1d(x.T[None], w, state["encoder.pos_conv.0.bias"], padding=cfg.conv_pos // 2, groups=cfg.conv_pos_groups)
    x = x + F.gelu(conv[0, :, :-1].T if cfg.conv_pos % 2 == 0 else conv[0].T)
    ln = lambda t, name: F.layer_norm(t, (d,), state[name + ".weight"], state[name + ".bias"])
    if not cfg.layer_norm_first:
        x = ln(x, "encoder.layer_norm")

    bias = None
    if cfg.relative_position_embedding:
        table = state["encoder.layers.0.self_attn.relative_attention_bias.weight"]
        idx = torch.tensor([[reference_bucket(j - i, cfg.num_buckets, cfg.max_distance) for j in range(T)] for i in range(T)])
        bias = table[idx].permute(2, 0, 1)  # [H, T, T]
    alpha = (2 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0

    def attention(h, a):
        lin = lambda t, n: t @ state[a + n + ".weight"].T + state[a + n + ".bias"]
        q_raw = lin(h, "self_attn.q_proj").view(T, H, dh).transpose(0, 1)
        k = lin(h, "self_attn.k_proj").view(T, H, dh).transpose(0, 1)
        val = lin(h, "self_attn.v_proj").view(T, H, dh).transpose(0, 1)
        scores = (q_raw * dh**-0.5 / 32) @ k.transpose(1, 2)
        scores = (scores - scores.max(-1, keepdim=True).values) * 32
        if bias is not None:
            rel = bias
            if cfg.gru_rel_pos:
                gates = torch.sigmoid((q_raw @ state[a + "self_attn.grep_linear.weight"].T
                                       + state[a + "self_attn.grep_linear.bias"]).view(H, T, 2, 4).sum(-1))
                ga, gb = gates[..., 0:1], gates[..., 1:2]
                rel = (ga * (gb * state[a + "self_attn.grep_a"][0] - 1.0) + 2.0) * bias
            scores = scores + rel
        out = (scores.softmax(-1) @ val).transpose(0, 1).reshape(T, d)
        return lin(out, "self_attn.out_proj")

    def ffn(h, a):
        h = F.gelu(h @ state[a + "fc1.weight"].T + state[a + "fc1.bias"])
        return h @ state[a + "fc2.weight"].T + state[a + "fc2.bias"]

    for i in range(cfg.encoder_layers):
        a = f"encoder.layers.{i}."
        if cfg.layer_norm_first:
            x = x + attention(ln(x, a + "self_attn_layer_norm"), a)
            x = x + ffn(ln(x, a + "final_layer_norm"), a)
        else:
            x = ln(alpha * x + attention(x, a), a + "self_attn_layer_norm")
            x = ln(alpha * x + ffn(x, a), a + "final_layer_norm")
    if cfg.layer_norm_first:
        x = ln(x, "encoder.layer_norm")
    return x


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("cfg", [TINY, TINY_PRE_LN], ids=["post_ln_deep_norm_gru", "pre_ln_plain"])
def test_matches_reference_maths(cfg):
    model = tiny_model(cfg, seed=1)
    wav = audio(12000, seed=1)  # 73 frames -> 4 time patches -> 32 tokens: exact and log buckets
    with torch.no_grad():
        ours, mask = model.extract_features(wav[None])
        ref = reference_forward(random_official_state(cfg, seed=1), cfg, wav)
    assert mask is None
    assert ours.shape == (1, 32, cfg["encoder_embed_dim"])
    assert_near(ours[0], ref, atol=2e-5)


def test_deep_norm_and_gate_matter():
    """Guards the reference comparison itself: changing alpha or the gate changes the output."""
    wav = audio(12000, seed=2)[None]
    with torch.no_grad():
        base = tiny_model(TINY).extract_features(wav)[0]
        no_deep = tiny_model(dict(TINY, deep_norm=False)).extract_features(wav)[0]
        model = tiny_model(TINY)
        model.encoder.layers[1].self_attn.grep_a.add_(0.5)
        gated = model.extract_features(wav)[0]
    assert (base - no_deep).abs().max() > 1e-2
    assert (base - gated).abs().max() > 1e-3


def test_relative_position_buckets_official_size():
    rel = torch.arange(-2000, 2001)
    got = relative_position_buckets(rel, 320, 800)
    expected = torch.tensor([reference_bucket(r, 320, 800) for r in rel.tolist()])
    assert torch.equal(got, expected)
    spot = {0: 0, -5: 5, 5: 165, 79: 239, -80: 80, 252: 279, -800: 159, 10000: 319}
    for r, b in spot.items():
        assert relative_position_buckets(torch.tensor(r), 320, 800).item() == b, r


def test_output_length():
    model = tiny_model()
    for n in [2800, 4000, 16000, 16159, 16160, 40000]:
        with torch.no_grad():
            out, _ = model.extract_features(audio(n, seed=3)[None])
        frames = 1 + (n - 400) // 160
        assert out.shape == (1, 8 * (frames // 16), 64), n


def test_padded_batch_equals_single_runs():
    model = tiny_model()
    lengths = [16000, 9000, 5123]
    n = max(lengths)
    gen = torch.Generator().manual_seed(7)
    batch = torch.randn(len(lengths), n, generator=gen)  # padding holds loud noise, not zeros
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    for i, length in enumerate(lengths):
        batch[i, :length] = audio(length, seed=i)
        mask[i, length:] = True
    with torch.no_grad():
        out, token_mask = model.extract_features(batch, padding_mask=mask)
        for i, length in enumerate(lengths):
            single, _ = model.extract_features(batch[i : i + 1, :length])
            valid = 8 * ((1 + (length - 400) // 160) // 16)
            assert single.shape[1] == valid
            assert torch.equal(token_mask[i], torch.arange(out.shape[1]) >= valid)
            assert_near(out[i, :valid], single[0], atol=1e-5)
            assert torch.all(out[i, valid:] == 0)
    with torch.no_grad():  # no padding at all: the mask changes nothing
        plain, _ = model.extract_features(batch[:1])
        masked, m = model.extract_features(batch[:1], padding_mask=torch.zeros(1, n, dtype=torch.bool))
    assert not m.any() and torch.allclose(plain, masked, atol=1e-6)


def test_bad_padding_mask_and_short_audio():
    model = tiny_model()
    wav = audio(8000, seed=0)[None]
    left_padded = torch.zeros(1, 8000, dtype=torch.bool)
    left_padded[0, :100] = True
    with pytest.raises(ValueError, match="trailing"):
        model.extract_features(wav, padding_mask=left_padded)
    with pytest.raises(AudioError, match="too short"):
        model.extract_features(audio(2799, seed=0)[None])
    mask = torch.zeros(2, 8000, dtype=torch.bool)
    mask[1, 2000:] = True
    with pytest.raises(AudioError, match="too short"):
        model.extract_features(wav.repeat(2, 1), padding_mask=mask)


def test_state_dict_uses_official_names_full_size():
    model = BEATs(BEATsConfig.from_dict(FULL))
    state = model.state_dict()
    expected = official_key_shapes(FULL)
    assert len(state) == 252 == len(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert len({p.data_ptr() for p in model.parameters()}) == 241  # one shared bias table
    assert model.embed_dim == 768
    with torch.no_grad():
        out, _ = model.eval().extract_features(audio(32000, seed=0)[None])
    assert out.shape == (1, 96, 768) and torch.isfinite(out).all()


def test_weight_norm_matches_torch_parametrization():
    """torch's weight_norm (dim=2) loads the legacy weight_g/weight_v keys and agrees with ours."""
    torch.manual_seed(0)
    ours = WeightNormConv1d(64, 16, 4)
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in ours.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    conv = torch.nn.Conv1d(64, 64, 16, padding=8, groups=4)
    conv = torch.nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
    conv.load_state_dict(state, strict=True)
    x = torch.randn(2, 64, 30)
    with torch.no_grad():
        assert_near(ours(x), conv(x), atol=1e-5)


def test_official_file_loads_strictly_and_round_trips(tmp_path):
    state = random_official_state(TINY, seed=3)
    path = str(tmp_path / "beats_official.pt")
    # Official cfg dicts carry more keys than we use; they must be ignored.
    torch.save({"cfg": dict(TINY, some_future_option=1), "model": state}, path)
    model = load_beats(path)
    assert not model.training
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key

    wav = audio(9000, seed=4)[None]
    with torch.no_grad():
        out = model.extract_features(wav)[0]
    saved = str(tmp_path / "beats_saved.pt")
    save_beats(model, saved)
    ckpt = torch.load(saved, weights_only=True)
    assert set(ckpt) == {"cfg", "model"} and set(ckpt["model"]) == set(state)
    assert ckpt["cfg"]["deep_norm"] is True and ckpt["cfg"]["max_distance"] == 64
    with torch.no_grad():
        again = load_beats(saved).extract_features(wav)[0]
    assert torch.equal(out, again)
    assert load_beats(saved, dtype=torch.float64).patch_embedding.weight.dtype == torch.float64


def test_config_from_dict():
    cfg = BEATsConfig.from_dict({"encoder_layers": 3, "deep_norm": True, "unknown": "x"})
    assert cfg.encoder_layers == 3 and cfg.deep_norm and cfg.max_distance == 1280
    assert BEATsConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda s: s.__setitem__("encoder.layers.1.fc1.weight", torch.zeros(128, 63)),
         r"encoder\.layers\.1\.fc1\.weight.*\[128, 63\].*\[128, 64\]"),
        (lambda s: s.pop("encoder.pos_conv.0.weight_g"), r"missing key 'encoder\.pos_conv\.0\.weight_g'"),
        (lambda s: s.pop("encoder.layers.1.self_attn.relative_attention_bias.weight"),
         r"missing key 'encoder\.layers\.1\.self_attn\.relative_attention_bias\.weight'"),
        (lambda s: s.pop("predictor.bias"), r"missing key 'predictor\.bias'"),
        (lambda s: s.__setitem__("encoder.extra.weight", torch.zeros(1)), r"unexpected key 'encoder\.extra\.weight'"),
    ],
    ids=["shape", "missing_weight_g", "missing_bias_copy", "missing_predictor", "unexpected"],
)
def test_mismatched_file_is_refused(tmp_path, change, expect):
    state = random_official_state(TINY)
    change(state)
    path = str(tmp_path / "bad.pt")
    torch.save({"cfg": TINY, "model": state}, path)
    with pytest.raises(CheckpointError, match=expect):
        load_beats(path)


def test_not_a_beats_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_beats(str(tmp_path / "nope.pt"))
    path = str(tmp_path / "other.pt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="not a BEATs checkpoint"):
        load_beats(path)
    torch.save({"cfg": dict(TINY, input_patch_size=15), "model": {}}, path)
    with pytest.raises(CheckpointError, match="input_patch_size"):
        load_beats(path)
    with open(path, "wb") as f:
        f.write(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_beats(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pt")
    torch.save({"cfg": TINY, "model": random_official_state(TINY), "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_beats(path)
    assert not marker.exists()
