"""core/onnxfile.py reads what the onnx package reads: metadata, inputs, outputs, ops, external data."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit.core.onnxfile import NotOnnx, OnnxFile


def _model():
    """A graph with an initializer, a dynamic and a fixed dimension, a Softmax behind an Identity, a
    subgraph (If) with its own constant tensor, and metadata."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "W")
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        np.ones(4, np.float32), "inner"))], "then", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])])
    nodes = [helper.make_node("MatMul", ["input", "W"], ["z"]),
             helper.make_node("Softmax", ["z"], ["s"]), helper.make_node("Identity", ["s"], ["probs"]),
             helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 4]),
                               helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])], [w])
    model = helper.make_model(graph)
    model.metadata_props.add(key="toolkit_meta", value='{"classes": ["caf\u00e9"]}')
    model.metadata_props.add(key="other", value="x")
    return model


@pytest.mark.parametrize("external", [False, True])
def test_reads_what_onnx_reads(tmp_path, external):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    want = onnx.load(str(path), load_external_data=False)
    got = OnnxFile(path)
    assert got.metadata() == {p.key: p.value for p in want.metadata_props}
    graph = got.graph()
    assert [(n.op_type, n.input, n.output) for n in graph.node] == [(n.op_type, list(n.input), list(n.output))
                                                                      for n in want.graph.node]
    assert [(v.name, v.shape) for v in graph.input] == [("input", ["batch", 3]), ("cond", [])]
    assert [(v.name, v.shape) for v in graph.output] == [("probs", ["?", 4]), ("c", [4])]
    assert graph.initializer_names == {"W"}
    assert got.external_locations() == (["weights.bin"] if external else [])


def test_external_data_in_a_subgraph_is_found(tmp_path):
    model = _model()
    inner = model.graph.node[3].attribute[0].g.node[0].attribute[0].t  # the If branch's constant
    inner.data_location = TensorProto.EXTERNAL
    inner.external_data.add(key="location", value="../../elsewhere.bin")
    inner.ClearField("raw_data")
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert OnnxFile(tmp_path / "m.onnx").external_locations() == ["../../elsewhere.bin"]


def test_what_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(os.urandom(4096))
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "cut.onnx").write_bytes(_model().SerializeToString()[:-7])
    for name in ("junk.onnx", "empty.onnx", "cut.onnx"):
        with pytest.raises(NotOnnx):
            OnnxFile(tmp_path / name).graph()
