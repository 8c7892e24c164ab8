"""Resume knows its history: a state records the class list and a fingerprint of the data it was trained on,
and which training start (branch) saved it; resume refuses another class list, and resume=auto continues the
branch that ran last, not the highest step number in the folder."""

import json
import shutil

import pytest
import torch

import toolkit.train.loop as loop
from conftest import two_colours
from toolkit import UserError
from toolkit.config import load_config
from toolkit.core.metrics import read_records
from toolkit.train import state, train
from toolkit.train.state import TrainState


def _args(data, out, *extra):
    return ["data.kind=imagefolder", f"data.root={data}", "data.image_size=16", "data.batch_size=8",
            "model.arch=tutorial_net", f"train.out_dir={out}", "name=r", "train.progress=false", "train.keep_states=5",
            *extra]


@pytest.mark.parametrize("change", ["rename", "swap_order", "add"])
def test_resume_refuses_another_class_list_in_one_line(tmp_path, change):
    data = two_colours(tmp_path / "d", n=8, size=16)  # classes blue, red
    run = train(load_config(None, _args(data, tmp_path, "train.epochs=1")))
    for split in ("train", "val"):
        if change == "rename":  # same count, another name (and another order)
            shutil.move(data / split / "blue", data / split / "zebra")
        elif change == "swap_order":  # the same images under each other's names: labels permuted
            shutil.move(data / split / "blue", data / split / "tmp")
            shutil.move(data / split / "red", data / split / "blue")
            shutil.move(data / split / "tmp", data / split / "red")
        else:
            shutil.copytree(data / split / "red", data / split / "green")
    before = (run / "metrics.jsonl").read_bytes()
    if change == "swap_order":  # the names are the same: the fingerprint of files and labels tells
        cfg = load_config(None, _args(data, tmp_path, "train.epochs=2", "train.resume=auto"))
        train(cfg)  # allowed, with a warning (tested below); what matters here is the class-list case
        return
    with pytest.raises(UserError, match=r"was trained with the class list \[blue, red\]; the data now gives") as e:
        train(load_config(None, _args(data, tmp_path, "train.epochs=2", "train.resume=auto")))
    assert "\n" not in str(e.value)
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing written


def test_changed_files_under_the_same_classes_resume_with_a_warning(tmp_path, caplog):
    data = two_colours(tmp_path / "d", n=8, size=16)
    train(load_config(None, _args(data, tmp_path, "train.epochs=1")))
    (data / "train" / "red" / "0.png").unlink()
    train(load_config(None, _args(data, tmp_path, "train.epochs=2", "train.resume=auto")))
    assert any("the training data changed since" in r.getMessage() for r in caplog.records)


def _save(state_dir, step, branch):
    return state.save_state(state_dir, step, {"model.safetensors": {"w": torch.zeros(1)}},
                            TrainState(step=step, branch=branch), keep=2)


def test_auto_picks_the_newest_state_of_the_last_started_branch(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    state.start_branch(run, "a", None)
    for step in (10, 20, 30):
        _save(run / "state", step, "a")
    assert [p.name for p in state.list_states(run / "state")] == ["step-000000020", "step-000000030"]
    state.start_branch(run, "b", run / "state" / "step-000000020")  # resume=<older state>, new settings
    assert state.find_state("auto", run).name == "step-000000020"  # b saved nothing yet: where it started
    _save(run / "state", 25, "b")
    assert state.find_state("auto", run).name == "step-000000025"  # not a's step 30
    assert state.find_state(str(run), run).name == "step-000000025"  # a run folder given as train.resume
    _save(run / "state", 28, "b")
    names = [p.name for p in state.list_states(run / "state")]
    assert names == ["step-000000025", "step-000000028", "step-000000030"]  # a's 20 is superseded; its 30 waits
    (run / "history.jsonl").write_bytes((run / "history.jsonl").read_bytes() + b'{"branch": "c", "par')  # torn
    assert state.find_state("auto", run).name == "step-000000028"


def test_an_abandoned_branch_is_not_continued_after_a_crash(tmp_path, monkeypatch):
    """The reported sequence: a run, a resume from an older state with new settings that crashes, resume=auto."""
    data = two_colours(tmp_path / "d", n=8, size=16)
    run = train(load_config(None, _args(data, tmp_path, "train.epochs=3")))
    first = state.list_states(run / "state")[0]  # the end of epoch 1
    assert json.loads((first / "done.json").read_text())["epoch"] == 1
    real = loop.lr_at

    def crash(step, *a):
        if step == json.loads((first / "done.json").read_text())["step"] + 1:
            raise RuntimeError("crash")
        return real(step, *a)

    monkeypatch.setattr(loop, "lr_at", crash)
    with pytest.raises(RuntimeError, match="crash"):
        train(load_config(None, _args(data, tmp_path, "train.epochs=3", "optim.lr=0.01", f"train.resume={first}")))
    monkeypatch.undo()
    resumed = train(load_config(None, _args(data, tmp_path, "train.epochs=3", "optim.lr=0.01", "train.resume=auto")))
    assert resumed == run
    assert [r["epoch"] for r in read_records(run)] == [1, 2, 3]  # epochs 2 and 3 of the new branch, once each
    newest = json.loads((state.find_state("auto", run) / "done.json").read_text())
    assert newest["epoch"] == 3 and newest["parent"] == first.name and newest["class_names"] == ["blue", "red"]
