"""Render launch/slurm_gpu.sbatch for one job (its #SBATCH header, command, repo) and submit it.

    python launch/slurm.py --nodes 4 --gpus_per_node 8 --partition gpu --time 48:00:00 \
        --command "python -m clip_jax.train --config configs/clip_vit_b16.py --workdir /shared/run"

writes slurm_jobs/JOB_NAME.sbatch and runs `sbatch` on it; `--dry_run` prints the rendered script
and the sbatch command instead.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(REPO_ROOT, "launch", "slurm_gpu.sbatch")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


class LaunchError(ValueError):
    """A request that cannot be turned into a valid batch script."""


class ArgumentParser(argparse.ArgumentParser):
    """A bad flag is one `error: ...` line and exit 2, as in every other command (the launchers
    import only the standard library, so they do not share core_jax's)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def sbatch_header(
    *,
    job_name: str,
    nodes: int,
    gpus_per_node: int,
    time: str,
    partition: str | None = None,
    account: str | None = None,
    cpus_per_task: int | None = None,
    output: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    if nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise LaunchError(f"--gpus_per_node must be >= 0, got {gpus_per_node}")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise LaunchError(f"--cpus_per_task must be >= 1, got {cpus_per_task}")
    if not _TIME.match(time):
        raise LaunchError(f"--time {time!r} is not a SLURM time (e.g. 24:00:00 or 2-00:00:00)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", job_name):
        raise LaunchError(f"--job_name {job_name!r} may only hold letters, digits, '_', '.', '-'")
    lines = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    if gpus_per_node:
        lines.append(f"--gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        lines.append(f"--cpus-per-task={cpus_per_task}")
    lines.append(f"--time={time}")
    lines += [f"--partition={partition}"] if partition else []
    lines += [f"--account={account}"] if account else []
    lines.append(f"--output={output or 'slurm-%x-%j.out'}")
    for item in extra:
        if not item.startswith("--") or "\n" in item:
            raise LaunchError(f"--sbatch_arg {item!r} must be one option like --mem=200G")
        lines.append(item)
    return [f"#SBATCH {line}" for line in lines]


def render_script(
    command: str,
    header: Sequence[str],
    *,
    repo_dir: str = REPO_ROOT,
    port: int | None = None,
    env: Sequence[str] = (),
    template: str | None = None,
) -> str:
    """The template with its #SBATCH lines replaced by `header`, and the job's settings exported
    right after them (before the template's own defaults read them)."""
    if not command.strip():
        raise LaunchError("--command is empty")
    if "\n" in command:
        raise LaunchError("--command must be one line")
    if template is None:
        with open(TEMPLATE) as f:
            template = f.read()
    lines = template.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("#SBATCH")), None)
    if first is None:
        raise LaunchError("the template has no #SBATCH lines to replace")
    body = [line for line in lines[first:] if not line.startswith("#SBATCH")]
    settings = [
        "# Job settings rendered by launch/slurm.py:",
        f"export TRAIN_COMMAND={shlex.quote(command)}",
        f"export REPO_DIR={shlex.quote(repo_dir)}",
    ]
    if port is not None:
        if not 1024 <= port <= 65535:
            raise LaunchError(f"--port must be in [1024, 65535], got {port}")
        settings.append(f"export COORD_PORT={port}")
    for item in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
            raise LaunchError(f"--env {item!r} must look like NAME=VALUE")
        name, value = item.split("=", 1)
        settings.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines[:first] + list(header) + settings + body) + "\n"


def sbatch_command(script_path: str) -> list[str]:
    return ["sbatch", script_path]


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--command", required=True, help="training command, run in the repo on every node")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--cpus_per_task", type=int, default=None)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--job_name", default="t2i-jax")
    p.add_argument("--output", default=None, help="SLURM log file pattern (default slurm-%%x-%%j.out)")
    p.add_argument("--repo_dir", default=REPO_ROOT, help="checkout on the shared filesystem")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default from job id)")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE exported (repeatable)")
    p.add_argument("--sbatch_arg", action="append", default=[], help="extra #SBATCH option")
    p.add_argument("--out", default=None, help="rendered script path (default slurm_jobs/JOB.sbatch)")
    p.add_argument("--dry_run", action="store_true", help="print the script and command, submit nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        header = sbatch_header(
            job_name=args.job_name,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            time=args.time,
            partition=args.partition,
            account=args.account,
            cpus_per_task=args.cpus_per_task,
            output=args.output,
            extra=args.sbatch_arg,
        )
        script = render_script(args.command, header, repo_dir=args.repo_dir, port=args.port, env=args.env)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("slurm_jobs", f"{args.job_name}.sbatch")
    command = sbatch_command(out)
    if args.dry_run:
        print(script, end="")
        print(shlex.join(command))
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(script)
    print(shlex.join(command), flush=True)
    try:
        subprocess.run(command, check=True)
    except FileNotFoundError:
        print("error: sbatch not found on PATH (run this on a SLURM login node)", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        return e.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
