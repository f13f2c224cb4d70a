"""Optional Weights & Biases logging: `config.wandb.project` set (the `wandb` extra installed), and
process 0 logs the run config and every row of metrics.jsonl (same names, same steps) to W&B."""

from __future__ import annotations

import ml_collections

from core_jax import storage
from core_jax.errors import ConfigError

# '' leaves the choice to wandb (its WANDB_MODE variable, else online).
MODES = ("", "online", "offline", "disabled")


def default_config() -> ml_collections.ConfigDict:
    """The `config.wandb` keys: project '' = off; entity, name and mode '' = wandb's defaults."""
    return ml_collections.ConfigDict(dict(project="", entity="", name="", mode=""))


def enabled(config) -> bool:
    settings = config.get("wandb")
    return bool(settings is not None and settings.get("project"))


def check(config) -> None:
    """ConfigError unless W&B logging is off, or its settings are valid and wandb imports."""
    if not enabled(config):
        return
    mode = config.wandb.get("mode", "")
    if mode not in MODES:
        raise ConfigError(f"config.wandb.mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    try:
        import wandb  # noqa: F401  (heavy and optional: only runs that log to W&B load it)
    except ImportError:
        raise ConfigError(
            "config.wandb.project is set but wandb is not installed: pip install '.[wandb]' "
            "(or leave config.wandb.project empty)"
        ) from None


def start(config, workdir: str):
    """The W&B run metrics go to (its config: `config`), or None when logging is off."""
    if not enabled(config):
        return None
    import wandb  # heavy and optional, see check

    settings = config.wandb
    return wandb.init(
        project=settings.project,
        entity=settings.entity or None,
        name=settings.name or None,
        mode=settings.mode or None,
        config=config.to_dict(),
        # wandb keeps its files on a local disk; a bucket workdir leaves them in its default place.
        dir=None if storage.is_remote(workdir) else workdir,
    )
