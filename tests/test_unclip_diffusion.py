"""The unCLIP diffusion core against hand-derived numbers: schedules, respacing, prediction types,
the loss, one step of each sampler, guidance, inversion, inpainting, interpolation, and the three
samplers on a Gaussian toy whose exact denoiser is known in closed form. No networks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax.errors import ConfigError
from dalle_jax.unclip.interpolate import slerp
from dalle_jax.unclip.samplers import ddim_invert, guided_denoise_fn, sample
from dalle_jax.unclip.schedule import (
    alpha_sigma,
    diffusion_loss,
    make_schedule,
    min_snr_weights,
    predict_x0_eps,
    q_sample,
    respace,
    sample_timesteps,
    training_target,
)

# ----------------------------------------------------------------------------- schedules


def test_cosine_schedule_matches_eq_17():
    T, s = 1000, 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    sched = make_schedule("cosine")
    # Timestep t (0-based) ends the paper's step t+1: alpha_bar = f((t+1)/T) / f(0).
    for t in (0, 1, 250, 500, 998):
        assert sched.alphas_cumprod[t] == pytest.approx(f((t + 1) / T) / f(0), rel=1e-12)
    assert sched.alphas_cumprod[0] == pytest.approx(0.999958716, rel=1e-8)
    # f(1) = 0 would make the last beta 1; it is clipped at 0.999.
    assert sched.betas[-1] == 0.999
    assert sched.alphas_cumprod[-1] == pytest.approx(f(999 / T) / f(0) * 0.001, rel=1e-12)
    assert sched.alphas_cumprod.dtype == np.float64 and sched.num_train_steps == 1000


def test_linear_schedule_scales_with_steps():
    sched = make_schedule("linear")
    assert sched.betas[0] == pytest.approx(1e-4) and sched.betas[-1] == pytest.approx(0.02)
    assert sched.betas[500] == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999, rel=1e-12)
    expected = 1.0
    for j in range(11):
        expected *= 1.0 - (1e-4 + j * (0.02 - 1e-4) / 999)
    assert sched.alphas_cumprod[10] == pytest.approx(expected, rel=1e-12)
    # 500 steps cover the same process: both ends scaled by 1000 / 500.
    half = make_schedule("linear", 500)
    assert half.betas[0] == pytest.approx(2e-4) and half.betas[-1] == pytest.approx(0.04)


def test_schedule_errors_are_config_errors():
    with pytest.raises(ConfigError, match="cosine, linear"):
        make_schedule("quadratic")
    with pytest.raises(ConfigError, match="20 steps"):
        make_schedule("linear", 10)
    with pytest.raises(ConfigError, match=r"\[1, 1000\]"):
        respace(make_schedule("cosine"), 1001)


def test_respacing_matches_space_timesteps():
    sched = make_schedule("cosine")
    assert list(respace(sched, 10).timesteps) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    # Stride 999 / 24 = 41.625 (exact in binary); round(k * 41.625), halves to even: 166.5 -> 166,
    # 499.5 -> 500, 832.5 -> 832.
    assert list(respace(sched, 25).timesteps) == [
        0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500,
        541, 583, 624, 666, 708, 749, 791, 832, 874, 916, 957, 999,
    ]  # fmt: skip
    spaced = respace(sched, 10)
    np.testing.assert_array_equal(spaced.sampling_alphas_cumprod, sched.alphas_cumprod[spaced.timesteps])
    np.testing.assert_array_equal(spaced.alphas_cumprod, sched.alphas_cumprod)  # the model's process
    assert list(respace(spaced, 4).timesteps) == [0, 333, 666, 999]
    assert list(respace(sched, 1).timesteps) == [0]


def test_alpha_sigma_q_sample_and_timesteps():
    sched = make_schedule("cosine")
    t = jnp.array([0, 500, 999])
    alpha, sigma = alpha_sigma(sched, t, 4)
    assert alpha.shape == sigma.shape == (3, 1, 1, 1) and alpha.dtype == jnp.float32
    np.testing.assert_allclose(alpha.ravel() ** 2, sched.alphas_cumprod[[0, 500, 999]], rtol=1e-6)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
    x0, noise = jnp.ones((3, 2, 2, 1)), jnp.full((3, 2, 2, 1), 2.0)
    np.testing.assert_allclose(q_sample(sched, x0, t, noise), alpha + 2 * sigma + 0 * x0, rtol=1e-6)
    draws = sample_timesteps(jax.random.PRNGKey(0), 5000, make_schedule("linear", 25))
    assert draws.dtype == jnp.int32 and int(draws.min()) == 0 and int(draws.max()) == 24


# ----------------------------------------------------------------------------- predictions, loss


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_round_trips(prediction):
    sched = make_schedule("cosine")
    k0, k1 = jax.random.split(jax.random.PRNGKey(1))
    x0, eps = jax.random.normal(k0, (4, 3, 5)), jax.random.normal(k1, (4, 3, 5))
    t = jnp.array([0, 300, 600, 900])
    alpha, sigma = alpha_sigma(sched, t, 3)
    x_t = q_sample(sched, x0, t, eps)
    target = training_target(prediction, x0, eps, alpha, sigma)
    x0_hat, eps_hat = predict_x0_eps(prediction, target, x_t, alpha, sigma)
    # eps -> x0 divides by alpha (0.025 at t=900) and x0 -> eps by sigma (0.0064 at t=0).
    np.testing.assert_allclose(x0_hat, x0, atol=5e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=5e-4)
    if prediction == "v":
        np.testing.assert_allclose(target, alpha * eps - sigma * x0, rtol=1e-6)


def test_min_snr_weights_by_hand():
    sched = make_schedule("cosine")
    snr = lambda t: sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    eps_w, x0_w, v_w = (min_snr_weights(sched, p, 5.0) for p in ("eps", "x0", "v"))
    # t=100: SNR ~ 37.5 > 5 is clipped to 5.
    assert snr(100) > 5
    assert eps_w[100] == pytest.approx(5 / snr(100)) and x0_w[100] == 5.0
    assert v_w[100] == pytest.approx(5 / (snr(100) + 1))
    # t=500: alpha_bar = f(0.501) / f(0) (eq. 17), SNR ~ 0.97 < 5 is kept: eps weight 1, x0 weight
    # SNR, v weight SNR / (SNR + 1).
    bar = math.cos((0.501 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert snr(500) == pytest.approx(bar / (1 - bar), rel=1e-12) and snr(500) < 5
    assert eps_w[500] == pytest.approx(1.0) and x0_w[500] == pytest.approx(snr(500))
    assert v_w[500] == pytest.approx(snr(500) / (snr(500) + 1))
    with pytest.raises(ConfigError, match="eps, x0, v"):
        min_snr_weights(sched, "score", 5.0)


def test_diffusion_loss_is_per_example_mse_times_weight():
    sched = make_schedule("cosine")
    x0, noise = jnp.zeros((3, 2, 2, 3)), jnp.ones((3, 2, 2, 3))
    t = jnp.array([10, 500, 990])
    alpha, sigma = alpha_sigma(sched, t, 4)
    target = training_target("v", x0, noise, alpha, sigma)
    # Example b is off by b+1 in one of its 12 entries and exact elsewhere: MSE (b+1)^2 / 12.
    off = jnp.zeros_like(x0).at[:, 0, 0, 0].set(jnp.array([1.0, 2.0, 3.0]))
    plain = diffusion_loss(sched, target + off, x0, noise, t, prediction="v")
    np.testing.assert_allclose(plain, np.array([1.0, 4.0, 9.0]) / 12, rtol=1e-6)
    weighted = diffusion_loss(sched, target + off, x0, noise, t, prediction="v", min_snr_gamma=5.0)
    np.testing.assert_allclose(weighted, plain * min_snr_weights(sched, "v", 5.0)[[10, 500, 990]], rtol=1e-6)
    assert np.all(np.asarray(diffusion_loss(sched, target, x0, noise, t, prediction="v")) == 0)


# ----------------------------------------------------------------------------- one sampler step

# A linear process over 100 steps, three kept timesteps (respace(.., 3) keeps 0, 50, 99): step 0
# of every sampler goes from t = 99 to t = 50. `bar` holds alpha_bar (float64, tested above).
SMALL = make_schedule("linear", 100)
BAR = SMALL.alphas_cumprod
X_T = jnp.array([[1.0, -0.5]])


def _eps_fn(x, t):
    """A trivial 'eps' model: eps_hat = 0.3 x."""
    return 0.3 * x


def _first_step(sampler, eta=0.0):
    _, traj = sample(
        _eps_fn, X_T, jax.random.PRNGKey(7), SMALL, sampler=sampler, steps=3, eta=eta, return_trajectory=True
    )
    return np.asarray(traj[0], np.float64)


def _step_noise(k):
    """The documented draw of step k: the first half of fold_in(rng, k) split in two."""
    key = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(7), k))[0]
    return np.asarray(jax.random.normal(key, X_T.shape, jnp.float32), np.float64)


def _hand_x0_eps():
    # x_t = alpha x0 + sigma eps with eps_hat = 0.3 x_t gives x0_hat = (x_t - sigma eps_hat) / alpha.
    x = np.asarray(X_T, np.float64)
    eps = 0.3 * x
    return x, (x - math.sqrt(1 - BAR[99]) * eps) / math.sqrt(BAR[99]), eps


def test_ddpm_step_by_hand():
    x, x0, _ = _hand_x0_eps()
    # Respaced step beta = 1 - bar_99 / bar_50; Ho et al. 2020 eq. 7: posterior mean
    # sqrt(bar_50) beta / (1 - bar_99) x0 + sqrt(1 - beta) (1 - bar_50) / (1 - bar_99) x_t,
    # variance beta_tilde = beta (1 - bar_50) / (1 - bar_99).
    beta = 1 - BAR[99] / BAR[50]
    mean = (
        math.sqrt(BAR[50]) * beta / (1 - BAR[99]) * x0
        + math.sqrt(1 - beta) * (1 - BAR[50]) / (1 - BAR[99]) * x
    )
    std = math.sqrt(beta * (1 - BAR[50]) / (1 - BAR[99]))
    np.testing.assert_allclose(_first_step("ddpm"), mean + std * _step_noise(0), rtol=1e-5, atol=1e-6)


def test_ddim_steps_by_hand():
    _, x0, eps = _hand_x0_eps()
    # Song et al. 2021 eq. 12 at eta = 0: x_50 = sqrt(bar_50) x0_hat + sqrt(1 - bar_50) eps_hat.
    deterministic = math.sqrt(BAR[50]) * x0 + math.sqrt(1 - BAR[50]) * eps
    np.testing.assert_allclose(_first_step("ddim"), deterministic, rtol=1e-5, atol=1e-6)
    # eta = 1 (eq. 16): s^2 = (1 - bar_50) / (1 - bar_99) (1 - bar_99 / bar_50), which is beta_tilde.
    s = math.sqrt((1 - BAR[50]) / (1 - BAR[99]) * (1 - BAR[99] / BAR[50]))
    stochastic = math.sqrt(BAR[50]) * x0 + math.sqrt(1 - BAR[50] - s**2) * eps + s * _step_noise(0)
    np.testing.assert_allclose(_first_step("ddim", eta=1.0), stochastic, rtol=1e-5, atol=1e-6)
    # ... and so eta = 1 is the DDPM step (the same noise draw).
    np.testing.assert_allclose(_first_step("ddim", eta=1.0), _first_step("ddpm"), rtol=1e-5, atol=1e-6)


def test_dpmpp_first_and_second_order_steps_by_hand():
    # respace(.., 4) keeps 0, 33, 66, 99: step 0 (99 -> 66) is first order, step 1 (66 -> 33) second
    # order. An 'x0' model x0_hat = 0.5 x + t / 100 changes with t, so the second-order term shows.
    def x0_fn(x, t):
        return 0.5 * x + t[:, None] / 100.0

    _, traj = sample(
        x0_fn,
        X_T,
        jax.random.PRNGKey(0),
        SMALL,
        sampler="dpmpp",
        steps=4,
        prediction="x0",
        return_trajectory=True,
    )
    alpha = lambda t: math.sqrt(BAR[t])
    sigma = lambda t: math.sqrt(1 - BAR[t])
    lam = lambda t: math.log(alpha(t) / sigma(t))
    x = np.asarray(X_T, np.float64)
    # Lu et al. 2022 Algorithm 2, first step: x_66 = sigma_66 / sigma_99 x_99 - alpha_66 (e^-h - 1) x0_hat(x_99, 99).
    d_99 = 0.5 * x + 0.99
    h_1 = lam(66) - lam(99)
    x_66 = sigma(66) / sigma(99) * x - alpha(66) * (math.exp(-h_1) - 1) * d_99
    np.testing.assert_allclose(traj[0], x_66, rtol=1e-5)
    # Second step: r = h_1 / h_2, D = (1 + 1/(2r)) x0_hat(x_66, 66) - 1/(2r) x0_hat(x_99, 99).
    d_66 = 0.5 * x_66 + 0.66
    h_2 = lam(33) - lam(66)
    r = h_1 / h_2
    d = (1 + 1 / (2 * r)) * d_66 - 1 / (2 * r) * d_99
    x_33 = sigma(33) / sigma(66) * x_66 - alpha(33) * (math.exp(-h_2) - 1) * d
    np.testing.assert_allclose(traj[1], x_33, rtol=1e-5)
    # Every sampler ends at the x0 prediction at timestep 0.
    np.testing.assert_allclose(traj[3], 0.5 * np.asarray(traj[2]), rtol=1e-6)


def test_sampler_errors_are_config_errors():
    with pytest.raises(ConfigError, match="ddpm, ddim, dpmpp"):
        sample(_eps_fn, X_T, jax.random.PRNGKey(0), SMALL, sampler="euler")
    with pytest.raises(ConfigError, match="eta"):
        sample(_eps_fn, X_T, jax.random.PRNGKey(0), SMALL, sampler="ddpm", eta=0.5)
    with pytest.raises(ConfigError, match="eps, x0, v"):
        sample(_eps_fn, X_T, jax.random.PRNGKey(0), SMALL, prediction="score")


# ----------------------------------------------------------------------------- guidance


def _toy_model(calls):
    def model_fn(x, t, cond):
        calls.append(x.shape[0])
        return x * cond["scale"][:, None] + cond["shift"] + 1e-3 * t[:, None]

    return model_fn


def test_guidance_one_pass_of_2b_rows():
    calls = []
    model_fn = _toy_model(calls)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    t = jnp.array([5, 6, 7], jnp.int32)
    cond = {"scale": jnp.array([1.0, 2.0, 3.0]), "shift": jnp.ones((3, 4))}
    null = {"scale": jnp.zeros((1,)), "shift": jnp.zeros((1, 4))}  # broadcast to B rows
    guided = guided_denoise_fn(model_fn, cond, null, 3.0)(x, t)
    assert calls == [6]
    conditional = model_fn(x, t, cond)
    unconditional = model_fn(x, t, {"scale": jnp.zeros(3), "shift": jnp.zeros((3, 4))})
    np.testing.assert_allclose(
        guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-6, atol=1e-6
    )

    calls.clear()
    unguided = guided_denoise_fn(model_fn, cond, null, 1.0)(x, t)
    assert calls == [3]  # scale 1: only the conditional pass
    np.testing.assert_array_equal(unguided, conditional)
    # ... and through a whole sampler under jit, bit for bit.
    run = lambda fn: jax.jit(
        lambda x_T: sample(fn, x_T, jax.random.PRNGKey(1), SMALL, sampler="ddpm", steps=5)
    )(x)
    np.testing.assert_array_equal(
        run(guided_denoise_fn(model_fn, cond, null, 1.0)), run(lambda x, t: model_fn(x, t, cond))
    )


def test_guidance_is_the_same_in_every_prediction_space():
    # Guiding eps outputs, or the same outputs written as x0 or v, gives the same x0_hat.
    sched = make_schedule("cosine")
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    x_t, eps_c, eps_u = (jax.random.normal(key, (2, 3)) for key in k)
    alpha, sigma = alpha_sigma(sched, jnp.array([200, 700]), 2)
    x0_of = lambda eps: predict_x0_eps("eps", eps, x_t, alpha, sigma)[0]
    by_eps = x0_of(eps_u + 3 * (eps_c - eps_u))
    x0_c, x0_u = x0_of(eps_c), x0_of(eps_u)
    np.testing.assert_allclose(x0_u + 3 * (x0_c - x0_u), by_eps, rtol=1e-4, atol=1e-5)
    v_of = lambda eps: training_target("v", x0_of(eps), eps, alpha, sigma)
    v_c, v_u = v_of(eps_c), v_of(eps_u)
    by_v = predict_x0_eps("v", v_u + 3 * (v_c - v_u), x_t, alpha, sigma)[0]
    np.testing.assert_allclose(by_v, by_eps, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- inversion, inpainting


def _exact_eps_fn(sched, x0_true):
    """Knows the data: eps_hat = (x_t - alpha x0) / sigma is exact for the x_t it is given."""

    def denoise(x, t):
        alpha, sigma = alpha_sigma(sched, t, x.ndim)
        return (x - alpha * x0_true) / sigma

    return denoise


def test_ddim_inversion_round_trip():
    sched = make_schedule("cosine")
    x0 = jax.random.uniform(jax.random.PRNGKey(3), (2, 4, 4, 3), minval=-1, maxval=1)
    denoise = _exact_eps_fn(sched, x0)
    x_T = ddim_invert(denoise, x0, sched, steps=50)
    assert x_T.shape == x0.shape and float(jnp.abs(x_T - x0).max()) > 0.5  # noise, not the image
    back = sample(denoise, x_T, jax.random.PRNGKey(0), sched, sampler="ddim", steps=50)
    np.testing.assert_allclose(back, x0, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_inpainting_keeps_the_known_region(sampler):
    sched = make_schedule("cosine")
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(4), 3)
    x0_known = jax.random.uniform(k0, (2, 6, 6, 3), minval=-1, maxval=1)
    mask = (jax.random.uniform(k1, (2, 6, 6, 1)) < 0.5).astype(jnp.float32)
    known = np.broadcast_to(np.asarray(mask) > 0, x0_known.shape)
    rng = jax.random.PRNGKey(5)
    x0, traj = sample(
        lambda x, t: 0.1 * x, jax.random.normal(k2, x0_known.shape), rng, sched,
        sampler=sampler, steps=8, clip_x0=(-1.0, 1.0), known=(x0_known, mask), return_trajectory=True,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(x0)[known], np.asarray(x0_known)[known])
    assert not np.allclose(np.asarray(x0)[~known], np.asarray(x0_known)[~known], atol=0.1)
    # After step k the known region is q_sample(x0_known, next timestep, the second half of
    # fold_in(rng, k) split in two).
    kept = respace(sched, 8).timesteps[::-1]
    for k in (0, 3):
        key = jax.random.split(jax.random.fold_in(rng, k))[1]
        noise = jax.random.normal(key, x0_known.shape)
        expected = q_sample(sched, x0_known, jnp.full((2,), kept[k + 1]), noise)
        np.testing.assert_allclose(np.asarray(traj[k])[known], np.asarray(expected)[known], atol=1e-6)


# ----------------------------------------------------------------------------- compile once


def test_sampling_compiles_once_per_sampler_and_steps():
    traces = []

    def denoise(x, t):
        traces.append(1)  # runs at trace time only: once per compilation if the loop is not unrolled
        return 0.1 * x

    generate = jax.jit(
        lambda x_T, rng, sampler, steps: sample(denoise, x_T, rng, SMALL, sampler=sampler, steps=steps),
        static_argnums=(2, 3),
    )
    for sampler in ("ddpm", "ddim", "dpmpp"):
        for steps in (5, 20):
            for seed in (0, 1):
                generate(
                    jax.random.normal(jax.random.PRNGKey(seed), (2, 3)),
                    jax.random.PRNGKey(seed),
                    sampler,
                    steps,
                )
    assert len(traces) == 6


# ----------------------------------------------------------------------------- Gaussian toy

# Data x0 ~ N(MU, SD^2) per dim (one narrow dim, one wide). Then x_t ~ N(alpha MU, alpha^2 SD^2 +
# sigma^2) and E[eps | x_t] = sigma (x_t - alpha MU) / (alpha^2 SD^2 + sigma^2) exactly, so the
# samplers' only errors are their discretisation and the finite sample.
MU, SD = np.array([0.5, -1.0]), np.array([0.5, 1.5])
N_SAMPLES = 2000


@pytest.mark.parametrize(
    "sampler,steps,bias",
    # bias: discretisation allowance, a fraction of SD. Deterministic samplers map x_T linearly for
    # Gaussian data; on the exact map (bench/diffusion_toy.py) DDIM 50 lands ~3.3% below SD and
    # DPM-Solver++ 20 within 1.4%; the means are exact to 1e-4. DDPM at 1000 steps follows the
    # training chain and has no allowance beyond 1%.
    [("ddpm", None, 0.01), ("ddim", 50, 0.04), ("dpmpp", 20, 0.02)],
)
def test_gaussian_toy_reproduces_mean_and_std(sampler, steps, bias):
    sched = make_schedule("cosine")

    def exact_eps(x, t):
        alpha, sigma = alpha_sigma(sched, t, x.ndim)
        return sigma * (x - alpha * MU) / (alpha**2 * SD**2 + sigma**2)

    x_T = jax.random.normal(jax.random.PRNGKey(11), (N_SAMPLES, 2))
    x0 = np.asarray(
        jax.jit(lambda x: sample(exact_eps, x, jax.random.PRNGKey(12), sched, sampler=sampler, steps=steps))(
            x_T
        )
    )
    # 4 standard errors of the sample mean (SD / sqrt(n)) and of the sample std (SD / sqrt(2n)),
    # plus the allowance.
    np.testing.assert_array_less(np.abs(x0.mean(0) - MU), 4 * SD / math.sqrt(N_SAMPLES) + bias * SD)
    np.testing.assert_array_less(np.abs(x0.std(0) - SD), 4 * SD / math.sqrt(2 * N_SAMPLES) + bias * SD)


# ----------------------------------------------------------------------------- slerp


def test_slerp():
    slerp_ = jax.jit(slerp)  # one compiled program per shape instead of ~30 eager ops
    u, v = jnp.array([[1.0, 0.0, 0.0]]), jnp.array([[0.0, 1.0, 0.0]])
    np.testing.assert_allclose(slerp_(u, v, 0.5), [[math.sqrt(0.5), math.sqrt(0.5), 0.0]], rtol=1e-6)
    # Directions by angle (a third of 90 degrees), norms linearly (2 -> 4 at 1/3 is 8/3).
    third = slerp_(2 * u, 4 * v, 1 / 3)
    np.testing.assert_allclose(
        third, [[8 / 3 * math.cos(math.pi / 6), 8 / 3 * math.sin(math.pi / 6), 0.0]], rtol=1e-5
    )
    # Per-example fractions, any trailing shape, ends exact (bit for bit).
    a = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 3))
    b = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 3))
    out = slerp_(a, b, jnp.array([0.0, 0.5, 1.0]))
    assert out.shape == a.shape
    np.testing.assert_array_equal(out[0], a[0])
    np.testing.assert_array_equal(out[2], b[2])
    norms = lambda z: np.linalg.norm(np.asarray(z).reshape(3, -1), axis=1)
    assert norms(out)[1] == pytest.approx((norms(a)[1] + norms(b)[1]) / 2, rel=1e-5)
    # Parallel vectors take the linear path instead of dividing by sin(0).
    np.testing.assert_allclose(slerp_(u, 3 * u, 0.5), 2 * u, rtol=1e-6)
