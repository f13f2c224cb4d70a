"""`--help` of the absl commands (the trainers, core_jax.aot, the two encoders): the command's usage
and every flag it takes, exit code 0.

absl's own help lists only the flags the `__main__` module defines, which for a console script (or
a trainer, whose flags core_jax.app defines) is none, and exits 1.
"""

from __future__ import annotations

import sys
import textwrap

from absl import flags

HELP = {"-h", "-?", "--help", "-help", "--helpshort", "-helpshort"}
HELP_FULL = {"--helpfull", "-helpfull"}
_OWN_PACKAGES = ("core_jax", "clip_jax", "dalle_jax")


def own_flags() -> list:
    """The flags the project's modules define (a module run with `python -m` is keyed by its path)."""
    found = []
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
        if module.split(".")[0] in _OWN_PACKAGES or module.endswith(".py"):
            found += module_flags
    return sorted({f.name: f for f in found}.values(), key=lambda f: f.name)


def flag_line(flag) -> str:
    name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    default = f" (default: {flag.default_as_str})" if flag.default not in (None, "") else ""
    return textwrap.fill(
        f"{name}: {flag.help}{default}",
        100,
        initial_indent="  ",
        subsequent_indent="      ",
        break_on_hyphens=False,
        break_long_words=False,
    )


def exit_if_asked(argv: list[str], usage: str | None) -> None:
    """Prints the help and exits 0 when argv (before a `--`) asks for it; `--helpfull` adds the
    libraries' flags (absl logging, ...)."""
    words = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    if not any(w in HELP or w in HELP_FULL for w in words):
        return
    print((usage or "").strip() + "\n\nflags:")
    if any(w in HELP_FULL for w in words):
        print(flags.FLAGS.get_help())
    else:
        print("\n".join(flag_line(f) for f in own_flags()))
        print("\n--helpfull lists the flags of the libraries too (absl logging, ...).")
    sys.exit(0)
