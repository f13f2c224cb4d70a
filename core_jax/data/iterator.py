"""Batches from a source: sharding, seeded order, parallel decode, skips, exact resume.

Every process walks its own deterministic stream of records (grain index maps for random-access
sources, `TarShardStream` for tar shards). Records are decoded by a thread pool but consumed
strictly in stream order, so a batch depends only on (seed, position) - never on worker count or
timing - and the checkpointed position is just "records consumed so far".
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import json
import math
import queue
import threading
import weakref
from typing import Callable, Iterator, NamedTuple

import numpy as np

from core_jax.data import sources
from core_jax.data.config import with_defaults
from core_jax.data.decode import NoUsableExamples, SkipExample
from core_jax.errors import ConfigError

_END = object()


class Record(NamedTuple):
    """One position in a stream. `state` is the stream position *after* this record."""

    state: dict
    epoch: int
    rng_key: tuple  # with the seed, identifies the record for its per-example rng
    load: Callable  # rng -> raw example; raises SkipExample


class IndexStream:
    """Random-access source -> this process's records: global position g = p + k * P of a
    (per-epoch reshuffled, repeated) grain index map goes to process p as its k-th record."""

    def __init__(self, source, *, train, seed, process_index, process_count, name=None):
        import grain  # lazy: grain loads JAX (~2 s); core_jax.data stays host-only for train_bpe and contact_sheet

        self.name = name or getattr(source, "name", type(source).__name__)
        self._n = len(source)
        if self._n == 0:
            raise NoUsableExamples(f"{self.name}: the source has no records")
        ds = grain.MapDataset.range(self._n)
        if train:
            # grain reseeds epoch e with seed + e; hashing keeps seed s+1 from replaying s's
            # epoch 1 as its epoch 0.
            shuffle_seed = int(np.random.SeedSequence(seed % 2**64).generate_state(1)[0])
            ds = ds.shuffle(seed=shuffle_seed).repeat()
        self._order = ds[process_index::process_count]
        self._train, self._p, self._P = train, process_index, process_count
        self._local = len(range(process_index, self._n, process_count))
        load = getattr(source, "load", None)
        self._load = load if load is not None else (lambda i, rng: source[i])

    def initial_state(self):
        return {"cursor": 0}

    def count_records(self, process_count):
        return math.ceil(self._n / process_count)

    def probe(self):
        """Every record once, in index order: a padding template for a process without any."""
        for i in range(self._n):
            yield Record({}, 0, (i, 0), functools.partial(self._load, i))

    def iterate(self, state):
        k = int(state["cursor"])
        while self._train or k < self._local:
            index = int(self._order[k])
            epoch = (self._p + k * self._P) // self._n if self._train else 0
            yield Record({"cursor": k + 1}, epoch, (index, epoch), functools.partial(self._load, index))
            k += 1


class TarShardStream:
    """Tar shards split across processes by file, each read front to back.

    Training shuffles the shard order per epoch and then permutes windows of `shuffle_buffer`
    consecutive samples. Position = (epoch, shard position, sample index) of the current window's
    start + offset inside it, so resuming re-reads at most one window and is exact.
    """

    def __init__(self, source, *, train, seed, process_index, process_count):
        self.name, self._src, self._train, self._seed = source.name, source, train, seed
        self._ids = list(range(process_index, len(source.shards), process_count))
        self._window = max(1, int(source.shuffle_buffer)) if train else 1
        if train and not self._ids:
            raise ConfigError(
                f"{self.name}: {len(source.shards)} shard(s) cannot be split over "
                f"{process_count} processes; each process needs at least one"
            )

    def initial_state(self):
        return {"epoch": 0, "shard": 0, "sample": 0, "offset": 0}

    def count_records(self, process_count):
        counts = [self._src.count(s) for s in range(len(self._src.shards))]
        return max(sum(counts[p::process_count]) for p in range(process_count))

    def _order(self, epoch):
        if not self._train:
            return self._ids
        perm = np.random.default_rng([self._seed, epoch, 7]).permutation(len(self._ids))
        return [self._ids[j] for j in perm]

    def probe(self):
        for gid in range(len(self._src.shards)):
            for idx, load in self._src.read(gid):
                yield Record({}, 0, (gid, idx, 0), load)

    def _samples(self, epoch, shard_pos, sample):
        order = self._order(epoch)
        for pos in range(shard_pos, len(order)):
            for idx, load in self._src.read(order[pos], sample if pos == shard_pos else 0):
                yield pos, order[pos], idx, load

    def iterate(self, state) -> Iterator[Record]:
        epoch, pos, sample, offset = (int(state[k]) for k in ("epoch", "shard", "sample", "offset"))
        while True:
            from_start, produced = (pos, sample) == (0, 0), False
            samples = self._samples(epoch, pos, sample)
            while window := list(itertools.islice(samples, self._window)):
                produced = True
                start_pos, start_sample = window[0][0], window[0][2]
                order = (
                    np.random.default_rng([self._seed, epoch, start_pos, start_sample, 11]).permutation(
                        len(window)
                    )
                    if self._window > 1
                    else [0]
                )
                for o in range(offset, len(window)):
                    _, gid, idx, load = window[order[o]]
                    if o + 1 < len(window):
                        after = {"epoch": epoch, "shard": start_pos, "sample": start_sample, "offset": o + 1}
                    else:  # next window starts after this one's last sample
                        after = {
                            "epoch": epoch,
                            "shard": window[-1][0],
                            "sample": window[-1][2] + 1,
                            "offset": 0,
                        }
                    yield Record(after, epoch, (gid, idx, epoch), load)
                offset = 0
            if not self._train:
                return
            if from_start and not produced:
                raise NoUsableExamples(
                    f"{self.name}: a full pass over this process's {len(self._ids)} shard(s) found no samples"
                )
            epoch, pos, sample = epoch + 1, 0, 0


def _process(seed, example_fn, rec: Record):
    """Runs in a worker: (output, None) or (None, skip reason). Other errors propagate."""
    rng = np.random.default_rng([seed, *rec.rng_key])
    try:
        return example_fn(rec.load(rng), rng), None
    except SkipExample as e:
        return None, e.reason


def _produce(records, process, pool, out: queue.Queue, stop: threading.Event):
    """Producer thread: reads records in order, submits decoding, queues futures in order."""

    def put(item):
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        for rec in records:
            if stop.is_set() or not put((rec, pool.submit(process, rec))):
                return
        put(_END)
    except BaseException as e:  # surfaces in the consumer's next()
        put(e)


def _shutdown(stop, thread, q, pool):
    stop.set()
    while True:  # unblock the producer and drop work nobody will read
        try:
            item = q.get_nowait()
        except queue.Empty:
            break
        if isinstance(item, tuple):
            item[1].cancel()
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=10)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


class DataIterator:
    """`next(it)` -> dict of numpy arrays (this process's rows); see docs/architecture.md."""

    def __init__(
        self,
        stream,
        *,
        batch_size,
        seed,
        example_fn,
        train=True,
        num_workers=0,
        prefetch=2,
        process_index=0,
        process_count=1,
    ):
        self.name = stream.name
        self._stream, self._batch_size, self._train = stream, int(batch_size), train
        self._seed = int(seed) % 2**64
        self._example_fn = example_fn
        self._num_workers, self._prefetch = int(num_workers), max(1, int(prefetch))
        self._proc = (int(process_index), int(process_count))
        self.num_batches = (
            None if train else math.ceil(stream.count_records(process_count) / self._batch_size)
        )
        self._source_state = stream.initial_state()
        self._batches, self._skipped, self._skip_run_epoch = 0, collections.Counter(), None
        self._template = None  # first eval row: shapes/dtypes for padding
        self._records, self._ended = None, False
        self._worker = None  # (stop, thread, queue, pool) while prefetching
        self._finalizer = None

    # -- position ------------------------------------------------------------------------
    @property
    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)

    def get_state(self) -> dict:
        """This process's position; in a real multi-process run, every process's (a collective:
        call it on all processes), because checkpoints write JSON from the primary host only."""
        own = {
            "source": dict(self._source_state),
            "batches": self._batches,
            "skipped": dict(self._skipped),
            "skip_run_epoch": self._skip_run_epoch,
            "process_index": self._proc[0],
            "process_count": self._proc[1],
        }
        if self._proc[1] == 1:
            return own
        import jax  # lazy: multi-process runs only (see IndexStream.__init__)
        from jax.experimental import multihost_utils  # lazy: as jax

        if jax.process_count() != self._proc[1]:  # simulated processes (tests): nothing to gather
            return own
        data = np.frombuffer(json.dumps(own).encode(), np.uint8)
        sizes = multihost_utils.process_allgather(np.int32(data.size))
        padded = np.zeros(int(np.max(sizes)), np.uint8)
        padded[: data.size] = data
        rows = multihost_utils.process_allgather(padded)
        return {"processes": [json.loads(bytes(r[:n])) for r, n in zip(rows, sizes)]}

    def set_state(self, state: dict) -> None:
        if "processes" in state:
            if len(state["processes"]) != self._proc[1]:
                raise ValueError(
                    f"{self.name}: data state holds {len(state['processes'])} "
                    f"processes' positions, this run has {self._proc[1]}"
                )
            state = state["processes"][self._proc[0]]
        saved = tuple(
            int(state[k]) if state.get(k) is not None else None for k in ("process_index", "process_count")
        )
        if saved != self._proc:
            raise ValueError(
                f"{self.name}: data state was saved by process {state.get('process_index')} of "
                f"{state.get('process_count')} but this is process {self._proc[0]} of "
                f"{self._proc[1]}; positions are per process and cannot be remapped exactly"
            )
        self._stop_pipeline()
        # int(): a checkpoint library may hand the numbers back as numpy scalars.
        self._source_state = {k: int(v) for k, v in state["source"].items()}
        self._batches = int(state["batches"])
        self._skipped = collections.Counter({k: int(v) for k, v in state.get("skipped", {}).items()})
        run = state.get("skip_run_epoch")
        self._skip_run_epoch = None if run is None else int(run)

    # -- pipeline ------------------------------------------------------------------------
    def _start(self):
        records = self._stream.iterate(self._source_state)
        if self._num_workers == 0:
            self._records = records
            return
        process = functools.partial(_process, self._seed, self._example_fn)
        pool = concurrent.futures.ThreadPoolExecutor(self._num_workers, "data-worker")
        q = queue.Queue(maxsize=self._prefetch * self._batch_size)
        stop = threading.Event()
        thread = threading.Thread(
            target=_produce, args=(records, process, pool, q, stop), name="data-producer", daemon=True
        )
        thread.start()
        self._worker = (stop, thread, q, pool)
        # Not a method: a bound method would keep the iterator (and its threads) alive forever.
        self._finalizer = weakref.finalize(self, _shutdown, stop, thread, q, pool)

    def _stop_pipeline(self):
        if self._finalizer is not None:
            self._finalizer()
        self._records = self._worker = self._finalizer = None
        self._ended = False

    def close(self):
        self._stop_pipeline()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _pull(self):
        """Next (record, output, skip reason) in stream order, or None at the end of a pass."""
        if self._ended:
            return None
        if self._records is None and self._worker is None:
            self._start()
        if self._worker is None:
            rec = next(self._records, None)
            item = _END if rec is None else (rec, *_process(self._seed, self._example_fn, rec))
        else:
            item = self._worker[2].get()
            if isinstance(item, BaseException):
                raise item
            if item is not _END:
                rec, future = item
                item = (rec, *future.result())
        self._ended = item is _END
        return None if self._ended else item

    # -- batches -------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._train and self._batches >= self.num_batches:
            self._stop_pipeline()  # free the threads now, not at garbage collection
            raise StopIteration
        try:
            rows, state, skipped, run_epoch = self._collect()
        except BaseException:
            # Restart from the last committed batch so a retry neither loses nor repeats rows.
            self._stop_pipeline()
            raise
        self._source_state, self._skipped, self._skip_run_epoch = state, skipped, run_epoch
        self._batches += 1
        if self._train:
            return _stack(rows)
        if self._template is None:
            self._template = rows[0] if rows else self._probe_template(skipped)
        n_real = len(rows)
        rows += [{k: np.zeros_like(np.asarray(v)) for k, v in self._template.items()}] * (
            self._batch_size - n_real
        )
        batch = _stack(rows)
        batch["_mask"] = np.arange(self._batch_size) < n_real
        return batch

    def _collect(self):
        """One batch worth of rows; position and skip counts are returned, committed by caller."""
        rows, state = [], self._source_state
        skipped, run_epoch = collections.Counter(self._skipped), self._skip_run_epoch
        while len(rows) < self._batch_size:
            item = self._pull()
            if item is None:
                break
            rec, out, reason = item
            state = rec.state
            if reason is None:
                rows.append(out)
                run_epoch = None
                continue
            skipped[reason] += 1
            if run_epoch is None:
                run_epoch = rec.epoch
            elif rec.epoch >= run_epoch + 2:  # a whole epoch passed without a usable example
                self._no_usable(skipped)
        return rows, state, skipped, run_epoch

    def _probe_template(self, skipped):
        """Padding needs shapes; a process whose share has no usable example (more processes
        than records, or all of its records bad) borrows them from anyone's first good record."""
        for rec in self._stream.probe():
            out, reason = _process(self._seed, self._example_fn, rec)
            if reason is None:
                return out
        self._no_usable(skipped)

    def _no_usable(self, skipped):
        raise NoUsableExamples(
            f"{self.name}: no usable example in a full pass over process "
            f"{self._proc[0]}'s records; skipped: {dict(skipped)}"
        )


def _stack(rows: list[dict]) -> dict:
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


def make_iterator(
    data_config,
    split,
    *,
    global_batch_size,
    seed,
    example_fn,
    train=True,
    process_index=None,
    process_count=None,
) -> DataIterator:
    """Builds the source named by `data_config.source` and returns this process's iterator."""
    if process_index is None or process_count is None:
        import jax  # lazy: a host-only caller passes both (see IndexStream.__init__)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count or global_batch_size <= 0:
        raise ConfigError(
            f"global batch size {global_batch_size} is not a positive "
            f"multiple of the number of processes {process_count}"
        )
    cfg = with_defaults(data_config)
    src = sources.build_source(cfg, split, train=train)
    where = dict(train=train, seed=seed, process_index=process_index, process_count=process_count)
    if isinstance(src, sources.WebDatasetSource):
        stream = TarShardStream(src, **where)
    else:
        stream = IndexStream(src, name=getattr(src, "name", None) or f"{cfg.source}:{split}", **where)
    return DataIterator(
        stream,
        batch_size=global_batch_size // process_count,
        seed=seed,
        example_fn=example_fn,
        train=train,
        num_workers=cfg.num_workers,
        prefetch=cfg.prefetch,
        process_index=process_index,
        process_count=process_count,
    )
