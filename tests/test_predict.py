import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_toolkit
from toolkit import UserError
from toolkit.core import images
from toolkit.evaluate import evaluate_folder
from toolkit.export import export
from toolkit.predict import predict, table
from toolkit.predict.runtime import OnnxClassifier


def _rows(path):
    return list(table.read_rows(Path(path)))


def _fingerprint(root: Path) -> dict:
    return {str(p): (p.lstat().st_mtime_ns, hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else "")
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def test_every_file_gets_one_row_with_the_right_answer(onnx_file, corpus, tmp_path):
    root, expected = corpus
    before = _fingerprint(root)
    out = tmp_path / "p.csv"
    summary = predict(onnx_file, root, out, batch_size=4, topk=3, workers=2, max_pixels=10_000_000)
    rows = _rows(out)
    assert list(rows[0])[:4] == ["path", "top1_label", "top1_score", "error"]  # one set of ranked columns
    assert [r["path"] for r in rows] == images.find_images(root)  # every image-looking file, once, in walk order
    assert len(rows) == 20 + 7 + len(expected)
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == set(expected)
    for path, reason in expected.items():
        assert errors[path].startswith(reason), (path, errors[path])
    assert summary["ok"] == 27 and summary["failed"] == 7
    assert summary["errors"] == {"empty file": 1, "corrupt image": 1, "not an image": 2, "too many pixels": 1,
                                 "missing or dangling link": 1, "is a folder": 1}
    assert sum(summary["per_class"].values()) == 27
    # a bad file never shifts predictions: each good row holds its own file's prediction
    clf = OnnxClassifier(onnx_file)
    for r in rows:
        if not r["error"]:
            px = images.load(root / r["path"], images.Preprocess(32))[None]
            assert clf.meta.class_names[int(clf.logits(px).argmax())] == r["top1_label"], r["path"]
            scores = [r["top1_score"], r["top2_score"], r["top3_score"]]
            assert scores == sorted(scores, reverse=True) and len({r["top1_label"], r["top2_label"], r["top3_label"]}) == 3
            probs = clf.probabilities(px)[0]
            assert r["top1_score"] == round(float(probs.max()), 6)
    assert _fingerprint(root) == before  # input files are never modified


def test_unreadable_file_is_a_row(onnx_file, corpus, tmp_path, monkeypatch):
    root, _ = corpus
    locked = root / "stars" / sorted(os.listdir(root / "stars"))[1]
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the decoder see what a normal user would
        real_open = images.Image.open

        def deny(path, *a, **k):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied")
            return real_open(path, *a, **k)

        monkeypatch.setattr(images.Image, "open", deny)  # forked decode workers inherit this
    predict(onnx_file, root, tmp_path / "p.jsonl", workers=2)
    rows = {r["path"]: r for r in _rows(tmp_path / "p.jsonl")}
    assert rows[str(locked.relative_to(root))]["error"] == "permission denied"
    locked.chmod(0o644)


def test_json_lines_and_parquet_hold_the_same_rows(onnx_file, corpus, tmp_path):
    pa = pytest.importorskip("pyarrow.parquet")  # installed by the dev extra
    root, _ = corpus
    predict(onnx_file, root, tmp_path / "p.csv", topk=2)
    predict(onnx_file, root, tmp_path / "p.jsonl", topk=2)
    predict(onnx_file, root, tmp_path / "p.parquet", topk=2)
    from_csv = _rows(tmp_path / "p.csv")
    from_jsonl = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    table = pa.read_table(tmp_path / "p.parquet").to_pylist()
    assert len(from_csv) == len(from_jsonl) == len(table)
    for a, b, c in zip(from_csv, from_jsonl, table):
        assert a["path"] == b["path"] == c["path"] and a["top1_label"] == b["top1_label"] == (c["top1_label"] or "")
        if not a["error"]:
            assert float(a["top1_score"]) == b["top1_score"] == c["top1_score"]
    assert not (tmp_path / "p.parquet.partial.jsonl").exists()


def test_a_folder_holding_only_a_symlinked_folder_says_so(tmp_path, onnx_file):
    (tmp_path / "real").mkdir()
    images.Image.new("RGB", (8, 8)).save(tmp_path / "real" / "a.png")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "photos").symlink_to(tmp_path / "real")
    with pytest.raises(UserError, match=r"no image files under .*in' \(skipped 1 symlinked folder\(s\), not "
                                        r"followed\)$"):
        predict(onnx_file, tmp_path / "in", tmp_path / "p.csv")


def test_a_topk_above_the_number_of_classes_ranks_them_all_and_says_so(onnx_file, shapes_dir, tmp_path, caplog):
    from toolkit.core.meta import read_meta

    n = read_meta(onnx_file).num_classes
    with caplog.at_level("INFO", logger="toolkit"):
        predict(onnx_file, shapes_dir / "val", tmp_path / "p.csv", topk=n + 2)
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert header == [c.name for c in table.columns(n)] and header[-2:] == [f"top{n}_label", f"top{n}_score"]
    assert f"--topk {n + 2}: the model has {n} classes, so the rows rank all {n}" in caplog.text


@pytest.mark.parametrize("topk", [1, 3])
def test_csv_json_lines_and_parquet_have_the_same_columns_and_types(onnx_file, corpus, tmp_path, topk):
    pq = pytest.importorskip("pyarrow.parquet")
    root, expected = corpus
    first = "top1_" if topk > 1 else ""  # --topk K > 1: one set of ranked columns, the top class in place
    want = ["path", first + "label", first + "score", "error"] + [f"top{k}_{f}" for k in range(2, topk + 1)
                                                                  for f in ("label", "score")]
    for suffix in (".csv", ".jsonl", ".parquet"):
        predict(onnx_file, root, tmp_path / f"p{suffix}", topk=topk)
    csv_header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    jsonl = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    parquet = pq.read_table(tmp_path / "p.parquet")
    assert csv_header == want and parquet.column_names == want and all(list(r) == want for r in jsonl)
    assert [str(parquet.schema.field(c).type) for c in want] == ["double" if c.endswith("score") else "string"
                                                                 for c in want]
    table_types = {c.name: c.type for c in table.columns(topk)}
    assert list(table_types) == want
    for r in jsonl:  # the JSON values have the schema's types: strings never null, scores null only on errors
        for c, v in r.items():
            ok = isinstance(v, table_types[c]) or (table_types[c] is float and v is None and r["error"] != "")
            assert ok, (c, v, r)
    rows = parquet.to_pylist()
    assert rows == jsonl == _rows(tmp_path / "p.csv")  # the same rows, typed the same, in all three
    assert sum(1 for r in rows if r["error"]) == len(expected)


def test_an_existing_output_is_never_overwritten_silently(onnx_file, shapes_dir, tmp_path):
    out = tmp_path / "p.csv"
    predict(onnx_file, shapes_dir / "val", out)
    with pytest.raises(UserError, match="already exists; pass --resume to continue it or --overwrite"):
        predict(onnx_file, shapes_dir / "val", out)
    predict(onnx_file, shapes_dir / "val", out, overwrite=True)
    assert len(_rows(out)) == 100
    summary = predict(onnx_file, shapes_dir / "val", out, resume=True)  # complete: nothing to do
    assert summary["ok"] == 100


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_torn_last_record_is_cut_on_resume(suffix, tmp_path):
    path = tmp_path / f"p{suffix}"
    rows = [{"path": f"a/{i},x\n.png", "label": "cat", "score": 0.5, "error": ""} for i in range(5)]
    w = table.RowWriter(path, 1, resume=False)
    w.open()
    w.write(rows[:3])
    size = path.stat().st_size
    w.write(rows[3:4])
    one_row = path.stat().st_size - size
    w.write(rows[4:])
    w.close()
    with open(path, "r+b") as f:  # SIGKILL during the last write: row 3 is whole, row 4 is cut short
        f.truncate(size + one_row + 7)
    again = table.RowWriter(path, 1, resume=True)
    assert [r["path"] for r in again.existing_rows()] == [r["path"] for r in rows[:4]]
    again.open()
    again.write(rows[4:])
    again.close()
    assert [r["path"] for r in _rows(path)] == [r["path"] for r in rows]


def _many(shapes_dir, root: Path, copies: int) -> Path:
    """copies x the 100 validation images, as symlinks (a bigger folder without more bytes)."""
    files = sorted((shapes_dir / "val").rglob("*.png"))
    for c in range(copies):
        folder = root / f"copy{c:02d}"
        folder.mkdir(parents=True)
        for f in files:
            (folder / f"{f.parent.name}_{f.name}").symlink_to(f)
    return root


def test_sigkill_then_resume_gives_the_uninterrupted_rows(onnx_file, shapes_dir, tmp_path):
    root = _many(shapes_dir, tmp_path / "in", 20)  # 2,000 files
    (root / "copy05" / "broken.png").write_bytes(b"nope")
    ref = tmp_path / "ref.csv"
    predict(onnx_file, root, ref, batch_size=8)
    out = tmp_path / "p.csv"
    cmd = [sys.executable, "-m", "toolkit", "predict", str(onnx_file), str(root), "-o", str(out), "--batch-size", "8",
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size < 20_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(_rows(out))
    assert 0 < partial < 2001, partial  # it really was interrupted
    resumed = run_toolkit("predict", onnx_file, root, "-o", out, "--batch-size", "8", "--resume")
    assert resumed.stdout.strip().endswith(f"2000 ok, 1 failed -> {out}")
    assert out.read_bytes() == ref.read_bytes()  # the same rows, each path exactly once


def test_resuming_with_another_model_is_refused(onnx_file, tiny_run, shapes_dir, tmp_path):
    out = tmp_path / "p.csv"
    predict(onnx_file, shapes_dir / "val", out)
    other = export(tiny_run / "last.safetensors", tmp_path / "other.onnx")
    with pytest.raises(UserError, match="written with another model"):
        predict(other, shapes_dir / "val", out, resume=True)


def test_two_processes_give_the_same_rows_as_one(onnx_file, shapes_dir, tmp_path):
    root = _many(shapes_dir, tmp_path / "in", 3)
    (root / "copy01" / "broken.jpg").write_text("nope")
    one = tmp_path / "one.csv"
    predict(onnx_file, root, one, batch_size=16, topk=2)
    two = tmp_path / "two.csv"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(ROOT / "launch/cpu_ddp.yaml"),
           "-m", "toolkit", "predict", str(onnx_file), str(root), "-o", str(two), "--batch-size", "16", "--topk", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert two.read_bytes() == one.read_bytes()
    assert proc.stdout.strip().splitlines()[-1] == f"300 ok, 1 failed -> {two}"  # printed once, by the main process
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two.csv", "two.csv.run.json"]


def test_the_decoder_streams(shapes_dir):
    """An endless list of files: batches come out without the input ever being listed whole."""
    import itertools

    files = [f"star/{f}" for f in sorted(os.listdir(shapes_dir / "val" / "star"))]
    with images.Decoder(2) as decoder:
        stream = decoder.batches(shapes_dir / "val", itertools.cycle(files), images.Preprocess(32), batch_size=8)
        first = list(itertools.islice(stream, 5))
    assert [len(b.paths) for b in first] == [8] * 5 and all(b.ok.all() for b in first)


def test_labels_agree_with_evaluate(onnx_file, shapes_dir, tmp_path):
    out = tmp_path / "p.jsonl"
    predict(onnx_file, shapes_dir / "val", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    correct = sum(r["label"] == r["path"].split("/")[0] for r in rows)
    result = evaluate_folder(onnx_file, shapes_dir / "val")
    assert len(rows) == result["n"] == 100
    assert correct == result["correct"]


def test_cli_exits_zero_with_failed_files_and_counts_them(onnx_file, corpus, tmp_path):
    root, expected = corpus
    proc = run_toolkit("predict", onnx_file, root, "-o", tmp_path / "p.csv", "--max-pixels", "10000000")
    assert proc.stdout.strip().splitlines()[-1] == f"27 ok, 7 failed -> {tmp_path / 'p.csv'}"
    assert "error 'too many pixels': 1" in proc.stderr


def test_predict_never_imports_torch(onnx_file, corpus, shapes_dir, tmp_path):
    root, _ = corpus
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from toolkit.cli import main\n"
        f"main(['predict', {str(onnx_file)!r}, {str(root)!r}, '-o', {str(tmp_path / 'p.csv')!r}])\n"
        f"main(['evaluate', {str(onnx_file)!r}, {str(shapes_dir / 'val')!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(_rows(tmp_path / "p.csv")) == 34


def test_cuda_requested_without_cuda_is_a_clear_error(onnx_file, shapes_dir, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the error path needs a CPU-only build")
    with pytest.raises(UserError, match="--device cuda: this onnxruntime build has no CUDA support"):
        OnnxClassifier(onnx_file, device="cuda")
    proc = run_toolkit("predict", onnx_file, shapes_dir / "val", "-o", tmp_path / "p.csv", "--device", "cuda",
                       check=False)
    assert proc.returncode == 2 and "no CUDA support" in proc.stderr
    assert not (tmp_path / "p.csv").exists()
    assert OnnxClassifier(onnx_file, device="auto").device == "cpu"  # auto: CUDA only when present


def test_bad_model_and_folder_are_one_line_errors(onnx_file, tmp_path):
    (tmp_path / "fake.onnx").write_bytes(b"definitely not onnx")
    with pytest.raises(UserError, match="fake.onnx' is not a loadable ONNX model"):
        predict(tmp_path / "fake.onnx", tmp_path, tmp_path / "p.csv")
    with pytest.raises(UserError, match="input folder '.*nowhere' does not exist"):
        predict(onnx_file, tmp_path / "nowhere", tmp_path / "p.csv")
    with pytest.raises(UserError, match="must end in .csv, .jsonl or .parquet"):
        predict(onnx_file, tmp_path, tmp_path / "p.txt")
    proc = run_toolkit("predict", tmp_path / "fake.onnx", tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "Traceback" not in proc.stderr


# --- edge cases found in review ------------------------------------------------------------


def test_output_into_a_new_folder_and_undecodable_file_names(onnx_file, shapes_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "odd"
    root.mkdir()
    src = next((shapes_dir / "val" / "star").iterdir())
    names = [b"bad\xff\xfe.png", b"comma, \"quote\".png", "caf\u00e9.png".encode()]
    for name in names:
        shutil.copy(src, os.path.join(os.fsencode(root), name))
    for suffix in (".csv", ".jsonl", ".parquet"):
        out = tmp_path / "new" / "deeper" / f"p{suffix}"
        summary = predict(onnx_file, root, out)
        assert summary["ok"] == 3 and out.exists()
    rows = _rows(tmp_path / "new" / "deeper" / "p.csv")
    assert sorted(os.fsencode(r["path"]) for r in rows) == sorted(names)  # the exact bytes come back
    table = pq.read_table(tmp_path / "new" / "deeper" / "p.parquet").to_pylist()
    assert "bad\\xff\\xfe.png" in {r["path"] for r in table}
    cut = tmp_path / "new" / "deeper" / "p.csv"
    cut.write_bytes(cut.read_bytes()[:-10])  # as if killed while writing the last row
    record = cut.with_name("p.csv.run.json")
    record.write_text(json.dumps({**json.loads(record.read_text()), "complete": False}))
    predict(onnx_file, root, cut, resume=True)
    assert [r["path"] for r in _rows(cut)] == [r["path"] for r in rows]


def test_resume_refuses_other_settings(onnx_file, shapes_dir, tmp_path):
    out = tmp_path / "p.csv"
    predict(onnx_file, shapes_dir / "val", out)
    cut = out.read_bytes()
    out.write_bytes(cut[: len(cut) // 2])
    record = json.loads((tmp_path / "p.csv.run.json").read_text())
    (tmp_path / "p.csv.run.json").write_text(json.dumps({**record, "complete": False}))
    with pytest.raises(UserError, match="another input folder"):
        predict(onnx_file, shapes_dir / "train", out, resume=True)
    with pytest.raises(UserError, match="another --topk"):
        predict(onnx_file, shapes_dir / "val", out, resume=True, topk=3)
    assert len(_rows(out)) < 100  # nothing was touched
    (tmp_path / "p.csv.run.json").write_text("{torn")
    with pytest.raises(UserError, match="is damaged"):
        predict(onnx_file, shapes_dir / "val", out, resume=True)


def test_the_run_record_keeps_its_bytes_and_an_earlier_record_resumes(onnx_file, shapes_dir, tmp_path):
    """The run record beside an output is a file format: one written by an earlier version still resumes."""
    root, out, sidecar = shapes_dir / "val", tmp_path / "p.csv", tmp_path / "p.csv.run.json"
    run = {"model": str(onnx_file), "model_sha256": hashlib.sha256(Path(onnx_file).read_bytes()).hexdigest(),
           "input_dir": str(root.resolve()), "topk": 2, "world_size": 1, "max_pixels": 10_000_000,
           "fallback": None, "format": "csv", "outputs": "logits"}  # the keys, in the order they are written
    run["run_id"] = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]
    summary = predict(onnx_file, root, out, topk=2, max_pixels=10_000_000)
    whole = out.read_bytes()
    assert sidecar.read_text() == json.dumps({**run, "complete": True, "summary": summary, "output_bytes": len(whole)})
    out.write_bytes(whole[: len(whole) // 2])  # an interrupted run: half its rows, its record as then written
    sidecar.write_text(json.dumps({**run, "complete": False}))
    assert predict(onnx_file, root, out, topk=2, max_pixels=10_000_000, resume=True) == summary
    assert out.read_bytes() == whole


def test_overwrite_keeps_the_old_output_when_the_new_run_cannot_start(onnx_file, shapes_dir, tmp_path):
    out = tmp_path / "p.csv"
    predict(onnx_file, shapes_dir / "val", out)
    with pytest.raises(UserError, match="does not exist"):
        predict(tmp_path / "typo.onnx", shapes_dir / "val", out, overwrite=True)
    with pytest.raises(UserError, match="needs a .png"):
        predict(onnx_file, shapes_dir / "val", out, overwrite=True, grid=tmp_path / "g.jpg")
    assert len(_rows(out)) == 100


def test_stale_parts_of_another_run_are_never_merged(onnx_file, shapes_dir, tmp_path, monkeypatch):
    """Process 0 merges only parts that carry this run's id and the expected number of rows."""
    import threading

    out = tmp_path / "p.csv"
    stale = tmp_path / "p.csv.part-1-of-2.csv"
    stale.write_text("path,label,score,error\nstar/x.png,STALE,1.0,\n")
    (tmp_path / "p.csv.part-1-of-2.csv.done").write_text(json.dumps({"run_id": "old", "rows": 1}))

    def rank1():  # the other process, started after process 0 is already waiting
        time.sleep(1.5)
        env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
        subprocess.run([sys.executable, "-m", "toolkit", "predict", str(onnx_file), str(shapes_dir / "val"),
                        "-o", str(out), "--overwrite"], env={**os.environ, **env}, check=True, capture_output=True)

    other = threading.Thread(target=rank1)
    other.start()
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    summary = predict(onnx_file, shapes_dir / "val", out, overwrite=True)
    other.join()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("WORLD_SIZE", "1")
    single = tmp_path / "single.csv"
    predict(onnx_file, shapes_dir / "val", single)
    assert summary["ok"] == 100 and "STALE" not in out.read_text()
    assert out.read_bytes() == single.read_bytes()


def test_decode_workers_die_with_their_parent(onnx_file, shapes_dir, tmp_path):
    root = _many(shapes_dir, tmp_path / "in", 50)  # 5,000 files one at a time: seconds of work
    cmd = [sys.executable, "-m", "toolkit", "predict", str(onnx_file), str(root), "-o", str(tmp_path / "p.csv"),
           "--workers", "2", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children, deadline = [], time.monotonic() + 30
    while len(children) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            break
    assert len(children) >= 2, "the decode workers did not start"
    proc.kill()
    proc.wait()

    def alive() -> list[str]:
        return [c for c in children if _running(c)]
    # an orphan never ends by itself (it waits for work forever); a worker not yet scheduled since the fork
    # (a busy machine, pytest -n) notices its dead parent when it first runs: poll instead of one fixed wait
    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(), f"orphaned workers: {alive()}"


def _running(pid: str) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_bad_launcher_environment_and_class_file(onnx_file, shapes_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match="RANK=2 is not below WORLD_SIZE=1"):
        predict(onnx_file, shapes_dir / "val", tmp_path / "p.csv")
    monkeypatch.delenv("RANK")
    proc = run_toolkit("predict", onnx_file, shapes_dir / "val", "-o", tmp_path / "q.csv", "--classes", "@nope.txt",
                       check=False)
    assert proc.returncode == 2 and "--classes file 'nope.txt' cannot be read" in proc.stderr
