"""The report renders in a real browser: headless Chromium loads index.html from disk (file://).

One run takes a screenshot (kept in test-artifacts/ at the repo root) and checks it is not blank;
another dumps the DOM of a copy of the page with a small probe script that records, after load,
each image's natural size, any script error, and the effect of clicking a sortable header.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakerun import write_run
from profiler.report import render_report

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio"]
TIMEOUT_S = 120

PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (im) {
    return [im.naturalWidth, im.naturalHeight, im.complete];
  });
  var sorted = null;
  var table = document.querySelector("table.sortable");
  if (table) {
    table.tHead.rows[0].cells[0].click();
    table.tHead.rows[0].cells[0].click();
    sorted = Array.prototype.map.call(table.tBodies[0].rows, function (r) {
      return r.cells[0].textContent.trim();
    });
  }
  var out = document.createElement("pre");
  out.id = "attnprof-probe";
  out.textContent = JSON.stringify({images: images, errors: window.__errors, sorted: sorted});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _chromium()
    if path is None:
        pytest.skip("chromium not found (/usr/bin/chromium or on PATH): `make test` installs it "
                    "with apt-get; the browser check is skipped")
    return path


def _run(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {TIMEOUT_S} s: {' '.join(cmd)}")


@pytest.fixture(scope="module", params=["pair", "single"])
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = write_run(tmp_path_factory.mktemp("browser") / request.param, kind=request.param)
    return render_report(run)


def test_screenshot_is_not_blank(chromium: str, rendered: Path, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"report-{rendered.parent.name}.png"
    shot.unlink(missing_ok=True)
    result = _run(chromium, tmp_path / "profile", f"--screenshot={shot}",
                  "--window-size=1280,4000", rendered.as_uri())
    assert shot.is_file(), f"no screenshot (rc {result.returncode}): {result.stderr[-2000:]}"
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.shape == (4000, 1280)
    assert pixels.std() > 20, "screenshot is (nearly) uniform"
    non_white_rows = np.flatnonzero((pixels < 200).any(axis=1))
    assert non_white_rows.size > 1000 and non_white_rows.max() > 1500


def test_images_load_and_script_runs(chromium: str, rendered: Path, tmp_path: Path) -> None:
    page = rendered.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    result = _run(chromium, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom",
                  probe.as_uri())
    match = re.search(r'<pre id="attnprof-probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"probe output missing (rc {result.returncode}): {result.stderr[-2000:]}"
    found = json.loads(html.unescape(match.group(1)))
    expected = page.count("<img ")
    assert len(found["images"]) == expected >= 3
    for width, height, complete in found["images"]:
        assert complete and width > 0 and height > 0
    assert found["errors"] == []
    column = [float(v) for v in found["sorted"]]
    assert column == sorted(column, reverse=True), "second click sorts the first column descending"
