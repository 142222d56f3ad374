"""xcross-peft on bad requests and bad inputs: an output that is an input, an existing PEFT directory's other files,
file modes, non-finite and malformed adapters, read-only outputs. Each refusal is one line and exit 2 (1 for a full
disk), and leaves every file as it was, temporaries included; PEFT itself is the reference for what was written."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.test_peft import _hf, _hidden, _ids, _llama, _peft_adapter, _randomise, _streams, _xcross_model  # noqa: E402
from xcross.cli.peft import main as peft_cli  # noqa: E402
from xcross.lora import LoRAConfig  # noqa: E402
from xcross.methods import build_model, read_adapter, save_adapter, save_trained  # noqa: E402
from xcross.peft import HEAD_FILE, PEFT_CONFIG, PEFT_WEIGHTS, export_peft  # noqa: E402
from xcross.settings import ModelConfig, RunConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LORA_KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"  # any tensor PEFT writes will do


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama model directory, saved by transformers."""
    torch.manual_seed(0)
    model = _llama()
    _randomise(model.parameters(), 0, 0.2)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every entry under `directory` (hidden temporaries included) with its bytes; a directory as b"<dir>"."""
    return {str(p.relative_to(directory)): b"<dir>" if p.is_dir() else p.read_bytes()
            for p in sorted(directory.rglob("*"))}


def _one_line(err: str, *phrases: str) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


def _refused(capsys, argv: list[str], *phrases: str, code: int = 2) -> str:
    capsys.readouterr()  # what setting up wrote (transformers' progress bars)
    got = peft_cli(argv)
    err = capsys.readouterr().err
    assert got == code, err
    _one_line(err, *phrases)
    return err


def _import_argv(peft_dir, out, base) -> list[str]:
    return ["import", str(peft_dir), str(out), "--model-dir", str(base)]


def _never(*args, **kwargs):
    raise AssertionError("an input was read before the output was checked")


# -- 1. no command writes over what it reads --------------------------------------------------------------------------


def test_import_refuses_an_output_that_is_one_of_its_inputs(base, tmp_path, capsys, monkeypatch):
    _peft_adapter(base, tmp_path / "peft")
    weights = tmp_path / "peft" / PEFT_WEIGHTS
    os.link(weights, tmp_path / "hard.safetensors")
    (tmp_path / "sym.safetensors").symlink_to(weights)
    (tmp_path / "base-config.json").symlink_to(base / "config.json")
    monkeypatch.chdir(tmp_path)
    before, base_before = _snapshot(tmp_path), _snapshot(base)
    monkeypatch.setattr("xcross.cli.peft.read_peft_adapter", _never)  # refused before any work
    outs = [weights, tmp_path / "peft" / ".." / "peft" / PEFT_WEIGHTS, Path("peft/./adapter_model.safetensors"),
            tmp_path / "hard.safetensors", tmp_path / "sym.safetensors", tmp_path / "peft" / PEFT_CONFIG,
            base / "model.safetensors", tmp_path / "base-config.json"]
    for out in outs:
        _refused(capsys, _import_argv("peft", out, base), str(Path(out).absolute()), "which this command reads")
    _refused(capsys, _import_argv("peft", "peft", base), "is a directory")
    assert _snapshot(tmp_path) == before and _snapshot(base) == base_before


def test_export_refuses_an_output_directory_that_is_or_holds_its_input(base, tmp_path, capsys):
    out = tmp_path / "out"
    _peft_adapter(base, out)  # a PEFT directory, which export may write into ...
    save_adapter(_xcross_model(base), out / "a.safetensors")  # ... but not while it holds the input
    save_adapter(_xcross_model(base, seed=6), tmp_path / "b.safetensors")
    (tmp_path / "link").symlink_to(out)
    before = _snapshot(tmp_path)
    for adapter, out_dir in ((out / "a.safetensors", out), (out / "a.safetensors", tmp_path / "link"),
                             (tmp_path / "link" / "a.safetensors", out),
                             (tmp_path / "b.safetensors", tmp_path / "b.safetensors")):
        _refused(capsys, ["export", str(adapter), str(out_dir)], "is or holds the input", "which this command reads")
    assert _snapshot(tmp_path) == before
    os.link(tmp_path / "b.safetensors", out / HEAD_FILE)  # the file export would replace is the input
    before = _snapshot(tmp_path)
    _refused(capsys, ["export", str(tmp_path / "b.safetensors"), str(out)], "is or holds the input")
    assert _snapshot(tmp_path) == before


def test_export_of_a_merge_run_refuses_to_write_into_its_source(base, tmp_path, capsys, monkeypatch):
    """A merge run is rebuilt from its sources; a PEFT source directory is not where its export may go."""
    export_peft(_xcross_model(base, seed=5), tmp_path / "source")
    save_adapter(_xcross_model(base, seed=6), tmp_path / "other.safetensors")
    sources = [tmp_path / "source", tmp_path / "other.safetensors"]
    lora = LoRAConfig.from_dict(read_adapter(tmp_path / "other.safetensors")[2]["lora"])
    config = RunConfig(target="tools", method="merge",
                       model=ModelConfig(model_dir=str(base), lora=lora, head_init="fresh"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    save_trained(build_model(base, "merge", sources, head_init="fresh"), run / "best.safetensors", "merge", sources,
                 {"domain": "tools"})
    before = _snapshot(tmp_path)
    monkeypatch.setattr("xcross.cli.peft.load_decoder", _never)
    _refused(capsys, ["export", str(run), str(tmp_path / "source")], "is or holds the input",
             str(tmp_path / "source" / PEFT_CONFIG))
    _refused(capsys, ["export", str(run), str(run)], "is or holds the input")
    assert _snapshot(tmp_path) == before


# -- 2. no command deletes a file it did not write ---------------------------------------------------------------------


def test_export_into_a_peft_directory_keeps_its_other_files(base, tmp_path, capsys):
    out = tmp_path / "out"
    _peft_adapter(base, out)  # PEFT's save_pretrained writes a README.md model card beside its two files
    assert (out / "README.md").is_file()
    (out / "notes.txt").write_text("mine")
    kept = {name: (out / name).read_bytes() for name in ("README.md", "notes.txt")}
    ours = _xcross_model(base)
    save_adapter(ours, tmp_path / "a.safetensors")
    assert peft_cli(["export", str(tmp_path / "a.safetensors"), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*kept, PEFT_CONFIG, PEFT_WEIGHTS, HEAD_FILE])
    assert {name: (out / name).read_bytes() for name in kept} == kept
    theirs = peft.PeftModel.from_pretrained(_hf(base), out).eval()  # the new adapter, not the one PEFT saved
    torch.testing.assert_close(_hidden(theirs, _ids()), _streams(ours, _ids()), atol=1e-5, rtol=0)
    # An adapter without a head (PEFT's own) takes the earlier export's head away: it belonged to another adapter.
    _peft_adapter(base, tmp_path / "peft")
    export_peft(tmp_path / "peft", out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*kept, PEFT_CONFIG, PEFT_WEIGHTS])
    assert {name: (out / name).read_bytes() for name in kept} == kept
    exported, saved = load_file(out / PEFT_WEIGHTS), load_file(tmp_path / "peft" / PEFT_WEIGHTS)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    # A directory that is not a PEFT adapter's is still refused, whole.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _refused(capsys, ["export", str(tmp_path / "a.safetensors"), str(tmp_path / "busy")], "not a PEFT adapter")
    assert _snapshot(tmp_path / "busy") == {"notes.txt": b"mine"}


def test_a_full_disk_during_export_leaves_the_directory_as_it_was(base, tmp_path, capsys, monkeypatch):
    save_adapter(_xcross_model(base, seed=5), tmp_path / "a.safetensors")
    export_peft(tmp_path / "a.safetensors", tmp_path / "out")
    before = _snapshot(tmp_path / "out")
    save_adapter(_xcross_model(base, seed=6), tmp_path / "b.safetensors")

    def full(path, *args):  # the head is written after the weights: a half-written head, then no space
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("xcross.peft.save_tensors", full)
    _refused(capsys, ["export", str(tmp_path / "b.safetensors"), str(tmp_path / "out")], "No space left",
             code=1)
    assert _snapshot(tmp_path / "out") == before  # the new weights, written first, did not replace the old
    _refused(capsys, ["export", str(tmp_path / "b.safetensors"), str(tmp_path / "new" / "out")], code=1)
    assert not (tmp_path / "new").exists()


# -- 3. file modes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_have_the_mode_of_a_plain_file(base, tmp_path, umask):
    save_adapter(_xcross_model(base), tmp_path / "a.safetensors")
    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):  # the reference: what any program's new file gets here
            pass
        assert peft_cli(["export", str(tmp_path / "a.safetensors"), str(tmp_path / "out")]) == 0
        assert peft_cli(["export", str(tmp_path / "a.safetensors"), str(tmp_path / "out")]) == 0  # replacing
    finally:
        os.umask(previous)
    want = (tmp_path / "plain").stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()} == \
        {name: oct(want) for name in (PEFT_CONFIG, PEFT_WEIGHTS, HEAD_FILE)}


# -- 4. bad adapters, refused by name ----------------------------------------------------------------------------------


def _rewrite(path: Path, key: str, change) -> None:
    """Save `path` again with `change` applied to one tensor, its metadata kept."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_by_file_and_tensor(base, tmp_path, capsys, value):
    _peft_adapter(base, tmp_path / "peft")
    weights = tmp_path / "peft" / PEFT_WEIGHTS
    _rewrite(weights, LORA_KEY, lambda t: t.index_fill_(1, torch.tensor([3]), value))
    with pytest.raises(ValueError, match=f"{weights} has non-finite values in {LORA_KEY}"):
        read_adapter(tmp_path / "peft")
    _refused(capsys, _import_argv(tmp_path / "peft", tmp_path / "a.safetensors", base),
             f"{weights} has non-finite values in {LORA_KEY}")
    # The head export writes beside an adapter.
    export_peft(_xcross_model(base), tmp_path / "exported")
    head = tmp_path / "exported" / HEAD_FILE
    _rewrite(head, "dense.weight", lambda t: t.fill_(value))
    _refused(capsys, _import_argv(tmp_path / "exported", tmp_path / "a.safetensors", base),
             f"{head} has non-finite values in dense.weight")
    # An xcross adapter file is not exported with one either (PEFT would load it without a word).
    save_adapter(_xcross_model(base), tmp_path / "b.safetensors")
    _rewrite(tmp_path / "b.safetensors", "head.out.bias", lambda t: t.fill_(value))
    _refused(capsys, ["export", str(tmp_path / "b.safetensors"), str(tmp_path / "out")],
             f"{tmp_path / 'b.safetensors'} has non-finite values in head.out.bias")
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, phrases", [
    (lambda c: {k: v for k, v in c.items() if k != "r"}, ["has no 'r'"]),
    (lambda c: {k: v for k, v in c.items() if k != "lora_alpha"}, ["has no 'lora_alpha'"]),
    (lambda c: {**c, "r": "4"}, ['r must be a positive integer, not "4"']),
    (lambda c: {**c, "r": 0}, ["r must be a positive integer, not 0"]),
    (lambda c: {**c, "r": 4.5}, ["r must be a positive integer"]),
    (lambda c: {**c, "lora_alpha": "8"}, ['lora_alpha must be a finite number, not "8"']),
    (lambda c: {**c, "lora_alpha": True}, ["lora_alpha must be a finite number, not true"]),
    (lambda c: {**c, "lora_dropout": "0.1"}, ["lora_dropout must be a number from 0 to 1"]),
    (lambda c: {**c, "use_rslora": "yes"}, ["use_rslora must be true or false"]),
    (lambda c: json.dumps(c)[:40], ["is not valid JSON", "line 1 column"]),
    (lambda c: '{"r": 4,\n "lora_alpha": 8,,\n}', ["is not valid JSON", "line 2 column 18"]),
    (lambda c: [c], ["is not a JSON object"]),
    (lambda c: b"\xff\xfe\x00{", ["is not valid JSON"]),
], ids=["no-r", "no-alpha", "r-string", "r-zero", "r-float", "alpha-string", "alpha-bool", "dropout-string",
        "rslora-string", "truncated", "malformed", "a-list", "not-utf8"])
def test_bad_adapter_config_is_one_line_naming_file_and_key(base, tmp_path, capsys, edit, phrases):
    _peft_adapter(base, tmp_path / "peft")
    path = tmp_path / "peft" / PEFT_CONFIG
    changed = edit(json.loads(path.read_text()))
    path.write_bytes(changed if isinstance(changed, bytes) else
                     (changed if isinstance(changed, str) else json.dumps(changed)).encode())
    with pytest.raises(ValueError, match=str(path)):
        read_adapter(tmp_path / "peft")
    _refused(capsys, _import_argv(tmp_path / "peft", tmp_path / "a.safetensors", base), str(path), *phrases)
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("keep", [0.5, 100, 4, 0], ids=["half", "in-header", "length-only", "empty"])
def test_truncated_safetensors_are_one_line_naming_the_file(base, tmp_path, capsys, keep):
    export_peft(_xcross_model(base), tmp_path / "peft")
    save_adapter(_xcross_model(base), tmp_path / "b.safetensors")
    for path in (tmp_path / "peft" / PEFT_WEIGHTS, tmp_path / "peft" / HEAD_FILE, tmp_path / "b.safetensors"):
        whole = path.read_bytes()
        path.write_bytes(whole[:int(len(whole) * keep) if isinstance(keep, float) else keep])
        if path.name == "b.safetensors":
            _refused(capsys, ["export", str(path), str(tmp_path / "out")], f"{path} is not a complete safetensors")
        else:
            _refused(capsys, _import_argv(tmp_path / "peft", tmp_path / "a.safetensors", base),
                     f"{path} is not a complete safetensors")
        path.write_bytes(whole)
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "out").exists()


# -- 5. read-only outputs ----------------------------------------------------------------------------------------------


def _unprivileged() -> tuple[str, ...]:
    """A command prefix under which permissions hold: root writes through them unless it drops that capability."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")


def test_read_only_outputs_are_refused_in_one_line(base, tmp_path):
    prefix = _unprivileged()
    _peft_adapter(base, tmp_path / "peft")
    save_adapter(_xcross_model(base), tmp_path / "a.safetensors")
    export_peft(tmp_path / "a.safetensors", tmp_path / "exported")
    (tmp_path / "ro").mkdir()

    def run(*argv) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, sys.executable, "-m", "xcross.cli.peft", *map(str, argv)],
                              cwd=REPO, capture_output=True, text=True, timeout=300, check=False)

    def refused(done: subprocess.CompletedProcess, *phrases: str) -> None:
        assert done.returncode == 2, (done.returncode, done.stderr)
        _one_line(done.stderr, *phrases)

    (tmp_path / "ro").chmod(0o555)
    (tmp_path / "exported").chmod(0o555)
    before = _snapshot(tmp_path)
    try:
        refused(run(*_import_argv(tmp_path / "peft", tmp_path / "ro" / "a.safetensors", base)),
                f"{tmp_path / 'ro'} is not writable")
        refused(run(*_import_argv(tmp_path / "peft", tmp_path / "ro" / "sub" / "a.safetensors", base)),
                f"{tmp_path / 'ro'} is not writable")
        refused(run("export", tmp_path / "a.safetensors", tmp_path / "ro" / "out"),
                f"{tmp_path / 'ro'} is not writable")
        # An existing PEFT directory that is read-only is not replaced behind its back either.
        refused(run("export", tmp_path / "a.safetensors", tmp_path / "exported"),
                f"{tmp_path / 'exported'} is not writable")
        assert _snapshot(tmp_path) == before  # nothing written, no temporaries
    finally:
        (tmp_path / "ro").chmod(0o755)
        (tmp_path / "exported").chmod(0o755)
