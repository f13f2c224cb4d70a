"""launch/: the exact gcloud / sbatch / local commands, and the shell they run, executed for real
with fake gcloud-free stand-ins (gcloud and sbatch are never called)."""

import importlib.util
import os
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(LAUNCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu_pod = _load("tpu_pod")
slurm = _load("slurm")
TPU = ["gcloud", "compute", "tpus"]
TRAIN = "python -m clip_jax.train --config configs/clip_vit_b32.py --workdir gs://bucket/run"


# ---------------------------------------------------------------- TPU: create / delete


def test_create_single_slice():
    assert tpu_pod.create_commands("t2i", "us-central2-b", "v4-32", project="proj") == [
        TPU
        + [
            "tpu-vm",
            "create",
            "t2i",
            "--zone=us-central2-b",
            "--project=proj",
            "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base",
        ]
    ]
    spot = tpu_pod.create_commands("t2i", "z", "v6e-8", spot=True)[0]
    assert spot[-2:] == ["--version=v2-alpha-tpuv6e", "--spot"]
    assert tpu_pod.create_commands("t2i", "z", "v4-8", preemptible=True)[0][-1] == "--preemptible"


def test_create_multislice_uses_queued_resources():
    assert tpu_pod.create_commands("ms", "us-east5-b", "v5litepod-16", num_slices=2, spot=True) == [
        TPU
        + [
            "queued-resources",
            "create",
            "ms",
            "--zone=us-east5-b",
            "--accelerator-type=v5litepod-16",
            "--runtime-version=v2-alpha-tpuv5-lite",
            "--node-count=2",
            "--node-prefix=ms",
            "--spot",
        ]
    ]
    assert tpu_pod.node_names("ms", 3) == ["ms-0", "ms-1", "ms-2"]


@pytest.mark.parametrize(
    "accel, runtime",
    [
        ("v2-8", "tpu-ubuntu2204-base"),
        ("v3-32", "tpu-ubuntu2204-base"),
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-128", "v2-alpha-tpuv5"),
        ("v6e-16", "v2-alpha-tpuv6e"),
    ],
)
def test_default_runtime_per_generation(accel, runtime):
    assert tpu_pod.default_runtime(accel) == runtime


def test_create_rejects_bad_requests():
    with pytest.raises(tpu_pod.LaunchError, match="accelerator_type"):
        tpu_pod.create_commands("t", "z", "tpu-32")
    # An explicit runtime lets unknown types through.
    assert "--version=custom" in tpu_pod.create_commands("t", "z", "v9-8", runtime_version="custom")[0]
    with pytest.raises(tpu_pod.LaunchError, match="not both"):
        tpu_pod.create_commands("t", "z", "v4-8", spot=True, preemptible=True)
    with pytest.raises(tpu_pod.LaunchError, match="--spot, not --preemptible"):
        tpu_pod.create_commands("t", "z", "v4-8", preemptible=True, num_slices=2)
    with pytest.raises(tpu_pod.LaunchError, match="--zone"):
        tpu_pod.create_commands("t", "", "v4-8")
    with pytest.raises(tpu_pod.LaunchError, match="num_slices"):
        tpu_pod.create_commands("t", "z", "v4-8", num_slices=0)


def test_delete():
    assert tpu_pod.delete_commands("t2i", "z", project="p") == [
        TPU + ["tpu-vm", "delete", "t2i", "--zone=z", "--project=p", "--quiet"]
    ]
    assert tpu_pod.delete_commands("ms", "z", num_slices=2) == [
        TPU + ["queued-resources", "delete", "ms", "--zone=z", "--force", "--quiet"]
    ]


# ---------------------------------------------------------------- TPU: setup


def test_setup_from_local_checkout(tmp_path):
    tarball = str(tmp_path / "src.tar.gz")
    cmds = tpu_pod.setup_commands("t2i", "z", local_tarball=tarball, repo_root="/repo")
    assert cmds[0][:3] == ["tar", "-czf", tarball] and cmds[0][-3:] == ["-C", "/repo", "."]
    assert cmds[1] == TPU + ["tpu-vm", "scp", tarball, "t2i:t2i_jax_src.tar.gz", "--zone=z", "--worker=all"]
    ssh = cmds[2]
    assert ssh[:8] == TPU + ["tpu-vm", "ssh", "t2i", "--zone=z", "--worker=all"]
    remote = ssh[8].removeprefix("--command=")
    assert "tar -xzf t2i_jax_src.tar.gz -C t2i_jax" in remote
    assert "uv pip install --python .venv/bin/python -e '.[tpu]'" in remote
    assert len(cmds) == 3


def test_setup_multislice_copies_to_every_node_and_installs_on_all():
    cmds = tpu_pod.setup_commands("ms", "z", num_slices=2, local_tarball="/t.tgz")
    assert [c[6] for c in cmds[1:3]] == ["ms-0:t2i_jax_src.tar.gz", "ms-1:t2i_jax_src.tar.gz"]
    assert cmds[3][:9] == TPU + ["queued-resources", "ssh", "ms", "--zone=z", "--node=all", "--worker=all"]


def test_setup_from_git():
    (ssh,) = tpu_pod.setup_commands(
        "t2i", "z", repo_url="https://example.com/r.git", branch="dev", remote_dir="code", extras="tpu,data"
    )
    remote = ssh[-1]
    assert "git clone --branch dev https://example.com/r.git code" in remote
    assert "git -C code pull --ff-only" in remote
    assert "-e '.[tpu,data]'" in remote
    with pytest.raises(tpu_pod.LaunchError, match="--repo_url"):
        tpu_pod.setup_commands("t2i", "z", branch="dev")


def test_tarball_holds_the_code_but_not_environments(tmp_path):
    root = tmp_path / "repo"
    for rel in (
        "core_jax/a.py",
        ".venv/bin/python",
        ".git/HEAD",
        "pkg/__pycache__/a.pyc",
        "launch/tpu_pod.py",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    out = str(tmp_path / "src.tgz")
    subprocess.run(tpu_pod.tarball_command(out, str(root)), check=True)
    names = {n.removeprefix("./") for n in tarfile.open(out).getnames()}
    assert {"core_jax/a.py", "launch/tpu_pod.py"} <= names
    assert not any(n.startswith((".venv", ".git")) or "__pycache__" in n for n in names)


# ---------------------------------------------------------------- TPU: run / logs / stop


def test_run_command_list():
    (cmd,) = tpu_pod.run_commands("t2i", "z", TRAIN, project="p", env=["A=1"])
    assert cmd[:9] == TPU + ["tpu-vm", "ssh", "t2i", "--zone=z", "--project=p", "--worker=all"]
    remote = cmd[9].removeprefix("--command=")
    assert remote == tpu_pod.run_script(TRAIN, env=["A=1"])
    assert "export CORE_JAX_DISTRIBUTED=auto PYTHONUNBUFFERED=1 A=1" in remote
    assert shlex.quote(TRAIN) in remote and "logs/train.log" in remote
    (multi,) = tpu_pod.run_commands("ms", "z", TRAIN, num_slices=2)
    assert multi[3:9] == ["queued-resources", "ssh", "ms", "--zone=z", "--node=all", "--worker=all"]


def test_dry_run_prints_one_quoted_line_per_command_and_runs_nothing(monkeypatch, capsys):
    tricky = """python -m x --note "it's a \\"test\\"" --path '/a b'"""
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command in dry run"))
    argv = ["run", "--name", "t2i", "--zone", "z", "--command", tricky, "--dry_run"]
    assert tpu_pod.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert shlex.split(lines[0]) == tpu_pod.run_commands("t2i", "z", tricky)[0]


def test_without_dry_run_each_command_runs_checked(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append((cmd, kw)))
    assert tpu_pod.main(["setup", "--name", "t", "--zone", "z", "--num_slices", "2"]) == 0
    expected = tpu_pod.setup_commands("t", "z", num_slices=2)
    assert [c for c, _ in ran] == expected and all(kw == {"check": True} for _, kw in ran)
    assert len(capsys.readouterr().out.splitlines()) == len(expected)


def test_cli_reports_bad_input_with_exit_code_2(capsys):
    assert tpu_pod.main(["create", "--name", "t", "--zone", "z", "--accelerator_type", "x-1"]) == 2
    assert "accelerator_type" in capsys.readouterr().err


def _bash(script, cwd, timeout=30):
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_run_script_streams_the_log_and_returns_the_exit_status(tmp_path):
    (tmp_path / "t2i_jax").mkdir()
    command = """echo "it's here"; python3 -c "import os; print(os.environ['CORE_JAX_DISTRIBUTED'], os.environ['X'])"; exit 3"""
    script = tpu_pod.run_script(command, env=["X=a b"])
    result = _bash(script, tmp_path)
    assert result.returncode == 3
    assert result.stdout.splitlines() == ["it's here", "auto a b"]
    log = tmp_path / "t2i_jax" / "logs" / "train.log"
    assert log.read_text().splitlines() == ["it's here", "auto a b"]
    # A second run appends to the log but streams only its own lines.
    result = _bash(tpu_pod.run_script("echo second"), tmp_path)
    assert (result.returncode, result.stdout) == (0, "second\n")
    assert log.read_text().splitlines()[-1] == "second"


def test_detached_run_is_ended_by_stop(tmp_path):
    (tmp_path / "t2i_jax").mkdir()
    result = _bash(tpu_pod.run_script("sleep 60", detach=True, log_name="job"), tmp_path)
    assert result.returncode == 0 and "started pid" in result.stdout
    pid = int((tmp_path / "t2i_jax" / "logs" / "job.pid").read_text())
    os.kill(pid, 0)  # running, in its own session
    stop = tpu_pod.stop_commands("t2i", "z", log_name="job")[0]
    assert stop[:8] == TPU + ["tpu-vm", "ssh", "t2i", "--zone=z", "--worker=all"]
    assert _bash(tpu_pod.stop_script(log_name="job"), tmp_path).returncode == 0
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("stop left the run alive")
    assert not (tmp_path / "t2i_jax" / "logs" / "job.pid").exists()
    assert "lsof" in tpu_pod.stop_script(force=True) and "lsof" not in tpu_pod.stop_script()


def test_logs():
    assert tpu_pod.logs_commands("t2i", "z", follow=True, lines=20) == [
        TPU
        + ["tpu-vm", "ssh", "t2i", "--zone=z", "--worker=0", "--command=tail -n 20 -F t2i_jax/logs/train.log"]
    ]
    (multi,) = tpu_pod.logs_commands("ms", "z", num_slices=2, slice_index=1, worker="3")
    assert multi[5:8] == ["ms-1", "--zone=z", "--worker=3"]
    with pytest.raises(tpu_pod.LaunchError, match="--slice"):
        tpu_pod.logs_commands("ms", "z", num_slices=2, slice_index=2)
    with pytest.raises(tpu_pod.LaunchError, match="log_name"):
        tpu_pod.logs_commands("t", "z", log_name="../x")


# ---------------------------------------------------------------- SLURM


def _render(command=TRAIN, **kw):
    header = slurm.sbatch_header(job_name="j", nodes=2, gpus_per_node=8, time="01:00:00", partition="gpu")
    return slurm.render_script(command, header, repo_dir="/shared/repo", **kw)


def test_rendered_slurm_script_wiring(tmp_path):
    script = _render(port=23456, env=["NCCL_DEBUG=WARN"])
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=j",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=01:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --output=slurm-%x-%j.out",
    ]
    # #SBATCH lines only count before the first command.
    first_command = next(
        i for i, line in enumerate(script.splitlines()) if line.strip() and not line.startswith("#")
    )
    assert first_command > max(script.splitlines().index(h) for h in header)
    assert "scontrol show hostnames \"$SLURM_JOB_NODELIST\" | awk 'NR == 1'" in script
    assert "--ntasks-per-node=1" in script.split("srun", 1)[1]
    assert (
        "--coordinator_address=$COORDINATOR_ADDRESS --num_processes=$SLURM_NNODES --process_id=$SLURM_PROCID"
    ) in script
    assert f"export TRAIN_COMMAND={shlex.quote(TRAIN)}" in script
    assert "export COORD_PORT=23456" in script and "export NCCL_DEBUG=WARN" in script


FAKE_SRUN = """#!/bin/bash
# Runs the task command once per node with that task's SLURM_PROCID, like srun would.
while [[ "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_PROCID=$i "$@" || exit $?; done
"""


def test_slurm_script_runs_each_task_with_its_process_id(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu007\\ngpu008\\n'\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    command = """printf '<%s>' "it's" 'a b'"""
    header = slurm.sbatch_header(job_name="j", nodes=2, gpus_per_node=0, time="10")
    path = tmp_path / "job.sbatch"
    path.write_text(slurm.render_script(command, header, repo_dir=str(tmp_path)))
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu[007-008]",
    )
    result = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    port = 20000 + 4242 % 20000
    for pid in (0, 1):
        assert (
            f"<it's><a b><--coordinator_address=gpu007:{port}><--num_processes=2><--process_id={pid}>"
        ) in result.stdout
    # Without a command the script refuses to start.
    bare = subprocess.run(
        ["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bare.returncode == 2 and "no training command" in bare.stderr


def test_slurm_cli_dry_run_prints_script_then_sbatch(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("submitted in dry run"))
    out = str(tmp_path / "job.sbatch")
    assert slurm.main(["--command", TRAIN, "--nodes", "4", "--out", out, "--dry_run"]) == 0
    printed = capsys.readouterr().out
    *script, last = printed.splitlines()
    assert shlex.split(last) == ["sbatch", out]
    assert "#SBATCH --nodes=4" in script and not os.path.exists(out)


def test_slurm_cli_writes_and_submits(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    out = str(tmp_path / "jobs" / "j.sbatch")
    assert slurm.main(["--command", TRAIN, "--out", out]) == 0
    assert ran == [["sbatch", out]] and "clip_jax.train" in open(out).read()


@pytest.mark.parametrize(
    "kw, problem",
    [
        (dict(nodes=0), "--nodes"),
        (dict(time="tomorrow"), "--time"),
        (dict(job_name="a b"), "--job_name"),
        (dict(extra=["mem=1G"]), "--sbatch_arg"),
    ],
)
def test_slurm_bad_input(kw, problem):
    args = dict(job_name="j", nodes=2, gpus_per_node=8, time="1:00:00") | kw
    with pytest.raises(slurm.LaunchError, match=problem):
        slurm.sbatch_header(**args)


# ---------------------------------------------------------------- local


def _local(*args, env=None):
    return subprocess.run(
        [os.path.join(LAUNCH, "local.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, **(env or {})),
    )


def test_local_dry_run():
    env = {"PYTHON": "/opt/py", "PYTHONPATH": "", "XLA_FLAGS": "", "JAX_PLATFORMS": ""}
    result = _local("--dry_run", "clip_jax.train", "--workdir", "/tmp/my run", env=env)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "env",
        f"PYTHONPATH={REPO}",
        "/opt/py",
        "-m",
        "clip_jax.train",
        "--workdir",
        "/tmp/my run",
    ]
    result = _local("--dry_run", "--fake_devices", "8", "tool.py", "it's", env=env)
    assert shlex.split(result.stdout) == [
        "env",
        f"PYTHONPATH={REPO}",
        "XLA_FLAGS=--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS=cpu",
        "/opt/py",
        "tool.py",
        "it's",
    ]


def test_local_default_python_is_the_project_venv():
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    result = subprocess.run(
        [os.path.join(LAUNCH, "local.sh"), "--dry_run", "m"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    venv = os.path.join(REPO, ".venv", "bin", "python")
    assert shlex.split(result.stdout)[2] == (venv if os.access(venv, os.X_OK) else "python3")


def test_local_dry_run_processes():
    result = _local("--dry_run", "--processes", "2", "--port", "4321", "m", "--x=1", env={"PYTHON": "py"})
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    for i, argv in enumerate(lines):
        assert argv[-5:] == [
            "m",
            "--x=1",
            "--coordinator_address=localhost:4321",
            "--num_processes=2",
            f"--process_id={i}",
        ]


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--fake_devices", "0", "m"], "--fake_devices"),
        (["--port", "99999", "m"], "--port must be in [1, 65535]"),
        (["--processes", "x", "m"], "--processes"),
        (["--bogus", "m"], "unknown option"),
        ([], "local.sh"),
    ],
)
def test_local_bad_input(args, problem):
    result = _local("--dry_run", *args)
    assert result.returncode == 2 and problem in result.stderr


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    from absl import app
    from core_jax import distributed
    distributed.define_flags()

    def main(argv):
        started = distributed.maybe_initialize()
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        mesh = Mesh(np.array(jax.devices()), ("data",))
        local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
        print(f"started={started} process={jax.process_index()}/{jax.process_count()} "
              f"devices={jax.device_count()} sum={float(total)} main={distributed.is_main_process()}")

    app.run(main)
""")


def test_two_local_processes_form_one_job(tmp_path):
    """The explicit-flag path for real: two CPU processes, one coordinator, one global array."""
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    result = subprocess.run(
        [
            os.path.join(LAUNCH, "local.sh"),
            "--fake_devices",
            "2",
            "--processes",
            "2",
            "--port",
            port,
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHON=sys.executable, XLA_FLAGS=""),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Each process holds 2 devices of value (index + 1): 1 + 1 + 2 + 2 = 6 over 4 devices.
    assert "[0] started=True process=0/2 devices=4 sum=6.0 main=True" in result.stdout
    assert "[1] started=True process=1/2 devices=4 sum=6.0 main=False" in result.stdout


# ---------------------------------------------------------------- demo.sh wiring


def _run_demo(tmp_path, fake_body="", check=True, **env):
    """Runs launch/demo.sh (DEMO_DIR = tmp_path/demo) with a stand-in python that appends each call
    to a log and then runs `fake_body` (bash; the call's arguments are "$*"). Returns the finished
    process, the demo dir and the calls as argument lists, in the order they started."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {shlex.quote(str(log))}\n{fake_body}\n')
    fake.chmod(0o755)
    out = tmp_path / "demo"
    proc = subprocess.run(
        ["bash", os.path.join(LAUNCH, "demo.sh")],
        check=check,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": str(fake), "DEMO_DIR": str(out), **env},
    )
    calls = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return proc, out, calls


def _demo_calls(tmp_path, fake_body="", **env):
    """A demo run that must succeed: (the demo dir, the calls)."""
    _, out, calls = _run_demo(tmp_path, fake_body, **env)
    return out, calls


def _call(calls, module, *having):
    """The one call of `module` whose arguments include all of `having`."""
    found = [c for c in calls if c[1] == module and all(h in c for h in having)]
    assert len(found) == 1, (module, having, calls)
    return found[0]


def _modules(calls):
    return sorted(c[1] for c in calls)


def test_demo_trains_the_decoder_beside_the_dalle_and_attaches_it(tmp_path):
    out, calls = _demo_calls(tmp_path, DECODER_ARGS="--config.total_steps=7")
    assert _modules(calls) == sorted(
        [
            "dalle_jax.train_dvae",
            "dalle_jax.train_dvae",
            "clip_jax.train",
            "dalle_jax.train",
            "dalle_jax.attach_decoder",
            "dalle_jax.generate",
            "dalle_jax.contact_sheet",
            "dalle_jax.evaluate_fidelity",
            "dalle_jax.evaluate_fidelity",
        ]
    )
    dvae = _call(calls, "dalle_jax.train_dvae", "configs/dvae_shapes.py")
    decoder = _call(calls, "dalle_jax.train_dvae", "configs/dvae_shapes_decoder.py")
    dalle = _call(calls, "dalle_jax.train")
    attach = _call(calls, "dalle_jax.attach_decoder")
    assert calls.index(dvae) < min(calls.index(decoder), calls.index(dalle))
    assert calls.index(attach) > max(calls.index(decoder), calls.index(dalle))
    assert decoder[decoder.index("--workdir") + 1] == f"{out}/dvae_decoder"
    assert f"--config.init_from={out}/dvae" in decoder and decoder[-1] == "--config.total_steps=7"
    # The DALL-E encodes with the joint dVAE (the same frozen encoder, so the same tokens), and
    # the fine-tuned decoder is attached to it once both have trained.
    assert f"--config.dvae_workdir={out}/dvae" in dalle
    assert attach[2:] == ["--workdir", f"{out}/dalle", "--dvae_workdir", f"{out}/dvae_decoder"]
    # generate and the fidelity score read the DALL-E workdir, which now decodes with that dVAE,
    # and start only after the attachment; the fidelity score covers both splits.
    after = calls[calls.index(attach) + 1 :]
    assert _modules(after) == sorted(
        [
            "dalle_jax.generate",
            "dalle_jax.contact_sheet",
            "dalle_jax.evaluate_fidelity",
            "dalle_jax.evaluate_fidelity",
        ]
    )
    assert all("--dvae_workdir" not in c for c in after)
    for split in ("test_seen", "test_unseen"):
        fid = _call(calls, "dalle_jax.evaluate_fidelity", split)
        assert fid[fid.index("--out") + 1] == f"{out}/fidelity_{split}.json"


def test_demo_shortens_decoder_and_clip_and_user_flags_override(tmp_path):
    _, calls = _demo_calls(
        tmp_path, DECODER_ARGS="--config.batch_size=8", CLIP_ARGS="--config.total_steps=400"
    )
    dvae = _call(calls, "dalle_jax.train_dvae", "configs/dvae_shapes.py")
    decoder = _call(calls, "dalle_jax.train_dvae", "configs/dvae_shapes_decoder.py")
    clip, dalle = _call(calls, "clip_jax.train"), _call(calls, "dalle_jax.train")
    # The demo's budget flags come first, so a stage's own *_ARGS (read last-wins) replace them.
    assert decoder[-3:] == ["--config.batch_size=4", "--config.total_steps=3000", "--config.batch_size=8"]
    assert clip[-2:] == ["--config.total_steps=250", "--config.total_steps=400"]
    # The DALL-E and the dVAE train their configs' defaults: the tokens and samples are untouched.
    assert not any(a.startswith(("--config.batch_size", "--config.total_steps")) for a in dalle + dvae)


def _meet(first, second):
    """A stand-in body: the calls matching the case patterns `first` and `second` each wait (up to
    20 s) for the other to have started, so only a demo that runs them side by side gets past both."""
    return f"""
case "$*" in
  {first}) me=a; other=b ;;
  {second}) me=b; other=a ;;
  *) exit 0 ;;
esac
touch "$DEMO_DIR/started_$me"
for _ in $(seq 200); do [ -e "$DEMO_DIR/started_$other" ] && exit 0; sleep 0.1; done
echo "$me: $other never started" >&2; exit 1
"""


def test_demo_trains_clip_beside_the_dvae(tmp_path):
    out, calls = _demo_calls(
        tmp_path, fake_body=_meet("*clip_jax.train*", "*train_dvae*configs/dvae_shapes.py*")
    )
    clip = _call(calls, "clip_jax.train")
    assert calls.index(clip) < calls.index(_call(calls, "dalle_jax.train")), "CLIP before the DALL-E"
    assert (out / "started_a").exists() and (out / "started_b").exists()


def test_demo_trains_the_decoder_beside_the_dalle(tmp_path):
    out, calls = _demo_calls(
        tmp_path, fake_body=_meet("*train_dvae*dvae_shapes_decoder.py*", "*dalle_jax.train\\ *")
    )
    assert (out / "started_a").exists() and (out / "started_b").exists()


def test_demo_stops_when_a_background_stage_fails(tmp_path):
    proc, _, calls = _run_demo(
        tmp_path, 'case "$*" in *clip_jax.train*) echo "CLIP broke here"; exit 3 ;; esac', check=False
    )
    assert proc.returncode == 1
    assert "error: CLIP training failed (exit 3)" in proc.stderr and "CLIP broke here" in proc.stderr
    # Stopped before the DALL-E, its longest stage.
    assert not any(c[1] == "dalle_jax.train" for c in calls)


def test_demo_stops_when_the_decoder_fails_beside_the_dalle(tmp_path):
    proc, _, calls = _run_demo(
        tmp_path, 'case "$*" in *dvae_shapes_decoder*) echo "decoder broke here"; exit 4 ;; esac', check=False
    )
    assert proc.returncode == 1
    assert "error: dVAE decoder fine-tuning failed (exit 4)" in proc.stderr
    assert "decoder broke here" in proc.stderr
    # Nothing is attached or sampled with a decoder that did not train.
    assert not any(c[1] in ("dalle_jax.attach_decoder", "dalle_jax.generate") for c in calls)


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan killed after its parent exited may wait to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
    return bool(stat.strip()) and not stat.strip().startswith("Z")


def test_demo_stops_its_background_stage_when_a_stage_fails(tmp_path):
    # The dVAE's stand-in fails only once CLIP's has written its pid.
    proc, out, _ = _run_demo(
        tmp_path,
        """
case "$*" in
  *clip_jax.train*) echo $$ > "$DEMO_DIR/clip.pid"; exec sleep 60 ;;
  *train_dvae*) for _ in $(seq 100); do [ -e "$DEMO_DIR/clip.pid" ] && break; sleep 0.1; done; exit 1 ;;
esac""",
        check=False,
    )
    assert proc.returncode == 1
    pid = int((out / "clip.pid").read_text())
    for _ in range(50):  # the EXIT trap's kill lands at once; allow the process to die
        if not _alive(pid):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("CLIP kept training after the dVAE stage failed")


def test_repeated_config_override_takes_the_last(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(
        textwrap.dedent("""
        from core_jax import app
        def main(argv):
            c = app.loaded_config()
            print(c.batch_size, c.total_steps)
        app.run(main, "configs/dvae_shapes_decoder.py", workdir_required=False)
    """)
    )
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--config",
            "configs/dvae_shapes_decoder.py",
            "--config.batch_size=4",
            "--config.total_steps=9",
            "--config.batch_size=8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["8", "9"]


def test_demo_without_decoder_finetuning(tmp_path):
    out, calls = _demo_calls(tmp_path, DECODER_FINETUNE="0")
    assert sorted(c[1] for c in calls[:3]) == ["clip_jax.train", "dalle_jax.train", "dalle_jax.train_dvae"]
    assert f"--config.dvae_workdir={out}/dvae" in _call(calls, "dalle_jax.train")
    assert "configs/dvae_shapes_decoder.py" not in sum(calls, [])
    assert not any(c[1] == "dalle_jax.attach_decoder" for c in calls)


def test_demo_rejects_a_bad_decoder_switch(tmp_path):
    proc = subprocess.run(
        ["bash", os.path.join(LAUNCH, "demo.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": "/bin/false", "DEMO_DIR": str(tmp_path / "d"), "DECODER_FINETUNE": "no"},
    )
    assert proc.returncode == 2 and "DECODER_FINETUNE must be 0 or 1, got 'no'" in proc.stderr
