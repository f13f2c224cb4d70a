"""A trained DALL-E workdir, its dVAE and its tokenizer as one object for inference.

    pipe = Pipeline.load("runs/demo/dalle")  # dVAE: decoder.json's (attach_decoder), else config's
    tokens = pipe.generate(["a red circle in the top left"], num_samples=16, seed=0, cond_scale=3)
    images = pipe.decode(tokens.reshape(-1, pipe.num_image_tokens))   # uint8 [16, 64, 64, 3]

Every sampling call flattens its (prompt, sample) rows and runs them through the jitted KV-cache
sampler `batch_size` rows at a time; the last chunk is padded to the same size so one compile
serves the whole call. Chunk c uses `fold_in(key(seed), c)`, so results are a function of
(seed, batch_size) and of nothing else (not of how many prompts came before in the same run).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from core_jax import sharded_inference, storage
from core_jax.checkpoint import read_config
from core_jax.data.image_ops import resize_and_crop
from core_jax.errors import ConfigError
from core_jax.text import BPETokenizer
from core_jax.workdir_kinds import DALLE_TASK, describe_workdir
from dalle_jax import sampling
from dalle_jax.run_config import attached_dvae, load_dvae, text_vocab_size, with_derived
from dalle_jax.transformer import (
    MAX_UNROLLED_LAYERS,
    DalleConfig,
    init_params,
    unconditional_text,
    unscan_params,
)


def load_tokenizer(config, workdir: str):
    """The tokenizer a DALL-E workdir was trained with: WORKDIR/tokenizer/merges.txt (the trainer
    copies it there whatever text.merges_file said), else text.merges_file. Never trains one."""

    path = storage.join(workdir, "tokenizer", "merges.txt")
    if not storage.isfile(path):
        path = str(config.text.get("merges_file", "") or "")
        if not path or not storage.isfile(path):
            raise FileNotFoundError(
                f"{workdir} holds no tokenizer/merges.txt (written by the DALL-E trainer) and "
                f"config.text.merges_file={path!r} is not a file"
            )
    return BPETokenizer.from_merges(
        path,
        context_length=int(config.text.context_length),
        pad_mode="per_position",
        max_merges=config.text.get("max_merges", None),
    )


def check_dalle_config(workdir: str, config) -> None:
    """A ValueError saying what `workdir` holds when its config.json is not a DALL-E
    transformer's (a CLIP, a dVAE, an unCLIP stage, or no model the commands know)."""
    task = str(config.get("task", "") or "")
    if task and task != DALLE_TASK:
        raise ValueError(f"{workdir} is not a DALL-E workdir (it is {describe_workdir(task)})")
    if "model" not in config or "text_len" not in config.model:
        raise ValueError(f"{workdir} is not a DALL-E workdir (its config.json has no model.text_len)")


def check_guidance(config, cond_scale, force: bool = False) -> None:
    """Classifier-free guidance contrasts each caption with the all-pad caption, which a model only
    learns as "no caption" when training dropped captions (model.caption_dropout > 0). Guidance on a
    model trained without it extrapolates from an input it never saw: refused unless `force`.
    config.json has recorded caption_dropout since the DALL-E task existed; a config without the
    key (not written by this trainer) is refused the same way."""
    if cond_scale is None or float(cond_scale) == 1.0 or force:
        return
    dropout = config.get("model", {}).get("caption_dropout", None)
    if dropout is None or float(dropout) <= 0:
        said = (
            "does not record model.caption_dropout"
            if dropout is None
            else f"has model.caption_dropout={float(dropout):g}"
        )
        raise ConfigError(
            f"cond_scale={float(cond_scale):g} needs a model trained with caption "
            f"dropout but its config.json {said}; sample with cond_scale 1, or pass "
            f"--force_guidance (force_guidance=True) to guide anyway"
        )


@dataclasses.dataclass
class Pipeline:
    workdir: str
    config: Any  # the DALL-E run config (config.json)
    cfg: DalleConfig
    params: Any  # unboxed transformer params
    tokenizer: Any  # BPETokenizer, per-position pads
    dvae: Any  # dalle_jax.dvae_api.DVAE
    mesh: Any = None  # jax Mesh the params are sharded on, rows split over (data, fsdp); None = one device

    @classmethod
    def load(
        cls,
        workdir: str,
        *,
        step: int | None = None,
        dvae_workdir: str | None = None,
        mesh=None,
        unroll_layers: bool | None = None,
        raw_weights: bool = False,
    ) -> "Pipeline":
        """Loads the newest (or `step`) params; the dVAE from `dvae_workdir`, else the one attached
        by dalle_jax.attach_decoder (WORKDIR/decoder.json), else the run config's.

        unroll_layers (default: when num_layers <= MAX_UNROLLED_LAYERS) turns scanned params into
        one subtree per layer once, here, so that sampling does not slice them on every call (see
        `dalle_jax.sampling` for why decoding runs unrolled).

        The transformer and the dVAE load their EMA weights when their runs kept one; `raw_weights`
        loads the raw params of both."""

        if not storage.isdir(workdir):
            raise FileNotFoundError(f"DALL-E workdir not found: {workdir}")
        config = read_config(workdir)
        check_dalle_config(workdir, config)
        tokenizer = load_tokenizer(config, workdir)
        vocab = text_vocab_size(config, tokenizer)  # checked as training checks it
        trained_with = str(config.get("dvae_workdir", "") or "")
        attached = None if dvae_workdir or not trained_with else attached_dvae(workdir, trained_with)
        dvae_dir = dvae_workdir or attached or trained_with
        if not dvae_dir:
            raise ValueError(
                f"{workdir}/config.json has no dvae_workdir; pass the dVAE's workdir "
                f"explicitly (--dvae_workdir)"
            )
        if not storage.isdir(dvae_dir):
            source = (
                "--dvae_workdir"
                if dvae_workdir
                else f"{workdir}/{'decoder.json' if attached else 'config.json'}; override with --dvae_workdir"
            )
            raise FileNotFoundError(f"dVAE workdir not found: {dvae_dir} (from {source})")
        # The dVAE that decodes, recorded where the CLIs report it (their JSON's dvae_workdir).
        config = with_derived(config, text_vocab_size=vocab, dvae_workdir=dvae_dir)
        cfg = DalleConfig.from_config(config, workdir)  # ConfigError if its masks cannot be told
        dvae = load_dvae(dvae_dir, cfg, raw_weights)  # checks the grid and codebook against the model
        _, params = sharded_inference.load_params(
            workdir, lambda: init_params(cfg, jax.random.key(0)), mesh, step=step, ema=not raw_weights
        )
        if unroll_layers is None:
            unroll_layers = cfg.num_layers <= MAX_UNROLLED_LAYERS
        if unroll_layers and cfg.scan_layers:
            params, cfg = unscan_params(params, cfg.num_layers), cfg.replace(scan_layers=False)
        return cls(workdir, config, cfg, params, tokenizer, dvae, mesh)

    # ------------------------------------------------------------------ shapes

    @property
    def grid(self) -> int:
        return self.cfg.image_grid

    @property
    def num_image_tokens(self) -> int:
        return self.cfg.num_image_tokens

    @property
    def image_size(self) -> int:
        return int(self.dvae.image_size)

    # ------------------------------------------------------------------ text and images

    def encode_text(self, prompts: Sequence[str | None]) -> np.ndarray:
        """int32 [N, text_len]; None (or an empty prompt) is the all-pad unconditional caption."""
        prompts = list(prompts)
        out = np.asarray(unconditional_text(self.cfg, len(prompts)), np.int32).copy()
        given = [i for i, p in enumerate(prompts) if p and p.strip()]
        if given:
            out[given] = self.tokenizer.encode([prompts[i] for i in given])
        return out

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] of any size -> int32 [B, n_image] (centre crop to the dVAE's size)."""
        images = np.stack([resize_and_crop(np.asarray(im), self.image_size) for im in images])
        tokens = np.asarray(self.dvae.encode(images))
        return tokens.reshape(len(images), -1).astype(np.int32)

    def decode(self, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """int [B, n_image] (or [B, g, g]) -> uint8 [B, size, size, 3], `batch_size` at a time."""
        tokens = np.asarray(tokens).reshape(-1, self.grid, self.grid).astype(np.int32)
        chunk = min(batch_size, len(tokens))
        out = []
        for start in range(0, len(tokens), chunk):
            part = tokens[start : start + chunk]
            padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)])
            out.append(np.asarray(self.dvae.decode(padded))[: len(part)])
        return np.concatenate(out).astype(np.uint8)

    # ------------------------------------------------------------------ sampling

    def sample_rows(
        self,
        text: np.ndarray,
        *,
        seed: int = 0,
        batch_size: int = 64,
        prefix_tokens: np.ndarray | None = None,
        known_mask: np.ndarray | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        cond_scale: float | None = None,
        force_guidance: bool = False,
    ) -> np.ndarray:
        """int32 [R, n_image]: one sample per text row (int [R, text_len]).

        prefix_tokens [R, n] with known_mask [n] (True = keep) turns on completion / inpainting.
        cond_scale None = conditional sampling; s = classifier-free guidance (2 streams per row in
        one forward per step), refused on a model trained without caption dropout unless
        `force_guidance` (see `check_guidance`)."""
        check_guidance(self.config, cond_scale, force_guidance)
        text = np.asarray(text, np.int32)
        rows = len(text)
        if rows == 0:
            raise ValueError("nothing to sample: no text rows")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # Padded rows are dropped; the split over (data, fsdp) needs a multiple of its size.
        chunk = sharded_inference.pad_rows(self.mesh, min(batch_size, rows))
        known = None if known_mask is None else np.asarray(known_mask, bool).reshape(-1)
        key = jax.random.key(int(seed))
        out = []
        for c, start in enumerate(range(0, rows, chunk)):
            part = _pad_to(text[start : start + chunk], chunk)
            prefix = (
                None
                if prefix_tokens is None
                else _pad_to(np.asarray(prefix_tokens[start : start + chunk], np.int32), chunk)
            )
            tokens = self._sample_chunk(
                part,
                jax.random.fold_in(key, c),
                prefix=prefix,
                known=known,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                cond_scale=cond_scale,
            )
            out.append(tokens[: min(chunk, rows - start)])
        return np.concatenate(out)

    def _sample_chunk(self, text, rng, *, prefix, known, **kwargs) -> np.ndarray:
        if prefix is not None:
            kwargs.update(prefix_image_tokens=prefix, known_mask=known)
        sample = lambda params, rows: sampling.sample(params, self.cfg, rows, rng=rng, **kwargs)  # noqa: E731
        return np.asarray(sharded_inference.run(self.mesh, sample, self.params, text))

    def generate(
        self, prompts: Sequence[str | None], num_samples: int, *, image_tokens=None, known_mask=None, **kwargs
    ) -> np.ndarray:
        """int32 [P, num_samples, n_image]: `num_samples` samples of every prompt, all prompts in
        the same batches. `image_tokens` ([n] for all prompts, or [P, n]) with `known_mask` [n]
        keeps the known tokens (see `completion_mask` / `rectangle_mask`). kwargs: sample_rows'."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        text = np.repeat(self.encode_text(prompts), num_samples, axis=0)
        prefix = None
        if image_tokens is not None:
            given = np.asarray(image_tokens, np.int32).reshape(-1, self.num_image_tokens)
            if len(given) == 1:
                given = np.repeat(given, len(prompts), 0)
            if len(given) != len(prompts):
                raise ValueError(f"{len(given)} images for {len(prompts)} prompts")
            prefix = np.repeat(given, num_samples, axis=0)
        tokens = self.sample_rows(text, prefix_tokens=prefix, known_mask=known_mask, **kwargs)
        return tokens.reshape(len(prompts), num_samples, self.num_image_tokens)

    def complete(self, prompts, image_tokens, rows_kept: int, num_samples: int, **kwargs):
        """Keeps the first `rows_kept` token rows of the image, regenerates the rest: [P, S, n]."""
        mask = sampling.completion_mask(self.grid, rows_kept)
        return self.generate(prompts, num_samples, image_tokens=image_tokens, known_mask=mask, **kwargs)

    def inpaint(self, prompts, image_tokens, box, num_samples: int, **kwargs):
        """Regenerates the tokens inside box = (top, left, height, width) in token-grid units."""
        mask = sampling.rectangle_mask(self.grid, *box)
        return self.generate(prompts, num_samples, image_tokens=image_tokens, known_mask=mask, **kwargs)

    def variations(self, prompts, image_tokens, num_samples: int, rows_kept: int | None = None, **kwargs):
        """Variations of an image: its first `rows_kept` rows (default `default_variation_rows`)
        kept, the rest resampled with the prompt (None = the unconditional caption)."""
        rows = default_variation_rows(self.grid) if rows_kept is None else rows_kept
        return self.complete(prompts, image_tokens, rows, num_samples, **kwargs)


def default_variation_rows(grid: int) -> int:
    """A quarter of the rows (at least one): enough to pin the layout's start, little enough that
    the rest of the image is free to change."""
    return max(1, grid // 4)


def _pad_to(x: np.ndarray, rows: int) -> np.ndarray:
    """Repeats the last row so every chunk has the same shape (one compile per call)."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])
