"""The in-context token stem shared by the DDT encoder and LightningDiT (spec ``reference.md`` §3.2 step 1, §3.4).

Both networks feed one sequence to a stack of plain pre-norm blocks, in this order:

    [REG cls token]  [N patch tokens]  [n_t time tokens]  [n_t abs-time tokens]  [condition tokens]
     REG only          s_embedder       t_embedder          MeanFlow only           8 label / 256 text

Condition tokens attend jointly with the patches: no AdaLN in the stem. Only the patch tokens are rotated by
2-D RoPE (the REG token and everything after the patches get angle 0). An attention mask exists only when the
caller passes a real one (padded text); class-conditional inputs run unmasked, so SDPA may pick its fastest
kernel (the reference always builds an all-ones mask, which rules out flash attention; ``performance.md`` §8.1).

The stem's modules are attributes of the model itself, so parameter names match the reference's flat layout
(``s_embedder``, ``t_embedder``, ``t_abs_embedder``, ``ctx_embedder``, ``cls_in_proj_enc``, ``cls_in_norm_enc``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nanogen.models.layers import LabelTokens, PatchEmbed, RMSNorm, TextTokens, TimeTokens
from nanogen.models.outputs import DiTOutput


@dataclass
class CondArch:
    num_t_tokens: int = 4  # time tokens
    num_c_tokens: int = 8  # class tokens (text: one token per text position, = max_length)


def check_common(dim: int, heads: int, where: str) -> None:
    """Width / heads rules shared by every block: heads divide the width, and RoPE needs head_dim % 4 == 0."""
    from nanogen.errors import ConfigError

    if dim % heads:
        raise ConfigError(f"{where}: hidden size {dim} is not divisible by num_heads {heads}")
    if (dim // heads) % 4:
        raise ConfigError(
            f"{where}: head dim {dim // heads} (hidden_size/num_heads) must be divisible by 4 for 2-D RoPE"
        )


class InContextStem(nn.Module):
    """Mixin for the two in-context networks: builds the stem modules and assembles the encoder sequence."""

    def build_stem(
        self,
        *,
        dim: int,
        patch: int,
        in_channels: int,
        cond_arch: CondArch,
        condition_type: str,
        num_classes: int,
        context_dim: int | None,
        enable_reg: bool,
        z_dim: int | None,
        is_meanflow: bool,
    ) -> None:
        self.enable_reg = enable_reg
        self.is_meanflow = is_meanflow
        self.s_embedder = PatchEmbed(patch, in_channels, dim)
        self.t_embedder = TimeTokens(dim, cond_arch.num_t_tokens)
        if (
            is_meanflow
        ):  # MeanFlow: the main time input is the interval h = t - r; this one sees the absolute t
            self.t_abs_embedder = TimeTokens(dim, cond_arch.num_t_tokens)
        if condition_type == "label":
            self.ctx_embedder: nn.Module = LabelTokens(dim, cond_arch.num_c_tokens, num_classes)
        else:
            self.ctx_embedder = TextTokens(dim, context_dim)  # type: ignore[arg-type]
        if enable_reg:  # REG: the noised CLS token enters through Linear + RMSNorm ("reg0.03-rmsnorm", §4.4)
            self.cls_in_proj_enc = nn.Linear(z_dim, dim)  # type: ignore[arg-type]
            self.cls_in_norm_enc = RMSNorm(dim)
        self.n_before = 1 if enable_reg else 0
        self.n_after = cond_arch.num_t_tokens * (2 if is_meanflow else 1) + cond_arch.num_c_tokens

    def embed(
        self,
        x: Tensor,
        t: Tensor,
        cond: Tensor,
        cond_mask: Tensor | None,
        cls_t: Tensor | None,
        t_abs: Tensor | None,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """The encoder sequence (B, L, D), its boolean key mask (None when unmasked) and the plain e(t) (B, 1, D)."""
        s = self.s_embedder(x)
        t_tok, e = self.t_embedder(t)
        parts = [s, t_tok.to(s.dtype)]
        if self.is_meanflow:
            if t_abs is None:
                raise ValueError(
                    "a MeanFlow network needs t_abs (the absolute time) besides t (the interval t - r)"
                )
            parts.append(self.t_abs_embedder(t_abs)[0].to(s.dtype))
        parts.append(self.ctx_embedder(cond).to(s.dtype))
        if self.enable_reg:
            if cls_t is None:
                raise ValueError("a REG network needs cls_t, the noised representation CLS token (B, z_dim)")
            parts.insert(0, self.cls_in_norm_enc(self.cls_in_proj_enc(cls_t.to(s.dtype)))[:, None])
        seq = torch.cat(parts, dim=1)
        mask = None
        if cond_mask is not None:  # key mask: everything but the condition tokens is always visible
            keep = torch.ones(
                seq.shape[0], seq.shape[1] - cond_mask.shape[1], dtype=torch.bool, device=seq.device
            )
            mask = torch.cat([keep, cond_mask.to(device=seq.device, dtype=torch.bool)], dim=1)
        return seq, mask, e

    def run_blocks(
        self, s: Tensor, blocks: nn.ModuleList, rope: nn.Module, mask: Tensor | None, return_repa: bool
    ) -> tuple[Tensor, Tensor | None]:
        """The in-context blocks, with the REPA tap after block ``repa_layer_depth`` (1-based) on the REG token +
        patches. Returns the sequence and the projected features (None unless ``return_repa``)."""
        if return_repa and not self.cfg.enable_repa:  # type: ignore[attr-defined]
            raise ValueError("return_repa needs a model built with enable_repa (repa.use_repa: true)")
        n = self.n_before + self.num_patches  # type: ignore[attr-defined]
        z = None
        for i, block in enumerate(blocks):
            s = block(s, rope, mask)
            if return_repa and i + 1 == self.cfg.repa_layer_depth:  # type: ignore[attr-defined]
                z = self.repa_projector(s[:, :n])
        return s, z

    def package(self, img: Tensor, cls: Tensor | None, z: Tensor | None, return_repa: bool) -> Tensor | DiTOutput:
        """A bare tensor, or a ``DiTOutput`` when the model has a REG token or REPA features were requested."""
        if self.enable_reg or return_repa:
            return DiTOutput(img, cls, z)
        return img
