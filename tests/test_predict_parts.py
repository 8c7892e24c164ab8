"""The decision both predict engines take about an earlier output: start new, resume it, replace it, or refuse."""

import re

import pytest

from toolkit import UserError
from toolkit.predict.parts import resume_or_overwrite

RUN = {"engine": "local", "model": "a.onnx", "model_sha256": "aa", "input_dir": "/photos", "world_size": 1,
       "topk": 1, "max_pixels": 100, "fallback": None, "format": "csv", "outputs": "logits", "chunk_size": None}
OUT = "out.csv"  # stands for any earlier output: a path or a storage location, named in the messages


def partial(**changes) -> dict:
    return {**RUN, "run_id": "r1", "complete": False, **changes}


@pytest.mark.parametrize("earlier, record, resume, overwrite, expect", [
    ([], None, False, False, "new"),  # a fresh output
    ([], None, True, False, "new"),  # --resume of nothing starts it
    ([], None, False, True, "overwrite"),  # nothing to remove, but the caller removes `earlier`
    ([OUT], partial(), True, False, "resume"),  # an interrupted run of the same model and input
    ([OUT], partial(complete=True), True, False, "resume"),  # complete: the caller returns its summary
    ([], partial(), True, False, "resume"),  # a process whose own part is not written yet
    ([OUT], partial(), False, True, "overwrite"),
    ([OUT], partial(model_sha256="bb"), False, True, "overwrite"),  # --overwrite checks nothing
    ([OUT], partial(model_sha256="bb"), True, True, "overwrite"),  # --overwrite wins over --resume
    ([OUT], None, False, True, "overwrite"),
])
def test_decision(earlier, record, resume, overwrite, expect):
    assert resume_or_overwrite(earlier, record, RUN, resume, overwrite, "out.csv.run.json") == expect


@pytest.mark.parametrize("earlier, record, resume, message", [
    ([OUT], None, False, "'out.csv' already exists; pass --resume to continue it or --overwrite to replace it"),
    ([OUT], partial(), False, "'out.csv' already exists; pass --resume"),  # partial, without a flag
    ([OUT], partial(complete=True), False, "'out.csv' already exists; pass --resume"),
    ([OUT, "out.csv.run.json"], None, True,
     "'out.csv' has no run record (out.csv.run.json), so it cannot be checked against this model"),
    ([OUT], partial(model_sha256="bb"), True, "written with another model (a.onnx); refusing to resume"),
    ([OUT], partial(input_dir="/other"), True, "another input folder ('/other', now '/photos')"),
    ([OUT], partial(topk=3), True, "another --topk (3, now 1)"),
    ([OUT], partial(engine="ray"), True, "written by the ray engine; resume it with --engine ray"),
])
def test_refusals_name_the_output_and_the_reason(earlier, record, resume, message):
    with pytest.raises(UserError, match=re.escape(message)):
        resume_or_overwrite(earlier, record, RUN, resume, False, "out.csv.run.json")
