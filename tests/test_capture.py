"""The streaming capture against eager attention weights (the oracle) and the hook fallback."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from profiler import capture as cap


def eager_oracle(model, input_ids: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """A_h(d) and sink mass from the full maps that eager attention returns with output_attentions."""
    model.set_attn_implementation("eager")
    out, sinks = [], []
    for row in input_ids:
        with torch.no_grad():
            att = model(input_ids=torch.as_tensor(row[None]), output_attentions=True).attentions
        length = row.shape[0]
        per_layer, sink = [], []
        for a in att:                                   # (1, H, T, T)
            tail = a[0, :, length - window:, :].double()
            prof = np.zeros((a.shape[1], length - window + 1))
            for r in range(window):
                i = length - window + r
                for d in range(length - window + 1):
                    prof[:, d] += tail[:, r, i - d].numpy()
            per_layer.append(prof / window)
            sink.append(tail[:, :, 0].mean(-1).numpy())
        out.append(per_layer)
        sinks.append(sink)
    return np.array(out), np.array(sinks)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_stream_and_hooks_equal_eager_weights(kv_heads):
    model = tiny_model(num_key_value_heads=kv_heads)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 300, size=(2, 96))
    window = 12
    oracle, oracle_sink = eager_oracle(model, ids, window)

    cap.register()
    model.set_attn_implementation(cap.ATTN_NAME)
    stream = cap.capture(model, ids, window=window)
    model.set_attn_implementation("eager")
    hooks = cap.capture(model, ids, window=window, path="hooks")

    assert stream.A.shape == (2, 2, 4, 96 - window + 1)
    assert np.abs(stream.A - oracle).max() <= 1e-5
    assert np.abs(hooks.A - oracle).max() <= 1e-5
    assert np.abs(stream.sink - hooks.sink).max() <= 1e-5
    assert np.abs(stream.entropy - hooks.entropy).max() <= 1e-5
    assert np.allclose(stream.sink, oracle_sink, atol=1e-5)
    assert np.allclose(stream.local, oracle[..., :3].sum(-1), atol=1e-5)


def test_sliding_window_mask_is_respected():
    model = tiny_model("mistral", sliding_window=16, num_key_value_heads=2)
    ids = np.random.default_rng(2).integers(0, 300, size=(1, 80))
    cap.register()
    model.set_attn_implementation(cap.ATTN_NAME)
    stream = cap.capture(model, ids, window=10)
    assert np.abs(stream.A[..., 16:]).max() == 0.0          # keys outside the window get nothing
    oracle, _ = eager_oracle(model, ids, 10)
    assert np.abs(stream.A - oracle).max() <= 1e-5


def test_uniform_attention_gives_a_flat_profile():
    """Equal logits: the tail window sees the same key range for every d, so A(d) is flat."""
    length, window = 256, 32
    q = torch.zeros(1, 3, length, 8)
    k = torch.randn(1, 3, length, 8)
    stats = cap.tail_stats(q, k, 1.0, None, window)
    A = stats.A[0].numpy()
    assert np.allclose(A, A[:, :1], rtol=1e-6)
    expected = np.mean(1.0 / (np.arange(length - window, length) + 1))
    assert np.allclose(A, expected, rtol=1e-5)
    assert np.allclose(stats.entropy.numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 3])
def test_expanded_heads_follow_grouped_query_attention(groups):
    """The fused attention's key/value heads (transformers' repeat_kv, which expands without a GPU
    wait): query head h reads kv head h // groups."""
    from transformers.integrations.sdpa_attention import repeat_kv
    key = torch.randn(2, 4, 5, 8)
    assert torch.equal(repeat_kv(key, groups), key.repeat_interleave(groups, dim=1))


def test_memory_is_bounded_per_head_block():
    """A long probe with many heads is processed in head blocks whose scores fit the budget."""
    length, window, heads = 4096, 256, 64
    q = torch.randn(1, heads, length, 16)
    k = torch.randn(1, 8, length, 16)
    stats = cap.tail_stats(q, k, 0.25, None, window)
    assert stats.A.shape == (1, heads, length - window + 1)
    groups = heads // 8
    kv_per_block = cap.HEAD_BLOCK_BYTES // (groups * window * length * 4)
    assert kv_per_block * groups < heads                      # several blocks were needed
    full = torch.softmax((q[:, :, -window:] @ k.repeat_interleave(8, 1).transpose(-1, -2) * 0.25)
                         .masked_fill(torch.ones(window, length, dtype=torch.bool)
                                      .tril(length - window).logical_not(), float("-inf")), -1)
    assert torch.allclose(stats.sink[0], full[0, :, :, 0].mean(-1), atol=1e-6)


@pytest.mark.parametrize("kind,extra", [("llama", {}), ("mistral", {"sliding_window": 24})])
def test_dense_capture_equals_eager_weights(kind, extra):
    """Dense estimator through the model: D(d) = mean_{i>=d} n_i·P[i, i-d], from eager maps."""
    model = tiny_model(kind, num_key_value_heads=2, **extra)
    ids = np.random.default_rng(3).integers(0, 300, size=(1, 64))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=torch.as_tensor(ids), output_attentions=True).attentions
    length = ids.shape[1]
    expected = np.zeros((len(att), att[0].shape[1], length))
    for l, a in enumerate(att):
        p = a[0].double().numpy()
        visible = (p > 0).sum(-1)                       # n_i per head and row
        for d in range(length):
            rows = np.arange(d, length)                 # every query that has a key d back
            expected[l, :, d] = (p[:, rows, rows - d] * visible[:, rows]).mean(-1)
    cap.register()
    model.set_attn_implementation(cap.ATTN_NAME)
    dense = cap.capture(model, ids, window=8, estimator="dense").A[0]
    window = extra.get("sliding_window", length)
    assert np.abs(dense[..., :window] - expected[..., :window]).max() <= 1e-4
    assert np.all(dense[..., window:] == 0.0)


def test_dense_capture_follows_a_chunked_attention_mask():
    """Llama 4's chunked attention (key j visible from i iff j ≤ i in the same 16-token chunk)
    reaches the layer as a mask, not a sliding window: the dense profile must count only
    visible pairs, D(d) = Σ n_i·P[i, i−d] / #{i : i−d visible}, and put 0 where none is."""
    chunk, length = 16, 60
    model = tiny_model("llama4", num_key_value_heads=2, attention_chunk_size=chunk, no_rope_layers=[1, 0])
    assert model.config.layer_types == ["chunked_attention", "full_attention"]
    ids = np.random.default_rng(4).integers(0, 300, size=(1, length))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=torch.as_tensor(ids), output_attentions=True).attentions
    cap.register()
    model.set_attn_implementation(cap.ATTN_NAME)
    dense = cap.capture(model, ids, window=8, estimator="dense").A[0]
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    for layer, visible in enumerate([(j <= i) & (i // chunk == j // chunk), j <= i]):
        p = att[layer][0].double().numpy()
        assert np.all(p[:, ~visible] == 0.0)                      # the rule above is the model's
        n = visible.sum(-1)
        expected = np.zeros((p.shape[0], length))
        for d in range(length):
            rows = np.arange(d, length)[visible[np.arange(d, length), np.arange(length - d)]]
            if len(rows):
                expected[:, d] = (p[:, rows, rows - d] * n[rows]).mean(-1)
        assert np.abs(dense[layer] - expected).max() <= 1e-5
    assert np.all(dense[0, :, chunk:] == 0.0) and np.all(dense[1, :, chunk:] > 0.0)


def test_dense_capture_hands_only_masks_beyond_the_band_to_the_reference(monkeypatch):
    """transformers gives sliding layers their causal band as a mask too; that one must not take
    the dense estimator off the kernels (on CUDA), while a chunked mask must reach the reference."""
    from profiler import dense
    seen = []
    real = dense.dense_profile

    def spy(*args, mask=None, **kwargs):
        seen.append(mask is not None)
        return real(*args, mask=mask, **kwargs)

    monkeypatch.setattr(dense, "dense_profile", spy)
    cap.register()
    ids = np.random.default_rng(6).integers(0, 300, size=(1, 48))
    for model, masked in ((tiny_model("mistral", sliding_window=16), [False, False]),
                          (tiny_model("llama4", attention_chunk_size=16, no_rope_layers=[1, 0]), [True, False])):
        seen.clear()
        model.set_attn_implementation(cap.ATTN_NAME)
        cap.capture(model, ids, window=8, estimator="dense")
        assert seen == masked
    i, j = torch.arange(40)[:, None], torch.arange(44)[None, :]
    band = ((j <= i) & (j > i - 9))[None, None].expand(2, 1, 40, 44)
    assert cap._is_band(band, 40, 9, rows=16) and not cap._is_band(band, 40, None, rows=16)
    additive = torch.zeros(band.shape, dtype=torch.bfloat16).masked_fill(~band, torch.finfo(torch.bfloat16).min)
    assert cap._is_band(additive, 40, 9, rows=7)
    hole = band.clone()
    hole[1, 0, 39, 35] = False
    assert not cap._is_band(hole, 40, 9, rows=16)


def test_dense_reference_under_a_mask_is_one_for_uniform_attention():
    """Equal logits under an arbitrary mask: 1.0 at every distance some query sees, `empty`
    where none does, and the same profile as without the mask when it hides nothing."""
    from profiler.dense import dense_profile
    length, chunk = 40, 8
    q, k = torch.zeros(1, 2, length, 4), torch.randn(1, 1, length, 4)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    mask = ((j <= i) & (i // chunk == j // chunk))[None, None]
    got = dense_profile(q, k, 1.0, mask=mask, empty=-1.0)
    assert torch.equal(got[..., :chunk], torch.ones(1, 2, chunk))
    assert torch.equal(got[..., chunk:], torch.full((1, 2, length - chunk), -1.0))
    q, k = torch.randn(2, 4, length, 4), torch.randn(2, 2, length, 4)
    additive = torch.zeros(2, 1, length, length).masked_fill(j > i, torch.finfo(torch.float32).min)
    torch.testing.assert_close(dense_profile(q, k, 0.5, mask=additive), dense_profile(q, k, 0.5))


FALLBACK_MODELS = {   # attention the "attnprof" function cannot stand in for, and why
    "gemma2-softcap": ("Gemma2Config", dict(head_dim=16, sliding_window=16, attn_logit_softcapping=5.0)),
    "gpt-oss-sinks": ("GptOssConfig", dict(head_dim=16, sliding_window=16, num_local_experts=2,
                                           num_experts_per_tok=1)),
    "bloom-alibi": ("BloomConfig", dict(n_layer=2, n_head=4)),
    "falcon-own-attention": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2)),
}


@pytest.mark.parametrize("name", FALLBACK_MODELS)
def test_unroutable_attention_falls_back_to_eager_weights(name):
    """Softcapping (SDPA refuses it), attention sinks (SDPA would drop them: another model) and
    attention computed in place (ALiBi): the capture says so, reads eager weights instead and
    equals them; the dense estimator, which needs queries and keys, is refused."""
    import transformers

    from profiler.errors import AttnprofError
    cls, extra = FALLBACK_MODELS[name]
    config = getattr(transformers, cls)(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("sinks"):
                param.fill_(2.0)                     # a sink logit SDPA would silently leave out
            elif param_name.endswith(("q_proj.weight", "k_proj.weight", "query_key_value.weight")):
                param.mul_(4.0)
    ids = np.random.default_rng(5).integers(0, 300, size=(2, 48))
    oracle, oracle_sink = eager_oracle(model, ids, 6)
    cap.register()
    model.set_attn_implementation(cap.ATTN_NAME)
    with pytest.warns(UserWarning, match="reads eager attention weights"):
        got = cap.capture(model, ids, window=6)
    assert got.path == "hooks" and model.config._attn_implementation == "eager"
    assert np.abs(got.A - oracle).max() <= 1e-5 and np.abs(got.sink - oracle_sink).max() <= 1e-5
    model.set_attn_implementation(cap.ATTN_NAME)
    with pytest.raises(AttnprofError, match="use --estimator tail"):
        cap.capture(model, ids, window=6, estimator="dense")


def test_capture_through_accelerate_offload_hooks():
    """Layers wrapped by accelerate's hooks (weights kept off the module and brought in for each
    forward, as with a device map that offloads) are captured exactly like the plain model."""
    import copy
    from accelerate import cpu_offload
    cap.register()
    model = tiny_model(num_key_value_heads=2, attn_implementation=cap.ATTN_NAME)
    ids = np.random.default_rng(4).integers(0, 300, size=(2, 96))
    want = cap.capture(model, ids, window=12)
    hooked = cpu_offload(copy.deepcopy(model), execution_device=torch.device("cpu"))
    assert any(hasattr(m, "_hf_hook") for m in hooked.modules())
    assert any(p.device.type == "meta" for p in hooked.parameters())       # weights live in the hooks
    got = cap.capture(hooked, ids, window=12)
    for field in cap.STAT_FIELDS:
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)


def test_which_layers_ask_for_a_fused_attention():
    """A fused attention (for its logsumexp) serves the dense profile and layers reduced on their
    own; a batched tail layer keeps SDPA; fused_attention=False keeps SDPA everywhere."""
    pytest.importorskip("triton")         # batching needs the kernels
    query, key = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    asks = {(estimator, batch, fused): cap.Recorder(estimator, 8, batch_layers=batch, fused_attention=fused)
            .wants_logsumexp(query, key, None, None)
            for estimator in ("tail", "dense") for batch in (True, False) for fused in (True, False)}
    assert asks == {("tail", True, True): False, ("tail", False, True): True,
                    ("dense", True, True): True, ("dense", False, True): True,
                    ("tail", True, False): False, ("tail", False, False): False,
                    ("dense", True, False): False, ("dense", False, False): False}


def test_taf_protocol_equals_eager_weights():
    """`--estimator taf`: for each distance d a prompt of d + 50 tokens, one forward pass, the last
    query's weight on the key d back; the oracle reads the same weight off eager attention maps."""
    model = tiny_model(num_key_value_heads=2)
    ids = np.random.default_rng(3).integers(0, 300, size=(2, 160))
    cap.register()
    model.set_attn_implementation(cap.ATTN_NAME)
    taf = cap.capture_taf(model, ids)
    usable = [d for d in cap.TAF_DISTANCES if d + cap.TAF_PREFIX <= 160]
    assert usable == [10, 20, 30, 50, 100] and list(taf.distances) == usable
    model.set_attn_implementation("eager")
    oracle = np.zeros((2, 2, 4, len(usable)))
    for n, row in enumerate(ids):
        for k, d in enumerate(usable):
            with torch.no_grad():
                att = model(input_ids=torch.as_tensor(row[None, : d + cap.TAF_PREFIX]), output_attentions=True).attentions
            oracle[n, :, :, k] = [a[0, :, -1, -1 - d].numpy() for a in att]
    assert taf.A.shape == oracle.shape
    assert np.abs(taf.A - oracle).max() <= 1e-6
    assert list(cap.taf_fit_distances(taf.distances)) == [30, 50, 100]
    with pytest.raises(cap.AttnprofError, match="at least 100"):      # 80 tokens: one distance ≥ 30
        cap.capture_taf(model, ids[:, :80])
