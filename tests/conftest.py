import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NANOGEN_NO_PROGRESS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = "configs/stage2/training/nano/lightningdit-xs-pixel-xpred-t4c8.yaml"
TINY = "configs/stage2/training/nano/tiny-cpu-test.yaml"

torch.set_num_threads(1)  # two xdist workers on two cores


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NANOGEN_CACHE", str(tmp_path_factory.getbasetemp() / "nanogen-cache"))
    monkeypatch.chdir(ROOT)
