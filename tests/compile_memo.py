"""One compile per program per test process: a memory-only memo of XLA executables.

Compiles dominate the suite on CPU, and many tests compile a program another test (or an earlier
trainer run of the same test) already compiled: a run that resumes, each data source training the
same model, a fixture's model rebuilt by the next test. Every `jax.jit` is a new function to JAX,
so its own caches miss; this memo keys the compile on what JAX's persistent cache keys it on (the
program without source locations, devices, compile options, backend and flags) and hands back the
executable already built.

Memory only, so nothing outlives the process and no run reuses another's compiles. JAX's on-disk
cache is not used: an executable read back from it deadlocked in an all-gather on 8 CPU devices
(jax 0.12) when run on a state restored from a two-process checkpoint. Programs with host
callbacks compile every time: their executable calls back into the Python objects it was built
with.
"""

import collections
import threading

MAX_EXECUTABLES = 256  # the most recent ones; a test reuses what the tests just before it built


def install() -> bool:
    """Routes JAX's compiles through the memo; False (and nothing changed) on a JAX whose
    internals differ, where every program simply compiles."""
    try:
        from jax._src import cache_key, compiler

        compile_or_get_cached = compiler.compile_or_get_cached
    except (ImportError, AttributeError):
        return False
    executables = collections.OrderedDict()
    lock = threading.Lock()  # data-loader and checkpoint threads may compile too

    def memoized(backend, computation, devices, compile_options, host_callbacks, *args, **kwargs):
        def compile_now():
            return compile_or_get_cached(
                backend, computation, devices, compile_options, host_callbacks, *args, **kwargs
            )

        if host_callbacks:
            return compile_now()
        try:
            key = cache_key.get(computation, devices, compile_options, backend)
        except Exception:  # JAX skips its own cache the same way when it cannot key a program
            return compile_now()
        with lock:
            if key in executables:
                executables.move_to_end(key)
                return executables[key]
        executable = compile_now()
        with lock:
            executables[key] = executable
            if len(executables) > MAX_EXECUTABLES:
                executables.popitem(last=False)
        return executable

    compiler.compile_or_get_cached = memoized
    return True
