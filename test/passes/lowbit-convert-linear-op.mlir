// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-convert-linear-op)' | filecheck %s

// A ternary layer with frozen weights becomes a call to a private qlinear function whose
// codes are the unpacked values (bytes 9, 152 = codes 1,2,0,0,0,2,1,2 = q 0,1,-1,-1,-1,1,0,1).
// CHECK-LABEL: module attributes {lowbit.report = [{format = "ternary/tensor a=none", function = "lowbit_qlinear_0", {{.*}}result = "recognized"}]}
// CHECK: func.func @forward(%[[X:.+]]: !torch.vtensor<[2,8],f32>)
// CHECK: %[[XB:.+]] = torch_c.to_builtin_tensor %[[X]] : !torch.vtensor<[2,8],f32> -> tensor<2x8xf32>
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%[[XB]]) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
// CHECK: %[[YT:.+]] = torch_c.from_builtin_tensor %[[Y]]
// CHECK: return %[[YT]]
// CHECK: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<2x8xf32>) -> tensor<2x4xf32>
// CHECK-SAME: lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "lowbit.linear", out_features = 4 : i64, weight_format = "ternary"}
// CHECK-SAME: lowbit.weights = {bias = dense<[-0.229166105, -0.162752241, -0.247006699, -0.331124306]> : tensor<4xf32>, codes = dense<{{\[}}[0, 1, -1, -1, -1, 1, 0, 1]
// CHECK-SAME: scales = dense<0.165519208> : tensor<1x1xf32>
// CHECK: linalg.generic
// CHECK: arith.sitofp
func.func @forward(%arg0: !torch.vtensor<[2,8],f32>) -> !torch.vtensor<[2,4],f32> {
  %0 = torch.vtensor.literal(dense<[[9, 152], [73, 64], [10, 154], [37, 128]]> : tensor<4x2xui8>) : !torch.vtensor<[4,2],ui8>
  %1 = torch.vtensor.literal(dense<0.165519208> : tensor<1x1xf32>) : !torch.vtensor<[1,1],f32>
  %none = torch.constant.none
  %2 = torch.vtensor.literal(dense<[-0.229166105, -0.162752241, -0.247006699, -0.331124306]> : tensor<4xf32>) : !torch.vtensor<[4],f32>
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "tensor"
  %int0 = torch.constant.int 0
  %int8 = torch.constant.int 8
  %int4 = torch.constant.int 4
  %str_1 = torch.constant.str "none"
  %3 = torch.operator "torch.lowbit.linear"(%arg0, %0, %1, %none, %2, %str, %str_0, %int0, %int8, %int4, %str_1, %int0) : (!torch.vtensor<[2,8],f32>, !torch.vtensor<[4,2],ui8>, !torch.vtensor<[1,1],f32>, !torch.none, !torch.vtensor<[4],f32>, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.str, !torch.int) -> !torch.vtensor<[2,4],f32>
  return %3 : !torch.vtensor<[2,4],f32>
}

// -----

// Edge shape: a 3-D activation (batch, tokens, K) is collapsed to M = 6 rows for the
// call and expanded back; int8 activations put the quantization in the reference body.
// CHECK-LABEL: func.func @tokens
// CHECK: %[[C:.+]] = tensor.collapse_shape %{{.+}} {{\[}}[0, 1], [2]] : tensor<2x3x8xf32> into tensor<6x8xf32>
// CHECK: %[[R:.+]] = call @lowbit_qlinear_0(%[[C]]) {no_inline} : (tensor<6x8xf32>) -> tensor<6x4xf32>
// CHECK: tensor.expand_shape %[[R]] {{\[}}[0, 1], [2]] output_shape [2, 3, 4]
// CHECK: func.func private @lowbit_qlinear_0
// CHECK-SAME: act_format = "int8"
// CHECK: math.roundeven
func.func @tokens(%arg0: !torch.vtensor<[2,3,8],f32>) -> !torch.vtensor<[2,3,4],f32> {
  %0 = torch.vtensor.literal(dense<[[9, 152], [73, 64], [10, 154], [37, 128]]> : tensor<4x2xui8>) : !torch.vtensor<[4,2],ui8>
  %1 = torch.vtensor.literal(dense<[[0.5], [0.25], [1.0], [2.0]]> : tensor<4x1xf32>) : !torch.vtensor<[4,1],f32>
  %none = torch.constant.none
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "channel"
  %int0 = torch.constant.int 0
  %int8 = torch.constant.int 8
  %int4 = torch.constant.int 4
  %str_1 = torch.constant.str "int8"
  %3 = torch.operator "torch.lowbit.linear"(%arg0, %0, %1, %none, %none, %str, %str_0, %int0, %int8, %int4, %str_1, %int0) : (!torch.vtensor<[2,3,8],f32>, !torch.vtensor<[4,2],ui8>, !torch.vtensor<[4,1],f32>, !torch.none, !torch.none, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.str, !torch.int) -> !torch.vtensor<[2,3,4],f32>
  return %3 : !torch.vtensor<[2,3,4],f32>
}

// -----

// Negative: weights that are not compile-time constants stay an op (eager fallback),
// and the report says why.
// CHECK-LABEL: module attributes {lowbit.report = [{{{.*}}reason = "weights are not compile-time constants", result = "not recognized"}]}
// CHECK: func.func @runtime_weights
// CHECK: torch.operator "torch.lowbit.linear"
// CHECK-NOT: lowbit_qlinear
func.func @runtime_weights(%arg0: !torch.vtensor<[2,8],f32>, %w: !torch.vtensor<[4,2],ui8>) -> !torch.vtensor<[2,4],f32> {
  %1 = torch.vtensor.literal(dense<0.5> : tensor<1x1xf32>) : !torch.vtensor<[1,1],f32>
  %none = torch.constant.none
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "tensor"
  %int0 = torch.constant.int 0
  %int8 = torch.constant.int 8
  %int4 = torch.constant.int 4
  %str_1 = torch.constant.str "none"
  %3 = torch.operator "torch.lowbit.linear"(%arg0, %w, %1, %none, %none, %str, %str_0, %int0, %int8, %int4, %str_1, %int0) : (!torch.vtensor<[2,8],f32>, !torch.vtensor<[4,2],ui8>, !torch.vtensor<[1,1],f32>, !torch.none, !torch.none, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.str, !torch.int) -> !torch.vtensor<[2,4],f32>
  return %3 : !torch.vtensor<[2,4],f32>
}

// -----

// Negative: per-K-block activation scales are not compiled.
// CHECK-LABEL: reason = "per-K-block activation scales are not compiled (runs in eager)"
// CHECK: func.func @act_blocks
// CHECK: torch.operator "torch.lowbit.linear"
func.func @act_blocks(%arg0: !torch.vtensor<[2,8],f32>) -> !torch.vtensor<[2,4],f32> {
  %0 = torch.vtensor.literal(dense<[[9, 152], [73, 64], [10, 154], [37, 128]]> : tensor<4x2xui8>) : !torch.vtensor<[4,2],ui8>
  %1 = torch.vtensor.literal(dense<0.5> : tensor<1x1xf32>) : !torch.vtensor<[1,1],f32>
  %none = torch.constant.none
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "tensor"
  %int0 = torch.constant.int 0
  %int8 = torch.constant.int 8
  %int4 = torch.constant.int 4
  %str_1 = torch.constant.str "int8"
  %3 = torch.operator "torch.lowbit.linear"(%arg0, %0, %1, %none, %none, %str, %str_0, %int0, %int8, %int4, %str_1, %int8) : (!torch.vtensor<[2,8],f32>, !torch.vtensor<[4,2],ui8>, !torch.vtensor<[1,1],f32>, !torch.none, !torch.none, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.str, !torch.int) -> !torch.vtensor<[2,4],f32>
  return %3 : !torch.vtensor<[2,4],f32>
}

