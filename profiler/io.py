"""Atomic output: a run directory is written into a temporary sibling and renamed into place,
so a failure never leaves a half-written run behind."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import AttnprofError

RUN_MARKER = "run.json"          # what makes a directory an attnprof run that a new run may replace
SWAP_ATTEMPTS = 5                # renames tried when another process swaps the same target


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks (run.json records one per data file)."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def changed_since_run(root: Path, recorded: dict[str, str]) -> list[str]:
    """The files of a run directory whose contents no longer match the hashes run.json recorded
    (files that are gone are not listed: whoever needs them says so)."""
    return [name for name, digest in sorted(recorded.items())
            if (root / name).is_file() and sha256(root / name) != digest]


def check_run_dir(target: str | os.PathLike) -> Path:
    """The absolute run directory for `--out`, refused (before any work) where writing it would
    destroy something that is not an earlier attnprof run: a file, a directory with other
    contents (a model, a home directory), the current directory or one above it."""
    path = Path(target).expanduser().absolute()
    path = path.parent.resolve() / path.name if path.name not in ("", ".", "..") else path.resolve()
    if path == Path(path.anchor) or Path.cwd().resolve().is_relative_to(path):
        raise AttnprofError(f"--out {target}: would replace the current directory or one above it; "
                            "name a new directory")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise AttnprofError(f"--out {target}: {parent} is a file, not a directory")
    if path.is_symlink() or path.is_file():
        raise AttnprofError(f"--out {target}: is a {'symbolic link' if path.is_symlink() else 'file'}; "
                            "name a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / RUN_MARKER).is_file():
        raise AttnprofError(f"--out {target}: exists and is not an attnprof run (no {RUN_MARKER}); "
                            "refusing to replace it: name a new directory or remove it")
    return path


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it replaces `target` whole. On
    any failure, the body's or the renames', the temporary directory goes and `target` stays."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        for attempt in range(SWAP_ATTEMPTS):
            if target.exists() and old is None:
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            try:
                os.replace(tmp, target)
                break
            except OSError as exc:
                # another process put its run in place between our two renames: it goes too,
                # the last run to finish wins, as if they had run one after the other
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == SWAP_ATTEMPTS - 1:
                    raise
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                    old = None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old, target)                # put the previous run back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a single file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
