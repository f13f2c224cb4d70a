"""Gaussian diffusion for unCLIP: noise schedules, the forward process, prediction types, the loss.

Everything here is shape-agnostic: `x0` is any array with a leading batch dim (images [B,H,W,C] for
the decoder and upsamplers, CLIP embeddings [B,D] for the prior).

Notation (Kingma et al. 2021; Salimans & Ho 2022): with alpha_bar_t = prod_{s<=t} (1 - beta_s),
    alpha_t = sqrt(alpha_bar_t),  sigma_t = sqrt(1 - alpha_bar_t),  x_t = alpha_t x0 + sigma_t eps,
    SNR(t) = alpha_t^2 / sigma_t^2.
Timesteps are integers t = 0..T-1 (T = `Schedule.num_train_steps`); t is the papers' t+1 in 1..T,
so alpha_bar of timestep 0 is already slightly below 1 (improved-diffusion's indexing).

API:
    make_schedule(kind, num_steps=1000) -> Schedule       'cosine' | 'linear'
    respace(schedule, steps) -> Schedule                  the timesteps a sampler visits
    alpha_sigma(schedule, t, ndim) -> (alpha, sigma)      float32, [B, 1, ..., 1]
    q_sample(schedule, x0, t, noise) -> x_t
    sample_timesteps(rng, batch_size, schedule) -> int32 [B], uniform in [0, T)
    predict_x0_eps(prediction, output, x_t, alpha, sigma) -> (x0_hat, eps_hat)
    training_target(prediction, x0, noise, alpha, sigma)
    diffusion_loss(schedule, output, x0, noise, t, prediction, min_snr_gamma=None) -> [B]

Prediction types (what the network outputs): 'eps' (the noise, Ho et al. 2020), 'x0' (the clean
sample; unCLIP's prior, Ramesh et al. 2022 section 2.2) and 'v' = alpha_t eps - sigma_t x0
(Salimans & Ho 2022, "Progressive distillation", section 4). Each is an affine function
of the others given x_t, so any of them yields (x0_hat, eps_hat).

A training step, for a model `model(x_t, t, cond)`:
    t = sample_timesteps(rng_t, B, schedule); noise = jax.random.normal(rng_n, x0.shape)
    out = model(q_sample(schedule, x0, t, noise), t, cond)
    loss = diffusion_loss(schedule, out, x0, noise, t, prediction="eps").mean()
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from core_jax.errors import ConfigError

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "x0", "v")

# Nichol & Dhariwal 2021 ("Improved DDPM"), section 3.2: the offset s of eq. 17 and the clip on beta
# that keeps the last step from being singular.
COSINE_OFFSET = 0.008
MAX_BETA = 0.999
# Ho et al. 2020, section 4: beta_1 = 1e-4 to beta_T = 0.02 with T = 1000; improved-diffusion's
# get_named_beta_schedule scales both ends by 1000 / T so other step counts cover the same process.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete diffusion process and the timesteps a sampler visits.

    betas, alphas_cumprod: float64 [T], the training process (T = num_train_steps).
    timesteps: int64 [N], ascending, the original timesteps a sampler evaluates the model at; all
        T of them from `make_schedule`, a subset after `respace`. Every function that takes `t`
        takes original timesteps, so a model trained on T steps serves every respacing.
    The arrays are read-only.
    """

    kind: str
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    timesteps: np.ndarray

    def __post_init__(self):
        for a in (self.betas, self.alphas_cumprod, self.timesteps):
            a.setflags(write=False)

    @property
    def num_train_steps(self) -> int:
        return len(self.betas)

    @property
    def num_steps(self) -> int:
        """How many timesteps a sampler visits (model evaluations of a DDPM / DDIM run)."""
        return len(self.timesteps)

    @property
    def sampling_alphas_cumprod(self) -> np.ndarray:
        """alpha_bar at `timesteps`, float64 [N]: all the samplers need of the process."""
        return self.alphas_cumprod[self.timesteps]


def cosine_alpha_bar(u: np.ndarray, offset: float = COSINE_OFFSET) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17 at u = t / T in [0, 1]: f(u) / f(0), f(u) = cos((u+s)/(1+s) pi/2)^2."""
    f = lambda v: np.cos((v + offset) / (1 + offset) * math.pi / 2) ** 2
    return f(np.asarray(u, np.float64)) / f(0.0)


def make_schedule(kind: str, num_steps: int = 1000) -> Schedule:
    """The 'cosine' (Nichol & Dhariwal 2021, eq. 17) or 'linear' (Ho et al. 2020) process over
    `num_steps` timesteps, computed in float64.

    cosine: beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), 0.999), so alphas_cumprod[t] =
        alpha_bar((t+1)/T) except at the last timestep, where the clip leaves alpha_bar > 0.
    linear: beta evenly from 1e-4 to 0.02 scaled by 1000 / T (needs T > 20 so beta stays below 1).
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown noise schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ConfigError(f"the number of diffusion steps must be a positive integer, got {num_steps}")
    num_steps = int(num_steps)
    if kind == "cosine":
        u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
        bar = cosine_alpha_bar(u)
        betas = np.minimum(1.0 - bar[1:] / bar[:-1], MAX_BETA)
    else:
        scale = 1000.0 / num_steps
        betas = np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_steps, dtype=np.float64)
        if betas[-1] >= 1.0:
            raise ConfigError(
                f"the linear schedule needs more than 20 steps (beta reaches 1), got {num_steps}"
            )
    return Schedule(kind, betas, np.cumprod(1.0 - betas), np.arange(num_steps))


def spaced_indices(n: int, steps: int) -> np.ndarray:
    """`steps` of the indices 0..n-1, evenly spaced: improved-diffusion's space_timesteps(n, [steps]).

    Index k (k = 0..steps-1) is round(k * (n - 1) / (steps - 1)), the stride accumulated as a float
    and rounded half to even (Python's `round`), so the first and last index are always kept.
    """
    if int(steps) != steps or not 1 <= steps <= n:
        raise ConfigError(f"sampling steps must be an integer in [1, {n}], got {steps}")
    stride = (n - 1) / (steps - 1) if steps > 1 else 1
    picked, position = [], 0.0
    for _ in range(int(steps)):
        picked.append(round(position))
        position += stride
    return np.asarray(picked, np.int64)


def respace(schedule: Schedule, steps: int) -> Schedule:
    """The same process with a sampler visiting `steps` of `schedule.timesteps`, evenly spaced
    (`spaced_indices`): for T = 1000, 10 steps keep 0, 111, 222, ..., 999. The samplers derive the
    respaced process from `sampling_alphas_cumprod` (beta_i = 1 - alpha_bar_i / alpha_bar_{i-1}
    between kept timesteps, as improved-diffusion's SpacedDiffusion does)."""
    kept = schedule.timesteps[spaced_indices(schedule.num_steps, steps)]
    return dataclasses.replace(schedule, timesteps=kept)


def alpha_sigma(schedule: Schedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t) as float32 [B, 1, ..., 1] (`ndim` dims in all, to broadcast against x)
    for int timesteps t [B]; taken from float64 tables so that sigma near t = 0 keeps its digits."""
    shape = (-1,) + (1,) * (ndim - 1)
    alpha = jnp.asarray(np.sqrt(schedule.alphas_cumprod), jnp.float32)[t]
    sigma = jnp.asarray(np.sqrt(1.0 - schedule.alphas_cumprod), jnp.float32)[t]
    return alpha.reshape(shape), sigma.reshape(shape)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = alpha_t x0 + sigma_t noise (Ho et al. 2020, eq. 4), in x0's dtype."""
    alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
    return (alpha * x0 + sigma * noise).astype(x0.dtype)


def sample_timesteps(rng: jax.Array, batch_size: int, schedule: Schedule) -> jax.Array:
    """Training timesteps, int32 [batch_size], uniform over 0..T-1 (Ho et al. 2020, Algorithm 1)."""
    return jax.random.randint(rng, (batch_size,), 0, schedule.num_train_steps, jnp.int32)


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ConfigError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def predict_x0_eps(prediction: str, output, x_t, alpha, sigma):
    """The network's `output` at x_t -> (x0_hat, eps_hat), from x_t = alpha x0 + sigma eps and, for
    'v', alpha^2 + sigma^2 = 1: x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v."""
    check_prediction(prediction)
    if prediction == "eps":
        return (x_t - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    return alpha * x_t - sigma * output, sigma * x_t + alpha * output


def training_target(prediction: str, x0, noise, alpha, sigma):
    """What the network regresses for each prediction type."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return alpha * noise - sigma * x0


def min_snr_weights(schedule: Schedule, prediction: str, gamma: float) -> np.ndarray:
    """Per-timestep loss weights, float64 [T] (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy", arXiv 2303.09556): min(SNR, gamma) / SNR for eps, min(SNR, gamma)
    for x0, min(SNR, gamma) / (SNR + 1) for v. The eps MSE is SNR times the x0 MSE and the v MSE
    (SNR + 1) times it, so each weight makes the loss min(SNR, gamma) times the x0 MSE; the paper
    uses gamma = 5."""
    check_prediction(prediction)
    if not gamma > 0:
        raise ConfigError(f"min-SNR gamma must be positive, got {gamma}")
    snr = schedule.alphas_cumprod / (1.0 - schedule.alphas_cumprod)
    clipped = np.minimum(snr, gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[prediction]


def diffusion_loss(
    schedule: Schedule,
    output: jax.Array,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    prediction: str = "eps",
    min_snr_gamma: float | None = None,
) -> jax.Array:
    """Per-example loss, float32 [B]: the mean over non-batch dims of (output - target)^2 (the
    "simple" loss, Ho et al. 2020 eq. 14, for the chosen prediction type), times the min-SNR
    weight of t when `min_snr_gamma` is set. `output` is the network's output at
    q_sample(schedule, x0, t, noise). Returned per example so a task can mean (or mask) them."""
    alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
    target = training_target(prediction, x0.astype(jnp.float32), noise.astype(jnp.float32), alpha, sigma)
    err = jnp.square(output.astype(jnp.float32) - target)
    per_example = err.reshape(err.shape[0], -1).mean(axis=1)
    if min_snr_gamma is not None:
        per_example = (
            per_example * jnp.asarray(min_snr_weights(schedule, prediction, min_snr_gamma), jnp.float32)[t]
        )
    return per_example
