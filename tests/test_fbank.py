import math
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import assert_near
from scipy.signal import chirp, resample_poly

from model.fbank import BEATS_FBANK_MEAN, BEATS_FBANK_STD, beats_fbank, kaldi_fbank, mel_banks, num_frames

knf = pytest.importorskip("kaldi_native_fbank")

LOG_EPS = math.log(np.finfo(np.float32).eps)
# Kaldi's log floor is e^LOG_EPS; bins further than this below their frame's strongest bin
# (about 78 dB) are float32 round-off in kaldi-native-fbank itself (the quietest bins sit ~100 dB
# down after pre-emphasis), so only the bins above it are held to the tight tolerance.
DYNAMIC_RANGE = 18.0


pytestmark = pytest.mark.usefixtures("single_thread")


def knf_fbank(wav: np.ndarray, num_bins: int, low: float = 20.0, high: float = 0.0) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.frame_length_ms = 25
    opts.frame_opts.frame_shift_ms = 10
    opts.frame_opts.dither = 0.0
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.round_to_power_of_two = True
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq = low
    opts.mel_opts.high_freq = high
    opts.mel_opts.is_librosa = False
    opts.mel_opts.htk_mode = False
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, (wav.astype(np.float32) * 32768).tolist())
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def knf_fbank_128(wav: np.ndarray) -> np.ndarray:
    """128-bin BEATs fbank from kaldi-native-fbank.

    Kaldi refuses 128 bins at 16 kHz / 512-point FFT because triangle 3 (about 36-64 Hz) holds no
    FFT bin; torchaudio, which BEATs used, accepts it and that bin is log(eps) in every frame. So
    ask knf for bins 0-2 and 4-127 separately, with band edges chosen to give the same triangles.
    """
    mel = lambda f: 1127.0 * math.log1p(f / 700.0)
    mel_low, mel_high = mel(20.0), mel(8000.0)
    split = 700.0 * math.expm1((mel_low + 4 * (mel_high - mel_low) / 129) / 1127.0)  # left edge of bin 4
    low = knf_fbank(wav, 3, 20.0, split)
    high = knf_fbank(wav, 124, split, 8000.0)
    return np.concatenate([low, np.full((len(low), 1), LOG_EPS, np.float32), high], axis=1)


def espeak_speech(tmp_path) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Seven quick foxes jumped over the sleepy dog at noon."],
                   check=True, capture_output=True)
    wav, sr = sf.read(str(path), dtype="float32")
    if wav.ndim > 1:
        wav = wav.mean(axis=1)
    if sr != 16000:
        g = math.gcd(sr, 16000)
        wav = resample_poly(wav, 16000 // g, sr // g).astype(np.float32)
    return wav


def test_mel_bank_has_one_empty_bin():
    banks = mel_banks(128, 512, 16000.0, 20.0, 0.0)
    assert banks.shape == (128, 257)
    assert (banks.sum(1) == 0).nonzero().flatten().tolist() == [3]
    assert torch.all(banks[:, -1] == 0)  # Nyquist bin unused, as in Kaldi


def _compare(wav: np.ndarray):
    ref = knf_fbank_128(wav)
    ours = kaldi_fbank(torch.from_numpy(wav) * 32768).numpy()
    assert ours.shape == ref.shape == (num_frames(len(wav)), 128)
    assert np.all(ours[:, 3] == np.float32(LOG_EPS))
    err = np.abs(ours - ref)
    loud = ref >= ref.max(axis=1, keepdims=True) - DYNAMIC_RANGE
    assert loud.mean() > 0.15
    assert err[loud].max() <= 1e-3, err[loud].max()
    return err


def test_matches_kaldi_native_fbank_speech(tmp_path):
    wav = espeak_speech(tmp_path)
    assert len(wav) > 16000
    err = _compare(wav)
    assert err.max() <= 5e-3  # even the quietest bins stay close


def test_matches_kaldi_native_fbank_sweep():
    # From 200 Hz: below that, pre-emphasis leaves the tone itself 30+ dB under the frame's
    # time-domain level, and the whole spectrum nears knf's float32 round-off (errors ~1.4e-3 at 50 Hz).
    t = np.arange(24000) / 16000
    _compare((0.5 * chirp(t, 200, t[-1], 7800, method="logarithmic")).astype(np.float32))


def test_matches_kaldi_native_fbank_noise():
    wav = np.random.default_rng(0).normal(0, 0.1, 16000).clip(-1, 1).astype(np.float32)
    err = _compare(wav)
    assert err.max() <= 1e-3  # flat spectrum: every bin is well above round-off


def test_general_options_match_kaldi_native_fbank():
    wav = np.random.default_rng(1).normal(0, 0.05, 8000).astype(np.float32)
    ours = kaldi_fbank(torch.from_numpy(wav) * 32768, num_mel_bins=80, low_freq=60.0, high_freq=-400.0)
    np.testing.assert_allclose(ours.numpy(), knf_fbank(wav, 80, 60.0, -400.0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("n", [0, 399, 400, 559, 560, 16000, 16159, 16160, 48000])
def test_frame_count(n):
    expected = 0 if n < 400 else 1 + (n - 400) // 160
    assert num_frames(n) == expected
    assert kaldi_fbank(torch.zeros(n)).shape == (expected, 128)
    assert beats_fbank(torch.zeros(2, n)).shape == (2, expected, 128)


def test_batch_with_lengths_equals_single():
    lengths = [16000, 12345, 401, 399]
    gen = torch.Generator().manual_seed(0)
    batch = 0.3 * torch.randn(len(lengths), max(lengths), generator=gen)
    feats, frames = beats_fbank(batch, lengths=torch.tensor(lengths))
    assert frames.tolist() == [num_frames(n) for n in lengths] == [98, 75, 1, 0]
    for i, n in enumerate(lengths):
        single = beats_fbank(batch[i, :n])
        assert single.shape == (frames[i].item(), 128)
        assert_near(feats[i, : frames[i]], single, atol=1e-5)
    # Plain lists work too, and the [N] form matches a batch of one.
    assert beats_fbank(batch[:2], lengths=lengths[:2])[1].tolist() == [98, 75]
    assert torch.equal(beats_fbank(batch[0]), beats_fbank(batch[:1])[0])


def test_beats_fbank_scaling_normalisation_and_dtypes():
    wav = np.random.default_rng(2).normal(0, 0.1, 4000)
    expected = (knf_fbank_128(wav.astype(np.float32)) - 15.41663) / (2 * 6.55582)
    out32 = beats_fbank(torch.from_numpy(wav).float())
    out64 = beats_fbank(torch.from_numpy(wav))  # soundfile's default dtype
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    assert (BEATS_FBANK_MEAN, BEATS_FBANK_STD) == (15.41663, 6.55582)
    np.testing.assert_allclose(out32.numpy(), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out64.numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    wav = 0.1 * torch.randn(2, 16000)
    assert_near(beats_fbank(wav.cuda()).cpu(), beats_fbank(wav), atol=1e-4)
