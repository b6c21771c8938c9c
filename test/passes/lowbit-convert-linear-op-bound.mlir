// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-convert-linear-op)' | filecheck %s

// lowbit-convert-linear-op on the ops binding leaves in a graph (lowbit.compiler.bind): the
// packed weight is a function argument, never a literal. Inputs minimized from
// LOWBIT_DUMP_IR=<dir> of torch.compile(backend="lowbit") runs (00-import.mlir).
// Invalid packed sizes: lowbit-convert-linear-op-bound-invalid.mlir.

// A bound int8-activation ternary layer with bias and dynamic M: the packed bytes and the bias
// are operands of the call (no literal), the output is a fresh bufferization.alloc_tensor sized
// from x (a tensor.empty would be CSE'd with another call's), and the bound function records
// the packed layout in lowbit.bound.
// CHECK-LABEL: func.func @dyn_bias_int8(
// CHECK-SAME: %[[X:[^:]+]]: !torch.vtensor<[?,64],f32>, %[[W:[^:]+]]: !torch.vtensor<[2560],si8>, %[[B:[^:]+]]: !torch.vtensor<[128],f32>)
// CHECK-NOT: torch.operator
// CHECK-NOT: torch.vtensor.literal
// CHECK-DAG: %[[XB:.+]] = torch_c.to_builtin_tensor %[[X]] : !torch.vtensor<[?,64],f32> -> tensor<?x64xf32>
// CHECK-DAG: %[[WB:.+]] = torch_c.to_builtin_tensor %[[W]] : !torch.vtensor<[2560],si8> -> tensor<2560xi8>
// CHECK-DAG: %[[BB:.+]] = torch_c.to_builtin_tensor %[[B]] : !torch.vtensor<[128],f32> -> tensor<128xf32>
// CHECK: %[[M:.+]] = tensor.dim %[[XB]], %{{.+}} : tensor<?x64xf32>
// CHECK: %[[E:.+]] = bufferization.alloc_tensor(%{{.+}}) : tensor<?x128xf32>
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%[[XB]], %[[WB]], %[[BB]], %[[E]]) {no_inline} : (tensor<?x64xf32>, tensor<2560xi8>, tensor<128xf32>, tensor<?x128xf32>) -> tensor<?x128xf32>
// CHECK: torch_c.from_builtin_tensor %[[Y]] : tensor<?x128xf32> -> !torch.vtensor<[?,128],f32>
// CHECK: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<?x64xf32>, %{{.+}}: tensor<2560xi8>, %{{.+}}: tensor<128xf32>, %[[OUT:.+]]: tensor<?x128xf32>) -> tensor<?x128xf32>
// CHECK-SAME: lowbit.bound = {bias = 1 : i64, bytes = 2560 : i64, kblock = 64 : i64, kblock_bytes = 1280 : i64, nblock_bytes = 1280 : i64, num_kblocks = 1 : i64}
// CHECK-SAME: lowbit.qlinear = {act_format = "int8", {{.*}}granularity = "tensor", {{.*}}in_features = 64 : i64, origin = "bound", out_features = 128 : i64, weight_format = "ternary"}
// CHECK-SAME: no_inline
// Until lowbit-lower-qlinear runs, the body only poisons the output with NaN, computed from a
// read of every input (else bufferization treats x, w and b as unread and reuses their buffers).
// CHECK: arith.constant 0x7FC00000 : f32
// CHECK-DAG: tensor.extract %{{.+}}[%{{.+}}, %{{.+}}] : tensor<?x64xf32>
// CHECK-DAG: tensor.extract %{{.+}}[%{{.+}}] : tensor<2560xi8>
// CHECK-DAG: tensor.extract %{{.+}}[%{{.+}}] : tensor<128xf32>
// CHECK: linalg.fill ins(%{{.+}} : f32) outs(%[[OUT]] : tensor<?x128xf32>)
// CHECK-NOT: linalg.generic
// CHECK: return

func.func @dyn_bias_int8(%x: !torch.vtensor<[?,64],f32>, %w: !torch.vtensor<[2560],si8>, %b: !torch.vtensor<[128],f32>) -> !torch.vtensor<[?,128],f32> {
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "tensor"
  %int0 = torch.constant.int 0
  %int64 = torch.constant.int 64
  %int128 = torch.constant.int 128
  %str_2 = torch.constant.str "int8"
  %0 = torch.operator "torch.lowbit.packed_linear"(%x, %w, %b, %str, %str_0, %int0, %int64, %int128, %int64, %str_2) : (!torch.vtensor<[?,64],f32>, !torch.vtensor<[2560],si8>, !torch.vtensor<[128],f32>, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.int, !torch.str) -> !torch.vtensor<[?,128],f32>
  return %0 : !torch.vtensor<[?,128],f32>
}

// -----

// Static M = 3, no bias (the none operand is dropped), weight-only activations.
// CHECK-LABEL: func.func @static_nobias(
// CHECK: %[[E:.+]] = bufferization.alloc_tensor() : tensor<3x64xf32>
// CHECK: call @lowbit_qlinear_0(%{{.+}}, %{{.+}}, %[[E]]) {no_inline} : (tensor<3x128xf32>, tensor<2304xi8>, tensor<3x64xf32>) -> tensor<3x64xf32>
// CHECK: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<3x128xf32>, %{{.+}}: tensor<2304xi8>, %{{.+}}: tensor<3x64xf32>) -> tensor<3x64xf32>
// CHECK-SAME: lowbit.bound = {bias = 0 : i64, bytes = 2304 : i64, kblock = 128 : i64
// CHECK-SAME: act_format = "none"

func.func @static_nobias(%x: !torch.vtensor<[3,128],f32>, %w: !torch.vtensor<[2304],si8>) -> !torch.vtensor<[3,64],f32> {
  %none = torch.constant.none
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "tensor"
  %int0 = torch.constant.int 0
  %int128 = torch.constant.int 128
  %int64 = torch.constant.int 64
  %str_2 = torch.constant.str "none"
  %0 = torch.operator "torch.lowbit.packed_linear"(%x, %w, %none, %str, %str_0, %int0, %int128, %int64, %int128, %str_2) : (!torch.vtensor<[3,128],f32>, !torch.vtensor<[2304],si8>, !torch.none, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.int, !torch.str) -> !torch.vtensor<[3,64],f32>
  return %0 : !torch.vtensor<[3,64],f32>
}

// -----

// 3-D x with a dynamic middle dim: collapsed to [?, K] for the call, the result expanded back
// with the dynamic size read from x.
// CHECK-LABEL: func.func @rank3_dyn(
// CHECK: %[[XB:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[2,?,128],f32> -> tensor<2x?x128xf32>
// CHECK: %[[T:.+]] = tensor.dim %[[XB]], %{{.+}} : tensor<2x?x128xf32>
// CHECK: %[[X2:.+]] = tensor.collapse_shape %[[XB]] {{\[\[}}0, 1], [2]] : tensor<2x?x128xf32> into tensor<?x128xf32>
// CHECK: %[[M:.+]] = tensor.dim %[[X2]], %{{.+}} : tensor<?x128xf32>
// CHECK: %[[E:.+]] = bufferization.alloc_tensor(%[[M]]) : tensor<?x64xf32>
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%[[X2]], %{{.+}}, %[[E]])
// CHECK: tensor.expand_shape %[[Y]] {{\[\[}}0, 1], [2]] output_shape [2, %[[T]], 64] : tensor<?x64xf32> into tensor<2x?x64xf32>
// CHECK: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<?x128xf32>, %{{.+}}: tensor<2304xi8>, %{{.+}}: tensor<?x64xf32>)
// CHECK-SAME: act_format = "int8"

func.func @rank3_dyn(%x: !torch.vtensor<[2,?,128],f32>, %w: !torch.vtensor<[2304],si8>) -> !torch.vtensor<[2,?,64],f32> {
  %none = torch.constant.none
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "tensor"
  %int0 = torch.constant.int 0
  %int128 = torch.constant.int 128
  %int64 = torch.constant.int 64
  %str_2 = torch.constant.str "int8"
  %0 = torch.operator "torch.lowbit.packed_linear"(%x, %w, %none, %str, %str_0, %int0, %int128, %int64, %int128, %str_2) : (!torch.vtensor<[2,?,128],f32>, !torch.vtensor<[2304],si8>, !torch.none, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.int, !torch.str) -> !torch.vtensor<[2,?,64],f32>
  return %0 : !torch.vtensor<[2,?,64],f32>
}

// -----

// bf16 activations, static 3-D x, with bias (the bias stays f32); the poison is a bf16 NaN.
// CHECK-LABEL: func.func @rank3_static_bf16(
// CHECK: %[[X2:.+]] = tensor.collapse_shape %{{.+}} {{\[\[}}0, 1], [2]] : tensor<1x5x128xbf16> into tensor<5x128xbf16>
// CHECK: %[[E:.+]] = bufferization.alloc_tensor() : tensor<5x64xbf16>
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%[[X2]], %{{.+}}, %{{.+}}, %[[E]]) {no_inline} : (tensor<5x128xbf16>, tensor<2304xi8>, tensor<64xf32>, tensor<5x64xbf16>) -> tensor<5x64xbf16>
// CHECK: tensor.expand_shape %[[Y]] {{\[\[}}0, 1], [2]] output_shape [1, 5, 64] : tensor<5x64xbf16> into tensor<1x5x64xbf16>
// CHECK: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<5x128xbf16>, %{{.+}}: tensor<2304xi8>, %{{.+}}: tensor<64xf32>, %{{.+}}: tensor<5x64xbf16>) -> tensor<5x64xbf16>
// CHECK-SAME: bias = 1 : i64
// CHECK: arith.truncf %{{.+}} : f32 to bf16

func.func @rank3_static_bf16(%x: !torch.vtensor<[1,5,128],bf16>, %w: !torch.vtensor<[2304],si8>, %b: !torch.vtensor<[64],f32>) -> !torch.vtensor<[1,5,64],bf16> {
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "tensor"
  %int0 = torch.constant.int 0
  %int128 = torch.constant.int 128
  %int64 = torch.constant.int 64
  %str_2 = torch.constant.str "none"
  %0 = torch.operator "torch.lowbit.packed_linear"(%x, %w, %b, %str, %str_0, %int0, %int128, %int64, %int128, %str_2) : (!torch.vtensor<[1,5,128],bf16>, !torch.vtensor<[2304],si8>, !torch.vtensor<[64],f32>, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.int, !torch.str) -> !torch.vtensor<[1,5,64],bf16>
  return %0 : !torch.vtensor<[1,5,64],bf16>
}

// -----

// A dense fp32 weight pre-packed in BRGEMM panels ([N/32, K, 32]), dynamic M: a blocked
// linalg.contract over the packed argument, f32 accumulation into [M, N/32, 32] that is
// zero-filled and collapsed to [M, N]; tagged for lowbit-dense-tile.
// CHECK-DAG: #[[MA:.+]] = affine_map<(d0, d1, d2, d3) -> (d0, d3)>
// CHECK-DAG: #[[MB:.+]] = affine_map<(d0, d1, d2, d3) -> (d1, d3, d2)>
// CHECK-DAG: #[[MC:.+]] = affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>
// CHECK-LABEL: func.func @dense_f32_dyn(
// CHECK: %[[XB:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[?,64],f32> -> tensor<?x64xf32>
// CHECK: %[[PB:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[4,64,32],f32> -> tensor<4x64x32xf32>
// CHECK: %[[M:.+]] = tensor.dim %[[XB]], %{{.+}} : tensor<?x64xf32>
// CHECK: %[[E:.+]] = tensor.empty(%[[M]]) : tensor<?x4x32xf32>
// CHECK: %[[C:.+]] = linalg.fill ins(%{{.+}} : f32) outs(%[[E]] : tensor<?x4x32xf32>)
// CHECK: %[[R:.+]] = linalg.contract indexing_maps = [#[[MA]], #[[MB]], #[[MC]]] {lowbit.brgemm = "packed", lowbit.brgemm_beta0} ins(%[[XB]], %[[PB]] : tensor<?x64xf32>, tensor<4x64x32xf32>) outs(%[[C]] : tensor<?x4x32xf32>)
// CHECK: %[[Y:.+]] = tensor.collapse_shape %[[R]] {{\[\[}}0], [1, 2]] : tensor<?x4x32xf32> into tensor<?x128xf32>
// CHECK: torch_c.from_builtin_tensor %[[Y]] : tensor<?x128xf32> -> !torch.vtensor<[?,128],f32>
// CHECK-NOT: torch.operator

func.func @dense_f32_dyn(%x: !torch.vtensor<[?,64],f32>, %p: !torch.vtensor<[4,64,32],f32>) -> !torch.vtensor<[?,128],f32> {
  %0 = torch.operator "torch.lowbit.packed_matmul"(%x, %p) : (!torch.vtensor<[?,64],f32>, !torch.vtensor<[4,64,32],f32>) -> !torch.vtensor<[?,128],f32>
  return %0 : !torch.vtensor<[?,128],f32>
}

// -----

// bf16 with VNNI pairs ([N/32, K/2, 32, 2]), 3-D x with a dynamic sequence dim: x is
// collapsed, its K split into pairs, the f32 result rounded to bf16 and expanded back.
// CHECK-DAG: #[[MA:.+]] = affine_map<(d0, d1, d2, d3, d4) -> (d0, d3, d4)>
// CHECK-DAG: #[[MB:.+]] = affine_map<(d0, d1, d2, d3, d4) -> (d1, d3, d2, d4)>
// CHECK-LABEL: func.func @dense_bf16_rank3(
// CHECK: %[[XB:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[1,?,64],bf16> -> tensor<1x?x64xbf16>
// CHECK: %[[X2:.+]] = tensor.collapse_shape %[[XB]] {{\[\[}}0, 1], [2]] : tensor<1x?x64xbf16> into tensor<?x64xbf16>
// CHECK: %[[M:.+]] = tensor.dim %[[X2]], %{{.+}} : tensor<?x64xbf16>
// CHECK: tensor.empty(%[[M]]) : tensor<?x2x32xf32>
// CHECK: %[[XP:.+]] = tensor.expand_shape %[[X2]] {{\[\[}}0], [1, 2]] output_shape [%[[M]], 32, 2] : tensor<?x64xbf16> into tensor<?x32x2xbf16>
// CHECK: %[[R:.+]] = linalg.contract indexing_maps = [#[[MA]], #[[MB]], #{{.+}}] {lowbit.brgemm = "packed", lowbit.brgemm_beta0} ins(%[[XP]], %{{.+}} : tensor<?x32x2xbf16>, tensor<2x32x32x2xbf16>) outs(%{{.+}} : tensor<?x2x32xf32>)
// CHECK: %[[Y32:.+]] = tensor.collapse_shape %[[R]] {{\[\[}}0], [1, 2]] : tensor<?x2x32xf32> into tensor<?x64xf32>
// CHECK: linalg.generic {{.+}} ins(%[[Y32]] : tensor<?x64xf32>) outs(%{{.+}} : tensor<?x64xbf16>)
// CHECK: arith.truncf %{{.+}} : f32 to bf16
// CHECK: %[[T:.+]] = tensor.dim %[[XB]], %{{.+}} : tensor<1x?x64xbf16>
// CHECK: tensor.expand_shape %{{.+}} {{\[\[}}0, 1], [2]] output_shape [1, %[[T]], 64] : tensor<?x64xbf16> into tensor<1x?x64xbf16>

func.func @dense_bf16_rank3(%x: !torch.vtensor<[1,?,64],bf16>, %p: !torch.vtensor<[2,32,32,2],bf16>) -> !torch.vtensor<[1,?,64],bf16> {
  %0 = torch.operator "torch.lowbit.packed_matmul"(%x, %p) : (!torch.vtensor<[1,?,64],bf16>, !torch.vtensor<[2,32,32,2],bf16>) -> !torch.vtensor<[1,?,64],bf16>
  return %0 : !torch.vtensor<[1,?,64],bf16>
}
