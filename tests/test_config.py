"""The config tree: strict loading, composition, task switching, overrides, round trips."""

import dataclasses

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEMO
from nanogen.config import dump_yaml, load_config
from nanogen.config.loader import build, compose
from nanogen.config.schema import Stage1Config, Stage2Config
from nanogen.errors import ConfigError


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_demo_config_resolves_model_params():
    cfg = load_config(DEMO)
    p = cfg.stage_2.params
    assert cfg.task == "nano" and cfg.stage_2.target == "LightningDiT-XS"
    assert (p["in_channels"], p["input_size"], p["num_classes"]) == (3, 32, 10)  # derived from misc
    assert (p["hidden_size"], p["depth"], p["num_heads"], p["patch_size"]) == (128, 4, 4, 4)  # size + file
    assert cfg.run.name == "lightningdit-xs-pixel-xpred-t4c8"


def test_unknown_key_names_file_path_and_closest_key(tmp_path):
    p = write(tmp_path, "bad.yaml", {"training": {"global_batchsize": 256}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "training.global_batchsize" in msg and "did you mean 'training.global_batch_size'" in msg


def test_unknown_top_level_block(tmp_path):
    p = write(tmp_path, "bad.yaml", {"trainig": {"epochs": 3}})
    with pytest.raises(ConfigError, match="did you mean 'training'"):
        load_config(p)


@pytest.mark.parametrize(
    "block, fragment",
    [
        ({"training": {"epochs": "ten"}}, "training.epochs: expected an integer"),
        ({"training": {"precision": "fp16"}}, "training.precision: must be one of"),
        ({"sampler": {"num_steps": 2.5}}, "sampler.num_steps: expected an integer"),
        ({"misc": {"latent_size": 4}}, "misc.latent_size: expected a list"),
        ({"training": {"optimizer": 3}}, "training.optimizer: must be a mapping"),
        ({"guidance": {"cfg": {"scale": True}}}, "guidance.cfg.scale: expected a number"),
    ],
)
def test_wrong_types(tmp_path, block, fragment):
    p = write(tmp_path, "bad.yaml", block)
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        load_config(p)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: 'nope.yaml'"):
        load_config("nope.yaml")
    p = write(tmp_path, "broken.yaml", "training: {epochs: [1, 2}\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 1"):
        load_config(p)


def test_overrides_are_typed_and_strict():
    cfg = load_config(DEMO, ["training.global_batch_size=256", "guidance.cfg.scale=3", "eval=null"])
    assert cfg.training.global_batch_size == 256 and cfg.guidance.cfg.scale == 3.0 and cfg.eval is None
    with pytest.raises(ConfigError, match="command-line override 'training.lrr=1'.*unknown key"):
        load_config(DEMO, ["training.lrr=1"])
    with pytest.raises(ConfigError, match="cannot parse override"):
        load_config(DEMO, ["training.lr"])
    with pytest.raises(ConfigError, match="stage_2.params.hidden_sise: unknown key; did you mean 'stage_2.params.hidden_size'"):
        load_config(DEMO, ["stage_2.params.hidden_sise=64"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.max_steps=-5", "training.max_steps: must be >= 0 (or null), got -5"),
        ("training.batch_size=0", "training.batch_size: must be >= 1"),
        ("training.ema_decay=1.5", "training.ema_decay: must be in [0, 1]"),
        ("eval.datasets.mnist.num_samples=1", "eval.datasets.mnist: num_samples must be >= 2"),
    ],
)
def test_value_ranges(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(DEMO, [override])


def test_model_params_are_checked():
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        load_config(DEMO, ["stage_2.params.num_heads=3"])
    with pytest.raises(ConfigError, match="input_size 32 is not divisible by patch_size 5"):
        load_config(DEMO, ["stage_2.params.patch_size=5"])
    with pytest.raises(ConfigError, match="unknown name 'LightningDIT'; did you mean 'LightningDiT'"):
        load_config(DEMO, ["stage_2.target=LightningDIT"])
    with pytest.raises(ConfigError, match="not available in this nanogen release yet"):
        load_config(DEMO, ["stage_2.target=stage2.models.DDT.DiTwDDTHeadIG"])


def test_reference_alias_resolves():
    cfg = load_config(DEMO, ["stage_2.target=stage2.models.lightningDiT.LightningDiT", "stage_1.target=stage1.pixel.PixelEncoder"])
    assert cfg.stage_2.target == "LightningDiT" and cfg.stage_1.target == "pixel"


def test_task_switch_is_one_line(tmp_path):
    """The same method file, switched from ImageNet to T2I by its task line only."""
    method = {"stage_2": {"target": "LightningDiT", "params": {"hidden_size": 64, "depth": 2, "num_heads": 4}},
              "misc": {"latent_size": [4, 32, 32]}, "transport": {"prediction": "velocity"}}
    a = write(tmp_path, "imagenet.yaml", {"task": "imagenet", **method})
    b = write(tmp_path, "t2i.yaml", {"task": "t2i", **method})
    diff = [x for x in b.read_text().splitlines() if x not in a.read_text().splitlines()]
    assert diff == ["task: t2i"]
    ci, ct = load_config(a), load_config(b)
    assert ci.conditioning.type == "label" and ci.dataset.target == "imagenet" and ci.stage_2.params["cond_arch"]["num_c_tokens"] == 8
    assert ct.conditioning.type == "text" and ct.dataset.target == "blip3o" and ct.guidance.cfg.scale == 6.0
    assert ct.stage_2.params["condition_type"] == "text" and ct.stage_2.params["context_dim"] == 1024
    assert ct.stage_2.params["cond_arch"]["num_c_tokens"] == 256  # one token per text position
    assert ct.training.virtual_epoch_steps == 10000 and set(ct.eval.datasets) == {"geneval", "dpgbench", "genaibench"}
    assert load_config(a, ["task=t2i"]).conditioning.type == "text"  # or on the command line


def test_defaults_and_per_task(tmp_path):
    write(tmp_path, "base.yaml", {"training": {"epochs": 7, "batch_size": 5}, "misc": {"latent_size": [4, 32, 32]}})
    p = write(tmp_path, "child.yaml", {
        "defaults": ["base.yaml"], "task": "imagenet", "training": {"batch_size": 9},
        "per_task": {"imagenet": {"training": {"checkpoint_interval": 10}}, "t2i": {"training": {"checkpoint_interval": 2}}},
    })
    cfg = load_config(p)
    assert (cfg.training.epochs, cfg.training.batch_size, cfg.training.checkpoint_interval) == (7, 9, 10)
    assert load_config(p, ["task=t2i"]).training.checkpoint_interval == 2
    cyc = write(tmp_path, "cyc.yaml", {"defaults": ["cyc.yaml"]})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(cyc)
    bad = write(tmp_path, "badtask.yaml", {"per_task": {"imagenett": {}}})
    with pytest.raises(ConfigError, match="did you mean 'imagenet'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown task 'imagnet'"):
        load_config(p, ["task=imagnet"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(DEMO, ["training.max_steps=17", "run.name=x"])
    p = write(tmp_path, "saved.yaml", dump_yaml(cfg))
    again = load_config(p)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_stage1_schema_builds():
    cfg = build(Stage1Config, {"stage_1": {"target": "rae"}, "gan": {"loss": {"disc_start": 3}}})
    assert cfg.gan.loss.disc_start == 3 and cfg.gan.arch.recipe == "S_8"
    with pytest.raises(ConfigError, match="gan.loss.disc_strat: unknown key; did you mean 'gan.loss.disc_start'"):
        build(Stage1Config, {"gan": {"loss": {"disc_strat": 3}}})


@settings(max_examples=30, deadline=None)
@given(
    lr=st.floats(1e-6, 1.0, allow_nan=False),
    steps=st.integers(1, 10**6),
    scale=st.floats(0, 20, allow_nan=False),
    split=st.sampled_from(["train", "heldout"]),
)
def test_override_values_round_trip(lr, steps, scale, split):
    ov = [f"training.optimizer.lr={lr!r}", f"training.max_steps={steps}", f"guidance.cfg.scale={scale!r}", f"dataset.split={split}"]
    cfg = compose(DEMO, ov, Stage2Config)
    assert cfg.training.optimizer.lr == lr and cfg.training.max_steps == steps
    assert cfg.guidance.cfg.scale == scale and cfg.dataset.split == split


def test_switching_a_model_target_starts_its_params_afresh():
    """params belong to the target they were written for; the same target merges key by key."""
    from nanogen.config.loader import deep_merge

    base = {"stage_1": {"target": "rae", "params": {"encoder_name": "dinov2-vit-b", "noise_tau": 0.0}}}
    switched = deep_merge(base, {"stage_1": {"target": "vae", "params": {"vae_type": "sdvae-ema"}}})
    assert switched["stage_1"] == {"target": "vae", "params": {"vae_type": "sdvae-ema"}}
    same = deep_merge(base, {"stage_1": {"target": "rae", "params": {"noise_tau": 0.8}}})
    assert same["stage_1"]["params"] == {"encoder_name": "dinov2-vit-b", "noise_tau": 0.8}
    cfg = load_config(DEMO, ["stage_1.target=vae", "stage_1.params={vae_type: sdxl-vae, resolution: 32}",
                             "misc.latent_size=[4, 4, 4]"])  # fmt: skip
    assert cfg.stage_1.params["vae_type"] == "sdxl-vae"
