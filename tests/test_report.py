"""The HTML report and its figures, rendered from synthetic stored runs (tests/fakerun.py)."""
from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakerun import write_run
from profiler import plots, report
from profiler.errors import AttnprofError
from profiler.report import load_run, render_report, summary_markdown

SINGLE_FIGURES = {"decay.png", "gamma_heatmap.png", "regime_map.png"}
PAIR_FIGURES = {"decay.png", "gamma_maps.png", "regime_maps.png", "top_heads.png",
                "transitions.png", "weight_norms.png", "spectra.png"}
DATA_PNG = "data:image/png;base64,"


class _Tags(HTMLParser):
    """Collect every start tag with its attributes, and the text of <style> and <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag in ("style", "script") else None

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in:
            self.inline.append(data)


def _parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    return parser


def _snapshot(run: Path) -> dict[str, bytes]:
    files = {"index.html": (run / "index.html").read_bytes()}
    files.update({f"figures/{p.name}": p.read_bytes() for p in (run / "figures").iterdir()})
    return files


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in ("single", "pair"):
        run = write_run(root / kind, kind=kind)
        render_report(run)
        out[kind] = run
    return out


@pytest.mark.parametrize("kind,expected", [("single", SINGLE_FIGURES), ("pair", PAIR_FIGURES)])
def test_figures_are_written_and_decode(runs: dict[str, Path], kind: str, expected: set[str]) -> None:
    figures = runs[kind] / "figures"
    assert {p.name for p in figures.iterdir()} == expected
    for name in expected:
        with Image.open(figures / name) as image:
            image.load()
            assert image.format == "PNG"
            assert 200 <= image.width <= 1100 and image.height >= 150, name


@pytest.mark.parametrize("kind", ["single", "pair"])
def test_html_is_self_contained(runs: dict[str, Path], kind: str) -> None:
    page = (runs[kind] / "index.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    parsed = _parse(page)
    for tag, attrs in parsed.tags:
        assert tag not in ("link", "iframe", "object", "embed", "base"), tag
        src, href = attrs.get("src"), attrs.get("href")
        if src is not None:
            assert tag == "img" and src.startswith(DATA_PNG), (tag, src[:60])
        if href is not None:
            assert href.startswith("#") and "//" not in href, href
        assert not (tag == "script" and "src" in attrs)
    inline = "\n".join(parsed.inline)
    assert "@import" not in inline
    assert "url(" not in inline
    assert "fetch(" not in inline and "XMLHttpRequest" not in inline


@pytest.mark.parametrize("kind", ["single", "pair"])
def test_embedded_images_decode_and_match_the_files(runs: dict[str, Path], kind: str) -> None:
    parsed = _parse((runs[kind] / "index.html").read_text(encoding="utf-8"))
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    embedded = set()
    for attrs in images:
        assert attrs.get("alt") and len(attrs["alt"]) > 20
        png = base64.b64decode(attrs["src"][len(DATA_PNG):], validate=True)
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            assert (image.width, image.height) == (int(attrs["width"]), int(attrs["height"]))
        embedded.add(png)
    files = {p.read_bytes() for p in (runs[kind] / "figures").iterdir()}
    assert embedded == files


def test_pair_report_content(runs: dict[str, Path]) -> None:
    page = (runs["pair"] / "index.html").read_text(encoding="utf-8")
    diff = json.loads((runs["pair"] / "diff.json").read_text())
    assert diff["verdict"] == "regression"
    assert 'class="banner regression"' in page and "REGRESSION" in page
    for reason in diff["reasons"]:
        assert html.escape(reason) in page
    for heading in ("Model-level decay", "Per-head maps", "Heads that moved most",
                    "Regime transitions", "Weights", "Adapter", "Reproducibility"):
        assert f">{heading}</h2>" in page
    assert "targets_attention_only" in page and "changed_outside_targets" in page
    assert diff["heads"][0]["regime_base"] in page
    run = json.loads((runs["pair"] / "run.json").read_text())
    for digest in run["files"].values():
        assert digest in page
    assert "attnprof profile fake-base vs fake-merged" in page


def test_single_report_shows_the_single_model_subset(runs: dict[str, Path]) -> None:
    page = (runs["single"] / "index.html").read_text(encoding="utf-8")
    assert 'class="banner single"' in page and "SINGLE-MODEL PROFILE" in page
    assert ">Weights</h2>" not in page and ">Regime transitions</h2>" not in page
    profile = json.loads((runs["single"] / "profile.json").read_text())
    assert f"{profile['model_level']['gamma']:.3f}" in page
    assert page.count("<tr") >= len(profile["heads"])


def test_rerender_is_idempotent_and_replaces_the_figures(runs: dict[str, Path]) -> None:
    run = runs["pair"]
    before = _snapshot(run)
    (run / "figures" / "stale.png").write_bytes(b"old")
    assert render_report(run) == run / "index.html"
    assert _snapshot(run) == before
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_failed_render_leaves_the_previous_report(runs: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "pair"
    shutil.copytree(runs["pair"], run)
    before = _snapshot(run)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(plots, "plot_model_decay", broken)
    with pytest.raises(RuntimeError):
        render_report(run)
    assert _snapshot(run) == before
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_summary_markdown_pair(runs: dict[str, Path]) -> None:
    text = summary_markdown(runs["pair"])
    diff = json.loads((runs["pair"] / "diff.json").read_text())
    n = len(diff["heads"])
    assert "REGRESSION" in text
    assert f"{diff['model_dgamma']:+.4f}" in text
    lo, hi = diff["model_dgamma_ci"]
    assert f"[{lo:+.4f}, {hi:+.4f}]" in text
    assert f"shifted heads: {diff['shifted_heads']}/{n}" in text
    assert f"regime flips: {diff['regime_flips']}/{n}" in text
    assert "model.layers.1.mlp.down_proj.weight" in text
    assert text == (runs["pair"] / "summary.md").read_text(encoding="utf-8")
    assert summary_markdown(load_run(runs["pair"])) == text


def test_summary_markdown_single(runs: dict[str, Path]) -> None:
    text = summary_markdown(runs["single"])
    gamma = json.loads((runs["single"] / "profile.json").read_text())["model_level"]["gamma"]
    assert "single-model profile" in text and f"{gamma:.3f}" in text


def test_not_a_run_directory(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(AttnprofError) as err:
            render_report(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    bad = write_run(tmp_path / "bad", kind="single")
    (bad / "profile.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(AttnprofError, match="profile.json no longer matches the SHA-256 recorded in run.json"):
        load_run(bad)
    run_json = json.loads((bad / "run.json").read_text())
    del run_json["files"]                                    # a run.json without hashes: the JSON itself
    (bad / "run.json").write_text(json.dumps(run_json), encoding="utf-8")
    with pytest.raises(AttnprofError, match="not valid JSON"):
        load_run(bad)
    (bad / "profile.json").unlink()
    with pytest.raises(AttnprofError, match="missing profile.json"):
        load_run(bad)
    assert not (bad / "index.html").exists()


def test_a_run_edited_after_it_was_written_is_not_rendered(tmp_path: Path) -> None:
    """The footer lists run.json's hashes as the page's provenance: a diff.json edited since (here
    the verdict) must be refused, and the report already there left as it was."""
    run = write_run(tmp_path / "r", kind="pair")
    page = render_report(run).read_text(encoding="utf-8")
    diff = json.loads((run / "diff.json").read_text())
    diff["verdict"] = "pass" if diff["verdict"] == "regression" else "regression"
    (run / "diff.json").write_text(json.dumps(diff), encoding="utf-8")
    with pytest.raises(AttnprofError, match=r"diff.json no longer matches .* re-run the profile"):
        render_report(run)
    assert (run / "index.html").read_text(encoding="utf-8") == page


def test_large_model_without_weights_or_adapter(tmp_path: Path) -> None:
    run = write_run(tmp_path / "big", kind="pair", layers=32, heads=32, shifted=0, num=2,
                    length=160, window=32, weights=False, adapter=False, rope_theta=None)
    index = render_report(run)
    names = {p.name for p in (run / "figures").iterdir()}
    assert names == PAIR_FIGURES - {"weight_norms.png", "spectra.png"}
    for p in (run / "figures").iterdir():
        with Image.open(p) as image:
            assert image.width <= 1100 and image.height <= 1000
    page = index.read_text(encoding="utf-8")
    assert ">Weights</h2>" not in page and ">Adapter</h2>" not in page
    assert 'class="banner pass"' in page


def test_figures_stay_small(runs: dict[str, Path]) -> None:
    sizes = {p.name: p.stat().st_size for p in (runs["pair"] / "figures").iterdir()}
    assert sum(sizes.values()) < 400_000, sizes
    assert (runs["pair"] / "index.html").stat().st_size < 800_000


def test_plot_functions_take_plain_data(runs: dict[str, Path]) -> None:
    data = load_run(runs["pair"])
    base, merged = data.models["base"], data.models["merged"]
    fig = plots.plot_gamma_heatmap(base.profile)
    ax = fig.axes[0]
    assert plots.plot_gamma_heatmap(merged.profile, ax=ax) is fig
    assert plots.plot_model_decay({"base": (base.profile, base.A)}).axes
    assert plots.plot_top_shifted(data.diff, base.A.mean(0), merged.A.mean(0)).axes
    assert plots.plot_regime_map(base.profile).axes
    with pytest.raises(ValueError, match="no weight diff"):
        plots.plot_weight_norms({**data.diff, "weights": None})
    assert plots.split_tensor_name("model.layers.12.self_attn.q_proj.weight") == (12, "q_proj")
    assert plots.split_tensor_name("model.embed_tokens.weight") == (None, "embed_tokens")
    assert np.isnan(plots.head_grid([{"layer": 0, "head": 1, "gamma": None}], "gamma", (1, 2))).all()
    assert report.figure_specs(data)[0].filename == "decay.png"
    assert re.fullmatch(r"[a-z_]+\.png", report.figure_specs(data)[-1].filename)


def _rehash(run: Path) -> None:
    """Record the files' current hashes in run.json, as if the run had been written so."""
    from profiler.io import sha256
    meta = json.loads((run / "run.json").read_text())
    meta["files"] = {name: sha256(run / name) for name in meta["files"]}
    (run / "run.json").write_text(json.dumps(meta), encoding="utf-8")


def test_sparse_distance_axis_is_used(tmp_path: Path) -> None:
    """curves.npz may carry `distances` (e.g. the anchor estimator's 9 distances)."""
    run = write_run(tmp_path / "anchor", kind="single")
    with np.load(run / "curves.npz") as z:
        arrays = {k: z[k] for k in z.files}
    keep = np.array([10, 20, 30, 50, 100, 150, 190])
    np.savez_compressed(run / "curves.npz", **{**arrays, "A": arrays["A"][..., keep],
                                               "distances": keep})
    _rehash(run)
    data = load_run(run)
    assert data.primary.distances.tolist() == keep.tolist()
    fig = plots.plot_model_decay({"model": (data.primary.profile, data.primary.A, keep)})
    x = fig.axes[0].get_lines()[0].get_xdata()
    assert list(x) == keep.tolist()
    render_report(run)
    np.savez_compressed(run / "curves.npz", **{**arrays, "distances": keep})
    _rehash(run)
    with pytest.raises(AttnprofError, match="distances"):
        load_run(run)
