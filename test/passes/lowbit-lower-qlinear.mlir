// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-lower-qlinear)' | filecheck %s

// Weight-only fp32 layer, one tile: dispatch is hoisted above the parallel loop over
// N tiles, the invoke inside it reads the packed global and adds the bias.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(%[[X:.+]]: memref<2x8xf32>, %[[Y:.+]]: memref<2x4xf32>)
// CHECK-SAME: lowbit.lowered
// CHECK: %[[W:.+]] = memref.get_global @lowbit_qlinear_0_packed : memref<640xi8>
// CHECK: %[[H:.+]] = call @lowbit_qgemm_dispatch(
// CHECK: scf.forall (%{{.+}}) in (1) {
// CHECK: scf.for
// CHECK: call @lowbit_qgemm_invoke(
// CHECK-NOT: linalg.generic
// CHECK: func.func private @lowbit_qquant_act
// CHECK: func.func private @lowbit_qgemm_dispatch(i32, i32, i32, i64, i64, i64, i64, i64, i64, i64, i64, i64, i32) -> i64
// CHECK: func.func private @lowbit_qgemm_invoke
memref.global "private" constant @lowbit_qlinear_0_packed : memref<640xi8> = dense<0> {alignment = 64 : i64}
memref.global "private" constant @lowbit_qlinear_0_bias : memref<4xf32> = dense<1.0> {alignment = 64 : i64}
func.func private @lowbit_qlinear_0(%arg0: memref<2x8xf32>, %arg1: memref<2x4xf32>) attributes {lowbit.packed = {bias = "lowbit_qlinear_0_bias", bytes = 640 : i64, kblock = 8 : i64, kblock_bytes = 640 : i64, nblock_bytes = 640 : i64, num_kblocks = 1 : i64, symbol = "lowbit_qlinear_0_packed"}, lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 8 : i64, m_tile = 2 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  %cst = arith.constant 0.0 : f32
  linalg.fill ins(%cst : f32) outs(%arg1 : memref<2x4xf32>)
  return
}

// -----

// int8 activations with M and N tails (M = 6 in tiles of 4, N = 100 in tiles of 64):
// activations are quantized once, into rows of one 64-byte line (K = 40 rounded up to an
// odd number of lines, lowbit_qgemm_act_stride: 6 x 64 bytes), four tile shapes are
// dispatched, and each tile selects its handle.
// CHECK-LABEL: func.func private @lowbit_qlinear_0
// CHECK: memref.alloc() {alignment = 64 : i64} : memref<384xi8>
// CHECK: call @lowbit_qquant_act(
// CHECK-COUNT-4: call @lowbit_qgemm_dispatch(
// CHECK: scf.forall (%{{.+}}) in (2) {
// CHECK: arith.select
// CHECK: call @lowbit_qgemm_invoke(
// CHECK: memref.dealloc
memref.global "private" constant @lowbit_qlinear_0_packed : memref<2560xi8> = dense<0> {alignment = 64 : i64}
func.func private @lowbit_qlinear_0(%arg0: memref<6x40xf32>, %arg1: memref<6x100xf32>) attributes {lowbit.packed = {bias = "", bytes = 2560 : i64, kblock = 40 : i64, kblock_bytes = 1280 : i64, nblock_bytes = 1280 : i64, num_kblocks = 1 : i64, symbol = "lowbit_qlinear_0_packed"}, lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "channel", group_size = 0 : i64, in_features = 40 : i64, origin = "test", out_features = 100 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 40 : i64, m_tile = 4 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  return
}

// -----

// Edge: int8 activations, static M = 300 rows of K = 64, more than one quantization block
// (16384 values = 256 rows): blocks of rows are quantized on threads, each call at its
// rows' offsets (x 256 B per row, xq K = 64 B, the scale 4 B, the row sums 4 B per K-block);
// a remainder block of 44 rows.
// CHECK-LABEL: func.func private @lowbit_qlinear_0
// CHECK-DAG: %[[M:.+]] = arith.constant 300 : index
// CHECK-DAG: %[[XROW:.+]] = arith.constant 256 : i64
// CHECK-DAG: %[[ROWS:.+]] = arith.constant 256 : index
// CHECK: %[[MANY:.+]] = arith.cmpi ugt, %[[M]], %[[ROWS]] : index
// CHECK: scf.if %[[MANY]] {
// CHECK: scf.forall
// CHECK: %[[R0:.+]] = arith.muli %{{.+}}, %[[ROWS]] : index
// CHECK: arith.minui
// CHECK: %[[R064:.+]] = arith.index_cast %[[R0]] : index to i64
// CHECK: %[[XOFF:.+]] = arith.muli %[[R064]], %[[XROW]] : i64
// CHECK: %[[XP:.+]] = arith.addi %{{.+}}, %[[XOFF]] : i64
// CHECK: call @lowbit_qquant_act(%{{.+}}, %[[XP]],
// CHECK: } else {
// CHECK: call @lowbit_qquant_act(
// CHECK: }
// CHECK: call @lowbit_qgemm_dispatch(
memref.global "private" constant @lowbit_qlinear_0_packed : memref<1536xi8> = dense<0> {alignment = 64 : i64}
func.func private @lowbit_qlinear_0(%arg0: memref<300x64xf32>, %arg1: memref<300x64xf32>) attributes {lowbit.packed = {bias = "", bytes = 1536 : i64, kblock = 64 : i64, kblock_bytes = 1536 : i64, nblock_bytes = 1536 : i64, num_kblocks = 1 : i64, symbol = "lowbit_qlinear_0_packed"}, lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "channel", group_size = 0 : i64, in_features = 64 : i64, origin = "test", out_features = 64 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 64 : i64, m_tile = 300 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  return
}

// -----

// Edge: weight-only with K = 6 < kblock = 8: the kernel reads whole K-blocks, so the
// activations are copied into a zero-padded buffer first.
// CHECK-LABEL: func.func private @lowbit_qlinear_0
// CHECK: %[[P:.+]] = memref.alloc() {alignment = 64 : i64} : memref<3x8xf32>
// CHECK: linalg.fill
// CHECK: memref.subview %[[P]][0, 0] [3, 6] [1, 1]
// CHECK: memref.copy
// CHECK: call @lowbit_qgemm_invoke(
memref.global "private" constant @lowbit_qlinear_0_packed : memref<640xi8> = dense<0> {alignment = 64 : i64}
func.func private @lowbit_qlinear_0(%arg0: memref<3x6xf32>, %arg1: memref<3x4xf32>) attributes {lowbit.packed = {bias = "", bytes = 640 : i64, kblock = 8 : i64, kblock_bytes = 640 : i64, nblock_bytes = 640 : i64, num_kblocks = 1 : i64, symbol = "lowbit_qlinear_0_packed"}, lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "channel", group_size = 0 : i64, in_features = 6 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 8 : i64, m_tile = 3 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  return
}

// -----

// Negative: before bufferization (tensor signature) the function is left alone.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<2x8xf32>) -> tensor<2x8xf32>
// CHECK-NOT: lowbit.lowered
// CHECK-NOT: lowbit_qgemm_invoke
memref.global "private" constant @lowbit_qlinear_0_packed : memref<640xi8> = dense<0> {alignment = 64 : i64}
func.func private @lowbit_qlinear_0(%arg0: tensor<2x8xf32>) -> tensor<2x8xf32> attributes {lowbit.packed = {bias = "", bytes = 640 : i64, kblock = 8 : i64, kblock_bytes = 640 : i64, nblock_bytes = 640 : i64, num_kblocks = 1 : i64, symbol = "lowbit_qlinear_0_packed"}, lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "channel", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 8 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 8 : i64, m_tile = 2 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  return %arg0 : tensor<2x8xf32>
}

// -----

// Negative: a K-block the kernel rejects (6 is not a multiple of the ternary granule 4)
// keeps the reference body (generic path) and says why in the report.
// CHECK: module attributes {lowbit.report = [{function = "lowbit_qlinear_0", kind = "lowering", reason = "kernel rejects tile 2x4 (kblock 6): size or stride not a multiple of the format's block", result = "generic path"}]}
// CHECK: linalg.fill
// CHECK-NOT: lowbit_qgemm_invoke
memref.global "private" constant @lowbit_qlinear_0_packed : memref<640xi8> = dense<0> {alignment = 64 : i64}
func.func private @lowbit_qlinear_0(%arg0: memref<2x6xf32>, %arg1: memref<2x4xf32>) attributes {lowbit.packed = {bias = "", bytes = 640 : i64, kblock = 6 : i64, kblock_bytes = 640 : i64, nblock_bytes = 640 : i64, num_kblocks = 1 : i64, symbol = "lowbit_qlinear_0_packed"}, lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "channel", group_size = 0 : i64, in_features = 6 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 6 : i64, m_tile = 2 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  %cst = arith.constant 0.0 : f32
  linalg.fill ins(%cst : f32) outs(%arg1 : memref<2x4xf32>)
  return
}

// -----

// Fused epilogue (lowbit-fuse-qlinear-epilogue): silu + residual on a bf16 output with
// M and N tails. Flags = SiLU (16) | BETA1 (1) = 17 in every dispatch; each task first
// copies its tile of the residual into the output tile, then the kernel adds into it.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(%{{[a-z0-9]+}}: memref<6x40xbf16>
// CHECK-SAME: , %[[R:[a-z0-9]+]]: memref<6x100xbf16>, %[[Y:[a-z0-9]+]]: memref<6x100xbf16>)
// CHECK-COUNT-4: %{{.+}} = arith.constant 17 : i32
// CHECK: scf.forall
// CHECK: %[[RT:.+]] = memref.subview %[[R]][%{{.+}}, %{{.+}}] [%{{.+}}, %{{.+}}] [1, 1] : memref<6x100xbf16> to memref<?x?xbf16, strided<[100, 1], offset: ?>>
// CHECK: %[[YT:.+]] = memref.subview %[[Y]][%{{.+}}, %{{.+}}] [%{{.+}}, %{{.+}}] [1, 1]
// CHECK: memref.copy %[[RT]], %[[YT]]
// CHECK: call @lowbit_qgemm_invoke(
memref.global "private" constant @lowbit_qlinear_0_packed : memref<2560xi8> = dense<0> {alignment = 64 : i64}
func.func private @lowbit_qlinear_0(%arg0: memref<6x40xbf16>, %arg1: memref<6x100xbf16>, %arg2: memref<6x100xbf16>) attributes {lowbit.packed = {bias = "", bytes = 2560 : i64, kblock = 40 : i64, kblock_bytes = 1280 : i64, nblock_bytes = 1280 : i64, num_kblocks = 1 : i64, symbol = "lowbit_qlinear_0_packed"}, lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, epilogue = "silu+residual", granularity = "channel", group_size = 0 : i64, in_features = 40 : i64, origin = "test", out_features = 100 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 40 : i64, m_tile = 4 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  return
}

// -----

// Negative: a residual epilogue whose function is still (x, y) (the residual argument
// missing) is not the bufferized form the lowering expects: left alone.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: memref<3x8xf32>, %{{.+}}: memref<3x4xf32>)
// CHECK-NOT: lowbit.lowered
memref.global "private" constant @lowbit_qlinear_0_packed : memref<640xi8> = dense<0> {alignment = 64 : i64}
func.func private @lowbit_qlinear_0(%arg0: memref<3x8xf32>, %arg1: memref<3x4xf32>) attributes {lowbit.packed = {bias = "", bytes = 640 : i64, kblock = 8 : i64, kblock_bytes = 640 : i64, nblock_bytes = 640 : i64, num_kblocks = 1 : i64, symbol = "lowbit_qlinear_0_packed"}, lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, epilogue = "residual", granularity = "channel", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 8 : i64, m_tile = 3 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  return
}
