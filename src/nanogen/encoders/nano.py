"""``nano-vit-s``: the nano tier's own representation encoder, a small ViT trained here on the digits.

The nano tier runs offline, where no DINOv2 weights exist, yet its RAE latent space (spec ``reference.md``
§6.2-6.4) and REG (§4.4) need a frozen encoder with semantic CLS and patch tokens. This module is that encoder:

    32x32 RGB in [-1, 1] -> 4x4 patches -> 64 patch tokens + CLS, width 48, 4 pre-norm blocks (3 heads, MLP 4x),
    learned position embedding (started from 2-D sin-cos) -> final LayerNorm **without** affine (as the RAE's
    DINOv2 output, §6.5)

so the RAE latent is 48 x 8 x 8 = 3,072 numbers = 3 x 32 x 32 pixels: the ratio of DINOv2-B at 256 px
(768 x 16 x 16 = 3 x 256 x 256). Two losses train it, both on the project's own data (``train_nano_encoder``):

- CLS -> linear -> 10 classes, cross-entropy on the labelled MNIST training digits: a semantic CLS token,
  which REG's extra token needs;
- SimMIM-style masked patch modelling on ``nano-mix`` images (digits and coloured scenes): 40% of the patch
  embeddings are replaced by a learned mask token, and a linear head maps every final patch token to its
  4x4x3 pixels, L2 over all patches. Predicting the masked patches makes the tokens contextual; predicting the
  visible ones too keeps every token reconstructable, which the RAE's pixel decoder needs.

The heads and the mask token are training tools: the export holds the encoder only. With the defaults (800 steps
of 16 + 16 images, about 70 s on 2 CPU cores) the CLS probe classifies ~89% of the held-out digits and a linear
read-out of the patch tokens reconstructs the visible patches; the masked ones are predicted hardly better than by
each pixel's mean, so at this budget the tokens are reconstructable more than contextual.

    nanogen train-encoder                         -> results/nano-encoder/{model.safetensors, config.json}
    build_encoder("nano-vit-s")                   reads it (or misc.weights.nano-vit-s, $NANOGEN_ENCODER_NANO_VIT_S)

The encoder always runs at 32 px (its position table is learned for the 8x8 grid): other image sizes are
resized to 32 first (bilinear, antialiased), whatever ``resolution`` the caller names.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanogen.encoders.base import EncoderFeatures, RepresentationEncoder
from nanogen.errors import CheckpointError, NotAvailableError, UserError
from nanogen.latents.rae import sincos_2d

FORMAT = "nanogen-nano-encoder/1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
# Training defaults, sized for the budget of 90 s on 2 CPU cores. At this budget the number of updates, not the
# batch, limits a ViT on 4,500 digits (800 x 16 reached a higher held-out accuracy than 400 x 32 for the same
# compute), and random shifts of the digits slowed it down more than they helped generalisation.
NAME = "nano-vit-s"
DEFAULT_OUT = "results/nano-encoder"
DEFAULT_STEPS = 800
DEFAULT_BATCH = 16  # images per loss per step: 16 digits for the CLS loss + 16 nano-mix images for the pixel loss
DEFAULT_LR = 2e-3
MASK_RATIO = 0.4


@dataclass
class NanoViTConfig:
    image_size: int = 32
    patch_size: int = 4
    width: int = 48
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


# ------------------------------------------------------------------------------------------------ network


class Block(nn.Module):
    """Pre-norm ViT block: ``x + attn(LN(x))``, then ``x + fc2(gelu(fc1(LN(x))))``."""

    def __init__(self, cfg: NanoViTConfig):
        super().__init__()
        d, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class NanoViT(nn.Module):
    """The encoder network: images (B, 3, 32, 32), already normalised, -> tokens (B, 1 + 64, 48), CLS first,
    then the patches row-major, after a non-affine final LayerNorm."""

    def __init__(self, cfg: NanoViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size or cfg.width % cfg.heads:
            raise UserError(f"nano encoder: image_size % patch_size and width % heads must be 0, got {cfg}")
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = nn.Conv2d(3, d, cfg.patch_size, cfg.patch_size)  # = a linear map of each 4x4x3 patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        with torch.no_grad():  # learned, but starting from the 2-D sin-cos table: spatial structure from step 0
            self.pos_embed.copy_(sincos_2d(d, cfg.grid)[None])

    def forward(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """``mask`` (B, 64) bool: those patch embeddings are replaced by ``mask_token`` (1, 1, D) (training)."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major
        if mask is not None:
            t = torch.where(mask[..., None], mask_token.to(t.dtype), t)  # SimMIM: before the position embedding
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1) + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        # No affine on the output: the RAE strips DINOv2's final-LN affine (§6.5); here it never existed.
        return F.layer_norm(t, (t.shape[-1],), eps=self.cfg.ln_eps)


def patchify(images: Tensor, p: int) -> Tensor:
    """(B, C, g*p, g*p) -> (B, g*g, p*p*C), each patch laid out (p_row, p_col, C), the grid row-major: the inverse
    of ``latents.rae.unpatchify``."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


# ------------------------------------------------------------------------------------------------ encoder


class NanoEncoder(RepresentationEncoder):
    """``nano-vit-s`` behind the encoder interface: images in [-1, 1] -> ``EncoderFeatures`` (CLS (B, 48),
    patches (B, 64, 48)). Preprocess: [-1, 1] -> [0, 1] -> resized to 32 if needed -> mean/std 0.5, i.e. the
    [-1, 1] the network was trained on."""

    def __init__(self, model: NanoViT, name: str = NAME):
        super().__init__()
        self.model = model
        self.name = name
        self.embed_dim = model.cfg.width
        self.input_size = model.cfg.image_size
        self.set_input_norm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.freeze()

    def forward(self, images: Tensor) -> EncoderFeatures:
        h = self.model(self.preprocess(images, "bilinear", antialias=True))
        return EncoderFeatures(cls=h[:, 0], patches=h[:, 1:])


def _missing(name: str, source: str, why: str) -> NotAvailableError:
    from nanogen.encoders.base import env_key

    return NotAvailableError(
        f"cannot load representation encoder '{name}' from '{source}' ({why}); nanogen trains this one itself: run "
        f"`nanogen train-encoder` (it writes {DEFAULT_OUT}, about 70 s on 2 CPU cores), or point misc.weights.{name} "
        f"(or ${env_key(name)}) at another export"
    )


def load_nano_encoder(name: str, source: str | os.PathLike) -> NanoEncoder:
    """The frozen encoder from an export directory (``model.safetensors`` + ``config.json``)."""
    from safetensors.torch import load_file

    src = Path(source).expanduser()
    if not (src / WEIGHTS).is_file() or not (src / CONFIG).is_file():
        raise _missing(name, str(source), f"no {WEIGHTS} + {CONFIG} there")
    try:
        meta = json.loads((src / CONFIG).read_text())
        arch = meta["arch"]
        known = {f.name for f in fields(NanoViTConfig)}
        cfg = NanoViTConfig(**{k: v for k, v in arch.items() if k in known})
        state = load_file(str(src / WEIGHTS))
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        rerun = f"rerun `nanogen train-encoder --out {src}`"
        raise CheckpointError(f"cannot read the {name} export '{src}' ({msg}); {rerun}") from None
    model = NanoViT(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:240]
        raise CheckpointError(f"the {name} export '{src}' does not match its config.json: {msg}") from None
    return NanoEncoder(model, name)


# ------------------------------------------------------------------------------------------------ training


def _random_mask(batch: int, n: int, ratio: float, g: torch.Generator) -> Tensor:
    """(batch, n) bool with exactly round(ratio * n) True per row."""
    k = round(ratio * n)
    ranks = torch.rand(batch, n, generator=g).argsort(dim=1).argsort(dim=1)
    return ranks < k


class _Batches:
    """Endless shuffled batches of indices into ``n`` items, one permutation per pass (seeded)."""

    def __init__(self, n: int, batch: int, g: torch.Generator):
        self.n, self.batch, self.g = n, batch, g
        self.order, self.pos = torch.randperm(n, generator=g), 0

    def next(self) -> Tensor:
        if self.pos + self.batch > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.g), 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


@torch.no_grad()
def _evaluate(
    model: NanoViT, cls_head: nn.Module, pix_head: nn.Module, mask_token: Tensor, seed: int
) -> dict[str, float]:
    """Held-out numbers: CLS-probe accuracy on the 500 held-out digits; the masked-patch loss on the 1,000 held-out
    nano-mix images with a fixed mask (over all patches, as trained, and over the masked ones alone), next to the
    loss of predicting every pixel by its mean over those images (what a context-blind predictor reaches)."""
    from nanogen.data.nano import load_nano
    from nanogen.data.nano_mix import load_nano_mix

    model.eval()
    held = load_nano("heldout", model.cfg.image_size)
    acc = (cls_head(model(held.images)[:, 0]).argmax(1) == held.labels).float().mean().item()
    mix = load_nano_mix("heldout", model.cfg.image_size).images
    mask = _random_mask(len(mix), model.cfg.num_patches, MASK_RATIO, torch.Generator().manual_seed(seed + 1))
    target = patchify(mix, model.cfg.patch_size)
    err = (pix_head(model(mix, mask, mask_token)[:, 1:]) - target).pow(2).mean(-1)
    model.train()
    return {
        "heldout_cls_accuracy": acc,
        "heldout_mim_loss": err.mean().item(),
        "heldout_mim_loss_masked": err[mask].mean().item(),
        "heldout_mean_predictor_loss": (target - target.mean(0)).pow(2).mean().item(),
    }


def train_nano_encoder(
    out_dir: str | os.PathLike = DEFAULT_OUT, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH,
    seed: int = 0, progress: bool = True, lr: float = DEFAULT_LR,
) -> Path:  # fmt: skip
    """Train ``nano-vit-s`` (module docstring) and export it to ``out_dir``; returns ``out_dir``.

    AdamW (betas 0.9/0.95, weight decay 0.05 on matrices), ``lr`` with 5% linear warmup then cosine to 1%,
    CE + L2 with weight 1 each. Deterministic for a given (steps, batch_size, seed) on one machine: the seed fixes
    the initialisation, the batch order and the masks. ``out_dir`` gets ``model.safetensors`` (the
    encoder, no heads) and ``config.json`` (architecture + how it was trained, with the held-out numbers), both
    written to a temporary directory first and moved in one rename, so a crash never leaves half an export."""
    from nanogen.config.schema import SchedulerConfig
    from nanogen.data.nano import load_nano
    from nanogen.data.nano_mix import load_nano_mix
    from nanogen.log import progress as progress_bar
    from nanogen.optim import lr_factor

    if steps < 1 or batch_size < 1:
        raise UserError(f"train-encoder: --steps and --batch-size must be >= 1, got {steps} and {batch_size}")
    out = Path(out_dir).expanduser()
    _check_out(out)
    t0 = time.time()
    cfg = NanoViTConfig()
    torch.manual_seed(seed)
    model = NanoViT(cfg)
    cls_head = nn.Linear(cfg.width, 10)
    pix_head = nn.Linear(cfg.width, cfg.patch_size**2 * 3)
    mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
    nn.init.trunc_normal_(mask_token, std=0.02)
    digits = load_nano("train", cfg.image_size)
    mix = load_nano_mix("train", cfg.image_size)  # dataset.seed 42: the nano-scenes training set's opening
    g = torch.Generator().manual_seed(seed)
    digit_batches, mix_batches = _Batches(len(digits), batch_size, g), _Batches(len(mix.images), batch_size, g)

    params = [*model.parameters(), *cls_head.parameters(), *pix_head.parameters(), mask_token]
    decay = [p for p in params if p.dim() >= 2 and p is not mask_token]
    rest = [p for p in params if not (p.dim() >= 2 and p is not mask_token)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))  # fmt: skip
    sched = SchedulerConfig(type="cosine", warmup_steps=max(1, steps // 20), warmup_from_zero=True,
                            decay_end_steps=steps, base_lr=lr, final_lr=lr / 100)  # fmt: skip
    bar = progress_bar(steps, "nano encoder", unit="step") if progress else None
    sums, n_sum, final = torch.zeros(2), 0, {}
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, sched, steps)
        di, mi = digit_batches.next(), mix_batches.next()
        xd, yd, xm = digits.images[di], digits.labels[di], mix.images[mi]
        # One forward for both losses: the classified digits unmasked (as at inference), the mix images masked.
        mask = torch.cat([torch.zeros(len(xd), cfg.num_patches, dtype=torch.bool),
                          _random_mask(len(xm), cfg.num_patches, MASK_RATIO, g)])  # fmt: skip
        h = model(torch.cat([xd, xm]), mask, mask_token)
        ce = F.cross_entropy(cls_head(h[: len(xd), 0]), yd)
        mim = F.mse_loss(pix_head(h[len(xd) :, 1:]), patchify(xm, cfg.patch_size))
        loss = ce + mim
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += torch.stack([ce.detach(), mim.detach()])
        n_sum += 1
        if (step + 1) % 50 == 0 or step + 1 == steps:  # the only host sync between log points
            final = dict(zip(("ce", "mim"), (sums / n_sum).tolist(), strict=True))
            sums, n_sum = torch.zeros(2), 0
            if bar is not None:
                bar.set_postfix(ce=f"{final['ce']:.3f}", mim=f"{final['mim']:.4f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    train_s = time.time() - t0
    held = _evaluate(model, cls_head, pix_head, mask_token.detach(), seed)
    meta = {
        "name": NAME,
        "format": FORMAT,
        "arch": asdict(cfg),
        "output": "final LayerNorm without affine; CLS token first, then the 8x8 patch tokens row-major",
        "input": "images in [-1, 1] at 32x32 (other sizes are resized to 32)",
        "training": {
            "steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr, "mask_ratio": MASK_RATIO,
            "optimizer": "adamw (0.9, 0.95), weight decay 0.05 on matrices",
            "schedule": f"linear warmup {sched.warmup_steps} steps, cosine to lr/100",
            "data": {"cls": "mnist train (4,500 labelled digits)", "mim": "nano-mix train (4,500 digits + 4,500 scenes)"},
            "final_losses": {k: round(v, 6) for k, v in final.items()},  # mean of the last logging window
            **{k: round(v, 6) for k, v in held.items()},
            "seconds": round(train_s, 1),  # data loading and training, before the held-out evaluation
        },
    }  # fmt: skip
    _write_export(out, model.state_dict(), meta)
    if progress:
        print(
            f"nano encoder: {steps} steps, {train_s:.0f} s | train CE {final['ce']:.3f}, pixel L2 {final['mim']:.4f} "
            f"| held out: CLS-probe accuracy {held['heldout_cls_accuracy']:.1%}, masked-patch loss "
            f"{held['heldout_mim_loss']:.4f} (masked patches only {held['heldout_mim_loss_masked']:.4f}; per-pixel "
            f"mean predictor {held['heldout_mean_predictor_loss']:.4f}) | wrote {out}"
        )
    return out


def _check_out(out: Path) -> None:
    """``out`` must be new, empty, or a previous export: replacing it must never delete anything else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"train-encoder --out: '{out}' is a file; give a directory (default {DEFAULT_OUT})")
    other = sorted(p.name for p in out.iterdir() if p.name not in (WEIGHTS, CONFIG)) if out.is_dir() else []
    if other:
        raise UserError(
            f"train-encoder --out: '{out}' holds other files ({', '.join(other[:3])}); give a new or empty directory "
            f"or a previous export"
        )


def _write_export(out: Path, state: dict[str, Tensor], meta: dict) -> None:
    """Both files into a sibling temporary directory, then one rename onto ``out`` (a previous export is moved
    aside first and deleted after)."""
    from safetensors.torch import save_file

    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.with_name(f".{out.name}.{tag}-{os.getpid()}") for tag in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
