"""Sampling a diffusion model: DDPM, DDIM, DPM-Solver++(2M), guidance, DDIM inversion, inpainting.

The model is seen through `denoise_fn(x_t, t) -> output`: x_t has the sample's shape, t is an
int32 [B] vector of ORIGINAL timesteps 0..T-1 (so a model trained on T steps runs under any
respacing), output has x_t's shape and is of `prediction` type ('eps' | 'x0' | 'v', see
schedule.py). Close over params and conditioning, or build it with `guided_denoise_fn`.

    sample(denoise_fn, x_T, rng, schedule, sampler='ddim', steps=None, prediction='eps', eta=0.0,
           clip_x0=None, known=None, return_trajectory=False) -> x_0  (or (x_0, trajectory))
    ddim_invert(denoise_fn, x0, schedule, steps=None, prediction='eps') -> x_T
    guided_denoise_fn(model_fn, cond, null_cond, scale) -> denoise_fn

Each sampler visits the N timesteps of `respace(schedule, steps)` (all of `schedule.timesteps`
when steps is None) from the noisiest down, evaluating the model once per timestep inside ONE
`lax.scan` of static length N, and ends at the clean sample: the last step (from the first kept
timestep, 0, to alpha = 1) returns the model's x0 prediction there. x_T is the sample at the
noisiest kept timestep (standard normal noise for a sampler from scratch). `sample` is plain
traceable JAX: jit the function that builds the denoise_fn and calls it, with `sampler`, `steps`,
`eta`, `clip_x0` and `prediction` static, e.g.

    @functools.partial(jax.jit, static_argnames=("steps",))
    def generate(params, cond, x_T, rng, steps):
        denoise = guided_denoise_fn(lambda x, t, c: model.apply(params, x, t, c), cond, null, 3.0)
        return sample(denoise, x_T, rng, schedule, sampler="dpmpp", steps=steps, clip_x0=(-1, 1))

which compiles once per (sampler, steps) and traces the model once (the loop is not unrolled).

Samplers (all with the process's "fixed small" variance, no learned variance):
- 'ddpm': ancestral sampling (Ho et al. 2020, Algorithm 2) with the posterior variance
  beta_tilde (their section 3.2), on the respaced process when steps < T. Stochastic; about 1000
  steps for full quality.
- 'ddim': Song et al. 2021 ("DDIM"), eq. 12, with eta (their eq. 16): eta = 0 is deterministic,
  eta = 1 equals 'ddpm' on the same timesteps. 25-100 steps; unCLIP's upsamplers use 27 / 15.
- 'dpmpp': DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), the multistep
  second-order solver of the probability-flow ODE in data prediction, over lambda = log(alpha /
  sigma) at the kept timesteps; first order at the first step and at the last two (the jump to
  the clean end, where lambda is infinite, and the long step into timestep 0). Deterministic;
  15-25 steps.

Randomness: step k (k = 0 at the noisiest timestep) draws from key = jax.random.fold_in(rng, k),
split into (sampler noise, inpainting noise), each standard normal of x's shape in float32.
`clip_x0=(lo, hi)` clips every x0 prediction (pixels in [-1, 1]) and re-derives eps from it (as
improved-diffusion does); leave it None for embeddings. `known=(x0_known, mask)` inpaints by
replacement (GLIDE, Nichol et al. 2022, and unCLIP's known region): mask is nonzero where x0_known
is known (it broadcasts against x), and the known region of the start sample and of the sample after
every step is set to q_sample(x0_known, next timestep, fresh noise) (the start sample's from key
fold_in(rng, N)), and to x0_known itself at the end, so the output keeps it exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from core_jax.errors import ConfigError
from dalle_jax.unclip.schedule import Schedule, check_prediction, predict_x0_eps, respace

SAMPLERS = ("ddpm", "ddim", "dpmpp")
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _sampling_schedule(schedule: Schedule, steps: int | None) -> Schedule:
    return schedule if steps is None else respace(schedule, steps)


def _step_table(schedule: Schedule, sampler: str, eta: float) -> dict[str, np.ndarray]:
    """Per-step constants in float64, in sampling order (noisiest first), N rows.

    Row k evaluates the model at timestep t and moves to the next kept timestep below it (to the
    clean sample, alpha_bar = 1, from the lowest): alpha, sigma of t, alpha_next, sigma_next of the
    target, and the sampler's coefficients of
        x_next = x_coef x + x0_coef (x0_hat + second_order (x0_hat - x0_prev)) + eps_coef eps_hat
                 + noise_std z,
    x0_prev being the previous row's x0_hat.
    """
    bar = schedule.sampling_alphas_cumprod[::-1]
    bar_next = np.append(bar[1:], 1.0)
    alpha, sigma = np.sqrt(bar), np.sqrt(1.0 - bar)
    alpha_next, sigma_next = np.sqrt(bar_next), np.sqrt(1.0 - bar_next)
    zeros = np.zeros_like(bar)
    table = dict(
        t=schedule.timesteps[::-1],
        alpha=alpha,
        sigma=sigma,
        alpha_next=alpha_next,
        sigma_next=sigma_next,
        x_coef=zeros,
        x0_coef=zeros,
        eps_coef=zeros,
        second_order=zeros,
        noise_std=zeros,
    )
    if sampler == "ddpm":
        # The respaced process's step beta = 1 - alpha_bar / alpha_bar_next; the posterior
        # q(x_next | x_t, x0) of Ho et al. 2020, eqs. 6-7, with x0 = x0_hat.
        beta = 1.0 - bar / bar_next
        table.update(
            x0_coef=alpha_next * beta / (1.0 - bar),
            x_coef=np.sqrt(1.0 - beta) * (1.0 - bar_next) / (1.0 - bar),
            noise_std=np.sqrt(beta * (1.0 - bar_next) / (1.0 - bar)),
        )
    elif sampler == "ddim":
        # Song et al. 2021, eq. 12: x_next = alpha_next x0_hat + sqrt(1 - bar_next - s^2) eps_hat + s z,
        # s = eta sqrt((1 - bar_next) / (1 - bar)) sqrt(1 - bar / bar_next) (eq. 16).
        std = eta * np.sqrt((1.0 - bar_next) / (1.0 - bar) * (1.0 - bar / bar_next))
        table.update(
            x0_coef=alpha_next, eps_coef=np.sqrt(np.maximum(1.0 - bar_next - std**2, 0.0)), noise_std=std
        )
    else:
        # Lu et al. 2022, Algorithm 2: h = lambda_next - lambda, x_next = (sigma_next / sigma) x
        # - alpha_next (e^-h - 1) D, D = x0_hat + (x0_hat - x0_prev) / (2 r), r = h_prev / h.
        # First order (D = x0_hat) at the first step, where there is no x0_prev, and at the last
        # two: at the clean end sigma_next = 0 and h = inf (x_next = x0_hat), and the step into
        # timestep 0 spans a lambda interval several times the one before it under the even
        # respacing (alpha_bar -> 1 makes lambda grow like a log), where extrapolating the x0
        # difference by 1 / (2r) overshoots (the "lower order final" steps of Lu et al.'s code).
        lam = np.log(alpha) - np.log(sigma)
        h = np.append(lam[1:] - lam[:-1], np.inf)
        second = np.zeros_like(bar)
        second[1:-2] = 1.0 / (2.0 * (h[:-3] / h[1:-2]))
        table.update(x_coef=sigma_next / sigma, x0_coef=-alpha_next * np.expm1(-h), second_order=second)
    return table


def _check(sampler: str, prediction: str, eta: float) -> None:
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    check_prediction(prediction)
    if sampler != "ddim" and eta != 0.0:
        raise ConfigError(f"eta applies to the ddim sampler only, got eta={eta} with {sampler!r}")
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta must be in [0, 1], got {eta}")


def _predict(denoise_fn, prediction, x, t, alpha, sigma, clip_x0):
    output = denoise_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    x0_hat, eps_hat = predict_x0_eps(prediction, output.astype(jnp.float32), x, alpha, sigma)
    if clip_x0 is not None:
        x0_hat = jnp.clip(x0_hat, *clip_x0)
        eps_hat = (x - alpha * x0_hat) / sigma
    return x0_hat, eps_hat


def sample(
    denoise_fn: DenoiseFn,
    x_T: jax.Array,
    rng: jax.Array,
    schedule: Schedule,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    prediction: str = "eps",
    eta: float = 0.0,
    clip_x0: tuple[float, float] | None = None,
    known: tuple[jax.Array, jax.Array] | None = None,
    return_trajectory: bool = False,
):
    """Runs `sampler` from x_T down to the clean sample (see the module docstring); returns x_0 in
    x_T's dtype, or (x_0, trajectory [N, *x_T.shape]) where trajectory[k] is the sample after
    step k (trajectory[-1] is x_0)."""
    _check(sampler, prediction, eta)
    table = _step_table(_sampling_schedule(schedule, steps), sampler, eta)
    rows = {k: jnp.asarray(v, jnp.int32 if k == "t" else jnp.float32) for k, v in table.items()}
    rows["k"] = jnp.arange(len(table["t"]), dtype=jnp.int32)
    if known is not None:
        x0_known, mask = known
        known_mask = jnp.broadcast_to(jnp.asarray(mask).astype(bool), x_T.shape)
        x0_known = jnp.asarray(x0_known, jnp.float32)
    noisy = sampler == "ddpm" or eta > 0.0

    def replace_known(x, alpha, sigma, key):
        if known is None:
            return x
        noised = alpha * x0_known + sigma * jax.random.normal(key, x.shape, jnp.float32)
        return jnp.where(known_mask, noised, x)

    def step(carry, row):
        x, x0_prev = carry
        sampler_key, known_key = jax.random.split(jax.random.fold_in(rng, row["k"]))
        x0_hat, eps_hat = _predict(denoise_fn, prediction, x, row["t"], row["alpha"], row["sigma"], clip_x0)
        d = x0_hat + row["second_order"] * (x0_hat - x0_prev)
        x_next = row["x_coef"] * x + row["x0_coef"] * d + row["eps_coef"] * eps_hat
        if noisy:
            x_next = x_next + row["noise_std"] * jax.random.normal(sampler_key, x.shape, jnp.float32)
        x_next = replace_known(x_next, row["alpha_next"], row["sigma_next"], known_key)
        return (x_next, x0_hat), (x_next.astype(x_T.dtype) if return_trajectory else None)

    x = x_T.astype(jnp.float32)
    # The start sample's known region, noised to the noisiest kept timestep, from key index N,
    # which no step uses.
    start_key = jax.random.fold_in(rng, len(table["t"]))
    x = replace_known(x, rows["alpha"][0], rows["sigma"][0], jax.random.split(start_key)[1])
    (x0, _), trajectory = jax.lax.scan(step, (x, jnp.zeros_like(x)), rows)
    x0 = x0.astype(x_T.dtype)
    return (x0, trajectory) if return_trajectory else x0


def ddim_invert(
    denoise_fn: DenoiseFn,
    x0: jax.Array,
    schedule: Schedule,
    *,
    steps: int | None = None,
    prediction: str = "eps",
) -> jax.Array:
    """Deterministic DDIM (eta = 0) run backwards: the x_T that `sample(..., sampler='ddim',
    steps=steps)` maps back to x0 (unCLIP's start noise for variations and interpolations).

    x0 is taken as the sample at the first kept timestep t_0 = 0 (alpha_bar_0 ~ 1); each step from
    kept t_i to t_{i+1} evaluates the model at (x_{t_i}, t_i) and moves along eq. 12 of Song et al.
    2021 to t_{i+1} (their section 4.3: eps at t_{i+1} is approximated by eps at t_i, as in
    improved-diffusion's ddim_reverse_sample), ending at the noisiest kept timestep, where sampling
    starts: N - 1 model evaluations in one `lax.scan`. With a model whose predictions are exact
    the round trip returns x0 to float error."""
    check_prediction(prediction)
    spaced = _sampling_schedule(schedule, steps)
    bar, kept = spaced.sampling_alphas_cumprod, spaced.timesteps
    rows = dict(
        t=jnp.asarray(kept[:-1], jnp.int32),
        alpha=jnp.asarray(np.sqrt(bar[:-1]), jnp.float32),
        sigma=jnp.asarray(np.sqrt(1.0 - bar[:-1]), jnp.float32),
        alpha_next=jnp.asarray(np.sqrt(bar[1:]), jnp.float32),
        sigma_next=jnp.asarray(np.sqrt(1.0 - bar[1:]), jnp.float32),
    )

    def step(x, row):
        x0_hat, eps_hat = _predict(denoise_fn, prediction, x, row["t"], row["alpha"], row["sigma"], None)
        return row["alpha_next"] * x0_hat + row["sigma_next"] * eps_hat, None

    x_T, _ = jax.lax.scan(step, x0.astype(jnp.float32), rows)
    return x_T.astype(x0.dtype)


def guided_denoise_fn(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    cond: Any,
    null_cond: Any,
    scale: float,
) -> DenoiseFn:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoise_fn for the samplers.

    model_fn(x, t, cond) -> output; cond is a pytree of arrays with leading batch dim B, null_cond
    the same tree with the "no conditioning" values (each leaf broadcast to its cond leaf's shape,
    so a learned null of shape [1, D] serves any batch). Each call runs model_fn ONCE on 2B rows,
    [x, x] with [cond, null_cond], and returns uncond + scale * (cond - uncond) in the model's own
    output space. The guided x0_hat and eps_hat are the same whichever space ('eps', 'x0' or 'v')
    the model predicts: each is an affine function of the output with x_t fixed, and the guided
    output is an affine combination ((1 - s) uncond + s cond) of two outputs.

    `scale` is a static Python float; at scale == 1 only the conditional pass runs (B rows), so
    the result is the unguided model's output bit for bit.
    """
    scale = float(scale)
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, cond)

    def both_rows(c, n):
        return jnp.concatenate([c, jnp.broadcast_to(n, c.shape).astype(c.dtype)])

    def denoise(x, t):
        rows = jax.tree.map(both_rows, cond, null_cond)
        output = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), rows)
        conditional, unconditional = jnp.split(output, 2)
        return unconditional + scale * (conditional - unconditional)

    return denoise
