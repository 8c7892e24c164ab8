"""Output-side failures are one sentence, checked before the work where possible, and never claim success:
read-only folders, a full disk, a file where a folder should be and a folder where a file should be, for
train, export, predict and the pictures; and no user file is ever replaced."""

import json
import os

import pytest
from PIL import Image

from conftest import ROOT, run_toolkit, small_disk
from toolkit import UserError
from toolkit.export import export
from toolkit.predict import predict, table


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


# --- export ---------------------------------------------------------------------------------


def test_export_to_a_folder_or_under_a_file_fails_before_the_work(tiny_run, tmp_path, monkeypatch):
    import toolkit.export.release as release

    traced = []
    monkeypatch.setattr(release, "to_onnx", lambda *a, **k: traced.append(1))
    (tmp_path / "existing").mkdir()
    with pytest.raises(UserError, match="is a folder; give a file name"):
        export(tiny_run, tmp_path / "existing")
    (tmp_path / "existing.onnx").mkdir()
    with pytest.raises(UserError, match="'.*existing.onnx' is a folder"):
        export(tiny_run, tmp_path / "existing.onnx")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="cannot create the output folder '.*afile'"):
        export(tiny_run, tmp_path / "afile" / "m.onnx")
    (tmp_path / "m.json").mkdir()
    with pytest.raises(UserError, match="m.json' is a folder; the export writes a file there"):
        export(tiny_run, tmp_path / "m.onnx")
    with pytest.raises(UserError, match="must end in .onnx"):
        export(tiny_run, tmp_path / "photo.jpg")
    assert not traced


def test_export_into_a_read_only_folder_is_one_line(tiny_run, readonly_dir):
    proc = run_toolkit("export", tiny_run, "-o", readonly_dir / "m.onnx", check=False)
    one_line_error(proc, "cannot write", str(readonly_dir))
    assert not os.listdir(readonly_dir)


def test_export_on_a_full_disk_is_one_line_and_never_retries_with_another_exporter(tiny_run, tmp_path):
    proc = run_toolkit("export", tiny_run, "-o", tmp_path / "m.onnx", check=False, preexec_fn=small_disk(20_000))
    one_line_error(proc, "cannot write", "m.onnx")
    assert "TorchScript" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == []  # no model, no report, no temporary file, no lock


# --- predict --------------------------------------------------------------------------------


def test_predict_resume_after_the_output_was_deleted_predicts_again(onnx_file, shapes_dir, tmp_path):
    out = tmp_path / "p.csv"
    predict(onnx_file, shapes_dir / "val", out)
    out.unlink()
    summary = predict(onnx_file, shapes_dir / "val", out, resume=True)
    assert summary["ok"] == 100 and len(list(table.read_rows(out))) == 100  # the goods, not just the claim
    assert json.loads((tmp_path / "p.csv.run.json").read_text())["output_bytes"] == out.stat().st_size
    with open(out, "a") as f:  # changed by hand after it completed: not silently "complete"
        f.write("x.png,star,1.0,\n")
    with pytest.raises(UserError, match="changed since its run completed"):
        predict(onnx_file, shapes_dir / "val", out, resume=True)


def test_predict_resume_via_the_cli_never_says_ok_without_a_file(onnx_file, shapes_dir, tmp_path):
    out = tmp_path / "p.jsonl"
    run_toolkit("predict", onnx_file, shapes_dir / "val", "-o", out)
    out.unlink()
    proc = run_toolkit("predict", onnx_file, shapes_dir / "val", "-o", out, "--resume")
    assert "100 ok" in proc.stdout and len(out.read_text().splitlines()) == 100


def test_predict_output_that_is_a_folder_or_under_a_file(onnx_file, shapes_dir, tmp_path):
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        predict(onnx_file, shapes_dir / "val", tmp_path / "dir.csv")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        predict(onnx_file, shapes_dir / "val", tmp_path / "afile" / "p.csv")


# --- pictures never replace a user's file -----------------------------------------------------


def test_grid_and_preview_never_overwrite_an_existing_file(onnx_file, shapes_dir, tmp_path):
    photo = tmp_path / "holiday.png"
    Image.new("RGB", (5, 5), (1, 2, 3)).save(photo)
    before = photo.read_bytes()
    proc = run_toolkit("predict", onnx_file, shapes_dir / "val", "-o", tmp_path / "p.csv", "--grid", photo,
                       check=False)
    one_line_error(proc, "holiday.png' already exists")
    assert not (tmp_path / "p.csv").exists()  # refused before the work
    proc = run_toolkit("preview", shapes_dir, "-o", photo, check=False)
    one_line_error(proc, "holiday.png' already exists")
    assert photo.read_bytes() == before
    run_toolkit("preview", shapes_dir, "-o", photo, "--overwrite")
    assert photo.read_bytes() != before and Image.open(photo).size[0] > 100


def test_pictures_never_go_inside_the_folder_they_read_even_with_overwrite(onnx_file, shapes_dir, tmp_path):
    import shutil

    data = tmp_path / "photos"
    shutil.copytree(shapes_dir / "val", data)
    photo = next((data / "star").iterdir())
    before = photo.read_bytes()
    proc = run_toolkit("predict", onnx_file, data, "-o", tmp_path / "p.csv", "--grid", photo, "--overwrite",
                       check=False)
    one_line_error(proc, f"--grid '{photo}' is inside the input folder")
    assert not (tmp_path / "p.csv").exists()  # refused before the work
    with pytest.raises(UserError, match="inside the input folder"):  # a new file there: the next run's input
        predict(onnx_file, data, tmp_path / "p.csv", grid=data / "sub" / ".." / "grid.png")
    proc = run_toolkit("preview", data, "-o", photo, "--overwrite", check=False)
    one_line_error(proc, f"'{photo}' is inside the data folder")
    assert photo.read_bytes() == before and not (data / "grid.png").exists()


def test_a_path_of_the_wrong_kind_is_named_as_such_not_as_missing(onnx_file, tiny_run, shapes_dir, tmp_path):
    from toolkit.core.folders import find_layout
    from toolkit.core.pictures import preview
    from toolkit.evaluate import evaluate_folder

    image = next((shapes_dir / "val" / "star").iterdir())
    for call in (lambda: predict(onnx_file, image, tmp_path / "p.csv"), lambda: evaluate_folder(onnx_file, image),
                 lambda: preview(image, tmp_path / "g.png"), lambda: find_layout(image),
                 lambda: export(tiny_run, tmp_path / "e.onnx", data_dir=image)):
        with pytest.raises(UserError, match=f"'{image}' is a file, not a folder"):
            call()
    with pytest.raises(UserError, match=f"model file '{shapes_dir}' is a folder, not a file"):
        predict(shapes_dir, shapes_dir / "val", tmp_path / "p.csv")
    with pytest.raises(UserError, match="'nothere' does not exist"):
        predict(onnx_file, "nothere", tmp_path / "p.csv")


def test_a_file_appearing_while_the_grid_is_drawn_is_kept(shapes_dir, tmp_path, monkeypatch):
    from toolkit.core import pictures

    out = tmp_path / "g.png"
    real_grid = pictures.grid

    def grid_then_user_saves(*a, **k):  # the user's file lands between the check and the write
        out.write_bytes(b"user")
        return real_grid(*a, **k)

    monkeypatch.setattr(pictures, "grid", grid_then_user_saves)
    with pytest.raises(UserError, match="already exists"):
        pictures.preview(shapes_dir, out, per_class=2)
    assert out.read_bytes() == b"user" and sorted(os.listdir(tmp_path)) == ["g.png"]


# --- train ----------------------------------------------------------------------------------


def _train_args(data, out, *extra):
    return ["train", ROOT / "configs/quickstart.yaml", "data.kind=imagefolder", f"data.root={data}",
            "data.image_size=16", "data.batch_size=8", "model.arch=tutorial_net", f"train.out_dir={out}", "name=r",
            "train.epochs=1", "train.progress=false", *extra]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from conftest import two_colours

    return two_colours(tmp_path_factory.mktemp("d"), n=8, size=16)


def test_train_into_a_read_only_folder_is_one_line_before_the_work(small_data, readonly_dir):
    proc = run_toolkit(*_train_args(small_data, readonly_dir / "runs"), check=False)
    one_line_error(proc, "cannot create the run folder", str(readonly_dir))
    assert "decoded" not in proc.stderr  # refused before the data was read


def test_train_never_writes_its_run_inside_the_data_it_reads(small_data, tmp_path):
    import shutil

    data = tmp_path / "photos"
    shutil.copytree(small_data, data)
    listing = sorted(p.relative_to(data) for p in data.rglob("*"))
    proc = run_toolkit(*_train_args(data, data / "runs"), check=False)
    one_line_error(proc, "would be inside data.root", "train.out_dir=")
    proc = run_toolkit(*_train_args(".", "runs"), check=False, cwd=data)  # `toolkit train .` in the photo folder
    one_line_error(proc, "'runs/r' would be inside data.root '.'", "train.out_dir=../runs")
    assert "decoded" not in proc.stderr and sorted(p.relative_to(data) for p in data.rglob("*")) == listing


def test_train_with_a_file_where_the_run_folder_goes_is_one_line(small_data, tmp_path):
    (tmp_path / "runs").write_text("a file")
    one_line_error(run_toolkit(*_train_args(small_data, tmp_path / "runs"), check=False), "cannot create the run folder")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "r").write_text("a file named like the run")
    one_line_error(run_toolkit(*_train_args(small_data, tmp_path / "out", "train.resume=auto"), check=False),
                   "cannot create the run folder", "a file of that name is in the way")


@pytest.mark.parametrize("victim", ["best.safetensors", "metrics.jsonl", "report", "state"])
def test_train_with_a_folder_or_file_in_the_way_inside_the_run_is_one_line(small_data, tmp_path, victim):
    run = tmp_path / "r"
    run.mkdir()
    if victim in ("report", "state"):  # a file where the run writes a folder
        (run / victim).write_text("in the way")
    else:  # a folder where the run writes a file
        (run / victim).mkdir()
        (run / victim / "x").write_text("keep me")
    proc = run_toolkit(*_train_args(small_data, tmp_path, "train.resume=auto"), check=False)
    one_line_error(proc, "cannot write", victim)
    assert (run / victim).exists() and not (run / ".lock").exists()


@pytest.mark.parametrize("limit", [3000, 40_000])
def test_train_on_a_full_disk_is_one_line(small_data, tmp_path, limit):
    """Files cannot grow past `limit` bytes: the weights (3000) or the resume state's optimizer file (40 KB) fail."""
    proc = run_toolkit(*_train_args(small_data, tmp_path), check=False, preexec_fn=small_disk(limit))
    line = one_line_error(proc, "cannot write", str(tmp_path / "r"))
    assert ("safetensors" in line) if limit == 3000 else ("resume state" in line or "safetensors" in line)
    assert not [n for n in os.listdir(tmp_path / "r") if n.startswith(".")]  # no temporaries, no lock left
