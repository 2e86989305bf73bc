"""DDT (spec reference.md §3.2): same function as an independent oracle on reference-layout weights, exact
parameter counts, analytic FLOPs vs FlopCounterMode, no dense masks, one compiled graph, clear load errors."""

import dataclasses
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanogen import checkpoint as ckpt
from nanogen.bench import attention_masks, example_inputs, graph_breaks
from nanogen.errors import CheckpointError, ConfigError
from nanogen.models.ddt import DDT, DDTConfig
from nanogen.models.flops import forward_flops
from nanogen.models.in_context import CondArch
from nanogen.models.lightning_dit import LightningDiT, LightningDiTConfig
from reference_ddt import RefCfg, reference_forward, reference_state_dict

VARIANTS = {
    "label": RefCfg(8, 3, 2, (32, 48), (2, 1), (2, 4), num_classes=10, n_t=3, n_c=5),
    "text": RefCfg(8, 4, 2, (32, 48), (2, 2), (2, 4), condition_type="text", context_dim=24, n_t=2, n_c=7),
    "reg": RefCfg(8, 3, 2, (32, 48), (2, 1), (2, 4), num_classes=10, enable_reg=True, z_dim=12),
    "meanflow": RefCfg(8, 3, 2, (32, 48), (2, 1), (2, 4), num_classes=10, is_meanflow=True),
    "equal-widths": RefCfg(12, 2, 3, (32, 32), (1, 1), (2, 2), num_classes=7, mlp_ratio=3.0),
    "reg+repa": RefCfg(8, 3, 2, (32, 48), (3, 1), (2, 4), num_classes=10, enable_reg=True, z_dim=12,
                       enable_repa=True, repa_layer_depth=2),
}  # fmt: skip


def nanogen_config(r: RefCfg) -> DDTConfig:
    return DDTConfig(
        input_size=r.input_size, in_channels=r.in_channels, patch_size=r.patch, hidden_size=list(r.hidden),
        depth=list(r.depth), num_heads=list(r.heads), mlp_ratio=r.mlp_ratio, condition_type=r.condition_type,
        num_classes=r.num_classes, context_dim=r.context_dim, cond_arch=CondArch(r.n_t, r.n_c),
        enable_reg=r.enable_reg, z_dim=r.z_dim, is_meanflow=r.is_meanflow, enable_repa=r.enable_repa,
        repa_layer_depth=r.repa_layer_depth,
    )  # fmt: skip


def inputs(r: RefCfg, B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, r.in_channels, r.input_size, r.input_size, generator=g)
    t = torch.rand(B, generator=g)
    if r.condition_type == "label":
        cond, mask = torch.tensor([0, r.num_classes, 3][:B]), None  # includes the null label
    else:
        cond = torch.randn(B, r.n_c, r.context_dim, generator=g)
        mask = torch.arange(r.n_c)[None] < torch.tensor([[r.n_c], [2], [0]])[:B]  # full, padded, empty ("")
    kw = {}
    if r.enable_reg:
        kw["cls_t"] = torch.randn(B, r.z_dim, generator=g)
    if r.is_meanflow:
        kw["t_abs"] = torch.rand(B, generator=g)
    return x, t, cond, mask, kw


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reference_layout_checkpoint_computes_the_oracle_function(tmp_path, name):
    """Random weights in the reference's layout (incl. its RoPE buffers), saved as a released checkpoint
    ({model, ema, step, ...}), load into nanogen's DDT and give the independent oracle's outputs."""
    r = VARIANTS[name]
    sd_ema, sd_model = reference_state_dict(r, seed=0), reference_state_dict(r, seed=1)
    path = tmp_path / "release.pt"
    torch.save(
        {"step": 100, "epoch": 4, "model": sd_model, "ema": sd_ema, "optimizer": {}, "scheduler": None}, path
    )
    net = DDT(nanogen_config(r))
    for which, sd in (("ema", sd_ema), ("model", sd_model)):
        weights, got = ckpt.weights_from(ckpt.read(path), which)
        assert got == which
        ckpt.load_weights(net, weights, "release")
        x, t, cond, mask, kw = inputs(r)
        ret = r.enable_repa
        with torch.no_grad():
            ours = net(x, t, cond, mask, **kw, return_repa=ret)
        ref = reference_forward(sd, r, x.double(), t.double(), cond if r.condition_type == "label" else cond.double(),
                                mask, **{k: v.double() for k, v in kw.items()}, return_repa=ret)  # fmt: skip
        ours = [ours] if isinstance(ours, torch.Tensor) else [o for o in ours if o is not None]
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            assert a.shape == b.shape
            assert b.abs().max() > 1e-2  # the function is not trivial
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_converted_checkpoint_matches_and_safetensors(tmp_path):
    r = VARIANTS["text"]
    sd = reference_state_dict(r, seed=3)
    src = tmp_path / "release.pt"
    torch.save({"step": 7, "model": sd, "ema": sd}, src)
    net = DDT(nanogen_config(r))
    summary = ckpt.convert(src, tmp_path / "converted.pt", net, {"note": "x"})
    assert summary["entries"] == ["ema", "model"]
    converted = ckpt.read(tmp_path / "converted.pt")
    assert converted["step"] == 7 and converted["config"] == {"note": "x"}
    assert not any("rope" in k for k in converted["ema"])  # nanogen rebuilds RoPE tables from the layout
    ckpt.convert(src, tmp_path / "ema.safetensors", net)
    for f in ("converted.pt", "ema.safetensors"):
        a, b = DDT(nanogen_config(r)), DDT(nanogen_config(r))
        ckpt.load_weights(a, ckpt.weights_from(ckpt.read(tmp_path / f))[0], f)
        ckpt.load_weights(b, ckpt.weights_from(ckpt.read(src))[0], "src")
        x, t, cond, mask, _ = inputs(r)
        with torch.no_grad():
            torch.testing.assert_close(a(x, t, cond, mask), b(x, t, cond, mask), rtol=0, atol=0)


def test_load_errors_name_the_offending_keys():
    reg = VARIANTS["reg"]
    plain = DDT(nanogen_config(VARIANTS["label"]))
    with pytest.raises(CheckpointError, match=r"enc_rope\.freqs_(cos|sin) is \[.*another token layout"):
        ckpt.load_weights(plain, reference_state_dict(reg), "release")
    sd = reference_state_dict(VARIANTS["label"])
    sd = {k: v for k, v in sd.items() if "rope" not in k}
    del sd["blocks.0.attn.q.weight"]
    sd["extra.weight"] = torch.zeros(1)
    sd["final_layer.linear.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_weights(plain, sd, "release")
    msg = str(e.value)
    assert "missing: blocks.0.attn.q.weight" in msg and "unexpected: extra.weight" in msg
    assert "final_layer.linear.bias (5,) vs (12,)" in msg


# ----------------------------------------------------------------------------------------------------------
# structure and init (§3.2)


def test_init_zero_output_and_documented_inits():
    torch.manual_seed(0)
    cfg = nanogen_config(VARIANTS["reg"])
    net = DDT(cfg)
    x, t, cond, mask, kw = inputs(VARIANTS["reg"])
    out = net(x, t, cond, mask, **kw)
    assert torch.all(out.x == 0) and torch.all(out.cls == 0)  # final linear and cls head start at zero
    for i in range(cfg.depth[0], sum(cfg.depth)):
        assert torch.all(net.blocks[i].adaln_modulation[1].weight == 0)
    assert not hasattr(net.blocks[0], "adaln_modulation")  # encoder blocks carry no AdaLN
    assert not net.t_embedder.W.requires_grad
    big = DDT(DDTConfig(input_size=4, in_channels=3, patch_size=1, hidden_size=[1152, 64], depth=[1, 1],
                        num_heads=[16, 4], num_classes=1000))  # fmt: skip
    assert abs(big.t_embedder.learnable_tokens.std().item() - 1 / math.sqrt(1152)) < 3e-3  # N(0, 1/sqrt(D))
    assert abs(big.ctx_embedder.embedding_table.weight.std().item() - 0.02) < 1e-3
    assert abs(big.t_embedder.mlp[0].weight.std().item() - 0.02) < 1e-3


def test_condition_tokens_are_not_rotated_and_mask_hides_padding():
    r = VARIANTS["text"]
    net = DDT(nanogen_config(r))
    ckpt.load_weights(net, reference_state_dict(r), "r")
    x, t, cond, mask, _ = inputs(r)
    cond2 = cond.clone()
    cond2[1, 2:] = torch.randn_like(cond2[1, 2:])  # padded positions of sample 1 must not matter
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, cond, mask)[1], net(x, t, cond2, mask)[1])
    n = net.num_patches
    assert torch.all(net.enc_rope.cos[n:] == 1) and torch.all(net.enc_rope.sin[n:] == 0)


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        DDT(DDTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=[32, 50], num_heads=[2, 4]))
    with pytest.raises(ConfigError, match="same grid"):
        DDT(DDTConfig(input_size=8, in_channels=3, patch_size=[2, 4], hidden_size=[32, 32], num_heads=[2, 2]))
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        DDT(DDTConfig(input_size=10, in_channels=3, patch_size=4, hidden_size=[32, 32], num_heads=[2, 2]))
    with pytest.raises(ConfigError, match="z_dim"):
        DDT(
            DDTConfig(
                input_size=8,
                in_channels=3,
                patch_size=2,
                hidden_size=[32, 32],
                num_heads=[2, 2],
                enable_reg=True,
            )
        )


# ----------------------------------------------------------------------------------------------------------
# FLOPs (performance.md §2.1)


def counted_flops(net, repa=False) -> int:
    args, kwargs = example_inputs(net, 1, torch.device("cpu"))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        net(*args, **kwargs, return_repa=repa)
    return fc.get_total_flops()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_analytic_flops_equal_flop_counter_ddt(name):
    cfg = nanogen_config(VARIANTS[name])
    assert forward_flops(cfg, return_repa=cfg.enable_repa) == counted_flops(DDT(cfg), repa=cfg.enable_repa)


@pytest.mark.parametrize(
    "cfg",
    [
        LightningDiTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10),
        LightningDiTConfig(input_size=8, in_channels=3, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                           condition_type="text", context_dim=12, cond_arch=CondArch(2, 6), enable_reg=True, z_dim=8,
                           enable_repa=True, repa_layer_depth=1),
    ],
)  # fmt: skip
def test_analytic_flops_equal_flop_counter_lightning_dit(cfg):
    assert forward_flops(cfg, return_repa=cfg.enable_repa) == counted_flops(
        LightningDiT(cfg), repa=cfg.enable_repa
    )


def test_full_size_flops_match_the_spec():
    """performance.md §0 / §2.1: 332.2 GFLOPs (SD-VAE c2i), 579.1 (T2I, 256 text tokens), 334.2 (RAE-768),
    2,809.2 (T2I 512 px, encoder width 1584)."""
    base = dict(hidden_size=[1152, 2048], depth=[28, 2], num_heads=[16, 16])
    text = dict(condition_type="text", context_dim=1024, cond_arch=CondArch(4, 256))
    cases = [
        (DDTConfig(input_size=32, in_channels=4, patch_size=2, **base), 332.2),
        (DDTConfig(input_size=32, in_channels=4, patch_size=2, **base, **text), 579.1),
        (DDTConfig(input_size=16, in_channels=768, patch_size=1, **base), 334.2),
        (DDTConfig(input_size=64, in_channels=16, patch_size=2, **{**base, "hidden_size": [1584, 2048],
                                                                    "num_heads": [22, 16]}, **text), 2809.2),
    ]  # fmt: skip
    for cfg, gflops in cases:
        assert round(forward_flops(cfg) / 1e9, 1) == gflops


# ----------------------------------------------------------------------------------------------------------
# speed-relevant structure (issue: no dense masks, no graph breaks)


def test_no_dense_mask_for_unmasked_inputs_and_a_bool_key_mask_for_text():
    label = DDT(nanogen_config(VARIANTS["label"]))
    args, kw = example_inputs(label, 2, torch.device("cpu"))
    assert attention_masks(label, args, kw) == [None] * 3  # 2 encoder + 1 decoder attention, all unmasked
    text = DDT(nanogen_config(VARIANTS["text"]))
    args, kw = example_inputs(text, 2, torch.device("cpu"))
    masks = attention_masks(text, args, kw)
    S = text.num_patches + 2 + 7
    assert masks == [(2, 1, 1, S)] * 2 + [None] * 2  # text padding masks keys in the encoder only


def test_forward_compiles_to_one_graph():
    net = DDT(nanogen_config(VARIANTS["reg+repa"]))
    args, kw = example_inputs(net, 2, torch.device("cpu"))
    res = graph_breaks(net, args, {**kw, "return_repa": True})
    assert res["graph_breaks"] == 0 and res["graphs"] == 1, res["reasons"]


def test_dataclass_roundtrip_accepts_single_numbers():
    cfg = DDTConfig(patch_size=2, hidden_size=64, depth=3, num_heads=4)
    assert cfg.patch_size == [2, 2] and cfg.hidden_size == [64, 64] and cfg.depth == [3, 3]
    assert dataclasses.asdict(cfg)["num_heads"] == [4, 4]


def test_extra_inputs_are_required_and_checked():
    reg = DDT(nanogen_config(VARIANTS["reg"]))
    x, t, cond, mask, kw = inputs(VARIANTS["reg"])
    with pytest.raises(ValueError, match="cls_t"):
        reg(x, t, cond)
    with pytest.raises(ValueError, match="enable_repa"):
        reg(x, t, cond, **kw, return_repa=True)
    mf = DDT(nanogen_config(VARIANTS["meanflow"]))
    with pytest.raises(ValueError, match="t_abs"):
        mf(x, t, cond)
