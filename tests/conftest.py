"""Eight fake CPU devices for every test, so sharding is exercised for real; each program compiled
once per test process (tests/compile_memo.py)."""

import os

# LLVM's optimisation level 0: the tests' programs are tiny and compiles dominate the suite
# (about a third less time). Code generation may round differently from the default level, so a
# test comparing runs bit for bit runs them all with these flags (subprocesses inherit them).
TEST_XLA_FLAGS = ["--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"]
_kept = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if f.split("=")[0] not in {t.split("=")[0] for t in TEST_XLA_FLAGS}
]
os.environ["XLA_FLAGS"] = " ".join(_kept + TEST_XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

from tests import compile_memo  # noqa: E402

assert jax.device_count() == 8, "tests need 8 fake CPU devices; was jax imported before conftest?"
compile_memo.install()


# The files that take longest (a minute or more of compiling and training each on 2 cores), run
# first: `make test` gives each of its two workers a whole file at a time, so a long file left for
# the end keeps one worker busy while the other sits idle.
SLOW_FILES = (
    "test_unclip_train.py",
    "test_dvae_cli.py",
    "test_bench_smoke.py",
    "test_buckets.py",
    "test_sources_train.py",
    "test_multiprocess.py",
    "test_unclip_prior.py",
    "test_clip_accumulation.py",
    "test_dalle_model.py",
    "test_unclip_vary.py",
    "test_clip_train_sharded.py",
    "test_unclip_dit.py",
    "test_package.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "faults: the slow fault-injection runs (`make faults`; `make test` leaves them out)"
    )
