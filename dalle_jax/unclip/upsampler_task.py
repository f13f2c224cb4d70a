"""An unCLIP diffusion upsampler (Ramesh et al. 2022, section 2.1 and appendix C) as a
`core_jax.trainer.Task`: a convolutional U-Net that draws an image at model.image_size from a copy
at model.low_res_size.

Everything happens per example on the host (no frozen model): the image at model.image_size is the
target in [-1, 1]; its low-resolution copy is area-downsampled to model.low_res_size and, in
training, corrupted with a Gaussian blur, since "to improve the robustness of our upsamplers, we
slightly corrupt the conditioning images during training. For the first upsampling stage, we use
gaussian blur" (section 2.1; appendix C: kernel size 3, sigma 0.6). The blur's sigma is drawn per
example, uniformly in `model.blur_sigma` (lo, hi), from the example's own rng. The second stage's
"more diverse BSR degradation" (Zhang et al. 2021) is not implemented: the 256 -> 1024 config
blurs too. Training then takes a random `data.train_crop` square of the target and the matching
low-res square: the paper trains "on random crops of images that are one-fourth the target size"
(Table 3: crop fraction 0.25) and samples at full size, which a network without attention allows.
Evaluation uses the whole image and an unblurred low-res copy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from core_jax.config import base_config
from core_jax.data import image_ops
from core_jax.errors import ConfigError
from core_jax.metrics import image_grid
from core_jax.sharded_inference import gather
from core_jax.trainer import Task
from dalle_jax.unclip import denoise, pixels, unet
from dalle_jax.unclip.diffusion_task import (
    check_sample,
    diffusion_section,
    draw_noise_seed,
    make_loss_evaluator,
    make_loss_fn,
    noise_schedule,
    sample_section,
    sampler_options,
    unet_section,
    unet_spec,
)
from dalle_jax.unclip.unet_spec import train_flops_per_example


def upsampler_config():
    """base_config() + the upsampler's sections with defaults (unlocked; config files lock it)."""
    c = base_config()
    c.task = "dalle_jax.unclip.upsampler_task"
    c.model = unet_section(
        image_size=64,
        attention_resolutions=(),  # appendix C: "Neither upsampler uses attention"
        low_res_size=32,  # the conditioning image's size
        blur_sigma=(
            0.6,
            0.6,
        ),  # training blur std (pixels of the low-res copy), uniform in (lo, hi); appendix C: 0.6
        blur_kernel=3,  # appendix C: kernel size 3
    )
    c.diffusion = diffusion_section()
    # Appendix C: DDIM with 27 steps for the 64 -> 256 model (15 for 256 -> 1024).
    c.sample = sample_section("ddim", 27)
    c.data.image_size = c.model.get_ref("image_size")
    c.data.train_crop = 0  # side of the random training crop of the target; 0 = the whole image
    return c


def scale_factor(config) -> int:
    """model.image_size / model.low_res_size, checked to be a whole number."""
    size, low = int(config.model.image_size), int(config.model.low_res_size)
    if low <= 0 or size % low or size == low:
        raise ConfigError(
            f"config.model.image_size={size} must be a multiple (> 1) of config.model.low_res_size={low}"
        )
    return size // low


def check_config(config, spec) -> None:
    """ConfigError for a crop, blur or data size the upsampler cannot use."""
    m, factor = config.model, scale_factor(config)
    if int(config.data.image_size) != int(m.image_size):
        raise ConfigError(
            f"config.data.image_size={config.data.image_size} differs from config.model.image_size={m.image_size}"
        )
    crop, step = int(config.data.train_crop), 2 ** (spec.num_levels - 1) * factor
    if crop and (crop < 0 or crop > int(m.image_size) or crop % step):
        raise ConfigError(
            f"config.data.train_crop={crop} must be 0 (whole image) or a multiple of {step} up to "
            f"{m.image_size}: its low-res copy must scale by {factor} and halve "
            f"{spec.num_levels - 1} times"
        )
    lo, hi = (float(s) for s in m.blur_sigma)
    if not 0.0 <= lo <= hi:
        raise ConfigError(
            f"config.model.blur_sigma must be (lo, hi) with 0 <= lo <= hi, got {tuple(m.blur_sigma)}"
        )
    if int(m.blur_kernel) < 1 or int(m.blur_kernel) % 2 == 0:
        raise ConfigError(f"config.model.blur_kernel must be odd and positive, got {m.blur_kernel}")


def low_res_copy(target, low_res_size: int) -> np.ndarray:
    """An image in [-1, 1] area-downsampled to low_res_size (no corruption)."""
    return pixels.area_resize(target, low_res_size)


def make_example_fn(config, *, train: bool):
    """raw example -> {target [S, S, 3], low_res [s, s, 3]}, both float32 in [-1, 1]: in training
    the low-res copy blurred and both cropped to data.train_crop; in evaluation whole and
    unblurred, with the evaluation noise seed."""
    m = config.model
    size, low, factor = int(m.image_size), int(m.low_res_size), scale_factor(config)
    lo, hi = (float(s) for s in m.blur_sigma)
    kernel = int(m.blur_kernel)
    crop = int(config.data.train_crop) if train else 0
    random_crop = train and bool(config.data.random_crop)

    def example_fn(raw, rng):
        image = image_ops.resize_and_crop(np.asarray(raw["image"]), size, random_crop, rng)
        target = pixels.to_model(image)
        low_res = low_res_copy(target, low)
        if not train:
            return {"target": target, "low_res": low_res, "noise_seed": draw_noise_seed(rng)}
        low_res = pixels.gaussian_blur(low_res, float(rng.uniform(lo, hi)), kernel)
        if crop:
            top, left = (int(rng.integers((size - crop) // factor + 1)) for _ in range(2))
            target = target[top * factor : top * factor + crop, left * factor : left * factor + crop]
            low_res = low_res[top : top + crop // factor, left : left + crop // factor]
        return {"target": np.ascontiguousarray(target), "low_res": np.ascontiguousarray(low_res)}

    return example_fn


def condition(batch: dict) -> dict:
    return {"low_res": batch["low_res"]}


def make_image_fn(config, model, schedule):
    """The logged preview: the batch's first low-res inputs (nearest-upsampled, top row), their
    upsamples (middle) and targets (bottom), with config.sample's sampler and `preview_steps`."""
    s = config.sample
    draw = jax.jit(
        functools.partial(
            denoise.sample_upsampler,
            model,
            schedule,
            **sampler_options(config, s.preview_steps, guided=False),
        )
    )

    def image_fn(params, batch):
        rows = min(int(s.preview_images), batch["target"].shape[0])
        low_res, target = gather(batch["low_res"])[:rows], gather(batch["target"])[:rows]
        x_T = denoise.start_noise(jax.random.key(0), target.shape)
        upsampled = gather(draw(params, low_res, x_T, jax.random.key(1)))[:rows]
        factor = target.shape[1] // low_res.shape[1]
        nearest = np.repeat(np.repeat(low_res, factor, axis=1), factor, axis=2)
        images = np.concatenate([pixels.to_uint8(x) for x in (nearest, upsampled, target)])
        return {"upsamples": image_grid(images, rows=3)}

    return image_fn


def make_task(config, workdir: str | None = None) -> Task:
    """The upsampler Task; workdir None (core_jax.aot) gives the same model with no data."""
    model = unet.UNet(unet_spec(config, low_res_channels=3))
    check_config(config, model.spec)
    schedule = noise_schedule(config)
    check_sample(config, schedule)
    size, factor = int(config.model.image_size), scale_factor(config)
    train_size = int(config.data.train_crop) or size

    def init_fn(rng, batch):
        return {"params": unet.init_params(model, rng)}

    def batch_spec(batch_size):
        return {
            "target": jax.ShapeDtypeStruct((batch_size, train_size, train_size, 3), jnp.float32),
            "low_res": jax.ShapeDtypeStruct(
                (batch_size, train_size // factor, train_size // factor, 3), jnp.float32
            ),
        }

    evaluators = []
    if workdir is not None and int(config.model.eval_max_batches) != 0:
        eval_example_fn = make_example_fn(config, train=False)
        evaluators.append(make_loss_evaluator(config, model, schedule, eval_example_fn, None, condition))
    return Task(
        init_fn=init_fn,
        loss_fn=make_loss_fn(model, schedule, config, condition),
        example_fn=make_example_fn(config, train=True),
        accumulation="mean",
        flops_per_example=train_flops_per_example(model.spec, image_size=train_size),
        evaluators=evaluators,
        image_fn=make_image_fn(config, model, schedule) if int(config.sample.preview_images) > 0 else None,
        batch_spec=batch_spec,
    )
