"""One writer per output: the lock itself, and every door that writes (predict -o, export -o, a training run)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import run_toolkit
from toolkit.core.lock import Busy, Lock, lock_path, remove_stale_temps
from toolkit.export import export
from toolkit.predict import predict, table


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def hold_in_another_process(path):
    """A live process holding Lock(path); -> the Popen (kill it to let go)."""
    code = ("import sys, time; from toolkit.core.lock import Lock; Lock(sys.argv[1], 'x').acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_refuses_a_second_writer_naming_the_owner(tmp_path):
    path = tmp_path / ".out.lock"
    owner = hold_in_another_process(path)
    try:
        with pytest.raises(Busy, match=f"output 'o' is being written by process {owner.pid} on "):
            Lock(path, "output 'o'").acquire()
    finally:
        owner.kill()
        owner.wait()
    with Lock(path, "output 'o'"):  # its owner is gone: taken over
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()  # released and removed


def test_a_lock_file_left_by_a_dead_owner_is_taken_over(tmp_path):
    path = tmp_path / ".out.lock"
    path.write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "started": 0}))
    with Lock(path, "output"):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_stale_temporary_files_are_removed_only_when_their_process_is_gone(tmp_path):
    gone, alive = dead_pid(), os.getppid()
    names = [f".m.onnx.fp32-{gone}.onnx", f".m.onnx.tmp-{gone}.onnx.pre.onnx", f".last.safetensors.tmp-{gone}",
             f".p.csv.run.json.tmp-{gone}", f".tmp-step-000000012-{gone}", f".m.onnx.fp32-{alive}.onnx",
             f".tmp-step-000000013-{alive}", "notes.tmp-1", ".hidden-user-file"]
    for n in names:
        (tmp_path / n).mkdir() if "step" in n else (tmp_path / n).write_text("x")
    remove_stale_temps(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(names[5:])
    (tmp_path / f".other.tmp-{gone}").write_text("x")
    remove_stale_temps(tmp_path, prefix=".m.onnx.")  # only the named output's temporaries
    assert f".other.tmp-{gone}" in os.listdir(tmp_path)


# --- the doors ------------------------------------------------------------------------------


def test_predict_refuses_an_output_another_process_is_writing(onnx_file, shapes_dir, tmp_path):
    out = tmp_path / "p.csv"
    owner = hold_in_another_process(lock_path(out))
    try:
        proc = run_toolkit("predict", onnx_file, shapes_dir / "val", "-o", out, "--overwrite", check=False)
        assert proc.returncode == 2 and f"is being written by process {owner.pid}" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not out.exists()
    finally:
        owner.kill()
        owner.wait()
    (tmp_path / f".p.csv.run.json.tmp-{dead_pid()}").write_text("{")  # left by a predict killed earlier
    predict(onnx_file, shapes_dir / "val", out)
    assert sorted(os.listdir(tmp_path)) == ["p.csv", "p.csv.run.json"]  # no temporaries, no lock left


def test_two_predicts_started_together_give_one_whole_output(onnx_file, shapes_dir, tmp_path):
    out = tmp_path / "p.csv"
    cmd = [sys.executable, "-m", "toolkit", "predict", str(onnx_file), str(shapes_dir / "val"), "-o", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for rc, err in results if rc == 2)
    assert "is being written by process" in refusal or "already exists" in refusal
    rows = list(table.read_rows(out))
    assert len(rows) == 100 and len({r["path"] for r in rows}) == 100


def test_export_refuses_an_output_another_process_is_writing(tiny_run, tmp_path):
    out = tmp_path / "m.onnx"
    owner = hold_in_another_process(lock_path(out))
    try:
        with pytest.raises(Busy, match=f"output '{out}' is being written by process {owner.pid}"):
            export(tiny_run, out)
    finally:
        owner.kill()
        owner.wait()
    gone = dead_pid()
    leftovers = [f".m.onnx.fp32-{gone}.onnx", f".m.onnx.tmp-{gone}.onnx", f".m.json.tmp-{gone}"]
    for n in leftovers:
        (tmp_path / n).write_text("x")
    export(tiny_run, out)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporaries, no lock left
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.json").is_file()


# --- a training run owns its folder ---------------------------------------------------------


def _train_args(data, out, *extra):
    return ["data.kind=imagefolder", f"data.root={data}", "data.image_size=16", "data.batch_size=8",
            "model.arch=tutorial_net", f"train.out_dir={out}", "name=exp", "train.epochs=1", "train.progress=false",
            *extra]


def test_a_run_folder_held_by_another_writer_is_never_shared(tmp_path):
    from conftest import two_colours
    from toolkit.config import load_config
    from toolkit.train import train

    data = two_colours(tmp_path / "d", n=8, size=16)
    out = tmp_path / "runs"
    (out / "exp").mkdir(parents=True)
    owner = hold_in_another_process(out / "exp" / ".lock")  # a live run writes runs/exp
    try:
        run = train(load_config(None, _train_args(data, out)))
        assert run == out / "exp-2" and (run / "best.safetensors").is_file()  # a new run goes elsewhere
        proc = run_toolkit("train", "configs/quickstart.yaml", *_train_args(data, out, "train.resume=auto"),
                           check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert proc.returncode == 2 and f"run folder '{out / 'exp'}' is being written by process {owner.pid}" \
            in proc.stderr, proc.stderr[-1500:]
        assert sorted(os.listdir(out / "exp")) == [".lock"]  # nothing written into it
    finally:
        owner.kill()
        owner.wait()
    assert not (run / ".lock").exists()  # released at the end of the run


def test_two_trainings_started_together_write_two_folders(tmp_path):
    from conftest import two_colours

    data = two_colours(tmp_path / "d", n=8, size=16)
    out = tmp_path / "runs"
    root = os.path.dirname(os.path.dirname(__file__))
    cmd = [sys.executable, "-m", "toolkit", "train", "configs/quickstart.yaml", *_train_args(data, out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outs]
    folders = sorted(o.strip().splitlines()[-1] for o, _ in outs)
    assert folders == [str(out / "exp"), str(out / "exp-2")]
    for f in folders:  # each folder holds one run's records, not two interleaved
        assert [json.loads(line)["epoch"] for line in open(os.path.join(f, "metrics.jsonl"))] == [1]


def test_a_resumed_run_removes_what_killed_writers_left(tmp_path):
    from conftest import two_colours
    from toolkit.config import load_config
    from toolkit.train import train

    data = two_colours(tmp_path / "d", n=8, size=16)
    out = tmp_path / "runs"
    run = train(load_config(None, _train_args(data, out)))
    gone = dead_pid()
    leftovers = [run / f".last.safetensors.tmp-{gone}", run / "state" / f".tmp-step-000000002-{gone}",
                 run / f".config.yaml.tmp-{gone}"]
    for p in leftovers:
        p.mkdir() if "step" in p.name else p.write_text("x")
    train(load_config(None, _train_args(data, out, "train.epochs=2", "train.resume=auto")))
    assert not any(p.exists() for p in leftovers)
    assert not [n for n in os.listdir(run) if n.startswith(".")]


def test_rebuilding_the_report_of_a_run_being_written_is_refused(tmp_path):
    from conftest import two_colours
    from toolkit.config import load_config
    from toolkit.train import train
    from toolkit.train.rebuild import rebuild_report

    data = two_colours(tmp_path / "d", n=8, size=16)
    run = train(load_config(None, _train_args(data, tmp_path / "runs")))
    owner = hold_in_another_process(run / ".lock")  # e.g. the run resumed in another terminal
    try:
        with pytest.raises(Busy, match=f"run folder '{run}' is being written by process {owner.pid}"):
            rebuild_report(run)
    finally:
        owner.kill()
        owner.wait()
    rebuild_report(run)
    assert not (run / ".lock").exists()
