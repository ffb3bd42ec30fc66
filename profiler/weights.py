"""Weight diff: stream two safetensors checkpoints tensor by tensor and describe ΔW.

For every tensor present in both checkpoints, ΔW = W_merged − W_base is formed in float32
(exact for bf16/fp16 inputs) one pair at a time, so memory is bounded by the largest tensor
pair, never by the model. 2-D weights get norms, their top singular values, rank for 90% of
the energy, stable rank and the *signal rank*: the number of singular values above the floor
that rounding to the stored float formats puts under every merged weight (see
`spectra.noise_floor`). With the adapter at hand, ΔW is also known exactly as scale·B·A; its
spectrum and the distance between the two tell whether the merge did what the adapter says.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch

from . import spectra
from .adapter_config import pattern_value
from .errors import AttnprofError
from .results import Result
from .rules import (LOW_RANK_MAX_FRACTION, MERGE_REL_ERROR_MIN, MERGE_RESIDUAL_NOISE_MAX,
                    RANK_WELL_ABOVE_ADAPTER)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHUNK_ELEMENTS = 1 << 19      # elements per block of the streaming pass (bounds temporaries)
MAX_RANK_PROBE = 256          # randomized SVD: largest k tried before a rank is reported as ">= k"
PREVIEW_NAMES = 3             # tensor names quoted in a flag message

UNCHANGED = "unchanged"
ROUNDING_ONLY = "rounding only"
BELOW_FLOOR = "below floor"
LOW_RANK = "low-rank"
HIGH_RANK = "high-rank"
CHANGED = "changed"                # tensors that are not 2-D float matrices
SHAPE_MISMATCH = "shape mismatch"
NON_FINITE = "non-finite"          # NaN or ±inf in either checkpoint
STATUSES = (UNCHANGED, ROUNDING_ONLY, BELOW_FLOOR, LOW_RANK, HIGH_RANK, CHANGED, SHAPE_MISMATCH, NON_FINITE)

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}

Progress = Union[Callable[[int, int, str], Any], bool, None]


# --- results ----------------------------------------------------------------------------------

@dataclass
class TensorDiff(Result):
    """ΔW of one tensor present in both checkpoints.

    status: "unchanged" (identical values), "rounding only" (the two agree once rounded to the
    coarser of their float formats), "below floor" (changed, but no singular value rises above
    the rounding floor: too small to resolve a rank), "low-rank" / "high-rank" (signal rank at
    most / above LOW_RANK_MAX_FRACTION of min(m, n)), "changed" (not a 2-D float
    matrix), "shape mismatch", "non-finite" (NaN or ±inf on the side(s) named in non_finite).
    """
    name: str
    shape: list[int]
    dtype_base: str
    dtype_merged: str
    status: str
    changed: bool                       # a real change: not "unchanged" and not "rounding only"
    in_targets: bool | None = None      # None when no target modules are known
    fro_norm: float | None = None       # ‖ΔW‖_F
    rel_norm: float | None = None       # ‖ΔW‖_F / ‖W_base‖_F
    rank90: int | None = None           # rank holding 90% of ‖ΔW‖_F² (Biderman et al. 2024)
    rank90_is_lower_bound: bool = False
    stable_rank: float | None = None    # ‖ΔW‖_F² / σ_1²
    signal_rank: int | None = None      # singular values above noise_floor
    signal_rank_is_lower_bound: bool = False
    noise_floor: float | None = None    # bound on the largest singular value of the rounding noise
    svd: str | None = None              # "exact" or "randomized"
    top_singular_values: list[float] = field(default_factory=list)
    adapter_rank: int | None = None
    adapter_scale: float | None = None
    adapter_singular_values: list[float] = field(default_factory=list)
    adapter_rel_error: float | None = None      # ‖ΔW − scale·B·A‖_F / ‖scale·B·A‖_F
    adapter_residual_noise: float | None = None  # ‖ΔW − scale·B·A‖_F / expected ‖rounding noise‖_F
    shape_merged: list[int] | None = None
    non_finite: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """Scalar fields plus the largest singular values, for one table row."""
        out = {k: v for k, v in self.to_dict().items() if not isinstance(v, list) or k == "shape"}
        out["shape"] = "×".join(str(d) for d in self.shape)
        out["sigma_1"] = self.top_singular_values[0] if self.top_singular_values else None
        out["adapter_sigma_1"] = (self.adapter_singular_values[0]
                                  if self.adapter_singular_values else None)
        return out


@dataclass
class WeightFlag(Result):
    """One finding of the weight diff: {code, severity: error|warning|info, message, tensors}."""
    code: str
    severity: str
    message: str
    tensors: list[str] = field(default_factory=list)


@dataclass
class WeightDiff(Result):
    """Base vs merged weights, one TensorDiff per tensor present in both, plus findings."""
    base: str
    merged: str
    adapter: str | None
    target_modules: list[str] | str | None
    adapter_rank: int | None
    num_tensors: int                 # present in both checkpoints
    num_changed: int
    num_rounding_only: int
    num_outside_targets: int         # changed although outside the target modules
    num_missing: int
    num_extra: int
    max_signal_rank: int | None
    max_rel_norm: float | None
    flags: list[WeightFlag]
    tensors: list[TensorDiff]
    missing: list[str]
    extra: list[str]

    def rows(self) -> list[dict[str, Any]]:
        return [t.row() for t in self.tensors]

    def __getitem__(self, name: str) -> TensorDiff:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def flag_codes(self) -> list[str]:
        return [f.code for f in self.flags]


# --- reading checkpoints ----------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is, read from the safetensors header."""
    file: Path
    shape: tuple[int, ...]
    dtype: str                       # safetensors name: BF16, F32, ...

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _SAFETENSORS_DTYPES.get(self.dtype)


def _open(file: Path):
    """safe_open with every failure turned into one line naming the file."""
    from safetensors import safe_open
    try:
        return safe_open(str(file), framework="pt")
    except FileNotFoundError:
        raise AttnprofError(f"{file}: no such file") from None
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AttnprofError(f"{file}: not a readable safetensors file ({reason})") from None


def _header(file: Path) -> dict[str, TensorInfo]:
    with _open(file) as handle:
        out = {}
        for name in handle.keys():
            part = handle.get_slice(name)
            out[name] = TensorInfo(file, tuple(int(d) for d in part.get_shape()), str(part.get_dtype()))
        return out


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files that hold a checkpoint's weights (shard index aware)."""
    if not path.exists():
        raise AttnprofError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _index_files(path)
        if path.suffix != ".safetensors":
            raise AttnprofError(f"{path}: not a safetensors file or checkpoint directory")
        return [path]
    if (path / INDEX_FILE).is_file():
        return _index_files(path / INDEX_FILE)
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(p for p in path.glob("*.safetensors") if p.name != ADAPTER_WEIGHTS)
    if not files:
        raise AttnprofError(f"{path}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); "
                            "only safetensors checkpoints can be diffed")
    return files


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({str(f) for f in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AttnprofError(f"{index}: not a valid safetensors shard index ({type(exc).__name__})") from None
    paths = [index.parent / f for f in files]
    for p in paths:
        if not p.is_file():
            raise AttnprofError(f"{p}: shard listed in {index.name} is missing")
    return paths


def checkpoint_catalogue(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint (directory, shard index or single file) with its header info.

    Only headers are read. Every shard is opened once here, so a corrupt or truncated file is
    reported before any work starts.
    """
    path = Path(path)
    catalogue: dict[str, TensorInfo] = {}
    for file in _weight_files(path):
        for name, info in _header(file).items():
            if name in catalogue:
                raise AttnprofError(f"{file}: tensor {name} is also stored in {catalogue[name].file.name}")
            catalogue[name] = info
    index = path if path.name.endswith(".index.json") else path / INDEX_FILE
    if index.is_file():
        for name, file in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items():
            if name not in catalogue or catalogue[name].file.name != Path(file).name:
                raise AttnprofError(f"{index.parent / file}: tensor {name} listed in {index.name} is not in it")
    return catalogue


def checkpoint_tensors(path: str | Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it (reads model.safetensors.index.json shards)."""
    return {name: info.file for name, info in checkpoint_catalogue(path).items()}


def _read(info: TensorInfo, name: str) -> torch.Tensor:
    """Read one tensor, opening its file just for it.

    safetensors hands out tensors backed by a memory map of the file; pages that were read
    stay resident for as long as the map is open. Opening per tensor ties the map's lifetime
    to the tensor's, so memory never accumulates across a shard.
    """
    with _open(info.file) as handle:
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AttnprofError(f"{info.file}: cannot read tensor {name} ({reason})") from None


# --- adapters ---------------------------------------------------------------------------------

@dataclass
class AdapterDelta:
    """The exact change one LoRA module makes to one stored weight: ΔW = scale · B @ A.

    B is (rows × r) and A is (r × cols) in the orientation of the stored weight (embedding and
    fan_in_fan_out adapters are transposed into it).
    """
    module: str
    weight: str
    B: torch.Tensor
    A: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self) -> torch.Tensor:
        """scale · B @ A as a float64 matrix (only for small checks: it is the full size of W)."""
        return self.scale * (self.B.to(torch.float64) @ self.A.to(torch.float64))

    def singular_values(self) -> np.ndarray:
        return spectra.lowrank_spectrum(self.B, self.A, self.scale)

    def transposed(self) -> "AdapterDelta":
        """The same change in the other orientation: (B A)ᵀ = Aᵀ Bᵀ."""
        return AdapterDelta(self.module, self.weight, self.A.T.contiguous(), self.B.T.contiguous(), self.scale)


@dataclass(frozen=True)
class _AdapterEntry:
    module: str
    key_a: str
    key_b: str
    embedding: bool


class _Adapter:
    """A PEFT LoRA adapter directory: its config and lazily loaded factors per module."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_file() and path.name == ADAPTER_CONFIG:
            path = path.parent
        self.path = path
        config_file, self.file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
        if not config_file.is_file():
            raise AttnprofError(f"{path}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
        if not self.file.is_file():
            raise AttnprofError(f"{path}: no {ADAPTER_WEIGHTS} (only safetensors adapters can be read)")
        try:
            self.config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AttnprofError(f"{config_file}: not valid JSON ({type(exc).__name__})") from None
        if not isinstance(self.config, dict):
            raise AttnprofError(f"{config_file}: expected a JSON object")
        self.peft_type = str(self.config.get("peft_type") or "LORA").upper()
        self.use_rslora = bool(self.config.get("use_rslora", False))
        self.use_dora = bool(self.config.get("use_dora", False))
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self.modules_to_save = list(self.config.get("modules_to_save") or [])
        self.bias = str(self.config.get("bias") or "none")
        self.lora_bias = bool(self.config.get("lora_bias", False))
        self.entries, self.unsupported = self._scan(_header(self.file))

    @property
    def is_lora(self) -> bool:
        return self.peft_type == "LORA"

    def _scan(self, header: dict[str, TensorInfo]) -> tuple[dict[str, _AdapterEntry], list[str]]:
        parts: dict[str, dict[str, str]] = {}
        for key, info in header.items():
            stripped = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            if ".lora_" not in stripped:
                continue
            module, rest = stripped.split(".lora_", 1)
            kind, *tail = rest.split(".")
            if kind not in ("A", "B", "embedding_A", "embedding_B") or "bias" in tail:
                continue
            parts.setdefault(module, {})[kind] = key
        entries, unsupported = {}, []
        for module, found in sorted(parts.items()):
            embedding = "embedding_A" in found
            key_a = found.get("embedding_A" if embedding else "A")
            key_b = found.get("embedding_B" if embedding else "B")
            if key_a is None or key_b is None:
                raise AttnprofError(f"{self.file}: module {module} has only one of its two LoRA factors")
            if len(header[key_a].shape) != 2 or len(header[key_b].shape) != 2:
                unsupported.append(module)
                continue
            entries[module + ".weight"] = _AdapterEntry(module, key_a, key_b, embedding)
        return entries, unsupported

    def delta(self, weight: str, handle: Any = None, shape: tuple[int, ...] | None = None) -> AdapterDelta:
        """Read the factors of one module and put them in the stored weight's orientation: the
        one that gives the stored `shape` when it tells (a rectangular weight), else what the
        config says. The config's fan_in_fan_out is one flag for all modules, but peft sets it
        per module (True for GPT-2's Conv1D, False for nn.Linear) and saves the last it set."""
        entry = self.entries[weight]
        if handle is None:
            with _open(self.file) as own:
                return self.delta(weight, own, shape)
        a = handle.get_tensor(entry.key_a).to(torch.float64)
        b = handle.get_tensor(entry.key_b).to(torch.float64)
        if a.shape[0] != b.shape[1]:
            raise AttnprofError(f"{self.file}: LoRA factors of {entry.module} do not chain "
                                f"(A {tuple(a.shape)}, B {tuple(b.shape)})")
        rank = int(a.shape[0])
        alpha = float(pattern_value(self.config.get("alpha_pattern"), entry.module,
                                    self.config.get("lora_alpha", rank)))
        scale = spectra.lora_scale(alpha, rank, self.use_rslora)
        delta = AdapterDelta(entry.module, weight, b, a, scale)
        flipped = delta.transposed()                      # ΔW_stored = (B A)ᵀ = Aᵀ Bᵀ
        if shape is not None and len(shape) == 2 and shape[0] != shape[1]:
            return flipped if flipped.shape == tuple(shape) else delta     # neither: the caller flags it
        return flipped if entry.embedding or self.fan_in_fan_out else delta


def adapter_deltas(adapter_dir: str | Path) -> dict[str, AdapterDelta]:
    """Every LoRA module of a PEFT adapter as exact factors, keyed by the weight it changes.

    Keys are base-model tensor names (`model.layers.0.self_attn.q_proj.weight`): the
    `base_model.model.` prefix PEFT adds is removed. scale = lora_alpha/r (alpha/√r with
    use_rslora), with alpha_pattern honoured; r is read from the factors themselves, which also
    honours rank_pattern.
    """
    adapter = _Adapter(adapter_dir)
    if not adapter.is_lora:
        raise AttnprofError(f"{adapter.path}: peft_type {adapter.peft_type} is not LoRA")
    with _open(adapter.file) as handle:
        return {w: adapter.delta(w, handle) for w in adapter.entries}


# --- target modules ---------------------------------------------------------------------------

def check_target_modules(checkpoint: str | Path, target_modules: Sequence[str] | str | None,
                         catalogue: dict[str, TensorInfo] | None = None) -> None:
    """Refuse target modules that name no weight of the checkpoint: a typo would mark every
    change as outside the targets."""
    if target_modules is None:
        return
    catalogue = catalogue if catalogue is not None else checkpoint_catalogue(checkpoint)
    # one matcher per entry (a string is one entry: a regex or "all-linear")
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    matchers = [(entry, _Targets(entry if isinstance(target_modules, str) else [entry], None)) for entry in entries]
    unmatched = [entry for entry, matches in matchers
                 if not any(matches(name, len(info.shape)) for name, info in catalogue.items())]
    if not unmatched:
        return
    leaves = sorted({_module_of(_module_of(n)[0])[1] for n in catalogue if n.endswith(".weight")})
    named = f"name no weight of {checkpoint} (its modules end in {', '.join(leaves[:12])})"
    if len(unmatched) == len(entries):
        raise AttnprofError(f"target modules {', '.join(unmatched)} {named}")
    # as in PEFT, a list may hold names for other architectures; but a typo should be seen
    warnings.warn(f"target modules {', '.join(unmatched)} {named}")


def _module_of(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _is_embedding_or_head(module: str) -> bool:
    leaf = module.rpartition(".")[2]
    return "embed" in leaf or leaf in ("lm_head", "wte", "wpe", "output")


class _Targets:
    """Which tensors the fine-tune was allowed to change (PEFT's target_modules semantics)."""

    def __init__(self, target_modules: Sequence[str] | str | None, adapter: _Adapter | None):
        self.explicit = target_modules
        self.adapter = adapter
        lora_modules = {e.module for e in adapter.entries.values()} if adapter else set()
        self.lora_modules = lora_modules
        self.known = target_modules is not None or (adapter is not None and bool(lora_modules))
        self.tied: dict[str, str] = {}     # input-embedding module -> the output head stored in it

    def _lora_target(self, module: str) -> bool:
        if module in self.tied and self._lora_target(self.tied[module]):
            return True
        t = self.explicit
        if t is None:
            return module in self.lora_modules
        if isinstance(t, str):
            if t == "all-linear":
                return not _is_embedding_or_head(module)
            return re.fullmatch(t, module) is not None
        return module in t or any(module.endswith("." + key) for key in t)

    def _saved_whole(self, module: str) -> bool:
        if self.adapter is None:
            return False
        return any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.adapter.modules_to_save)

    def saved_whole(self, name: str) -> bool:
        """Whether the adapter saves this tensor's whole module (modules_to_save): any rank goes."""
        return self._saved_whole(_module_of(name)[0])

    def __call__(self, name: str, ndim: int) -> bool | None:
        if not self.known:
            return None
        module, leaf = _module_of(name)
        if self._saved_whole(module):
            return True
        if leaf == "weight":
            if self.explicit == "all-linear":
                return ndim == 2 and self._lora_target(module)
            return self._lora_target(module)
        if leaf == "bias" and self.adapter is not None:
            if self.adapter.bias == "all":
                return True
            if self.adapter.bias == "lora_only" or self.adapter.lora_bias:
                return self._lora_target(module)
        return False


# --- one tensor pair --------------------------------------------------------------------------

@dataclass
class _Pass:
    """What one streaming pass over a tensor pair measured."""
    delta: torch.Tensor | None        # ΔW for 2-D pairs that differ (float32/float64)
    finite: bool
    nonzero: bool
    rounding_only: bool
    delta_energy: float
    base_energy: float
    noise_energy: float
    row_var: torch.Tensor | None
    col_var: torch.Tensor | None


def _blocks(rows: int, cols: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _stream_pair(wb: torch.Tensor, wm: torch.Tensor, fmt_b: torch.dtype, fmt_m: torch.dtype,
                 matrix: bool) -> _Pass:
    """One blockwise pass: ΔW, energies, the rounding-only test and the noise variance sums.

    The noise variance of ΔW's element (i, j) is the rounding variance of the base value in its
    format, of the merged value in its format, and of ΔW itself in the merged format (the merge
    formed scale·B·A in that precision before adding it).
    """
    work = torch.float64 if torch.float64 in (wb.dtype, wm.dtype) else torch.float32
    b2 = wb.reshape(wb.shape[0], -1) if matrix else wb.reshape(-1, 1)
    m2 = wm.reshape(b2.shape)
    rows, cols = b2.shape
    delta = torch.empty((rows, cols), dtype=work) if matrix else None
    coarse_b = spectra.precision_rank(fmt_b) <= spectra.precision_rank(fmt_m)
    coarser = fmt_b if coarse_b else fmt_m
    row_var = torch.zeros(rows, dtype=torch.float64) if matrix else None
    col_var = torch.zeros(cols, dtype=torch.float64) if matrix else None
    finite, nonzero = True, False
    rounding_only = fmt_b != fmt_m             # equal formats: any difference is a real change
    delta_energy = base_energy = noise_energy = 0.0
    for block in _blocks(rows, cols):
        b = b2[block].to(work)
        m = m2[block].to(work)
        d = torch.sub(m, b, out=delta[block]) if delta is not None else m - b
        nonzero = nonzero or bool(torch.count_nonzero(d))
        finite = finite and bool(torch.isfinite(d).all())
        delta_energy += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
        base_energy += float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2
        if rounding_only:
            fine = m if coarse_b else b
            other = b if coarse_b else m
            rounding_only = torch.equal(fine.to(coarser).to(work), other)
        var = spectra.rounding_variance(b, fmt_b)
        var += spectra.rounding_variance(m, fmt_m)
        var += spectra.rounding_variance(d, fmt_m)
        noise_energy += float(var.sum(dtype=torch.float64))
        if matrix:
            row_var[block] += var.sum(dim=1, dtype=torch.float64)
            col_var += var.sum(dim=0, dtype=torch.float64)
    return _Pass(delta, finite, nonzero, rounding_only and nonzero, delta_energy, base_energy,
                 noise_energy, row_var, col_var)


def _spectrum(delta: torch.Tensor, scan: _Pass, k: int) -> tuple[np.ndarray, bool, float]:
    """Singular values of ΔW, widening k (randomized path) until the floor is crossed."""
    shape = tuple(delta.shape)
    limit = min(shape)
    s, complete = spectra.singular_values(delta, min(k, limit))

    def floor_of(values: np.ndarray) -> float:
        top = float(values[0]) if values.size else 0.0
        return max(spectra.noise_floor(scan.row_var, scan.col_var),
                   spectra.numerical_floor(top, shape, delta.dtype))

    floor = floor_of(s)
    while not complete and s.size < min(limit, MAX_RANK_PROBE) and s[-1] > floor:
        s, complete = spectra.singular_values(delta, min(limit, MAX_RANK_PROBE, 4 * s.size))
        floor = floor_of(s)
    return s, complete, floor


def _matrix_summary(td: TensorDiff, scan: _Pass, k: int, top_k: int) -> None:
    """Fill the spectral fields of a changed 2-D TensorDiff."""
    delta = scan.delta
    s, complete, floor = _spectrum(delta, scan, k)
    td.svd = "exact" if complete else "randomized"
    td.noise_floor = floor
    td.top_singular_values = [float(x) for x in s[:top_k]]
    rank = spectra.signal_rank(s, floor)
    td.signal_rank = rank
    complete = complete or s.size == min(delta.shape)      # every singular value is known
    td.signal_rank_is_lower_bound = not complete and rank == s.size
    r90 = spectra.rank_for_energy(s, scan.delta_energy)
    td.rank90 = r90 if r90 is not None else (s.size if complete else s.size + 1)
    td.rank90_is_lower_bound = r90 is None and not complete
    td.stable_rank = spectra.stable_rank(s, scan.delta_energy)
    if rank == 0:
        td.status = BELOW_FLOOR
    elif not td.signal_rank_is_lower_bound and rank <= LOW_RANK_MAX_FRACTION * min(delta.shape):
        td.status = LOW_RANK
    else:
        td.status = HIGH_RANK


def _adapter_residual(ad: AdapterDelta, delta: torch.Tensor | None) -> float:
    """‖ΔW − scale·B·A‖_F (‖scale·B·A‖_F without a measured ΔW), block by block."""
    residual2 = 0.0
    for block in _blocks(*ad.shape):
        expected = ad.scale * (ad.B[block] @ ad.A)
        if delta is not None:
            expected = delta[block].to(torch.float64) - expected
        residual2 += float(torch.linalg.vector_norm(expected)) ** 2
    return math.sqrt(residual2)


def _compare_adapter(td: TensorDiff, scan: _Pass | None, ad: AdapterDelta, top_k: int) -> bool:
    """Put the exact adapter spectrum beside the measured one; False when the shapes disagree."""
    if td.status == SHAPE_MISMATCH or ad.shape != tuple(td.shape):
        return False
    sv = ad.singular_values()
    td.adapter_rank = ad.rank
    td.adapter_scale = ad.scale
    td.adapter_singular_values = [float(x) for x in sv[:top_k]]
    reference = float(np.sqrt(np.sum(sv ** 2)))
    delta = scan.delta if scan is not None else None
    residual = _adapter_residual(ad, delta)
    if delta is not None and ad.shape[0] == ad.shape[1]:     # a square weight: either orientation fits
        residual = min(residual, _adapter_residual(ad.transposed(), delta))
    td.adapter_rel_error = residual / reference if reference > 0 else (0.0 if residual == 0 else None)
    if scan is not None and scan.noise_energy > 0:
        td.adapter_residual_noise = residual / math.sqrt(scan.noise_energy)
    return True


def _diff_pair(name: str, ib: TensorInfo, im: TensorInfo,
               in_targets: bool | None, adapter_delta: AdapterDelta | None,
               adapter_rank: int | None, top_k: int) -> tuple[TensorDiff, bool]:
    """Diff one tensor pair; returns the TensorDiff and whether the adapter factors fit it."""
    td = TensorDiff(name=name, shape=list(ib.shape), dtype_base=_dtype_name(ib),
                    dtype_merged=_dtype_name(im), status=UNCHANGED, changed=False,
                    in_targets=in_targets)
    if ib.shape != im.shape:
        td.status, td.changed, td.shape_merged = SHAPE_MISMATCH, True, list(im.shape)
        return td, True
    wb, wm = _read(ib, name), _read(im, name)
    floats = ib.torch_dtype in spectra.FLOAT_FORMATS and im.torch_dtype in spectra.FLOAT_FORMATS
    matrix = floats and wb.ndim == 2
    scan = None
    if wb.dtype == wm.dtype and torch.equal(wb, wm):
        td.fro_norm, td.rel_norm = 0.0, 0.0
    elif not floats:
        td.status, td.changed = CHANGED, True    # not bit-identical; no arithmetic on quantised codes
    else:
        scan = _stream_pair(wb, wm, spectra.effective_dtype(wb), spectra.effective_dtype(wm), matrix)
        if not scan.finite:
            td.status, td.changed = NON_FINITE, True
            td.non_finite = [side for side, w in (("base", wb), ("merged", wm)) if not torch.isfinite(w).all()]
            return td, True
        del wb, wm
        td.fro_norm = math.sqrt(scan.delta_energy)
        td.rel_norm = td.fro_norm / math.sqrt(scan.base_energy) if scan.base_energy > 0 else None
        if scan.nonzero and scan.rounding_only:
            td.status = ROUNDING_ONLY
        elif scan.nonzero:
            td.status, td.changed = CHANGED, True
        if matrix and td.changed:
            rank = adapter_delta.rank if adapter_delta is not None else adapter_rank
            k = top_k
            if rank:    # resolve ranks past the "not a pure LoRA merge" threshold
                k = max(k, int(math.ceil(RANK_WELL_ABOVE_ADAPTER * rank)) + 2)
            _matrix_summary(td, scan, k, top_k)
            if adapter_delta is None and adapter_rank and in_targets is not False:
                td.adapter_rank = adapter_rank     # the rank it was told (--adapter-rank), for the plots
        elif matrix and td.status == ROUNDING_ONLY:
            td.noise_floor = spectra.noise_floor(scan.row_var, scan.col_var)
    if matrix and not td.changed:            # identical, or rounding by construction: no signal
        td.signal_rank, td.rank90, td.stable_rank = 0, 0, 0.0
    fits = True
    if adapter_delta is not None:
        fits = _compare_adapter(td, scan, adapter_delta, top_k)
    return td, fits


def _adapter_targets(adapter: _Adapter | None) -> list[str] | str | None:
    """The target modules an adapter's config names (what its merge was allowed to change)."""
    targets = adapter.config.get("target_modules") if adapter is not None else None
    return sorted(targets) if isinstance(targets, (list, tuple, set)) else targets


def _dtype_name(info: TensorInfo) -> str:
    dtype = info.torch_dtype
    return str(dtype).removeprefix("torch.") if dtype is not None else info.dtype


# --- flags ------------------------------------------------------------------------------------

def _preview(names: Sequence[str], detail: Callable[[str], str] | None = None) -> str:
    shown = [f"{n} ({detail(n)})" if detail else n for n in names[:PREVIEW_NAMES]]
    more = f" and {len(names) - PREVIEW_NAMES} more" if len(names) > PREVIEW_NAMES else ""
    return ", ".join(shown) + more


def _flags(tensors: list[TensorDiff], missing: list[str], extra: list[str], tied: list[str],
           adapter: _Adapter | None, adapter_missing: list[str], adapter_misfit: list[str],
           adapter_rank: int | None, targets_known: bool, saved_whole: set[str]) -> list[WeightFlag]:
    """All findings, one flag per code, each message 'what (count): first names'. `saved_whole`:
    tensors of modules the adapter saves whole (modules_to_save), where any rank is expected."""
    by_name = {t.name: t for t in tensors}
    flags: list[WeightFlag] = []

    def add(code: str, severity: str, what: str, names: Sequence[str],
            detail: Callable[[str], str] | None = None, noun: tuple[str, str] = ("tensor", "tensors")) -> None:
        if names:
            count = f"{len(names)} {noun[0] if len(names) == 1 else noun[1]}"
            flags.append(WeightFlag(code, severity, f"{what} ({count}): {_preview(names, detail)}", list(names)))

    def where(status: str) -> list[str]:
        return [t.name for t in tensors if t.status == status]

    matrices = ("matrix", "matrices")
    unmerged = any(".lora_" in n for n in extra)
    add("missing_tensors", "error", "in the base but missing from the merged checkpoint", missing)
    add("extra_tensors", "warning", "in the merged checkpoint but not in the base"
        + ("; LoRA factors among them: the adapter was saved but not merged" if unmerged else ""), extra)
    add("tied_embeddings", "info", "output head stored on one side only (tied to the input "
        "embeddings on the other), not compared", tied)
    add("non_finite", "error", "NaN or infinite values", where(NON_FINITE),
        lambda n: " and ".join(by_name[n].non_finite))
    add("shape_mismatch", "error", "shape changed, not compared", where(SHAPE_MISMATCH),
        lambda n: f"{_shape(by_name[n].shape)} → {_shape(by_name[n].shape_merged)}")
    retyped = [t.name for t in tensors if t.dtype_base != t.dtype_merged]
    add("dtype_change", "info", "stored in another dtype; rounding to the coarser format is not "
        "counted as a change", retyped, lambda n: f"{by_name[n].dtype_base} → {by_name[n].dtype_merged}")

    outside = [t.name for t in tensors if t.changed and t.in_targets is False]
    dense = sum(by_name[n].status == HIGH_RANK for n in outside) > len(outside) / 2
    add("changed_outside_targets", "warning", "changed beyond rounding outside the target modules"
        + ("; high-rank changes everywhere look like a merge into a de-quantised (QLoRA) base or a "
           "full fine-tune" if dense else ""), outside, lambda n: by_name[n].status)
    ranked = [t for t in tensors if t.signal_rank and t.in_targets is not False and t.name not in saved_whole]
    over = [t.name for t in ranked if (t.adapter_rank or adapter_rank)
            and t.signal_rank > RANK_WELL_ABOVE_ADAPTER * (t.adapter_rank or adapter_rank)]
    add("not_pure_lora", "warning", f"signal rank above {RANK_WELL_ABOVE_ADAPTER:g}× the adapter rank: "
        "not a pure LoRA merge", over, lambda n: _rank_text(by_name[n]), matrices)
    if adapter_rank is None and adapter is None:
        add("high_rank_change", "warning", f"signal rank above {LOW_RANK_MAX_FRACTION:g} of the smaller "
            "dimension, unlike a LoRA merge", [t.name for t in ranked if t.status == HIGH_RANK],
            lambda n: _rank_text(by_name[n]), matrices)
    add("below_floor", "info", "changed by less than the rounding floor of the stored formats: no "
        "rank can be resolved", where(BELOW_FLOOR), noun=matrices)
    flags.extend(_adapter_flags(tensors, adapter, adapter_missing, adapter_misfit, add))
    nonfloat = [t.name for t in tensors if t.dtype_base not in _FLOAT_NAMES or t.dtype_merged not in _FLOAT_NAMES]
    add("non_float_tensors", "info", "not floating point (e.g. quantised codes), compared for "
        "equality only", nonfloat)
    if not targets_known and any(t.changed for t in tensors):
        flags.append(WeightFlag("targets_unknown", "info", "no adapter or target modules given: changes "
                                "cannot be checked against the modules the fine-tune was meant to touch"))
    return flags


def _adapter_flags(tensors: list[TensorDiff], adapter: _Adapter | None, adapter_missing: list[str],
                   adapter_misfit: list[str], add: Callable[..., None]) -> list[WeightFlag]:
    """Findings about the adapter itself; list-valued ones go through `add`, the rest are returned."""
    unfaithful = [t for t in tensors if t.adapter_rel_error is not None
                  and t.adapter_rel_error > MERGE_REL_ERROR_MIN
                  and (t.adapter_residual_noise is None or t.adapter_residual_noise > MERGE_RESIDUAL_NOISE_MAX)]
    errors = {t.name: t.adapter_rel_error for t in unfaithful}
    add("merge_unfaithful", "warning", "ΔW differs from the adapter's scale·B·A by more than rounding "
        "(wrong scale, DoRA, another adapter, or not merged)", list(errors),
        lambda n: f"relative error {errors[n]:.3g}", ("matrix", "matrices"))
    add("adapter_weight_missing", "error", "adapter modules whose weight is not in both checkpoints",
        adapter_missing, noun=("module", "modules"))
    add("adapter_shape_mismatch", "error", "adapter modules whose factors do not fit their weight's shape",
        adapter_misfit, noun=("module", "modules"))
    if adapter is None:
        return []
    add("adapter_unsupported", "info", "adapter modules that are not 2-D (e.g. convolutions), no "
        "exact spectrum", adapter.unsupported, noun=("module", "modules"))
    out = []
    if not adapter.is_lora:
        out.append(WeightFlag("adapter_not_lora", "info",
                              f"peft_type {adapter.peft_type} is not LoRA: no exact adapter spectrum"))
    if adapter.use_dora:
        out.append(WeightFlag("dora_merge", "info", "the adapter uses DoRA: its merge rescales whole "
                              "columns, so ΔW is not scale·B·A and may read as full rank"))
    return out


_FLOAT_NAMES = {str(d).removeprefix("torch.") for d in spectra.FLOAT_FORMATS}


def _shape(shape: Sequence[int] | None) -> str:
    return "×".join(str(d) for d in shape or [])


def _rank_text(t: TensorDiff) -> str:
    bound = "≥" if t.signal_rank_is_lower_bound else ""
    adapter = f" vs r={t.adapter_rank}" if t.adapter_rank else ""
    return f"signal rank {bound}{t.signal_rank}{adapter}"


# --- the diff ---------------------------------------------------------------------------------

def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")


def _is_head(name: str) -> bool:
    return name == "lm_head.weight" or name.endswith(".lm_head.weight")


def _resolve(weight: str, names: set[str]) -> str | None:
    """The checkpoint name of an adapter's weight (exact, else a unique suffix match)."""
    if weight in names:
        return weight
    hits = [n for n in names if n.endswith("." + weight) or weight.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


def _progress_callback(progress: Progress, total: int) -> tuple[Callable[[int, int, str], Any], Callable[[], None]]:
    if progress is True:
        import sys

        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="diffing weights", unit="tensor", file=sys.stderr, leave=False)

        def advance(i: int, n: int, name: str) -> None:
            bar.update(1)
        return advance, bar.close
    if callable(progress):
        return progress, (lambda: None)
    return (lambda i, n, name: None), (lambda: None)


def diff_weights(base_dir: str | Path, merged_dir: str | Path, *, adapter_dir: str | Path | None = None,
                 target_modules: Sequence[str] | str | None = None, adapter_rank: int | None = None,
                 top_k: int = 32, progress: Progress = None) -> WeightDiff:
    """Stream BASE and MERGED tensor by tensor and describe ΔW = W_merged − W_base.

    base_dir / merged_dir: checkpoint directories (single model.safetensors or a shard index)
    or single .safetensors files. adapter_dir: the PEFT LoRA adapter that was merged; its
    modules become the target modules, its rank the expected rank, and each targeted matrix
    gets the exact adapter spectrum beside the measured one. target_modules: PEFT-style
    targets (list of module-name suffixes, a regex, or "all-linear") when no adapter is
    given, or to override it. adapter_rank: the LoRA rank r when no adapter is given.
    top_k: singular values kept per matrix. progress: callable(i, n, name) after each
    tensor, or True for a tqdm bar on stderr.
    """
    if adapter_rank is not None and adapter_rank < 1:
        raise AttnprofError(f"adapter rank {adapter_rank}: a LoRA rank is at least 1")
    base_cat = checkpoint_catalogue(base_dir)
    check_target_modules(base_dir, target_modules, base_cat)
    merged_cat = checkpoint_catalogue(merged_dir)
    adapter = _Adapter(adapter_dir) if adapter_dir is not None else None
    if adapter is not None and adapter_rank is None and adapter.is_lora and adapter.config.get("r"):
        adapter_rank = int(adapter.config["r"])
    targets = _Targets(target_modules, adapter)

    common = sorted(set(base_cat) & set(merged_cat), key=_natural_key)
    missing = sorted(set(base_cat) - set(merged_cat), key=_natural_key)
    extra = sorted(set(merged_cat) - set(base_cat), key=_natural_key)
    tied = [n for n in missing + extra if _is_head(n)]
    missing = [n for n in missing if n not in tied]
    extra = [n for n in extra if n not in tied]
    if not any(base_cat[n].shape == merged_cat[n].shape for n in common):
        raise AttnprofError(f"{base_dir} and {merged_dir} share no tensor of the same name and shape: "
                            "not the same architecture")

    # tied embeddings: the output head is stored only as the input embedding, on both sides
    heads_stored = any(_is_head(n) for n in base_cat) or any(_is_head(n) for n in merged_cat)
    embeddings = [n for n in common if n.endswith(".weight")
                  and _module_of(n)[0].rpartition(".")[2] in INPUT_EMBEDDINGS]
    tied_embedding = embeddings[0] if not heads_stored and len(embeddings) == 1 else None

    adapter_plan: dict[str, str] = {}          # checkpoint name -> adapter weight key
    adapter_missing: list[str] = []
    if adapter is not None and adapter.is_lora:
        names = set(common)
        for weight, entry in adapter.entries.items():
            found = _resolve(weight, names)
            if found is None and tied_embedding is not None and _is_head(weight):
                found = tied_embedding            # LoRA on a tied head changes the shared matrix
                targets.tied[_module_of(tied_embedding)[0]] = entry.module
            if found is None:
                adapter_missing.append(entry.module)
            else:
                adapter_plan[found] = weight
    if tied_embedding is not None and adapter is None and target_modules is not None:
        targets.tied[_module_of(tied_embedding)[0]] = "lm_head"

    saved_whole = {n for n in common if targets.saved_whole(n)}     # modules_to_save: no rank expected
    advance, close = _progress_callback(progress, len(common))
    tensors: list[TensorDiff] = []
    adapter_misfit: list[str] = []
    try:
        with ExitStack() as stack:
            adapter_handle = stack.enter_context(_open(adapter.file)) if adapter_plan else None
            for i, name in enumerate(common):
                ib, im = base_cat[name], merged_cat[name]
                ad = adapter.delta(adapter_plan[name], adapter_handle, ib.shape) if name in adapter_plan else None
                told = None if name in saved_whole else adapter_rank
                td, fits = _diff_pair(name, ib, im, targets(name, len(ib.shape)), ad, told, top_k)
                if not fits:
                    adapter_misfit.append(ad.module)
                tensors.append(td)
                advance(i + 1, len(common), name)
    finally:
        close()

    flags = _flags(tensors, missing, extra, tied, adapter, adapter_missing, adapter_misfit,
                   adapter_rank, targets.known, saved_whole)
    ranks = [t.signal_rank for t in tensors if t.signal_rank is not None]
    rels = [t.rel_norm for t in tensors if t.rel_norm is not None]
    return WeightDiff(
        base=str(base_dir), merged=str(merged_dir),
        adapter=str(adapter.path) if adapter is not None else None,
        target_modules=(list(target_modules) if isinstance(target_modules, (list, tuple, set)) else target_modules)
        if target_modules is not None else _adapter_targets(adapter),
        adapter_rank=adapter_rank,
        num_tensors=len(tensors),
        num_changed=sum(t.changed for t in tensors),
        num_rounding_only=sum(t.status == ROUNDING_ONLY for t in tensors),
        num_outside_targets=sum(t.changed and t.in_targets is False for t in tensors),
        num_missing=len(missing), num_extra=len(extra),
        max_signal_rank=max(ranks) if ranks else None,
        max_rel_norm=max(rels) if rels else None,
        flags=flags, tensors=tensors, missing=missing, extra=extra,
    )
