"""Stage 2, export: release weights -> a verified, self-describing ONNX file (fp32, fp16, int8).

`toolkit.export.export(checkpoint, ...)` is imported on first use."""


def __getattr__(name: str):
    if name in ("export", "default_output"):
        from toolkit.export import release

        return getattr(release, name)
    if name in ("exportable", "to_onnx", "ExportMismatch"):
        from toolkit.export import onnx

        return getattr(onnx, name)
    raise AttributeError(f"module 'toolkit.export' has no attribute '{name}'")
