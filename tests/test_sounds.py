"""Sound-event and music labels must match the audio, measured independently; mixes hit their SNR."""

import numpy as np
import pytest
from scipy.signal import stft

from train import sounds, synth
from train.dsp import SR


# --------------------------------------------------------------------------- independent measurements

def frame_rms(x, hop=0.01, win=0.02):
    h, w = int(hop * SR), int(win * SR)
    n = max(1, 1 + (len(x) - w) // h)
    return np.array([np.sqrt(np.mean(x[i * h: i * h + w] ** 2)) for i in range(n)])


def count_bursts(x):
    """Count separate bursts of energy: rise above 30% of max, re-arm below 8%."""
    env = frame_rms(x)
    hi, lo = 0.3 * env.max(), 0.08 * env.max()
    count, armed = 0, True
    for e in env:
        if armed and e > hi:
            count, armed = count + 1, False
        elif e < lo:
            armed = True
    return count


def onset_times(x):
    """Note onsets from spectral flux (new energy in any frequency bin), peaks >= 0.15 s apart."""
    _, _, z = stft(x, SR, nperseg=512, noverlap=512 - 160)  # 10 ms hop
    logmag = np.log1p(100 * np.abs(z))
    flux = np.maximum(np.diff(logmag, axis=1), 0).sum(0)
    thresh = 0.25 * flux.max()
    onsets, last = [], -1.0
    for i, r in enumerate(flux):
        t = i * 0.01
        if r > thresh and r >= flux[max(0, i - 5): i + 6].max() and t - last > 0.15:
            onsets.append(t)
            last = t
    return np.array(onsets)


def centroid_slope(x):
    """Slope (Hz/s) of the spectral centroid over the loud frames."""
    f, t, z = stft(x, SR, nperseg=512)
    mag = np.abs(z)
    energy = mag.sum(0)
    keep = energy > 0.2 * energy.max()
    cent = (f[:, None] * mag).sum(0) / (energy + 1e-12)
    return np.polyfit(t[keep], cent[keep], 1)[0]


# --------------------------------------------------------------------------- sounds

@pytest.mark.parametrize("seed", range(8))
def test_beep_count_matches_label(seed):
    rng = np.random.default_rng(seed)
    x, lab = sounds.beeps(rng, count=int(rng.integers(1, 7)))
    assert x.dtype == np.float32
    assert count_bursts(x) == lab["count"]
    lo, hi = sounds.BEEP_PITCH_HZ[lab["pitch"]]
    spec = np.abs(np.fft.rfft(x))
    assert lo <= np.argmax(spec) * SR / len(x) <= hi  # the loudest frequency is in the labelled pitch class


@pytest.mark.parametrize("kind", ["knock", "clap", "dog_bark"])
def test_counted_events_match_label(kind):
    for seed in range(3):
        x, lab = sounds.counted_events(np.random.default_rng(seed), kind)
        assert count_bursts(x) == lab["count"], (kind, seed)


@pytest.mark.parametrize("direction", ["rising", "falling"])
def test_sweep_direction_from_spectral_centroid(direction):
    for seed in range(4):
        x, lab = sounds.sweep(np.random.default_rng(seed), direction=direction, repeats=1)
        assert lab["direction"] == direction
        slope = centroid_slope(x)
        assert (slope > 100) if direction == "rising" else (slope < -100), (seed, slope)


def test_count_detector_can_fail():
    x, lab = sounds.beeps(np.random.default_rng(0), count=4)
    assert count_bursts(x[: len(x) // 2]) != lab["count"]


# --------------------------------------------------------------------------- music

@pytest.mark.parametrize("timbre", list(sounds.TIMBRES))
def test_music_tempo_matches_onset_spacing(timbre):
    rng = np.random.default_rng(list(sounds.TIMBRES).index(timbre))
    x, lab = sounds.music(rng, timbre=timbre, drums=False, texture_="melody and chords", duration=6.0)
    beat = 60.0 / lab["bpm"]
    onsets = onset_times(x)
    assert len(onsets) >= 4
    measured = np.median(np.diff(onsets))
    assert abs(measured - beat) / beat < 0.06, (lab, measured)
    assert sounds.tempo_label(60.0 / measured) == lab["tempo"]
    # every onset sits on the beat grid
    phase = (onsets - onsets[0]) / beat
    assert np.all(np.abs(phase - np.round(phase)) < 0.12), phase


def test_melody_is_in_its_key():
    """The strongest pitch classes of a melody+chords clip belong to the labelled scale."""
    x, lab = sounds.music(np.random.default_rng(3), timbre="sine", drums=False, texture_="melody and chords")
    spec = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    ok = (freqs > 80) & (freqs < 2000)
    pcs = np.round(12 * np.log2(freqs[ok] / 440.0) + 69).astype(int) % 12
    chroma = np.bincount(pcs, weights=spec[ok], minlength=12)
    tonic = sounds.NOTE_NAMES.index(lab["key"])
    scale = {(tonic + s) % 12 for s in sounds.SCALES[lab["mode"]]}
    assert set(np.argsort(chroma)[-3:]) <= scale
    assert np.argmax(chroma) in {tonic, (tonic + 7) % 12, (tonic + (4 if lab["mode"] == "major" else 3)) % 12}




# --------------------------------------------------------------------------- mixing

@pytest.mark.parametrize("snr", [5.0, 10.0, 15.0])
def test_mix_snr_close_to_request(snr):
    rng = np.random.default_rng(int(snr))
    sp, _ = synth.speech("Where is the nearest bus stop?", rng, split="train")
    bg, _ = sounds.texture(rng, "rain", duration=len(sp) / SR + 1.0)
    mix, info = sounds.mix_at_snr(sp, bg, snr, rng)
    # Project the mix on the (placed) clean speech; what is left is the background.
    s = np.zeros(len(mix))
    s[info["speech_start"]: info["speech_start"] + len(sp)] = sp
    gain = np.dot(mix, s) / np.dot(s, s)
    resid = mix - gain * s
    measured = 10 * np.log10(np.sum((gain * s) ** 2) / np.sum(resid ** 2))
    assert abs(measured - snr) < 0.5
