"""``nanogen prepare --models``: fetch the frozen networks a config needs into the Hugging Face cache, once,
so that later runs work offline (``HF_HUB_OFFLINE=1``). Names are nanogen's (``dinov2-vit-b``) or hub ids."""

from __future__ import annotations

from nanogen.errors import NotAvailableError, UserError


def hub_id(name: str) -> str:
    """A nanogen model name -> its hub id; strings with a '/' are hub ids already."""
    if "/" in name:
        return name
    from nanogen.encoders.base import default_source

    try:
        return default_source(name)
    except (NotAvailableError, UserError):
        pass
    try:
        from nanogen.latents.vae import VAE_TYPES
    except ImportError:  # pragma: no cover - the VAE table ships with the VAE latents
        VAE_TYPES = {}
    if name in VAE_TYPES:
        return VAE_TYPES[name][0]
    raise UserError(
        f"prepare --models: unknown model '{name}'; use a representation encoder name (e.g. dinov2-vit-b), a VAE "
        f"type (e.g. sdvae-ema) or a hub id such as facebook/dinov2-with-registers-base"
    )


def prepare_models(names: list[str]) -> None:
    from huggingface_hub import snapshot_download

    for name in names:
        repo = hub_id(name)
        try:
            path = snapshot_download(repo)
        except Exception as e:  # offline, gated, or a typo: one line, with the reason
            raise NotAvailableError(f"prepare --models: cannot download '{repo}' ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        print(f"{name}: {repo} -> {path}")
