"""BiMamba model on CPU (PyTorch scan path unless stated): the properties DESIGN.md asks for."""

import json

import pytest
import torch

from genomamba import tokenizer
from genomamba.errors import InputError
from genomamba.io import Fasta
from genomamba.model import (BiMambaConfig, BiMambaForMaskedLM, BiMambaForSequenceClassification,
                             BiMambaForTokenClassification, BiMambaForVariantClassification, BiMambaModel,
                             from_pretrained, save_pretrained)
from genomamba.model.rcps import complement_index


def ids(batch, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(tokenizer.A_ID, tokenizer.N_ID, (batch, L), generator=g)


def tiny(**kw):
    torch.manual_seed(0)
    return BiMambaConfig(**{"d_model": 16, "n_layer": 2, **kw})


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def test_shapes_and_determinism():
    m = BiMambaForMaskedLM(tiny()).eval()
    x = ids(3, 37)
    out = m(x)
    assert out.shape == (3, 37, 16)
    assert torch.equal(out, m(x))


@pytest.mark.parametrize("rc", [False, True])
def test_right_padding_does_not_leak_into_the_reverse_direction(rc):
    m = BiMambaModel(tiny(rc_equivariant=rc)).eval()
    x = ids(2, 40)
    n = 25
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, n:] = False
    padded = x.clone()
    padded[1, n:] = tokenizer.PAD_ID
    batch = m(padded, mask)
    alone = m(x[1:2, :n])
    assert close(batch[1, :n], alone[0])
    assert close(batch[0], m(x[:1])[0])


def test_unmasked_padding_would_leak():
    """The check above can fail: without the mask, padding changes the real positions."""
    m = BiMambaModel(tiny()).eval()
    x = ids(1, 40)
    padded = x.clone()
    padded[0, 25:] = tokenizer.PAD_ID
    assert not close(m(padded)[0, :25], m(x[:, :25])[0])


def test_rcps_equivariance_of_logits():
    m = BiMambaForMaskedLM(tiny(rc_equivariant=True)).eval()
    x = ids(2, 33)
    comp = complement_index()
    logits = m(x)
    rc_logits = m(tokenizer.reverse_complement(x))
    assert close(rc_logits, logits.flip(1)[..., comp], 1e-5)


def test_rcps_equivariance_of_hidden_states():
    m = BiMambaModel(tiny(rc_equivariant=True)).eval()
    x = ids(2, 30)
    assert close(m(tokenizer.reverse_complement(x)), m(x).flip(1, 2))


def test_non_rcps_model_is_not_equivariant():
    m = BiMambaForMaskedLM(tiny()).eval()
    x = ids(1, 30)
    assert not close(m(tokenizer.reverse_complement(x)), m(x).flip(1)[..., complement_index()], 1e-3)


def test_conjoining_makes_any_model_rc_invariant():
    m = BiMambaForSequenceClassification(tiny(), num_classes=3, conjoin=True).eval()
    x = ids(2, 30)
    assert close(m(x), m(tokenizer.reverse_complement(x)))
    tok = BiMambaForTokenClassification(tiny(), conjoin=True).eval()
    assert close(tok(tokenizer.reverse_complement(x)), tok(x).flip(1))
    lm = BiMambaForMaskedLM(tiny()).eval()
    assert close(lm(tokenizer.reverse_complement(x), conjoin=True), lm(x, conjoin=True).flip(1)[..., complement_index()])


@pytest.mark.parametrize("pool", ["mean", "max", "first", "last", "none"])
def test_embed_pooling(pool):
    m = BiMambaModel(tiny()).eval()
    x = ids(2, 20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False
    e = m.embed(x, mask, pool=pool)
    assert e.shape == ((2, 20, 16) if pool == "none" else (2, 16))
    if pool == "last":
        assert close(e[1], m(x, mask)[1, 11].float())


def test_rcps_mean_embedding_is_strand_invariant():
    m = BiMambaModel(tiny(rc_equivariant=True)).eval()
    x = ids(2, 25)
    assert close(m.embed(x), m.embed(tokenizer.reverse_complement(x)))


def test_gradient_checkpointing_gives_the_same_gradients():
    x = ids(2, 24)
    grads = []
    for ckpt in (False, True):
        m = BiMambaForMaskedLM(tiny(gradient_checkpointing=ckpt)).train()
        m(x).logsumexp(-1).sum().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k


def test_scan_state_recompute_follows_checkpointing_unless_set():
    """(forward direction, reverse direction) rebuild flags: by default only the forward direction
    rebuilds under checkpointing; an explicit setting applies to both."""
    def flags(**kw):
        m = BiMambaModel(tiny(**kw))
        return {(layer.mixer.mixer.fwd.recompute_states, layer.mixer.mixer.rev.recompute_states) for layer in m.layers}
    assert flags() == {(False, False)}
    assert flags(gradient_checkpointing=True) == {(True, False)}
    assert flags(gradient_checkpointing=True, recompute_scan_states=False) == {(False, False)}
    assert flags(recompute_scan_states=True) == {(True, True)}


@pytest.mark.parametrize("rc", [False, True])
def test_chunked_inference_equals_one_shot(rc):
    m = BiMambaForMaskedLM(tiny(rc_equivariant=rc)).eval()
    x = ids(2, 53)
    mask = torch.ones(2, 53, dtype=torch.bool)
    mask[1, 40:] = False
    with torch.no_grad():
        assert close(m(x, mask), m(x, mask, chunk_len=8), 1e-5)
        assert close(m(x), m(x, chunk_len=5), 1e-5)


def test_untied_projections_and_unidirectional():
    x = ids(1, 20)
    for cfg in (tiny(tie_in_out_proj=False), tiny(bidirectional=False)):
        m = BiMambaModel(cfg).eval()
        with torch.no_grad():
            assert close(m(x), m(x, chunk_len=6))


def test_save_load_round_trip_is_bit_exact(tmp_path):
    m = BiMambaForSequenceClassification(tiny(rc_equivariant=True), num_classes=3, pooling="max").eval()
    save_pretrained(m, tmp_path / "model")
    m2 = from_pretrained(tmp_path / "model").eval()
    assert type(m2) is type(m) and m2.head_config == m.head_config
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    x = ids(2, 30)
    assert torch.equal(m(x), m2(x))
    lm = BiMambaForMaskedLM(tiny()).eval()
    save_pretrained(lm, tmp_path / "lm")
    lm2 = from_pretrained(tmp_path / "lm")
    assert lm2.lm_weight() is lm2.backbone.embedding.weight  # still tied after loading
    assert torch.equal(lm(x), lm2(x))


def test_load_errors(tmp_path):
    m = BiMambaForMaskedLM(tiny())
    d = save_pretrained(m, tmp_path / "m")
    meta = json.loads((d / "config.json").read_text())
    with pytest.raises(InputError, match="not found"):
        from_pretrained(tmp_path / "nothing")
    (d / "model.safetensors").rename(d / "w.bak")
    with pytest.raises(InputError, match="no model.safetensors"):
        from_pretrained(d)
    (d / "w.bak").rename(d / "model.safetensors")
    for version, hint in ((2, "upgrade genomamba"), (0, "re-save")):
        (d / "config.json").write_text(json.dumps({**meta, "format_version": version}))
        with pytest.raises(InputError, match=hint):
            from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "d_model": 32}}))
    with pytest.raises(InputError, match="shape mismatch"):
        from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "colour": "blue"}}))
    with pytest.raises(InputError, match="unknown model config key"):
        from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(InputError, match="no config.json"):
        from_pretrained(d)


def test_config_validation():
    with pytest.raises(InputError, match="must be even"):
        BiMambaConfig(d_model=15, rc_equivariant=True)
    with pytest.raises(InputError, match="bidirectional_strategy"):
        BiMambaConfig(bidirectional_strategy="concat")
    with pytest.raises(InputError, match="dt_rank"):
        BiMambaConfig(dt_rank=0)
    assert BiMambaConfig(d_model=118).resolved_dt_rank == 8


def test_parameter_counts_match_caduceus():
    n = lambda cfg: sum(p.numel() for p in BiMambaForMaskedLM(cfg).parameters())  # noqa: E731
    small = n(BiMambaConfig(d_model=118, n_layer=4))
    large = n(BiMambaConfig(d_model=256, n_layer=16))
    assert abs(small - 470_000) / 470_000 < 0.03, small
    assert abs(large - 7_700_000) / 7_700_000 < 0.03, large


def test_variant_head():
    m = BiMambaForVariantClassification(tiny(), num_classes=2).eval()
    ref = ids(3, 41)
    alt = ref.clone()
    alt[:, 20] = tokenizer.reverse_complement(ref[:, 20:21])[:, 0]
    out = m(ref, alt, torch.full((3,), 20))
    assert out.shape == (3, 2)


@pytest.mark.parametrize("batch", [1, 3])
def test_in_projection_gradients_and_layout(batch):
    """The in_proj's own backward: float64 gradcheck, and dx comes back in x's (batch, L, d) layout,
    contiguous (autograd through a transposed view would hand back a transposed gradient)."""
    from genomamba.model.mixer import _InProjection

    x = torch.randn(batch, 30, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_InProjection.apply, (x, w))
    _InProjection.apply(x, w).sum().backward()
    assert x.grad.shape == x.shape and x.grad.is_contiguous()


def test_triton_kernels_inside_the_model_match_torch(monkeypatch):
    """The model code does not change with the backend: Triton (interpreter) equals PyTorch."""
    m = BiMambaForMaskedLM(BiMambaConfig(d_model=8, n_layer=1, d_state=4)).eval()
    x = ids(1, 20)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, 15:] = False
    monkeypatch.setenv("GENOMAMBA_SCAN_BACKEND", "torch")
    ref = m(x, mask)
    ref.sum().backward()
    g_ref = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    monkeypatch.setenv("GENOMAMBA_SCAN_BACKEND", "triton")
    out = m(x, mask)
    out.sum().backward()
    assert close(out, ref, 1e-5)
    for k, p in m.named_parameters():
        assert torch.allclose(p.grad, g_ref[k], atol=1e-5, rtol=1e-4), k


def _graph_names(t):
    """Names of the autograd nodes t was computed through."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in seen:
            seen.add(node.name())
            todo += [n for n, _ in node.next_functions]
    return seen


@pytest.mark.parametrize("ckpt", [False, True])
def test_joint_mixer_backward_equals_separate_nodes(monkeypatch, ckpt):
    """Triton path (interpreter): the tied bidirectional core as one autograd node
    (bimamba_inner, in-place gradient sums) gives the gradients of one node per op: every
    parameter's (the embedding's is the input gradient), with padding (seq_idx), and with
    checkpointing (the forward direction's states rebuilt)."""
    monkeypatch.setenv("GENOMAMBA_SCAN_BACKEND", "triton")
    torch.manual_seed(0)
    m = BiMambaModel(BiMambaConfig(d_model=8, n_layer=1, d_state=4, gradient_checkpointing=ckpt)).train()
    x = ids(1, 14)
    mask = torch.ones(1, 14, dtype=torch.bool)
    mask[0, 10:] = False
    weight = torch.randn(1, 14, 8, generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in ("modular", "joint"):
        monkeypatch.setenv("GENOMAMBA_MIXER_AUTOGRAD", mode)
        m.zero_grad()
        h = m(x, mask)
        if not ckpt:
            assert any("BiMambaInner" in n for n in _graph_names(h)) == (mode == "joint")
        (h * weight).sum().backward()
        results[mode] = ({k: p.grad.clone() for k, p in m.named_parameters()}, h.detach())
    (g_mod, h_mod), (g_joint, h_joint) = results["modular"], results["joint"]
    assert torch.allclose(h_joint, h_mod, atol=1e-6)
    for k in g_mod:
        assert torch.allclose(g_joint[k], g_mod[k], atol=1e-5, rtol=1e-4), k
    assert g_mod["layers.0.mixer.mixer.rev.A_log"].abs().max() > 0  # the comparison is not of zeros


def test_joint_mixer_rebuilds_recomputed_states_from_chunk_states(monkeypatch):
    """bimamba_inner with recompute_fwd / recompute_rev (torch.utils.checkpoint's layers): a
    recomputing direction keeps its scan's chunk states, and its backward rebuilds the tile states
    from them in one pass (never per segment), with the gradients of keeping the tile states;
    padded (seq_idx). (Several chunks: test_backward_rebuilds_tile_states_from_the_forward_chunk_states.)"""
    import importlib

    from genomamba_kernels.bimamba_inner import bimamba_inner

    scan_mod = importlib.import_module("genomamba_kernels.selective_scan")   # the package exports the function

    monkeypatch.setenv("GENOMAMBA_SCAN_BACKEND", "triton")
    calls = []
    for name in ("_tile_states_from_chunks", "_tile_entry_states"):
        real = getattr(scan_mod, name)
        monkeypatch.setattr(scan_mod, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    torch.manual_seed(0)
    mixer = BiMambaModel(BiMambaConfig(d_model=8, n_layer=1, d_state=4)).layers[0].mixer.mixer
    xz = torch.randn(1, 32, 45)
    seq = torch.zeros(1, 45, dtype=torch.int32)
    seq[0, 33:] = 1
    dy = torch.randn(1, 16, 45)
    params = list(mixer.fwd.inner_params()) + list(mixer.rev.inner_params())
    results = {}
    for recompute in ((False, False), (True, False), (True, True)):
        x = xz.clone().requires_grad_()
        calls.clear()
        y = bimamba_inner(x, mixer.fwd.inner_params(), mixer.rev.inner_params(), seq, *recompute)
        grads = torch.autograd.grad(y, [x, *params], dy)
        assert calls == ["_tile_states_from_chunks"] * sum(recompute)
        results[recompute] = (y.detach(), grads)
    y0, g0 = results[(False, False)]
    for key in ((True, False), (True, True)):
        y, g = results[key]
        assert torch.equal(y, y0)
        for a, b in zip(g, g0):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), key
    assert g0[0].abs().max() > 0 and g0[6].abs().max() > 0   # xz and the forward direction's A_log


@pytest.mark.parametrize("frozen_start", [True, False])
def test_checkpointed_layers_skip_the_second_scan_forward(monkeypatch, frozen_start):
    """Triton path (interpreter), checkpointing: each tied bidirectional layer, its residual add
    included, is one checkpointed node whose backward runs no scan forward (y comes from the
    scans' backward), with the outputs and every gradient of the model without checkpointing, with
    padding; GENOMAMBA_CHECKPOINT=torch falls back to torch.utils.checkpoint. frozen_start: the
    embedding and the first layer's norm and in_proj are frozen, so that layer's node has neither
    an input nor an outer parameter to differentiate; else the embedding's gradient passes through
    both nodes' residual adds."""
    import importlib

    inner = importlib.import_module("genomamba_kernels.bimamba_inner")   # the package exports the function
    monkeypatch.setenv("GENOMAMBA_SCAN_BACKEND", "triton")
    x = ids(1, 21)
    mask = torch.ones(1, 21, dtype=torch.bool)
    mask[0, 17:] = False
    weight = torch.randn(1, 21, 8, generator=torch.Generator().manual_seed(1))
    scans = []
    real_fwd = inner.selective_scan_triton_fwd
    monkeypatch.setattr(inner, "selective_scan_triton_fwd", lambda *a, **k: scans.append(1) or real_fwd(*a, **k))
    results = {}
    for name, ckpt, mode in (("plain", False, "rebuild"), ("rebuild", True, "rebuild"), ("torch", True, "torch")):
        monkeypatch.setenv("GENOMAMBA_CHECKPOINT", mode)
        torch.manual_seed(0)
        m = BiMambaModel(BiMambaConfig(d_model=8, n_layer=2, d_state=4, gradient_checkpointing=ckpt)).train()
        if frozen_start:
            for p in (m.embedding.weight, m.layers[0].norm.weight, m.layers[0].mixer.mixer.in_proj.weight):
                p.requires_grad_(False)
        h = m(x, mask)
        names = _graph_names(h)
        assert any("CheckpointedLayer" in n for n in names) == (name == "rebuild")
        assert not (name == "rebuild" and any("AddBackward" in n for n in names))   # the adds are inside
        scans.clear()
        (h * weight).sum().backward()
        assert len(scans) == {"plain": 0, "rebuild": 0, "torch": 4}[name]   # 2 layers x 2 directions
        results[name] = ({k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}, h.detach())
    g_plain, h_plain = results["plain"]
    for name in ("rebuild", "torch"):
        g, h = results[name]
        assert torch.allclose(h, h_plain, atol=1e-6), name
        assert g.keys() == g_plain.keys()
        for k in g_plain:
            assert torch.allclose(g[k], g_plain[k], atol=1e-5, rtol=1e-4), (name, k)
    assert g_plain["layers.0.mixer.mixer.out_proj.weight"].abs().max() > 0
    assert g_plain["layers.1.mixer.mixer.rev.A_log"].abs().max() > 0
    assert g_plain["layers.1.mixer.mixer.in_proj.weight"].abs().max() > 0
    assert frozen_start or g_plain["embedding.weight"].abs().max() > 0


def test_joint_mixer_without_gradients_builds_no_node(monkeypatch):
    """Grad mode on but nothing requiring a gradient (a frozen model): bimamba_inner runs its
    forward without the autograd node (no per-tile states kept), with the same output."""
    monkeypatch.setenv("GENOMAMBA_SCAN_BACKEND", "triton")
    torch.manual_seed(0)
    mixer = BiMambaModel(BiMambaConfig(d_model=8, n_layer=1, d_state=4)).layers[0].mixer.mixer
    x = torch.randn(1, 12, 8)
    tracked = mixer(x)
    assert any("BiMambaInner" in n for n in _graph_names(tracked))
    mixer.requires_grad_(False)
    frozen = mixer(x)
    assert frozen.grad_fn is None and torch.equal(frozen, tracked.detach())


def test_joint_mixer_inference_equals_separate_ops(monkeypatch):
    """Inference (no_grad) on the Triton path also runs the tied core as bimamba_inner (both convs
    from one read of x): the same output as one op per step, with padding (seq_idx)."""
    from genomamba.model import mixer
    from genomamba_kernels import bimamba_inner

    monkeypatch.setenv("GENOMAMBA_SCAN_BACKEND", "triton")
    torch.manual_seed(0)
    m = BiMambaModel(BiMambaConfig(d_model=8, n_layer=2, d_state=4)).eval()
    x = ids(2, 13)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 9:] = False
    calls = []
    monkeypatch.setattr(mixer, "bimamba_inner", lambda *a, **k: calls.append(1) or bimamba_inner(*a, **k))
    out = {}
    for mode in ("modular", "joint"):
        monkeypatch.setenv("GENOMAMBA_MIXER_AUTOGRAD", mode)
        with torch.no_grad():
            out[mode] = m(x, mask)
        assert len(calls) == (2 if mode == "joint" else 0)   # once per layer
    assert torch.allclose(out["joint"], out["modular"], atol=1e-6)
    assert out["joint"].abs().max() > 0


def test_joint_mixer_rejects_bad_arguments():
    from genomamba_kernels import bimamba_inner

    p = tuple(torch.zeros(1) for _ in range(7))
    with pytest.raises(ValueError, match="7 parameters"):
        bimamba_inner(torch.zeros(1, 4, 8), p[:6], p)
    with pytest.raises(ValueError, match="2\\*d_inner"):
        bimamba_inner(torch.zeros(1, 5, 8), p, p)


def test_tiny_model_overfits_lambda_windows(data):
    """Masked-LM on four real 128 bp lambda windows with fixed masks: the loss falls decisively."""
    fa = Fasta(data / "lambda_phage_NC_001416.fa.gz")
    name = fa.names()[0]
    x = torch.stack([torch.from_numpy(fa.fetch_ids(name, s, s + 128)) for s in (0, 10_000, 20_000, 30_000)])
    g = torch.Generator().manual_seed(0)
    masked = torch.rand(x.shape, generator=g) < 0.15
    inp = x.masked_fill(masked, tokenizer.MASK_ID)
    torch.manual_seed(0)
    m = BiMambaForMaskedLM(BiMambaConfig(d_model=32, n_layer=2))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = m(inp)
        loss = torch.nn.functional.cross_entropy(logits[masked], x[masked])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0 and losses[-1] < 0.5 * losses[0], losses[::8]


def test_shipped_configs_load_with_caduceus_sizes():
    from pathlib import Path

    from genomamba.model import load_model_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    n = lambda cfg: sum(p.numel() for p in BiMambaForMaskedLM(cfg).parameters())  # noqa: E731
    assert abs(n(load_model_config(configs / "caduceus_1k.yaml")) - 470_000) < 0.03 * 470_000
    assert abs(n(load_model_config(configs / "caduceus_131k.yaml")) - 7_700_000) < 0.03 * 7_700_000
    assert load_model_config(configs / "caduceus_131k_rcps.yaml").rc_equivariant
    assert load_model_config(configs / "long_1m.yaml").gradient_checkpointing


def test_bad_yaml_config(tmp_path):
    from genomamba.model import load_model_config

    (tmp_path / "x.yaml").write_text("model:\n  d_model: 64\n  n_layers: 4\n")
    with pytest.raises(InputError, match=r"unknown model config key\(s\) \['n_layers'\]"):
        load_model_config(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("trainer: {}\n")
    with pytest.raises(InputError, match="model:"):
        load_model_config(tmp_path / "y.yaml")
