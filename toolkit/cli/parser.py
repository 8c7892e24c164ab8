"""The `toolkit` command's argument parser: one function per subcommand, what each takes and its help.

Only the interface lives here; what each subcommand does is in commands.py (COMMANDS, keyed by the
subcommand's name). Nothing heavy is imported: `toolkit --help` starts fast.
"""

from __future__ import annotations

import argparse

from toolkit import __version__

EPILOG = """examples:
  toolkit data shapes data/shapes
  toolkit train my_photos                      # a folder: the recipe is chosen from the data
  toolkit train configs/quickstart.yaml train.epochs=5 optim.lr=0.1
  toolkit config configs/quickstart.yaml optim.lr=0.1    # the resolved config; train --help lists every key
  accelerate launch --config_file launch/cpu_ddp.yaml -m toolkit train configs/quickstart.yaml
  toolkit evaluate runs/quickstart data/shapes/val
  toolkit export runs/quickstart -o exported/quickstart.onnx
  toolkit predict exported/quickstart.onnx data/shapes/val -o predictions.csv
"""

KEYS_TABLE = "{config keys}"  # replaced by the key table when the help is printed


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; builds the config key table only when a help is printed."""

    def _format_text(self, text: str) -> str:
        if KEYS_TABLE in text:
            from toolkit.config_docs import help_text

            text = text.replace(KEYS_TABLE, help_text())
        return super()._format_text(text)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; `args.command` names the subcommand chosen (a key of commands.COMMANDS)."""
    p = argparse.ArgumentParser(prog="toolkit", description="Train, export and run image classifiers.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"toolkit {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_subcommand in (_data, _train_and_config, _evaluate, _export, _predict, _preview, _inspect, _report,
                           _models, _completion):  # the order of `toolkit --help`
        add_subcommand(sub)
    return p


def _add(sub, name: str, help: str, example: str, keys_table: bool = False) -> argparse.ArgumentParser:
    """A subcommand whose help shows `example` (and the config key table where `keys_table`)."""
    epilog = f"example:\n  {example}" + (f"\n\n{KEYS_TABLE}" if keys_table else "")
    return sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=HelpFormatter)


def _data(sub) -> None:
    from pathlib import Path

    d = _add(sub, "data", "generate the built-in shapes dataset", "toolkit data shapes data/shapes")
    d.add_argument("kind", choices=["shapes"])
    d.add_argument("out", type=Path, help="folder to create (OUT/train/<class>/, OUT/val/<class>/)")
    d.add_argument("--train-per-class", type=int, default=500)
    d.add_argument("--val-per-class", type=int, default=100)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", type=int, default=32, help="image side in pixels")


def _train_and_config(sub) -> None:
    for name, help, example in (
            ("train", "train a model from a YAML config, or from a data folder with a recipe chosen from "
             "the data; key=value overrides either way",
             "toolkit train my_photos train.budget_minutes=10\n  toolkit train configs/quickstart.yaml train.epochs=3"),
            ("config", "print the resolved config as YAML (what `toolkit train` would run; it takes "
             "the output back unchanged)", "toolkit config configs/quickstart.yaml optim.lr=0.1 > my.yaml")):
        t = _add(sub, name, help, example, keys_table=True)
        t.add_argument("config", help="experiment YAML (configs/*.yaml), or a folder of class subfolders "
                                      "(DIR/<class>/ or DIR/train/<class>/): the recipe is chosen from the data")
        t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=0.1 model.arch=resnet_small")


def _evaluate(sub) -> None:
    e = _add(sub, "evaluate", "accuracy, per-class accuracy and confusion of a model on a labelled folder",
            "toolkit evaluate exported/quickstart.onnx data/shapes/val --json")
    e.add_argument("model", help=".onnx file, .safetensors file or run directory")
    e.add_argument("data_dir", help="folder with one subfolder of images per class")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--files", help="only the images this list names (one <class>/<file> per line, relative to "
                                   "DATA_DIR), e.g. a run's test_files.txt")
    _foreign_model(e)


def _export(sub) -> None:
    x = _add(sub, "export", "export weights to a verified ONNX file with embedded metadata",
            "toolkit export runs/quickstart -o exported/quickstart.onnx")
    x.add_argument("checkpoint", help=".safetensors file or run directory (its best.safetensors)")
    x.add_argument("-o", "--output", help="default: exported/<run name>.onnx; beside it <name>.json (report), "
                                          "<name>.config.json and <name>.README.md (model card)")
    x.add_argument("--data", help="images for the checks and int8 calibration (default: the run's data)")
    x.add_argument("--input", choices=["float32", "uint8"], default="float32",
                   help="float32: NCHW RGB in [0, 1] (default); uint8: NCHW RGB 0..255")
    kind = x.add_mutually_exclusive_group()
    kind.add_argument("--fp16", action="store_true", help="half-precision weights and arithmetic")
    kind.add_argument("--int8", action="store_true", help="static int8 quantization (QDQ), calibrated on training images")
    x.add_argument("--min-agreement", type=float, default=0.99,
                   help="refuse an fp16/int8 model whose top-1 agrees with fp32 on fewer validation images (0.99)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output and the files beside it")
    x.add_argument("--opset", type=int, help="ONNX opset, e.g. 17 for an older runtime (default: the exporter's)")
    x.add_argument("--model-version", type=int, default=1, help="the ONNX file's model_version (default 1)")


def _predict(sub) -> None:
    from toolkit.core.meta import MAX_PIXELS

    r = _add(sub, "predict", "predict every image under a folder with an ONNX model",
            "toolkit predict exported/quickstart.onnx photos/ -o predictions.csv --topk 3")
    r.add_argument("model", help="ONNX file written by toolkit export")
    r.add_argument("input_dir", help="folder of images (searched recursively), or a URL (s3://bucket/photos)")
    r.add_argument("-o", "--output", default="predictions.csv",
                   help=".csv, .jsonl or .parquet (with pyarrow), a path or a URL; default predictions.csv. "
                        "--engine ray: any other name is a folder of Parquet part files")
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--topk", type=int, default=1, help="write the k best classes: label,score (the best) then top2_label,top2_score ... topK_*")
    r.add_argument("--resume", action="store_true", help="continue an interrupted output (same model and folder)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output (and --grid file)")
    r.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="cuda is an error when unavailable; auto uses CUDA when present")
    r.add_argument("--workers", type=int, default=0, help="decode processes (default: the cores of this process); "
                                                               "--engine ray: inference actors (default: one per "
                                                               "CPU, or per GPU with --device cuda)")
    r.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: onnxruntime's choice)")
    r.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="refuse larger images (decompression bombs), checked before decoding")
    r.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: worker processes on this machine; ray: Ray Data, on a local Ray or --address")
    r.add_argument("--address", help="--engine ray: the Ray cluster (host:6379, ray://host:10001, auto); "
                                     "default $RAY_ADDRESS, else a local Ray on this machine's cores")
    r.add_argument("--chunk-size", type=int, default=1024,
                   help="--engine ray: files per part file and per Ray task (a multiple of --batch-size)")
    r.add_argument("--grid", help="also draw predictions spread across the output into this PNG (captions coloured by "
                                        "agreement with the class folder when INPUT has class subfolders)")
    r.add_argument("--grid-count", type=int, default=32, help="images in --grid (default 32)")
    _foreign_model(r)


def _foreign_model(parser: argparse.ArgumentParser) -> None:
    """evaluate and predict: what the user states about a model exported elsewhere, without toolkit metadata."""
    g = parser.add_argument_group("ONNX models without toolkit metadata")
    g.add_argument("--classes", help="class names in output order, comma-separated, or @FILE (one per line)")
    g.add_argument("--size", type=int, help="input side in pixels (default: from the graph)")
    g.add_argument("--mean", help="per-channel mean on the [0, 1] scale, e.g. 0.485,0.456,0.406 "
                                  "(omit when normalisation is inside the graph)")
    g.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225")
    g.add_argument("--resize", choices=["center_crop", "squash"], default="center_crop")
    g.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear", help="resize filter")
    g.add_argument("--outputs", choices=["logits", "probabilities", "log-probabilities"],
                   help="what the model outputs (default: read from the graph: a last Softmax or Sigmoid "
                        "gives probabilities, LogSoftmax log-probabilities, anything else logits)")


def _preview(sub) -> None:
    v = _add(sub, "preview", "a grid of sample images per class, and the class counts",
            "toolkit preview data/shapes -o grid.png")
    v.add_argument("data_dir", help="folder of class subfolders (or with train/ and val/ inside)")
    v.add_argument("-o", "--output", default="preview.png", help="PNG file to write (default preview.png)")
    v.add_argument("--per-class", type=int, default=8, help="images shown per class")
    v.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _inspect(sub) -> None:
    n = _add(sub, "inspect", "an image as numbers: its pixels and the tensor a model sees",
            "toolkit inspect data/shapes/train/star/star_00000.png --model runs/quickstart")
    n.add_argument("image")
    n.add_argument("--model", help="use this model's input size, resize policy and filter, mean and std (.onnx or "
                                    "run dir)")
    n.add_argument("--size", type=int, default=32, help="side in pixels after resizing (without --model)")
    n.add_argument("--resize", choices=["center_crop", "squash"], default="center_crop")
    n.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear", help="resize filter")


def _report(sub) -> None:
    rp = _add(sub, "report", "write the report of a run again (e.g. one that was stopped before it finished)",
             "toolkit report runs/quickstart")
    rp.add_argument("run", help="run directory (train.out_dir/<name>)")


def _models(sub) -> None:
    _add(sub, "models", "list the registered model architectures", "toolkit models")


def _completion(sub) -> None:
    c = _add(sub, "completion", "print a shell completion script (commands, options, config keys)",
            "source <(toolkit completion bash)    # or save it under ~/.local/share/bash-completion/completions/toolkit")
    c.add_argument("shell", choices=["bash"], help="bash (zsh: autoload bashcompinit && bashcompinit first)")
