"""Files beside an export that other tools read: <name>.config.json and the model card <name>.README.md.

Several exports share one folder (exported/), so each sidecar carries the model's name:
exported/NAME.onnx, NAME.json (the export report), NAME.config.json, NAME.README.md.
config.json uses timm's pretrained_cfg vocabulary (architecture, num_classes, label_names,
and pretrained_cfg with input_size, interpolation, mean, std, crop_pct, crop_mode), so timm's
resolve_data_config and Hugging Face tooling read the preprocessing without our code.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from toolkit import __version__
from toolkit.core.files import printable
from toolkit.core.meta import Meta
from toolkit.core.metrics import run_figures


def sidecars(out: Path) -> list[Path]:
    """The config.json and model card paths that belong to the ONNX file `out`."""
    return [out.with_suffix(".config.json"), out.with_suffix(".README.md")]


def export_command(checkpoint, out: Path, data_dir, input_dtype: str, variant: str, min_agreement: float,
                   opset: int | None, model_version: int) -> str:
    """The `toolkit export` command line that makes this export (also when called from Python)."""
    words = ["toolkit", "export", str(checkpoint), "-o", str(out)]
    words += ["--data", str(data_dir)] if data_dir else []
    words += ["--input", input_dtype] if input_dtype != "float32" else []
    words += [f"--{variant}"] if variant != "fp32" else []
    words += ["--min-agreement", f"{min_agreement:g}"] if variant != "fp32" and min_agreement != 0.99 else []
    words += ["--opset", str(opset)] if opset else []
    words += ["--model-version", str(model_version)] if model_version != 1 else []
    return shlex.join(words)


def pretrained_cfg(meta: Meta, onnx_name: str) -> dict:
    """The export's config.json: timm's vocabulary, plus a `toolkit` block with the ONNX input contract."""
    arch = meta.arch.removeprefix("timm/")
    return {
        "architecture": arch,
        "num_classes": meta.num_classes,
        "label_names": list(meta.class_names),
        "pretrained_cfg": {
            "architecture": arch,
            "num_classes": meta.num_classes,
            "label_names": list(meta.class_names),
            "input_size": [meta.channels, meta.image_size, meta.image_size],
            "interpolation": meta.interpolation,  # the resize filter decoding used (core.images.FILTERS)
            "mean": list(meta.mean),  # what the network was trained with; the ONNX graph applies it itself
            "std": list(meta.std),
            "crop_pct": 1.0,  # center_crop: shorter side to input size, then the centre square; no border
            "crop_mode": "center" if meta.resize == "center_crop" else "squash",
        },
        "toolkit": {"version": __version__, "arch": meta.arch, "model": onnx_name, "input_name": meta.input_name,
                    "input_dtype": meta.input_dtype, "layout": meta.layout, "normalize_in_graph": meta.normalize_in_graph,
                    "resize": meta.resize, "interpolation": meta.interpolation, "metadata_schema": meta.schema},
    }


def write_sidecars(out: Path, meta: Meta, report: dict, command: str, weights: Path) -> list[Path]:
    """Write NAME.config.json and NAME.README.md beside `out`; returns their paths."""
    config_path, card_path = sidecars(out)
    config_path.write_text(json.dumps(pretrained_cfg(meta, out.name), indent=2) + "\n")
    card_path.write_text(model_card(out, meta, report, command, weights))
    return [config_path, card_path]


def _run_config(weights: Path) -> dict:
    import yaml

    path = weights.parent / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def figures_of(meta: Meta, weights: Path) -> dict | None:
    """The run's figures (core.metrics.run_figures: best, last, test) when `weights` are its best epoch's."""
    fig = run_figures(weights.parent)
    return fig if fig and fig["best_epoch"] == meta.metrics.get("epoch") else None


def _accuracy_lines(meta: Meta, weights: Path, out: Path) -> list[str]:
    m, fig = meta.metrics or {}, figures_of(meta, weights)
    if fig is None:  # weights without their run, or not the best epoch's
        return [f"- validation accuracy when the weights were saved: {_pct(m.get('val_accuracy'))} on "
                f"{m.get('val_count', '?')} images (epoch {m.get('epoch', '?')}; micro: correct / images)"]
    command = str(fig.get("command")).replace(" MODEL ", f" {shlex.quote(str(out))} ", 1)  # this very file
    test = (f"- test accuracy: {_pct(fig['test_accuracy'])} on {fig['test_count']} untouched images of "
            f"{printable(str(fig['test_source']))}, never trained or selected on (`{printable(command)}`)"
            if fig.get("test_accuracy") is not None else
            "- test accuracy: none (no untouched test set: a `test/` folder or `data.test_fraction` gives one)")
    return [f"- validation accuracy: {_pct(fig['best_val_accuracy'])} on {fig['val_count']} images at epoch "
            f"{fig['best_epoch']}, the epoch chosen on validation (so optimistic for new images); last epoch "
            f"({fig['last_epoch']}): {_pct(fig['last_val_accuracy'])} (micro: correct / images)", test]


def model_card(out: Path, meta: Meta, report: dict, command: str, weights: Path) -> str:
    """The model card: what it is, the data, the classes, the metrics and the commands that made it."""
    m, val = meta.metrics or {}, report.get("validation") or {}
    run_cfg = _run_config(weights)
    data = run_cfg.get("data") or {}
    trained = meta.extra.get("train_command") or (
        f"toolkit train {shlex.quote(str(weights.parent / 'config.yaml'))}  # the run's resolved config"
        if run_cfg else "(not recorded)")
    per_class = m.get("per_class") or {}
    lines = [
        f"# {out.stem}", "",
        f"An image classifier: `{meta.arch}`, {meta.num_classes} classes, {meta.image_size} x {meta.image_size} RGB "
        f"input, {report.get('variant', 'fp32')} ONNX (opset {report.get('opset')}), exported by toolkit {__version__}.",
        "", "## Files", "",
        f"- `{out.name}`: the model. Input `{meta.input_name}`: (batch, 3, {meta.image_size}, {meta.image_size}) "
        f"{meta.input_dtype} RGB, {'pixels / 255 in [0, 1]' if meta.input_dtype == 'float32' else 'pixels 0..255'}, "
        f"after `{meta.resize}` resizing ({meta.interpolation} filter); the normalisation (mean {meta.mean}, "
        f"std {meta.std}) is inside the graph. "
        f"Output `{meta.output_name}`: (batch, {meta.num_classes}) logits in the class order below.",
        f"- `{out.with_suffix('.json').name}`: the export report (parity with torch, accuracy, latency, sha256).",
        f"- `{out.with_suffix('.config.json').name}`: the preprocessing in timm's `pretrained_cfg` vocabulary.",
        "", "## Data", "",
        f"- trained on: {data.get('kind', '?')} data at `{data.get('root', '?')}`" if data else "- trained on: unknown "
        "(the weights were exported without their run directory)",
        *_accuracy_lines(meta, weights, out),
        f"- this export checked on {val.get('images', '?')} images ({val.get('source', '?')}): accuracy "
        f"{_pct(val.get('onnx_accuracy'))} (torch: {_pct(val.get('torch_accuracy'))}); max logit difference to "
        f"torch {report.get('parity_vs_torch', {}).get('max_logit_diff', float('nan')):.2e}",
        "", "## Classes", "", "| index | class | validation accuracy |", "|---|---|---|",
    ]
    lines += [f"| {i} | {printable(name)} | {_pct(per_class.get(name))} |" for i, name in enumerate(meta.class_names)]
    lines += ["", "## How it was made", "", "```", trained, command, "```", "",
              "## Use", "", "```", f"toolkit predict {shlex.quote(str(out))} photos/ -o predictions.csv",
              f"toolkit evaluate {shlex.quote(str(out))} labelled_photos/", "```", ""]
    return "\n".join(lines)
