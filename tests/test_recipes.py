"""The recipes in launch/README.md run as written: every command parses and every config key it
sets exists.

Commands are read out of the recipes' shell blocks (continuation lines joined, comments dropped,
the recipe's own `NAME=value` variables substituted, `&&` chains split). Launchers run with their
own --dry_run; the project's commands, including those a launcher or `gcloud ... ssh --command`
runs remotely, run under CORE_JAX_DRY_RUN=1 (core_jax.cli), which parses the flags, loads the
config and applies the `--config.*` overrides, then exits before touching devices or data.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "launch", "README.md")
RUNNER = os.path.join(REPO, "tests", "recipe_dry_run.py")

LAUNCHERS = {"launch/tpu_pod.py": "tpu_pod", "launch/slurm.py": "slurm"}
# Tools outside this project the recipes call; they are not checked, only named.
EXTERNAL_COMMANDS = {"gcloud", "gsutil", "img2dataset", "git", "cd", "wget", "pip", "squeue", "tail"}
EXTERNAL_MODULES = {"venv", "pip"}
# Read from the user's environment, not defined by the recipe.
USER_ENVIRONMENT = {"WANDB_API_KEY": "wandb-key"}
# What launch/slurm_gpu.sbatch appends to the command on every node.
SLURM_APPENDS = ["--coordinator_address=node0:20000", "--num_processes=4", "--process_id=0"]
# Flags of the recipes that other lines of development add to these commands: left out of the
# dry run until they exist here (test_awaited_flags_are_still_missing says when to drop one).
AWAITED_FLAGS: dict[str, tuple[str, ...]] = {}


def _console_scripts() -> dict[str, str]:
    text = open(os.path.join(REPO, "setup.py")).read()
    return dict(re.findall(r'"([a-z0-9-]+)": "([a-z_.]+:[a-z_]+)"', text))


CONSOLE_SCRIPTS = _console_scripts()


# ------------------------------------------------------------------------------ extraction


def recipe_blocks(markdown: str) -> dict[str, list[str]]:
    """{'Recipe 1: ...': [shell block, ...]} for every `### Recipe` section."""
    recipes = {}
    for match in re.finditer(r"^### (Recipe [^\n]*)\n(.*?)(?=^##|\Z)", markdown, re.S | re.M):
        recipes[match.group(1)] = re.findall(r"```bash\n(.*?)```", match.group(2), re.S)
    return recipes


def _expand(line: str, variables: dict[str, str]) -> str:
    """$NAME / ${NAME} outside single quotes, as the shell expands them; an unknown one fails."""
    out, quote, i = [], None, 0
    while i < len(line):
        ch = line[i]
        if ch in "'\"" and quote in (None, ch):
            quote = None if quote else ch
        if ch == "$" and quote != "'":
            m = re.match(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", line[i:])
            if m:
                name = m.group(1)
                if name not in variables:
                    raise AssertionError(f"${name} is not defined in the recipe: {line.strip()}")
                out.append(variables[name])
                i += m.end()
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def _simple_commands(tokens: list[str]) -> list[list[str]]:
    commands, current = [], []
    for token in tokens:
        if token in ("&&", "||", ";", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def block_commands(blocks: list[str]) -> list[list[str]]:
    """Argument lists of the commands in `blocks`, in order; variable lines define variables."""
    variables, commands = dict(USER_ENVIRONMENT), []
    for block in blocks:
        for line in block.replace("\\\n", "").splitlines():
            tokens = shlex.split(_expand(line, variables), comments=True)
            if tokens and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", t) for t in tokens):
                variables.update(t.split("=", 1) for t in tokens)
                continue
            commands.extend(_simple_commands(tokens))
    return commands


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _is_python(word: str) -> bool:
    return word in ("python", "python3") or word.endswith("/bin/python")


def classify(argv: list[str], where: str = "local") -> list[tuple]:
    """('launcher', name, args) | ('entry', module, function, args, where) | ('external', name),
    for the command and for the commands it runs remotely (its --command)."""
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):  # VAR=value cmd
        argv = argv[1:]
    word = argv[0]
    if _is_python(word) and len(argv) > 1 and argv[1] in LAUNCHERS:
        name = LAUNCHERS[argv[1]]
        inner = _option(argv, "--command")
        found = [("launcher", name, argv[2:])]
        for command in _simple_commands(shlex.split(inner or "")):
            found += classify(command, name)
        return found
    if _is_python(word) and len(argv) > 2 and argv[1] == "-m":
        module = argv[2]
        if module in EXTERNAL_MODULES:
            return [("external", module)]
        args = argv[3:] + (SLURM_APPENDS if where == "slurm" else [])
        return [("entry", module, None, args, where)]
    if word in CONSOLE_SCRIPTS:
        module, function = CONSOLE_SCRIPTS[word].split(":")
        return [("entry", module, function, argv[1:], where)]
    name = os.path.basename(word)
    assert name in EXTERNAL_COMMANDS, f"unknown command {word!r} in: {shlex.join(argv)}"
    found = [("external", name)]
    if name == "gcloud" and _option(argv, "--command"):
        for command in _simple_commands(shlex.split(_option(argv, "--command"))):
            found += classify(command, "ssh")
    return found


def _without_awaited(module: str, args: list[str]) -> list[str]:
    awaited = AWAITED_FLAGS.get(module, ())
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in awaited:
            skip = True
        elif not any(arg.startswith(flag + "=") for flag in awaited):
            kept.append(arg)
    return kept


# ------------------------------------------------------------------------------ running


def dry_run(entries: list[tuple]) -> list[tuple[int, str]]:
    """(exit code, output) of each (module, function or None, argv[, options]): see recipe_dry_run.py."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, RUNNER],
        input=json.dumps(entries),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout)]


def _launcher(name: str):
    spec = importlib.util.spec_from_file_location(
        f"launch_{name}", os.path.join(REPO, "launch", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipes():
    with open(README, encoding="utf-8") as f:
        found = recipe_blocks(f.read())
    return {
        title: [c for argv in block_commands(blocks) for c in classify(argv)]
        for title, blocks in found.items()
    }


def test_three_recipes_each_run_a_project_command(recipes):
    assert len(recipes) == 3, sorted(recipes)
    for title, checks in recipes.items():
        assert any(c[0] == "launcher" for c in checks), title
        assert any(c[0] == "entry" for c in checks), title


BAD_COMMANDS = [
    ("clip_jax.train", None, ["--config", "clip_vit_b32", "--workdir", "w", "--config.data.urlz=x"]),
    ("clip_jax.train", None, ["--config", "clip_vit_b33", "--workdir", "w"]),
    ("clip_jax.train", None, ["--config", "clip_vit_b32"]),  # --workdir is required
    ("clip_jax.evaluate", None, ["--workdir", "w", "--config.eval.zeroshot_sauce=tfds"]),
    ("dalle_jax.generate", None, ["--workdir", "w", "--out_dir", "o", "--top_k_rerankk", "4"]),
    ("clip_jax.train", "main", ["--config", "clip_shapes", "--workdir", "w", "--config.optim.lr=1"]),
]
GOOD_COMMAND = (
    "clip_jax.train",
    "main",
    ["--config", "clip_shapes", "--workdir", "w", "--config.optim.learning_rate=1"],
)
AWAITED_COMMANDS = [
    (module, None, ["--workdir", "w", "--out_dir", "o", "--prompt", "p", f"{flag}=1"])
    for module, flags in AWAITED_FLAGS.items()
    for flag in flags
]


@pytest.fixture(scope="module")
def runs(recipes, tmp_path_factory):
    """Every project command of the recipes, then the commands that must fail, one that must pass
    and the awaited flags, through one runner. The W&B one is not a dry run: a project without
    wandb installed must stop the trainer before its workdir exists."""
    entries, labels = [], []
    for title, checks in recipes.items():
        for _, module, function, args, where in (c for c in checks if c[0] == "entry"):
            entries.append((module, function, _without_awaited(module, args)))
            labels.append(f"{title} ({where}): {module} {shlex.join(args)}")
    workdir = str(tmp_path_factory.mktemp("no_wandb") / "w")
    no_wandb = (
        "clip_jax.train",
        None,
        ["--config", "clip_shapes", "--workdir", workdir, "--config.wandb.project=p"],
        {"dry_run": False, "missing": ["wandb"]},
    )
    results = iter(dry_run(entries + BAD_COMMANDS + [no_wandb, GOOD_COMMAND] + AWAITED_COMMANDS))
    return {
        "recipes": [(label, next(results)) for label in labels],
        "bad": [next(results) for _ in BAD_COMMANDS],
        "no_wandb": next(results),
        "no_wandb_workdir": workdir,
        "good": next(results),
        "awaited": list(results),
    }


def test_every_recipe_command_parses(recipes, runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # slurm.py's dry run renders without writing; nothing lands in the repo
    launchers = {name: _launcher(name) for name in LAUNCHERS.values()}
    for title, checks in recipes.items():
        for _, name, args in (c for c in checks if c[0] == "launcher"):
            code = launchers[name].main(args + ["--dry_run"])
            assert code == 0, f"{title}: {name} {shlex.join(args)}\n{capsys.readouterr().err}"
    assert len(runs["recipes"]) >= 11
    for label, (code, output) in runs["recipes"]:
        assert code == 0 and "dry run:" in output, f"{label}\nexit {code}: {output[-2000:]}"


def test_bad_commands_fail_the_dry_run(runs):
    console = classify(["clip-jax-train", *BAD_COMMANDS[-1][2]])
    assert console == [("entry", *BAD_COMMANDS[-1], "local")]  # console scripts run their target
    for (module, _, args), (code, output) in zip(BAD_COMMANDS, runs["bad"]):
        assert code == 2 and output.startswith("error: "), f"{module} {args}: exit {code}: {output}"
        assert len(output.strip().splitlines()) == 1, output
    code, output = runs["no_wandb"]
    assert code == 2 and output.startswith("error: ") and len(output.strip().splitlines()) == 1, output
    assert "pip install '.[wandb]'" in output
    assert not os.path.exists(runs["no_wandb_workdir"])
    assert runs["good"][0] == 0, runs["good"][1]


def test_awaited_flags_are_still_missing(runs):
    """Once a flag in AWAITED_FLAGS exists on this branch, drop it there so the recipes check it."""
    for (module, _, args), (code, output) in zip(AWAITED_COMMANDS, runs["awaited"]):
        assert code == 2, f"{module} now takes {args[-1]}: remove it from AWAITED_FLAGS ({output.strip()})"


def test_extraction_joins_lines_and_substitutes_variables():
    block = (
        "# a comment\n"
        "B=gs://b\n"
        "S=$B/{0..9}.tar\n"
        'python launch/tpu_pod.py run --name t \\\n  --command "cd x && python -m clip_jax.train \\\n'
        "    --workdir $B/w --config.data.urls='$S'\"  # trailing comment\n"
        "echo '$B'\n"
    )
    commands = block_commands([block])
    assert commands[0][:3] == ["python", "launch/tpu_pod.py", "run"]
    inner = _option(commands[0], "--command")
    assert (
        inner
        == "cd x && python -m clip_jax.train     --workdir gs://b/w --config.data.urls='gs://b/{0..9}.tar'"
    )
    assert commands[1] == ["echo", "$B"]  # single quotes keep it, as the shell does
    checks = classify(commands[0])
    assert ("external", "cd") in checks
    assert (
        "entry",
        "clip_jax.train",
        None,
        ["--workdir", "gs://b/w", "--config.data.urls=gs://b/{0..9}.tar"],
        "tpu_pod",
    ) in checks
    with pytest.raises(AssertionError, match=r"\$NOPE is not defined"):
        block_commands(["python -m clip_jax.train --workdir $NOPE\n"])
    with pytest.raises(AssertionError, match="unknown command"):
        classify(["pyhton", "-m", "clip_jax.train"])
