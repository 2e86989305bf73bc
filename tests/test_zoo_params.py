"""Every stage-2 training config of the zoo builds a network with exactly the reference's parameter count
(``reference-params.md``: every nn.Parameter, incl. the fixed Fourier vector t_embedder.W), counted on the meta
device, and ``model-info --json`` reports it with the analytic GFLOPs."""

import json

import pytest

from nanogen.cli import main
from nanogen.config import builtin_configs_dir, load_config
from nanogen.modelinfo import model_info

# reference-params.md, verbatim: config (under configs/stage2/training/) -> parameters
REFERENCE_PARAMS = {
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-e2e-flux-vpred-t4c8.yaml": 611_556_948,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-e2e-qwen-vae-vpred-t4c8.yaml": 611_556_948,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-e2e-sd3.5-vpred-t4c8.yaml": 611_556_948,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-e2e-vavae-vpred-t4c8.yaml": 611_388_980,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-flux-vpred-t4c8.yaml": 611_556_948,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-flux2-reg0.03-rmsnorm-vpred-t4c8.yaml": 615_930_516,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-flux2-vpred-t4c8.yaml": 611_892_884,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-qwen-vae-vpred-t4c8.yaml": 611_556_948,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-rae-dinov2-reg0.03-rmsnorm-vpred-t4c8.yaml": 619_289_876,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-rae-dinov2-vpred-t4c8.yaml": 615_252_244,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-rae-dinov3-vit-b16-reg0.03-rmsnorm-vpred-t4c8.yaml": 619_289_876,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-rae-dinov3-vit-b16-vpred-t4c8.yaml": 615_252_244,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-rae-langpe-vit-l-vpred-t4c8.yaml": 616_595_988,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-rae-pe-vit-l-vpred-t4c8.yaml": 616_595_988,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-rae-siglip2-vit-b-vpred-t4c8.yaml": 615_252_244,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-rae-spatialpe-vit-l-vpred-t4c8.yaml": 616_595_988,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-sd3.5-vpred-t4c8.yaml": 611_556_948,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-sdvae-ema-reg0.03-rmsnorm-vpred-t4c8.yaml": 615_342_628,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-sdvae-ema-vpred-t4c8.yaml": 611_304_996,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4c8.yaml": 611_304_996,
    "imagenet/ddt-en28d1152hd72-dn2d2048hd128-sdxl-vae-vpred-t4c8.yaml": 611_304_996,
    "imagenet/jit-ddt-en28d1152hd72-dn2d2048hd128-xpred-t4c8.yaml": 615_252_244,
    "imagenet/mf-ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4c8-kappa0.0.yaml": 613_229_092,
    "imagenet/mf-ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4c8-kappa0.5.yaml": 613_229_092,
    "imagenet/pixelgen-ddt-en28d1152hd72-dn2d2048hd128-xpred-t4c8-0.1lpips-0.01pdino-thresh0.7.yaml": 615_252_244,
    "imagenet/pixnerd-ddt-en28d1152hd72-dn2d2048hd128-vpred-t4c8.yaml": 615_252_244,
    "t2i/mf-t2i-ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4-kappa0.5.yaml": 613_248_548,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-e2e-flux-vpred-t4.yaml": 611_576_404,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-e2e-qwen-vae-vpred-t4.yaml": 611_576_404,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-e2e-sd3.5-vpred-t4.yaml": 611_576_404,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-e2e-vavae-vpred-t4.yaml": 611_408_436,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-flux-vpred-t4.yaml": 611_576_404,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-flux2-reg0.03-rmsnorm-vpred-t4.yaml": 615_949_972,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-flux2-vpred-t4.yaml": 611_912_340,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-qwen-vae-vpred-t4.yaml": 611_576_404,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-dinov2-reg0.03-rmsnorm-vpred-t4.yaml": 619_309_332,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-dinov2-vpred-t4.yaml": 615_271_700,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-dinov3-vit-b16-reg0.03-rmsnorm-vpred-t4.yaml": 619_309_332,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-dinov3-vit-b16-vpred-t4.yaml": 615_271_700,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-langpe-vit-l-vpred-t4.yaml": 616_615_444,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-pe-vit-l-vpred-t4.yaml": 616_615_444,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-siglip2-vit-b-vpred-t4.yaml": 615_271_700,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-rae-spatialpe-vit-l-vpred-t4.yaml": 616_615_444,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-sd3.5-vpred-t4.yaml": 611_576_404,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-sdvae-ema-reg0.03-rmsnorm-vpred-t4.yaml": 615_362_084,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-sdvae-ema-vpred-t4.yaml": 611_324_452,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4.yaml": 611_324_452,
    "t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-sdxl-vae-vpred-t4.yaml": 611_324_452,
    "t2i/t2i-ddt-en28d1584hd72-dn2d2048hd128-e2e-qwen-vae-vpred-t4-512res.yaml": 1_011_622_804,
    "t2i/t2i-ddt-en28d1584hd72-dn2d2048hd128-flux2-vpred-t4-512res.yaml": 1_011_986_388,
    "t2i/t2i-ddt-en28d1584hd72-dn2d2048hd128-qwen-vae-vpred-t4-512res.yaml": 1_011_622_804,
    "t2i/t2i-jit-ddt-en28d1152hd72-dn2d2048hd128-xpred-t4.yaml": 615_271_700,
    "t2i/t2i-pixelgen-ddt-en28d1152hd72-dn2d2048hd128-xpred-t4-0.1lpips-0.01pdino-thresh0.7.yaml": 615_271_700,
    "t2i/t2i-pixnerd-ddt-en28d1152hd72-dn2d2048hd128-vpred-t4.yaml": 615_271_700,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_param_count_equals_reference(name):
    cfg = load_config(builtin_configs_dir() / "stage2" / "training" / name)
    assert model_info(cfg)["params"] == REFERENCE_PARAMS[name]


def test_every_training_config_is_counted():
    root = builtin_configs_dir() / "stage2" / "training"
    found = {str(p.relative_to(root)) for d in ("imagenet", "t2i") for p in (root / d).glob("*.yaml")}
    assert found == set(REFERENCE_PARAMS)


def test_model_info_json_cli(capsys):
    name = "imagenet/ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4c8.yaml"
    assert main(["model-info", "-c", f"configs/stage2/training/{name}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 611_304_996
    assert round(info["gflops"], 1) == 332.2  # performance.md §0
    assert info["token_layout"]["encoder"]["sequence_length"] == 268
    assert info["token_layout"]["decoder"]["sequence_length"] == 256
    assert main(["model-info", "-c", f"configs/stage2/training/{name}", "task=t2i", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == REFERENCE_PARAMS["t2i/t2i-ddt-en28d1152hd72-dn2d2048hd128-sdvae-mse-vpred-t4.yaml"]
    assert round(info["gflops"], 1) == 579.1 and info["token_layout"]["encoder"]["sequence_length"] == 516
