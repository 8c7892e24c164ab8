"""`toolkit` command line: data, train, config, evaluate, export, predict, preview, inspect, report, models,
completion.

Each command imports its stage lazily, so `toolkit --help` and `toolkit predict` start
fast and predict never imports torch. Errors a user can cause are one line; --debug
shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from toolkit import UserError, __version__

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


def cmd_data(args) -> None:
    from toolkit.train.datasets import shapes

    if args.out.exists():
        raise UserError(f"'{args.out}' already exists; choose a new folder or remove it")
    from toolkit.core.progress import progress_bar

    n = (args.train_per_class + args.val_per_class) * len(shapes.CLASSES)
    bar = progress_bar(n, "drawing images")
    shapes.generate(args.out, args.train_per_class, args.val_per_class, seed=args.seed, size=args.size,
                    progress=bar.update)
    bar.close()
    logging.getLogger("toolkit").info("wrote %d images of %d classes", n, len(shapes.CLASSES))
    print(args.out)


def resolve_config(target: str, overrides: list[str]):
    """A config file plus overrides, or for a data folder the recipe chosen from the data plus overrides."""
    from pathlib import Path

    if Path(target).is_dir():
        from toolkit.train.recipe import recipe_for  # torch-free

        return recipe_for(target, overrides)
    from toolkit.config import load_config

    return load_config(target, overrides)


def _config(args):
    """The checked config of `toolkit train` and `toolkit config`: every key and the model name are
    validated here, before torch is imported and before any data is read."""
    from toolkit.train.catalog import check_arch  # torch-free

    cfg = resolve_config(args.config, args.overrides)
    check_arch(cfg.model.arch)
    return cfg


def cmd_train(args) -> None:
    cfg = _config(args)
    from toolkit.train import train  # torch from here on

    run_dir = train(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(run_dir)


def cmd_config(args) -> None:
    from toolkit.config_docs import resolved_yaml

    cfg = _config(args)
    source = " ".join([str(args.config), *args.overrides])
    sys.stdout.write(resolved_yaml(cfg, source))


def cmd_completion(args) -> None:
    from toolkit.completion import bash_script

    sys.stdout.write(bash_script(build_parser()))


def _fallback(args) -> dict:
    """What the user states about an ONNX model that carries no toolkit metadata."""
    def floats(text, name):
        if text is None:
            return None
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) != 3:
            raise UserError(f"{name} needs three comma-separated numbers, e.g. 0.485,0.456,0.406; got '{text}'")
        return values

    classes = args.classes
    if classes and classes.startswith("@"):  # @file: one class name per line
        from pathlib import Path

        try:
            classes = ",".join(line.strip() for line in Path(classes[1:]).read_text().splitlines() if line.strip())
        except OSError as e:
            raise UserError(f"--classes file '{classes[1:]}' cannot be read ({e.strerror or e})") from None
    return {"classes": classes.split(",") if classes else None, "size": args.size,
            "mean": floats(args.mean, "--mean"), "std": floats(args.std, "--std"), "resize": args.resize,
            **({"interpolation": args.interpolation} if args.interpolation != "bilinear" else {})}  # as older records


def cmd_evaluate(args) -> None:
    from toolkit.evaluate import evaluate_folder, format_result

    result = evaluate_folder(args.model, args.data_dir, batch_size=args.batch_size, fallback=_fallback(args),
                             outputs=args.outputs, files=args.files)
    if args.json:
        import json

        print(json.dumps(result))
    else:
        print(format_result(result))


def cmd_export(args) -> None:
    from toolkit.export import export

    variant = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    out = export(args.checkpoint, args.output, data_dir=args.data, input_dtype=args.input, variant=variant,
                 min_agreement=args.min_agreement, overwrite=args.overwrite, opset=args.opset,
                 model_version=args.model_version)
    print(out)


def cmd_predict(args) -> None:
    from toolkit.predict import predict

    summary = predict(args.model, args.input_dir, args.output, batch_size=args.batch_size, topk=args.topk,
                      workers=args.workers, threads=args.threads, device=args.device, resume=args.resume,
                      overwrite=args.overwrite, max_pixels=args.max_pixels, fallback=_fallback(args),
                      grid=args.grid, grid_count=args.grid_count, outputs=args.outputs, engine=args.engine,
                      chunk_size=args.chunk_size, address=args.address)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # the main process merges the parts and reports
    for name, n in summary["per_class"].items():
        print(f"  {name}: {n}", file=sys.stderr)
    for reason, n in summary["errors"].items():
        print(f"  error '{reason}': {n}", file=sys.stderr)
    if summary.get("skipped"):
        from toolkit.core.formats import describe_skipped

        print(f"  skipped {describe_skipped(summary['skipped'])} (not an image format this decoder reads)",
              file=sys.stderr)
    print(f"{summary['ok']} ok, {summary['failed']} failed -> {summary['output']}")


def cmd_preview(args) -> None:
    from toolkit.core.pictures import preview

    counts = preview(args.data_dir, args.output, per_class=args.per_class, overwrite=args.overwrite)
    width = max(len(c) for c in counts)
    for name, n in counts.items():
        print(f"{name:<{width}}  {n:>7,}", file=sys.stderr)
    print(args.output)


def cmd_inspect(args) -> None:
    from toolkit.core.pictures import inspect

    size, resize, mean, std, filt = args.size, args.resize, None, None, args.interpolation
    if args.model:
        from toolkit.core.meta import read_meta

        meta = read_meta(args.model)
        size, resize, mean, std, filt = meta.image_size, meta.resize, meta.mean, meta.std, meta.interpolation
    print(inspect(args.image, size, resize, mean, std, filt))


def cmd_report(args) -> None:
    from toolkit.train.rebuild import rebuild_report

    out = rebuild_report(args.run)
    print(out / "report.md")


def cmd_models(args) -> None:
    from toolkit.train.catalog import builtin_models  # the names without importing torch

    for name, doc in builtin_models().items():
        print(f"{name:<18} {doc}")
    print(f"{'timm/<name>':<18} any timm model, with the timm extra (pip install 'toolkit[timm]')")


KEYS_TABLE = "{config keys}"  # replaced by the key table when the help is printed


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; builds the config key table only when a help is printed."""

    def _format_text(self, text: str) -> str:
        if KEYS_TABLE in text:
            from toolkit.config_docs import help_text

            text = text.replace(KEYS_TABLE, help_text())
        return super()._format_text(text)


def build_parser() -> argparse.ArgumentParser:
    from toolkit.core.meta import MAX_PIXELS
    from pathlib import Path

    p = argparse.ArgumentParser(prog="toolkit", description="Train, export and run image classifiers.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"toolkit {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help, example, keys_table=False):
        epilog = f"example:\n  {example}" + (f"\n\n{KEYS_TABLE}" if keys_table else "")
        sp = sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=HelpFormatter)
        sp.set_defaults(fn=fn)
        return sp

    d = add("data", cmd_data, "generate the built-in shapes dataset", "toolkit data shapes data/shapes")
    d.add_argument("kind", choices=["shapes"])
    d.add_argument("out", type=Path, help="folder to create (OUT/train/<class>/, OUT/val/<class>/)")
    d.add_argument("--train-per-class", type=int, default=500)
    d.add_argument("--val-per-class", type=int, default=100)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", type=int, default=32, help="image side in pixels")

    for name, fn, help, example in (
            ("train", cmd_train, "train a model from a YAML config, or from a data folder with a recipe chosen from "
             "the data; key=value overrides either way",
             "toolkit train my_photos train.budget_minutes=10\n  toolkit train configs/quickstart.yaml train.epochs=3"),
            ("config", cmd_config, "print the resolved config as YAML (what `toolkit train` would run; it takes "
             "the output back unchanged)", "toolkit config configs/quickstart.yaml optim.lr=0.1 > my.yaml")):
        t = add(name, fn, help, example, keys_table=True)
        t.add_argument("config", help="experiment YAML (configs/*.yaml), or a folder of class subfolders "
                                      "(DIR/<class>/ or DIR/train/<class>/): the recipe is chosen from the data")
        t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=0.1 model.arch=resnet_small")

    e = add("evaluate", cmd_evaluate, "accuracy, per-class accuracy and confusion of a model on a labelled folder",
            "toolkit evaluate exported/quickstart.onnx data/shapes/val --json")
    e.add_argument("model", help=".onnx file, .safetensors file or run directory")
    e.add_argument("data_dir", help="folder with one subfolder of images per class")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--files", help="only the images this list names (one <class>/<file> per line, relative to "
                                   "DATA_DIR), e.g. a run's test_files.txt")

    x = add("export", cmd_export, "export weights to a verified ONNX file with embedded metadata",
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

    r = add("predict", cmd_predict, "predict every image under a folder with an ONNX model",
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

    for sp in (e, r):  # a model exported elsewhere, without toolkit metadata
        g = sp.add_argument_group("ONNX models without toolkit metadata")
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

    v = add("preview", cmd_preview, "a grid of sample images per class, and the class counts",
            "toolkit preview data/shapes -o grid.png")
    v.add_argument("data_dir", help="folder of class subfolders (or with train/ and val/ inside)")
    v.add_argument("-o", "--output", default="preview.png", help="PNG file to write (default preview.png)")
    v.add_argument("--per-class", type=int, default=8, help="images shown per class")
    v.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    n = add("inspect", cmd_inspect, "an image as numbers: its pixels and the tensor a model sees",
            "toolkit inspect data/shapes/train/star/star_00000.png --model runs/quickstart")
    n.add_argument("image")
    n.add_argument("--model", help="use this model's input size, resize policy and filter, mean and std (.onnx or "
                                    "run dir)")
    n.add_argument("--size", type=int, default=32, help="side in pixels after resizing (without --model)")
    n.add_argument("--resize", choices=["center_crop", "squash"], default="center_crop")
    n.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear", help="resize filter")

    rp = add("report", cmd_report, "write the report of a run again (e.g. one that was stopped before it finished)",
             "toolkit report runs/quickstart")
    rp.add_argument("run", help="run directory (train.out_dir/<name>)")

    add("models", cmd_models, "list the registered model architectures", "toolkit models")
    c = add("completion", cmd_completion, "print a shell completion script (commands, options, config keys)",
            "source <(toolkit completion bash)    # or save it under ~/.local/share/bash-completion/completions/toolkit")
    c.add_argument("shell", choices=["bash"], help="bash (zsh: autoload bashcompinit && bashcompinit first)")
    return p


# the optional extra that brings each package (pyproject.toml); the base install is what `predict` needs
EXTRAS = {"torch": "train", "torchvision": "train", "accelerate": "train", "onnx": "train", "onnxscript": "train",
          "safetensors": "train", "matplotlib": "train", "timm": "timm", "pyarrow": "parquet", "ray": "ray",
          "fsspec": "storage", "s3fs": "storage", "tensorboardX": "tensorboard"}


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install for a package missing from this install, or None."""
    package = (e.name or "").split(".")[0]
    extra = EXTRAS.get(package)
    if extra is None:
        return None
    what = "training, export and torch checkpoints" if extra == "train" else f"this ({package})"
    return f"{package} is not installed: {what} needs the {extra} extra: pip install 'toolkit[{extra}]'"


# OpenMP threads that wait for work sleep instead of spinning (read by libgomp when torch is imported, so
# set before any command imports it). Spinning threads make a small model's steps 10-60x slower as soon as
# another process shares the cores (measured by benchmarks/cpu_threads.py); an idle machine loses little.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def main(argv: list[str] | None = None) -> None:
    for key, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(key, value)  # the user's own setting wins
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("toolkit").setLevel(logging.INFO)
    if "LOCAL_RANK" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ:
        # started by a launcher (torchrun / accelerate launch): die with it, even when it is SIGKILLed, instead
        # of training on as an orphan that a restart would race; the last resume state continues the run
        import signal

        from toolkit.core.process import die_with_parent

        die_with_parent(signal.SIGKILL)
    try:
        args.fn(args)
    except UserError as e:
        if args.debug:
            raise
        rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{rank}error: {e}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as e:
        line = missing_extra(e)
        if line is None or args.debug:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`toolkit evaluate ... | head -1`): stop quietly, like head's writer
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so Python's exit flush cannot fail again
        sys.exit(141)
    except OSError as e:  # the last net under the stages' own messages: a file system error is one line too
        if args.debug:
            raise
        where = f" '{e.filename}'" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(2)
