"""Attach a fine-tuned dVAE decoder to a trained DALL-E, so its samples are drawn with it.

    python -m dalle_jax.attach_decoder --workdir runs/demo/dalle --dvae_workdir runs/demo/dvae_decoder

A DALL-E depends only on the tokens its dVAE's encoder gave it. A decoder fine-tuned with that
encoder frozen (configs/dvae_shapes_decoder.py) draws the same tokens better, and can be trained
after the DALL-E or beside it. This command checks that the new dVAE's encoder is bit for bit the
one the DALL-E was trained with (config.json's `dvae_workdir`), with the same image size, grid and
codebook, and writes WORKDIR/decoder.json. `Pipeline.load`, and so `generate` and
`evaluate_fidelity`, then decode with the attached dVAE; their `--dvae_workdir` still overrides.
config.json keeps saying which dVAE the DALL-E was trained with.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from core_jax import storage
from core_jax.checkpoint import read_config
from core_jax.cli import ArgumentParser, fail
from dalle_jax.dvae_api import DVAE
from dalle_jax.run_config import DECODER_FILE


def encoder_mismatch(trained, candidate) -> str | None:
    """Why two dVAEs (dvae_api.DVAE) would not give the same tokens; None if they would."""
    for name in ("image_size", "grid_size", "vocab_size", "channels"):
        a, b = getattr(trained, name), getattr(candidate, name)
        if a != b:
            return f"{name} {b}, not {a}"
    flat = lambda p: {
        jax.tree_util.keystr(k): np.asarray(v)  # noqa: E731
        for k, v in jax.tree_util.tree_leaves_with_path(p["encoder"])
    }
    a, b = flat(trained.params), flat(candidate.params)
    if a.keys() != b.keys():
        return f"another encoder architecture (params {sorted(a.keys() ^ b.keys())[:3]} differ)"
    for k in a:
        if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]):
            return f"other encoder weights (first difference at {k})"
    return None


def attach(workdir: str, dvae_workdir: str) -> dict:
    """Checks and writes WORKDIR/decoder.json; returns the record."""

    storage.check_reachable(workdir, dvae_workdir)
    for name, path in (("--workdir", workdir), ("--dvae_workdir", dvae_workdir)):
        if not storage.isdir(path):
            raise FileNotFoundError(f"{name} not found: {path}")
    trained_with = str(read_config(workdir).get("dvae_workdir", "") or "")
    if not trained_with:
        raise ValueError(
            f"{workdir}/config.json names no dvae_workdir: nothing to check the new encoder against"
        )
    if not storage.isdir(trained_with):
        raise FileNotFoundError(
            f"the dVAE the DALL-E was trained with ({trained_with}, from "
            f"{workdir}/config.json) is not there to check the new encoder against"
        )
    why = encoder_mismatch(DVAE.load(trained_with), DVAE.load(dvae_workdir))
    if why:
        raise ValueError(
            f"{dvae_workdir} would not give the DALL-E's tokens ({why}, against "
            f"{trained_with}, which {workdir} was trained with): only a decoder trained "
            f"with that encoder frozen (config.frozen='encoder') can be attached"
        )
    record = {
        "dvae_workdir": dvae_workdir,
        "tokens_from": trained_with,
        "checked": "same image size, grid, codebook and encoder params, bit for bit",
    }
    storage.write_text(storage.join(workdir, DECODER_FILE), json.dumps(record, indent=1))
    return record


def main(argv=None):
    p = ArgumentParser(prog="python -m dalle_jax.attach_decoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="trained DALL-E workdir")
    p.add_argument(
        "--dvae_workdir",
        required=True,
        help="dVAE whose decoder draws the samples (encoder frozen in its training)",
    )
    args = p.parse_args(argv)
    try:
        record = attach(args.workdir, args.dvae_workdir)
    except (ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e))
    print(
        f"{args.workdir} now decodes with {record['dvae_workdir']} (encoder identical to "
        f"{record['tokens_from']}'s; {storage.join(args.workdir, DECODER_FILE)})",
        flush=True,
    )
    return record


def cli():
    """The console script: main returns its record to Python callers, the command exits 0 on success."""
    main()


if __name__ == "__main__":
    cli()
