"""The command line end to end, each command in a fresh process as a user would run it."""

import csv
import json
import shlex
from pathlib import Path

import pytest

from conftest import ROOT, run_toolkit


def test_help_for_every_command_has_an_example():
    top = run_toolkit("--help").stdout
    for command in ("data", "train", "evaluate", "export", "predict", "models"):
        assert command in top
        assert "example" in run_toolkit(command, "--help").stdout


def test_models_lists_the_registry():
    out = run_toolkit("models").stdout
    assert "tutorial_net " in out and "resnet_small" in out and "timm/<name>" in out


@pytest.mark.parametrize("args, message", [
    (["train", "configs/quickstart.yaml", "optim.lrr=1"], "error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    (["train", "configs/nope.yaml"], "error: 'configs/nope.yaml' does not exist: give a config file (YAML) or a "
                                     "folder of class subfolders"),
    (["train", "my_photos"], "error: 'my_photos' does not exist: give a config file (YAML) or a folder of class "
                             "subfolders"),
    (["evaluate", "nope.onnx", "."], "error: model file 'nope.onnx' does not exist"),
    (["export", "nope/"], "error: no weights at 'nope'"),
])
def test_user_errors_are_one_line_without_traceback(args, message):
    proc = run_toolkit(*args, check=False, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in proc.stderr


def test_train_export_predict_evaluate(tmp_path):
    data = tmp_path / "shapes"
    assert run_toolkit("data", "shapes", data, "--train-per-class", 12, "--val-per-class", 5).stdout.strip() == str(data)
    proc = run_toolkit("train", ROOT / "configs/quickstart.yaml", f"data.root={data}", f"train.out_dir={tmp_path}/runs",
                       "train.epochs=2", "name=cli")
    run = Path(proc.stdout.strip().splitlines()[-1])  # the run directory is the last line
    assert run == tmp_path / "runs" / "cli" and (run / "best.safetensors").is_file()
    best = max((json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()),
               key=lambda r: r["val_accuracy"])

    onnx_path = Path(run_toolkit("export", run, "-o", tmp_path / "m.onnx").stdout.strip().splitlines()[-1])
    assert onnx_path == tmp_path / "m.onnx" and onnx_path.stat().st_size > 10_000
    card = (tmp_path / "m.README.md").read_text()  # the model card gives the exact commands behind the model
    assert shlex.join(["toolkit", "train", str(ROOT / "configs/quickstart.yaml"), f"data.root={data}",
                       f"train.out_dir={tmp_path}/runs", "train.epochs=2", "name=cli"]) in card
    assert shlex.join(["toolkit", "export", str(run), "-o", str(tmp_path / "m.onnx")]) in card

    run_toolkit("predict", onnx_path, data / "val", "-o", tmp_path / "p.csv", "--topk", "2")
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 50 and all(not r["error"] for r in rows)

    for model in (onnx_path, run):
        result = json.loads(run_toolkit("evaluate", model, data / "val", "--json").stdout)
        assert result["n"] == best["val_count"] == 50
        assert result["correct"] == round(best["val_accuracy"] * 50)
        assert set(result["per_class"]) == {p.name for p in (data / "val").iterdir()}
    assert sum(r["top1_label"] == r["path"].split("/")[0] for r in rows) == result["correct"]


@pytest.mark.parametrize("user_value", [None, "ACTIVE"])
def test_openmp_threads_sleep_while_waiting_unless_the_user_says_otherwise(user_value):
    """OMP_WAIT_POLICY is read once, when torch loads OpenMP: the command must set it before anything imports
    torch (spinning threads made small trainings 10-60x slower beside another busy process)."""
    import subprocess
    import sys

    probe = (
        "import os, sys\n"
        "seen = []\n"
        "class Probe:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and not seen:\n"
        "            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
        "sys.meta_path.insert(0, Probe())\n"
        "from toolkit.cli import main\n"
        "try:\n"
        "    main(['train', 'configs/quickstart.yaml', 'data.kind=imagefolder', 'data.root=no/such/folder'])\n"
        "finally:\n"
        "    print('at torch import:', seen)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    if user_value:
        env["OMP_WAIT_POLICY"] = user_value
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT).stdout
    assert f"at torch import: [{(user_value or 'PASSIVE')!r}]" in out


def test_every_subcommand_has_its_command():
    """parser.py defines the subcommands and commands.py runs them: the two lists name the same ones."""
    from toolkit.cli import build_parser
    from toolkit.cli.commands import COMMANDS
    from toolkit.completion import _subcommands

    assert list(_subcommands(build_parser())) == list(COMMANDS)


@pytest.mark.parametrize("command, hint", [("train", "train.resume=auto"), ("predict", "--resume"), ("models", None)])
def test_ctrl_c_says_how_to_continue(command, hint, monkeypatch, capsys):
    from toolkit.cli import COMMANDS, main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(COMMANDS, command, interrupted)
    argv = {"train": ["train", "data/x"], "predict": ["predict", "m.onnx", "photos", "-o", "p.csv"]}.get(command, [command])
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and err.startswith("interrupted")
    assert (hint in err) if hint else err == "interrupted"
