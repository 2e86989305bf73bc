"""One switch: for every method family, the ImageNet and text-to-image configs differ only in what the task preset
owns (conditioning, dataset, eval, the task's schedule and online guidance) plus the fields derived from it (the
network's condition inputs). Checked on the resolved trees of every training config of the zoo and of the nano tier.
"""

from pathlib import Path

import pytest
import yaml

from nanogen.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "configs" / "stage2" / "training"
TASKS = REPO / "configs" / "tasks"

# Derived from the task (spec reference.md §2.3 post_process / prepare_model_params): the text width, one condition
# token per text position, and the network's copy of the conditioning inputs.
DERIVED = {
    "conditioning.context_dim",
    "conditioning.arch.num_c_tokens",
    "stage_2.params.condition_type",
    "stage_2.params.context_dim",
    "stage_2.params.cond_arch.num_c_tokens",
}


def leaves(tree, prefix=""):
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def preset_keys(*tasks: str) -> set[str]:
    keys: set[str] = set()
    for t in tasks:
        keys |= set(leaves(yaml.safe_load((TASKS / f"{t}.yaml").read_text())))
    return keys


def owned(path: str, allowed: set[str]) -> bool:
    """A differing leaf is the preset's if the preset sets it, a block above it (eval.datasets.* is one block), or
    a block below it (a preset's text_encoder block replaces the null of label configs), or a sibling inside a
    second-level block the preset sets (text_encoder.cache_dir keeps its default next to the preset's keys)."""
    parts = path.split(".")
    if path in DERIVED or any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1)):
        return True
    parent = ".".join(parts[:-1])
    return any(a.startswith(path + ".") or (len(parts) > 2 and a.startswith(parent + ".")) for a in allowed)


def differing(a: dict, b: dict) -> set[str]:
    la, lb = leaves(a), leaves(b)
    return {k for k in la.keys() | lb.keys() if la.get(k, "<absent>") != lb.get(k, "<absent>")}


FAMILIES = sorted(p.stem for p in (TRAIN / "imagenet").glob("*.yaml"))
NANO = sorted(p.stem for p in (TRAIN / "nano").glob("*.yaml") if p.stem != "tiny-cpu-test")


def switch(path, label_task, text_task, *extra):
    """(differing leaves, leaves the presets do not own, the text tree) of one config under both tasks."""
    a = to_dict(load_config(path, [f"task={label_task}"]))
    b = to_dict(load_config(path, [f"task={text_task}", *extra]))
    allowed = preset_keys(label_task, text_task) | {"eval.datasets", "task"}
    if path.stem.startswith("pixnerd-"):  # the reference's T2I PixNerd samples at the training shift (§2.5), kept via per_task
        allowed.add("misc.time_dist_shift_base_eval")
    diff = differing(a, b)
    return diff, sorted(d for d in diff if not owned(d, allowed)), b


@pytest.mark.parametrize("name", FAMILIES)
def test_imagenet_and_t2i_differ_only_in_the_task_preset(name):
    diff, foreign, _ = switch(TRAIN / "imagenet" / f"{name}.yaml", "imagenet", "t2i")
    assert {"conditioning.type", "dataset.target"} <= diff
    assert foreign == []
    # the network is the same apart from its condition inputs
    assert {k for k in diff if k.startswith("stage_2.")} <= DERIVED


@pytest.mark.parametrize("name", NANO)
def test_nano_label_and_text_differ_only_in_the_task_preset(name):
    diff, foreign, b = switch(TRAIN / "nano" / f"{name}.yaml", "nano", "nano-t2i")
    assert {"conditioning.type", "conditioning.text_encoder.model_name", "dataset.target"} <= diff
    assert foreign == []
    assert b["conditioning"]["context_dim"] == 384 and b["stage_2"]["params"]["cond_arch"]["num_c_tokens"] == 16


def test_a_key_outside_the_preset_would_be_caught():
    """The checker itself can fail: a method-level change shows up as not owned by the preset."""
    path = TRAIN / "nano" / "ddt-xs-pixel-xpred-t4c8.yaml"
    _, foreign, _ = switch(path, "nano", "nano-t2i", "transport.prediction=velocity")
    assert foreign == ["transport.prediction"]
