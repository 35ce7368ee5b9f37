"""The HTML report: self-contained (no external resources), every figure embedded, and it renders
in a real headless browser (Debian's chromium; skipped when it is not installed)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moefy.report import write_report
from tests.analysis_fixtures import shared_analysis_folder

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=10000",
]
# a test-only probe, appended to a copy of the page: records whether every image decoded
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-decoded', String(imgs.filter(i => i.complete && i.naturalWidth > 0).length));
  document.body.setAttribute('data-probe', 'done');
});
</script>"""


@pytest.fixture(scope="session")
def report(tmp_path_factory) -> Path:
    folder = shared_analysis_folder(tmp_path_factory)
    return write_report(folder, compute=False)


def _chromium() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


def test_report_is_self_contained(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    assert report.name == "report.html"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert "<script" not in page.lower()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == page.count("<img") >= 9
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ("Quality and cost", "Routing", "Sparsity", "Specialisation", "Configuration", "Figure 1", "Figure 3",
                    "Figure 4", "Figure 5"):
        assert heading in page
    assert "synthetic reference for the test" in page  # a substitute's note is shown
    assert "chatterbot-corpus" in page and "BSD" in page  # the multilingual text's source and licence


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    common = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-probe="done"' in dom.stdout, dom.stderr[-2000:]
    total = int(re.search(r'data-images="(\d+)"', dom.stdout).group(1))
    decoded = int(re.search(r'data-decoded="(\d+)"', dom.stdout).group(1))
    assert total >= 9 and decoded == total

    shot = tmp_path / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert("L")
    lo, hi = image.getextrema()
    assert image.size == (1280, 2400) and hi - lo > 100  # not blank: dark text and figures on white
    assert len(image.resize((256, 480)).getcolors(maxcolors=256 * 256) or []) > 20
