"""What each `toolkit` subcommand does: one function per subcommand, taking the parsed arguments.

Each imports its stage lazily, so `toolkit --help` and `toolkit predict` start fast and predict
never imports torch. The arguments themselves are defined in parser.py.
"""

from __future__ import annotations

import logging
import os
import sys

from toolkit import UserError
from toolkit.cli.parser import build_parser


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

    if not Path(target).exists():
        from toolkit import UserError

        raise UserError(f"'{target}' does not exist: give a config file (YAML) or a folder of class subfolders")
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

        print(f"  skipped {describe_skipped(summary['skipped'])}",
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


COMMANDS = {"data": cmd_data, "train": cmd_train, "config": cmd_config, "evaluate": cmd_evaluate,
            "export": cmd_export, "predict": cmd_predict, "preview": cmd_preview, "inspect": cmd_inspect,
            "report": cmd_report, "models": cmd_models, "completion": cmd_completion}  # parser.py's subcommands
