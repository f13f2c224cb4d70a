"""CLIP evaluation: zero-shot and retrieval of a workdir, as a CLI and as `run_evaluations`.

    python -m clip_jax.evaluate --workdir W [--step N] [--out R.json] [--config.eval.KEY=VALUE ...]

The config is WORKDIR/config.json (what the trainer or a converter wrote); `--config.KEY=VALUE`
flags override any key of it (`--config.eval.templates=openai80`, `--config.data.data_dir=...`).
Eval keys missing from an older workdir config take the defaults of `eval_config()`.
The results go to stdout as one JSON line (zero-shot's per-class table under 'zeroshot/per_class')
and to --out; the log lines, with the per-class table worst class first, go to stderr.

The shared pieces (`eval_config`, `ParamsEncoder`, `padded_batches`, ...) live in
clip_jax.eval_common and stay importable from here.
"""

from __future__ import annotations

import json
import sys


from clip_jax import retrieval, zeroshot
from clip_jax.api import read_clip_config
from clip_jax.defaults import vit_config

# Re-exported: clip_jax.evaluate.<name> is how docs, configs and tests have reached these.
from clip_jax.eval_common import (  # noqa: F401
    ParamsEncoder,
    add_weights_flags,
    all_rows,
    apply_overrides,
    encoder_batch_multiple,
    eval_config,
    gather_rows,
    data_parallel_mesh,
    load_clip_params,
    padded_batches,
    put_rows,
    read_lines,
    round_batch_size,
    sized_image,
    with_eval_defaults,
)
from core_jax import sharded_inference, storage
from core_jax.cli import ArgumentParser, end_dry_run, fail, is_dry_run
from core_jax.errors import ConfigError


def run_evaluations(config, encoder, workdir: str | None = None, log=print) -> dict:
    """Runs what `config.eval` switches on -> {'zeroshot/top1': .., 'zeroshot/per_class': {..},
    'retrieval/i2t_r1': ..}."""
    config = with_eval_defaults(config)
    results = {}
    if config.eval.zeroshot_source:
        for k, v in zeroshot.run_zeroshot(config, encoder, log=log).items():
            results[f"zeroshot/{k}"] = v
    if config.eval.retrieval_split:
        for k, v in retrieval.run_retrieval(config, encoder, log=log).items():
            results[f"retrieval/{k}"] = v
    if not results:
        raise ValueError(
            "nothing to evaluate: config.eval.zeroshot_source and config.eval.retrieval_split are both empty"
        )
    return results


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m clip_jax.evaluate",
        description="Zero-shot classification and image-text retrieval of a CLIP workdir.",
        epilog="Any other --config.KEY=VALUE overrides WORKDIR/config.json, e.g. "
        "--config.eval.zeroshot_source=tfds --config.eval.classnames=imagenet",
    )
    add_weights_flags(parser)
    parser.add_argument("--out", default="", help="results JSON (default: WORKDIR/eval_results.json)")
    # Several hosts (TPU pods, GPU clusters) evaluate together, as the trainer does.
    sharded_inference.add_flags(parser)
    args, overrides = parser.parse_known_args(argv)
    if is_dry_run():
        # The workdir may not exist yet: the overrides are checked against the keys every CLIP
        # workdir's config has.
        try:
            apply_overrides(with_eval_defaults(vit_config("ViT-B-32")), overrides)
        except ValueError as e:
            fail(str(e))
        end_dry_run(parser.prog)

    try:
        storage.check_reachable(args.workdir, args.out)
        sharded_inference.start(args)  # before any device is used
        config = with_eval_defaults(read_clip_config(args.workdir))
        apply_overrides(config, overrides)
        # Everything that can be checked without the model is checked before loading it.
        zeroshot.check_eval_config(config)
        mesh = sharded_inference.choose_mesh(args, config)
        params = load_clip_params(args.workdir, config, args.step, mesh, args.raw_weights)
        encoder = ParamsEncoder(config, params, args.workdir)
        results = run_evaluations(
            config, encoder, args.workdir, log=lambda m: print(m, file=sys.stderr, flush=True)
        )
    except (ValueError, ConfigError, FileNotFoundError) as e:
        fail(str(e))
    if sharded_inference.is_writer():
        out = args.out or storage.join(args.workdir, "eval_results.json")
        with storage.open(out, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        print(json.dumps(results, sort_keys=True))
    return results


def cli():
    """The console script: main returns its results to Python callers, the command exits 0 on success."""
    main()


if __name__ == "__main__":
    cli()
