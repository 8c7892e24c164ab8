"""Stage 3, batch prediction: onnxruntime + numpy + PIL, never torch (tests/test_layers.py holds this).

`toolkit.predict.predict(model, input, output, ...)` is imported on first use."""


def __getattr__(name: str):
    if name == "predict":
        from toolkit.predict.run import predict

        return predict
    raise AttributeError(f"module 'toolkit.predict' has no attribute '{name}'")
