"""One lowbit.linear node per layer through torch.export, dynamo and the torch-mlir FX importer."""
import re
import subprocess

import pytest
import torch
from torch import nn

import lowbit
from lowbit.quant import QuantConfig

OPS = (torch.ops.lowbit.linear, torch.ops.lowbit.linear.default)


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 17, bias=False), nn.Tanh(), nn.Linear(17, 5))
    lowbit.quantize_(m, QuantConfig("ternary", activations="int8"), filter_fn=lambda mod, fqn: fqn == "0")
    lowbit.quantize_(m, QuantConfig("int2_asym", group_size=8), filter_fn=lambda mod, fqn: fqn == "2")
    lowbit.quantize_(m, QuantConfig("int4_sym"))
    return m


def lowbit_nodes(graph):
    return [n for n in graph.nodes if n.op == "call_function" and n.target in OPS]


def test_export_keeps_one_node_per_layer_with_attributes():
    m, x = model(), torch.randn(3, 40)
    ep = torch.export.export(m, (x,))
    nodes = lowbit_nodes(ep.graph)
    assert len(nodes) == 3
    assert [tuple(n.args[5:]) for n in nodes] == [m[i].spec.op_attributes() for i in (0, 2, 4)]
    assert nodes[0].args[3] is None and nodes[1].args[4] is None  # no zero points / no bias
    assert not any(n.op == "call_function" and "aten" in str(n.target) and "linear" in str(n.target)
                   for n in ep.graph.nodes)
    assert torch.equal(ep.module()(x), m(x))


def test_op_survives_run_decompositions():
    m, x = model(), torch.randn(3, 40)
    ep = torch.export.export(m, (x,)).run_decompositions()
    assert len(lowbit_nodes(ep.graph)) == 3
    assert torch.equal(ep.module()(x), m(x))


def test_export_with_dynamic_batch():
    m = model()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (torch.randn(3, 40),), dynamic_shapes=({0: batch},))
    assert len(lowbit_nodes(ep.graph)) == 3
    x = torch.randn(9, 40)
    assert torch.equal(ep.module()(x), m(x))


def test_export_reports_bad_shapes_from_the_fake_kernel():
    m = model()
    with pytest.raises(Exception, match=r"shape \[..., 40\]"):
        torch.export.export(m, (torch.randn(3, 41),))


def test_dynamo_sees_the_op():
    m, x = model(), torch.randn(3, 40)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x), m(x))
    assert len(graphs) == 1
    assert len(lowbit_nodes(graphs[0].graph)) == 3
    torch._dynamo.reset()
    assert torch.equal(torch.compile(m, backend="aot_eager", fullgraph=True)(x), m(x))
    torch._dynamo.reset()


CHECKS = r"""
CHECK-LABEL: func.func @main(%arg0: !torch.vtensor<[3,40],f32>) -> !torch.vtensor<[3,5],f32>
CHECK: %[[P0:[0-9]+]] = torch.vtensor.literal({{.*}}) : !torch.vtensor<[24,10],ui8>
CHECK: %[[S0:[0-9]+]] = torch.vtensor.literal({{.*}}) : !torch.vtensor<[1,1],f32>
CHECK: %[[F0:[a-z_0-9]+]] = torch.constant.str "ternary"
CHECK: torch.constant.str "tensor"
CHECK: torch.constant.str "int8"
CHECK: %[[Y0:[0-9]+]] = torch.operator "torch.lowbit.linear"(%arg0, %[[P0]], %[[S0]], %none, %{{[0-9]+}}, %[[F0]], {{.*}}) : (!torch.vtensor<[3,40],f32>, !torch.vtensor<[24,10],ui8>, !torch.vtensor<[1,1],f32>, !torch.none, !torch.vtensor<[24],f32>, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.str, !torch.int) -> !torch.vtensor<[3,24],f32>
CHECK: %[[P2:[0-9]+]] = torch.vtensor.literal({{.*}}) : !torch.vtensor<[17,6],ui8>
CHECK: %[[S2:[0-9]+]] = torch.vtensor.literal({{.*}}) : !torch.vtensor<[17,3],f32>
CHECK: %[[Z2:[0-9]+]] = torch.vtensor.literal({{.*}}) : !torch.vtensor<[17,3],si8>
CHECK: torch.constant.str "int2_asym"
CHECK: torch.constant.str "group"
CHECK: torch.constant.int 8
CHECK: torch.operator "torch.lowbit.linear"(%{{[0-9]+}}, %[[P2]], %[[S2]], %[[Z2]], %none_{{[0-9]+}}, {{.*}}) -> !torch.vtensor<[3,17],f32>
CHECK: %[[P4:[0-9]+]] = torch.vtensor.literal({{.*}}) : !torch.vtensor<[5,9],ui8>
CHECK: torch.constant.str "int4_sym"
CHECK: torch.constant.str "channel"
CHECK: torch.operator "torch.lowbit.linear"(%{{[0-9]+}}, %[[P4]], {{.*}}) -> !torch.vtensor<[3,5],f32>
CHECK-NOT: torch.operator
CHECK: return
"""


def test_fx_importer_emits_one_torch_operator_per_layer(tmp_path):
    fx = pytest.importorskip("torch_mlir.fx")
    m, x = model(), torch.randn(3, 40)
    ir = str(fx.export_and_import(m, x, output_type="raw"))
    assert len(re.findall(r'torch\.operator "torch\.lowbit\.linear"', ir)) == 3
    # attributes are plain torch.constant.{str,int} operands the recognizer can read
    assert re.search(r"torch\.constant\.int 40\b", ir) and re.search(r"torch\.constant\.int 8\b", ir)
    checks = tmp_path / "checks.txt"
    checks.write_text(CHECKS)
    result = subprocess.run(["filecheck", str(checks)], input=ir, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr + "\n" + ir


def test_docs_pin_the_schema_and_format_table():
    from pathlib import Path

    from lowbit.quant import WEIGHT_FORMATS
    doc = (Path(__file__).resolve().parents[3] / "docs" / "formats.md").read_text()
    schema = str(torch.ops.lowbit.linear.default._schema)
    assert " ".join(schema.split()) in " ".join(doc.split()).replace("lowbit::linear (", "lowbit::linear(")
    rows = re.findall(r"^\| `(\w+)`\s*\| (\d)\s*\|", doc, flags=re.M)
    assert {name: int(bits) for name, bits in rows} == {n: f.bits for n, f in WEIGHT_FORMATS.items()}
