"""Train image classifiers with PyTorch + Accelerate, export to ONNX, predict with onnxruntime.

Importing the package is cheap: torch and friends are imported by the stages that need them.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem the user can fix (bad config key, missing folder, wrong model file).

    The command line prints its message as one line, without a traceback.
    """
