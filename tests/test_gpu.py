"""GPU paths, run only where CUDA is present (CI has none; a GPU machine runs `make test-gpu`).

- the Triton kernels on hardware against the chunked torch reference (fp32, fp16, bf16; MHA,
  GQA, sliding window; lengths past one tile and up to 8K);
- the tail-window kernels on hardware (alone and beside the dense sums, with and without a
  logsumexp) against the torch tail statistics and the dense reference;
- cuDNN's and flash attention's logsumexp, which lets the dense kernels skip their first pass;
- layers reduced in batches (one launch for several layers, the default on CUDA) against the same
  layers reduced one by one, inside a bf16 model;
- a whole capture on the GPU (tail and dense) against the same model's capture on the CPU, whose
  paths are checked against eager attention weights in test_capture.py;
- a model split across devices (`device_map`): layers on two GPUs (the kernels launched on each
  layer's own GPU; needs two) or offloaded to the CPU give the same statistics as the whole model;
- bitsandbytes NF4 on CUDA: the layers are 4-bit with bf16 compute and the capture is finite;
- bitsandbytes LLM.int8 on CUDA: the layers are 8-bit and the capture stays near the fp32 one.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from profiler import capture as cap
from profiler.dense import dense_profile_reference, dense_profile_triton
from conftest import causal_logsumexp, int8_beside_full, random_qk, save_tiny, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,length,dim,window", [
    (4, 4, 300, 64, None),        # MHA, T not a multiple of any tile
    (9, 3, 2048, 64, None),       # SmolLM2's shape
    (8, 2, 1000, 128, 257),       # GQA, head dim 128, sliding window
    (9, 3, 8192, 64, None),       # long: several programs per distance block
])
def test_triton_kernel_matches_reference_on_gpu(dtype, heads, kv_heads, length, dim, window):
    query, key = (t.to("cuda", dtype) for t in random_qk(1, heads, kv_heads, length, dim))
    got = dense_profile_triton(query, key, dim ** -0.5, window)
    want = dense_profile_reference(query, key, dim ** -0.5, window)
    assert got.dtype == torch.float32 and got.shape == (1, heads, length)
    assert torch.equal(got.isnan(), want.isnan())
    seen = ~want.isnan()
    # both sum the same exact products in fp32; they differ in summation order and exp2 rounding
    torch.testing.assert_close(got[seen], want[seen], rtol=2e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,length,window", [
    (4, 4, 300, 37),              # MHA, W and T not multiples of any tile
    (9, 3, 2048, 256),            # SmolLM2's shape at the default window
    (9, 3, 8192, 256),
    (8, 2, 500, 1),               # W = 1, as the TAF protocol uses
])
@pytest.mark.parametrize("dense", [False, True], ids=["tail", "dense"])
@pytest.mark.parametrize("given_lse", [False, True], ids=["pass1", "lse"])
def test_layer_kernels_match_torch_on_gpu(dtype, heads, kv_heads, length, window, dense, given_lse):
    """A layer's statistics through the kernels (two launches, or one given the logsumexp) equal
    the torch tail path and the chunked dense reference."""
    query, key = (t.to("cuda", dtype) for t in random_qk(1, heads, kv_heads, length, 64))
    lse = causal_logsumexp(query, key, 0.125) if given_lse else None
    got = cap.layer_stats(query, key, 0.125, None, window, dense, logsumexp=lse)
    want = cap.tail_stats_torch(query, key, 0.125, None, window)
    if dense:
        want.A = dense_profile_reference(query, key, 0.125)
    for field in cap.STAT_FIELDS:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=2e-4, atol=1e-6,
                                   equal_nan=True, msg=field)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [256, 1000])
@pytest.mark.parametrize("given_lse", [False, True], ids=["pass1", "lse"])
def test_tail_kernels_take_the_last_rows_on_gpu(dtype, rows, given_lse):
    """The tail statistics from a query that holds only its last rows (as a layer batch keeps it)
    equal the torch tail path on the whole query (SmolLM2's shape, W = 256)."""
    from profiler.dense import profile_triton
    query, key = (t.to("cuda", dtype) for t in random_qk(1, 9, 3, 2048, 64))
    lse = causal_logsumexp(query, key, 0.125)[..., -rows:] if given_lse else None
    dense, got = profile_triton(query[:, :, -rows:], key, 0.125, dense=False, tail_window=256, logsumexp=lse)
    want = cap.tail_stats_torch(query, key, 0.125, None, 256)
    assert dense is None
    for field, value in zip(("A", "sink", "entropy"), got):
        torch.testing.assert_close(value, getattr(want, field), rtol=2e-4, atol=1e-6, msg=field)


@pytest.mark.parametrize("backend", cap.LSE_BACKENDS)
def test_fused_attention_logsumexp_on_gpu(backend):
    """The fused attention of the dense capture: its output is SDPA's, its logsumexp is the scores'
    log-normaliser, and the kernels given that logsumexp (pass 1 skipped) match the reference."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    query, key = (t.to("cuda", torch.bfloat16) for t in random_qk(1, 8, 2, 1000, 64))
    value = torch.randn_like(key)
    scale = 64 ** -0.5
    layer = SimpleNamespace(is_causal=True)
    fused = cap.attention_with_logsumexp(layer, query, key, value, None, 0.0, scale, {}, backends=(backend,))
    if fused is None:
        pytest.skip(f"PyTorch's {backend} attention does not run here")
    output, lse = fused
    keys, values = key.repeat_interleave(4, 1), value.repeat_interleave(4, 1)
    want = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale).transpose(1, 2)
    torch.testing.assert_close(output, want, rtol=2e-2, atol=2e-2)          # bf16 outputs
    torch.testing.assert_close(lse, causal_logsumexp(query, key, scale), rtol=1e-5, atol=1e-4)
    got = dense_profile_triton(query, key, scale, logsumexp=lse)
    reference = dense_profile_reference(query, key, scale)
    torch.testing.assert_close(got[~reference.isnan()], reference[~reference.isnan()], rtol=2e-4, atol=1e-5)
    # where it does not apply, the caller gets None and takes the SDPA path
    assert cap.attention_with_logsumexp(layer, query, key, value, None, 0.0, scale,
                                        {"sliding_window": 64}, backends=(backend,)) is None
    assert cap.attention_with_logsumexp(layer, query.float(), key.float(), value.float(),
                                        None, 0.0, scale, {}, backends=(backend,)) is None


def test_a_fused_attention_applies_on_sm80():
    """On an Ampere or newer GPU at least one fused attention must run, or every GPU capture would
    silently take the two-launch path (the test above skips a backend that does not run)."""
    from types import SimpleNamespace
    if cap._capability(torch.device("cuda", torch.cuda.current_device())) < (8, 0):
        pytest.skip("fused attention needs sm_80 or newer")
    query, key = (t.to("cuda", torch.bfloat16) for t in random_qk(1, 8, 2, 256, 64))
    assert cap.attention_with_logsumexp(SimpleNamespace(is_causal=True), query, key, torch.randn_like(key),
                                        None, 0.0, 0.125, {}) is not None


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("estimator", ["tail", "dense"])
def test_fused_attention_inside_a_model_equals_sdpa(monkeypatch, estimator):
    """In a bf16 model (q, k, v as transformers hands them over: transposed views), the fused
    attention's output gives SDPA's logits, and its one-launch statistics equal the two-launch ones
    (layer 0 sees the same queries and keys either way)."""
    if cap._capability(torch.device("cuda", torch.cuda.current_device())) < (8, 0):
        pytest.skip("fused attention needs sm_80 or newer")
    cap.register()
    model = tiny_model("llama", num_key_value_heads=2).to("cuda", torch.bfloat16)
    model.set_attn_implementation(cap.ATTN_NAME)
    ids = torch.as_tensor(np.random.default_rng(9).integers(0, 300, size=(1, 300)), device="cuda")

    def run() -> tuple[torch.Tensor, cap.Recorder]:
        with cap.recording(cap.Recorder(estimator, 32, batch_layers=False)) as rec, torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits.float()
        return logits, rec.finish()

    calls = []
    real = cap.attention_with_logsumexp
    monkeypatch.setattr(cap, "attention_with_logsumexp", lambda *args: calls.append(real(*args)) or calls[-1])
    fused_logits, fused = run()
    assert len(calls) == 2 and all(call is not None for call in calls)
    monkeypatch.setattr(cap, "attention_with_logsumexp", lambda *args: None)
    sdpa_logits, two_launch = run()
    torch.testing.assert_close(fused_logits, sdpa_logits, rtol=2e-2, atol=2e-2)          # bf16 forward passes
    for field in cap.STAT_FIELDS:
        torch.testing.assert_close(getattr(fused.layers[0], field), getattr(two_launch.layers[0], field),
                                   rtol=2e-4, atol=1e-6, equal_nan=True, msg=field)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("estimator", ["tail", "dense"])
@pytest.mark.parametrize("rows", [300, 2048])
def test_layer_batches_on_gpu_equal_layers_one_by_one(monkeypatch, estimator, rows):
    """In a bf16 GQA model the default GPU capture reduces all its layers in one batch (a batched
    tail asks for no fused attention; a dense batch keeps each layer's logsumexp); every layer's
    statistics equal those of the layer-by-layer capture."""
    cap.register()
    model = tiny_model("llama", num_hidden_layers=4, num_key_value_heads=2,
                       max_position_embeddings=4096).to("cuda", torch.bfloat16)
    model.set_attn_implementation(cap.ATTN_NAME)
    ids = torch.as_tensor(np.random.default_rng(4).integers(0, 300, size=(1, rows)), device="cuda")

    def run(batch_layers: bool | None) -> cap.Recorder:
        with cap.recording(cap.Recorder(estimator, 64, batch_layers=batch_layers)) as rec, torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return rec.finish()

    batches, fused = [], []
    run_batch, with_lse = cap.LayerBatch.run, cap.attention_with_logsumexp
    monkeypatch.setattr(cap.LayerBatch, "run", lambda self, *a: batches.append(len(self.layers)) or run_batch(self, *a))
    monkeypatch.setattr(cap, "attention_with_logsumexp", lambda *a: fused.append(1) or with_lse(*a))
    batched = run(None)
    assert batches == [4] and len(fused) == (4 if estimator == "dense" else 0)
    if estimator == "tail":     # SDPA here too: a fused attention's last bits would move layers 1-3's inputs
        monkeypatch.setattr(cap, "attention_with_logsumexp", lambda *a: None)
    one_by_one = run(False)
    assert batches == [4]
    for idx in range(4):
        for field in cap.STAT_FIELDS:
            torch.testing.assert_close(getattr(batched.layers[idx], field), getattr(one_by_one.layers[idx], field),
                                       rtol=2e-4, atol=1e-6, equal_nan=True, msg=f"layer {idx} {field}")


def capture_on(model: torch.nn.Module, ids: np.ndarray, estimator: str) -> cap.Capture:
    cap.register()
    model.set_attn_implementation(cap.ATTN_NAME)
    return cap.capture(model, ids, window=16, estimator=estimator)


@pytest.mark.parametrize("estimator", ["tail", "dense"])
def test_capture_on_gpu_equals_capture_on_cpu(estimator):
    ids = np.random.default_rng(5).integers(0, 300, size=(2, 160))
    model = tiny_model("llama", num_key_value_heads=2)
    on_cpu = capture_on(model, ids, estimator)
    on_gpu = capture_on(model.to("cuda"), ids, estimator)
    for field in cap.STAT_FIELDS:
        np.testing.assert_allclose(getattr(on_gpu, field), getattr(on_cpu, field), rtol=1e-4, atol=1e-5,
                                   err_msg=field)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind,extra", [("llama", {}), ("mistral", {"sliding_window": 24})])
def test_half_precision_model_dense_kernel_equals_reference(monkeypatch, dtype, kind, extra):
    """A bf16/fp16 model on the GPU, end to end: the dense capture through the Triton kernels equals
    the same capture through the chunked torch reference (same forward, same q/k), sliding window
    included; beyond the window the profile is exactly 0."""
    import profiler.dense as dense
    ids = np.random.default_rng(8).integers(0, 300, size=(2, 200))
    model = tiny_model(kind, num_key_value_heads=2, **extra).to("cuda", dtype)
    flash_calls = []
    real_fused = cap.attention_with_logsumexp
    monkeypatch.setattr(cap, "attention_with_logsumexp",
                        lambda *args: flash_calls.append(real_fused(*args)) or flash_calls[-1])
    with_kernel = capture_on(model, ids, "dense")
    # without a window each layer's logsumexp comes from a fused attention; with one, from pass 1
    assert len(flash_calls) == 2 * 2             # 2 layers × 2 probes, one forward each
    assert all((f is None) == ("sliding_window" in extra) for f in flash_calls)
    monkeypatch.setattr(dense, "triton_available", lambda: False)
    with_reference = capture_on(model, ids, "dense")
    np.testing.assert_allclose(with_kernel.A, with_reference.A, rtol=2e-4, atol=1e-5)
    window = extra.get("sliding_window")
    if window:
        assert np.all(with_kernel.A[..., window:] == 0.0)


def split_capture(tmp_path, second, estimator: str) -> tuple[cap.Capture, cap.Capture]:
    """Capture with layer 0 on cuda:0 and layer 1 (with the norm and head) on `second`, and with
    the whole model on the CPU."""
    from profiler.load import load_model
    path = save_tiny(tmp_path / "tiny", num_key_value_heads=2)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
                  "model.layers.1": second, "model.norm": second, "lm_head": second}
    cap.register()
    split = load_model(str(path), attn_implementation=cap.ATTN_NAME, device="cuda", dtype="float32",
                       device_map=device_map).model
    whole = load_model(str(path), attn_implementation=cap.ATTN_NAME, device="cpu", dtype="float32").model
    ids = np.random.default_rng(6).integers(0, 300, size=(2, 128))
    return (cap.capture(split, ids, window=16, estimator=estimator),
            cap.capture(whole, ids, window=16, estimator=estimator))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("estimator", ["tail", "dense"])
def test_model_split_across_two_gpus(tmp_path, estimator):
    """Layer 1 runs on cuda:1 while cuda:0 is current: the kernels must launch on cuda:1."""
    got, want = split_capture(tmp_path, 1, estimator)
    np.testing.assert_allclose(got.A, want.A, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("estimator", ["tail", "dense"])
def test_model_with_cpu_offloaded_layers(tmp_path, estimator):
    """"cpu" in a device map is accelerate's CPU offload: layer 1's weights stay on the host and are
    brought to cuda:0 by accelerate's hooks for each forward pass."""
    got, want = split_capture(tmp_path, "cpu", estimator)
    np.testing.assert_allclose(got.A, want.A, rtol=1e-4, atol=1e-5)


def test_4bit_nf4_on_cuda(tmp_path):
    """QLoRA's recipe on hardware: NF4 weights, double quantisation, bf16 compute."""
    bnb = pytest.importorskip("bitsandbytes")
    from profiler.load import load_model
    path = save_tiny(tmp_path / "tiny", num_key_value_heads=2)
    cap.register()
    loaded = load_model(str(path), attn_implementation=cap.ATTN_NAME, device="cuda", load_in_4bit=True)
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert all(m.compute_dtype == torch.bfloat16 for m in layers)
    assert loaded.info.quantization == "nf4"
    ids = np.random.default_rng(7).integers(0, 300, size=(2, 128))
    curves = cap.capture(loaded.model, ids, window=16)
    assert np.isfinite(curves.A).all() and curves.A.shape[:3] == (2, 2, 4)


def test_8bit_on_cuda(tmp_path):
    """`--load-in-8bit` on hardware: LLM.int8 layers (int8 weights, CUDA matmuls), whose capture
    stays near the same model's fp32 capture on the GPU (as on the CPU in test_cli.py)."""
    pytest.importorskip("bitsandbytes")
    path = save_tiny(tmp_path / "tiny", num_key_value_heads=2)
    int8, full, layers = int8_beside_full(path, "cuda")
    assert len(layers) == 2 * 7
    assert all(m.weight.dtype == torch.int8 and m.weight.device.type == "cuda" for m in layers)
    error = np.abs(int8 - full).max()
    assert 0 < error < 0.05 * np.abs(full).max(), error
