"""Eight fake CPU devices for every test, so sharding is exercised for real; each program compiled
once per test process (tests/compile_memo.py)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

from tests import compile_memo  # noqa: E402

assert jax.device_count() == 8, "tests need 8 fake CPU devices; was jax imported before conftest?"
compile_memo.install()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "faults: the slow fault-injection runs (`make faults`; `make test` leaves them out)"
    )
