"""What the front end says about the user's audio must be true: cut only when audio was cut, beyond
full scale only when the samples were, a DC offset named as such, advice that fits a file or a
microphone. Every clip is generated here."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from model.audio import _audio_length, prepare_audio
from model.errors import AudioError

HAS_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None
needs_ffmpeg = pytest.mark.skipif(not HAS_FFMPEG, reason="needs ffmpeg")


def sine(seconds: float, rate: int = 16000, amp: float = 0.3, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def strict(source, **kw):
    return prepare_audio(source, strict=True, **kw)


def said(audio) -> str:
    return audio.describe() + " " + " ".join(audio.notes)


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True, timeout=60)


def probe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,duration:format=duration",
                          "-of", "json", str(path)], capture_output=True, check=True, timeout=60)
    return json.loads(out.stdout)


def audio_duration(info: dict) -> float:
    return float(next(s for s in info["streams"] if s["codec_type"] == "audio")["duration"])


# ------------------------------------------------------------------------------------------ cut

@pytest.fixture(scope="module")
def video_longer_than_audio(tmp_path_factory) -> Path:
    """A 3 s video whose audio track is 2.23 s: the container says 3 s."""
    path = tmp_path_factory.mktemp("mp4") / "clip.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=red:s=16x16:d=3", "-f", "lavfi", "-i", "sine=f=440:d=2.23",
           "-c:v", "mpeg4", "-c:a", "aac", str(path))
    info = probe(path)
    assert float(info["format"]["duration"]) == pytest.approx(3.0, abs=0.05)
    assert audio_duration(info) == pytest.approx(2.23, abs=0.01)
    return path


@needs_ffmpeg
def test_video_longer_than_its_audio_is_not_called_cut(video_longer_than_audio):
    audio = strict(video_longer_than_audio)
    assert not audio.was_cut and audio.length_known
    assert not any("cut" in n for n in audio.notes), audio.notes
    assert "cut" not in audio.describe()
    # the audio track's length (AAC decodes whole 1024-sample frames: up to 23 ms more), not the video's
    assert audio.original_seconds == pytest.approx(2.23, abs=0.03)
    assert audio.describe().startswith(f"{audio.original_seconds:.2f} s")


@needs_ffmpeg
def test_video_cut_reports_the_audio_tracks_length(video_longer_than_audio):
    audio = strict(video_longer_than_audio, max_seconds=2)
    assert audio.was_cut and audio.original_seconds == pytest.approx(2.23, abs=0.03)
    # 2.2 s by the stream's header, 2.3 s when the decoder's last whole AAC frame (2.25 s) counts
    assert re.fullmatch(r"The audio is 2\.[23] s long; only the first 2 s are used \(the limit is 2 s; "
                        r"the rest was cut\)\.", audio.notes[0]), audio.notes


def test_clip_over_the_limit_is_cut_and_names_the_limit(tmp_path):
    path = tmp_path / "three.wav"
    sf.write(path, sine(3.0), 16000)
    audio = strict(path, max_seconds=2)
    assert audio.was_cut and audio.seconds == pytest.approx(2.0) and audio.original_seconds == pytest.approx(3.0)
    assert audio.notes[0] == "The audio is 3 s long; only the first 2 s are used (the limit is 2 s; the rest was cut)."
    assert "the rest was cut (limit 2 s)" in audio.describe()


def test_long_array_cut_note_verbatim():
    audio = strict((16000, sine(412.0).astype(np.float32)))
    assert audio.notes[0] == ("The audio is 412 s long; only the first 300 s are used "
                              "(the limit is 300 s; the rest was cut).")


def test_clip_at_the_limit_is_not_cut(tmp_path):
    path = tmp_path / "two.wav"
    sf.write(path, sine(2.0, 44100), 44100)
    audio = strict(path, max_seconds=2)
    assert not audio.was_cut and audio.notes == [] and audio.original_seconds == pytest.approx(2.0)


@needs_ffmpeg
def test_stream_of_unknown_length_over_the_limit(tmp_path):
    """A webm written to a pipe carries no duration, like a browser recording: cut, length unknown."""
    path = tmp_path / "rec.webm"
    with open(path, "wb") as out:
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=f=440:d=3", "-c:a", "libopus",
                        "-f", "webm", "pipe:1"], stdout=out, check=True, timeout=60)
    assert "duration" not in probe(path).get("format", {})
    audio = strict(path, max_seconds=2)
    assert audio.was_cut and not audio.length_known
    assert audio.notes[0] == ("The audio is longer than 2 s; only the first 2 s are used "
                              "(the limit is 2 s; the rest was cut).")
    short = strict(path, max_seconds=10)           # all of it decoded: its length is known
    assert not short.was_cut and short.length_known and short.original_seconds == pytest.approx(3.0, abs=0.05)


def test_audio_length_trusts_a_stated_length_only_past_the_limit():
    assert _audio_length(2.25, 3.0, 300) == (2.25, True)        # all decoded: a longer video track is not audio
    assert _audio_length(301.0, 412.0, 300) == (412.0, True)    # cut: the stream says how long it was
    assert _audio_length(301.0, None, 300) == (301.0, False)    # cut: nothing says
    assert _audio_length(301.0, 120.0, 300) == (301.0, False)   # cut: a header shorter than what decoded is wrong
    assert _audio_length(301.0, 300.9, 300) == (301.0, True)    # ... but a padded last frame is not


# ------------------------------------------------------------------------------------------ full scale

def test_loud_int16_is_not_called_beyond_full_scale(tmp_path):
    """16-bit can't exceed full scale; the resampler overshooting a little past 1.0 is no news."""
    pcm = np.round(32763 * np.sin(2 * np.pi * 440 * np.arange(3 * 22050) / 22050)).astype(np.int16)
    assert np.abs(pcm).max() == 32763
    assert np.abs(resample_poly(pcm / 32768.0, 320, 441)).max() > 1.0     # the overshoot the test is about
    path = tmp_path / "loud.wav"
    sf.write(path, pcm, 22050, subtype="PCM_16")
    audio = strict(path)
    assert not any("full scale" in n for n in audio.notes), audio.notes
    assert np.abs(audio.wav).max() <= 1.0


@pytest.mark.parametrize("rate", [16000, 44100])
def test_float_beyond_full_scale_is_scaled_with_a_note(tmp_path, rate):
    path = tmp_path / "hot.wav"
    sf.write(path, sine(1.0, rate, amp=3.0), rate, subtype="FLOAT")
    audio = strict(path)
    assert any("beyond full scale (peak 3)" in n and "scaled down" in n for n in audio.notes), audio.notes
    assert np.abs(audio.wav).max() <= 1.0 and np.abs(audio.wav).max() > 0.9


def test_beyond_full_scale_peak_is_printed_precisely(tmp_path):
    path = tmp_path / "warm.wav"
    sf.write(path, sine(1.0, amp=1.0004), 16000, subtype="FLOAT")
    audio = strict(path)
    assert any("(peak 1.0004)" in n for n in audio.notes), audio.notes


def test_clipped_sine_still_gets_the_clipping_note(tmp_path):
    path = tmp_path / "clipped.wav"
    sf.write(path, np.clip(sine(1.0, amp=4.0), -1, 1), 16000, subtype="PCM_16")
    audio = strict(path)
    assert any(n.startswith("The audio is clipped (") for n in audio.notes), audio.notes
    assert not any("full scale (peak" in n for n in audio.notes), audio.notes


# ------------------------------------------------------------------------------------------ nothing to hear

@pytest.mark.parametrize("rate", [16000, 22050])
def test_dc_offset_is_named_and_refused(tmp_path, rate):
    path = tmp_path / "dc.wav"
    sf.write(path, np.full(2 * rate, 0.25, np.float32), rate, subtype="FLOAT")
    with pytest.raises(AudioError) as err:
        strict(path)
    text = str(err.value)
    assert "constant DC offset" in text and "+0.25" in text and "digital silence" not in text, text


def test_zeros_are_digital_silence(tmp_path):
    path = tmp_path / "zeros.wav"
    sf.write(path, np.zeros(32000, np.float32), 16000)
    with pytest.raises(AudioError, match=r"silent \(only digital silence\)"):
        strict(path)


@pytest.mark.parametrize("samples", [np.zeros(32000, np.float32), np.full(32000, 0.1, np.float32),
                                     (np.random.default_rng(0).standard_normal(32000) * 3e-5).astype(np.float32)],
                         ids=["zeros", "dc", "faint"])
def test_advice_fits_where_the_audio_came_from(samples):
    with pytest.raises(AudioError) as mic:
        strict((16000, samples), origin="microphone")
    assert "microphone" in str(mic.value) and "input device" in str(mic.value), mic.value
    for origin in ("upload", "file"):
        with pytest.raises(AudioError) as upload:
            strict((16000, samples), origin=origin)
        assert "microphone" not in str(upload.value) and "another file" in str(upload.value), upload.value


def test_unknown_origin_is_a_programming_error():
    with pytest.raises(ValueError, match="origin"):
        prepare_audio((16000, sine(1.0)), origin="mic")
