"""The config zoo: every DiffusionBench stage-2 config under the reference's names, the stage-1 RAE configs and the RAE
decoder sizes, written with nanogen's composition (spec reference.md §2.4-2.7, §4, §6.2-6.7, §7.5-7.6).

Only composes and resolves configs (no network is built), so the whole file runs in a few seconds. The expected values
are written out here from the spec, independently of the YAML files.
"""

import copy
import functools
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from nanogen.build import eval_shift, train_shift
from nanogen.config import load_config, to_dict
from nanogen.config.loader import compose
from nanogen.config.schema import Stage1Config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TRAIN = CONFIGS / "stage2" / "training"
SAMPLE = CONFIGS / "stage2" / "sampling"

# The 54 stage-2 training configs of the reference (spec reference-params.md), by task.
IMAGENET = [
    "ddt-en28d1152hd72-dn2d2048hd128-e2e-flux-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-e2e-qwen-vae-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-e2e-sd3.5-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-e2e-vavae-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-flux-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-flux2-reg0.03-rmsnorm-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-flux2-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-qwen-vae-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-rae-dinov2-reg0.03-rmsnorm-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-rae-dinov2-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-rae-dinov3-vit-b16-reg0.03-rmsnorm-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-rae-dinov3-vit-b16-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-rae-langpe-vit-l-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-rae-pe-vit-l-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-rae-siglip2-vit-b-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-rae-spatialpe-vit-l-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-sd3.5-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-sdvae-ema-reg0.03-rmsnorm-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-sdvae-ema-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4c8",
    "ddt-en28d1152hd72-dn2d2048hd128-sdxl-vae-vpred-t4c8",
    "jit-ddt-en28d1152hd72-dn2d2048hd128-xpred-t4c8",
    "mf-ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4c8-kappa0.0",
    "mf-ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4c8-kappa0.5",
    "pixelgen-ddt-en28d1152hd72-dn2d2048hd128-xpred-t4c8-0.1lpips-0.01pdino-thresh0.7",
    "pixnerd-ddt-en28d1152hd72-dn2d2048hd128-vpred-t4c8",
]
T2I = [
    "mf-t2i-ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4-kappa0.5",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-e2e-flux-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-e2e-qwen-vae-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-e2e-sd3.5-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-e2e-vavae-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-flux-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-flux2-reg0.03-rmsnorm-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-flux2-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-qwen-vae-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-dinov2-reg0.03-rmsnorm-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-dinov2-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-dinov3-vit-b16-reg0.03-rmsnorm-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-dinov3-vit-b16-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-langpe-vit-l-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-pe-vit-l-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-siglip2-vit-b-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-spatialpe-vit-l-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-sd3.5-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-sdvae-ema-reg0.03-rmsnorm-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-sdvae-ema-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4",
    "t2i-ddt-en28d1152hd72-dn2d2048hd128-sdxl-vae-vpred-t4",
    "t2i-ddt-en28d1584hd72-dn2d2048hd128-e2e-qwen-vae-vpred-t4-512res",
    "t2i-ddt-en28d1584hd72-dn2d2048hd128-flux2-vpred-t4-512res",
    "t2i-ddt-en28d1584hd72-dn2d2048hd128-qwen-vae-vpred-t4-512res",
    "t2i-jit-ddt-en28d1152hd72-dn2d2048hd128-xpred-t4",
    "t2i-pixelgen-ddt-en28d1152hd72-dn2d2048hd128-xpred-t4-0.1lpips-0.01pdino-thresh0.7",
    "t2i-pixnerd-ddt-en28d1152hd72-dn2d2048hd128-vpred-t4",
]

# Best ImageNet CFG scale per model, used on t in [0, 0.9] (spec §2.7), keyed by the latent token (+ "+reg") or method.
BEST_CFG = {
    "sdvae-ema": 1.6, "sdvae-mse": 1.6, "sdxl-vae": 1.6, "sdvae-ema+reg": 2.2, "flux": 2.0, "flux2": 2.0,
    "flux2+reg": 3.2, "sd3.5": 1.8, "qwen-vae": 1.6, "e2e-flux": 1.8, "e2e-sd3.5": 1.8, "e2e-vavae": 1.8,
    "e2e-qwen-vae": 1.8, "rae-dinov2": 4.8, "rae-dinov2+reg": 6.2, "rae-dinov3-vit-b16": 7.0, "rae-dinov3-vit-b16+reg": 7.8,
    "rae-siglip2-vit-b": 7.0, "rae-pe-vit-l": 5.0, "rae-langpe-vit-l": 5.0, "rae-spatialpe-vit-l": 9.0,
    "jit": 2.6, "pixelgen": 2.0, "pixnerd": 2.4,
}

# latent token -> (stage_1 target, latent [C, H, W], DDT patch, training shift s = sqrt(D / 4096)) at 256 px (spec §2.5)
SD, C16 = ([4, 32, 32], 2, 1.0), ([16, 32, 32], 2, 2.0)
RAE768, RAE1024 = ([768, 16, 16], 1, math.sqrt(48)), ([1024, 16, 16], 1, 8.0)
LATENTS = {
    "sdvae-ema": ("vae", *SD), "sdvae-mse": ("vae", *SD), "sdxl-vae": ("vae", *SD),
    "flux": ("vae", *C16), "sd3.5": ("vae", *C16), "e2e-flux": ("vae", *C16), "e2e-sd3.5": ("vae", *C16),
    "qwen-vae": ("qwen-vae", *C16), "e2e-qwen-vae": ("qwen-vae", *C16),
    "e2e-vavae": ("vae", [32, 16, 16], 1, math.sqrt(2)), "flux2": ("flux2-vae", [128, 16, 16], 1, math.sqrt(8)),
    "rae-dinov2": ("rae", *RAE768), "rae-dinov3-vit-b16": ("rae", *RAE768), "rae-siglip2-vit-b": ("rae", *RAE768),
    "rae-pe-vit-l": ("rae", *RAE1024), "rae-spatialpe-vit-l": ("rae", *RAE1024), "rae-langpe-vit-l": ("rae", *RAE1024),
    "pixel": ("pixel", [3, 256, 256], 16, math.sqrt(48)),
}
LATENTS_512 = {  # the T2I 512-px models (spec §2.5, §7.6)
    "qwen-vae": ("qwen-vae", [16, 64, 64], 2, 4.0), "e2e-qwen-vae": ("qwen-vae", [16, 64, 64], 2, 4.0),
    "flux2": ("flux2-vae", [128, 32, 32], 1, math.sqrt(32)),
}
ENCODERS = ["dinov2-vit-b", "dinov3-vit-b16", "siglip2-vit-b", "pe-vit-l", "spatialpe-vit-l", "langpe-vit-l"]


@pytest.fixture(scope="module", autouse=True)
def _parse_each_file_once():
    """Speed only: every config re-reads the task preset and the shared components, so parse each file once and
    hand composition a fresh copy each time (it edits what it reads)."""
    from nanogen.config import loader

    if not hasattr(loader, "read_yaml"):
        yield
        return
    parsed = functools.cache(loader.read_yaml)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader, "read_yaml", lambda path: copy.deepcopy(parsed(path)))
        yield


@functools.cache
def load(path: Path, *overrides: str):
    return load_config(path, list(overrides))


def training(task: str, name: str) -> Path:
    return TRAIN / task / f"{name}.yaml"


def names_in(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.yaml")}


def cfg_tag(w: float) -> str:
    return f"-cfg{w:.1f}-t0.0-0.9"


def model_key(name: str) -> str:
    """The BEST_CFG key of a training name."""
    for method in ("jit", "pixelgen", "pixnerd"):
        if name.startswith(f"{method}-") or name.startswith(f"t2i-{method}-"):
            return method
    return latent_token(name) + ("+reg" if "-reg0.03-rmsnorm-" in name else "")


def latent_token(name: str) -> str:
    m = re.search(r"-dn2d2048hd128-(.+?)-(?:reg0\.03-rmsnorm-)?[vx]pred", name)
    return m.group(1) if m else "pixel"


def method(name: str) -> str:
    for m in ("jit", "pixelgen", "pixnerd", "mf"):
        if name.startswith(f"{m}-") or name.startswith(f"t2i-{m}-"):
            return m
    return "reg" if "-reg0.03-rmsnorm-" in name else ("rae" if latent_token(name).startswith("rae-") else "vae")


def imagenet_twin(t2i_name: str) -> str | None:
    if t2i_name.endswith("-512res"):
        return None
    n = re.sub(r"-t4(?=-|$)", "-t4c8", t2i_name)
    return "mf-" + n[len("mf-t2i-"):] if n.startswith("mf-t2i-") else n[len("t2i-"):]


ALL_TRAINING = [("imagenet", n) for n in IMAGENET] + [("t2i", n) for n in T2I]


def without(tree: dict, *paths: str) -> dict:
    for p in paths:
        *parents, leaf = p.split(".")
        node = tree
        for k in parents:
            node = node[k]
        node.pop(leaf)
    return tree


# ----------------------------------------------------------------------------------------------------------
# the file sets


def test_training_file_names_are_the_references():
    assert len(IMAGENET) == 26 and len(T2I) == 28
    assert names_in(TRAIN / "imagenet") == set(IMAGENET)
    assert names_in(TRAIN / "t2i") == set(T2I)


def test_sampling_file_names():
    expected = set()
    for n in IMAGENET:
        expected.add(n)
        if method(n) != "mf":
            expected.add(n + cfg_tag(BEST_CFG[model_key(n)]))
    assert len(expected) == 50 and names_in(SAMPLE / "imagenet") == expected
    assert names_in(SAMPLE / "t2i") == set(T2I)


def test_every_zoo_yaml_has_a_header_comment():
    files = [p for d in ("stage1", "stage2/components", "stage2/training/imagenet", "stage2/training/t2i",
                         "stage2/sampling") for p in (CONFIGS / d).rglob("*.yaml")]
    assert len(files) > 160
    bad = [str(p.relative_to(CONFIGS)) for p in files if not p.read_text().startswith("# ")]
    assert not bad, f"no header comment: {bad}"


def test_every_stage2_config_loads():
    files = sorted([*TRAIN.glob("imagenet/*.yaml"), *TRAIN.glob("t2i/*.yaml"), *SAMPLE.glob("*/*.yaml")])
    assert len(files) == 26 + 28 + 50 + 28
    for p in files:
        cfg = load(p)
        assert cfg.stage_2.target == "DDT" and cfg.run.name == p.stem


# ----------------------------------------------------------------------------------------------------------
# training configs: family values (spec §2.5)


@pytest.mark.parametrize("task, name", ALL_TRAINING, ids=[n for _, n in ALL_TRAINING])
def test_family_values(task, name):
    cfg = load(training(task, name))
    assert cfg.task == task
    tok, m = latent_token(name), method(name)
    res512 = name.endswith("-512res")
    target, latent, p, s_train = (LATENTS_512 if res512 else LATENTS)[tok]

    # tokenizer
    assert cfg.stage_1.target == target
    if target in ("vae", "qwen-vae", "flux2-vae"):
        # resolve() fills the typed defaults (posterior mode, FLUX.2 BatchNorm eps)
        assert cfg.stage_1.params == {"vae_type": tok, "resolution": 512 if res512 else 256, "sample_mode": "mode",
                                      "eps": 1e-5}  # fmt: skip
    elif target == "rae":
        enc = {"rae-dinov2": "dinov2-vit-b"}.get(tok, tok[len("rae-"):])
        assert cfg.stage_1.params == {
            "encoder_name": enc, "resolution": 256, "decoder_config_path": "configs/decoder/ViTXL/config.json",
            "decoder_patch_size": 16, "pretrained_decoder_path": f"pretrained_models/stage1/decoders/{enc}/decoder.pt",
            "noise_tau": 0.0, "normalization_stat_path": f"pretrained_models/stage1/stats/{enc}/stats.pt",
            "eps": 1e-5,
        }
        assert (REPO / cfg.stage_1.params["decoder_config_path"]).is_file()
    else:
        assert cfg.stage_1.params == {}
    assert cfg.training.image_size == (512 if res512 else 256)

    # latent, DDT shape (the name spells it: en{L}d{D}hd{head}-dn{L}d{D}hd{head})
    assert cfg.misc.latent_size == latent and cfg.misc.time_dist_shift_dim == math.prod(latent)
    sp = cfg.stage_2.params
    L_e, D_e, h_e, L_d, D_d, h_d = map(int, re.search(r"en(\d+)d(\d+)hd(\d+)-dn(\d+)d(\d+)hd(\d+)", name).groups())
    assert sp["depth"] == [L_e, L_d] == [28, 2] and sp["hidden_size"] == [D_e, D_d]
    assert sp["num_heads"] == [D_e // h_e, D_d // h_d] and sp["mlp_ratio"] == 4.0
    assert sp["hidden_size"] == ([1584, 2048] if res512 else [1152, 2048])
    assert sp["patch_size"] == [p, p] and sp["input_size"] == latent[1] and sp["in_channels"] == latent[0]
    assert latent[1] // p == (32 if res512 else 16)  # 256 (1024 at 512 px) image tokens

    # transport and shifts (spec §4.1)
    assert cfg.transport.prediction == ("x" if "-xpred-" in name else "velocity")
    assert ("x" if m in ("jit", "pixelgen") else "velocity") == cfg.transport.prediction
    assert cfg.transport.time_dist_type == {
        "jit": "logit-normal_-1.1_0.8", "pixelgen": "logit-normal_-1.1_0.8", "pixnerd": "logit-normal_-1.94_1.0",
        "mf": "logit-normal_-0.4_1.0",
    }.get(m, "logit-normal_0_1")
    assert train_shift(cfg) == pytest.approx(s_train)
    pixel_eval_at_1 = m in ("jit", "pixelgen") or (m == "pixnerd" and task == "imagenet")  # T2I PixNerd: QUIRK
    assert eval_shift(cfg) == pytest.approx(1.0 if pixel_eval_at_1 else s_train)

    # methods
    reg = m == "reg"
    assert cfg.repa.use_reg is reg and sp["enable_reg"] is reg and not cfg.repa.use_repa
    if reg:
        assert cfg.repa.reg_coeff == 0.03 and cfg.repa.target_encoder == "dinov2-vit-b"
        assert cfg.repa.z_dim == 768 and sp["z_dim"] == 768
    mf = m == "mf"
    assert (cfg.transport.meanflow is not None) is mf and sp["is_meanflow"] is mf and cfg.guidance.disabled is mf
    if mf:
        kappa = float(re.search(r"-kappa([0-9.]+)$", name).group(1))
        assert to_dict(cfg.transport.meanflow) == {
            "fm_ratio": 0.75, "norm_p": 1.0, "norm_eps": 0.01, "cfg_omega": 1.0, "cfg_kappa": kappa,
            "cfg_t_start": 0.0, "cfg_t_end": 1.0,
        }
    if m == "pixelgen":
        assert cfg.perceptual_loss.encoders == "lpips,dinov2-vit-b"
        assert cfg.perceptual_loss.percep_loss_weights == [0.1, 0.01] and cfg.transport.percep_loss_t_thresh == 0.7
    else:
        assert cfg.perceptual_loss.encoders == "" and cfg.perceptual_loss.percep_loss_weights == []


@pytest.mark.parametrize("task, name", ALL_TRAINING, ids=[n for _, n in ALL_TRAINING])
def test_common_settings_conditioning_and_schedule(task, name):
    cfg = load(training(task, name))
    tc = cfg.training
    # common to all stage-2 training configs
    assert (tc.global_batch_size, tc.ema_decay, tc.clip_grad, tc.global_seed) == (1024, 0.9995, 1.0, 42)
    assert (tc.log_interval, tc.num_workers, cfg.sampler.num_steps) == (100, 4, 50)
    o = tc.optimizer
    assert (o.type, o.lr, o.betas, o.weight_decay) == ("adamw", 2e-4, [0.9, 0.95], 0.0)
    assert cfg.conditioning.cfg_dropout_prob == 0.1
    assert cfg.conditioning.arch.num_t_tokens == 4 and cfg.stage_2.params["cond_arch"]["num_t_tokens"] == 4
    s = tc.scheduler
    assert (s.type, s.warmup_from_zero, s.base_lr, s.final_lr) == ("linear", False, 2e-4, 2e-5)
    m = method(name)
    if task == "imagenet":
        assert name.endswith("-t4c8") or "-t4c8-" in name
        assert cfg.conditioning.type == "label" and cfg.conditioning.arch.num_c_tokens == 8
        assert cfg.stage_2.params["cond_arch"]["num_c_tokens"] == 8 and cfg.stage_2.params["condition_type"] == "label"
        assert (cfg.dataset.target, cfg.dataset.type, cfg.dataset.data_dir) == ("imagenet", "hf", "./data/imagenet")
        assert cfg.misc.num_classes == 1000 and cfg.stage_2.params["num_classes"] == 1000
        assert (tc.epochs, tc.virtual_epoch_steps, s.warmup_epochs, s.decay_end_epoch) == (80, None, 40, 800)
        assert tc.checkpoint_interval == (10 if m in ("jit", "pixelgen", "pixnerd") else 5)
        every = 12500 if m in ("rae", "reg") else 25000
        assert tc.sample_every == every and cfg.eval.eval_interval == every
        ds = cfg.eval.datasets["imagenet"]
        assert ds.reference_npz == "./data/imagenet/jit_in256_stats.npz" and ds.metrics == ["fid", "inception_score"]
        assert to_dict(cfg.guidance.cfg) == {"scale": 1.0, "t_min": 0.0, "t_max": 1.0}  # training evals without CFG
    else:
        assert not re.search(r"-t4c\d", name)
        assert cfg.conditioning.type == "text" and cfg.conditioning.text_encoder.model_name == "Qwen/Qwen3-0.6B"
        assert cfg.conditioning.arch.num_c_tokens == 256 and cfg.stage_2.params["cond_arch"]["num_c_tokens"] == 256
        assert cfg.stage_2.params["condition_type"] == "text" and cfg.stage_2.params["context_dim"] == 1024
        assert (cfg.dataset.target, cfg.dataset.type, cfg.dataset.condition_type) == ("blip3o", "wds", "text")
        assert cfg.dataset.split == ["journeydb", "long-caption", "short-caption"]
        assert cfg.dataset.data_dir == ("./data/blip3o" if name.endswith("-512res") else "./data/blip3o-256")
        assert (tc.epochs, tc.virtual_epoch_steps, s.warmup_epochs, s.decay_end_epoch) == (10, 10000, 5, 100)
        assert (tc.checkpoint_interval, tc.sample_every, cfg.eval.eval_interval) == (1, 10000, 10000)
        assert set(cfg.eval.datasets) == {"geneval", "dpgbench", "genaibench"}
        assert to_dict(cfg.guidance.cfg) == {"scale": 6.0, "t_min": 0.0, "t_max": 1.0}


# ----------------------------------------------------------------------------------------------------------
# ImageNet -> T2I is one line (spec §2.6)


@pytest.mark.parametrize("name", T2I)
def test_t2i_twin_is_the_imagenet_config_with_task_t2i(name):
    twin = imagenet_twin(name)
    raw = yaml.safe_load(training("t2i", name).read_text())
    if twin is None:  # the 512-px models have no ImageNet twin
        assert name.endswith("-512res") and raw["task"] == "t2i"
        return
    assert twin in IMAGENET
    assert raw == {"defaults": [f"../imagenet/{twin}.yaml"], "task": "t2i"}
    mine = without(to_dict(load(training("t2i", name))), "run.name")
    switched = without(to_dict(load(training("imagenet", twin), "task=t2i")), "run.name")
    assert mine == switched


def test_every_imagenet_model_but_meanflow_kappa0_has_a_t2i_twin():
    twins = {imagenet_twin(n) for n in T2I} - {None}
    assert set(IMAGENET) - twins == {"mf-ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4c8-kappa0.0"}


# ----------------------------------------------------------------------------------------------------------
# sampling configs (spec §2.7)


@pytest.mark.parametrize("task, name", ALL_TRAINING, ids=[n for _, n in ALL_TRAINING])
def test_sampling_configs(task, name):
    train_cfg = load(training(task, name))
    cfg = load(SAMPLE / task / f"{name}.yaml")
    assert cfg.stage_2.ckpt == f"pretrained_models/{task}/ckpts/{name}-v0.pt"
    assert cfg.eval.eval_dir == f"evals/sampling/{task}"
    mf = method(name) == "mf"
    assert cfg.sampler.num_steps == (1 if mf else 50)
    # otherwise the training config, unchanged
    changed = ("run.name", "stage_2.ckpt", "eval.eval_dir", "sampler.num_steps")
    assert without(to_dict(cfg), *changed) == without(to_dict(train_cfg), *changed)
    if task == "t2i":
        assert mf or to_dict(cfg.guidance.cfg) == {"scale": 6.0, "t_min": 0.0, "t_max": 1.0}
    else:
        assert cfg.guidance.cfg.scale == 1.0  # the CFG-off copy
    assert cfg.guidance.disabled is mf
    if task == "imagenet" and not mf:
        w = BEST_CFG[model_key(name)]
        best = load(SAMPLE / task / f"{name}{cfg_tag(w)}.yaml")
        assert to_dict(best.guidance.cfg) == {"scale": w, "t_min": 0.0, "t_max": 0.9}
        assert best.stage_2.ckpt == cfg.stage_2.ckpt and best.eval.eval_dir == cfg.eval.eval_dir
        assert without(to_dict(best), "run.name", "guidance.cfg") == without(to_dict(cfg), "run.name", "guidance.cfg")


# ----------------------------------------------------------------------------------------------------------
# stage 1 (spec §6.2, §6.7) and the RAE decoder sizes (§6.3)


def test_stage1_configs():
    files = sorted((CONFIGS / "stage1").glob("*.yaml"))
    assert {p.stem for p in files} == {f"rae-{e}-vitxl" for e in ENCODERS}
    for p in files:
        cfg = compose(p, [], Stage1Config)
        enc = p.stem[len("rae-"):-len("-vitxl")]
        assert cfg.stage_1.target == "rae"
        assert cfg.stage_1.params == {
            "encoder_name": enc, "resolution": 256, "decoder_config_path": "configs/decoder/ViTXL/config.json",
            "decoder_patch_size": 16, "noise_tau": 0.8,
        }
        tc = cfg.training
        assert (tc.epochs, tc.global_batch_size, tc.ema_decay, tc.image_size) == (16, 512, 0.9978, 256)
        assert not tc.clip_grad
        o, s = tc.optimizer, tc.scheduler
        assert (o.type, o.lr, o.betas, o.weight_decay) == ("adamw", 2e-4, [0.9, 0.95], 0.0)
        assert (s.type, s.warmup_epochs, s.warmup_from_zero, s.decay_end_epoch) == ("cosine", 1.0, True, 16.0)
        assert (s.base_lr, s.final_lr) == (2e-4, 2e-5)
        assert cfg.gan.optimizer == o and cfg.gan.scheduler == s
        assert (cfg.dataset.target, cfg.dataset.type, cfg.dataset.data_dir) == ("imagenet", "hf", "./data/imagenet")
        assert cfg.eval.eval_interval == 2500
        ds = cfg.eval.datasets["imagenet"]
        assert ds.metrics == ["psnr", "ssim", "rfid"] and ds.reference_npz == "./data/imagenet/imagenet-256-val.npz"


DECODERS = {  # name -> (layers, width, heads, FFN, patch)
    "ViTB": (12, 768, 12, 3072, 16), "ViTL": (24, 1024, 16, 4096, 16),
    "ViTXL": (28, 1152, 16, 4096, 16), "ViTSO": (28, 1152, 16, 4096, 14),
}


def test_decoder_configs():
    found = {p.parent.name for p in (CONFIGS / "decoder").glob("*/config.json")}
    assert found - {"nano"} == set(DECODERS)  # nano: the nano tier's own 32-px decoder (tests/test_nano_rae.py)
    for name, (L, D, h, F, p) in DECODERS.items():
        c = json.loads((CONFIGS / "decoder" / name / "config.json").read_text())
        got = (c["decoder_num_hidden_layers"], c["decoder_hidden_size"], c["decoder_num_attention_heads"],
               c["decoder_intermediate_size"], c["patch_size"])
        assert got == (L, D, h, F, p), name
        assert c["model_type"] == "vit_mae" and c["hidden_act"] == "gelu" and c["layer_norm_eps"] == 1e-12
        assert c["num_channels"] == 3 and c["image_size"] == 16 * p and isinstance(c["hidden_size"], int)
