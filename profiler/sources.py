"""Where a model lives: turn what the user typed into a local source, without any network.

MODEL/BASE/MERGED may be a local HF directory, a `.gguf` file, a PEFT adapter directory, a hub id
that is already in the local Hugging Face cache, or the bundled demo model's short name.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import AttnprofError

DEMO_NAMES = ("smollm2-135m", "smollm2-135m-instruct")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location. `kind` is one of: dir, gguf, adapter, demo."""
    kind: str
    path: Path               # directory (dir, adapter, demo) or the .gguf file
    name: str                # short display name (used for the default run directory)
    spec: str                # what the user typed

    @property
    def config_dir(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path


def cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of a hub id, or None when it is not in the HF cache."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def resolve_source(spec: str | os.PathLike) -> ModelSource:
    """Resolve a model argument to a local source or raise AttnprofError with one clear line."""
    text = str(spec)
    path = Path(text).expanduser()
    if text.lower() in DEMO_NAMES:
        from .demo_model import demo_model_dir   # builds the cached safetensors copy on first use
        return ModelSource("demo", demo_model_dir(), "smollm2-135m", text)
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return ModelSource("gguf", path.resolve(), path.stem, text)
            if path.name == "adapter_config.json":
                return ModelSource("adapter", path.parent.resolve(), path.parent.name, text)
            raise AttnprofError(f"{text}: not a model directory, .gguf file or adapter directory")
        if (path / "adapter_config.json").is_file():
            return ModelSource("adapter", path.resolve(), path.resolve().name, text)
        if (path / "config.json").is_file():
            return ModelSource("dir", path.resolve(), path.resolve().name, text)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0].resolve(), ggufs[0].stem, text)
        raise AttnprofError(f"{text}: directory has no config.json (not a Hugging Face model directory)")
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        snap = cached_hub_snapshot(text)
        if snap is None:
            raise AttnprofError(f"{text}: not a local path and not in the local Hugging Face cache "
                                "(attnprof never downloads; run `huggingface-cli download` on a "
                                "connected machine first)")
        kind = "adapter" if (snap / "adapter_config.json").is_file() else "dir"
        return ModelSource(kind, snap, text.split("/")[-1], text)
    raise AttnprofError(f"{text}: no such file or directory")
