"""SALMONN Studio in a real browser: headless Chromium (Playwright) loads the page, uploads a clip,
runs a task preset and sees the answer, the spectrogram and the attention map.

Skipped only when Playwright or Chromium is missing and $CI is not set; in CI it must run.
`python tests/test_browser.py --screenshots` retakes assets/screenshots/{main,scale_lab}.png.
"""
from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CLIP = REPO / "assets" / "examples" / "speech.wav"


def _available() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"chromium not found at {CHROMIUM}"
    return None


@contextmanager
def served_app(root: Path, trained: bool = False):
    """The app on the tiny model (or, `trained`, on SALMONN-tiny with both shipped checkpoints),
    on a free localhost port."""
    sys.path.insert(0, str(REPO))
    from app.ui import build_app, launch
    from tests.test_app import free_port, tiny_pipeline

    if trained:
        from model.defaults import default_config
        from model.pipeline import Pipeline

        pipe = Pipeline.from_config(default_config("activation"))
        demo = build_app(pipe, {"instruction-tuned": Pipeline.from_config(default_config("instruction"))},
                         primary_name="activation-tuned")
    else:
        pipe = tiny_pipeline(root)
        demo = build_app(pipe)
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", pipe.trained_scale
    finally:
        demo.close()


@contextmanager
def browser_page(width=1400, height=1000):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            page.js_errors = []                     # uncaught exceptions in the page
            page.on("pageerror", lambda e: page.js_errors.append(str(e)))
            yield page
        finally:
            browser.close()


def upload_and_ask(page, url: str, preset_label: str):
    """Open the app, upload CLIP, pick a preset, send; wait for the finished answer."""
    page.goto(url)
    page.locator("#audio-in input[type=file]").set_input_files(str(CLIP))
    # the spectrogram appears once the upload has been encoded
    page.locator("#spectrogram img").wait_for(state="visible")
    page.locator("#preset input").click()
    page.get_by_role("option", name=preset_label).click()
    question = page.locator("#question textarea")
    page.wait_for_function("el => el.value.length > 0", arg=question.element_handle())
    page.locator("#send").click()
    # the footer with the used LoRA scale is written when the answer is complete
    page.locator("#chatbot").get_by_text("LoRA scale").wait_for(state="visible")
    return question


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    reason = _available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser test must run in CI: {reason}")
        pytest.skip(reason)
    with served_app(tmp_path_factory.mktemp("tiny")) as served:
        yield served


def test_page_upload_preset_answer_and_plots(app_url):
    from app.presets import PRESETS_BY_KEY

    url, trained = app_url
    preset = PRESETS_BY_KEY["asr"]
    with browser_page() as page:
        upload_and_ask(page, url, preset.label)
        chat = page.locator("#chatbot")
        assert preset.prompt in chat.inner_text()
        assert f"LoRA scale {trained:g} ·" in chat.inner_text()     # the scale used, shown with the answer
        for elem in ("#spectrogram img", "#attention img"):
            width = page.locator(elem).evaluate("img => img.naturalWidth")
            assert width == 1000, elem
        assert page.locator("#window-bar").locator("img, svg").count() > 0
        assert "Audio tokens" in page.locator("#audio-info").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser_main.png"), full_page=True)

        # A bundled example sets both the clip and its task preset (and starts a new conversation).
        page.get_by_text("melody.wav", exact=True).click()
        page.wait_for_function("() => document.querySelector('#question textarea').value.includes('music')")
        page.wait_for_function("() => !document.querySelector('#chatbot').innerText.includes('LoRA scale')")
        assert "Music captioning" in page.locator("#preset input").input_value()
        assert not page.js_errors


def _mp4_with_audio(path: Path) -> Path:
    import subprocess

    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=blue:s=32x32:d=3",
                    "-f", "lavfi", "-i", "sine=f=440:d=2.23", "-c:v", "mpeg4", "-c:a", "aac", str(path)],
                   check=True, timeout=60)
    return path


def test_video_upload_refused_type_and_preset_repick(app_url, tmp_path):
    """A video goes in through its button and is answered; dropped on the audio box it gets one plain
    sentence; the same preset picked again after a new upload fills the question again."""
    from app.presets import PRESETS_BY_KEY
    from app.ui import REFUSED_TYPE_TEXT

    if not shutil.which("ffmpeg"):
        pytest.skip("needs ffmpeg")
    url, _ = app_url
    video = _mp4_with_audio(tmp_path / "clip.mp4")
    preset = PRESETS_BY_KEY["asr"]
    with browser_page() as page:
        page.goto(url)
        page.locator("#audio-in input[type=file]").set_input_files(str(video))
        toast = page.get_by_test_id("toast-text").filter(has_text="can't go in the audio box")
        toast.first.wait_for(state="visible")
        assert toast.first.inner_text() == REFUSED_TYPE_TEXT
        assert not any("audio/midi" in t for t in page.get_by_test_id("toast-text").all_inner_texts())
        question = upload_and_ask(page, url, preset.label)
        assert question.input_value() == ""                 # sent: the box is empty again
        with page.expect_file_chooser() as chooser:
            page.locator("#video-in").click()
        chooser.value.set_files(str(video))
        page.wait_for_function("() => document.querySelector('#audio-info').innerText.includes('2.2')")
        info = page.locator("#audio-info").inner_text()
        assert "cut" not in info, info
        page.locator("#preset input").click()               # the preset already shown, picked again
        page.get_by_role("option", name=preset.label).click()
        page.wait_for_function("el => el.value.length > 0", arg=question.element_handle())
        assert question.input_value() == preset.prompt
        page.locator("#send").click()
        page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('LoRA scale')")
        assert not page.js_errors


def take_screenshots(out_dir: Path = REPO / "assets" / "screenshots") -> None:
    """Main tab after an answer, and the scale lab after a run (small PNGs for the README)."""
    import tempfile

    from app.presets import PRESETS_BY_KEY

    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)

    def shoot(page, name):
        # Full page, then scaled down and palette-quantized: small PNGs for the README.
        raw = out_dir / name
        page.screenshot(path=str(raw), full_page=True)
        img = Image.open(raw).convert("RGB")
        img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.LANCZOS)
        img.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(raw, optimize=True)

    from model.defaults import CHECKPOINTS

    trained = all(p.is_file() for p in CHECKPOINTS.values())
    with tempfile.TemporaryDirectory() as tmp, served_app(Path(tmp), trained) as (url, _), \
            browser_page(1280, 900) as page:
        page.set_default_timeout(300_000)    # the trained model's long answers on a busy CPU
        upload_and_ask(page, url, PRESETS_BY_KEY["asr"].label)
        shoot(page, "main.png")
        page.get_by_role("tab", name="Scale lab").click()
        page.locator("#lab-run").click()
        page.locator("#lab-answers .lab-answer").first.wait_for(state="visible")
        page.locator("#ppl-run").click()
        page.locator("#ppl-plot img").wait_for(state="visible")
        shoot(page, "scale_lab.png")
    print("wrote", out_dir / "main.png", out_dir / "scale_lab.png")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if "--screenshots" in sys.argv:
        take_screenshots()
