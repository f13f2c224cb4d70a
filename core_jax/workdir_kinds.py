"""What a workdir holds, told from its config.json's `task`, for errors that name it: a command
given the wrong kind of workdir says what it got ("W is not a DALL-E workdir (it is a CLIP
workdir)") instead of failing later on a missing key or an unrelated setting. The task names are
the model packages' task modules; only their names are used here, nothing is imported."""

from __future__ import annotations

from core_jax import checkpoint

DALLE_TASK = "dalle_jax.dalle_task"
WORKDIR_KINDS = {
    "clip_jax.task": "CLIP",
    DALLE_TASK: "DALL-E transformer",
    "dalle_jax.dvae_task": "dVAE",
    "dalle_jax.unclip.decoder_task": "unCLIP decoder",
    "dalle_jax.unclip.upsampler_task": "unCLIP upsampler",
    "dalle_jax.unclip.prior_task": "unCLIP prior",
}


def describe_workdir(task: str) -> str:
    """'a CLIP workdir', ... for a config.task value, for errors that say what a workdir holds."""
    if task in WORKDIR_KINDS:
        name = WORKDIR_KINDS[task]
        return f"{'an' if name.startswith('un') else 'a'} {name} workdir"
    return f"a workdir of task {task!r}" if task else "a workdir without config.task"


def read_workdir_config(workdir: str, task: str, error=ValueError):
    """The config.json of `workdir`, which must have been written for `task`; otherwise `error`
    naming what the workdir holds instead."""
    try:
        config = checkpoint.read_config(workdir)
    except FileNotFoundError as e:
        raise error(str(e)) from None
    found = str(config.get("task", "") or "")
    if found != task:
        raise error(f"{workdir} holds {describe_workdir(found)}, not {describe_workdir(task)}")
    return config
