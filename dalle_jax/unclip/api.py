"""Load a trained unCLIP decoder or upsampler for inference on one host.

    decoder = Decoder.load("runs/unclip_decoder")            # EMA weights, and the CLIP it was trained on
    z = decoder.embed_images(images_uint8)                    # [N, E] L2-normalised CLIP image embeddings
    images = decoder.decode(z, seed=0)                        # uint8 [N, S, S, 3]; config.sample's defaults
    images = decoder.decode(z, ["a red circle"] * len(z), cond_scale=3.0)
    x_T = decoder.invert(images_uint8, z, steps=50)           # DDIM inversion
    t = decoder.text_embeddings(["a red circle"])             # [N, E] CLIP text embeddings, unit norm
    variations = decoder.decode(z, x_T=x_T, sampler="ddim", steps=50, eta=0.8, seed=1)

    upsampler = Upsampler.load("runs/unclip_upsampler")
    larger = upsampler.upsample(images, seed=0)               # uint8 [N, S * f, S * f, 3]

    prior = Prior.load("runs/unclip_prior")                   # EMA weights, its CLIP and statistics
    z = prior.sample(["a red circle"], num_samples_per_caption=4, seed=0)  # [4, E], unit norm

Randomness comes only from `seed`: the start noise is `noise(N, seed)` and a stochastic sampler
(ddpm, ddim with eta > 0) draws from another key of the same seed. Each sampling function is jitted
once per (batch size, sampler, steps, guidance scale, eta).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from clip_jax import model as clip_model
from clip_jax.api import CLIPModel
from core_jax.checkpoint import load_params
from core_jax.data import image_ops
from core_jax.workdir_kinds import read_workdir_config
from dalle_jax.unclip import denoise, embedding_stats, pixels, prior, prior_sample, unet
from dalle_jax.unclip.decoder_task import CLIP_SIZES, conditioning_sizes
from dalle_jax.unclip.diffusion_task import network, noise_schedule, unet_spec
from dalle_jax.unclip.prior_task import prior_spec
from dalle_jax.unclip.upsampler_task import scale_factor

DECODER_TASK = "dalle_jax.unclip.decoder_task"
UPSAMPLER_TASK = "dalle_jax.unclip.upsampler_task"
PRIOR_TASK = "dalle_jax.unclip.prior_task"
SAMPLING_ARGS = ("sampler", "steps", "cond_scale", "eta", "prediction")


def _keys(seed: int):
    """(start-noise key, sampler key) of a seed."""
    base = jax.random.key(int(seed))
    return jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)


def _uint8_batch(images, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    return images


class Decoder:
    """The decoder's params and network, the frozen CLIP it reads, and jitted sampling."""

    def __init__(self, config, params, clip: CLIPModel):
        self.config, self.params, self.clip = config, params, clip
        for key, (section, name) in CLIP_SIZES.items():
            if int(config.model[key]) != int(clip.config[section][name]):
                raise ValueError(
                    f"the decoder was trained with model.{key}={config.model[key]} but this CLIP has "
                    f"{section}.{name}={clip.config[section][name]}: load the CLIP it was trained with"
                )
        self.model = network(config, **conditioning_sizes(config))
        self.schedule = noise_schedule(config)
        self.image_size = int(config.model.image_size)
        self.text_length = int(config.model.text_length)
        self.prediction = str(config.diffusion.prediction)
        # One pass of the text tower gives both the caption states the decoder reads and the
        # caption's embedding (text diffs): the prior's text program exactly, so a cache of
        # compiled programs serves both when they read one CLIP.
        self._text = jax.jit(
            lambda p, tokens: (
                clip_model.encode_text_tokens(clip.module, p, tokens),
                clip_model.text_token_mask(tokens),
            )
        )
        self._sample = jax.jit(
            functools.partial(denoise.sample_decoder, self.model, self.schedule),
            static_argnames=SAMPLING_ARGS,
        )
        self._invert = jax.jit(
            functools.partial(denoise.invert_decoder, self.model, self.schedule),
            static_argnames=("steps", "prediction"),
        )

    @classmethod
    def load(
        cls,
        workdir: str,
        step: int | None = None,
        *,
        raw_weights: bool = False,
        clip_workdir: str | None = None,
    ) -> "Decoder":
        """The newest (or given) checkpoint of a decoder workdir (its EMA weights when the run kept
        one, else or with `raw_weights` its raw params) and the CLIP checkpoint it was trained on
        (config.clip_workdir at config.clip_step; `clip_workdir` names another place, newest step).
        A workdir of another model is a ValueError saying what it holds."""
        config = read_workdir_config(workdir, DECODER_TASK)
        _, params = load_params(workdir, step, ema=not raw_weights)
        if clip_workdir:
            clip = CLIPModel.load(clip_workdir)
        else:
            clip = CLIPModel.load(str(config.clip_workdir), int(config.clip_step))
        return cls(config, params, clip)

    def embed_images(self, images_uint8) -> np.ndarray:
        """L2-normalised CLIP image embeddings [N, E] (the CLIP's own preprocessing)."""
        return self.clip.embed_images(_uint8_batch(images_uint8, "embed_images"))

    def _encode_captions(self, captions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token states [N, L, text_width], L2-normalised text embeddings [N, E], mask [N, L])."""
        tokens = np.asarray(self.clip.tokenizer.encode(list(captions)), np.int32)
        (states, text), mask = self._text(self.clip.params, tokens)
        return np.asarray(states), np.asarray(text, np.float32), np.asarray(mask)

    def text_embeddings(self, captions) -> np.ndarray:
        """The captions' L2-normalised CLIP text embeddings [N, E]."""
        if isinstance(captions, str) or not len(captions):
            raise ValueError("captions must be a non-empty list of strings")
        return self._encode_captions(captions)[1]

    def noise(self, n: int, seed: int = 0) -> np.ndarray:
        """The start noise decode uses for `seed` when no x_T is given, float32 [n, S, S, 3]."""
        shape = (int(n), self.image_size, self.image_size, 3)
        return np.asarray(denoise.start_noise(_keys(seed)[0], shape))

    def condition(self, clip_embeddings, captions=None) -> dict:
        """The decoder's conditioning: the embeddings, and the captions' CLIP token states and
        mask (None: every caption masked, as training drops them)."""
        z = np.asarray(clip_embeddings, np.float32)
        dim = int(self.config.model.clip_dim)
        if z.ndim != 2 or z.shape[1] != dim:
            raise ValueError(f"clip_embeddings must be [N, {dim}], got {z.shape}")
        n, width = len(z), int(self.config.model.text_width)
        if captions is None:
            states = np.zeros((n, self.text_length, width), np.float32)
            mask = np.zeros((n, self.text_length), bool)
        else:
            if isinstance(captions, str) or len(captions) != n:
                raise ValueError(f"captions must be a list of {n} strings (one per embedding), or None")
            states, _, mask = self._encode_captions(captions)
        return {"clip_embedding": z, "text_states": states, "text_mask": mask}

    def targets(self, images_uint8) -> np.ndarray:
        """Images as the decoder draws them, float32 [N, S, S, 3] in [-1, 1]: S x S images as they
        are, others as in training (CLIP's resize and centre crop, then area-downsampled to S)."""
        images = _uint8_batch(images_uint8, "images")
        if images.shape[1:3] != (self.image_size, self.image_size):
            at_clip_size = [image_ops.resize_and_crop(im, self.clip.image_size) for im in images]
            images = pixels.area_resize(np.stack(at_clip_size), self.image_size)
        return pixels.to_model(images)

    def decode(
        self,
        clip_embeddings,
        captions=None,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        cond_scale: float | None = None,
        eta: float | None = None,
        seed: int = 0,
        x_T=None,
        known=None,
    ) -> np.ndarray:
        """uint8 [N, S, S, 3] drawn from CLIP image embeddings [N, E] (and captions), with
        classifier-free guidance at `cond_scale` (null: zero embedding, masked caption; 1 = the
        unguided model exactly). Unset sampling arguments take config.sample's values. `x_T`
        (float32 [N, S, S, 3], e.g. from `invert` or `noise`) replaces the start noise;
        `known=(images uint8 [N, S, S, 3], mask [N, S, S])` keeps the images where mask is set."""
        s = self.config.sample
        cond = self.condition(clip_embeddings, captions)
        n = len(cond["clip_embedding"])
        noise_key, sampler_key = _keys(seed)
        if x_T is None:
            x_T = denoise.start_noise(noise_key, (n, self.image_size, self.image_size, 3))
        elif np.shape(x_T) != (n, self.image_size, self.image_size, 3):
            raise ValueError(
                f"x_T must be [{n}, {self.image_size}, {self.image_size}, 3], got {np.shape(x_T)}"
            )
        if known is not None:
            images, mask = known
            mask = np.asarray(mask).astype(bool)
            known = (self.targets(images), mask.reshape(mask.shape[:3] + (1,)))
        out = self._sample(
            self.params,
            cond,
            np.asarray(x_T, np.float32),
            sampler_key,
            sampler=str(sampler or s.sampler),
            steps=int(steps or s.steps),
            cond_scale=float(s.cond_scale if cond_scale is None else cond_scale),
            eta=float(s.eta if eta is None else eta),
            prediction=self.prediction,
            known=known,
        )
        return pixels.to_uint8(out)

    def invert(self, images_uint8, clip_embeddings, steps: int, captions=None) -> np.ndarray:
        """The start noise x_T [N, S, S, 3] from which `decode(..., x_T=x_T, sampler='ddim',
        steps=steps, eta=0, cond_scale=1)` redraws the images (DDIM inversion under their
        embeddings, unguided): unCLIP's (z_i, x_T) latent for variations (section 3.1)."""
        cond = self.condition(clip_embeddings, captions)
        x0 = self.targets(images_uint8)
        if len(x0) != len(cond["clip_embedding"]):
            raise ValueError(f"{len(x0)} images but {len(cond['clip_embedding'])} embeddings")
        return np.asarray(self._invert(self.params, cond, x0, steps=int(steps), prediction=self.prediction))


class Upsampler:
    """An upsampler's params and network, with jitted sampling at any input size."""

    def __init__(self, config, params):
        self.config, self.params = config, params
        self.model = unet.UNet(unet_spec(config, low_res_channels=3))
        self.schedule = noise_schedule(config)
        self.factor = scale_factor(config)
        self.prediction = str(config.diffusion.prediction)
        self._sample = jax.jit(
            functools.partial(denoise.sample_upsampler, self.model, self.schedule),
            static_argnames=("sampler", "steps", "eta", "prediction"),
        )

    @classmethod
    def load(cls, workdir: str, step: int | None = None, *, raw_weights: bool = False) -> "Upsampler":
        """The newest (or given) checkpoint of an upsampler workdir (EMA weights by default); a
        workdir of another model is a ValueError saying what it holds."""
        config = read_workdir_config(workdir, UPSAMPLER_TASK)
        _, params = load_params(workdir, step, ema=not raw_weights)
        return cls(config, params)

    def upsample(
        self,
        low_res_uint8,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """uint8 [N, h * f, w * f, 3] from uint8 [N, h, w, 3] (f = image_size / low_res_size);
        unset sampling arguments take config.sample's values (the paper's DDIM 27 / 15 steps)."""
        s = self.config.sample
        low_res = _uint8_batch(low_res_uint8, "upsample")
        n, h, w, _ = low_res.shape
        size = (h * self.factor, w * self.factor)
        step = 2 ** (self.model.spec.num_levels - 1)
        if size[0] % step or size[1] % step:
            raise ValueError(f"upsample: the output {size} must be a multiple of {step} on each side")
        noise_key, sampler_key = _keys(seed)
        out = self._sample(
            self.params,
            pixels.to_model(low_res),
            denoise.start_noise(noise_key, (n, *size, 3)),
            sampler_key,
            sampler=str(sampler or s.sampler),
            steps=int(steps or s.steps),
            eta=float(s.eta if eta is None else eta),
            prediction=self.prediction,
        )
        return pixels.to_uint8(out)


class Prior:
    """The diffusion prior's params and network, the frozen CLIP whose embeddings it draws, the
    run's embedding statistics, and jitted sampling (one compile per rows, sampler, steps,
    guidance scale, eta)."""

    def __init__(self, config, params, clip: CLIPModel, stats: dict):
        self.config, self.params, self.clip, self.stats = config, params, clip, stats
        for key, (section, name) in CLIP_SIZES.items():
            if int(config.model[key]) != int(clip.config[section][name]):
                raise ValueError(
                    f"the prior was trained with model.{key}={config.model[key]} but this CLIP has "
                    f"{section}.{name}={clip.config[section][name]}: load the CLIP it was trained with"
                )
        self.model = prior.PriorTransformer(prior_spec(config))
        self.schedule = noise_schedule(config)
        self.prediction = str(config.diffusion.prediction)
        self._text = jax.jit(
            lambda p, tokens: (
                clip_model.encode_text_tokens(clip.module, p, tokens),
                clip_model.text_token_mask(tokens),
            )
        )
        self._sample = jax.jit(
            self._sample_unit,
            static_argnames=("sampler", "steps", "cond_scale", "eta", "best_of", "use_cache"),
        )

    @classmethod
    def load(
        cls,
        workdir: str,
        step: int | None = None,
        *,
        raw_weights: bool = False,
        clip_workdir: str | None = None,
    ) -> "Prior":
        """The newest (or given) checkpoint of a prior workdir (its EMA weights when the run kept
        one, else or with `raw_weights` its raw params), its embedding statistics and the CLIP
        checkpoint it was trained on (`clip_workdir` names another place, newest step). A workdir
        of another model is a ValueError saying what it holds."""
        config = read_workdir_config(workdir, PRIOR_TASK)
        stats = embedding_stats.load_stats(workdir, int(config.model.clip_dim))
        _, params = load_params(workdir, step, ema=not raw_weights)
        if clip_workdir:
            clip = CLIPModel.load(clip_workdir)
        else:
            clip = CLIPModel.load(str(config.clip_workdir), int(config.clip_step))
        return cls(config, params, clip, stats)

    def _encode(self, captions) -> tuple[dict, np.ndarray]:
        """(the prior's condition for the captions, their unit CLIP text embeddings [N, E])."""
        if isinstance(captions, str) or not len(captions):
            raise ValueError("captions must be a non-empty list of strings")
        tokens = np.asarray(self.clip.tokenizer.encode(list(captions)), np.int32)
        (states, text), mask = self._text(self.clip.params, tokens)
        text = np.asarray(text, np.float32)
        cond = {
            "text_states": np.asarray(states, np.float32),
            "text_mask": np.asarray(mask),
            "text_embedding": embedding_stats.standardise(text, self.stats, "text").astype(np.float32),
        }
        return cond, text

    def text_embeddings(self, captions) -> np.ndarray:
        """The captions' L2-normalised CLIP text embeddings [N, E]."""
        return self._encode(captions)[1]

    def _sample_unit(
        self, params, cond, text, x_T, rng, *, sampler, steps, cond_scale, eta, best_of, use_cache
    ):
        """Rows of x_T are (caption, sample, candidate) in that order; -> unit embeddings
        [rows / best_of, E], the candidate closest to its caption's text embedding kept."""
        z = prior_sample.sample_prior(
            self.model,
            self.schedule,
            params,
            cond,
            x_T,
            rng,
            sampler=sampler,
            steps=steps,
            cond_scale=cond_scale,
            eta=eta,
            prediction=self.prediction,
            use_cache=use_cache,
        )
        z = prior_sample.l2_normalize(embedding_stats.destandardise(z, self.stats, "image"))
        candidates = z.reshape(-1, best_of, z.shape[-1])
        return prior_sample.best_by_text(candidates, text)[0]

    def sample(
        self,
        captions,
        *,
        num_samples_per_caption: int = 1,
        best_of: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        cond_scale: float | None = None,
        eta: float | None = None,
        seed: int = 0,
        use_cache: bool = True,
    ) -> np.ndarray:
        """L2-normalised CLIP image embeddings [N * num_samples_per_caption, E] for N captions
        (caption-major: rows i * k .. i * k + k - 1 are caption i's). Each is the best of
        `best_of` samples by dot product with the caption's CLIP text embedding (section 2.2:
        best of 2, config.sample.best_of); classifier-free guidance at `cond_scale` runs the
        conditional and null rows in one batched pass (1 = the unguided model exactly). Unset
        sampling arguments take config.sample's values. `use_cache=False` recomputes the caption
        prefix at every step (same result; a reference for the cache)."""
        s = self.config.sample
        k, best_of = int(num_samples_per_caption), int(s.best_of if best_of is None else best_of)
        if k < 1 or best_of < 1:
            raise ValueError(f"num_samples_per_caption and best_of must be >= 1, got {k} and {best_of}")
        cond, text = self._encode(captions)
        copies = k * best_of
        cond = {key: np.repeat(value, copies, axis=0) for key, value in cond.items()}
        noise_key, sampler_key = _keys(seed)
        x_T = jax.random.normal(
            noise_key, (len(text) * copies, int(self.config.model.clip_dim)), jax.numpy.float32
        )
        out = self._sample(
            self.params,
            cond,
            np.repeat(text, k, axis=0),
            x_T,
            sampler_key,
            sampler=str(sampler or s.sampler),
            steps=int(steps or s.steps),
            cond_scale=float(s.cond_scale if cond_scale is None else cond_scale),
            eta=float(s.eta if eta is None else eta),
            best_of=best_of,
            use_cache=bool(use_cache),
        )
        return np.asarray(out)
