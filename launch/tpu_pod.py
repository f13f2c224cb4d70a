"""Cloud TPU pods from the command line: create, set up, run on every worker, read logs, stop, delete.

    python launch/tpu_pod.py create --name t2i --zone us-central2-b --accelerator_type v4-32
    python launch/tpu_pod.py setup  --name t2i --zone us-central2-b
    python launch/tpu_pod.py run    --name t2i --zone us-central2-b \
        --command "python -m clip_jax.train --config configs/clip_vit_b32.py --workdir gs://b/run"
    python launch/tpu_pod.py logs   --name t2i --zone us-central2-b --follow
    python launch/tpu_pod.py delete --name t2i --zone us-central2-b

`--num_slices N` (N > 1) switches every subcommand to a multi-slice queued resource whose nodes are
NAME-0 .. NAME-(N-1). `--dry_run` prints the commands, one shell-quoted command per line, and runs
nothing. The command lists are built by the pure `*_commands` functions, which the tests call.
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
GCLOUD_TPU = ("gcloud", "compute", "tpus")
DEFAULT_REMOTE_DIR = "t2i_jax"  # relative to the home directory on every worker
REMOTE_TARBALL = "t2i_jax_src.tar.gz"
DEFAULT_LOG_NAME = "train"
# Tells core_jax.distributed that this process is one host of a pod (the TPU VM keeps the worker
# list in its metadata server, not in the environment).
DISTRIBUTED_ENV = "CORE_JAX_DISTRIBUTED=auto"
# Not copied to the workers: environments, caches, version control, local run outputs.
TAR_EXCLUDES = (
    ".git",
    ".venv",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "workdirs",
    "logs",
    "slurm_jobs",
    "*.egg-info",
)

# Runtime images per TPU generation (https://cloud.google.com/tpu/docs/runtimes).
RUNTIME_BY_GENERATION = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
_ACCELERATOR = re.compile(r"^(v2|v3|v4|v5litepod|v5p|v6e)-(\d+)$")


class LaunchError(ValueError):
    """A request that cannot be turned into a valid gcloud command."""


class ArgumentParser(argparse.ArgumentParser):
    """A bad flag is one `error: ...` line and exit 2, as in every other command (the launchers
    import only the standard library, so they do not share core_jax's)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def default_runtime(accelerator_type: str) -> str:
    match = _ACCELERATOR.match(accelerator_type)
    if not match:
        raise LaunchError(
            f"unknown --accelerator_type {accelerator_type!r}: expected GENERATION-SIZE with "
            f"GENERATION one of {sorted(RUNTIME_BY_GENERATION)} (e.g. v4-32, v5litepod-16, v6e-8); "
            f"for other types pass --runtime_version too"
        )
    return RUNTIME_BY_GENERATION[match.group(1)]


def _location(zone: str, project: str | None) -> list[str]:
    if not zone:
        raise LaunchError("--zone is required (e.g. us-central2-b)")
    return [f"--zone={zone}"] + ([f"--project={project}"] if project else [])


def node_names(name: str, num_slices: int) -> list[str]:
    """The TPU VM names: NAME for one slice, NAME-0 .. NAME-(N-1) for a multi-slice queued resource."""
    if num_slices < 1:
        raise LaunchError(f"--num_slices must be >= 1, got {num_slices}")
    return [name] if num_slices == 1 else [f"{name}-{i}" for i in range(num_slices)]


def create_commands(
    name: str,
    zone: str,
    accelerator_type: str,
    *,
    project: str | None = None,
    runtime_version: str | None = None,
    spot: bool = False,
    preemptible: bool = False,
    num_slices: int = 1,
) -> list[list[str]]:
    runtime = runtime_version or default_runtime(accelerator_type)
    size = re.fullmatch(r".+-(\d+)", accelerator_type)
    if size and int(size.group(1)) < 1:
        raise LaunchError(f"--accelerator_type {accelerator_type!r}: the size after '-' must be >= 1")
    if spot and preemptible:
        raise LaunchError("pass --spot or --preemptible, not both")
    if num_slices == 1:
        cmd = [
            *GCLOUD_TPU,
            "tpu-vm",
            "create",
            name,
            *_location(zone, project),
            f"--accelerator-type={accelerator_type}",
            f"--version={runtime}",
        ]
        return [cmd + (["--spot"] if spot else []) + (["--preemptible"] if preemptible else [])]
    node_names(name, num_slices)  # validates the count
    if preemptible:
        raise LaunchError("queued resources (--num_slices > 1) take --spot, not --preemptible")
    cmd = [
        *GCLOUD_TPU,
        "queued-resources",
        "create",
        name,
        *_location(zone, project),
        f"--accelerator-type={accelerator_type}",
        f"--runtime-version={runtime}",
        f"--node-count={num_slices}",
        f"--node-prefix={name}",
    ]
    return [cmd + (["--spot"] if spot else [])]


def ssh_command(
    name: str, zone: str, remote: str, *, project: str | None = None, num_slices: int = 1, worker: str = "all"
) -> list[str]:
    """One gcloud ssh that runs `remote` (a shell string) on the chosen workers of every slice."""
    if num_slices == 1:
        return [
            *GCLOUD_TPU,
            "tpu-vm",
            "ssh",
            name,
            *_location(zone, project),
            f"--worker={worker}",
            f"--command={remote}",
        ]
    node_names(name, num_slices)
    return [
        *GCLOUD_TPU,
        "queued-resources",
        "ssh",
        name,
        *_location(zone, project),
        "--node=all",
        f"--worker={worker}",
        f"--command={remote}",
    ]


def tarball_command(tarball: str, repo_root: str = REPO_ROOT) -> list[str]:
    return ["tar", "-czf", tarball, *[f"--exclude={p}" for p in TAR_EXCLUDES], "-C", repo_root, "."]


def install_script(remote_dir: str, extras: str = "tpu", python_version: str = "3.12") -> str:
    """Shell that installs the project into REMOTE_DIR/.venv (uv brings its own Python, since the
    TPU images ship an older one than the project needs)."""
    d = shlex.quote(remote_dir)
    spec = shlex.quote(f".[{extras}]" if extras else ".")
    return (
        "export PATH=$HOME/.local/bin:$PATH && "
        "{ command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; } && "
        f"cd {d} && "
        f"{{ [ -x .venv/bin/python ] || uv venv --python {shlex.quote(python_version)} .venv; }} && "
        f"uv pip install --python .venv/bin/python -e {spec}"
    )


def setup_commands(
    name: str,
    zone: str,
    *,
    project: str | None = None,
    num_slices: int = 1,
    repo_url: str | None = None,
    branch: str | None = None,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    extras: str = "tpu",
    python_version: str = "3.12",
    local_tarball: str = "/tmp/t2i_jax_src.tar.gz",
    repo_root: str = REPO_ROOT,
) -> list[list[str]]:
    """Puts the code on every worker (git clone of --repo_url, or a tarball of this checkout) and
    installs it there."""
    d = shlex.quote(remote_dir)
    commands = []
    if repo_url:
        clone = ["git", "clone"] + (["--branch", branch] if branch else []) + [repo_url, remote_dir]
        update = f"git -C {d} pull --ff-only"
        if branch:
            update = f"git -C {d} fetch && git -C {d} checkout {shlex.quote(branch)} && {update}"
        fetch = f"if [ -d {d}/.git ]; then {update}; else {shlex.join(clone)}; fi"
    else:
        if branch:
            raise LaunchError("--branch needs --repo_url (without it the local checkout is copied)")
        commands.append(tarball_command(local_tarball, repo_root))
        for node in node_names(name, num_slices):
            commands.append(
                [
                    *GCLOUD_TPU,
                    "tpu-vm",
                    "scp",
                    local_tarball,
                    f"{node}:{REMOTE_TARBALL}",
                    *_location(zone, project),
                    "--worker=all",
                ]
            )
        fetch = f"mkdir -p {d} && tar -xzf {REMOTE_TARBALL} -C {d} && rm -f {REMOTE_TARBALL}"
    remote = f"set -e; {fetch}; {install_script(remote_dir, extras, python_version)}"
    commands.append(ssh_command(name, zone, remote, project=project, num_slices=num_slices))
    return commands


def _log_paths(log_name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", log_name):
        raise LaunchError(f"--log_name {log_name!r} may only hold letters, digits, '_', '.', '-'")
    return f"logs/{log_name}.log", f"logs/{log_name}.pid"


def run_script(
    command: str,
    *,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    log_name: str = DEFAULT_LOG_NAME,
    env: Sequence[str] = (),
    detach: bool = False,
) -> str:
    """Shell run on each worker: start COMMAND in its own session (so a dropped ssh connection does
    not kill training), log to REMOTE_DIR/logs/LOG_NAME.log, and unless detached stream that log
    until the command ends and exit with its status."""
    if not command.strip():
        raise LaunchError("--command is empty")
    for item in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
            raise LaunchError(f"--env {item!r} must look like NAME=VALUE")
    log, pid = _log_paths(log_name)
    # Unbuffered so the streamed log keeps up with the run.
    exports = " ".join([DISTRIBUTED_ENV, "PYTHONUNBUFFERED=1"] + [shlex.quote(e) for e in env])
    parts = [
        "set -e",
        f"cd {shlex.quote(remote_dir)}",
        "mkdir -p logs",
        "if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi",
        f"export {exports}",
        f"touch {log}",
        f"START=$(stat -c %s {log})",
        f"nohup setsid bash -c {shlex.quote(command)} >> {log} 2>&1 < /dev/null &",
        "PID=$!",
        f"echo $PID > {pid}",
    ]
    if detach:
        parts.append(f'echo "$(hostname): started pid $PID, log $PWD/{log}"')
    else:
        parts += [
            f"tail -c +$((START + 1)) -f -s 0.5 --pid=$PID {log} &",
            "RC=0",
            "wait $PID || RC=$?",
            "wait",
            "exit $RC",
        ]
    return _join(parts)


def _join(parts: Sequence[str]) -> str:
    """`a; b & c` on one line: a part that ends in `&` is already terminated."""
    return "".join(p + (" " if p.endswith("&") else "; ") for p in parts[:-1]) + parts[-1]


def run_commands(
    name: str,
    zone: str,
    command: str,
    *,
    project: str | None = None,
    num_slices: int = 1,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    log_name: str = DEFAULT_LOG_NAME,
    env: Sequence[str] = (),
    detach: bool = False,
) -> list[list[str]]:
    remote = run_script(command, remote_dir=remote_dir, log_name=log_name, env=env, detach=detach)
    return [ssh_command(name, zone, remote, project=project, num_slices=num_slices)]


def logs_commands(
    name: str,
    zone: str,
    *,
    project: str | None = None,
    num_slices: int = 1,
    slice_index: int = 0,
    worker: str = "0",
    remote_dir: str = DEFAULT_REMOTE_DIR,
    log_name: str = DEFAULT_LOG_NAME,
    lines: int = 100,
    follow: bool = False,
) -> list[list[str]]:
    """Tail the log of one worker (or `all`) of one slice."""
    log, _ = _log_paths(log_name)
    nodes = node_names(name, num_slices)
    if not 0 <= slice_index < len(nodes):
        raise LaunchError(f"--slice must be in [0, {len(nodes)}), got {slice_index}")
    if worker != "all" and not re.fullmatch(r"\d+(,\d+)*", worker):
        raise LaunchError(
            f"--worker must be a worker index (0, 1, ...), a comma list of them, or 'all'; got {worker!r}"
        )
    if lines < 0:
        raise LaunchError(f"--lines must be >= 0, got {lines}")
    tail = f"tail -n {int(lines)}{' -F' if follow else ''} {shlex.quote(remote_dir)}/{log}"
    return [
        [
            *GCLOUD_TPU,
            "tpu-vm",
            "ssh",
            nodes[slice_index],
            *_location(zone, project),
            f"--worker={worker}",
            f"--command={tail}",
        ]
    ]


def stop_script(
    remote_dir: str = DEFAULT_REMOTE_DIR, log_name: str = DEFAULT_LOG_NAME, force: bool = False
) -> str:
    _, pid = _log_paths(log_name)
    d = shlex.quote(remote_dir)
    script = (
        f"if [ -f {d}/{pid} ]; then P=$(cat {d}/{pid}); "
        f"kill -TERM -- -$P 2>/dev/null || kill -TERM $P 2>/dev/null || true; rm -f {d}/{pid}; fi"
    )
    if force:  # anything still holding the TPU chips (v4: /dev/accel*, v5e and later: /dev/vfio)
        script += "; sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u | xargs -r sudo kill -9"
    return script


def stop_commands(
    name: str,
    zone: str,
    *,
    project: str | None = None,
    num_slices: int = 1,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    log_name: str = DEFAULT_LOG_NAME,
    force: bool = False,
) -> list[list[str]]:
    return [
        ssh_command(
            name, zone, stop_script(remote_dir, log_name, force), project=project, num_slices=num_slices
        )
    ]


def delete_commands(
    name: str, zone: str, *, project: str | None = None, num_slices: int = 1
) -> list[list[str]]:
    if num_slices == 1:
        return [[*GCLOUD_TPU, "tpu-vm", "delete", name, *_location(zone, project), "--quiet"]]
    node_names(name, num_slices)
    return [
        [*GCLOUD_TPU, "queued-resources", "delete", name, *_location(zone, project), "--force", "--quiet"]
    ]


def build_commands(args: argparse.Namespace) -> list[list[str]]:
    common = dict(project=args.project, num_slices=args.num_slices)
    if args.subcommand == "create":
        return create_commands(
            args.name,
            args.zone,
            args.accelerator_type,
            runtime_version=args.runtime_version,
            spot=args.spot,
            preemptible=args.preemptible,
            **common,
        )
    if args.subcommand == "setup":
        return setup_commands(
            args.name,
            args.zone,
            repo_url=args.repo_url,
            branch=args.branch,
            remote_dir=args.remote_dir,
            extras=args.extras,
            python_version=args.python_version,
            **common,
        )
    if args.subcommand == "run":
        return run_commands(
            args.name,
            args.zone,
            args.command,
            remote_dir=args.remote_dir,
            log_name=args.log_name,
            env=args.env,
            detach=args.detach,
            **common,
        )
    if args.subcommand == "logs":
        return logs_commands(
            args.name,
            args.zone,
            slice_index=args.slice,
            worker=args.worker,
            remote_dir=args.remote_dir,
            log_name=args.log_name,
            lines=args.lines,
            follow=args.follow,
            **common,
        )
    if args.subcommand == "stop":
        return stop_commands(
            args.name,
            args.zone,
            remote_dir=args.remote_dir,
            log_name=args.log_name,
            force=args.force,
            **common,
        )
    return delete_commands(args.name, args.zone, **common)


def make_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (or queued resource) name")
    common.add_argument("--zone", required=True)
    common.add_argument("--project", default=None, help="default: gcloud's configured project")
    common.add_argument(
        "--num_slices",
        type=int,
        default=1,
        help="> 1: multi-slice queued resource with nodes NAME-0..NAME-(N-1)",
    )
    common.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    in_repo = argparse.ArgumentParser(add_help=False)
    in_repo.add_argument(
        "--remote_dir",
        default=DEFAULT_REMOTE_DIR,
        help="project directory on each worker, relative to its home",
    )
    in_repo.add_argument(
        "--log_name", default=DEFAULT_LOG_NAME, help="REMOTE_DIR/logs/LOG_NAME.log (and .pid) on each worker"
    )

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="subcommand", required=True)
    p = sub.add_parser("create", parents=[common], help="create the TPU VM(s)")
    p.add_argument("--accelerator_type", required=True, help="e.g. v4-32, v5litepod-16, v6e-8")
    p.add_argument("--runtime_version", default=None, help=f"default per generation: {RUNTIME_BY_GENERATION}")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--preemptible", action="store_true", help="single slice only (legacy)")
    p = sub.add_parser("setup", parents=[common, in_repo], help="install the project on every worker")
    p.add_argument("--repo_url", default=None, help="git clone this; default: copy this checkout")
    p.add_argument("--branch", default=None)
    p.add_argument("--extras", default="tpu", help='pip extras: installs ".[EXTRAS]"')
    p.add_argument("--python_version", default="3.12")
    p = sub.add_parser("run", parents=[common, in_repo], help="run one command on every worker")
    p.add_argument("--command", required=True, help="shell command run in REMOTE_DIR")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE exported first (repeatable)")
    p.add_argument(
        "--detach", action="store_true", help="start and return; follow with `logs --follow`, end with `stop`"
    )
    p = sub.add_parser("logs", parents=[common, in_repo], help="show one worker's log")
    p.add_argument("--worker", default="0", help="worker index, or 'all'")
    p.add_argument("--slice", type=int, default=0, help="which slice, with --num_slices > 1")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--follow", action="store_true")
    p = sub.add_parser("stop", parents=[common, in_repo], help="stop the run on every worker")
    p.add_argument("--force", action="store_true", help="also kill whatever holds the TPU chips")
    sub.add_parser("delete", parents=[common], help="delete the TPU VM(s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        commands = build_commands(args)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for cmd in commands:
        print(shlex.join(cmd), flush=True)
        if args.dry_run:
            continue
        try:
            subprocess.run(cmd, check=True)
        except FileNotFoundError:
            print(f"error: {cmd[0]} not found on PATH (install the Google Cloud CLI)", file=sys.stderr)
            return 2
        except subprocess.CalledProcessError as e:
            print(f"error: exit status {e.returncode} from: {shlex.join(cmd)}", file=sys.stderr)
            return e.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
