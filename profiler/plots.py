"""The report's figures, one function per figure, from plain stored data (dicts and arrays).

Every function returns a `matplotlib.figure.Figure` built without pyplot (no global state, Agg
canvas), so the same calls serve the HTML report and a Jupyter notebook. Inputs are the parsed
`profile.json` / `diff.json` dicts and the `A` arrays of `curves.npz` (N, L, H, D) or their
probe means (L, H, D).
"""
from __future__ import annotations

import functools
import io
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import matplotlib
import numpy as np
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from PIL import Image

from .rules import REGIMES

MAX_WIDTH_IN = 11.0          # 1100 px at DPI
DPI = 100
TOP_HEADS = 8                # small multiples in plot_top_shifted
TOP_SPECTRA = 6              # small multiples in plot_spectra

STYLE: dict[str, Any] = {
    "font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "xtick.labelsize": 9,
    "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 11.5,
    "axes.spines.top": False, "axes.spines.right": False, "savefig.dpi": DPI,
    "figure.dpi": DPI, "image.interpolation": "nearest",
}
MODEL_COLORS = {"base": "#1f5fa8", "merged": "#d9661f", "model": "#1f5fa8"}
FIT_COLORS = {"base": "#0a2c55", "merged": "#7a3000", "model": "#0a2c55"}
# base drawn wide underneath, merged narrow on top, fits in two dash patterns: when a fine-tune
# barely moves the curves, both stay visible
LINE_WIDTHS = {"base": 2.6, "merged": 1.0, "model": 1.3}
FIT_DASHES = {"base": "--", "merged": "-.", "model": "--"}
REGIME_COLORS = {
    "sink": "#6b3d1e", "local": "#f0a23b", "irregular": "#b7a6d6", "flat": "#cfcfcf",
    "long-range": "#2f6db5", "critical": "#2e9b57", "short-range": "#d2473a",
}
REGIME_ABBREV = {"sink": "S", "local": "L", "irregular": "I", "flat": "F", "long-range": "LR",
                 "critical": "C", "short-range": "SR"}
MISSING_COLOR = "#f2f2f2"
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+?)(?:\.weight)?$")

F = TypeVar("F", bound=Callable[..., Any])


def styled(func: F) -> F:
    """Run a plotting function under the report's rc style."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context(STYLE):
            return func(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure with constrained layout, at most MAX_WIDTH_IN wide."""
    return Figure(figsize=(min(width, MAX_WIDTH_IN), height), dpi=DPI, layout="constrained")


def figure_png(fig: Figure, exact_colours: bool = False) -> bytes:
    """Encode a figure as a compact, deterministic PNG.

    Agg at 100 dpi, then an adaptive 256-colour palette without dithering (this makes line plots
    about three times smaller) and optimised deflate. `exact_colours` keeps every colour where a
    colour scale carries data: cut down to 256 colours, heat-map cells moved along their scale
    (Δγ of +0.048 and +0.052 came out alike, a strong red turned brown). A figure with at most
    256 colours gets the palette either way, losslessly.
    """
    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    raw.seek(0)
    with Image.open(raw) as image:
        rgb = image.convert("RGB")
    if not exact_colours or rgb.getcolors(256) is not None:
        rgb = rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    rgb.save(out, format="png", optimize=True)
    return out.getvalue()


# --- data helpers ------------------------------------------------------------------------------

def _num(value: Any) -> float:
    """A stored float (None for NaN) as a float."""
    return math.nan if value is None else float(value)


def grid_shape(heads: Sequence[Mapping[str, Any]], model: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """(layers, heads) of a head list, from the model block when present."""
    model = model or {}
    L = max([h["layer"] + 1 for h in heads] + [int(model.get("num_layers") or 0)] + [1])
    H = max([h["head"] + 1 for h in heads] + [int(model.get("num_heads") or 0)] + [1])
    return L, H


def head_grid(heads: Sequence[Mapping[str, Any]], key: str, shape: tuple[int, int]) -> np.ndarray:
    """A (layers, heads) float array of one numeric head field; NaN where absent."""
    grid = np.full(shape, np.nan)
    for h in heads:
        grid[h["layer"], h["head"]] = _num(h.get(key))
    return grid


def mean_curves(A: np.ndarray) -> np.ndarray:
    """Probe-mean curves (L, H, D) from (N, L, H, D); (L, H, D) passes through."""
    A = np.asarray(A, dtype=np.float64)
    return A.mean(axis=0) if A.ndim == 4 else A


def split_tensor_name(name: str) -> tuple[int | None, str]:
    """(layer index, short module name) of a weight name like model.layers.3.self_attn.q_proj.weight."""
    m = _LAYER.search(name)
    if m is None:
        return None, re.sub(r"^model\.|\.weight$", "", name)
    return int(m.group(1)), m.group(2).split(".")[-1]


def _tick_positions(n: int, length_in: float) -> np.ndarray:
    """Tick positions 0..n-1 thinned so labels stay at least ~14 pt apart."""
    room = max(1, int(length_in * 72 / 14))
    step = max(1, math.ceil(n / room))
    return np.arange(0, n, step)


def _axes_size_in(ax: Axes) -> tuple[float, float]:
    """Approximate (width, height) of an axes in inches, before layout."""
    box = ax.get_position()
    w, h = ax.figure.get_size_inches()
    return box.width * w, box.height * h


def _heatmap_axes(ax: Axes, L: int, H: int, xlabel: str = "head", ylabel: str = "layer") -> None:
    width_in, height_in = _axes_size_in(ax)
    xt, yt = _tick_positions(H, width_in), _tick_positions(L, height_in)
    ax.set_xticks(xt, [str(i) for i in xt])
    ax.set_yticks(yt, [str(i) for i in yt])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)


def heatmap_panel_size(L: int, H: int) -> tuple[float, float]:
    """(width, height) in inches for one layer × head heatmap with its colour bar."""
    cell = min(0.45, max(0.16, 6.0 / max(L, H)))
    return H * cell + 1.8, min(9.0, max(2.4, L * cell + 1.3))


def _mark_cells(ax: Axes, cells: Iterable[tuple[int, int]], color: str = "black",
                lw: float = 1.4) -> None:
    """Outline cells; a white halo under the line keeps a black box visible on dark cells."""
    halo = [patheffects.withStroke(linewidth=lw + 1.6, foreground="white")]
    for layer, head in cells:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor=color,
                               linewidth=lw, path_effects=halo))


def _annotate_cells(ax: Axes, image: Any, grid: np.ndarray, fmt: str) -> None:
    """Write each finite value into its cell when the cells are large enough to hold it."""
    L, H = grid.shape
    width_in, height_in = _axes_size_in(ax)
    if min(width_in / H, height_in / L) < 0.38:
        return
    for (layer, head), value in np.ndenumerate(grid):
        if math.isfinite(value):
            r, g, b, _ = image.cmap(image.norm(value))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(head, layer, format(value, fmt), ha="center", va="center", fontsize=8.5,
                    color="white" if dark else "black")


# --- per-head maps ---------------------------------------------------------------------------

@styled
def plot_gamma_heatmap(profile_json: Mapping[str, Any], ax: Axes | None = None,
                       vmin: float | None = None, vmax: float | None = None,
                       title: str | None = None, colorbar: bool = True) -> Figure:
    """Layer × head heatmap of the per-head decay exponent gamma (grey: no value)."""
    heads = profile_json["heads"]
    L, H = grid_shape(heads, profile_json.get("model"))
    w, h = heatmap_panel_size(L, H)
    if ax is None:
        ax = new_figure(w, h).add_subplot()
    grid = head_grid(heads, "gamma", (L, H))
    finite = grid[np.isfinite(grid)]
    lo, hi = robust_limits(finite)
    vmin = lo if vmin is None else vmin
    vmax = max(hi if vmax is None else vmax, vmin + 1e-6)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=MISSING_COLOR)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    _heatmap_axes(ax, L, H)
    _annotate_cells(ax, im, grid, ".2f")
    name = profile_json.get("model", {}).get("name", "")
    ax.set_title(title if title is not None else f"γ per head — {name}".rstrip(" —"))
    if colorbar:
        below = bool(finite.size and finite.min() < vmin)
        above = bool(finite.size and finite.max() > vmax)
        extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get(
            (below, above), "neither")
        ax.figure.colorbar(im, ax=ax, label="γ (decay exponent)", shrink=0.9, extend=extend)
    return ax.figure


def robust_limits(values: np.ndarray, pct: float = 2.0) -> tuple[float, float]:
    """Colour limits from the 2nd–98th percentiles (outlier heads would flatten the scale),
    widened to include [0, 1] so flat and critical heads always read the same."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [pct, 100 - pct]) if values.size >= 20 else (values.min(), values.max())
    return min(float(lo), 0.0), max(float(hi), 1.0)


@styled
def plot_gamma_maps(base_json: Mapping[str, Any], merged_json: Mapping[str, Any],
                    diff_json: Mapping[str, Any]) -> Figure:
    """Base γ, merged γ (one shared colour scale) and Δγ side by side."""
    L, H = grid_shape(base_json["heads"], base_json.get("model"))
    w, h = heatmap_panel_size(L, H)
    fig = new_figure(3 * w, h)
    axes = fig.subplots(1, 3)
    grids = [head_grid(p["heads"], "gamma", (L, H)) for p in (base_json, merged_json)]
    vmin, vmax = robust_limits(np.concatenate([g.ravel() for g in grids]))
    plot_gamma_heatmap(base_json, ax=axes[0], vmin=vmin, vmax=vmax, title="γ base", colorbar=False)
    plot_gamma_heatmap(merged_json, ax=axes[1], vmin=vmin, vmax=vmax, title="γ merged")
    axes[1].set_ylabel("")
    plot_dgamma_heatmap(diff_json, ax=axes[2])
    axes[2].set_ylabel("")
    return fig


@styled
def plot_dgamma_heatmap(diff_json: Mapping[str, Any], ax: Axes | None = None) -> Figure:
    """Layer × head Δγ (merged − base), diverging colours centred at 0; boxes mark shifted heads."""
    heads = diff_json["heads"]
    L, H = grid_shape(heads)
    w, h = heatmap_panel_size(L, H)
    if ax is None:
        ax = new_figure(w, h).add_subplot()
    grid = head_grid(heads, "dgamma", (L, H))
    finite = np.abs(grid[np.isfinite(grid)])
    lim = max(0.05, float(finite.max()) if finite.size else 0.05)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad=MISSING_COLOR)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    _heatmap_axes(ax, L, H)
    _annotate_cells(ax, im, grid, "+.2f")
    shifted = [(x["layer"], x["head"]) for x in heads if x.get("shifted")]
    _mark_cells(ax, shifted, lw=1.6 if L * H <= 256 else 0.9)
    ax.set_title(f"Δγ merged − base (□ shifted: {len(shifted)})")
    ax.figure.colorbar(im, ax=ax, label="Δγ", shrink=0.9)
    return ax.figure


def _regime_codes(labels: Sequence[str | None]) -> list[int]:
    return [REGIMES.index(x) if x in REGIMES else len(REGIMES) for x in labels]


def _regime_cmap() -> tuple[ListedColormap, BoundaryNorm]:
    colors = [REGIME_COLORS.get(r, "#999999") for r in REGIMES] + [MISSING_COLOR]
    return ListedColormap(colors), BoundaryNorm(np.arange(len(colors) + 1) - 0.5, len(colors))


def _regime_panel(ax: Axes, heads: Sequence[Mapping[str, Any]], key: str, shape: tuple[int, int],
                  title: str) -> None:
    L, H = shape
    grid = np.full(shape, float(len(REGIMES)))
    for h in heads:
        grid[h["layer"], h["head"]] = _regime_codes([h.get(key)])[0]
    cmap, norm = _regime_cmap()
    ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
    _heatmap_axes(ax, L, H)
    width_in, height_in = _axes_size_in(ax)
    cell_in = min(width_in / H, height_in / L)
    if cell_in >= 0.3:
        for h in heads:
            label = h.get(key)
            if label in REGIME_ABBREV:
                dark = label in ("sink", "long-range", "critical", "short-range")
                ax.text(h["head"], h["layer"], REGIME_ABBREV[label], ha="center", va="center",
                        fontsize=8, color="white" if dark else "black")
    ax.set_title(title)


def _regime_legend(fig: Figure, present: set[str]) -> None:
    handles = [Patch(facecolor=REGIME_COLORS[r], edgecolor="#555555",
                     label=f"{r} ({REGIME_ABBREV[r]})") for r in REGIMES if r in present]
    if handles:
        fig.legend(handles=handles, loc="outside right upper", frameon=False, title="regime")


@styled
def plot_regime_map(profile_json: Mapping[str, Any]) -> Figure:
    """Layer × head map of regime labels (categorical colours, legend below)."""
    heads = profile_json["heads"]
    shape = grid_shape(heads, profile_json.get("model"))
    w, h = heatmap_panel_size(*shape)
    fig = new_figure(w + 1.2, h)
    name = profile_json.get("model", {}).get("name", "")
    _regime_panel(fig.add_subplot(), heads, "regime", shape,
                  f"regime per head — {name}".rstrip(" —"))
    _regime_legend(fig, {x.get("regime") for x in heads})
    return fig


@styled
def plot_regime_maps(diff_json: Mapping[str, Any]) -> Figure:
    """Base and merged regime maps side by side; boxes mark heads whose label changed."""
    heads = diff_json["heads"]
    shape = grid_shape(heads)
    w, h = heatmap_panel_size(*shape)
    fig = new_figure(2 * (w - 0.6) + 1.7, h)
    axes = fig.subplots(1, 2)
    _regime_panel(axes[0], heads, "regime_base", shape, "regime base")
    _regime_panel(axes[1], heads, "regime_merged", shape, "regime merged (□ changed)")
    axes[1].set_ylabel("")
    flips = [(x["layer"], x["head"]) for x in heads if x.get("regime_base") != x.get("regime_merged")]
    _mark_cells(axes[1], flips, lw=1.6 if len(heads) <= 256 else 0.9)
    _regime_legend(fig, {x.get("regime_base") for x in heads} | {x.get("regime_merged") for x in heads})
    return fig


# --- decay curves ----------------------------------------------------------------------------

def _power_line(ax: Axes, d0: float, d1: float, gamma: float, intercept: float, **kw: Any) -> None:
    if not (math.isfinite(gamma) and math.isfinite(intercept)):
        return
    d = np.geomspace(d0, d1, 50)
    ax.plot(d, np.exp(intercept) * d ** -gamma, **kw)


def tidy_log_y(ax: Axes, min_decades: float = 0.8) -> None:
    """Make a log y axis readable: at least `min_decades` tall; short ranges get 1-2-5 ticks
    labelled as plain numbers instead of sparse powers of ten."""
    lo, hi = ax.get_ylim()
    if not (lo > 0 and hi > lo):
        return
    span = math.log10(hi / lo)
    if span < min_decades:
        pad = (min_decades - span) / 2
        lo, hi = lo / 10 ** pad, hi * 10 ** pad
        ax.set_ylim(lo, hi)
        span = min_decades
    if span < 2.5:
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _fmt_ci(ci: Sequence[Any] | None) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _distances(distances: np.ndarray | None, size: int) -> np.ndarray:
    """The distance of each curve point: curves.npz's `distances`, else the index 0..D-1."""
    if distances is None:
        return np.arange(size, dtype=float)
    d = np.asarray(distances, dtype=float)
    if d.shape != (size,):
        raise ValueError(f"distances has shape {d.shape}, curves have {size} points")
    return d


def _line_style(n_points: int) -> dict[str, Any]:
    """Markers for sparse curves (e.g. the anchor estimator's 9 distances), plain lines otherwise."""
    return {"marker": "o", "markersize": 3.5} if n_points <= 40 else {}


@styled
def plot_model_decay(profiles: Mapping[str, tuple[Any, ...]]) -> Figure:
    """Model-mean A(d) on log-log axes with the fitted power law, probe spread and γ_Padé.

    `profiles` maps a role ("model", or "base" and "merged") to (profile.json, A) or
    (profile.json, A, distances), where A is curves.npz's (N, L, H, D) array and distances its
    optional `distances` (default: d is the index). With two profiles a lower panel shows
    merged / base.
    """
    roles = list(profiles)
    pair = len(roles) == 2
    fig = new_figure(9.0, 7.0 if pair else 5.4)
    if pair:
        ax, rax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax, rax = fig.add_subplot(), None
    means: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pade_drawn = False
    for i, role in enumerate(roles):
        pj, A, *rest = profiles[role]
        A = np.asarray(A, dtype=np.float64)
        per_probe = A.reshape(A.shape[0], -1, A.shape[-1]).mean(axis=1) if A.ndim == 4 else A[None]
        d = _distances(rest[0] if rest else None, per_probe.shape[-1])
        keep = d > 0
        d, per_probe = d[keep], per_probe[:, keep]
        mean = per_probe.mean(axis=0)
        means[role] = (d, mean)
        color = MODEL_COLORS.get(role, f"C{i}")
        name = pj.get("model", {}).get("name", role)
        ml = pj.get("model_level", {})
        if per_probe.shape[0] > 1:
            lo, hi = np.percentile(per_probe, [10, 90], axis=0)
            ax.fill_between(d, lo, hi, color=color, alpha=0.18, linewidth=0,
                            label=f"{role}: probe spread (10–90 %)")
        ax.plot(d, mean, color=color, linewidth=LINE_WIDTHS.get(role, 1.3), label=f"{role}: mean A(d) — {name}",
                **_line_style(d.size))
        fit = pj.get("fit", {})
        d0 = _num(fit.get("d_min", d[0] if d.size else 1))
        d1 = _num(fit.get("d_max", d[-1] if d.size else 2))
        gamma, icpt = _num(ml.get("gamma")), _num(ml.get("intercept"))
        _power_line(ax, d0, d1, gamma, icpt, color=FIT_COLORS.get(role, color), linestyle=FIT_DASHES.get(role, "--"),
                    linewidth=2, zorder=3,
                    label=f"{role}: fit γ = {gamma:.3f}{_fmt_ci(ml.get('gamma_ci'))}")
        pade = _num(ml.get("gamma_pade"))
        if not pade_drawn and math.isfinite(pade) and math.isfinite(gamma) and math.isfinite(icpt):
            anchor = icpt - gamma * math.log(d0) + pade * math.log(d0)
            _power_line(ax, d0, d1, pade, anchor, color="#444444", linestyle=":", linewidth=2,
                        label=f"γ_Padé = {pade:.3f} (closed form, RoPE)")
            pade_drawn = True
        if i == 0 and math.isfinite(d0) and math.isfinite(d1):
            ax.axvspan(d0, d1, color="#000000", alpha=0.04, linewidth=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    tidy_log_y(ax)
    ax.set_ylabel("A(d)  (mean attention weight)")
    ax.set_title("Model-level attention decay (mean over probes, layers, heads; shaded: fit range)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", frameon=False,
               ncols=2)
    if rax is not None:
        (db, base), (dm, merged) = means[roles[0]], means[roles[1]]
        common, ib, im = np.intersect1d(db, dm, return_indices=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = merged[im] / base[ib]
        rax.plot(common, ratio, color=MODEL_COLORS["merged"], linewidth=1.1,
                 **_line_style(common.size))
        rax.axhline(1.0, color="#444444", linewidth=0.8)
        rax.set_ylabel(f"{roles[1]} / {roles[0]}")
        rax.set_xlabel("distance d (tokens)")
    else:
        ax.set_xlabel("distance d (tokens)")
    return fig


def _top_heads(diff_json: Mapping[str, Any], k: int) -> tuple[list[Mapping[str, Any]], bool]:
    """The k heads with the largest |Δγ| among shifted ones, else among all (not significant)."""
    heads = [h for h in diff_json["heads"] if math.isfinite(_num(h.get("dgamma")))]
    shifted = [h for h in heads if h.get("shifted")]
    pool, significant = (shifted, True) if shifted else (heads, False)
    pool = sorted(pool, key=lambda h: -abs(_num(h["dgamma"])))
    return pool[: (k if significant else min(k, 4))], significant


@styled
def plot_top_shifted(diff_json: Mapping[str, Any], base_A: np.ndarray, merged_A: np.ndarray,
                     base_profile: Mapping[str, Any] | None = None,
                     merged_profile: Mapping[str, Any] | None = None, k: int = TOP_HEADS,
                     distances: np.ndarray | None = None) -> Figure:
    """Small multiples of base vs merged A(d) (log-log) for the heads that moved most.

    A arrays are (N, L, H, D) or probe means (L, H, D); `distances` is curves.npz's optional
    distance axis. With the profiles given, their per-head power-law fits are drawn.
    """
    top, significant = _top_heads(diff_json, k)
    base_m, merged_m = mean_curves(base_A), mean_curves(merged_A)
    d_all = _distances(distances, base_m.shape[-1])
    keep = d_all > 0
    n = max(1, len(top))
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(max(6.5, 2.75 * ncols), 2.6 * nrows + 0.9)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    fits = {}
    for role, pj in (("base", base_profile), ("merged", merged_profile)):
        if pj is not None:
            fits[role] = ({(h["layer"], h["head"]): h for h in pj["heads"]}, pj.get("fit", {}))
    handles: dict[str, Any] = {}
    for ax, h in zip(axes, top):
        layer, head = h["layer"], h["head"]
        for role, curves in (("base", base_m), ("merged", merged_m)):
            y = curves[layer, head][keep]
            handles[role] = ax.plot(d_all[keep], y, color=MODEL_COLORS[role], linewidth=0.75 * LINE_WIDTHS[role],
                                    alpha=0.85, **_line_style(y.size))[0]
            hf = fits[role][0].get((layer, head)) if role in fits else None
            if hf is not None:
                fit = fits[role][1]
                _power_line(ax, _num(fit.get("d_min", 1)), _num(fit.get("d_max", d_all[-1])),
                            _num(hf.get("gamma")), _num(hf.get("intercept")),
                            color=FIT_COLORS[role], linestyle=FIT_DASHES[role], linewidth=1.5, zorder=3)
                handles[f"{role} fit"] = ax.get_lines()[-1]
        ax.set_xscale("log")
        ax.set_yscale("log")
        tidy_log_y(ax)
        ci = h.get("dgamma_ci")
        # the CI on the second line: on one line the rightmost column's title ran off the figure
        ci_text = f"CI [{ci[0]:+.2f}, {ci[1]:+.2f}]  " if ci and None not in ci else ""
        ax.set_title(f"L{layer} H{head}  Δγ = {_num(h['dgamma']):+.3f}\n"
                     f"{ci_text}γ {_num(h.get('gamma_base')):.2f} → {_num(h.get('gamma_merged')):.2f}",
                     fontsize=9.5)
        ax.set_xlabel("distance d (tokens)", fontsize=9)
        ax.tick_params(labelsize=8.5)
    for ax in axes[len(top):]:
        ax.set_visible(False)
    if not top:
        axes[0].set_visible(True)
        axes[0].axis("off")
        axes[0].text(0.5, 0.5, "no head has a finite Δγ", ha="center", va="center")
    fig.supylabel("A(d)", fontsize=10)
    what = ("shifted heads, largest |Δγ|" if significant
            else "largest |Δγ| — not significant (no head shifted)")
    fig.suptitle(f"Heads that moved most: {what}")
    if handles:
        labels = {"base": "base A(d)", "merged": "merged A(d)", "base fit": "base power-law fit",
                  "merged fit": "merged power-law fit"}
        fig.legend(list(handles.values()), [labels[k] for k in handles], loc="outside lower center",
                   ncols=len(handles) if ncols > 2 else 2, frameon=False)
    return fig


@styled
def plot_transition_matrix(diff_json: Mapping[str, Any]) -> Figure:
    """Regime transition counts, base (rows) × merged (columns), annotated; diagonal boxed."""
    tr = diff_json["transitions"]
    labels = list(tr["labels"])
    counts = np.asarray(tr["counts"], dtype=float)
    n = len(labels)
    fig = new_figure(1.6 + 0.62 * n, 1.3 + 0.5 * n)
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues", norm=Normalize(0, max(1.0, counts.max())), aspect="auto")
    ax.set_xticks(range(n), labels, rotation=35, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("merged regime")
    ax.set_ylabel("base regime")
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)
    top = counts.max() if counts.size else 0
    for i in range(n):
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#888888", lw=0.8))
        for j in range(n):
            c = int(counts[i, j])
            if c:
                ax.text(j, i, str(c), ha="center", va="center", fontsize=9,
                        color="white" if c > 0.6 * top else "black")
    flips = int(counts.sum() - np.trace(counts))
    ax.set_title(f"Regime transitions ({flips} of {int(counts.sum())} heads changed label)")
    return fig


# --- weights ---------------------------------------------------------------------------------

def weight_tensors(diff_json: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The per-tensor entries of diff.json's weight diff (a list; empty when weights were skipped)."""
    weights = diff_json.get("weights")
    if isinstance(weights, Mapping):            # older layout: {"tensors": [...], ...}
        weights = weights.get("tensors")
    return list(weights or [])


def _weight_tensors(diff_json: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    tensors = weight_tensors(diff_json)
    if not tensors:
        raise ValueError("diff.json has no weight diff (weights is null or empty)")
    return tensors


def _module_order(modules: Iterable[str]) -> list[str]:
    canonical = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj",
                 "down_proj", "gate_up_proj"]
    seen = list(dict.fromkeys(modules))
    return [m for m in canonical if m in seen] + [m for m in seen if m not in canonical]


@styled
def plot_weight_norms(diff_json: Mapping[str, Any]) -> Figure:
    """Layer × module heatmap of ‖ΔW‖_F / ‖W‖_F (log colours); red boxes: changed outside targets.

    Only matrices are mapped (norm vectors and other 1-D tensors stay in the table); identical
    weights and rounding-only changes take the lightest, below-scale colour.
    """
    tensors = _weight_tensors(diff_json)
    matrices = [t for t in tensors if len(t.get("shape") or [0, 0]) == 2]
    tensors = matrices or tensors
    placed = [(split_tensor_name(t["name"]), t) for t in tensors]
    layered = [(lm, t) for lm, t in placed if lm[0] is not None]
    others = [(lm[1], t) for lm, t in placed if lm[0] is None]
    modules = _module_order(m for (_, m), _ in layered)
    L = max([layer for (layer, _), _ in layered], default=-1) + 1
    M = max(1, len(modules))
    grid = np.full((max(L, 1), M), np.nan)
    outside = []
    rounding = 0
    for (layer, module), t in layered:
        # rounding to another float format is no change: drawn below the scale, as identical weights
        counted = t.get("status") != "rounding only"
        rounding += not counted
        grid[layer, modules.index(module)] = _num(t.get("rel_norm")) if counted else 0.0
        if t.get("changed") and t.get("in_targets") is False:
            outside.append((layer, modules.index(module)))
    positive = grid[np.isfinite(grid) & (grid > 0)]
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = max(float(positive.min()) if positive.size else vmax / 10, vmax * 1e-4)
    if vmin >= vmax:
        vmin = vmax / 10
    grid[np.isfinite(grid) & (grid <= 0)] = vmin / 2
    width = max(5.0, 0.75 * M + 2.8)
    height = min(7.5, max(2.6, 0.16 * max(L, 1) + 1.6))
    fig = new_figure(width, height + (0.35 if others else 0))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["magma_r"].with_extremes(bad=MISSING_COLOR, under="#fff7ec")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=LogNorm(vmin, vmax), aspect="auto")
    ax.set_xticks(range(M), modules, rotation=30, ha="right")
    yt = _tick_positions(max(L, 1), _axes_size_in(ax)[1])
    ax.set_yticks(yt, [str(i) for i in yt])
    ax.set_ylabel("layer")
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)
    _mark_cells(ax, outside, color="#d62728", lw=1.8)
    if L * M <= 70:
        for (layer, module), t in layered:
            v = _num(t.get("rel_norm"))
            if math.isfinite(v):
                dark = v > 0 and math.log(max(v, vmin) / vmin) > 0.6 * math.log(vmax / vmin)
                ax.text(modules.index(module), layer, f"{v:.1e}", ha="center", va="center",
                        fontsize=7.5, color="white" if dark else "black")
    title = "Relative weight change ‖ΔW‖/‖W‖ per layer and module"
    if rounding:
        title += f"\n(palest: unchanged, or rounding only: {rounding} matrices)"
    if outside:
        title += f"\n(red boxes: {len(outside)} changed outside the adapter targets)"
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="‖ΔW‖_F / ‖W‖_F", shrink=0.9, extend="min")
    if others:
        text = ", ".join(f"{name} " + ("rounding only" if t.get("status") == "rounding only"
                                       else f"{_num(t.get('rel_norm')):.1e}") for name, t in others[:6])
        fig.supxlabel(f"not in the map (no layer index): {text}", fontsize=9)
    return fig


def _by_change(tensors: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Tensors sorted by relative change, largest first (undefined values last)."""
    def key(t: Mapping[str, Any]) -> float:
        v = _num(t.get("rel_norm"))
        return -v if math.isfinite(v) else math.inf
    return sorted(tensors, key=key)


@styled
def plot_spectra(diff_json: Mapping[str, Any], k: int = TOP_SPECTRA) -> Figure:
    """Singular values of ΔW for the most changed matrices, with noise floor and adapter rank.

    Only tensors marked as changed are shown; when none is, the largest relative changes.
    """
    tensors = [t for t in _weight_tensors(diff_json) if t.get("top_singular_values")]
    changed = [t for t in tensors if t.get("changed")]
    top = _by_change(changed or tensors)[:k]
    n = max(1, len(top))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(max(6.5, 3.6 * ncols), 2.7 * nrows + 1.0)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    handles: dict[str, Any] = {}
    for ax, t in zip(axes, top):
        sv = np.asarray([_num(v) for v in t["top_singular_values"]], dtype=float)
        idx = np.arange(1, sv.size + 1)
        handles["ΔW singular values"] = ax.plot(idx, sv, "o-", ms=3, lw=1.0, color="#1f5fa8")[0]
        shown = [sv]
        asv = t.get("adapter_singular_values")
        if asv:
            a = np.asarray([_num(v) for v in asv], dtype=float)
            shown.append(a)
            handles["adapter scale·B·A (exact)"] = ax.plot(
                np.arange(1, a.size + 1), a, "s", ms=6, mfc="none", color="#d9661f")[0]
        floor = _num(t.get("noise_floor"))
        if math.isfinite(floor) and floor > 0:
            shown.append(np.array([floor]))
            handles["noise floor"] = ax.axhline(floor, color="#777777", ls="--", lw=1.2)
        rank = t.get("adapter_rank")
        if rank:
            handles["adapter rank"] = ax.axvline(rank + 0.5, color="#d9661f", ls=":", lw=1.5)
        ax.set_yscale("log")
        values = np.concatenate(shown)
        values = values[np.isfinite(values) & (values > 0)]
        if values.size:
            lo, hi = float(values.min()), float(values.max())
            ax.set_ylim(lo / 2, hi * 2)
        tidy_log_y(ax)
        layer, module = split_tensor_name(t["name"])
        where = f"L{layer} {module}" if layer is not None else module
        ax.set_title(f"{where}  ‖ΔW‖/‖W‖ = {_num(t.get('rel_norm')):.2g}\n"
                     f"rank90 {t.get('rank90')} · signal rank {t.get('signal_rank')} · "
                     f"{t.get('status', '')}", fontsize=9.5)
        ax.set_xlabel("index", fontsize=9)
        ax.tick_params(labelsize=8.5)
    for ax in axes[len(top):]:
        ax.set_visible(False)
    fig.supylabel("singular value σ", fontsize=10)
    fig.suptitle("Singular-value spectra of ΔW, most changed matrices")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=len(handles) if ncols > 1 else 2, frameon=False)
    return fig
