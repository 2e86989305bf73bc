"""The typed config tree.

One tree for a whole run, with the reference's blocks (spec ``reference.md`` §2): ``stage_1``, ``stage_2``,
``conditioning``, ``transport``, ``sampler``, ``guidance``, ``repa``, ``internal_guidance``,
``perceptual_loss``, ``dataset``, ``training``, ``eval``, ``misc``. nanogen adds ``task`` (the preset that
switches a method between ImageNet, text-to-image and the built-in nano tier) and ``run`` (where results
go). Every field has a default and a one-line comment; loading is strict (``config/loader.py``).

Field names and defaults follow the reference so its YAML files load unchanged (its ``target:`` import
strings resolve through the alias table in ``registry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# ----------------------------------------------------------------------------------------------------------
# Shared blocks (reference §2.1)


@dataclass
class ModelConfig:
    target: str = ""  # registry name, e.g. "LightningDiT", "DDT", "pixel"; reference import paths are aliased
    params: dict[str, Any] = field(default_factory=dict)  # constructor arguments, checked against the model's own typed config
    ckpt: str | None = None  # weights to load for evaluation / sampling (EMA entry preferred)


@dataclass
class MiscConfig:
    latent_size: list[int] = field(default_factory=lambda: [768, 16, 16])  # [C, H, W] seen by the stage-2 model
    num_classes: int = 1000  # number of class labels; index num_classes is the null (CFG) label
    time_dist_shift_dim: int | None = None  # D in the resolution shift s = sqrt(D / base); None = prod(latent_size)
    time_dist_shift_base: int = 4096  # base of the training-time shift
    time_dist_shift_base_eval: int | None = None  # base of the sampling-time shift; None = same as training
    weights: dict[str, str] = field(default_factory=dict)  # frozen networks by name -> local path or hub id, e.g. {dinov2-vit-b: /models/dinov2}


@dataclass
class OptimizerConfig:
    type: Literal["adamw", "gmuon"] = "adamw"  # gmuon = Muon on 2-D weights + AdamW on the rest
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    eps: float = 1e-8
    momentum: float = 0.95  # Muon only
    nesterov: bool = True  # Muon only
    adamw_lr: float | None = None  # Muon only: lr of the AdamW part (None = lr)
    ns_use_kernels: bool = False  # Muon only
    ns_coefficients_preset: str = "POLAR_EXPRESS_COEFFICIENTS"  # Muon only


@dataclass
class SchedulerConfig:
    type: Literal["cosine", "linear", "constant"] = "cosine"  # shape between warmup and decay_end
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    warmup_from_zero: bool = True  # False: the warmup phase holds base_lr (the reference's stage-2 configs)
    decay_end_epoch: float = 16.0
    decay_end_steps: int | None = None  # overrides decay_end_epoch when set
    base_lr: float = 2e-4
    final_lr: float = 2e-5


@dataclass
class DatasetConfig:
    target: str = "imagenet"  # "imagenet" | "blip3o" | "mnist" / "nano-scenes" (built-in nano tiers) | any name for type folder
    type: str = "hf"  # "hf" (Arrow) | "folder" (raw ImageNet class folders, or images + captions.jsonl) | "wds" (WebDataset shards) | "builtin"
    data_dir: str = "./data"
    split: str | list[str] = "train"
    condition_type: Literal["label", "text"] | None = None  # overrides conditioning.type when set
    shared_tmpdir: str = "~/tmp"
    shuffle_buffer: int = 10000
    seed: int = 42
    num_workers: int | None = None  # None = training.num_workers
    latents_dir: str | None = None  # pre-extracted latent shards (`nanogen extract-latents`) read instead of encoding each step
    flip: bool = False  # random horizontal flip (p = 1/2); off by default because the reference never applies its flip (§7.1)
    pin_memory: bool = True  # page-locked batches for faster host-to-GPU copies


@dataclass
class EvalDatasetConfig:
    type: str = "hf"  # "hf" (Arrow, or the prompt set's own files) | "builtin"
    data_dir: str = "./data"
    split: str = "val"
    condition_type: Literal["label", "text"] | None = "label"
    reference_npz: str | None = None  # reference Inception statistics; required for "fid" on external sets
    metrics: list[str] = field(default_factory=lambda: ["fid"])
    target: str | None = None  # dataset name; None = the key of this entry
    num_samples: int = 50000  # generated images per evaluation (text sets: at most one per prompt x images_per_prompt)
    batch_size: int = 64  # generation batch per process
    images_per_prompt: int = 1  # text sets: samples per prompt (the reference: 1; official GenEval / DPG-Bench: 4)
    reference_images: str | None = None  # real images (folder or uint8 .npz) for mind_* and precision_recall
    stats_dir: str | None = None  # published FD_r statistics (fd_*/fdr_*); None = <data_dir>/fd-stats
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-metric options, e.g. {vqascore: {model: ...}}


@dataclass
class EvalConfig:
    eval_interval: int = 5000  # steps between online evaluations (0 = only at the end)
    eval_model: bool = False  # also evaluate the raw (non-EMA) weights
    eval_dir: str | None = None  # where metric CSVs (<run.name>_{ema,model}.csv) go; None = <run dir>/evals
    eval_at_start: bool = False  # also evaluate the untrained model (a baseline for the curve)
    save_samples: bool = False  # keep uint8 sample shards under <eval_dir>/samples/<run>/<step>/ (nanogen eval always does)
    shard_size: int | None = None  # samples per shard; None = about 1000 (at least 32 shards), whole batches
    datasets: dict[str, EvalDatasetConfig] = field(default_factory=dict)


@dataclass
class TrainingConfig:
    epochs: int = 16
    batch_size: int = 32  # per-process micro batch when global_batch_size is None
    global_batch_size: int | None = None  # total batch over processes and accumulation steps
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when set)
    num_workers: int = 4
    global_seed: int = 0
    ema_decay: float = 0.9995
    clip_grad: float | None = None  # global grad-norm clip; None or 0 = off
    log_interval: int = 100  # steps between log lines
    checkpoint_interval: int = 4  # epochs between checkpoints
    checkpoint_every_steps: int | None = None  # additionally save every N steps (resumable mid-epoch)
    keep_checkpoints: int = 2  # newest checkpoints kept in checkpoints/ (0 = keep all)
    keep_every_steps: int | None = None  # also keep every checkpoint whose step is a multiple of this (milestones)
    sample_every: int = 2500  # steps between sample grids
    final_samples: bool = True  # a sample grid at the end of training (the bench suite draws its own from eval samples)
    virtual_epoch_steps: int | None = None  # length of an "epoch" for streaming data (T2I)
    grad_accum_steps: int = 1
    image_size: int = 256
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast; parameters stay fp32
    compile: bool = False  # torch.compile each transformer block (applied in parallel.py)
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" compiles in seconds; for debugging)
    compile_mode: str | None = None  # torch.compile mode: None, "max-autotune", "reduce-overhead", ...
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # multi-process training: DDP, or FSDP2 (fully_shard per block)
    nonfinite: Literal["stop", "skip"] = "stop"  # NaN/Inf loss: stop naming the step, or skip the update (one sync per step)
    max_skipped_steps: int = 10  # with nonfinite=skip: stop after this many skipped steps in a row
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig | None = field(default_factory=SchedulerConfig)  # None = constant lr


# ----------------------------------------------------------------------------------------------------------
# Stage-2 blocks (reference §2.3)


@dataclass
class MeanflowConfig:
    fm_ratio: float = 0.75
    norm_p: float = 1.0
    norm_eps: float = 0.01
    cfg_omega: float = 1.0
    cfg_kappa: float = 0.5
    cfg_t_start: float = 0.0
    cfg_t_end: float = 1.0


@dataclass
class TransportConfig:
    prediction: Literal["velocity", "x"] = "velocity"  # what the network outputs
    time_dist_type: str = "logit-normal_0_1"  # "logit-normal_MU_SIGMA" in the data-at-0 convention
    t_eps: float = 0.05  # floor of t in the (x_t - x) / t target and the x->v conversion (reference QUIRK, §4.2); 0 = textbook eps - x
    percep_loss_t_thresh: float = 0.7
    meanflow: MeanflowConfig | None = None


@dataclass
class SamplerConfig:
    num_steps: int = 50
    solver: Literal["euler", "heun"] = "euler"  # the reference has Euler only


@dataclass
class CFGConfig:
    scale: float = 1.0  # active iff > 1
    t_min: float = 0.0  # guidance interval in t (t = 1 is noise)
    t_max: float = 1.0


@dataclass
class IGConfig:
    scale: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0
    unconditional_scale: float | None = None


@dataclass
class GuidanceConfig:
    cfg: CFGConfig = field(default_factory=CFGConfig)
    ig: IGConfig = field(default_factory=IGConfig)
    disabled: bool = False


@dataclass
class RepaConfig:
    use_repa: bool = False
    use_reg: bool = False
    reg_coeff: float = 0.03
    repa_layer_depth: int = 8
    repa_coeff: float = 0.5
    target_encoder: str = "dinov2-vit-b"
    target_encoder_resolution: int = 256
    z_dim: int | None = None  # runtime: the target encoder's embedding width


@dataclass
class TextEncoderConfig:
    model_name: str = "Qwen/Qwen3-0.6B"  # a hub id, a local directory, or "minilm" (the MiniLM shipped in a wheel)
    max_length: int = 256  # tokens; longer captions are truncated (and counted)
    cache_dir: str | None = None  # on-disk text-embedding cache keyed by caption hash; "auto" = $NANOGEN_CACHE/text (null = in memory only)


@dataclass
class CondArchConfig:
    num_t_tokens: int = 4
    num_c_tokens: int = 8


@dataclass
class ConditioningConfig:
    type: Literal["label", "text"] = "label"
    text_encoder: TextEncoderConfig | None = None
    cfg_dropout_prob: float = 0.1
    context_dim: int | None = None  # runtime: the text encoder's hidden size
    arch: CondArchConfig = field(default_factory=CondArchConfig)


@dataclass
class InternalGuidanceConfig:
    base_model_depth: int | None = None
    base_model_coeff: float = 1.0


@dataclass
class PerceptualLossConfig:
    encoders: str = ""  # comma list, e.g. "lpips,dinov2-vit-b"; empty = off
    percep_loss_weights: list[float] = field(default_factory=list)


@dataclass
class RunConfig:
    name: str | None = None  # run directory name; None = the config file's stem (or the task name)
    results_dir: str = "results"  # runs go to <results_dir>/<name>/
    resume: bool = True  # continue from the newest checkpoint in the run directory if there is one
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda"
    wandb: bool = False  # also log to Weights & Biases (needs the [wandb] extra)


@dataclass
class Stage2Config:
    """A stage-2 (diffusion) run: training, sampling and evaluation all read this tree."""

    task: str | None = None  # preset: "imagenet" | "t2i" | "nano"; the one line that switches a method's task
    stage_1: ModelConfig = field(default_factory=lambda: ModelConfig(target="pixel"))
    stage_2: ModelConfig = field(default_factory=lambda: ModelConfig(target="LightningDiT"))
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    internal_guidance: InternalGuidanceConfig = field(default_factory=InternalGuidanceConfig)
    perceptual_loss: PerceptualLossConfig = field(default_factory=PerceptualLossConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig | None = None
    misc: MiscConfig = field(default_factory=MiscConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------------------------------------
# Stage-1 blocks (reference §2.2)


@dataclass
class GanArchConfig:
    dino_ckpt_path: str = "models/discs/dino_vit_small_patch8_224.pth"
    ks: int = 9
    norm_type: str = "bn"
    using_spec_norm: bool = True
    recipe: str = "S_8"  # "S_8" (DINO ViT-S/8, the reference) | "tiny" (a 4-block width-32 ViT for CPU tests)


@dataclass
class GanAugmentConfig:
    prob: float = 1.0
    cutout: float = 0.0


@dataclass
class GanLossConfig:
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    gen_loss: Literal["hinge", "vanilla", "non-saturating"] = "vanilla"  # hinge and vanilla: -mean D(fake) (§6.7)
    disc_weight: float = 0.75
    perceptual_weight: float = 1.0
    disc_start: int = 8  # epoch at which the generator's adversarial term starts
    disc_upd_start: int = 6  # epoch at which discriminator updates start
    lpips_start: int = 0
    max_d_weight: float = 1e4
    disc_updates: int = 1


@dataclass
class GanConfig:
    arch: GanArchConfig = field(default_factory=GanArchConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig | None = None
    augment: GanAugmentConfig = field(default_factory=GanAugmentConfig)
    loss: GanLossConfig = field(default_factory=GanLossConfig)


@dataclass
class Stage1Config:
    """A stage-1 (tokenizer decoder) run."""

    stage_1: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    eval: EvalConfig | None = None
    misc: MiscConfig = field(default_factory=MiscConfig)  # only misc.weights is read: frozen networks by name -> local path or hub id
    run: RunConfig = field(default_factory=RunConfig)
