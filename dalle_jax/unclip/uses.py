"""What a trained unCLIP decoder does with images (Ramesh et al. 2022, section 3): variations,
interpolations, text diffs and inpainting, on top of `dalle_jax.unclip.api.Decoder`.

    images = variations(decoder, inputs, 4, eta=0.8, seed=0)       # uint8 [N, 4, S, S, 3]
    frames = interpolate(decoder, image_a, image_b, 8)             # uint8 [8, S, S, 3]
    frames = text_diff(decoder, image, "a red circle", "a blue circle", strength=0.5)  # [8, S, S, 3]
    mask = box_mask(image.shape[:2], (x0, y0, x1, y1), decoder)    # bool [S, S], True = redraw
    painted = inpaint(decoder, image[None], mask[None], 4, seed=0) # uint8 [1, 4, S, S, 3]

Inputs are uint8 [H, W, 3] images of any size (a batch of them when they share a size): the CLIP
embeds them through its own preprocessing (shorter side resized, centre crop), and the decoder
sees the same centre square area-downsampled to its size (`Decoder.targets`). Randomness comes
only from `seed`; a call on a batch draws all rows from it, so a row's samples depend on the batch
it is in (call once per image for per-image reproducibility).
"""

from __future__ import annotations

import numpy as np

from core_jax.data import image_ops
from dalle_jax.unclip import pixels
from dalle_jax.unclip.interpolate import slerp

# unCLIP decodes variations with DDIM, eta > 0 (section 3.1).
VARIATION_SAMPLER = "ddim"
VARIATION_STEPS = 50
# Section 3.1 asks only for "eta > 0". bench/bench_unclip.py's variations part measures, per eta,
# whether variations keep their scene (pass rate) and whether they are more than copies (PSNR to
# the source); the default should be the smallest eta meeting both of its targets.
VARIATION_ETA = 0.8
# Frames of an interpolation or a text diff, both ends included.
FRAMES = 8
# Section 3.3 raises theta linearly from 0 to a maximum "typically in [0.25, 0.50]".
TEXT_DIFF_STRENGTH = 0.5
# A difference of two unit caption embeddings shorter than this has no direction to normalise
# (identical captions give exactly 0; float32 rounding of one embedding is ~1e-7).
MIN_TEXT_DIFF = 1e-4
# CLIP text embeddings are L2-normalised; a row off by more than this is not one.
UNIT_NORM_TOLERANCE = 1e-3
# Replacement inpainting harmonises the kept and redrawn regions better when every step injects
# fresh noise (ancestral sampling) than along the deterministic DDIM path, which never revisits
# what an early step committed to.
INPAINT_ETA = 1.0


def _batch(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    return images


def _repeat(x, times: int) -> np.ndarray:
    """[N, ...] -> [N * times, ...], each row `times` times in a row."""
    return np.repeat(np.asarray(x), times, axis=0)


def decoder_view(decoder, images) -> np.ndarray:
    """uint8 [N, S, S, 3]: the images as the decoder draws them (its `targets`), for grids and
    for comparing a sample with its source."""
    return pixels.to_uint8(decoder.targets(_batch(images)))


def variations(
    decoder,
    images,
    num_samples: int,
    *,
    invert: bool = True,
    sampler: str = VARIATION_SAMPLER,
    steps: int = VARIATION_STEPS,
    cond_scale: float = 1.0,
    eta: float = VARIATION_ETA,
    seed: int = 0,
    embeddings=None,
    inverted=None,
) -> np.ndarray:
    """uint8 [N, num_samples, S, S, 3]: each image's CLIP embedding (or the given `embeddings`
    [N, E]) decoded `num_samples` times from its inverted noise (`invert`; `inverted` [N, S, S, 3]
    when already computed with these embeddings and steps) or from fresh noise.
    With DDIM, eta 0, cond_scale 1 and inversion every sample redraws its source; eta > 0 adds
    fresh noise at every step, which varies what the embedding does not pin down."""
    images = _batch(images)
    z = decoder.embed_images(images) if embeddings is None else np.asarray(embeddings, np.float32)
    if invert:
        if inverted is None:
            inverted = decoder.invert(images, z, steps=steps)
        x_T = _repeat(inverted, num_samples)
    else:
        x_T = decoder.noise(len(z) * num_samples, seed)
    out = decoder.decode(
        _repeat(z, num_samples),
        x_T=x_T,
        sampler=sampler,
        steps=steps,
        cond_scale=cond_scale,
        eta=eta,
        seed=seed,
    )
    return out.reshape((len(z), num_samples) + out.shape[1:])


def interpolation_fractions(frames: int) -> np.ndarray:
    """float32 [frames]: 0, ..., 1 evenly spaced (both ends included)."""
    if frames < 2:
        raise ValueError(f"an interpolation needs at least 2 frames, got {frames}")
    return np.linspace(0.0, 1.0, frames, dtype=np.float32)


def interpolate(
    decoder,
    image_a,
    image_b,
    frames: int,
    *,
    invert: bool = True,
    sampler: str = VARIATION_SAMPLER,
    steps: int = VARIATION_STEPS,
    cond_scale: float = 1.0,
    eta: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """uint8 [frames, S, S, 3] from image_a to image_b (section 3.2): the two CLIP embeddings
    slerped, and the two inverted noises slerped too (`invert`; with DDIM, eta 0 and cond_scale 1
    the end frames then redraw the images), or one fresh noise shared by every frame."""
    fractions = interpolation_fractions(frames)
    a, b = np.asarray(image_a), np.asarray(image_b)
    ends = [a[None], b[None]]
    z_a, z_b = (decoder.embed_images(x) for x in ends)
    if invert:
        x_a, x_b = (decoder.invert(x, z, steps=steps) for x, z in zip(ends, (z_a, z_b)))
        x_T = np.asarray(slerp(_repeat(x_a, frames), _repeat(x_b, frames), fractions))
    else:
        x_T = _repeat(decoder.noise(1, seed), frames)
    z = np.asarray(slerp(_repeat(z_a, frames), _repeat(z_b, frames), fractions))
    return decoder.decode(z, x_T=x_T, sampler=sampler, steps=steps, cond_scale=cond_scale, eta=eta, seed=seed)


def check_caption(decoder, caption, what: str = "the caption") -> None:
    """ValueError unless the caption is a non-empty string that fits the CLIP's context (the
    tokenizer would cut an over-long caption silently, and a text diff depends on exactly the
    words that differ)."""
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{what} is empty")
    tokenizer = decoder.clip.tokenizer
    room = tokenizer.context_length - 2  # the start and end tokens take two places
    used = len(tokenizer.tokenize([caption])[0])
    if used > room:
        raise ValueError(f"{what} {caption!r} is {used} tokens but the CLIP reads at most {room}: shorten it")


def text_diff_direction(old_embedding, new_embedding) -> np.ndarray:
    """float32 [E]: section 3.3's text diff z_d = normalize(z_t - z_t0) of two unit CLIP text
    embeddings [E] (or [1, E]). ValueError when an input is not L2-normalised or the two are the
    same (no direction to move in)."""
    old = np.asarray(old_embedding, np.float32).reshape(-1)
    new = np.asarray(new_embedding, np.float32).reshape(-1)
    for name, z in (("old", old), ("new", new)):
        norm = float(np.linalg.norm(z))
        if abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
            raise ValueError(
                f"the {name} caption's embedding has norm {norm:.4f}: expected a unit CLIP embedding"
            )
    diff = new - old
    size = float(np.linalg.norm(diff))
    if size < MIN_TEXT_DIFF:
        raise ValueError(
            "the two captions have the same CLIP text embedding, so their difference has no "
            "direction: change what the new caption says"
        )
    return diff / size


def caption_direction(decoder, old_caption: str, new_caption: str) -> np.ndarray:
    """float32 [E]: the text diff from old_caption to new_caption through the decoder's CLIP;
    ValueError for an empty or over-long caption, or two captions CLIP reads as the same."""
    check_caption(decoder, old_caption, "the old caption")
    check_caption(decoder, new_caption, "the new caption")
    old, new = decoder.text_embeddings([old_caption, new_caption])
    return text_diff_direction(old, new)


def text_diff_fractions(strength: float, frames: int) -> np.ndarray:
    """float32 [frames]: theta from 0 to `strength` evenly spaced (both ends included)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"a text diff's strength must be in (0, 1], got {strength}")
    if frames < 2:
        raise ValueError(f"a text diff needs at least 2 frames, got {frames}")
    return np.linspace(0.0, strength, frames, dtype=np.float32)


def text_diff_embeddings(image_embedding, direction, fractions) -> np.ndarray:
    """float32 [F, E]: z_theta = slerp(z_i, z_d, theta) for each of the F fractions theta
    (section 3.3); theta 0 is z_i exactly, and the angle to z_i grows as theta times the angle
    between z_i and z_d."""
    fractions = np.asarray(fractions, np.float32)
    z_i = np.asarray(image_embedding, np.float32).reshape(1, -1)
    z_d = np.asarray(direction, np.float32).reshape(1, -1)
    return np.asarray(slerp(_repeat(z_i, len(fractions)), _repeat(z_d, len(fractions)), fractions))


def text_diff_noise(
    decoder, images, new_captions, embeddings, *, decoder_caption: bool = True, steps: int = VARIATION_STEPS
) -> np.ndarray:
    """float32 [N, S, S, 3]: the inverted noise `text_diff` starts from, of images uint8
    [N, H, W, 3] under their embeddings [N, E] and, when the decoder reads captions, their new
    captions (a list of N); row i is `inverted` for image i, reusable across strengths."""
    captions = list(new_captions) if decoder_caption else None
    return decoder.invert(_batch(images), embeddings, steps=steps, captions=captions)


def text_diff(
    decoder,
    image,
    old_caption: str,
    new_caption: str,
    *,
    strength: float = TEXT_DIFF_STRENGTH,
    frames: int = FRAMES,
    decoder_caption: bool = True,
    invert: bool = True,
    sampler: str = VARIATION_SAMPLER,
    steps: int = VARIATION_STEPS,
    cond_scale: float = 1.0,
    eta: float = 0.0,
    seed: int = 0,
    embedding=None,
    inverted=None,
) -> np.ndarray:
    """uint8 [frames, S, S, 3]: the image (uint8 [H, W, 3], described by old_caption) edited
    toward new_caption (section 3.3): its CLIP embedding z_i is slerped toward the text diff z_d
    by theta = 0 .. strength, and every frame is decoded from the image's inverted noise (`invert`;
    `inverted` [1, S, S, 3]: its `text_diff_noise`, when already computed), so the
    edit keeps what the embedding does not change; frame 0 (theta 0) redraws the image. Without
    `invert` every frame shares one fresh noise.

    `decoder_caption`: the decoder reads new_caption in every frame and in the inversion (the
    paper's decoder reads a caption beside the embedding, and the new one describes the frames the
    edit aims at; inverting under it keeps frame 0 a redraw of the image); False: no caption
    (masked, as training drops it), so only the embedding moves the image. `embedding` [1, E]
    replaces the image's own CLIP embedding."""
    image = np.asarray(image)
    direction = caption_direction(decoder, old_caption, new_caption)
    fractions = text_diff_fractions(strength, frames)
    z_i = decoder.embed_images(image[None]) if embedding is None else np.asarray(embedding, np.float32)
    if invert:
        if inverted is None:
            inverted = text_diff_noise(
                decoder, image[None], [new_caption], z_i, decoder_caption=decoder_caption, steps=steps
            )
        x_T = _repeat(inverted, frames)
    else:
        x_T = _repeat(decoder.noise(1, seed), frames)
    return decoder.decode(
        text_diff_embeddings(z_i, direction, fractions),
        [new_caption] * frames if decoder_caption else None,
        x_T=x_T,
        sampler=sampler,
        steps=steps,
        cond_scale=cond_scale,
        eta=eta,
        seed=seed,
    )


def check_box(box, height: int, width: int, what: str = "the image") -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) as ints, x1 / y1 exclusive, inside an image of height x width pixels
    and not empty; ValueError naming the problem otherwise."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"the box {x0},{y0},{x1},{y1} is empty (it needs x0 < x1 and y0 < y1)")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(
            f"the box {x0},{y0},{x1},{y1} is outside {what} ({width}x{height}: x in [0, {width}], "
            f"y in [0, {height}])"
        )
    return x0, y0, x1, y1


def _covered(lo: float, hi: float, cell_starts: np.ndarray, cell: float) -> np.ndarray:
    """bool per cell [start, start + cell): whether it overlaps [lo, hi) by a positive length."""
    return (np.minimum(hi, cell_starts + cell) - np.maximum(lo, cell_starts)) > 0


def box_mask(image_hw, box, decoder) -> np.ndarray:
    """bool [S, S], True where the decoder redraws: every decoder pixel whose area overlaps the box
    (x0, y0, x1, y1) given in the input image's pixels, through the same resize and centre crop
    as `Decoder.targets`. ValueError when the box is empty, outside the image, or lies wholly in
    the part the centre crop leaves out."""
    h, w = (int(v) for v in image_hw)
    x0, y0, x1, y1 = check_box(box, h, w)
    size = decoder.image_size
    if (h, w) == (size, size):
        square, scale_y, scale_x, top, left = size, 1.0, 1.0, 0, 0
    else:
        # image_ops.resize_and_crop's geometry: the shorter side to the CLIP's size, centre crop.
        square = decoder.clip.image_size
        if min(h, w) == square:
            nh, nw = h, w
        else:
            scale = square / min(h, w)
            nh, nw = max(square, round(h * scale)), max(square, round(w * scale))
        scale_y, scale_x = nh / h, nw / w
        top, left = (nh - square) // 2, (nw - square) // 2
    cell = square / size  # crop pixels per decoder pixel
    starts = np.arange(size) * cell
    rows = _covered(y0 * scale_y - top, y1 * scale_y - top, starts, cell)
    cols = _covered(x0 * scale_x - left, x1 * scale_x - left, starts, cell)
    mask = rows[:, None] & cols[None, :]
    if not mask.any():
        raise ValueError(
            f"the box {x0},{y0},{x1},{y1} lies outside the centre square of the {w}x{h} image, "
            "the part the decoder sees"
        )
    return mask


def inpaint(
    decoder,
    images,
    redraw,
    num_samples: int,
    *,
    sampler: str = VARIATION_SAMPLER,
    steps: int = VARIATION_STEPS,
    cond_scale: float = 1.0,
    eta: float = INPAINT_ETA,
    seed: int = 0,
    embeddings=None,
) -> np.ndarray:
    """uint8 [N, num_samples, S, S, 3]: each image with its `redraw` region (bool [N, S, S], e.g.
    from `box_mask`) drawn anew from fresh noise under the image's CLIP embedding, the rest kept by
    replacement at every step (samplers.sample, known=...), so outside the region each sample is
    exactly `decoder_view(images)`."""
    images = _batch(images)
    redraw = np.asarray(redraw, bool)
    size = decoder.image_size
    if redraw.shape != (len(images), size, size):
        raise ValueError(f"redraw must be bool [{len(images)}, {size}, {size}], got {redraw.shape}")
    z = decoder.embed_images(images) if embeddings is None else np.asarray(embeddings, np.float32)
    out = decoder.decode(
        _repeat(z, num_samples),
        sampler=sampler,
        steps=steps,
        cond_scale=cond_scale,
        eta=eta,
        seed=seed,
        known=(_repeat(images, num_samples), ~_repeat(redraw, num_samples)),
    )
    return out.reshape((len(z), num_samples) + out.shape[1:])


def display_view(image, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: an input image's centre square at `size`, to stand beside samples."""
    return image_ops.resize_and_crop(np.asarray(image), size)


def upsample(upsampler, images, *, seed: int = 0) -> np.ndarray:
    """Samples [..., S, S, 3] taken to the upsampler's size ([..., S * f, S * f, 3]); None: as they are."""
    if upsampler is None:
        return images
    flat = np.asarray(images).reshape((-1,) + np.shape(images)[-3:])
    out = upsampler.upsample(flat, seed=seed)
    return out.reshape(np.shape(images)[:-3] + out.shape[1:])


def check_upsampler(decoder, upsampler) -> None:
    """ValueError when the upsampler was trained on inputs of another size than the decoder draws."""
    if upsampler is not None:
        check_upsampler_size(int(upsampler.config.model.low_res_size), decoder.image_size)


def check_upsampler_size(low_res_size: int, decoder_size: int) -> None:
    """check_upsampler on the two sizes alone (from config.json files, before anything loads)."""
    if low_res_size != decoder_size:
        raise ValueError(
            f"the upsampler takes {low_res_size}x{low_res_size} images but the decoder draws {decoder_size}x"
            f"{decoder_size}: give an upsampler trained on the decoder's size"
        )
