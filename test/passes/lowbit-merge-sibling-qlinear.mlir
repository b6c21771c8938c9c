// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-merge-sibling-qlinear)' | filecheck %s

// q/k/v-like siblings on one input: one call on concatenated weights (per-tensor scales
// become per-row scales, the missing biases zeros) and slices of its result.
// CHECK-LABEL: func.func @qkv
// CHECK-SAME: (%[[X:.+]]: tensor<2x8xf32>)
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%[[X]]) {no_inline} : (tensor<2x8xf32>) -> tensor<2x7xf32>
// CHECK: %[[Q:.+]] = tensor.extract_slice %[[Y]][0, 0] [2, 4] [1, 1]
// CHECK: %[[K:.+]] = tensor.extract_slice %[[Y]][0, 4] [2, 2] [1, 1]
// CHECK: %[[V:.+]] = tensor.extract_slice %[[Y]][0, 6] [2, 1] [1, 1]
// CHECK: return %[[Q]], %[[K]], %[[V]]
// CHECK-NOT: func.func private @q(
// CHECK: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<2x8xf32>) -> tensor<2x7xf32>
// CHECK-SAME: granularity = "channel"
// CHECK-SAME: origin = "merged q+k+v", out_features = 7
// CHECK-SAME: bias = dense<[0.000000e+00, 0.000000e+00, 0.000000e+00, 0.000000e+00, 1.000000e+00, 2.000000e+00, 0.000000e+00]>
// CHECK-SAME: scales = dense<{{\[}}[5.000000e-01], [5.000000e-01], [5.000000e-01], [5.000000e-01], [2.500000e-01], [2.500000e-01], [1.250000e-01]]>
func.func @qkv(%x: tensor<2x8xf32>) -> (tensor<2x4xf32>, tensor<2x2xf32>, tensor<2x1xf32>) {
  %q = call @q(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %k = call @k(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x2xf32>
  %v = call @v(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x1xf32>
  return %q, %k, %v : tensor<2x4xf32>, tensor<2x2xf32>, tensor<2x1xf32>
}
func.func private @q(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<[[-1, 0, 1, -1, 0, 1, -1, 0], [0, 1, -1, 0, 1, -1, 0, 1], [1, -1, 0, 1, -1, 0, 1, -1], [-1, 0, 1, -1, 0, 1, -1, 0]]> : tensor<4x8xi8>, scales = dense<0.5> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}
func.func private @k(%x: tensor<2x8xf32>) -> tensor<2x2xf32> attributes {lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 2 : i64, weight_format = "ternary"}, lowbit.weights = {bias = dense<[1.0, 2.0]> : tensor<2xf32>, codes = dense<[[-1, 0, 1, -1, 0, 1, -1, 0], [0, 1, -1, 0, 1, -1, 0, 1]]> : tensor<2x8xi8>, scales = dense<0.25> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x2xf32>
  return %e : tensor<2x2xf32>
}
func.func private @v(%x: tensor<2x8xf32>) -> tensor<2x1xf32> attributes {lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 1 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<[[-1, 0, 1, -1, 0, 1, -1, 0]]> : tensor<1x8xi8>, scales = dense<0.125> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x1xf32>
  return %e : tensor<2x1xf32>
}

// -----

// Negative: different inputs, or a different format, are not merged.
// CHECK-LABEL: func.func @no_merge
// CHECK: call @a(
// CHECK: call @b(
// CHECK: call @c(
// CHECK-NOT: extract_slice
func.func @no_merge(%x: tensor<2x8xf32>, %y: tensor<2x8xf32>) -> (tensor<2x4xf32>, tensor<2x4xf32>, tensor<2x4xf32>) {
  %a = call @a(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %b = call @b(%y) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %c = call @c(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  return %a, %b, %c : tensor<2x4xf32>, tensor<2x4xf32>, tensor<2x4xf32>
}
func.func private @a(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<[[-1, 0, 1, -1, 0, 1, -1, 0], [0, 1, -1, 0, 1, -1, 0, 1], [1, -1, 0, 1, -1, 0, 1, -1], [-1, 0, 1, -1, 0, 1, -1, 0]]> : tensor<4x8xi8>, scales = dense<0.5> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}
func.func private @b(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<[[-1, 0, 1, -1, 0, 1, -1, 0], [0, 1, -1, 0, 1, -1, 0, 1], [1, -1, 0, 1, -1, 0, 1, -1], [-1, 0, 1, -1, 0, 1, -1, 0]]> : tensor<4x8xi8>, scales = dense<0.5> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}
func.func private @c(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<[[-1, 0, 1, -1, 0, 1, -1, 0], [0, 1, -1, 0, 1, -1, 0, 1], [1, -1, 0, 1, -1, 0, 1, -1], [-1, 0, 1, -1, 0, 1, -1, 0]]> : tensor<4x8xi8>, scales = dense<0.5> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}
