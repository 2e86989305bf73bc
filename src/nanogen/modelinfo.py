"""``nanogen model-info``: size, analytic FLOPs and token layout of a config's stage-2 network.

The network is built on the meta device, so even the 1B-parameter 512-px T2I model costs no memory. Parameters
are counted as ``reference-params.md`` counts them: every ``nn.Parameter``, including the fixed Gaussian-Fourier
vector ``t_embedder.W``.
"""

from __future__ import annotations

from typing import Any

import torch

from nanogen.build import build_network
from nanogen.config import Stage2Config
from nanogen.config.loader import build


def token_layout(net: torch.nn.Module) -> dict[str, Any]:
    cfg = net.cfg  # type: ignore[attr-defined]
    n_t, n_c = cfg.cond_arch.num_t_tokens, cfg.cond_arch.num_c_tokens
    stem = {
        "reg_token": net.n_before,  # type: ignore[attr-defined]
        "patch_tokens": net.num_patches,  # type: ignore[attr-defined]
        "time_tokens": n_t,
        "abs_time_tokens": n_t if cfg.is_meanflow else 0,
        "condition_tokens": n_c,
    }
    stem["sequence_length"] = sum(stem.values())
    if hasattr(net, "x_embedder"):  # DDT: the decoder continues the REG token and the patches only
        return {"encoder": stem, "decoder": {"sequence_length": net.n_before + net.num_patches}}  # type: ignore[attr-defined]
    return {"blocks": stem}


def model_config(cfg: Stage2Config) -> Any:
    """The stage-2 network's own typed config (what the FLOP formulas read)."""
    from nanogen import registry

    _, entry = registry.lookup(registry.MODELS, cfg.stage_2.target, "stage_2.target")
    return build(entry.config_cls(), cfg.stage_2.params, source="config", prefix="stage_2.params")


def train_flops_per_image(cfg: Stage2Config) -> float:
    """Model FLOPs per training image: 3 x the analytic forward FLOPs (performance.md §1; frozen encoders,
    recomputation and the optimizer are not counted)."""
    from nanogen.models.flops import train_flops

    return float(train_flops(model_config(cfg)))


def model_info(cfg: Stage2Config) -> dict[str, Any]:
    from nanogen.models.flops import forward_macs

    with torch.device("meta"):
        net = build_network(cfg)
    mcfg = model_config(cfg)
    params = sum(p.numel() for p in net.parameters())
    by_module: dict[str, int] = {}
    L_e = mcfg.depth[0] if isinstance(mcfg.depth, list) else mcfg.depth
    for name, p in net.named_parameters():
        top = name.split(".")[0]
        if top == "blocks" and hasattr(net, "x_embedder"):  # DDT: one list, encoder blocks first
            top = "encoder_blocks" if int(name.split(".")[1]) < L_e else "decoder_blocks"
        by_module[top] = by_module.get(top, 0) + p.numel()
    macs = forward_macs(mcfg)
    fwd = 2 * sum(macs.values())
    return {
        "model": cfg.stage_2.target,
        "params": params,
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "gflops": fwd / 1e9,  # forward, per image, 2 x MACs
        "gmacs": fwd / 2e9,
        "train_gflops_per_image": 3 * fwd / 1e9,
        "gflops_by_part": {k: 2 * v / 1e9 for k, v in macs.items()},
        "params_by_module": by_module,
        "token_layout": token_layout(net),
        "latent_size": list(cfg.misc.latent_size),
        "condition": cfg.conditioning.type,
    }


def render(info: dict[str, Any]) -> str:
    lines = [
        f"{info['model']}: {info['params']:,} parameters ({info['trainable_params']:,} trainable), "
        f"{info['gflops']:.4g} GFLOPs forward per image ({info['train_gflops_per_image']:.4g} per training image)",
        f"latent {info['latent_size']}, {info['condition']} conditioning",
        "parameters by module:",
    ]
    lines += [f"  {k:<18} {v:>15,}" for k, v in info["params_by_module"].items()]
    lines.append("forward GFLOPs by part:")
    lines += [f"  {k:<18} {v:>15.3f}" for k, v in info["gflops_by_part"].items() if v]
    for stream, layout in info["token_layout"].items():
        lines.append(
            f"{stream} tokens: "
            + ", ".join(f"{k} {v}" for k, v in layout.items() if v or k == "sequence_length")
        )
    return "\n".join(lines)
