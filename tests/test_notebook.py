"""The exploration notebook runs clean end to end on the real demo model.

Executes notebooks/explore.ipynb with nbclient in a kernel that is pinned to this interpreter
(a kernel spec written into a temporary folder: a `python3` spec elsewhere on the machine, or a
`python` on PATH outside the venv, cannot hijack it), with ATTNPROF_NOTEBOOK_DIR pointing at a
temporary folder so nothing is written outside it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"
MIN_FIGURES = 6            # decay, gamma maps, regime maps, transitions, top heads, live regime map


def _kernel_manager(spec_root: Path):
    """A KernelManager whose `python3` kernel is `sys.executable -m ipykernel_launcher`."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = spec_root / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (attnprof test)", "language": "python",
        "metadata": {"debugger": False}}))
    ksm = KernelSpecManager(kernel_dirs=[str(spec_root)], ensure_native_kernel=False)
    km = KernelManager(kernel_name="python3", kernel_spec_manager=ksm)
    assert km.kernel_spec.argv[0] == sys.executable
    return km


def _outputs(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def test_stored_notebook_has_no_outputs():
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "store the notebook without outputs"


@pytest.mark.slow
def test_notebook_runs_clean(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "work"
    monkeypatch.setenv("ATTNPROF_NOTEBOOK_DIR", str(workdir))
    client = NotebookClient(nb, km=_kernel_manager(tmp_path / "kernels"), timeout=600,
                            kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - started
    print(f"notebook executed in {elapsed:.1f} s")

    outputs = _outputs(nb)
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, "\n".join(f"{e.ename}: {e.evalue}" for e in errors)
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, "unexpected stderr in the notebook:\n" + "\n".join(stderr)

    html = "\n".join(o.data["text/html"] for o in outputs
                     if o.output_type in ("execute_result", "display_data") and "text/html" in o.get("data", {}))
    assert "<strong>Profile</strong>" in html, "the loaded Profile's HTML repr is missing"
    assert "<strong>ProfileDiff</strong>" in html, "the loaded ProfileDiff's HTML repr is missing"
    assert "regression" in html, "the sharpening adapter should fail the gate"

    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= MIN_FIGURES, f"expected at least {MIN_FIGURES} figures, got {len(images)}"

    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "blocked by the gate" in text and "attention profile regression" in text
    assert "base vs live profile of the same model: pass" in text

    # the run the notebook stored is a complete run directory under ATTNPROF_NOTEBOOK_DIR
    run_dir = workdir / "run"
    for name in ("run.json", "diff.json", "index.html", "base/profile.json", "merged/curves.npz"):
        assert (run_dir / name).is_file(), name
