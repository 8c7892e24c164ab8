"""Bookkeeping is written like the data it describes: JSON Lines logs read tolerantly (a torn last line is cut
everywhere they are read), atomic files, and an export whose model and report never disagree after a crash."""

import hashlib
import json
import os

import pytest

from conftest import two_colours
from toolkit import UserError
from toolkit.config import load_config
from toolkit.core.files import append_jsonl, read_jsonl, write_atomic
from toolkit.core.metrics import read_records


def test_a_torn_last_line_is_left_out_and_cut_before_the_next_append(tmp_path):
    log = tmp_path / "m.jsonl"
    append_jsonl(log, {"epoch": 1})
    with open(log, "ab") as f:
        f.write(b'{"epoch": 2, "val_acc')  # killed mid-write (or the disk filled up)
    assert read_jsonl(log) == [{"epoch": 1}]
    append_jsonl(log, {"epoch": 2})
    assert log.read_bytes() == b'{"epoch": 1}\n{"epoch": 2}\n'
    with open(log, "ab") as f:
        f.write(b'{"epoch": 3, "x": \x00\x00\n')  # a last line that ends but is not JSON (a torn sector)
    assert read_jsonl(log) == [{"epoch": 1}, {"epoch": 2}]
    log.write_bytes(b'{"epoch": 1}\nnot json\n{"epoch": 3}\n')  # damage in the middle is not a torn write
    with pytest.raises(UserError, match="is damaged at line 2"):
        read_jsonl(log)
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_atomic_write_leaves_the_old_file_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    write_atomic(path, "old\n")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"cannot write '.*config.yaml' \(No space left on device"):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["config.yaml"]


def _args(data, out, *extra):
    return ["data.kind=imagefolder", f"data.root={data}", "data.image_size=16", "data.batch_size=8",
            "model.arch=tutorial_net", f"train.out_dir={out}", "name=r", "train.progress=false", *extra]


def test_resume_and_the_report_read_a_torn_metrics_log(tmp_path):
    from toolkit.train import train

    data = two_colours(tmp_path / "d", n=8, size=16)
    run = train(load_config(None, _args(data, tmp_path, "train.epochs=2")))
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"epoch": 3, "val_accur')  # SIGKILL or a full disk during the append of epoch 3
    run = train(load_config(None, _args(data, tmp_path, "train.epochs=3", "train.resume=auto")))
    assert [r["epoch"] for r in read_records(run)] == [1, 2, 3]
    assert (run / "metrics.jsonl").read_bytes().endswith(b"}\n")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"epo')
    from toolkit.train.rebuild import rebuild_report

    rebuild_report(run)  # the report reads the same log the same way
    assert "epochs run: 3" in (run / "report" / "report.md").read_text()


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("crash_at", ["model", "report"])
def test_export_model_and_report_never_disagree_after_a_crash(tiny_run, tmp_path, monkeypatch, crash_at):
    from toolkit.export import export

    out = tmp_path / "m.onnx"
    export(tiny_run, out)
    old_model = out.read_bytes()
    real_replace = os.replace

    def replace(src, dst):  # the process dies right before this rename
        if os.fspath(dst) == os.fspath(out if crash_at == "model" else out.with_suffix(".json")):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_run / "last.safetensors", out, overwrite=True)
    monkeypatch.undo()
    report = out.with_suffix(".json")
    if report.exists():  # whatever is left, a report never describes another file than the model beside it
        assert json.loads(report.read_text())["file"]["sha256"] == _sha(out)
    assert out.read_bytes() == old_model if crash_at == "model" else out.read_bytes() != old_model
    assert not report.exists()  # the old report went before the new model came
    export(tiny_run / "last.safetensors", out, overwrite=True)  # and the next export completes the pair
    assert json.loads(report.read_text())["file"]["sha256"] == _sha(out)
