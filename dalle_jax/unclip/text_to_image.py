"""unCLIP text-to-image (Ramesh et al. 2022, figure 2): the prior draws a CLIP image embedding from
each caption, the decoder draws an image from that embedding and the caption, and an optional
upsampler takes it larger.

    t2i = TextToImage.load("runs/unclip_prior", "runs/unclip_decoder", "runs/unclip_upsampler")
    out = t2i.generate(["a red circle in the top left"], 16, seed=0)
    out.images      # uint8 [P, 16, S, S, 3], S = the upsampler's size (else the decoder's)
    out.embeddings  # float32 [P, 16, E]: the prior's L2-normalised CLIP image embeddings
    out.seconds     # {'prior_seconds', 'decoder_seconds', 'upsampler_seconds'}

Every (caption, sample) row goes through each stage `batch_size` rows at a time, captions mixed in
one batch; classifier-free guidance runs its conditional and null rows in the same batched pass
(Prior.sample, Decoder.decode). Each batch of each stage draws from its own seed, derived from
`seed`, so the same seed and batch size give the same images.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from core_jax import storage
from core_jax.workdir_kinds import read_workdir_config
from dalle_jax.unclip import samplers, uses
from dalle_jax.unclip.api import DECODER_TASK, PRIOR_TASK, UPSAMPLER_TASK, Decoder, Prior, Upsampler

STAGES = ("prior", "decoder", "upsampler")


@dataclasses.dataclass
class Samples:
    images: np.ndarray  # uint8 [P, N, S, S, 3]
    embeddings: np.ndarray  # float32 [P, N, E], unit norm: what the decoder drew each image from
    seconds: dict  # wall time of each stage


def read_configs(prior_workdir: str, decoder_workdir: str, upsampler_workdir: str | None = None):
    """(prior, decoder, upsampler or None) configs, each workdir checked to hold that model
    (ValueError naming what it holds instead), and the three checked to fit together."""
    for flag, path in (
        ("prior_workdir", prior_workdir),
        ("decoder_workdir", decoder_workdir),
        ("upsampler_workdir", upsampler_workdir),
    ):
        storage.check_reachable(path)
        if path and not storage.isdir(path):
            raise ValueError(f"--{flag} not found: {path}")
    configs = (
        read_workdir_config(prior_workdir, PRIOR_TASK),
        read_workdir_config(decoder_workdir, DECODER_TASK),
        read_workdir_config(upsampler_workdir, UPSAMPLER_TASK) if upsampler_workdir else None,
    )
    check_stack(*configs)
    return configs


def _clip_of(config) -> tuple[str, int]:
    return storage.absolute(str(config.clip_workdir)), int(config.clip_step)


def check_stack(prior_config, decoder_config, upsampler_config=None) -> list[str]:
    """ValueError when the decoder cannot read the prior's embeddings (another CLIP width) or the
    upsampler takes another size than the decoder draws; returns warnings (the two were trained
    on different CLIP checkpoints of the same width, which may be a moved copy or another CLIP)."""
    prior_dim, decoder_dim = int(prior_config.model.clip_dim), int(decoder_config.model.clip_dim)
    (prior_clip, prior_step), (decoder_clip, decoder_step) = _clip_of(prior_config), _clip_of(decoder_config)
    if prior_dim != decoder_dim:
        raise ValueError(
            f"the prior draws {prior_dim}-wide CLIP embeddings (CLIP {prior_clip}) but the decoder reads "
            f"{decoder_dim}-wide ones (CLIP {decoder_clip}): give a prior and a decoder trained on the same CLIP"
        )
    if upsampler_config is not None:
        uses.check_upsampler_size(
            int(upsampler_config.model.low_res_size), int(decoder_config.model.image_size)
        )
    if (prior_clip, prior_step) != (decoder_clip, decoder_step):
        return [
            f"the prior was trained on CLIP {prior_clip} at step {prior_step} and the decoder on "
            f"{decoder_clip} at step {decoder_step}: the decoder reads the prior's embeddings as its own"
        ]
    return []


def check_guidance(config, scale: float, what: str, dropout_keys: tuple[str, ...]) -> None:
    """Guidance extrapolates from the null condition, which a model only learns when training
    dropped its conditioning (section 2.1 for the decoder, 2.2 for the prior)."""
    if float(scale) < 0:
        raise ValueError(f"the {what}'s guidance scale must be >= 0 (1 = unguided), got {scale:g}")
    untrained = [key for key in dropout_keys if float(config.model[key]) <= 0]
    if float(scale) != 1.0 and untrained:
        raise ValueError(
            f"guidance at {scale:g} needs a {what} trained with {' and '.join(untrained)} > 0 "
            f"(its config.json has {', '.join(f'model.{k}={config.model[k]}' for k in untrained)}); use scale 1"
        )


def check_steps(sampler: str, steps: int, timesteps: int, what: str) -> None:
    if sampler not in samplers.SAMPLERS:
        raise ValueError(f"unknown {what} sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
    if not 1 <= int(steps) <= timesteps:
        raise ValueError(f"the {what}'s steps must be in [1, {timesteps}] (its diffusion steps), got {steps}")


def stage_seed(seed: int, stage: str, batch: int) -> int:
    """An independent seed for each batch of each stage: batches never share noise, and the
    prior, decoder and upsampler draw from unrelated keys."""
    return int(np.random.SeedSequence([int(seed), STAGES.index(stage), int(batch)]).generate_state(1)[0])


def _rows(x: np.ndarray | list, start: int, size: int):
    """Rows start .. start + size of x, the last row repeated past its end (one batch shape, one compile)."""
    part = x[start : start + size]
    pad = size - len(part)
    if isinstance(part, list):
        return part + [part[-1]] * pad
    return np.concatenate([part, np.repeat(part[-1:], pad, axis=0)]) if pad else part


class TextToImage:
    """A prior, a decoder and an optional upsampler that fit together (check_stack)."""

    def __init__(self, prior: Prior, decoder: Decoder, upsampler: Upsampler | None = None):
        self.warnings = check_stack(prior.config, decoder.config, upsampler.config if upsampler else None)
        self.prior, self.decoder, self.upsampler = prior, decoder, upsampler

    @classmethod
    def load(
        cls,
        prior_workdir: str,
        decoder_workdir: str,
        upsampler_workdir: str | None = None,
        *,
        raw_weights: bool = False,
    ) -> "TextToImage":
        """The newest checkpoint of each workdir (EMA weights unless `raw_weights`) and the CLIPs
        the prior and decoder were trained on; the configs are checked before any params load."""
        read_configs(prior_workdir, decoder_workdir, upsampler_workdir)
        prior = Prior.load(prior_workdir, raw_weights=raw_weights)
        decoder = Decoder.load(decoder_workdir, raw_weights=raw_weights)
        upsampler = Upsampler.load(upsampler_workdir, raw_weights=raw_weights) if upsampler_workdir else None
        return cls(prior, decoder, upsampler)

    @property
    def image_size(self) -> int:
        return self.decoder.image_size * (self.upsampler.factor if self.upsampler else 1)

    @property
    def tokenizers(self) -> dict:
        """The CLIP tokenizers the captions go through: {'prior': ..., 'decoder': ...}."""
        return {"prior": self.prior.clip.tokenizer, "decoder": self.decoder.clip.tokenizer}

    def sampling(
        self,
        *,
        prior_scale: float | None = None,
        decoder_scale: float | None = None,
        prior_sampler: str | None = None,
        prior_steps: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
    ) -> dict:
        """The sampling settings with None taken from each model's config.sample, checked
        (ValueError): what `generate` runs and what its callers record."""
        ps, ds = self.prior.config.sample, self.decoder.config.sample
        out = dict(
            prior_scale=float(ps.cond_scale if prior_scale is None else prior_scale),
            decoder_scale=float(ds.cond_scale if decoder_scale is None else decoder_scale),
            prior_sampler=str(prior_sampler or ps.sampler),
            prior_steps=int(prior_steps or ps.steps),
            sampler=str(sampler or ds.sampler),
            steps=int(steps or ds.steps),
            best_of=int(ps.best_of),
        )
        check_guidance(self.prior.config, out["prior_scale"], "prior", ("caption_dropout",))
        check_guidance(
            self.decoder.config, out["decoder_scale"], "decoder", ("clip_dropout", "caption_dropout")
        )
        check_steps(out["prior_sampler"], out["prior_steps"], self.prior.schedule.num_train_steps, "prior")
        check_steps(out["sampler"], out["steps"], self.decoder.schedule.num_train_steps, "decoder")
        if self.upsampler is not None:
            us = self.upsampler.config.sample
            out.update(upsampler_sampler=str(us.sampler), upsampler_steps=int(us.steps))
        return out

    def generate(
        self, prompts, num_samples: int, *, seed: int = 0, batch_size: int = 64, **sampling
    ) -> Samples:
        """`num_samples` images per prompt; `sampling`: the keyword arguments of `sampling`."""
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty strings")
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        s = self.sampling(**sampling)
        # The ddim sampler's eta is the config's; the other samplers take none.
        prior_eta = float(self.prior.config.sample.eta) if s["prior_sampler"] == "ddim" else 0.0
        decoder_eta = float(self.decoder.config.sample.eta) if s["sampler"] == "ddim" else 0.0
        captions = [p for p in prompts for _ in range(num_samples)]
        rows = len(captions)
        size = min(batch_size, rows)
        seconds = dict.fromkeys((f"{stage}_seconds" for stage in STAGES), 0.0)
        images, embeddings = [], []
        for b, start in enumerate(range(0, rows, size)):
            part = _rows(captions, start, size)
            t0 = time.perf_counter()
            z = self.prior.sample(
                part,
                cond_scale=s["prior_scale"],
                sampler=s["prior_sampler"],
                steps=s["prior_steps"],
                eta=prior_eta,
                seed=stage_seed(seed, "prior", b),
            )
            t1 = time.perf_counter()
            x = self.decoder.decode(
                z,
                part,
                cond_scale=s["decoder_scale"],
                sampler=s["sampler"],
                steps=s["steps"],
                eta=decoder_eta,
                seed=stage_seed(seed, "decoder", b),
            )
            t2 = time.perf_counter()
            if self.upsampler is not None:
                x = self.upsampler.upsample(x, seed=stage_seed(seed, "upsampler", b))
            t3 = time.perf_counter()
            for stage, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2)):
                seconds[f"{stage}_seconds"] += dt
            kept = min(size, rows - start)
            images.append(x[:kept])
            embeddings.append(np.asarray(z, np.float32)[:kept])
        images, embeddings = np.concatenate(images), np.concatenate(embeddings)
        return Samples(
            images=images.reshape((len(prompts), num_samples) + images.shape[1:]),
            embeddings=embeddings.reshape(len(prompts), num_samples, -1),
            seconds=seconds,
        )
