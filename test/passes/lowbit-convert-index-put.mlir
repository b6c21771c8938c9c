// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-convert-index-put)' | filecheck %s

// lowbit-convert-index-put: `torch.lowbit.index_put_rows` (the KV-cache form of index_put,
// lowbit.compiler.index_put_rows) becomes a call of a row loop in destination-passing style.
// Inputs minimized from LOWBIT_DUMP_IR=<dir> of a KV-cache update (00-import.mlir).

// Decode: one position into a [1, 2, 16, 8] cache along dim 2. The loop wraps a negative
// index, checks it (a cf.assert tagged lowbit.trap: lowbit-guard-traps raises IndexError),
// and copies the value row into the cache row through a select (out of range: row 0 is
// rewritten as it is); no scf.if yields a tensor.
// CHECK-LABEL: func.func @decode(
// CHECK-NOT: torch.operator
// CHECK: %[[C:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[1,2,16,8],f32> -> tensor<1x2x16x8xf32>
// CHECK: %[[I:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[1],si64> -> tensor<1xi64>
// CHECK: %[[V:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[1,2,1,8],f32> -> tensor<1x2x1x8xf32>
// CHECK: %[[N:.+]] = call @lowbit_index_put_rows_0(%[[C]], %[[I]], %[[V]]) : (tensor<1x2x16x8xf32>, tensor<1xi64>, tensor<1x2x1x8xf32>) -> tensor<1x2x16x8xf32>
// CHECK: torch_c.from_builtin_tensor %[[N]] : tensor<1x2x16x8xf32> -> !torch.vtensor<[1,2,16,8],f32>
// CHECK: func.func private @lowbit_index_put_rows_0(%[[SELF:.+]]: tensor<1x2x16x8xf32>, %[[IDX:.+]]: tensor<1xi64>, %[[VALS:.+]]: tensor<1x2x1x8xf32>) -> tensor<1x2x16x8xf32> attributes {lowbit.index_put_rows}
// CHECK: %[[SIZE:.+]] = tensor.dim %[[SELF]], %c2
// CHECK: %[[S64:.+]] = arith.index_cast %[[SIZE]] : index to i64
// CHECK: scf.for %[[T:.+]] = %c0 to %{{.+}} step %c1 iter_args(%[[ACC:.+]] = %[[SELF]])
// CHECK: %[[RAW:.+]] = tensor.extract %[[IDX]][%[[T]]]
// CHECK: %[[NEG:.+]] = arith.cmpi slt, %[[RAW]], %c0_i64
// CHECK: %[[WRAP:.+]] = arith.addi %[[RAW]], %[[S64]]
// CHECK: %[[POS:.+]] = arith.select %[[NEG]], %[[WRAP]], %[[RAW]]
// CHECK: %[[OK:.+]] = arith.andi
// CHECK: cf.assert %[[OK]], "index out of range" {lowbit.trap}
// CHECK: %[[SAFE:.+]] = arith.select %[[OK]], %[[POS]], %c0_i64
// CHECK: %[[ROW:.+]] = arith.index_cast %[[SAFE]] : i64 to index
// CHECK: %[[SRC:.+]] = tensor.extract_slice %[[VALS]][0, 0, %[[T]], 0] [1, 2, 1, 8] [1, 1, 1, 1]
// CHECK: %[[DST:.+]] = tensor.extract_slice %[[ACC]][0, 0, %[[ROW]], 0] [1, 2, 1, 8] [1, 1, 1, 1]
// CHECK: %[[NEW:.+]] = linalg.generic {{.+}} ins(%[[SRC]] : tensor<1x2x1x8xf32>) outs(%[[DST]] : tensor<1x2x1x8xf32>)
// CHECK: arith.select %[[OK]]
// CHECK: tensor.insert_slice %[[NEW]] into %[[ACC]][0, 0, %[[ROW]], 0] [1, 2, 1, 8] [1, 1, 1, 1]
// CHECK-NOT: scf.if
func.func @decode(%cache: !torch.vtensor<[1,2,16,8],f32>, %pos: !torch.vtensor<[1],si64>, %kv: !torch.vtensor<[1,2,1,8],f32>) -> !torch.vtensor<[1,2,16,8],f32> {
  %int2 = torch.constant.int 2
  %0 = torch.operator "torch.lowbit.index_put_rows"(%cache, %int2, %pos, %kv) : (!torch.vtensor<[1,2,16,8],f32>, !torch.int, !torch.vtensor<[1],si64>, !torch.vtensor<[1,2,1,8],f32>) -> !torch.vtensor<[1,2,16,8],f32>
  return %0 : !torch.vtensor<[1,2,16,8],f32>
}

// -----

// Prefill of a dynamic number of positions into a bf16 cache with a dynamic batch: the row
// sizes of dynamic dims are read from the values (tensor.dim), the index length is dynamic.
// CHECK-LABEL: func.func @prefill_dynamic(
// CHECK: call @lowbit_index_put_rows_0(%{{.+}}, %{{.+}}, %{{.+}}) : (tensor<?x4x64x16xbf16>, tensor<?xi64>, tensor<?x4x?x16xbf16>) -> tensor<?x4x64x16xbf16>
// CHECK: func.func private @lowbit_index_put_rows_0(
// CHECK: %[[B:.+]] = tensor.dim %{{.+}}, %{{.+}} : tensor<?x4x?x16xbf16>
// CHECK: tensor.extract_slice %{{.+}}[0, 0, %{{.+}}, 0] [%[[B]], 4, 1, 16] [1, 1, 1, 1] : tensor<?x4x?x16xbf16> to tensor<?x4x1x16xbf16>
// CHECK: arith.select %{{.+}}, %{{.+}}, %{{.+}} : bf16
// CHECK: tensor.insert_slice %{{.+}} into %{{.+}}[0, 0, %{{.+}}, 0] [%[[B]], 4, 1, 16] [1, 1, 1, 1] : tensor<?x4x1x16xbf16> into tensor<?x4x64x16xbf16>
func.func @prefill_dynamic(%cache: !torch.vtensor<[?,4,64,16],bf16>, %pos: !torch.vtensor<[?],si64>, %kv: !torch.vtensor<[?,4,?,16],bf16>) -> !torch.vtensor<[?,4,64,16],bf16> {
  %int2 = torch.constant.int 2
  %0 = torch.operator "torch.lowbit.index_put_rows"(%cache, %int2, %pos, %kv) : (!torch.vtensor<[?,4,64,16],bf16>, !torch.int, !torch.vtensor<[?],si64>, !torch.vtensor<[?,4,?,16],bf16>) -> !torch.vtensor<[?,4,64,16],bf16>
  return %0 : !torch.vtensor<[?,4,64,16],bf16>
}

// -----

// Edge: a 1-D int64 tensor updated along dim 0 (rows are single elements; signless i64).
// CHECK-LABEL: func.func @rank1_int(
// CHECK: call @lowbit_index_put_rows_0(%{{.+}}, %{{.+}}, %{{.+}}) : (tensor<5xi64>, tensor<2xi64>, tensor<2xi64>) -> tensor<5xi64>
// CHECK: tensor.extract_slice %{{.+}}[%{{.+}}] [1] [1] : tensor<2xi64> to tensor<1xi64>
func.func @rank1_int(%x: !torch.vtensor<[5],si64>, %idx: !torch.vtensor<[2],si64>, %v: !torch.vtensor<[2],si64>) -> !torch.vtensor<[5],si64> {
  %int0 = torch.constant.int 0
  %0 = torch.operator "torch.lowbit.index_put_rows"(%x, %int0, %idx, %v) : (!torch.vtensor<[5],si64>, !torch.int, !torch.vtensor<[2],si64>, !torch.vtensor<[2],si64>) -> !torch.vtensor<[5],si64>
  return %0 : !torch.vtensor<[5],si64>
}

// -----

// Not converted (the torch backend then rejects the op and the partitioner runs it in
// eager): a dimension that is not a constant, and values of another dtype than the cache.
// CHECK-LABEL: func.func @not_constant_dim(
// CHECK: torch.operator "torch.lowbit.index_put_rows"
// CHECK-NOT: func.func private @lowbit_index_put_rows
func.func @not_constant_dim(%cache: !torch.vtensor<[4,8],f32>, %d: !torch.int, %pos: !torch.vtensor<[1],si64>, %kv: !torch.vtensor<[1,8],f32>) -> !torch.vtensor<[4,8],f32> {
  %0 = torch.operator "torch.lowbit.index_put_rows"(%cache, %d, %pos, %kv) : (!torch.vtensor<[4,8],f32>, !torch.int, !torch.vtensor<[1],si64>, !torch.vtensor<[1,8],f32>) -> !torch.vtensor<[4,8],f32>
  return %0 : !torch.vtensor<[4,8],f32>
}

// -----

// CHECK-LABEL: func.func @mixed_dtypes(
// CHECK: torch.operator "torch.lowbit.index_put_rows"
// CHECK-NOT: func.func private @lowbit_index_put_rows
func.func @mixed_dtypes(%cache: !torch.vtensor<[4,8],f32>, %pos: !torch.vtensor<[1],si64>, %kv: !torch.vtensor<[1,8],bf16>) -> !torch.vtensor<[4,8],f32> {
  %int0 = torch.constant.int 0
  %0 = torch.operator "torch.lowbit.index_put_rows"(%cache, %int0, %pos, %kv) : (!torch.vtensor<[4,8],f32>, !torch.int, !torch.vtensor<[1],si64>, !torch.vtensor<[1,8],bf16>) -> !torch.vtensor<[4,8],f32>
  return %0 : !torch.vtensor<[4,8],f32>
}
