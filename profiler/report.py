"""Render a stored run directory into a self-contained HTML report plus PNG figures.

`render_report(run_dir)` reads only the stored JSON/npz files (never a model), draws every figure
with `profiler.plots`, and writes `RUN_DIR/figures/*.png` and `RUN_DIR/index.html` atomically.
The page embeds its figures as base64 PNG data URIs and its CSS and script inline: it loads
nothing from the network or from other files. `summary_markdown` gives the CI-log summary.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import string
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from . import __version__, plots
from .errors import AttnprofError
from .io import atomic_dir, atomic_write_text, changed_since_run
from .rules import REGIME_RULES, REGIMES, GateThresholds

ROLES_PAIR = ("base", "merged")
FIGURES_DIR = "figures"
INDEX = "index.html"
WEIGHT_TABLE_TOP = 12          # rows of the summary's weight-change table
WEIGHT_SUMMARY = (("num_tensors", "tensors in both checkpoints"), ("num_changed", "changed"),
                  ("num_rounding_only", "rounding only"),
                  ("num_outside_targets", "changed outside the targets"),
                  ("target_modules", "target modules"), ("adapter_rank", "adapter rank"),
                  ("max_signal_rank", "largest signal rank"), ("max_rel_norm", "largest ‖ΔW‖/‖W‖"))


@dataclass
class ModelData:
    """One profiled model of a run: profile.json and its arrays."""
    role: str
    profile: dict[str, Any]
    A: np.ndarray                                  # (N, L, H, D)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)   # sink, local, entropy
    input_ids: np.ndarray | None = None            # (N, T)

    @property
    def name(self) -> str:
        return str(self.profile.get("model", {}).get("name") or self.role)

    @property
    def distances(self) -> np.ndarray:
        """The distance of each point of A's last axis (curves.npz `distances`, else 0..D-1)."""
        d = self.arrays.get("distances")
        return np.arange(self.A.shape[-1]) if d is None else d


@dataclass
class RunData:
    """Everything a report needs from a run directory."""
    run_dir: Path
    kind: str                                      # "single" | "pair"
    run: dict[str, Any]                            # run.json ({} when absent)
    models: dict[str, ModelData]                   # {"model": ...} or {"base": ..., "merged": ...}
    diff: dict[str, Any] | None = None

    @property
    def primary(self) -> ModelData:
        """The single model, or the base of a pair."""
        return self.models["base" if self.kind == "pair" else "model"]


@dataclass(frozen=True)
class FigureSpec:
    """One report figure: file name, heading, alt text, caption and the function that draws it."""
    filename: str
    title: str
    alt: str
    caption: str
    draw: Callable[[], Any]
    exact_colours: bool = False           # a continuous colour scale carries data: no palette


# --- loading ---------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AttnprofError(f"missing {path.name} in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AttnprofError(f"{path}: not valid JSON ({exc})".replace("\n", " ")) from None


def _read_npz(path: Path, required: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise AttnprofError(f"missing {path.name} in {path.parent}") from None
    except (OSError, ValueError, zipfile.BadZipFile, struct.error) as exc:
        raise AttnprofError(f"{path}: not a readable .npz file ({exc})".replace("\n", " ")) from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise AttnprofError(f"{path}: missing array(s) {', '.join(missing)}")
    return arrays


def _load_model(folder: Path, role: str) -> ModelData:
    profile = _read_json(folder / "profile.json")
    if not isinstance(profile, dict) or not isinstance(profile.get("heads"), list):
        raise AttnprofError(f"{folder / 'profile.json'}: not an attnprof profile (no 'heads' list)")
    curves = _read_npz(folder / "curves.npz", ["A"])
    A = curves.pop("A")
    if A.ndim != 4:
        raise AttnprofError(f"{folder / 'curves.npz'}: A must be (N, L, H, D), got shape {A.shape}")
    distances = curves.get("distances")
    if distances is not None and distances.shape != (A.shape[-1],):
        raise AttnprofError(f"{folder / 'curves.npz'}: distances has shape {distances.shape}, "
                            f"A has {A.shape[-1]} distances")
    ids = None
    if (folder / "probes.npz").exists():
        ids = _read_npz(folder / "probes.npz", ["input_ids"])["input_ids"]
    return ModelData(role=role, profile=profile, A=A, arrays=curves, input_ids=ids)


def load_run(run_dir: str | Path, verify: bool = True) -> RunData:
    """Load a run directory (single or pair) written by `attnprof profile`.

    Raises AttnprofError with a one-line reason when the directory is not a readable run, or
    (`verify`) when a file no longer matches the hash run.json recorded for it.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise AttnprofError(f"not a run directory: {root} does not exist or is not a directory")
    run = _read_json(root / "run.json") if (root / "run.json").is_file() else {}
    if not isinstance(run, dict):
        raise AttnprofError(f"{root / 'run.json'}: expected a JSON object")
    edited = changed_since_run(root, run.get("files") or {}) if verify else []
    if edited:
        raise AttnprofError(f"{root}: {', '.join(edited)} no longer match{'es' if len(edited) == 1 else ''} "
                            "the SHA-256 recorded in run.json (edited after the run?); re-run the profile")
    kind = run.get("kind")
    if kind is None:
        if (root / "diff.json").is_file() or (root / "base").is_dir():
            kind = "pair"
        elif (root / "profile.json").is_file():
            kind = "single"
        else:
            raise AttnprofError(f"{root} is not an attnprof run directory "
                                "(no run.json, profile.json or base/ + merged/ + diff.json)")
    if kind == "single":
        return RunData(root, "single", run, {"model": _load_model(root, "model")})
    if kind == "pair":
        models = {role: _load_model(root / role, role) for role in ROLES_PAIR}
        diff = _read_json(root / "diff.json")
        if not isinstance(diff, dict) or not isinstance(diff.get("heads"), list):
            raise AttnprofError(f"{root / 'diff.json'}: not an attnprof diff (no 'heads' list)")
        return RunData(root, "pair", run, models, diff)
    raise AttnprofError(f"{root / 'run.json'}: unknown run kind {kind!r} (expected single or pair)")


# --- figures ---------------------------------------------------------------------------------

def figure_specs(data: RunData) -> list[FigureSpec]:
    """The figures of this run's report, in page order."""
    decay_inputs = {role: (m.profile, m.A, m.distances) for role, m in data.models.items()}
    specs = [FigureSpec(
        "decay.png", "Model-level decay",
        "Log-log plot of the model-mean attention weight A(d) against distance d, with the fitted "
        "power law" + (" for base and merged" if data.kind == "pair" else "")
        + " and the closed-form gamma_Pade line.",
        "Mean over probes, layers and heads; band: 10–90 % spread across probes; dashed: weighted "
        "power-law fit over [d_min, d_max] (grey band); dotted: slope −γ_Padé (closed form for RoPE, "
        "Marín 2026) anchored at the fit's value at d_min."
        + (" Lower panel: merged / base." if data.kind == "pair" else ""),
        lambda: plots.plot_model_decay(decay_inputs))]
    if data.kind == "single":
        p = data.primary.profile
        specs += [
            FigureSpec("gamma_heatmap.png", "Decay exponent per head",
                       "Heatmap of gamma per layer (rows) and head (columns).",
                       "γ of each head's power-law fit; grey: no value (fit undefined).",
                       lambda: plots.plot_gamma_heatmap(p), exact_colours=True),
            FigureSpec("regime_map.png", "Regime per head",
                       "Map of regime labels per layer and head, coloured by category.",
                       "First matching rule of the regime table (see below).",
                       lambda: plots.plot_regime_map(p)),
        ]
        return specs
    diff = data.diff or {}
    base, merged = data.models["base"], data.models["merged"]
    specs += [
        FigureSpec("gamma_maps.png", "Decay exponent per head",
                   "Three heatmaps per layer and head: gamma of base, gamma of merged, and "
                   "delta gamma with shifted heads boxed.",
                   "Base and merged share one colour scale. Δγ uses a diverging scale centred "
                   "at 0; boxed heads have shifted (paired CI excludes 0 and |Δγ| ≥ 0.05).",
                   lambda: plots.plot_gamma_maps(base.profile, merged.profile, diff), exact_colours=True),
        FigureSpec("regime_maps.png", "Regime per head",
                   "Regime label maps of base and merged per layer and head; changed heads boxed.",
                   "Categorical colours per regime; boxed heads changed label.",
                   lambda: plots.plot_regime_maps(diff)),
        FigureSpec("top_heads.png", "Heads that moved most",
                   "Small multiples of base versus merged A(d) on log-log axes for the heads "
                   "with the largest change in gamma.",
                   "Probe-mean A(d) per head; title: Δγ with its paired bootstrap CI.",
                   lambda: plots.plot_top_shifted(diff, base.A, merged.A, base.profile,
                                                  merged.profile, distances=base.distances)),
        FigureSpec("transitions.png", "Regime transitions",
                   "Matrix of regime transition counts, base regime rows by merged regime columns.",
                   "Counts of heads; the diagonal (boxed) keeps its label.",
                   lambda: plots.plot_transition_matrix(diff), exact_colours=True),
    ]
    if plots.weight_tensors(diff):
        specs += [
            FigureSpec("weight_norms.png", "Relative weight change",
                       "Heatmap of the relative Frobenius norm of the weight change per layer "
                       "and module, on a log colour scale.",
                       "‖W_merged − W_base‖_F / ‖W_base‖_F. Palest cells: identical, or changed "
                       "only by rounding to another float format (not counted as a change). Red "
                       "boxes: changed but not an adapter target.", lambda: plots.plot_weight_norms(diff),
                       exact_colours=True),
            FigureSpec("spectra.png", "Singular-value spectra",
                       "Singular values of the weight change for the most changed matrices, "
                       "with noise floor and adapter rank marked.",
                       "Dashed: noise floor (the bound on rounding noise of the stored formats, or "
                       "for float32 pairs the numerical-rank tolerance σ₁·max(m, n)·ε); dotted: adapter rank; "
                       "squares: exact singular values of scale·B·A when the adapter was given.",
                       lambda: plots.plot_spectra(diff)),
        ]
    return specs


def render_figures(data: RunData) -> list[tuple[FigureSpec, bytes]]:
    """Draw every figure of the report and encode it as PNG bytes."""
    return [(spec, plots.figure_png(spec.draw(), spec.exact_colours)) for spec in figure_specs(data)]


# --- HTML helpers ----------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float:
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    x = _num(value)
    if not math.isfinite(x):
        return "—"
    if round(x, digits) == 0:
        x = 0.0                                 # no "-0.000"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _fmt_ci(ci: Any, digits: int = 3, signed: bool = False) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return "—"
    if not all(math.isfinite(_num(v)) for v in ci):
        return "—"
    return f"[{_fmt(ci[0], digits, signed)}, {_fmt(ci[1], digits, signed)}]"


def _pct(value: Any) -> str:
    x = _num(value)
    return "—" if not math.isfinite(x) else f"{100 * x:.1f} %"


class Cell:
    """A table cell: displayed text, optional numeric sort key and CSS class."""

    def __init__(self, text: Any, sort: Any = None, cls: str = "", raw_html: bool = False):
        self.text, self.sort, self.cls, self.raw_html = text, sort, cls, raw_html

    def render(self) -> str:
        attrs = f' class="{self.cls}"' if self.cls else ""
        if self.sort is not None and math.isfinite(_num(self.sort)):
            attrs += f' data-sort="{_num(self.sort):.6g}"'
        body = self.text if self.raw_html else _e(self.text)
        return f"<td{attrs}>{body}</td>"


def num_cell(value: Any, digits: int = 3, signed: bool = False) -> Cell:
    """A right-aligned number; the table script sorts on its text."""
    return Cell(_fmt(value, digits, signed), cls="num")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], sortable: bool = True,
          scroll: bool = False, row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; plain values are escaped, Cell objects keep their sort key and class."""
    head = "".join(f"<th scope=\"col\">{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(c.render() if isinstance(c, Cell) else f"<td>{_e(c)}</td>" for c in row)
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    klass = ' class="sortable"' if sortable else ""
    out = f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    wrapper = "scroll" if scroll else "tablewrap"
    return f'<div class="{wrapper}">{out}</div>'


def _kv(pairs: Iterable[tuple[str, Any]]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in pairs)
    return f'<dl class="kv">{items}</dl>'


def _severity(sev: Any) -> Cell:
    s = str(sev or "info").lower()
    cls = s if s in ("error", "warning", "info") else "info"
    return Cell(f'<span class="sev {cls}">{_e(s)}</span>', raw_html=True,
                sort={"error": 0, "warning": 1, "info": 2}.get(s, 3))


def _findings_table(findings: Sequence[Mapping[str, Any]]) -> str:
    if not findings:
        return '<p class="muted">None.</p>'
    order = {"error": 0, "warning": 1, "info": 2}
    ordered = sorted(findings, key=lambda f: order.get(str(f.get("severity")).lower(), 3))
    return table(["severity", "code", "message"],
                 [[_severity(f.get("severity")), Cell(f"<code>{_e(f.get('code'))}</code>",
                                                      raw_html=True),
                  Cell(f.get("message"), cls="wrap")]
                  for f in ordered])


def _figure_html(spec: FigureSpec, png: bytes) -> str:
    width, height = struct.unpack(">II", png[16:24])
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (f'<figure id="fig-{_e(spec.filename[:-4])}"><img src="{uri}" alt="{_e(spec.alt)}" '
            f'width="{width}" height="{height}">'
            f"<figcaption>{_e(spec.caption)} <span class=\"muted\">(figures/{_e(spec.filename)})"
            f"</span></figcaption></figure>")


# --- sections --------------------------------------------------------------------------------

def _check(exceeded: bool) -> str:
    return '<span class="bad">✗ exceeded</span>' if exceeded else '<span class="ok">✓ within</span>'


def _banner_pair(data: RunData) -> str:
    diff = data.diff or {}
    verdict = str(diff.get("verdict", "unknown"))
    th = {**asdict(GateThresholds()), **(diff.get("thresholds") or {})}
    n = len(diff.get("heads", []))
    mdg = _num(diff.get("model_dgamma"))
    shifted, flips = diff.get("shifted_heads"), diff.get("regime_flips")
    rows = [
        ("model Δγ (paired 95 % CI)", f"{_fmt(mdg, 4, signed=True)} {_fmt_ci(diff.get('model_dgamma_ci'), 4, True)}",
         f"|Δγ| ≤ {_num(th['max_model_dgamma']):g}",
         _check(math.isfinite(mdg) and abs(mdg) > _num(th["max_model_dgamma"]))),
        ("shifted heads", f"{shifted} of {n} ({_pct(diff.get('shifted_fraction'))}){_shifted_range(diff, ', ')}",
         f"≤ {_pct(th['max_shifted_heads'])}",
         _check(_num(diff.get("shifted_fraction")) > _num(th["max_shifted_heads"]))),
        ("regime flips", f"{flips} of {n} ({_pct(diff.get('regime_flip_fraction'))})",
         f"≤ {_pct(th['max_regime_flips'])}",
         _check(_num(diff.get("regime_flip_fraction")) > _num(th["max_regime_flips"]))),
        ("mean JS divergence", _fmt(diff.get("js_mean"), 4), "not gated", ""),
    ]
    body = "".join(f"<tr><th scope=\"row\">{_e(a)}</th><td>{_e(b)}</td><td>{_e(c)}</td><td>{d}</td></tr>"
                   for a, b, c, d in rows)
    reasons = "".join(f"<li>{_e(r)}</li>" for r in diff.get("reasons") or [])
    if diff.get("borderline"):
        reasons += f"<li><strong>Borderline:</strong> {_e(BORDERLINE_NOTE)}</li>"
    cls = verdict if verdict in ("pass", "regression") else "single"
    title = verdict.upper() + (" (borderline)" if diff.get("borderline") else "")
    return (f'<section class="banner {cls}" id="verdict"><p class="verdict">{_e(title)}</p>'
            f'<div class="tablewrap"><table><thead><tr><th>measure</th><th>value</th><th>threshold</th><th></th></tr>'
            f"</thead><tbody>{body}</tbody></table></div><ul>{reasons}</ul></section>")


BORDERLINE_NOTE = ("read at the ends of the paired CIs (heads shifted beyond doubt or possibly shifted, "
                   "model |Δγ| at its CI's ends) the gate would decide the other way: more probes "
                   "(--num) narrow the CIs")


def _shifted_range(diff: Mapping[str, Any], sep: str) -> str:
    """"11–45 within the CIs" for a diff that says how firm its shifted count is (older ones don't)."""
    span = diff.get("shifted_heads_range")
    return f"{sep}{span[0]}–{span[1]} within the CIs" if span else ""


def _banner_single(data: RunData) -> str:
    p = data.primary.profile
    ml = p.get("model_level", {})
    counts = _regime_counts(p["heads"])
    pade = _num(ml.get("gamma_pade"))
    rows = [("model γ", f"{_fmt(ml.get('gamma'))} {_fmt_ci(ml.get('gamma_ci'))}"),
            ("power-law R²", _fmt(ml.get("r2"))),
            ("heads", f"{len(p['heads'])} ({p.get('model', {}).get('num_layers')} layers × "
                      f"{p.get('model', {}).get('num_heads')} heads)"),
            ("regimes", ", ".join(f"{k} {v}" for k, v in counts.items() if v))]
    if math.isfinite(pade):
        note = " — outside the closed-form's regime of validity" if ml.get("pade_flag") else ""
        rows.append(("γ_Padé (RoPE closed form)",
                     f"{pade:.3f}, relative error {_pct(ml.get('pade_relative_error'))}{note}"))
    body = "".join(f"<tr><th scope=\"row\">{_e(a)}</th><td>{_e(b)}</td></tr>" for a, b in rows)
    return (f'<section class="banner single" id="verdict"><p class="verdict">SINGLE-MODEL PROFILE</p>'
            f'<div class="tablewrap"><table><tbody>{body}</tbody></table></div>'
            f"<p class=\"muted\">No verdict: profile a base and a merged model "
            f"(<code>attnprof profile BASE vs MERGED</code>) to gate a fine-tune.</p></section>")


def _regime_counts(heads: Sequence[Mapping[str, Any]], key: str = "regime") -> dict[str, int]:
    counts = {r: 0 for r in REGIMES}
    for h in heads:
        label = h.get(key) if h.get(key) in REGIMES else "n/a"
        counts[label] = counts.get(label, 0) + 1
    return counts


def _model_level_table(data: RunData) -> str:
    rows = []
    for role, m in data.models.items():
        ml = m.profile.get("model_level", {})
        flag = ml.get("pade_flag")
        rows.append([role, m.name, num_cell(ml.get("gamma")), _fmt_ci(ml.get("gamma_ci")),
                     num_cell(ml.get("intercept")), num_cell(ml.get("r2")),
                     num_cell(ml.get("exp_r2")), num_cell(ml.get("gamma_pade")),
                     Cell(_pct(ml.get("pade_relative_error")), ml.get("pade_relative_error"), "num"),
                     "—" if flag is None else ("outside validity" if flag else "within")])
    return table(["role", "model", "γ", "γ CI", "intercept (ln)", "R²", "exp R²", "γ_Padé",
                  "|γ−γ_Padé|/γ_Padé", "closed form"], rows, sortable=False)


def _heads_table_single(profile: Mapping[str, Any]) -> str:
    rows = [[h["layer"], h["head"], num_cell(h.get("gamma")), _fmt_ci(h.get("gamma_ci")),
             num_cell(h.get("r2")), num_cell(h.get("exp_r2")), num_cell(h.get("sink_mass")),
             num_cell(h.get("local_mass")), num_cell(h.get("entropy")), h.get("regime")]
            for h in profile["heads"]]
    return table(["layer", "head", "γ", "γ CI", "R²", "exp R²", "sink mass", "local mass",
                  "entropy", "regime"], rows, scroll=len(rows) > 20)


def _heads_table_pair(diff: Mapping[str, Any]) -> str:
    heads = sorted(diff["heads"], key=lambda h: -abs(_num(h.get("dgamma")))
                   if math.isfinite(_num(h.get("dgamma"))) else math.inf)
    rows = [[h["layer"], h["head"], num_cell(h.get("gamma_base")), num_cell(h.get("gamma_merged")),
             num_cell(h.get("dgamma"), 4, signed=True), _fmt_ci(h.get("dgamma_ci"), 4, signed=True),
             num_cell(h.get("js"), 4), num_cell(h.get("dsink"), signed=True),
             Cell("yes" if h.get("shifted") else "no", 1 if h.get("shifted") else 0),
             h.get("regime_base"), h.get("regime_merged")] for h in heads]
    classes = ["hl" if h.get("shifted") or h.get("regime_base") != h.get("regime_merged") else ""
               for h in heads]
    return table(["layer", "head", "γ base", "γ merged", "Δγ", "Δγ CI", "JS", "Δ sink", "shifted",
                  "regime base", "regime merged"], rows, scroll=len(rows) > 20, row_classes=classes)


def _regime_rules_table() -> str:
    return table(["label", "rule (first match wins)", "TAF name"],
                 [[r.label, r.rule, r.taf_name or "—"] for r in REGIME_RULES], sortable=False)


def _weights_section(weights: Mapping[str, Any], figures: str) -> str:
    tensors = sorted(weights.get("tensors") or [],
                     key=lambda t: -_num(t.get("rel_norm")) if math.isfinite(_num(t.get("rel_norm")))
                     else math.inf)
    rows, classes = [], []
    for t in tensors:
        layer, module = plots.split_tensor_name(str(t.get("name")))
        outside = bool(t.get("changed")) and t.get("in_targets") is False
        name = str(t.get("name"))
        short = name.removeprefix("model.").removesuffix(".weight")
        rows.append([Cell(f'<span title="{_e(name)}">{_e(short)}</span>', raw_html=True),
                     "—" if layer is None else layer, module,
                     "×".join(str(s) for s in t.get("shape") or []),
                     Cell(_sci(t.get("rel_norm")), t.get("rel_norm"), "num"),
                     Cell(_sci(t.get("fro_norm")), t.get("fro_norm"), "num"),
                     _rank_cell(t.get("rank90"), t.get("rank90_is_lower_bound")),
                     num_cell(t.get("stable_rank"), 1),
                     _rank_cell(t.get("signal_rank"), t.get("signal_rank_is_lower_bound")),
                     num_cell(t.get("adapter_rank"), 0), t.get("status"),
                     "yes" if t.get("changed") else "no",
                     {True: "yes", False: "no"}.get(t.get("in_targets"), "—")])
        classes.append("hl" if outside else "")
    summary = [(label, _plain(weights[key])) for key, label in WEIGHT_SUMMARY if key in weights]
    for key in ("missing", "extra"):
        if weights.get(key):
            summary.append((f"{key} tensors", _plain(weights[key])))
    out = [_kv(summary) if summary else "", figures, "<h3>Per-tensor table</h3>",
           '<p class="muted">Sorted by relative change; highlighted rows changed outside the '
           "adapter's target modules. rank90: singular values holding 90 % of ‖ΔW‖²; signal "
           "rank: singular values above the noise floor.</p>",
           table(["tensor", "layer", "module", "shape", "‖ΔW‖/‖W‖", "‖ΔW‖_F", "rank90",
                  "stable rank", "signal rank", "adapter rank", "status", "changed", "in targets"],
                 rows, scroll=len(rows) > 20, row_classes=classes),
           "<h3>Weight flags</h3>", _findings_table(weights.get("flags") or [])]
    return "".join(out)


def _sci(value: Any) -> str:
    x = _num(value)
    return "—" if not math.isfinite(x) else f"{x:.3g}"


def _rank_cell(value: Any, lower_bound: Any) -> Cell:
    """A rank, marked "≥" when only a lower bound is known (randomized SVD)."""
    if value is None:
        return Cell("—", cls="num")
    return Cell(f"≥ {value}" if lower_bound else str(value), value, "num")


def _evidence_html(evidence: Any) -> str:
    if not evidence:
        return ""
    if not isinstance(evidence, Mapping):
        return f"<pre>{_e(json.dumps(evidence, indent=2, ensure_ascii=False))}</pre>"
    parts, scalars = [], []
    for key, value in evidence.items():
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            cols = list(dict.fromkeys(k for v in value for k in v))
            parts.append(f"<h4>{_e(key)}</h4>" + table(cols, [[_plain(v.get(c)) for c in cols]
                                                             for v in value]))
        else:
            scalars.append((key, _plain(value)))
    return "<h3>Evidence</h3>" + (_kv(scalars) if scalars else "") + "".join(parts)


def _plain(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _adapter_section(adapter: Mapping[str, Any]) -> str:
    config = adapter.get("config") or {}
    check = adapter.get("check") or {}
    first = ["peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora",
             "task_type", "base_model_name_or_path"]
    keys = [k for k in first if k in config] + sorted(k for k in config if k not in first)
    out = ["<h3>Configuration</h3>", _kv((k, _plain(config[k])) for k in keys)]
    out += ["<h3>Check</h3>", _kv([("compatible with base", _plain(check.get("compatible"))),
                                  ("effective scale", _plain(check.get("scale"))),
                                  ("trainable parameters", _plain(check.get("trainable_params")))]),
            "<h3>Findings</h3>", _findings_table(check.get("findings") or []),
            _evidence_html(check.get("evidence"))]
    return "".join(out)


def _footer(data: RunData) -> str:
    p = data.primary.profile
    probes, fit = p.get("probes", {}), p.get("fit", {})
    versions = {**(p.get("versions") or {}), **(data.run.get("versions") or {})}
    command = data.run.get("command") or "—"
    repro = [("suite", probes.get("suite")), ("length T", probes.get("length")),
             ("num N", probes.get("num")), ("seed", probes.get("seed", data.run.get("seed"))),
             ("window W", probes.get("window")), ("estimator", probes.get("estimator")),
             ("capture", probes.get("capture", "streamed")),
             ("fit range", f"d ∈ [{fit.get('d_min')}, {fit.get('d_max')}]"),
             ("bootstrap", f"{fit.get('bootstrap')} resamples, CI level {fit.get('ci_level')}")]
    models = [(f"model ({role})", _model_line(m.profile.get("model", {}), m.name))
              for role, m in data.models.items()]
    if probes.get("fingerprint"):
        repro.append(("probe fingerprint", probes["fingerprint"]))
    files = data.run.get("files") or {}
    hashes = (table(["file", "sha256"], [[f, Cell(h, cls="hash")] for f, h in sorted(files.items())],
                    sortable=False) if files else '<p class="muted">run.json lists no files.</p>')
    return ("<footer id=\"repro\"><h2>Reproducibility</h2>"
            f"<h3>Command</h3><pre>{_e(command)}</pre>"
            f"<h3>Models and probes</h3>{_kv(models + [(k, _plain(v)) for k, v in repro])}"
            f"<h3>Versions</h3>{_kv((k, v) for k, v in sorted(versions.items()))}"
            f"<h3>Files</h3>{hashes}"
            "<p class=\"muted\">Closed-form γ_Padé: Marín 2026, “Predicting How Transformers "
            "Attend”, Part I, doi:10.5281/zenodo.19826343. Rendered by attnprof "
            f"{_e(__version__)} from the stored JSON/npz files only.</p></footer>")


def _model_line(model: Mapping[str, Any], name: str) -> str:
    """Name, source and the loading details that change numbers (dtype, quantisation)."""
    parts = [name, str(model.get("source") or "")]
    label = {"dtype": "loaded as"}             # the load dtype, which may differ from the checkpoint's
    parts += [f"{label.get(k, k)} {model[k]}" for k in ("architecture", "dtype", "quantization", "sliding_window")
              if model.get(k) not in (None, "")]
    return " — ".join(p for p in parts if p)


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


def build_html(data: RunData, figures: Sequence[tuple[FigureSpec, bytes]]) -> str:
    """The complete self-contained report page."""
    figs = {spec.filename: _figure_html(spec, png) for spec, png in figures}
    names = " vs ".join(m.name for m in data.models.values())
    sections: list[tuple[str, str, str]] = [
        ("decay", "Model-level decay", figs["decay.png"] + _model_level_table(data))]
    if data.kind == "single":
        p = data.primary.profile
        sections += [
            ("heads", "Per-head maps", figs["gamma_heatmap.png"] + figs["regime_map.png"]
             + "<h3>Regime rules</h3>" + _regime_rules_table()),
            ("table", "Heads", _heads_table_single(p)),
        ]
    else:
        diff = data.diff or {}
        sections += [
            ("heads", "Per-head maps", figs["gamma_maps.png"] + figs["regime_maps.png"]
             + "<h3>Regime rules</h3>" + _regime_rules_table()),
            ("moved", "Heads that moved most", figs["top_heads.png"]),
            ("transitions", "Regime transitions", figs["transitions.png"]),
            ("table", "Heads", '<p class="muted">Sorted by |Δγ|; highlighted: shifted or regime '
                               "changed. Click a column header to sort.</p>"
             + _heads_table_pair(diff)),
        ]
        if plots.weight_tensors(diff):
            weight_figs = figs.get("weight_norms.png", "") + figs.get("spectra.png", "")
            weights = {**(diff.get("weights_summary") or {}), "tensors": plots.weight_tensors(diff)}
            sections.append(("weights", "Weights", _weights_section(weights, weight_figs)))
        if diff.get("adapter"):
            sections.append(("adapter", "Adapter", _adapter_section(diff["adapter"])))
        sections.append(("flags", "Flags", _findings_table(diff.get("flags") or [])))
    toc = "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t, _ in sections)
    banner = _banner_pair(data) if data.kind == "pair" else _banner_single(data)
    kind = "base vs merged" if data.kind == "pair" else "single-model profile"
    body = (f"<header><h1>attnprof report</h1><p class=\"sub\">{_e(names)} — {_e(kind)}</p></header>"
            + banner + f'<nav class="toc">{toc}<a href="#repro">Reproducibility</a></nav>'
            + "".join(_section(a, t, b) for a, t, b in sections) + _footer(data))
    template = string.Template(_template("report.html"))
    return template.substitute(version=_e(__version__), title=_e(f"attnprof — {names}"),
                               css=_template("report.css"), script=_template("sortable.js"),
                               body=body)


def _template(name: str) -> str:
    return resources.files("profiler").joinpath("templates", name).read_text(encoding="utf-8")


# --- public entry points ---------------------------------------------------------------------

def render_report(run: str | Path | RunData) -> Path:
    """Re-render RUN_DIR/figures/*.png and RUN_DIR/index.html from the stored files (or from a
    run already loaded).

    Everything is drawn in memory first; the figures folder is then replaced whole and the page
    written atomically, so a failure leaves the previous report untouched. Returns index.html.
    """
    data = run if isinstance(run, RunData) else load_run(run)
    figures = render_figures(data)
    page = build_html(data, figures)
    with atomic_dir(data.run_dir / FIGURES_DIR) as tmp:
        for spec, png in figures:
            (tmp / spec.filename).write_bytes(png)
            os.chmod(tmp / spec.filename, _mode(0o666))
        os.chmod(tmp, _mode(0o777))
    index = data.run_dir / INDEX
    atomic_write_text(index, page)
    os.chmod(index, _mode(0o666))
    return index


def _mode(base: int) -> int:
    """`base` under the process umask (temporary files and folders are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def summary_markdown(run: str | Path | RunData) -> str:
    """A short markdown summary for CI logs: verdict, model Δγ, shifted heads, flips, weights."""
    data = run if isinstance(run, RunData) else load_run(run)
    if data.kind == "single":
        m = data.primary
        ml = m.profile.get("model_level", {})
        counts = _regime_counts(m.profile["heads"])
        lines = [f"## attnprof: single-model profile — {m.name}", "",
                 f"- model γ = {_fmt(ml.get('gamma'))} {_fmt_ci(ml.get('gamma_ci'))} "
                 f"(R² {_fmt(ml.get('r2'))})"]
        if math.isfinite(_num(ml.get("gamma_pade"))):
            lines.append(f"- γ_Padé = {_fmt(ml.get('gamma_pade'))} (relative error "
                         f"{_pct(ml.get('pade_relative_error'))}"
                         + (", outside the closed-form's regime of validity)" if ml.get("pade_flag")
                            else ")"))
        lines.append("- regimes: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        return "\n".join(lines) + "\n"
    diff = data.diff or {}
    th = {**asdict(GateThresholds()), **(diff.get("thresholds") or {})}
    n = len(diff.get("heads", []))
    verdict = str(diff.get("verdict", "unknown")).upper()
    names = " vs ".join(m.name for m in data.models.values())
    lines = [f"## attnprof: {verdict}{' (borderline)' if diff.get('borderline') else ''} — {names}", "",
             f"- model Δγ = {_fmt(diff.get('model_dgamma'), 4, signed=True)} "
             f"{_fmt_ci(diff.get('model_dgamma_ci'), 4, True)} (threshold |Δγ| ≤ {_num(th['max_model_dgamma']):g})",
             f"- shifted heads: {diff.get('shifted_heads')}/{n} ({_pct(diff.get('shifted_fraction'))}, "
             f"threshold ≤ {_pct(th['max_shifted_heads'])}){_shifted_range(diff, '; ')}",
             f"- regime flips: {diff.get('regime_flips')}/{n} ({_pct(diff.get('regime_flip_fraction'))}, "
             f"threshold ≤ {_pct(th['max_regime_flips'])})",
             f"- mean JS divergence: {_fmt(diff.get('js_mean'), 4)}",
             "- reasons: " + "; ".join(str(r) for r in diff.get("reasons") or ["—"])]
    if diff.get("borderline"):
        lines.append(f"- borderline: {BORDERLINE_NOTE}")
    tensors = [t for t in plots.weight_tensors(diff) if math.isfinite(_num(t.get("rel_norm")))]
    if tensors:
        tensors.sort(key=lambda t: -_num(t.get("rel_norm")))
        lines += ["", "Top weight changes:", "",
                  "| tensor | ‖ΔW‖/‖W‖ | rank90 | signal rank | status |",
                  "|---|---:|---:|---:|---|"]
        lines += [f"| `{t.get('name')}` | {_num(t.get('rel_norm')):.3g} | {t.get('rank90')} | "
                  f"{t.get('signal_rank')} | {t.get('status')} |" for t in tensors[:WEIGHT_TABLE_TOP]]
    adapter = diff.get("adapter") or {}
    for title, found in (("Flags", diff.get("flags")),
                         ("Adapter findings", (adapter.get("check") or {}).get("findings"))):
        if found:                   # as the page shows them: the run's flags, the adapter check's findings
            lines += ["", f"{title}:", ""]
            lines += [f"- **{f.get('severity')}** `{f.get('code')}`: {f.get('message')}" for f in found]
    return "\n".join(lines) + "\n"
