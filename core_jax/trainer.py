"""The one training loop shared by the dVAE, DALL-E and CLIP.

A model package hands over a `Task` (init, loss, per-example preprocessing, evaluators); this module
owns the mesh, the sharded train state, the jitted update step, checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from core_jax import checkpoint, finetune, sharding, storage, wandb_log
from core_jax import data as data_lib
from core_jax import metrics as metrics_lib
from core_jax.errors import ConfigError, RunError, write_error
from core_jax.optim import make_optimizer
from core_jax.preemption import Preemption


@dataclasses.dataclass
class Evaluator:
    name: str
    fn: Callable[[Any, int], Mapping[str, float]]  # (params, step) -> scalars


@dataclasses.dataclass
class Task:
    init_fn: Callable[[jax.Array, dict], Any]
    loss_fn: Callable[[Any, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]
    example_fn: Callable[[dict, np.random.Generator], dict]
    flops_per_example: float | None = None
    evaluators: Sequence[Evaluator] = ()
    image_fn: Callable | None = None  # (params, batch) -> {name: uint8 [H, W, 3]}
    # (process-local numpy batch) -> numpy batch, on the host before the batch becomes a global
    # array: work that is cheaper per batch than per example (e.g. dVAE tokenisation).
    batch_fn: Callable[[dict], dict] | None = None
    # (global batch size) -> {key: jax.ShapeDtypeStruct}: the batch's shapes without any data, for
    # ahead-of-time compiles (core_jax.aot).
    batch_spec: Callable[[int], Mapping[str, jax.ShapeDtypeStruct]] | None = None
    # (rows) -> (step, boxed abstract args, params first): one step of sampling, `step(*args)`,
    # whose arguments after the params it updates in place (a KV cache), for core_jax.aot's
    # --mode=sample. None: the task has no sampler to check.
    decode_step: Callable[[int], tuple[Callable, tuple]] | None = None
    extra_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # How grad_accum_steps > 1 keeps the full batch's objective. "mean": the loss is a mean of
    # per-example terms, so the mean over equal micro-batches is exact. "global": the loss couples
    # the examples (e.g. a contrastive loss), and accum_grads_fn computes the full batch's loss and
    # gradients itself, micro-batch by micro-batch. "refuse": a batch-level term, named by
    # accumulation_blocker, cannot be split, so the trainer refuses accumulation.
    accumulation: str = "refuse"
    # (params, batch, rng, step, accum) -> (loss, aux, grads) over the whole batch (accumulation="global").
    accum_grads_fn: Callable | None = None
    accumulation_blocker: str = "this task does not declare how its loss accumulates (Task.accumulation)"
    # The run config with the keys the task derived filled in (e.g. DALL-E's text vocabulary, taken
    # from its tokenizer): what the workdir's config.json records. None: the config train() got.
    config: Any = None


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_skipped: jax.Array


@flax.struct.dataclass
class EMATrainState(TrainState):
    """The train state of a run with `config.ema_decay` > 0: `ema` is the exponential moving
    average of the params, float32 and sharded like them. A run without EMA keeps the plain
    TrainState, so its checkpoints hold exactly the leaves they always did."""

    ema: Any


def with_ema(state: TrainState, ema) -> EMATrainState:
    return EMATrainState(
        step=state.step,
        params=state.params,
        opt_state=state.opt_state,
        nonfinite_skipped=state.nonfinite_skipped,
        ema=ema,
    )


def ema_decay_schedule(config) -> Callable[[jax.Array], jax.Array] | None:
    """step t (0 for the first update) -> the decay of the EMA update made then; None when off."""
    decay = float(config.get("ema_decay", 0.0) or 0.0)
    if not decay:
        return None
    if not config.get("ema_warmup", False):
        return lambda step: jnp.float32(decay)
    # tf.train.ExponentialMovingAverage(num_updates=t): min(decay, (1 + t) / (10 + t)).
    return lambda step: jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step)).astype(jnp.float32)


def _ema_copy(params):
    return jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)


def _ema_from(params, param_shardings):
    """A new EMA equal to `params` (its own buffers, so the donated step never sees one twice)."""
    return jax.jit(_ema_copy, out_shardings=param_shardings)(params)


class NonFiniteLoss(RunError):
    """The loss or gradient stayed non-finite for config.max_consecutive_nonfinite steps (or one
    step under nan_policy='abort')."""


class NonFiniteGuard:
    """Counts consecutive non-finite steps on the host (from the metrics read one step late) and
    stops the run after the limit: 1 under nan_policy='abort', else
    config.max_consecutive_nonfinite (0: never). Skipped steps leave the params untouched, so
    every checkpoint, the last one included, holds finite params."""

    def __init__(self, config):
        self.limit = (
            1 if config.nan_policy == "abort" else int(config.get("max_consecutive_nonfinite", 0) or 0)
        )
        self.run = 0

    def observe(self, step: int, scalars: Mapping[str, float]) -> None:
        if not scalars.get("nonfinite"):
            self.run = 0
            return
        self.run += 1
        if not self.limit or self.run < self.limit:
            return
        bad = [
            f"{k}={scalars[k]}" for k in ("loss", "grad_norm") if k in scalars and not np.isfinite(scalars[k])
        ]
        what = ", ".join(bad) or "loss or gradient not finite"
        if self.limit == 1:
            raise NonFiniteLoss(f"non-finite loss or gradient at step {step} ({what}; nan_policy=abort)")
        raise NonFiniteLoss(
            f"{self.run} consecutive non-finite steps, the last at step {step} ({what}; "
            f"config.max_consecutive_nonfinite={self.limit}); their updates were skipped, so the "
            f"checkpoints hold the last finite params"
        )


def next_global_batch(it, task: Task, mesh, timings: dict | None = None) -> dict:
    """The next global batch; `timings` (if given) accumulates seconds spent in the host data
    pipeline ('data') and in the task's batch_fn ('batch_fn') separately: a batch_fn that runs a
    model (DALL-E's dVAE tokenizer) queues behind the in-flight train step on the same devices, so
    its time is device work, not waiting for data."""
    t0 = time.perf_counter()
    local = next(it)
    t1 = time.perf_counter()
    if task.batch_fn is not None:
        local = task.batch_fn(local)
    t2 = time.perf_counter()
    batch = make_global_batch(mesh, local)
    if timings is not None:
        timings["data"] = timings.get("data", 0.0) + (t1 - t0) + (time.perf_counter() - t2)
        timings["batch_fn"] = timings.get("batch_fn", 0.0) + (t2 - t1)
    return batch


def make_global_batch(mesh, local_batch: Mapping[str, np.ndarray]) -> dict:
    """Process-local rows -> global arrays sharded over (data, fsdp) on the leading axis."""
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        global_rows = v.shape[0] * jax.process_count()
        spec = sharding.spec_for(("act_batch",) + (None,) * (v.ndim - 1), (global_rows,) + v.shape[1:], mesh)
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), v)
    return out


def params_global_batch(params, local_batch: Mapping[str, np.ndarray]) -> dict:
    """Process-local rows -> arrays on the mesh `params` live on (plain device arrays off a mesh):
    what an evaluator, which gets only params, feeds its jitted step."""
    sh = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(sh, NamedSharding) and sh.mesh.devices.size > 1:
        return make_global_batch(sh.mesh, local_batch)
    return {k: jnp.asarray(v) for k, v in local_batch.items()}


def host_eval_batches(
    data_config,
    split: str,
    example_fn,
    *,
    batch_size: int,
    seed: int = 0,
    max_batches: int = -1,
    skipped: dict | None = None,
) -> Iterator[dict]:
    """One pass over `split` in order and without augmentation, as this process's numpy rows of
    global batches of `batch_size`, each with the iterator's `_mask` (False on the rows padding the
    last batch): at most `max_batches` (< 0: the whole split). The data iterator is opened here
    (a bad source fails now) and closed when the pass ends or the returned generator is closed;
    `skipped` (a dict), if given, then holds its skipped-example counts by reason."""
    it = data_lib.make_iterator(
        data_config, split, global_batch_size=batch_size, seed=seed, example_fn=example_fn, train=False
    )

    def batches():
        try:
            for i, local in enumerate(it):
                if 0 <= max_batches <= i:
                    break
                yield local
        finally:
            if skipped is not None:
                skipped.update(it.skipped)
            it.close()

    return batches()


def eval_batches(
    config, params, example_fn, *, max_batches: int = -1, batch_fn: Callable[[dict], dict] | None = None
) -> Iterator[dict]:
    """The global batches of `config.data.eval_split` for an evaluator (`host_eval_batches` at
    config.batch_size and config.seed), each on the params' mesh. `batch_fn` runs on the host
    first, like Task.batch_fn."""
    local_batches = host_eval_batches(
        config.data,
        config.data.eval_split,
        example_fn,
        batch_size=config.batch_size,
        seed=config.seed,
        max_batches=max_batches,
    )
    with contextlib.closing(local_batches):
        for local in local_batches:
            yield params_global_batch(params, local if batch_fn is None else batch_fn(local))


def split_micro(batch, k: int):
    # Micro-batch j takes rows j, j+k, ... so every micro-batch stays spread over all devices.
    def split(x):
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
        return jnp.moveaxis(x, 1, 0)

    return jax.tree.map(split, batch)


def merge_micro(micro):
    """The inverse of `split_micro`: [k, B/k, ...] back to the batch's own row order [B, ...]."""
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape((-1,) + x.shape[2:]), micro)


def check_accumulation(task: Task, config) -> None:
    accum = int(config.grad_accum_steps)
    if accum == 1 or task.accumulation == "mean":
        return
    if task.accumulation == "global" and task.accum_grads_fn is not None:
        return
    if task.accumulation not in ("mean", "global", "refuse"):
        raise ValueError(f"Task.accumulation must be 'mean', 'global' or 'refuse', got {task.accumulation!r}")
    blocker = (
        task.accumulation_blocker
        if task.accumulation == "refuse"
        else "the task declares accumulation='global' without an accum_grads_fn"
    )
    raise ConfigError(
        f"config.grad_accum_steps={accum} would change this task's loss ({blocker}); set grad_accum_steps=1"
    )


def mean_over_micro_batches(loss_fn, params, batch, rng, step, accum: int):
    """(loss, aux, grads) as the mean over `accum` equal micro-batches (split_micro) of loss_fn's;
    the full batch's exactly when loss_fn is a mean of per-example terms. Micro-batch i gets rng
    fold_in(rng, i)."""
    grads_of = jax.value_and_grad(loss_fn, has_aux=True)
    micro = split_micro(batch, accum)

    def body(carry, xs):
        i, mb = xs
        (loss, aux), grads = grads_of(params, mb, jax.random.fold_in(rng, i), step)
        acc_grads, acc_loss, acc_aux = carry
        return (
            jax.tree.map(jnp.add, acc_grads, grads),
            acc_loss + loss,
            jax.tree.map(jnp.add, acc_aux, aux),
        ), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    aux0 = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micro), rng, step)[1])
    aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
    (grads, loss, aux), _ = jax.lax.scan(
        body, (zeros, jnp.zeros((), jnp.float32), aux0), (jnp.arange(accum), micro)
    )
    return (loss / accum, jax.tree.map(lambda a: a / accum, aux), jax.tree.map(lambda g: g / accum, grads))


def build_grads_fn(task: Task, config):
    """(params, batch, rng, step) -> (loss, aux, grads) of the whole batch, in grad_accum_steps
    micro-batches when that is > 1 (`Task.accumulation` says how)."""
    check_accumulation(task, config)
    accum = int(config.grad_accum_steps)
    frozen = finetune.frozen_prefixes(config)

    def grads_fn(params, batch, rng, step):
        if accum == 1:
            (loss, aux), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, batch, rng, step)
        elif task.accumulation == "global":
            loss, aux, grads = task.accum_grads_fn(params, batch, rng, step, accum)
        else:
            loss, aux, grads = mean_over_micro_batches(task.loss_fn, params, batch, rng, step, accum)
        return loss, aux, finetune.drop_frozen(grads, frozen)

    return grads_fn


def build_train_step(task: Task, tx, schedule, config):
    base_rng = jax.random.key(config.seed)
    grads_fn = build_grads_fn(task, config)
    ema_decay = ema_decay_schedule(config)

    def step_fn(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.fold_in(base_rng, 1), state.step)
        loss, aux, grads = grads_fn(state.params, batch, rng, state.step)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # A non-finite step leaves params and optimizer moments untouched, so one bad batch never
        # poisons the run; the step counter still advances with the data.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite_skipped=state.nonfinite_skipped + (~finite).astype(jnp.int32),
        )
        if ema_decay is not None:  # a skipped step leaves the EMA untouched too
            d = ema_decay(state.step)
            new_state = with_ema(
                new_state,
                keep(
                    jax.tree.map(lambda e, p: d * e + (1 - d) * p.astype(jnp.float32), state.ema, new_params),
                    state.ema,
                ),
            )
        out = dict(aux)
        out.update(
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=schedule(state.step),
            nonfinite=(~finite).astype(jnp.int32),
            nonfinite_skipped=new_state.nonfinite_skipped,
            param_norm=optax.tree.norm(new_state.params),
        )
        return new_state, out

    return step_fn


def _init_rng(config):
    return jax.random.fold_in(jax.random.key(config.seed), 0)


def abstract_boxed_params(task: Task, config, batch):
    """The params' shapes with their logical axis names (nn.Partitioned leaves); compiles nothing."""
    return jax.eval_shape(lambda rng, b: task.init_fn(rng, b)["params"], _init_rng(config), batch)


def state_shardings(task: Task, tx, mesh, config, batch, abstract_boxed=None):
    """(init function, abstract state carrying its shardings, the shardings) for `batch`'s shapes.

    Works from shapes alone, so the same code serves training and ahead-of-time compiles.
    `abstract_boxed`: `abstract_boxed_params(task, config, batch)` when the caller already has it.
    """
    init_rng = _init_rng(config)
    if abstract_boxed is None:
        abstract_boxed = abstract_boxed_params(task, config, batch)
    param_shardings = sharding.tree_shardings(mesh, abstract_boxed)
    abstract_params = nn.meta.unbox(abstract_boxed)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, P())
    # Moments are sharded like their params; frozen params (core_jax.finetune) have none, which
    # optax marks with an empty MaskedNode that stays empty here.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_shardings = optax.tree_utils.tree_map_params(
        tx,
        lambda v, s: v if masked(v) else s,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=masked,
    )
    shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings, nonfinite_skipped=replicated
    )
    ema_on = ema_decay_schedule(config) is not None
    if ema_on:
        shardings = with_ema(shardings, param_shardings)

    def init_state(rng, batch):
        return state_from_params(tx, config, nn.meta.unbox(task.init_fn(rng, batch)["params"]))

    abstract = _abstract_like(jax.eval_shape(init_state, init_rng, batch), shardings)
    return (lambda batch: init_state(init_rng, batch)), abstract, shardings


def state_from_params(tx, config, params):
    """A step-0 train state around `params`: fresh optimizer moments, and the EMA (when on)
    starting from the params."""
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        nonfinite_skipped=jnp.zeros((), jnp.int32),
    )
    return with_ema(state, _ema_copy(params)) if ema_decay_schedule(config) is not None else state


def create_state(task: Task, tx, mesh, config, batch, abstract_boxed=None):
    """Builds the train state directly into its shardings (never whole on one device)."""
    init_state, _, shardings = state_shardings(task, tx, mesh, config, batch, abstract_boxed)
    with jax.set_mesh(mesh):
        state = jax.jit(init_state, out_shardings=shardings)(batch)
    return state, shardings


def jit_train_step(task: Task, tx, schedule, config, mesh, shardings, batch_shardings):
    """The jitted update step with explicit shardings and the state donated."""
    step_fn = build_train_step(task, tx, schedule, config)
    with jax.set_mesh(mesh):
        return jax.jit(
            step_fn,
            in_shardings=(shardings, batch_shardings),
            out_shardings=(shardings, None),
            donate_argnums=(0,),
        )


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _abstract_like(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def train(
    config,
    workdir: str,
    task: Task,
    *,
    devices: Sequence[jax.Device] | None = None,
    stop_at_step: int | None = None,
    log_fn=metrics_lib.print_progress,
) -> dict:
    """Trains `task` per `config` into `workdir`, resuming from its newest intact checkpoint if any.

    `stop_at_step` ends the run early (as a crash would) after saving nothing extra; tests use it
    to check that resuming reproduces an uninterrupted run. A SIGTERM ends it early too, after
    saving the step every process agrees on (core_jax.preemption). Returns the last logged scalars.
    Raises ConfigError or RunError (one line each) for what a person has to fix.
    """
    check_accumulation(task, config)  # before the workdir is touched
    preemption = Preemption(check_every=config.log_every)
    try:
        return _train(config, workdir, task, preemption, devices, stop_at_step, log_fn)
    finally:
        preemption.close()


def _train(config, workdir, task, preemption, devices, stop_at_step, log_fn) -> dict:
    main_process = jax.process_index() == 0
    if not main_process:
        log_fn = lambda line: None  # noqa: E731  (only process 0 talks)
    mesh = sharding.make_mesh(config.mesh, devices)
    n_devices = mesh.devices.size
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    frozen = finetune.frozen_prefixes(config)
    tx = finetune.freeze(tx, frozen)

    it = data_lib.make_iterator(
        config.data,
        config.data.split,
        global_batch_size=config.batch_size,
        seed=config.seed,
        example_fn=task.example_fn,
        train=True,
    )
    manager = checkpoint.make_manager(workdir, keep=config.keep_checkpoints)
    batch = next_global_batch(it, task, mesh)
    abstract_boxed = abstract_boxed_params(task, config, batch)
    init_state, abstract_state, shardings = state_shardings(task, tx, mesh, config, batch, abstract_boxed)
    warning = sharding.undivided_warning(mesh, abstract_boxed)
    if warning:
        log_fn(warning)
    if frozen:  # checked on shapes, before anything compiles
        n_frozen, n_params = finetune.check_frozen(abstract_state.params, frozen)
    start_step = 0
    resumed = _resume(manager, workdir, abstract_state, shardings, log_fn)
    if resumed is not None:
        state, data_state, ema_note = resumed
        start_step = int(state.step)
        try:
            it.set_state(data_state)
        except ValueError as e:
            # Positions are per process: after a change in process count they cannot be mapped
            # exactly, so the stream restarts on a seed derived from the step instead of replaying.
            log_fn(f"warning: {e}; the data stream restarts with seed {config.seed}+{start_step}")
            it.close()
            it = data_lib.make_iterator(
                config.data,
                config.data.split,
                global_batch_size=config.batch_size,
                seed=config.seed + start_step,
                example_fn=task.example_fn,
                train=True,
            )
        batch = next_global_batch(it, task, mesh)
        log_fn(f"resumed from {workdir} at step {start_step}{ema_note}")
    else:
        init_from = str(config.get("init_from", "") or "")
        with jax.set_mesh(mesh):
            if init_from:
                # Built around the loaded params (the new run's EMA starts from them too): the
                # model's own init is never compiled or run.
                raw = bool(config.get("init_from_raw_weights", False))
                params, from_ema = finetune.load_init_params(
                    init_from, abstract_state.params, shardings.params, raw_weights=raw
                )
                state = jax.jit(partial(state_from_params, tx, config), out_shardings=shardings)(params)
            else:
                state = jax.jit(init_state, out_shardings=shardings)(batch)
        log_fn(
            f"{count_params(state.params):,} parameters on mesh "
            f"{dict(mesh.shape)} ({n_devices} devices, {jax.process_count()} processes)"
        )
        if init_from:
            log_fn(f"params initialised from {init_from}" + (" (its EMA weights)" if from_ema else ""))
    if frozen:
        log_fn(f"frozen ({','.join(frozen)}): {n_frozen:,} of {n_params:,} parameters get no updates")
    # Written only once the state matches the config: a run that fails on its config leaves an
    # existing workdir's config.json (what its checkpoints were trained with) as it was.
    if main_process:
        try:
            checkpoint.write_config(workdir, config if task.config is None else task.config)
            for name, src in task.extra_files.items():
                _copy_into(workdir, name, src)
        except OSError as e:
            raise write_error(e.filename or workdir, e.errno, str(e)) from None

    train_step = jit_train_step(
        task, tx, schedule, config, mesh, shardings, jax.tree.map(lambda x: x.sharding, batch)
    )
    peak = (
        metrics_lib.peak_flops(list(mesh.devices.flat), config.compute_dtype)
        if task.flops_per_example
        else 0.0
    )

    # Opened only now, so a config or init_from error above leaves no writer thread behind, and
    # closed however the loop ends (an abort on a non-finite loss raises out of it).
    recorded = config if task.config is None else task.config
    writer = metrics_lib.MetricsWriter(
        workdir,
        enabled=main_process,
        wandb_run=wandb_log.start(recorded, workdir) if main_process else None,
    )
    guard = NonFiniteGuard(config)
    finished = preempted = False
    try:
        last_scalars: dict = {}
        pending = None  # the previous step's metrics, read one step late so the host never waits
        t_log, steps_since_log, waits = time.perf_counter(), 0, {}
        t_start = time.perf_counter()
        total = int(config.total_steps)
        step = start_step
        while step < total:
            with jax.set_mesh(mesh):
                state, step_metrics = train_step(state, batch)
            step += 1
            steps_since_log += 1
            if pending is not None:
                last_scalars = _handle_metrics(pending, guard, writer, log_fn)
            pending = None
            if step % config.log_every == 0 or step == total:
                now = time.perf_counter()
                elapsed = now - t_log
                eps = steps_since_log * config.batch_size / max(elapsed, 1e-9)
                extra = {
                    "examples_per_sec": eps,
                    "steps_per_sec": steps_since_log / max(elapsed, 1e-9),
                    "data_wait_fraction": waits.get("data", 0.0) / max(elapsed, 1e-9),
                }
                if task.batch_fn is not None:
                    extra["batch_fn_fraction"] = waits.get("batch_fn", 0.0) / max(elapsed, 1e-9)
                if task.flops_per_example and peak:
                    extra["mfu"] = task.flops_per_example * eps / peak
                for reason, count in it.skipped.items():
                    extra[f"data/skipped/{reason}"] = count
                rate = (now - t_start) / max(step - start_step, 1)
                # Read back after the next step is dispatched, so the host never waits on the device.
                pending = (step, total, step_metrics, extra, rate * (total - step))
                t_log, steps_since_log, waits = now, 0, {}
            elif guard.limit:
                pending = (
                    step,
                    total,
                    {k: step_metrics[k] for k in ("nonfinite", "loss", "grad_norm")},
                    None,
                    0,
                )
            preempted = step < total and preemption.reached(step)  # every process asks at every step
            if step % config.checkpoint_every == 0 or step == total or preempted:
                checkpoint.save(manager, step, state, it.get_state(), force=True)
            if preempted:
                break
            if (step % config.eval_every == 0 or step == total) and (task.evaluators or task.image_fn):
                _run_evals(task, state, batch, step, writer, log_fn, mesh)
            if stop_at_step is not None and step >= stop_at_step:
                break
            if step < total:
                batch = next_global_batch(it, task, mesh, waits)
        if pending is not None:
            last_scalars = _handle_metrics(pending, guard, writer, log_fn)
        checkpoint.wait_until_saved(manager)
        finished = True
        if preempted:
            log_fn(f"preempted at step {step}: saved, exiting")
    finally:
        if not finished:
            # Stopped by an error: the save in flight still completes, so the newest checkpoint
            # is whole; an error of that save is the one already raised, or secondary to it.
            with contextlib.suppress(Exception):
                manager.wait_until_finished()
        with contextlib.suppress(Exception):
            manager.close()
        writer.close()
    return last_scalars


def _restore(manager, workdir, step, state, shardings):
    """(state, data state, note for the log) of checkpoint `step`, restored into the abstract
    `state` (shapes and dtypes) on `shardings`.

    A checkpoint written without EMA resumed with ema_decay > 0 starts the EMA from the restored
    params (turning EMA on mid-run); one with EMA resumed with ema_decay = 0 is an error, since
    the run would silently drop its averaged weights."""
    saved_ema = checkpoint.workdir_has_ema(workdir, step)
    want_ema = isinstance(state, EMATrainState)
    if saved_ema and not want_ema:
        # train() turns it into "cannot resume: ...; resume with the config it was trained with".
        raise ValueError(
            f"the checkpoint at step {step} in {workdir} holds an EMA of the weights but config.ema_decay=0"
        )
    if want_ema and not saved_ema:
        plain = TrainState(
            step=state.step,
            params=state.params,
            opt_state=state.opt_state,
            nonfinite_skipped=state.nonfinite_skipped,
        )
        plain_shardings = TrainState(
            step=shardings.step,
            params=shardings.params,
            opt_state=shardings.opt_state,
            nonfinite_skipped=shardings.nonfinite_skipped,
        )
        restored, data_state = checkpoint.restore(manager, step, _abstract_like(plain, plain_shardings))
        return (
            with_ema(restored, _ema_from(restored.params, shardings.params)),
            data_state,
            " (the checkpoint has no EMA: it starts from these params)",
        )
    restored, data_state = checkpoint.restore(manager, step, _abstract_like(state, shardings))
    return restored, data_state, ""


def _agreed(reason: str | None) -> str | None:
    """A damage verdict every process shares: damaged anywhere is damaged everywhere."""
    if jax.process_count() == 1:
        return reason
    anywhere = multihost_utils.process_allgather(np.int32(reason is not None))
    return reason or ("damaged as another process reads it" if np.max(anywhere) else None)


def _cannot_resume(e: ValueError) -> ConfigError:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    detail = lines[0].rstrip(":")
    if lines[0].endswith(":") and len(lines) > 1:  # orbax: "... do not match:\nopt_state[1]:"
        detail += f" at {lines[1].rstrip(':')}"
    return ConfigError(
        f"cannot resume: {detail}; resume with the config it was trained with "
        f"(its config.json) or pick a new --workdir"
    )


def _resume(manager, workdir, abstract_state, shardings, log_fn):
    """(state, data state, note for the log) of the newest intact checkpoint, restored straight
    into the abstract state (a resumed run never compiles or runs the init); None when `workdir`
    holds no checkpoint.

    Damaged checkpoints (an unfinished save, unreadable metadata, missing or changed bytes) are
    skipped, one log line each, and moved to WORKDIR/damaged_checkpoints/ once an intact one is
    restored, so that neither orbax's max_to_keep cleanup nor this run's save of the same step
    meets them. With none intact, a RunError names the workdir and nothing is moved. A config
    that does not fit a checkpoint is a ConfigError, raised before config.json is rewritten so
    the workdir stays consistent."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    damaged = []
    for step in steps:
        reason = _agreed(checkpoint.damage(workdir, step))
        if reason is None:
            try:
                finetune.check_param_shapes(
                    f"the checkpoint at step {step} in {workdir}",
                    checkpoint.param_shapes(workdir, step),
                    abstract_state.params,
                )
                restored = _restore(manager, workdir, step, abstract_state, shardings)
            except checkpoint.DamagedCheckpoint as e:
                reason = e.reason
            except ValueError as e:
                raise _cannot_resume(e) from None
            reason = _agreed(reason)
        if reason is None:
            break
        damaged.append((step, reason))
    else:
        found = "; ".join(f"step {step}: {reason}" for step, reason in damaged)
        raise RunError(
            f"no intact checkpoint to resume from in {checkpoint.checkpoint_dir(workdir)} ({found}); "
            f"move the checkpoints away to start afresh, or pick a new --workdir"
        )
    moved = checkpoint.set_aside(manager, workdir, [step for step, _ in damaged])
    for (step, reason), dest in zip(damaged, moved):
        log_fn(f"warning: skipped damaged checkpoint {step} ({reason}); moved to {dest}")
    return restored


def _handle_metrics(pending, guard: NonFiniteGuard, writer, log_fn) -> dict:
    step, total, scalars, extra, eta = pending
    scalars = {k: float(np.asarray(v)) for k, v in jax.device_get(scalars).items()}
    guard.observe(step, scalars)
    if extra is None:  # a step between log lines: only its non-finite check
        return {}
    scalars.update(extra)
    writer.write_scalars(step, scalars)
    log_fn(metrics_lib.progress_line(step, total, scalars, eta))
    return scalars


def _run_evals(task, state, batch, step, writer, log_fn, mesh):
    # Evaluated on the weights inference loads: the EMA when the run keeps one.
    weights = state.ema if isinstance(state, EMATrainState) else state.params
    with jax.set_mesh(mesh):
        for ev in task.evaluators:
            t = time.perf_counter()
            result = {f"eval/{ev.name}/{k}": float(v) for k, v in ev.fn(weights, step).items()}
            writer.write_scalars(step, result)
            log_fn(
                f"eval {ev.name} @ {step}: "
                + ", ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in result.items())
                + f" ({time.perf_counter() - t:.1f}s)"
            )
        if task.image_fn is not None:
            images = task.image_fn(weights, batch)
            writer.write_images(step, {k: np.asarray(v) for k, v in images.items()})


def _copy_into(workdir, name, src):
    dst = storage.join(workdir, name)
    storage.makedirs(storage.dirname(dst))
    if storage.absolute(src) != storage.absolute(dst):
        storage.copy_file(src, dst)
