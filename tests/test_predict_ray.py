"""The Ray engine and object storage: the same rows as the built-in engine, exactly once under faults.

One local Ray (num_cpus=2, like the smallest machine it must not deadlock on) serves the tests of this file
and stops after them (its idle processes kept a tenth of a core busy for the rest of the session); a moto S3
server on 127.0.0.1 stands in for object storage.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from toolkit import UserError
from toolkit.core import images
from toolkit.predict import dataset, predict, table
from toolkit.predict.engine_ray import Plan, plan

pytest.importorskip("ray.data")
pq = pytest.importorskip("pyarrow.parquet")

BATCH, CHUNK = 4, 8  # chunks are whole batches: the same batches as the built-in engine, the same numbers


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray for this file's tests: 2 CPUs, a small object store; -> its address (for other drivers)."""
    import logging

    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
                   logging_level=logging.WARNING)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _dataset_rows(folder: Path) -> list[dict]:
    parts = sorted(p for p in folder.iterdir() if dataset.PART.match(p.name))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def _key(row: dict) -> tuple:
    return tuple(sorted(row.items()))


# --- sizing: no default configuration starves itself ------------------------------------------


def test_plan_sizes_the_stages_so_every_one_can_run():
    assert plan(2, 0, "cpu") == Plan(actors=2, actor_cpus=1.0, actor_gpus=0.0, decode_cpus=0.0, threads=1)
    assert plan(2, 0, "auto") == plan(2, 0, "cpu")
    assert plan(2, 1, "cuda") == Plan(actors=1, actor_cpus=1.0, actor_gpus=1.0, decode_cpus=1.0, threads=1)
    for cpus in (0.5, 1, 1.5, 2, 3, 16, 96):
        for gpus in (0, 1, 2, 8):
            for device in ("cpu", "cuda", "auto"):
                for workers in (0, 1, 3):
                    if device == "cuda" and gpus == 0:
                        with pytest.raises(UserError, match="has no GPU"):
                            plan(cpus, gpus, device, workers)
                        continue
                    p = plan(cpus, gpus, device, workers)
                    assert p.actors >= 1 and p.actor_cpus > 0 or p.decode_cpus > 0
                    # all actors and one decode task (the GPU pipeline's) fit on the cluster together
                    assert p.actors * p.actor_cpus + p.decode_cpus <= cpus + 1e-9, (cpus, gpus, device, workers, p)
                    assert p.actors * p.actor_gpus <= gpus + 1e-9
                    assert (p.decode_cpus > 0) == (p.actor_gpus > 0)  # GPU actors never decode


# --- the same rows as the built-in engine ----------------------------------------------------


@pytest.mark.slow
def test_rows_are_the_built_in_engines(ray_address, onnx_file, corpus, tmp_path):
    root, expected = corpus
    ref_csv, ref_pq = tmp_path / "ref.csv", tmp_path / "ref.parquet"
    ref = predict(onnx_file, root, ref_csv, batch_size=BATCH, topk=3, max_pixels=10_000_000)
    predict(onnx_file, root, ref_pq, batch_size=BATCH, topk=3, max_pixels=10_000_000)

    folder = tmp_path / "ds"
    summary = predict(onnx_file, root, folder, engine="ray", batch_size=BATCH, chunk_size=CHUNK, topk=3,
                      max_pixels=10_000_000)
    n = len(images.find_images(root))
    assert sorted(p.name for p in folder.iterdir()) == ["_run.json"] + [dataset.part_name(i) for i in range(-(-n // CHUNK))]
    rows = _dataset_rows(folder)
    assert len(rows) == n == 34
    assert {_key(r) for r in rows} == {_key(r) for r in pq.read_table(ref_pq).to_pylist()}  # as a set
    assert {r["path"]: r["error"] for r in rows if r["error"]}.keys() == expected.keys()
    record = json.loads((folder / "_run.json").read_text())
    assert record["complete"] and record["summary"] == {**ref, "output": str(folder)} == summary
    assert record["files"] == n and record["chunk_size"] == CHUNK and record["chunks"] == len(rows) // CHUNK + 1
    assert record["model_sha256"] == __import__("hashlib").sha256(Path(onnx_file).read_bytes()).hexdigest()
    assert record["input_dir"] == str(root.resolve())

    merged = tmp_path / "ray.csv"  # merged in walk order: byte for byte the built-in file
    predict(onnx_file, root, merged, engine="ray", batch_size=BATCH, chunk_size=CHUNK, topk=3,
            max_pixels=10_000_000)
    assert merged.read_bytes() == ref_csv.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ray")) == ["ray.csv", "ray.csv.run.json"]


# --- object storage, for both engines --------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with an empty bucket; the standard variables point at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bucket")
    try:
        yield fs
    finally:
        server.stop()
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
def test_object_storage_in_and_out_gives_the_same_rows(ray_address, s3, onnx_file, corpus, tmp_path):
    from toolkit.predict.storage import Location

    root, _ = corpus
    (root / "bad" / "dangling.png").unlink()  # links and folders named like images exist only on disks
    (root / "bad" / "folder.jpg").rmdir()
    for rel in images.find_images(root) + ["bad/readme.txt"]:
        s3.pipe(f"bucket/in/{rel}", (root / rel).read_bytes())
    bucket = Location("s3://bucket/in")
    assert list(bucket.iter_images()) == images.find_images(root)  # the local walk's order
    blob = bucket.read_files(["stars/" + sorted(os.listdir(root / "stars"))[0], "bad/gone.png"])
    prep = images.Preprocess(32)
    assert (images.load(blob[0], prep) == images.load(root / "stars" / sorted(os.listdir(root / "stars"))[0], prep)).all()
    assert str(blob[1]) == "missing or dangling link"

    ref, ref_pq = tmp_path / "ref.csv", tmp_path / "ref.parquet"
    kw = dict(batch_size=BATCH, topk=2, max_pixels=10_000_000)
    summary = predict(onnx_file, root, ref, **kw)
    predict(onnx_file, root, ref_pq, **kw)
    assert predict(onnx_file, "s3://bucket/in", "s3://bucket/out/local.csv", **kw)["ok"] == summary["ok"]
    predict(onnx_file, "s3://bucket/in", "s3://bucket/out/ray.csv", engine="ray", chunk_size=CHUNK, **kw)
    predict(onnx_file, "s3://bucket/in", "s3://bucket/out/ds", engine="ray", chunk_size=CHUNK, **kw)
    s3.invalidate_cache()
    assert s3.cat("bucket/out/local.csv") == ref.read_bytes() == s3.cat("bucket/out/ray.csv")
    parts = sorted(n for n in s3.ls("bucket/out/ds") if dataset.PART.match(n.rsplit("/", 1)[-1]))
    rows = [r for p in parts for r in pq.read_table(s3.open(p)).to_pylist()]
    assert {_key(r) for r in rows} == {_key(r) for r in pq.read_table(ref_pq).to_pylist()}
    assert [r["path"] for r in rows] == images.find_images(root)  # parts in chunk order: walk order
    assert sorted(n.rsplit("/", 1)[-1] for n in s3.ls("bucket/out")) == [
        "ds", "local.csv", "local.csv.run.json", "ray.csv", "ray.csv.run.json"]
    record = json.loads(s3.cat("bucket/out/ds/_run.json"))
    assert record["input_dir"] == "s3://bucket/in" and record["summary"]["ok"] == summary["ok"]
    with pytest.raises(UserError, match="already exists"):
        predict(onnx_file, "s3://bucket/in", "s3://bucket/out/local.csv", **kw)


# --- exactly once under faults ---------------------------------------------------------------


def _many(shapes_dir: Path, root: Path, copies: int) -> Path:
    """copies x the 100 validation images, as symlinks (a bigger folder without more bytes)."""
    files = sorted((shapes_dir / "val").rglob("*.png"))
    for c in range(copies):
        folder = root / f"copy{c:02d}"
        folder.mkdir(parents=True)
        for f in files:
            (folder / f"{f.parent.name}_{f.name}").symlink_to(f)
    return root


def _actor_pids() -> set[int]:
    """Processes that hold a ChunkPredictor actor (Ray names its workers after it) of this process's Ray: their
    parent is the raylet this process started. Another test process's Ray (pytest -n) is left alone."""
    def parent(pid) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    pids = set()
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and b"ChunkPredictor" in (p / "cmdline").read_bytes() and \
                    parent(parent(p.name)) == os.getpid():
                pids.add(int(p.name))
        except OSError:
            pass
    return pids


def _parts(folder: Path) -> int:
    try:
        return sum(1 for n in os.listdir(folder) if dataset.PART.match(n))
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_killed_workers_are_retried_and_every_file_keeps_one_row(ray_address, onnx_file, shapes_dir, tmp_path):
    root = _many(shapes_dir, tmp_path / "in", 30)  # 3,000 files, one at a time: seconds of work
    out, result = tmp_path / "ds", {}
    run = threading.Thread(target=lambda: result.update(
        summary=predict(onnx_file, root, out, engine="ray", batch_size=1, chunk_size=50)))
    run.start()
    killed, deadline = set(), time.monotonic() + 120
    while not killed and time.monotonic() < deadline and run.is_alive():
        if _parts(out) >= 2 and len(_actor_pids()) == 2:  # both actors predicting: every one has a chunk in flight
            killed = _actor_pids()
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            at_kill = _parts(out)
        time.sleep(0.02)
    run.join(timeout=180)
    assert killed and at_kill < 60, "the run ended before the workers could be killed"
    assert "summary" in result, "the run failed"
    rows = _dataset_rows(out)
    assert len(rows) == 3000 and len({r["path"] for r in rows}) == 3000  # exactly one row per file
    assert result["summary"]["ok"] == 3000 and _parts(out) == 60
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no torn part left behind


@pytest.mark.slow
def test_a_killed_driver_then_resume_gives_the_uninterrupted_rows(ray_address, onnx_file, shapes_dir, tmp_path):
    root = _many(shapes_dir, tmp_path / "in", 20)  # 2,000 files
    (root / "copy05" / "broken.png").write_bytes(b"nope")
    ref = tmp_path / "ref.csv"
    predict(onnx_file, root, ref, batch_size=BATCH)
    out = tmp_path / "p.csv"
    args = ["--engine", "ray", "--batch-size", str(BATCH), "--chunk-size", "40"]
    cmd = [sys.executable, "-m", "toolkit", "predict", str(onnx_file), str(root), "-o", str(out), *args,
           "--address", ray_address]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    parts, deadline = tmp_path / "p.csv.parts", time.monotonic() + 120
    while _parts(parts) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _parts(parts)
    assert 0 < partial < 51, (partial, proc.stderr.read()[-2000:])  # it really was interrupted
    assert not out.exists()
    summary = predict(onnx_file, root, out, engine="ray", batch_size=BATCH, chunk_size=40, resume=True)
    assert summary["ok"] == 2000 and summary["failed"] == 1
    assert out.read_bytes() == ref.read_bytes()  # the same rows, each path exactly once, in walk order
    assert not parts.exists()


@pytest.mark.slow
def test_resume_skips_written_chunks_and_refuses_another_input_or_model(ray_address, onnx_file, tiny_run,
                                                                          shapes_dir, tmp_path):
    import shutil

    from toolkit.export import export

    root = tmp_path / "in"
    shutil.copytree(shapes_dir / "val", root)
    out = tmp_path / "ds"
    predict(onnx_file, root, out, engine="ray", chunk_size=16)
    before = _dataset_rows(out)
    record = json.loads((out / "_run.json").read_text())
    (out / "_run.json").write_text(json.dumps({**record, "complete": False}))  # as if the driver died
    (out / dataset.part_name(3)).unlink()
    kept = {n: (out / n).stat().st_mtime_ns for n in os.listdir(out) if dataset.PART.match(n)}

    with pytest.raises(UserError, match="already exists; pass --resume"):
        predict(onnx_file, root, out, engine="ray", chunk_size=16)
    with pytest.raises(UserError, match="written with another model"):
        predict(export(tiny_run / "last.safetensors", tmp_path / "other.onnx"), root, out, engine="ray",
                chunk_size=16, resume=True)
    with pytest.raises(UserError, match="another --chunk-size"):
        predict(onnx_file, root, out, engine="ray", chunk_size=32, resume=True)
    local = tmp_path / "local.csv"
    predict(onnx_file, root, local)
    with pytest.raises(UserError, match="written by the local engine; resume it with --engine local"):
        predict(onnx_file, root, local, engine="ray", resume=True)
    extra = root / "star" / "zz_new.png"
    shutil.copy(next((root / "star").iterdir()), extra)
    with pytest.raises(UserError, match="the input changed since the interrupted run"):
        predict(onnx_file, root, out, engine="ray", chunk_size=16, resume=True)
    extra.unlink()

    predict(onnx_file, root, out, engine="ray", chunk_size=16, resume=True)
    assert _dataset_rows(out) == before
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # written chunks were skipped, not redone
    assert json.loads((out / "_run.json").read_text())["complete"]


@pytest.mark.slow
def test_decode_tasks_feeding_inference_actors_give_the_same_rows(ray_address, onnx_file, corpus, tmp_path,
                                                                   monkeypatch):
    """The GPU runs' pipeline (CPU decode tasks -> inference actors) on CPUs only: the actors reserve half
    a CPU, so Ray Data keeps the two stages apart (as it does GPU actors) instead of fusing them."""
    import toolkit.predict.engine_ray as engine_ray

    root, _ = corpus
    ref = tmp_path / "ref.jsonl"
    predict(onnx_file, root, ref, batch_size=BATCH, topk=2, max_pixels=10_000_000)
    monkeypatch.setattr(engine_ray, "plan", lambda *a: Plan(actors=1, actor_cpus=0.5, actor_gpus=0.0, decode_cpus=1.0,
                                                             threads=1))
    out = tmp_path / "ray.jsonl"
    predict(onnx_file, root, out, engine="ray", batch_size=BATCH, chunk_size=CHUNK, topk=2, max_pixels=10_000_000)
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.slow
def test_a_folder_the_workers_cannot_see_is_a_one_line_error(ray_address, onnx_file, shapes_dir, tmp_path,
                                                             monkeypatch):
    """As on a cluster whose nodes do not mount the output folder: the actors refuse to start, and say why."""
    from toolkit.predict.storage import Location

    monkeypatch.setattr(Location, "make_dir", lambda self: None)  # the driver does not create the parts folder
    with pytest.raises(UserError, match=r"the output folder '.*p\.csv\.parts' is not on Ray node .*every node mounts"):
        predict(onnx_file, shapes_dir / "val", tmp_path / "p.csv", engine="ray")
    assert json.loads((tmp_path / "p.csv.run.json").read_text())["complete"] is False  # --resume continues it


def test_a_deleted_output_is_predicted_again_and_a_busy_one_refused(ray_address, onnx_file, shapes_dir, tmp_path):
    from toolkit.core.lock import Busy, Lock, lock_path

    out = tmp_path / "p.csv"
    first = predict(onnx_file, shapes_dir / "val", out, engine="ray", chunk_size=32)
    out.unlink()  # the record still says complete: resume must deliver the file, not only the claim
    again = predict(onnx_file, shapes_dir / "val", out, engine="ray", chunk_size=32, resume=True)
    assert again["ok"] == first["ok"] == 100 and len(list(table.read_rows(out))) == 100
    folder = tmp_path / "ds"
    predict(onnx_file, shapes_dir / "val", folder, engine="ray", chunk_size=32)
    (folder / dataset.part_name(1)).unlink()
    predict(onnx_file, shapes_dir / "val", folder, engine="ray", chunk_size=32, resume=True)
    assert len(_dataset_rows(folder)) == 100
    code = "import sys, time; from toolkit.core.lock import Lock; Lock(sys.argv[1], 'x').acquire(); print(1, flush=True); time.sleep(600)"
    owner = subprocess.Popen([sys.executable, "-c", code, str(lock_path(out))], stdout=subprocess.PIPE, text=True)
    try:
        owner.stdout.readline()
        with pytest.raises(Busy, match=f"is being written by process {owner.pid}"):
            predict(onnx_file, shapes_dir / "val", out, engine="ray", chunk_size=32, overwrite=True)
    finally:
        owner.kill()
        owner.wait()
    assert len(list(table.read_rows(out))) == 100
    assert not Lock(lock_path(out), "x").acquire().release()  # nothing left holding it


def test_the_decode_only_steps_of_gpu_runs_decode_like_the_shared_preprocessing(corpus):
    """The decode tasks of GPU runs (Ray's decode_chunks, the built-in engine's _decode) give the pixels and
    reasons of images.decode_chunk with the same Preprocess; checked here without a GPU."""
    import numpy as np

    from toolkit.predict.answer import _decode
    from toolkit.predict.ray_workers import _unpack, decode_chunks
    from toolkit.predict.storage import Location

    root, _ = corpus
    rels = images.find_images(root)
    prep = images.Preprocess(24, "squash", 10_000_000, "bicubic")
    want = images.decode_chunk(rels, str(root), prep)
    assert want.pixels.shape[1:] == (24, 24, 3) and not want.ok.all()  # the corpus has broken files
    packed = decode_chunks({"chunk": np.array([0]), "paths": [[os.fsencode(r) for r in rels]]}, Location(root), prep)
    for got in (_unpack(packed, 0, prep.size), _decode(rels, Location(root), prep)):
        assert got.paths == rels and (got.ok == want.ok).all() and got.errors == want.errors
        assert np.array_equal(got.pixels, want.pixels)
