"""Speed benchmarks (pytest-benchmark). Skipped timing in the normal suite (--benchmark-disable runs each once);
measure with:  uv run pytest tests/test_bench.py --benchmark-enable --benchmark-min-rounds=20 -p no:xdist"""

import os

import pytest
import torch

from conftest import DEMO
from nanogen.build import build_conditioner, build_network, build_objective
from nanogen.config import load_config
from nanogen.ema import EMA


@pytest.fixture
def demo_step():
    """One optimizer step of the demo model at the demo batch (32 x 3 x 32 x 32), as the training loop does it."""
    torch.manual_seed(0)
    cfg = load_config(DEMO, ["eval=null"])
    net = build_network(cfg)
    obj, cond = build_objective(cfg, net), build_conditioner(cfg)
    opt, ema = torch.optim.AdamW(net.parameters(), lr=1e-3), EMA(net, 0.99)
    x, y, null = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)), cond.null(1)

    def step():
        loss = obj(x, cond(y), null)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        return loss.detach()

    return step


def test_bench_demo_train_step(benchmark, demo_step):
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # measure like `nanogen demo` runs: all cores (tests use 1)
    try:
        demo_step()  # warm-up
        loss = benchmark(demo_step)
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(loss)


def test_bench_frechet_distance_2048(benchmark):
    """Issue 7 item 8: Fréchet distance at 2048-d in at most 2 s on 2 CPU cores (`nanogen benchmark-eval` reports
    it too). Sample covariances of 4096 random features, as a 50k-sample evaluation gives full-rank ones."""
    import numpy as np

    from nanogen.eval.fid import frechet_distance

    rng = np.random.default_rng(0)
    stats = []
    for shift in (0.0, 0.3):
        x = rng.standard_normal((4096, 2048)) @ (rng.standard_normal((2048, 2048)) / 45) + shift
        stats += [x.mean(0), np.cov(x, rowvar=False)]
    fd = benchmark(frechet_distance, *stats)
    assert fd == pytest.approx(frechet_distance(*stats, method="eigh"), rel=1e-8)
