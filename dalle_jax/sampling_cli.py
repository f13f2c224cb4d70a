"""What the sampling commands (`generate`, `evaluate_fidelity`) share: loading their models from
their flags, and the record of their settings that their JSON output starts with."""

from __future__ import annotations

from clip_jax.api import CLIPModel
from core_jax import sharded_inference
from core_jax.checkpoint import read_config
from dalle_jax.pipeline import Pipeline, check_dalle_config, check_guidance


def load_models(args, pipeline=None, clip=None, *, step: int | None = None):
    """(pipeline, clip) for the flags `args`: `pipeline` / `clip` when given (already loaded),
    else loaded from --workdir / --clip_workdir (clip None without --clip_workdir), each sharded
    on the mesh --mesh / --config.mesh.* choose from its own config (see core_jax.sharded_inference).
    Guidance (--cond_scale, --force_guidance) is checked against the DALL-E's config first, so a
    refused scale costs no model load."""
    config = pipeline.config if pipeline else read_config(args.workdir)
    if pipeline is None:  # what kind of workdir it is, before its guidance settings are judged
        check_dalle_config(args.workdir, config)
    check_guidance(config, args.cond_scale, args.force_guidance)
    pipe = pipeline or Pipeline.load(
        args.workdir,
        step=step,
        dvae_workdir=args.dvae_workdir,
        raw_weights=args.raw_weights,
        mesh=sharded_inference.choose_mesh(args, config),
    )
    if not args.clip_workdir:
        return pipe, None
    if clip is None:
        clip_config = read_config(args.clip_workdir)
        clip = CLIPModel.load(
            args.clip_workdir,
            raw_weights=args.raw_weights,
            mesh=sharded_inference.choose_mesh(args, clip_config),
        )
    return pipe, clip


def sampling_settings(args, pipe: Pipeline) -> dict:
    """The run's record (generate's scores.json, evaluate_fidelity's report): the model kind, the
    workdirs, the dVAE that decoded, and the sampling flags."""
    return dict(
        model="dalle",
        workdir=args.workdir,
        dvae_workdir=str(pipe.config.dvae_workdir),
        clip_workdir=args.clip_workdir,
        num_samples=args.num_samples,
        cond_scale=args.cond_scale,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
    )
