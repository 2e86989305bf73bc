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


def one_line_error(capsys, argv, *fragments):
    """Run the CLI on ``argv``: exit code 2 and exactly one stderr line containing every fragment."""
    from nanogen.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("nanogen: error: ") and "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)
