"""The files an export leaves for other tools, and the messages around exporting: flat ONNX metadata,
config.json in timm's vocabulary, the model card, --opset, --overwrite, unfinished runs, refused variants."""

import json
import shlex

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import run_toolkit
import toolkit.export.release as release
from toolkit import UserError
from toolkit.core.meta import read_meta


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """tiny_run exported with model_version 3 into a folder that holds it and its sidecars."""
    out = tmp_path_factory.mktemp("exported") / "tiny.onnx"
    return release.export(tiny_run, out, model_version=3)


def test_the_folder_holds_the_model_its_report_config_and_card(exported):
    assert sorted(p.name for p in exported.parent.iterdir()) == ["tiny.README.md", "tiny.config.json", "tiny.json",
                                                                 "tiny.onnx"]


def test_config_json_is_the_meta_in_timms_vocabulary(exported):
    meta = read_meta(exported)
    config = json.loads(exported.with_suffix(".config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert config["label_names"] == cfg["label_names"] == meta.class_names
    assert config["num_classes"] == cfg["num_classes"] == meta.num_classes == 10
    assert config["architecture"] == cfg["architecture"] == meta.arch == "tutorial_net_bn"
    assert cfg["input_size"] == [3, meta.image_size, meta.image_size]
    assert cfg["mean"] == meta.mean and cfg["std"] == meta.std
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == ("bilinear", 1.0, "center")
    assert config["toolkit"]["normalize_in_graph"] is True and config["toolkit"]["model"] == "tiny.onnx"
    timm_data = pytest.importorskip("timm.data")  # timm itself reads the preprocessing back
    resolved = timm_data.resolve_data_config(pretrained_cfg=cfg)
    assert tuple(resolved["input_size"]) == (3, 32, 32) and list(resolved["mean"]) == meta.mean
    assert list(resolved["std"]) == meta.std and resolved["crop_mode"] == "center"


def test_flat_metadata_doc_string_and_version_are_read_by_onnxruntime(exported):
    meta = read_meta(exported)
    info = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).get_modelmeta()
    flat = info.custom_metadata_map
    assert json.loads(flat["class_names"]) == meta.class_names
    assert json.loads(flat["image_size"]) == meta.image_size and json.loads(flat["num_classes"]) == 10
    assert json.loads(flat["mean"]) == meta.mean and json.loads(flat["std"]) == meta.std
    assert flat["resize"] == meta.resize == "center_crop" and flat["normalize_in_graph"] == "true"
    assert flat["input_size"] == "[3, 32, 32]" and flat["input_dtype"] == "float32"
    assert json.loads(flat["toolkit_meta"])["class_names"] == meta.class_names  # the versioned record stays
    assert info.version == 3
    assert "10 classes" in info.description and "(batch, 3, 32, 32)" in info.description


def test_the_model_card_names_data_classes_metrics_and_commands(exported, tiny_run):
    card = exported.with_suffix(".README.md").read_text()
    meta = read_meta(exported)
    report = json.loads(exported.with_suffix(".json").read_text())
    assert f"{100 * meta.metrics['val_accuracy']:.2f}% on {meta.metrics['val_count']} images" in card
    assert f"accuracy {100 * report['validation']['onnx_accuracy']:.2f}%" in card
    assert "shapes data at" in card
    for i, name in enumerate(meta.class_names):
        assert f"| {i} | {name} | {100 * meta.metrics['per_class'][name]:.2f}% |" in card
    commands = card.split("## How it was made")[1].split("```")[1].strip().splitlines()
    assert commands[1] == shlex.join(["toolkit", "export", str(tiny_run), "-o", str(exported), "--model-version", "3"])
    assert commands[0].startswith("toolkit train")


def test_export_refuses_to_overwrite_without_the_flag(exported, tiny_run):
    before = exported.read_bytes()
    proc = run_toolkit("export", tiny_run, "-o", exported, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: '{exported}' already exists; --overwrite replaces it (and the files " \
                                  "beside it), or choose another -o"
    assert exported.read_bytes() == before
    card = exported.with_suffix(".README.md")
    other = exported.with_name("other.onnx")
    other.with_suffix(".README.md").write_text("my notes")  # a sidecar's name taken by someone else's file
    for overwrite in (False, True):  # is never replaced: only an earlier export's files are (its model beside them)
        with pytest.raises(UserError, match="other.README.md' exists and was not written by an export of 'other.onnx'"):
            release.export(tiny_run, other, overwrite=overwrite)
    assert other.with_suffix(".README.md").read_text() == "my notes" and not other.exists()
    run_record = tiny_run / "metrics.json"  # e.g. -o <run>/metrics.onnx: the report would replace a run's file
    run_record.write_text("{}")
    try:
        with pytest.raises(UserError, match="metrics.json' exists and was not written by an export"):
            release.export(tiny_run, tiny_run / "metrics.onnx", overwrite=True)
        assert run_record.read_text() == "{}"
    finally:
        run_record.unlink()
    release.export(tiny_run, exported, overwrite=True, model_version=3)
    assert card.is_file() and ort.InferenceSession(str(exported)).get_modelmeta().version == 3


def test_opset_for_older_consumers(tiny_run, exported, tmp_path):
    old = release.export(tiny_run, tmp_path / "old.onnx", opset=17)
    model = onnx.load(str(old))
    assert {o.domain: o.version for o in model.opset_import}.get("", 0) == 17
    assert read_meta(old).extra["opset"] == 17 and json.loads(old.with_suffix(".json").read_text())["opset"] == 17
    x = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
           for p in (old, exported)]
    np.testing.assert_allclose(run[0], run[1], atol=1e-5)
    with pytest.raises(UserError, match="--opset must be between"):
        release.export(tiny_run, tmp_path / "x.onnx", opset=5)


def test_release_weights_say_format_pt(tiny_run):
    from safetensors import safe_open

    with safe_open(str(tiny_run / "best.safetensors"), framework="numpy") as f:
        assert f.metadata()["format"] == "pt"


def _stopped_run(root, epoch: int, step: int):
    """A run directory as a run stopped before its first evaluation leaves it: config and a resume state."""
    run = root / "stopped"
    (run / "state" / f"step-{step:09d}").mkdir(parents=True)
    (run / "state" / f"step-{step:09d}" / "done.json").write_text(json.dumps({"epoch": epoch, "step": step}))
    (run / "config.yaml").write_text("name: stopped\n")
    return run


def test_a_run_stopped_before_its_first_epoch_says_so_through_every_door(tmp_path, shapes_dir):
    run = _stopped_run(tmp_path, epoch=0, step=7)
    expected = (f"error: run '{run}' has no weights yet: no epoch completed (it stopped at optimizer step 7 of "
                f"epoch 1); resume it with `toolkit train {run}/config.yaml train.resume={run}`")
    image = next((shapes_dir / "val" / "star").iterdir())
    for args in (["export", run], ["evaluate", run, shapes_dir / "val"], ["inspect", image, "--model", run]):
        proc = run_toolkit(*args, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == expected, args
    never = tmp_path / "never"
    (never / "config.yaml").parent.mkdir()
    (never / "config.yaml").write_text("name: never\n")
    with pytest.raises(UserError, match="no epoch completed and no resume state was saved; train it again"):
        release.export(never)


def test_a_refused_int8_export_gives_both_accuracies(tiny_run, exported, tmp_path):
    fp32 = json.loads(exported.with_suffix(".json").read_text())["validation"]["onnx_accuracy"]
    with pytest.raises(release.ExportMismatch) as e:
        release.export(tiny_run, tmp_path / "m.int8.onnx", variant="int8", min_agreement=1.01)
    message = str(e.value)
    assert f"against fp32's {100 * fp32:.2f}% on these labelled images; nothing was written" in message
    assert "; its accuracy is " in message and not list(tmp_path.iterdir())
