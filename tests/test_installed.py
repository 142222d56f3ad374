"""Acceptance of a non-editable install: the wheel built from a clean copy of the repository, installed into a fresh
virtual environment, ships every module, runs every command from outside the clone, and runs the README's example."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.pipeline_fixtures import REPO, cli_env, common_flags, make_model_dir, make_world

TARGET = "tools"  # the CLIs' default target
SOURCES = ["toys", "sports"]  # in this order, as the run the README's example reads (`--sources toys,sports`)
PACKAGES = ("xcross", "data_prep")
# As tests/test_pipeline.py's: a whole xcross-train run takes seconds.
SMALL = dict(max_train_users=24, max_eval_users=24, batch_size=8, epochs=1, history_len=3, title_tokens=8,
             train_candidates=4)
# Top-level entries of the clone that are not the project (all git-ignored). Building from a copy without them keeps
# a stale build/ of an earlier layout out of the wheel and writes nothing into the clone.
NOT_PROJECT = {".git", ".venv", "build", "dist", "runs", "data", ".pytest_cache", ".whl", ".carry"}


def outside_env() -> dict:
    """cli_env() (one thread, no tqdm noise) without anything that would put the clone on sys.path."""
    env = {k: v for k, v in cli_env().items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def run(command: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check(proc: subprocess.CompletedProcess, what: str = "") -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        pytest.fail(f"`{what or ' '.join(proc.args)}` exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n"
                    f"--- stderr\n{proc.stderr}", pytrace=False)
    return proc


def copy_project(dest: Path) -> Path:
    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if Path(directory) == REPO:
            skip |= {n for n in names if n in NOT_PROJECT or n.startswith(("runs-", ".venv"))}
        return skip
    return Path(shutil.copytree(REPO, dest, ignore=ignore))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The wheel and a fresh venv holding only it; a .pth then makes this interpreter's site-packages (torch,
    numpy, ...) importable there without network. Only its lines are appended to sys.path: the .pth files inside
    (this environment's editable finder of xcross) are not processed."""
    # pip is looked for in a subprocess: finding its spec in this process would make setuptools' distutils shim
    # switch itself off for good, and a later `import setuptools` (torch.compile's C++ build) then fails.
    for module in ("venv", "ensurepip"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs `python -m venv` with pip: {sys.executable} has no {module} module")
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip(f"needs pip: {sys.executable} -m pip does not run")
    root = tmp_path_factory.mktemp("installed")
    assert not root.resolve().is_relative_to(REPO)
    env = outside_env()
    src = copy_project(root / "src")
    check(run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "-w", root / "wheels", src], cwd=root, env=env))
    wheels = sorted((root / "wheels").glob("*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    proc = run([sys.executable, "-m", "venv", venv], cwd=root, env=env)
    if proc.returncode != 0 and "ensurepip" in proc.stdout + proc.stderr:
        pytest.skip(f"`python -m venv` cannot install pip here: {proc.stdout}{proc.stderr}")
    check(proc)
    python = venv / "bin" / "python"
    # Before the .pth exists, so that pip sees an empty environment and never touches the outer one.
    check(run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheels[0]], cwd=root, env=env))
    paths = json.loads(check(run([python, "-c", "import json, sysconfig; print(json.dumps(sysconfig.get_paths()))"],
                                 cwd=root, env=env)).stdout)
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(paths["purelib"]) / "outer_site_packages.pth").write_text("\n".join(outer) + "\n")
    return {"root": root, "src": src, "wheel": wheels[0], "venv": venv, "python": python}


@pytest.fixture(scope="module")
def env(installed) -> dict:
    """The environment of installed commands: the venv's bin first on PATH, no PYTHONPATH."""
    venv = installed["venv"]
    return {**outside_env(), "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    world = make_world(root / "world")
    (root / "cwd").mkdir()  # where the commands run: outside the clone
    return {"world": world, "model": make_model_dir(root / "model", world), "out": root / "runs",
            "cwd": root / "cwd"}


@pytest.fixture(scope="module")
def flags(tiny) -> list[str]:
    return common_flags(tiny["world"], tiny["model"], tiny["out"], target=TARGET, sources=",".join(SOURCES),
                        **SMALL)


@pytest.fixture(scope="module")
def trained(installed, env, tiny, flags) -> subprocess.CompletedProcess:
    """`xcross-train --method xcross` from scratch: it trains both source LoRAs first."""
    command = [installed["venv"] / "bin" / "xcross-train", *flags, "--method", "xcross"]
    return check(run(command, cwd=tiny["cwd"], env=env, timeout=600), "xcross-train --method xcross")


def printed_methods(stdout: str) -> list[str]:
    """The method names of a printed results table (the lines after its dashed rule)."""
    lines = stdout.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("---")), len(lines))
    return [line.split()[0] for line in lines[start:] if line.strip() and not line.startswith("wrote")]


# -- the install ---------------------------------------------------------------------------------------------------


def test_wheel_ships_every_module(installed):
    shipped = set(zipfile.ZipFile(installed["wheel"]).namelist())
    src = installed["src"]
    in_project = {p.relative_to(src).as_posix() for package in PACKAGES for p in (src / package).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts}
    assert not in_project - shipped, f"files of the packages missing from {installed['wheel'].name}"


def test_imports_come_from_the_venv_not_the_clone(installed, env, tmp_path):
    code = ("import importlib.util\n"
            "for name in ('xcross', 'data_prep'): print(importlib.util.find_spec(name).origin)\n"
            "import xcross, data_prep, torch, safetensors, tokenizers, numpy, tqdm\n"
            "print(xcross.__file__); print(data_prep.__file__)\n")
    proc = run([installed["python"], "-c", code], cwd=tmp_path, env=env)
    venv = installed["venv"].resolve()
    for line in proc.stdout.splitlines()[:2]:  # where they are found, whether or not they import
        path = Path(line).resolve()
        assert path.is_relative_to(venv) and not path.is_relative_to(REPO), (
            f"{line} is not the installed copy (the outer editable finder is active?)\n{proc.stdout}{proc.stderr}")
    check(proc, "python -c 'import xcross, data_prep, torch, ...'")
    assert proc.stdout.splitlines()[:2] == proc.stdout.splitlines()[2:4]


HELP = {  # command (its first word from the venv's bin) -> lines its help must hold
    "xcross-train --help": ["usage: xcross-train", "--method"],
    "xcross-evaluate --help": ["usage: xcross-evaluate", "--curve"],
    "xcross-prepare --help": ["usage: xcross-prepare", "amazon", "csv", "synthetic", "gemma"],
    "xcross-prepare amazon --help": ["usage: xcross-prepare amazon", "--reviews"],
    "xcross-prepare csv --help": ["usage: xcross-prepare csv", "--interactions"],
    "xcross-prepare synthetic --help": ["usage: xcross-prepare synthetic", "--users-per-domain"],
    "xcross-prepare gemma --help": ["usage: xcross-prepare gemma", "--gguf"],
    "xcross-rank --help": ["usage: xcross-rank", "--ids", "--strict"],
    "xcross-inspect --help": ["usage: xcross-inspect", "--run"],
    "xcross-study --help": ["usage: xcross-study", "--seeds", "--fractions"],
    "xcross-peft --help": ["usage: xcross-peft", "export", "import"],
    "python -m xcross.cli.train --help": ["usage:", "--method"],
    "python -m xcross.cli.evaluate --help": ["usage:", "--curve"],
    "python -m xcross.cli.prepare --help": ["usage: xcross-prepare", "amazon"],
    "python -m xcross.cli.rank --help": ["usage:", "--ids"],
    "python -m xcross.cli.inspect --help": ["usage:", "--run"],
    "python -m xcross.cli.study --help": ["usage:", "--seeds"],
    "python -m xcross.cli.peft --help": ["usage:", "export"],
    "python -m data_prep.amazon --help": ["usage:", "--reviews"],
    "python -m data_prep.tabular --help": ["usage:", "--interactions"],
    "python -m data_prep.synthetic --help": ["usage:", "--users-per-domain"],
    "python -m data_prep.gemma --help": ["usage:", "--gguf"],
}


@pytest.mark.parametrize("command", HELP)
def test_help(installed, env, tmp_path, command):
    name, *args = command.split()
    proc = check(run([installed["venv"] / "bin" / name, *args], cwd=tmp_path, env=env, timeout=120), command)
    missing = [text for text in HELP[command] if text not in proc.stdout]
    assert not missing, f"`{command}` printed no {missing}:\n{proc.stdout}{proc.stderr}"


# -- the tiny end-to-end run through the installed commands ---------------------------------------------------------


def test_train(tiny, trained):
    out = tiny["out"]
    for path in [out / TARGET / "xcross" / "results.json", out / TARGET / "xcross" / "best.safetensors",
                 *[out / s / "lora" / "best.safetensors" for s in SOURCES]]:
        assert path.is_file(), f"{path} not written\n{trained.stdout}{trained.stderr}"
    assert "xcross" in printed_methods(trained.stdout), trained.stdout


def test_evaluate(installed, env, tiny, flags, trained):
    proc = check(run([installed["venv"] / "bin" / "xcross-evaluate", *flags], cwd=tiny["cwd"], env=env),
                 "xcross-evaluate")
    for name in ("comparison.csv", "comparison.json"):
        assert (tiny["out"] / TARGET / name).is_file(), f"{name} not written\n{proc.stdout}{proc.stderr}"
    assert "xcross" in printed_methods(proc.stdout), proc.stdout
    assert "xcross" in [line.split(",")[0] for line in (tiny["out"] / TARGET / "comparison.csv").read_text()
                        .splitlines()]


# -- the README's Python example -------------------------------------------------------------------------------------

SETTINGS = ("model_dir", "data_dir", "runs")  # the example's first three statements, `name = "..."`


def readme_example() -> str:
    """The one ```python block of README.md's section `## Use from Python`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Use from Python[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        pytest.fail("README.md has no section headed exactly `## Use from Python`", pytrace=False)
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```", section.group(1), re.M | re.S)
    if len(blocks) != 1:
        pytest.fail(f"README.md's `## Use from Python` holds {len(blocks)} ```python blocks, not exactly one",
                    pytrace=False)
    return blocks[0]


def with_settings(code: str, values: dict[str, Path]) -> str:
    """`code` with the whole line `name = ...` of each setting replaced by `name = '<value>'`."""
    missing = [name for name in values if not re.search(rf"^{name} = ", code, re.M)]
    if missing:
        pytest.fail("README.md's `## Use from Python` example has no line " +
                    ", ".join(f"`{name} = \"...\"`" for name in missing) + f"\n--- the example\n{code}",
                    pytrace=False)
    first = [s.targets[0].id if isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Name) else ast.unparse(s)
             for s in ast.parse(code).body[:3]]
    assert first == list(values), f"the example's first three statements are {first}, not {list(values)}"
    for name, value in values.items():
        code = re.sub(rf"^{name} = .*$", lambda _: f"{name} = {str(value)!r}", code, count=1, flags=re.M)
    return code


def test_readme_python_example(installed, env, tiny, trained, tmp_path):
    code = with_settings(readme_example(), dict(zip(SETTINGS, (tiny["model"], tiny["world"], tiny["out"]))))
    (tmp_path / "example.py").write_text(code, encoding="utf-8")
    check(run([installed["python"], "example.py"], cwd=tmp_path, env=env), f"python example.py\n--- example.py\n{code}")
