"""The config is discoverable and fails fast: key table in --help, `toolkit config`, checks before torch."""

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, run_toolkit
from toolkit.config import load_config, valid_keys
from toolkit.config_docs import keys


def imported_modules(*args, cwd=ROOT) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m toolkit ARGS`; -> (the process, every module it imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "toolkit", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "toolkit.cli" in modules  # the -X importtime lines were read
    return proc, modules


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]


def test_every_key_has_a_comment_and_the_help_shows_it_with_its_default():
    documented = keys()
    assert [k for k, _, _ in documented] == valid_keys()
    assert not [k for k, _, c in documented if not c], "give each field in config/schema.py a trailing comment"
    help_text = run_toolkit("train", "--help").stdout
    line = next(line for line in help_text.splitlines() if line.strip().startswith("optim.lr="))
    assert line.split()[0] == "optim.lr=0.05" and "peak learning rate, reached after warmup" in line
    for key, _, comment in documented:
        assert any(row.strip().startswith(f"{key}=") and row.rstrip().endswith(comment)
                   for row in help_text.splitlines()), key
    assert "data.mean=0.485,0.456,0.406" in help_text and 'train.resume=""' in help_text  # as typed on a command line


def test_config_prints_yaml_that_train_takes_back_unchanged(tmp_path):
    args = [ROOT / "configs/cifar10.yaml", "optim.lr=0.1", "data.mean=0.5,0.4,0.3", "train.log_with=tensorboard",
            "name='a #b'"]
    first = run_toolkit("config", *args).stdout
    (tmp_path / "resolved.yaml").write_text(first)
    expected = load_config(args[0], args[1:])
    assert load_config(tmp_path / "resolved.yaml") == expected  # what train loads, nothing lost
    again = run_toolkit("config", tmp_path / "resolved.yaml").stdout
    assert again.splitlines()[1:] == first.splitlines()[1:]  # byte for byte, but the line naming the source
    assert yaml.safe_load(first)["optim"]["lr"] == 0.1
    assert "  lr: 0.1  # peak learning rate, reached after warmup" in first.splitlines()


def test_a_bad_key_fails_before_torch_is_imported():
    proc, modules = imported_modules("train", "configs/quickstart.yaml", "optim.lrr=1")
    assert proc.returncode == 2
    assert errors(proc) == ["error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"]
    assert "torch" not in modules and "numpy" not in modules


def test_a_bad_model_name_fails_before_torch_and_before_the_data(tmp_path):
    root = tmp_path / "cifar"  # would be downloaded into, were the data touched
    proc, modules = imported_modules("train", "configs/cifar10.yaml", "model.arch=resnet_smal", f"data.root={root}")
    assert proc.returncode == 2
    assert errors(proc) == ["error: unknown model.arch 'resnet_smal'; did you mean 'resnet_small'? "
                            "(`toolkit models` lists them; a timm model of that name: timm/resnet_smal)"]
    assert "torch" not in modules and not root.exists()
    proc, modules = imported_modules("config", "configs/quickstart.yaml", "model.arch=tutorial_net_bm")
    assert "did you mean 'tutorial_net_bn'" in errors(proc)[-1] and "torch" not in modules
    # a name far from every built-in one may be a timm model: asked of timm (torch), still before any data
    proc = run_toolkit("train", "configs/cifar10.yaml", "model.arch=nosuchnet", f"data.root={root}", check=False,
                       cwd=ROOT)
    assert proc.returncode == 2 and "unknown model.arch 'nosuchnet'" in proc.stderr and not root.exists()


def test_a_bad_timm_name_is_named():
    pytest.importorskip("timm")
    proc = run_toolkit("config", ROOT / "configs/quickstart.yaml", "model.arch=timm/resnet10x", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: unknown model.arch 'timm/resnet10x': timm has no model 'resnet10x'; "
                                   "did you mean 'timm/resnet10t'?")


@pytest.mark.parametrize("args", [["--help"], ["models"], ["train", "--help"], ["config", "configs/quickstart.yaml"],
                                  ["completion", "bash"]])
def test_small_commands_do_not_import_torch(args):
    proc, modules = imported_modules(*args)
    assert proc.returncode == 0, errors(proc)
    assert "torch" not in modules


def test_models_lists_the_registry_without_torch():
    proc, _ = imported_modules("models")
    from toolkit.train.models import list_models

    listed = {line.split()[0]: line.split(None, 1)[1] for line in proc.stdout.splitlines()}
    assert {k: v for k, v in listed.items() if k != "timm/<name>"} == list_models()


def test_bash_completion_completes_commands_options_and_config_keys(tmp_path):
    script = tmp_path / "toolkit.bash"
    script.write_text(run_toolkit("completion", "bash").stdout)
    probe = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _toolkit; '
             'printf "%s\\n" "${COMPREPLY[@]}"')

    def complete(*words):
        proc = subprocess.run(["bash", "-c", probe, "_", str(script), *words], capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert complete("toolkit", "conf") == ["config"]
    assert complete("toolkit", "train", "optim.l") == ["optim.lr="]
    assert complete("toolkit", "--debug", "config", "x.yaml", "data.batch") == ["data.batch_size="]
    assert complete("toolkit", "export", "--min") == ["--min-agreement"]
    assert complete("toolkit", "predict", "optim.l") == []  # config keys only where a config is read


def test_train_from_python_checks_the_model_before_the_data(tmp_path):
    from toolkit import UserError
    from toolkit.train import train

    root = tmp_path / "shapes"  # generated on first use, were the data touched
    cfg = load_config(None, ["model.arch=resnet_smal", f"data.root={root}", f"train.out_dir={tmp_path}"])
    with pytest.raises(UserError, match="did you mean 'resnet_small'"):
        train(cfg)
    assert not root.exists() and not list(tmp_path.iterdir())


def test_config_of_a_data_folder_prints_the_recipe_train_takes_back(tmp_path):
    from conftest import two_colours

    data = two_colours(tmp_path / "photos", n=6, size=16)
    first = run_toolkit("config", data, "train.epochs=3").stdout
    (tmp_path / "recipe.yaml").write_text(first)
    assert run_toolkit("config", tmp_path / "recipe.yaml").stdout.splitlines()[1:] == first.splitlines()[1:]
    assert yaml.safe_load(first)["data"]["root"] == str(data) and yaml.safe_load(first)["train"]["epochs"] == 3
