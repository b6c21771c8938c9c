// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-lower-qlinear)' | filecheck %s

// lowbit-lower-qlinear on *bound* qlinear functions (weights packed at bind time and passed
// as arguments, lowbit.compiler.bind): `_bound_text`. Inputs minimized from
// LOWBIT_DUMP_IR=<dir> (04-bufferize.mlir) of torch.compile(backend="lowbit") runs.

// int8 activations, bias, dynamic M (m_tile 8192, N = 128 in two 64-row tiles): the weight
// and bias pointers come from the function's arguments (no global); the activations are
// quantized once into buffers sized from the run-time M, in blocks of 256 rows (16384
// values of K = 64) on threads when M is more than one block, by one call otherwise; one kernel is dispatched per row
// chunk (1, 4, 16, 64 and m_tile rows), hoisted above the parallel loop over N tiles; the
// M loop runs full m_tile chunks, then the remainder in chunks of 64, 16, 4 and 1 rows,
// each with its own handle.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(
// CHECK-SAME: %[[X:[^:]+]]: memref<?x64xf32>, %[[W:[^:]+]]: memref<3072xi8>, %[[B:[^:]+]]: memref<128xf32>, %[[Y:[^:]+]]: memref<?x128xf32>)
// CHECK-SAME: lowbit.bound = {bias = 1 : i64, bytes = 3072 : i64
// CHECK-SAME: lowbit.lowered
// CHECK-NOT: memref.get_global
// CHECK: %[[M:.+]] = memref.dim %[[X]], %{{.+}} : memref<?x64xf32>
// CHECK: %[[M64:.+]] = arith.index_cast %[[M]] : index to i64
// CHECK: %[[WPI:.+]] = memref.extract_aligned_pointer_as_index %[[W]] : memref<3072xi8> -> index
// CHECK: %[[WP:.+]] = arith.index_cast %[[WPI]] : index to i64
// CHECK: %[[YPI:.+]] = memref.extract_aligned_pointer_as_index %[[Y]] : memref<?x128xf32> -> index
// CHECK: %[[YP:.+]] = arith.index_cast %[[YPI]] : index to i64
// CHECK: %[[BPI:.+]] = memref.extract_aligned_pointer_as_index %[[B]] : memref<128xf32> -> index
// CHECK: %[[BP:.+]] = arith.index_cast %[[BPI]] : index to i64
// CHECK: %[[XQN:.+]] = arith.muli %[[M]], %{{.+}} : index
// CHECK: %[[XQ:.+]] = memref.alloc(%[[XQN]]) {alignment = 64 : i64} : memref<?xi8>
// CHECK: memref.alloc(%{{.+}}) {alignment = 64 : i64} : memref<?xf32>
// CHECK: memref.alloc(%{{.+}}) {alignment = 64 : i64} : memref<?xi32>
// CHECK: %[[QROWS:.+]] = arith.constant 256 : index
// CHECK: %[[MANY:.+]] = arith.cmpi ugt, %[[M]], %[[QROWS]] : index
// CHECK: scf.if %[[MANY]] {
// CHECK: %[[QT:.+]] = arith.ceildivui %[[M]], %[[QROWS]] : index
// CHECK: scf.forall (%[[T:.+]]) in (%[[QT]]) {
// CHECK: %[[R0:.+]] = arith.muli %[[T]], %[[QROWS]] : index
// CHECK: %[[LEFT:.+]] = arith.subi %[[M]], %[[R0]] : index
// CHECK: %[[ROWS:.+]] = arith.minui %[[LEFT]], %[[QROWS]] : index
// CHECK: %[[ROWS64:.+]] = arith.index_cast %[[ROWS]] : index to i64
// CHECK: call @lowbit_qquant_act(%{{.+}}, %{{.+}}, %[[ROWS64]],
// CHECK: } else {
// CHECK: %[[MQ:.+]] = arith.index_cast %[[M]] : index to i64
// CHECK: call @lowbit_qquant_act(%{{.+}}, %{{.+}}, %[[MQ]],
// CHECK: %[[H1:.+]] = call @lowbit_qgemm_dispatch(
// CHECK: %[[H4:.+]] = call @lowbit_qgemm_dispatch(
// CHECK: %[[H16:.+]] = call @lowbit_qgemm_dispatch(
// CHECK: %[[H64:.+]] = call @lowbit_qgemm_dispatch(
// CHECK: arith.constant 8192 : i64
// CHECK: %[[H8192:.+]] = call @lowbit_qgemm_dispatch(
// CHECK-NOT: call @lowbit_qgemm_dispatch(
// CHECK: scf.forall (%{{.+}}) in (2) {
// CHECK: %[[C8192:.+]] = arith.constant 8192 : index
// CHECK: %[[N0:.+]] = arith.divui %[[M]], %[[C8192]] : index
// CHECK: %[[S0:.+]] = arith.select %{{.+}}, %[[H8192]], %[[H8192]] : i64
// CHECK: scf.for %{{.+}} = %{{.+}} to %[[N0]] step
// CHECK: func.call @lowbit_qgemm_invoke(%[[S0]], %{{.+}}, %{{.+}}, %[[WP]], %{{.+}}, %[[YP]], %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %[[BP]],
// CHECK: %[[R0:.+]] = arith.subi %[[M]], %{{.+}} : index
// CHECK: %[[C64:.+]] = arith.constant 64 : index
// CHECK: %[[N1:.+]] = arith.divui %[[R0]], %[[C64]] : index
// CHECK: arith.select %{{.+}}, %[[H64]], %[[H64]] : i64
// CHECK: scf.for %{{.+}} = %{{.+}} to %[[N1]] step
// CHECK: func.call @lowbit_qgemm_invoke(
// CHECK: %[[C16:.+]] = arith.constant 16 : index
// CHECK: arith.divui %{{.+}}, %[[C16]] : index
// CHECK: arith.select %{{.+}}, %[[H16]], %[[H16]] : i64
// CHECK: func.call @lowbit_qgemm_invoke(
// CHECK: %[[C4:.+]] = arith.constant 4 : index
// CHECK: arith.divui %{{.+}}, %[[C4]] : index
// CHECK: arith.select %{{.+}}, %[[H4]], %[[H4]] : i64
// CHECK: func.call @lowbit_qgemm_invoke(
// CHECK: arith.select %{{.+}}, %[[H1]], %[[H1]] : i64
// CHECK: func.call @lowbit_qgemm_invoke(
// CHECK-NOT: func.call @lowbit_qgemm_invoke(
// CHECK: memref.dealloc %[[XQ]] : memref<?xi8>
// CHECK-NOT: linalg.fill
// CHECK: return
// CHECK: func.func private @lowbit_qquant_act(
// CHECK: func.func private @lowbit_qgemm_dispatch(
// CHECK: func.func private @lowbit_qgemm_invoke(

func.func private @lowbit_qlinear_0(%arg0: memref<?x64xf32>, %arg1: memref<3072xi8>, %arg2: memref<128xf32>, %arg3: memref<?x128xf32>) attributes {lowbit.bound = {bias = 1 : i64, bytes = 3072 : i64, kblock = 64 : i64, kblock_bytes = 1536 : i64, nblock_bytes = 1536 : i64, num_kblocks = 1 : i64}, lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 64 : i64, origin = "bound", out_features = 128 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 64 : i64, m_tile = 8192 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  return
}

// -----

// int8 activations with K = 128 (two 64-byte lines): the quantized rows are padded to an odd
// number of lines, 192 bytes (lowbit_qgemm_act_stride), so that rows a power of two apart do
// not share L1 sets; the buffer, the quantization's row stride, every dispatch's lda and the
// invokes' activation offsets all use 192.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(
// CHECK-SAME: %[[X:[^:]+]]: memref<?x128xf32>
// CHECK: %[[XQROW:.+]] = arith.constant 192 : index
// CHECK: %[[XQN:.+]] = arith.muli %{{.+}}, %[[XQROW]] : index
// CHECK: memref.alloc(%[[XQN]]) {alignment = 64 : i64} : memref<?xi8>
// CHECK: %[[LDQ:.+]] = arith.constant 192 : i64
// CHECK: call @lowbit_qquant_act(%{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %[[LDQ]],
// CHECK: call @lowbit_qquant_act(%{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %[[LDQ]],
// CHECK-COUNT-5: call @lowbit_qgemm_dispatch(%{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %c192_i64
// CHECK-NOT: call @lowbit_qgemm_dispatch(
// CHECK: %[[LDA:.+]] = arith.constant 192 : i64
// CHECK: scf.forall
// CHECK: scf.for
// CHECK: %[[ROW:.+]] = arith.index_cast %{{.+}} : index to i64
// CHECK: %[[AOFF:.+]] = arith.muli %[[ROW]], %[[LDA]] : i64
// CHECK: func.call @lowbit_qgemm_invoke(%{{.+}}, %{{.+}}, %[[AOFF]],

func.func private @lowbit_qlinear_0(%arg0: memref<?x128xf32>, %arg1: memref<2304xi8>, %arg2: memref<?x64xf32>) attributes {lowbit.bound = {bias = 0 : i64, bytes = 2304 : i64, kblock = 128 : i64, kblock_bytes = 2304 : i64, nblock_bytes = 2304 : i64, num_kblocks = 1 : i64}, lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 128 : i64, origin = "bound", out_features = 64 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 128 : i64, m_tile = 8192 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  return
}

// -----

// Weight-only fp32 with a residual epilogue, static M = 3 (m_tile 3) and an N tail (N = 100:
// a 64-row tile and a 36-row tail): (x, r, w, y); chunks of 3 then 1 rows, each dispatched
// for both N tile widths with BETA1 (flags 1); y's tile receives r's tile right before each
// invoke; no activation quantization, no bias pointer.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(
// CHECK-SAME: %[[X:[^:]+]]: memref<3x40xf32>, %[[R:[^:]+]]: memref<3x100xf32>, %[[W:[^:]+]]: memref<2304xi8>, %[[Y:[^:]+]]: memref<3x100xf32>)
// CHECK-NOT: lowbit_qquant_act
// CHECK: %[[WPI:.+]] = memref.extract_aligned_pointer_as_index %[[W]] : memref<2304xi8> -> index
// CHECK: %[[WP:.+]] = arith.index_cast %[[WPI]] : index to i64
// CHECK: %[[NOBIAS:.+]] = arith.constant 0 : i64
// CHECK: %[[XPI:.+]] = memref.extract_aligned_pointer_as_index %[[X]]
// CHECK: %[[XP:.+]] = arith.index_cast %[[XPI]] : index to i64
// CHECK: %[[H1T:.+]] = call @lowbit_qgemm_dispatch(%{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %[[F:.+]]) :
// CHECK: %[[H1F:.+]] = call @lowbit_qgemm_dispatch(
// CHECK: %[[H3T:.+]] = call @lowbit_qgemm_dispatch(
// CHECK: %[[H3F:.+]] = call @lowbit_qgemm_dispatch(
// CHECK-NOT: call @lowbit_qgemm_dispatch(
// CHECK: scf.forall (%{{.+}}) in (2) {
// CHECK: %[[COLS:.+]] = arith.select %{{.+}}, %{{.+}}, %{{.+}} : index
// CHECK: arith.select %{{.+}}, %[[H3T]], %[[H3F]] : i64
// CHECK: scf.for
// CHECK: %[[RT:.+]] = memref.subview %[[R]][%{{.+}}, %{{.+}}] [3, %[[COLS]]] [1, 1] : memref<3x100xf32> to memref<3x?xf32, strided<[100, 1], offset: ?>>
// CHECK: %[[YT:.+]] = memref.subview %[[Y]][%{{.+}}, %{{.+}}] [3, %[[COLS]]] [1, 1]
// CHECK: memref.copy %[[RT]], %[[YT]]
// CHECK: func.call @lowbit_qgemm_invoke(%{{.+}}, %[[XP]], %{{.+}}, %[[WP]],
// CHECK: arith.select %{{.+}}, %[[H1T]], %[[H1F]] : i64
// CHECK: scf.for
// CHECK: memref.subview %[[R]][%{{.+}}, %{{.+}}] [1, %[[COLS]]] [1, 1]
// CHECK: memref.copy
// CHECK: func.call @lowbit_qgemm_invoke(
// CHECK-NOT: memref.dealloc
// CHECK: return

func.func private @lowbit_qlinear_0(%arg0: memref<3x40xf32>, %arg1: memref<3x100xf32>, %arg2: memref<2304xi8>, %arg3: memref<3x100xf32>) attributes {lowbit.bound = {bias = 0 : i64, bytes = 2304 : i64, kblock = 40 : i64, kblock_bytes = 1152 : i64, nblock_bytes = 1152 : i64, num_kblocks = 1 : i64}, lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, epilogue = "residual", granularity = "tensor", group_size = 0 : i64, in_features = 40 : i64, origin = "bound", out_features = 100 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 40 : i64, m_tile = 3 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  return
}

// -----

// bf16 weight-only, bias, dynamic M, K = 30 padded to the 32-wide kblock: x is copied into a
// zero-filled [M, 32] buffer allocated with the run-time M, which the kernels read; chunks
// of m_tile = 16, 4 and 1 rows.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(
// CHECK-SAME: %[[X:[^:]+]]: memref<?x30xbf16>, %[[W:[^:]+]]: memref<1024xi8>, %[[B:[^:]+]]: memref<64xf32>, %[[Y:[^:]+]]: memref<?x64xbf16>)
// CHECK: %[[M:.+]] = memref.dim %[[X]], %{{.+}} : memref<?x30xbf16>
// CHECK: %[[PAD:.+]] = memref.alloc(%[[M]]) {alignment = 64 : i64} : memref<?x32xbf16>
// CHECK: linalg.fill ins(%{{.+}} : bf16) outs(%[[PAD]] : memref<?x32xbf16>)
// CHECK: %[[SUB:.+]] = memref.subview %[[PAD]][0, 0] [%[[M]], 30] [1, 1]
// CHECK: memref.copy %[[X]], %[[SUB]]
// CHECK: %[[API:.+]] = memref.extract_aligned_pointer_as_index %[[PAD]]
// CHECK: %[[AP:.+]] = arith.index_cast %[[API]] : index to i64
// CHECK-COUNT-3: call @lowbit_qgemm_dispatch(
// CHECK-NOT: call @lowbit_qgemm_dispatch(
// CHECK: scf.forall (%{{.+}}) in (1) {
// CHECK: arith.constant 16 : index
// CHECK: func.call @lowbit_qgemm_invoke(%{{.+}}, %[[AP]],
// CHECK: arith.constant 4 : index
// CHECK: func.call @lowbit_qgemm_invoke(%{{.+}}, %[[AP]],
// CHECK: func.call @lowbit_qgemm_invoke(%{{.+}}, %[[AP]],
// CHECK-NOT: func.call @lowbit_qgemm_invoke(
// CHECK: memref.dealloc %[[PAD]] : memref<?x32xbf16>

func.func private @lowbit_qlinear_0(%arg0: memref<?x30xbf16>, %arg1: memref<1024xi8>, %arg2: memref<64xf32>, %arg3: memref<?x64xbf16>) attributes {lowbit.bound = {bias = 1 : i64, bytes = 1024 : i64, kblock = 32 : i64, kblock_bytes = 1024 : i64, nblock_bytes = 1024 : i64, num_kblocks = 1 : i64}, lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 30 : i64, origin = "bound", out_features = 64 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 32 : i64, m_tile = 16 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  return
}

// -----

// Not bufferized yet (tensors, destination-passing): left alone, no runtime declarations.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(
// CHECK-SAME: tensor<?x64xf32>
// CHECK-NOT: lowbit.lowered
// CHECK: linalg.fill
// CHECK-NOT: lowbit_qgemm

func.func private @lowbit_qlinear_0(%arg0: tensor<?x64xf32>, %arg1: tensor<3072xi8>, %arg2: tensor<?x128xf32>) -> tensor<?x128xf32> attributes {lowbit.bound = {bias = 0 : i64, bytes = 3072 : i64, kblock = 64 : i64, kblock_bytes = 1536 : i64, nblock_bytes = 1536 : i64, num_kblocks = 1 : i64}, lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 64 : i64, origin = "bound", out_features = 128 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 64 : i64, m_tile = 8192 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  %cst = arith.constant 0x7FC00000 : f32
  %0 = linalg.fill ins(%cst : f32) outs(%arg2 : tensor<?x128xf32>) -> tensor<?x128xf32>
  return %0 : tensor<?x128xf32>
}

// -----

// act_format int8_unit (lowbit.compiler.act_quant: the model quantized x itself, e.g. HF
// BitNet): the int8 path with the unit-scale flag (LOWBIT_QF_AUNIT = 64) on the activation
// call, int8 A (type 1) in the dispatch.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(
// CHECK: %[[UNIT:.+]] = arith.constant 64 : i32
// CHECK: call @lowbit_qquant_act(%{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %[[UNIT]],
// CHECK: call @lowbit_qgemm_dispatch(%{{.+}}, %c1_i32

func.func private @lowbit_qlinear_0(%arg0: memref<?x64xf32>, %arg1: memref<1536xi8>, %arg2: memref<?x64xf32>) attributes {lowbit.bound = {bias = 0 : i64, bytes = 1536 : i64, kblock = 64 : i64, kblock_bytes = 1536 : i64, nblock_bytes = 1536 : i64, num_kblocks = 1 : i64}, lowbit.qlinear = {act_format = "int8_unit", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 64 : i64, origin = "bound", out_features = 64 : i64, weight_format = "ternary"}, lowbit.tiles = {kblock = 64 : i64, m_tile = 8192 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
  return
}
