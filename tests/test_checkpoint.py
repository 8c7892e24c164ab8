import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from toolkit import UserError
from toolkit.config import load_config
from toolkit.core.meta import Meta
from toolkit.train import state, train, weights


def _state(tmp, step, keep=3):
    return state.save_state(tmp / "state", step, {"model.safetensors": {"w": torch.ones(2) * step},
                                                       "optimizer.pt": {"state": {0: {"m": torch.zeros(2)}}}},
                                 state.TrainState(step=step), keep)


def test_states_are_complete_and_only_the_newest_k_are_kept(tmp_path):
    for step in (3, 6, 9, 12):
        _state(tmp_path, step, keep=2)
    assert [p.name for p in state.list_states(tmp_path / "state")] == ["step-000000009", "step-000000012"]
    trainer, files = state.load_state(tmp_path / "state" / "step-000000012")
    assert trainer.step == 12 and torch.equal(files["model.safetensors"]["w"], torch.full((2,), 12.0))


def test_train_state_round_trips_and_reads_old_markers(tmp_path):
    st = state.TrainState(epoch=2, batch=5, step=17, best_accuracy=0.5, best_epoch=2, best_confusion=[[1, 0], [1, 2]],
                          nonfinite_skipped=1, epoch_loss=3.25, arch="tutorial_net", num_classes=2, world_size=2,
                          batch_size=8, grad_accum=2, config_hash="abc")
    assert state.TrainState.from_json(st.to_json()) == st
    # a done.json written before TrainState existed: the progress dict plus the layout keys, no arch
    old = {"epoch": 1, "batch": 3, "step": 9, "best_accuracy": 0.25, "best_epoch": 1, "best_confusion": [[1]],
           "nonfinite_skipped": 0, "nonfinite_run": 0, "epoch_loss": 1.5, "world_size": 1, "batch_size": 8,
           "grad_accum": 1, "config_hash": "x", "some_future_key": 1}
    (tmp_path / "done.json").write_text(json.dumps(old))
    read, files = state.load_state(tmp_path)
    assert (read.epoch, read.batch, read.step, read.epoch_loss, read.best_confusion) == (1, 3, 9, 1.5, [[1]])
    assert read.arch is None and read.num_classes is None and files == {}
    assert json.loads(st.to_json())["nonfinite_skipped"] == 1  # the keys of done.json stay the field names


def test_a_half_written_state_is_never_picked(tmp_path):
    _state(tmp_path, 5)
    half = tmp_path / "state" / "step-000000010"  # crashed before its done marker
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "state" / ".tmp-step-000000011-123").mkdir()  # crashed before the rename
    assert state.find_state("auto", tmp_path).name == "step-000000005"
    assert state.find_state(str(tmp_path), tmp_path).name == "step-000000005"  # a run dir
    assert state.find_state("", tmp_path) is None
    with pytest.raises(UserError, match="does not exist"):
        state.find_state(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(UserError, match="not a complete resume state"):
        state.load_state(half)


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "done.json"])
def test_a_corrupted_state_file_is_named(tmp_path, victim):
    path = _state(tmp_path, 7)
    (path / victim).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match=f"'{path / victim}' is damaged"):
        state.load_state(path)


def test_corrupted_or_foreign_weights_are_named(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(os.urandom(100))
    with pytest.raises(UserError, match="w.safetensors' is not a readable safetensors file"):
        weights.load_weights(tmp_path / "w.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="has no toolkit metadata"):
        weights.load_weights(tmp_path / "plain.safetensors")


def test_weights_with_nan_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    meta = Meta("tutorial_net", ["a", "b"], 32, "squash", [0.5] * 3, [0.5] * 3)
    with pytest.raises(weights.NonFiniteWeights, match="weight.*NaN or Inf"):
        weights.save_weights(model, meta, tmp_path / "w.safetensors")
    assert not list(tmp_path.iterdir())


def test_wrapper_prefixes_are_stripped():
    state = {"module.a": torch.ones(1), "_orig_mod.b": torch.ones(1), "module._orig_mod.c": torch.ones(1),
             "x._orig_mod.y": torch.ones(1)}
    assert sorted(weights.clean_state_dict(state)) == ["a", "b", "c", "x.y"]


def test_unknown_meta_schema_is_a_clear_error(tmp_path):
    meta = json.loads(Meta("a", ["x"], 8, "squash", [0] * 3, [1] * 3).to_json())
    meta["schema"] = 99
    with pytest.raises(UserError, match="schema version 99"):
        Meta.from_json(json.dumps(meta))


def test_resume_from_a_damaged_state_names_the_file(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    newest = state.list_states(run / "state")[-1]
    (newest / "optimizer.pt").write_bytes(b"not a torch file")
    cfg = load_config(run / "config.yaml", [f"train.resume={run}", f"train.out_dir={tmp_path}", "name=other"])
    with pytest.raises(UserError, match="optimizer.pt' is damaged"):
        train(cfg)


UNSAFE_CALLS = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "pickle.Unpickler",
                "marshal.load", "marshal.loads", "shelve.open", "yaml.unsafe_load", "yaml.full_load", "dill.load",
                "dill.loads", "joblib.load", "torch.jit.load", "torch.hub.load", "torch.package.PackageImporter",
                "CIFAR10", "CIFAR100"}  # the last two: torchvision's datasets unpickle whatever the files name


def test_no_unsafe_deserialisation_in_the_package():
    """No eval/exec/unpickling anywhere in the package (every subpackage); torch.load only with weights_only=True,
    np.load only with allow_pickle=False, yaml.load only with a safe loader; an Unpickler subclass must restrict
    find_class."""
    import ast

    files = sorted((Path(__file__).parents[1] / "toolkit").rglob("*.py"))
    assert len(files) > 30  # the subpackages are walked, not only the top level
    for path in files:
        tree = ast.parse(path.read_text())
        where = path.relative_to(path.parents[2])
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any("Unpickler" in ast.unparse(b) for b in node.bases):
                assert any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body), \
                    f"{where}: {node.name} unpickles without restricting find_class"
                continue
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert name not in UNSAFE_CALLS and name.rsplit(".", 1)[-1] not in ("CIFAR10", "CIFAR100"), \
                f"{where}: {name}"
            if name == "torch.load":
                assert kw.get("weights_only") == "True", f"{where}: torch.load without weights_only=True"
            if name in ("np.load", "numpy.load"):
                assert kw.get("allow_pickle") == "False", f"{where}: np.load without allow_pickle=False"
            if name == "yaml.load":
                assert "Safe" in kw.get("Loader", ""), f"{where}: yaml.load without a safe loader"


class _Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def unpickled_globals():
    """Every global any pickle.Unpickler resolves while the test runs (the 'pickle.find_class' audit event),
    whoever calls it: toolkit or a library it hands a user file to."""
    import sys

    seen = []
    if not hasattr(sys, "_toolkit_test_audit"):
        sys._toolkit_test_audit = []
        sys.addaudithook(lambda event, args: sys._toolkit_test_audit[-1].append(args)
                         if event == "pickle.find_class" and sys._toolkit_test_audit else None)
    sys._toolkit_test_audit.append(seen)
    yield seen
    sys._toolkit_test_audit.pop()


def _hostile_cifar(tmp_path, marker):
    from test_data import _write_cifar

    _write_cifar(tmp_path / "cifar")
    with open(tmp_path / "cifar" / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": _Payload(marker)}, f)
    cfg = load_config(None, ["data.kind=cifar10", f"data.root={tmp_path / 'cifar'}", "data.download=false"])
    from toolkit.train import data

    data.load_dataset(cfg.data, 0)


def _hostile_state(tmp_path, marker):
    path = _state(tmp_path, 3)
    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump(_Payload(marker), f)
    state.load_state(path)


def _hostile_cache_entry(tmp_path, marker):
    import numpy as np
    from PIL import Image

    from toolkit.train import cache

    files = []
    for i in range(2):
        files.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 8)).save(files[-1])
    cfg = load_config(None, [f"data.cache_dir={tmp_path / 'c'}", "data.image_size=8"]).data
    cache.decode_cached(files, cfg, workers=1)  # in this process: worker IPC would unpickle our own objects
    entry = tmp_path / "c" / cache.fingerprint(files, cfg)
    np.save(entry / "ok.npy", np.array([_Payload(marker)] * 2, dtype=object), allow_pickle=True)
    record = json.loads((entry / "done").read_text())  # a marker that agrees, so the file itself is loaded
    record["arrays"]["ok.npy"]["bytes"] = (entry / "ok.npy").stat().st_size
    (entry / "done").write_text(json.dumps(record))
    cache.decode_cached(files, cfg, workers=1)


def _hostile_config(tmp_path, marker):
    (tmp_path / "c.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    load_config(tmp_path / "c.yaml")


def _hostile_weights_header(tmp_path, marker):
    import struct

    from toolkit.core.meta import read_meta

    header = json.dumps({"__metadata__": {"toolkit_meta": "!!python/object/apply:os.system ['touch x']"}}).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    read_meta(tmp_path / "w.safetensors")


@pytest.mark.parametrize("door", [_hostile_cifar, _hostile_state, _hostile_cache_entry, _hostile_config,
                                  _hostile_weights_header])
def test_no_door_runs_code_from_a_user_file(door, tmp_path, unpickled_globals):
    """A file naming code, handed to each reader the toolkit has: refused or ignored, never run, and no
    unpickler anywhere (toolkit's or a library's) resolves a global outside the CIFAR reader's list."""
    from toolkit.train.datasets.cifar import ALLOWED

    marker = tmp_path / "ran"
    try:
        door(tmp_path, marker)
    except UserError:
        pass
    assert not marker.exists()
    assert {tuple(g) for g in unpickled_globals} <= ALLOWED, unpickled_globals


def test_read_meta_without_loading_weights(tiny_run, tmp_path):
    from toolkit.core.meta import read_meta
    from toolkit.export import export

    _, full = weights.load_weights(tiny_run / "best.safetensors")
    assert read_meta(tiny_run) == full  # the run directory -> best.safetensors header
    onnx_meta = read_meta(export(tiny_run, tmp_path / "m.onnx"))
    assert onnx_meta.class_names == full.class_names and onnx_meta.normalize_in_graph
    (tmp_path / "junk.safetensors").write_bytes(b"\x05" * 20)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        read_meta(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="no model at"):
        read_meta(tmp_path / "nothing")


# --- resume edge cases --------------------------------------------------------------------


def test_resume_path_continues_that_run_and_a_finished_run_resumes_cleanly(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "r" / "quickstart"
    shutil.copytree(tiny_run, run)
    with open(run / "metrics.jsonl", "a") as f:  # killed after logging an epoch, before saving its state
        f.write(json.dumps({"epoch": 99, "val_accuracy": 0.0}) + "\n")
    before = (run / "best.safetensors").read_bytes()
    cfg = load_config(run / "config.yaml", [f"train.resume={run}", f"train.out_dir={tmp_path / 'elsewhere'}"])
    assert train(cfg) == run  # the same folder, not a new one
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]  # nothing ran again; the record of the lost epoch is gone
    assert (run / "best.safetensors").read_bytes() == before and (run / "report" / "report.md").is_file()


def test_resume_with_another_model_is_one_line(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "quickstart"
    shutil.copytree(tiny_run, run)
    cfg = load_config(run / "config.yaml", ["train.resume=auto", f"train.out_dir={tmp_path}", "model.arch=resnet_small",
                                            "train.epochs=4"])
    with pytest.raises(UserError, match="is for model tutorial_net_bn with 10 classes; this run has resnet_small"):
        train(cfg)


def test_resume_position_follows_a_new_batch_layout():
    from types import SimpleNamespace

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    files = {"optimizer.pt": opt.state_dict(), "rng.pt": {}}
    cfg = load_config(None, ["data.batch_size=8", "train.grad_accum=2"])
    st = state.TrainState(batch=6, world_size=1, batch_size=8)
    state.restore_resume(SimpleNamespace(num_processes=2, process_index=0, scaler=None), opt, files, st, cfg)
    assert st.batch == 2  # 48 samples seen = 3 batches of 2 x 8, rounded down to whole optimizer steps


def test_speedrun_net_resumes(tmp_path):
    """Its data-dependent init runs on a fresh start only: a resumed run ends with the uninterrupted run's weights."""
    import shutil

    from conftest import two_colours

    data = two_colours(tmp_path / "d", n=8, size=16)
    args = ["data.kind=imagefolder", f"data.root={data}", "data.image_size=16", "data.batch_size=4",
            "model.arch=speedrun_net", f"train.out_dir={tmp_path}", "train.progress=false", "train.epochs=2"]
    whole = train(load_config(None, args + ["name=whole"]))
    run = tmp_path / "cut"
    shutil.copytree(whole, run)
    shutil.rmtree(state.list_states(run / "state")[-1])  # as if killed right after epoch 1's state
    assert train(load_config(None, args + ["name=cut", "train.resume=auto"])) == run
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    a, b = weights.load_weights(whole / "last.safetensors")[0], weights.load_weights(run / "last.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_loads_the_states_weights_optimizer_and_position(tiny_run, tmp_path):
    """The set-up of a resumed run holds exactly what the state saved (fast: no training step)."""
    import shutil

    import toolkit.train.rundir as rundir
    import toolkit.train.setup as setup

    run = tmp_path / "quickstart"
    shutil.copytree(tiny_run, run)
    newest = state.list_states(run / "state")[-1]
    saved, files = state.load_state(newest)
    cfg = load_config(run / "config.yaml", ["train.resume=auto", f"train.out_dir={tmp_path}", "train.epochs=4"])
    accelerator, run_dir, lock = rundir.start(cfg)
    with lock:
        r = setup.set_up(cfg, accelerator, run_dir)
    try:
        model = r.raw_model.state_dict()
        assert files["model.safetensors"].keys() == model.keys()
        assert all(torch.equal(files["model.safetensors"][k], model[k]) for k in model)
        from toolkit.train.models import create_model

        fresh = create_model(cfg.model.arch, 10, cfg.data.image_size).state_dict()
        assert not all(torch.equal(fresh[k], model[k]) for k in model)  # a fresh model would not pass
        have = [t for s in r.optimizer.state_dict()["state"].values() for t in s.values()]
        want = [t for s in files["optimizer.pt"]["state"].values() for t in s.values()]
        assert len(have) == len(want) > 0 and all(torch.equal(h, w) for h, w in zip(have, want))
        assert (r.state.epoch, r.state.step, r.state.best_accuracy) == (saved.epoch, saved.step, saved.best_accuracy)
        assert r.state.epoch == 3 and r.state.step > 0
    finally:
        rundir.finish(r.accelerator)


def test_a_resumed_run_names_the_settings_that_changed(tiny_run, tmp_path, caplog):
    """The resume state records its settings: the warning names what changed, and a setting added to the
    toolkit after the state was saved counts as unchanged while it holds its default."""
    import json
    import shutil

    import toolkit.train.rundir as rundir
    import toolkit.train.setup as setup

    def warnings_of(overrides: list[str]) -> list[str]:
        cfg = load_config(original, ["train.resume=auto", f"train.out_dir={tmp_path}", *overrides])
        caplog.clear()
        accelerator, run_dir, lock = rundir.start(cfg)
        with caplog.at_level("WARNING", logger="toolkit"), lock:
            r = setup.set_up(cfg, accelerator, run_dir)
        rundir.finish(r.accelerator)
        return [rec.getMessage() for rec in caplog.records if "resuming" in rec.getMessage()]

    run = tmp_path / "quickstart"
    shutil.copytree(tiny_run, run)
    original = shutil.copy(run / "config.yaml", tmp_path / "original.yaml")  # a resumed run rewrites config.yaml
    done = state.list_states(run / "state")[-1] / "done.json"
    saved = json.loads(done.read_text())
    epochs, lr = saved["config"]["train"]["epochs"], saved["config"]["optim"]["lr"]
    [line] = warnings_of([f"train.epochs={epochs + 2}", "optim.lr=0.0123"])
    assert line.endswith(f"with changed settings: optim.lr {lr} -> 0.0123; train.epochs {epochs} -> {epochs + 2}")

    del saved["config"]["data"]["mixup"]  # a state saved before data.mixup existed
    done.write_text(json.dumps({**saved, "config_hash": "older"}))
    assert warnings_of([]) == []  # data.mixup at its default: nothing changed
    [line] = warnings_of(["data.mixup=0.2"])
    assert line.endswith("with changed settings: data.mixup (not set) -> 0.2")

    done.write_text(json.dumps({**saved, "config_hash": "older", "config": None}))  # before settings were recorded
    [line] = warnings_of([])
    assert line.endswith("with a config that differs from the one it was saved with")
