// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-fuse-qlinear-epilogue)' | filecheck %s

// ReLU spelled as torch-mlir lowers it (cmpf ugt + select), fp32: folded into the call;
// the function records the epilogue and its reference body applies maximumf after the bias.
// CHECK-LABEL: func.func @relu_f32
// CHECK-SAME: (%[[X:.+]]: tensor<2x8xf32>)
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%[[X]]) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
// CHECK-NOT: linalg.generic
// CHECK: return %[[Y]]
// CHECK: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<2x8xf32>) -> tensor<2x4xf32>
// CHECK-SAME: epilogue = "relu"
// CHECK: arith.addf
// CHECK: arith.maximumf %{{.+}}, %{{.+}} : f32
// CHECK-NEXT: linalg.yield

func.func @relu_f32(%x: tensor<2x8xf32>) -> tensor<2x4xf32> {
  %c0 = arith.constant 0.0 : f32
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %e = tensor.empty() : tensor<2x4xf32>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y : tensor<2x4xf32>) outs(%e : tensor<2x4xf32>) {
  ^bb0(%in: f32, %out: f32):
    %p = arith.cmpf ugt, %in, %c0 : f32
    %s = arith.select %p, %in, %c0 : f32
    linalg.yield %s : f32
  } -> tensor<2x4xf32>
  return %g : tensor<2x4xf32>
}
func.func private @lowbit_qlinear_0(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {bias = dense<0.5> : tensor<4xf32>, codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}

// -----

// SiLU as x * sigmoid(x), fp32, int8 activations.
// CHECK-LABEL: func.func @silu_f32
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%{{.+}}) {no_inline} : (tensor<3x8xf32>) -> tensor<3x4xf32>
// CHECK-NEXT: return %[[Y]]
// CHECK: func.func private @lowbit_qlinear_0
// CHECK-SAME: act_format = "int8"
// CHECK-SAME: epilogue = "silu"
// CHECK: arith.negf
// CHECK-NEXT: math.exp
// CHECK: arith.divf

func.func @silu_f32(%x: tensor<3x8xf32>) -> tensor<3x4xf32> {
  %c1 = arith.constant 1.0 : f32
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<3x8xf32>) -> tensor<3x4xf32>
  %e = tensor.empty() : tensor<3x4xf32>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y : tensor<3x4xf32>) outs(%e : tensor<3x4xf32>) {
  ^bb0(%in: f32, %out: f32):
    %n = arith.negf %in : f32
    %ex = math.exp %n : f32
    %d = arith.addf %ex, %c1 : f32
    %sg = arith.divf %c1, %d : f32
    %s = arith.mulf %in, %sg : f32
    linalg.yield %s : f32
  } -> tensor<3x4xf32>
  return %g : tensor<3x4xf32>
}
func.func private @lowbit_qlinear_0(%x: tensor<3x8xf32>) -> tensor<3x4xf32> attributes {lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<3x4xf32>
  return %e : tensor<3x4xf32>
}

// -----

// SiLU on bf16 spelled x / (exp(0 - x) + 1) between extf and truncf.
// CHECK-LABEL: func.func @silu_bf16
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%{{.+}}) {no_inline} : (tensor<2x8xbf16>) -> tensor<2x4xbf16>
// CHECK-NEXT: return %[[Y]]
// CHECK: func.func private @lowbit_qlinear_0
// CHECK-SAME: epilogue = "silu"
// CHECK: math.exp
// CHECK: arith.truncf %{{.+}} : f32 to bf16

func.func @silu_bf16(%x: tensor<2x8xbf16>) -> tensor<2x4xbf16> {
  %c1 = arith.constant 1.0 : f32
  %c0 = arith.constant 0.0 : f32
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<2x8xbf16>) -> tensor<2x4xbf16>
  %e = tensor.empty() : tensor<2x4xbf16>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y : tensor<2x4xbf16>) outs(%e : tensor<2x4xbf16>) {
  ^bb0(%in: bf16, %out: bf16):
    %f = arith.extf %in : bf16 to f32
    %n = arith.subf %c0, %f : f32
    %ex = math.exp %n : f32
    %d = arith.addf %c1, %ex : f32
    %s = arith.divf %f, %d : f32
    %t = arith.truncf %s : f32 to bf16
    linalg.yield %t : bf16
  } -> tensor<2x4xbf16>
  return %g : tensor<2x4xbf16>
}
func.func private @lowbit_qlinear_0(%x: tensor<2x8xbf16>) -> tensor<2x4xbf16> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xbf16>
  return %e : tensor<2x4xbf16>
}

// -----

// Squared ReLU on bf16 (select, then fpowi 2), edge shape M = 1, N = 65 (a tail past 64).
// CHECK-LABEL: func.func @relu2_bf16_m1
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%{{.+}}) {no_inline} : (tensor<1x8xbf16>) -> tensor<1x65xbf16>
// CHECK-NEXT: return %[[Y]]
// CHECK: epilogue = "relu2"
// CHECK: %[[R:.+]] = arith.maximumf
// CHECK-NEXT: arith.mulf %[[R]], %[[R]] : f32

func.func @relu2_bf16_m1(%x: tensor<1x8xbf16>) -> tensor<1x65xbf16> {
  %c0 = arith.constant 0.0 : bf16
  %c2 = arith.constant 2 : i64
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<1x8xbf16>) -> tensor<1x65xbf16>
  %e = tensor.empty() : tensor<1x65xbf16>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y : tensor<1x65xbf16>) outs(%e : tensor<1x65xbf16>) {
  ^bb0(%in: bf16, %out: bf16):
    %p = arith.cmpf ugt, %in, %c0 : bf16
    %s = arith.select %p, %in, %c0 : bf16
    %q = math.fpowi %s, %c2 : bf16, i64
    linalg.yield %q : bf16
  } -> tensor<1x65xbf16>
  return %g : tensor<1x65xbf16>
}
func.func private @lowbit_qlinear_0(%x: tensor<1x8xbf16>) -> tensor<1x65xbf16> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 65 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<65x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<1x65xbf16>
  return %e : tensor<1x65xbf16>
}

// -----

// Squared ReLU as max(x, 0) * max(x, 0), fp32.
// CHECK-LABEL: func.func @relu2_mul
// CHECK: call @lowbit_qlinear_0(%{{.+}}) {no_inline}
// CHECK-NOT: linalg.generic
// CHECK: epilogue = "relu2"

func.func @relu2_mul(%x: tensor<2x8xf32>) -> tensor<2x4xf32> {
  %c0 = arith.constant 0.0 : f32
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %e = tensor.empty() : tensor<2x4xf32>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y : tensor<2x4xf32>) outs(%e : tensor<2x4xf32>) {
  ^bb0(%in: f32, %out: f32):
    %a = arith.maximumf %in, %c0 : f32
    %b = arith.maximumf %c0, %in : f32
    %s = arith.mulf %a, %b : f32
    linalg.yield %s : f32
  } -> tensor<2x4xf32>
  return %g : tensor<2x4xf32>
}
func.func private @lowbit_qlinear_0(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}

// -----

// Residual add (r + a order), fp32: the residual becomes the call's second operand.
// CHECK-LABEL: func.func @residual_f32
// CHECK-SAME: (%[[X:.+]]: tensor<2x8xf32>, %[[R:.+]]: tensor<2x4xf32>)
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%[[X]], %[[R]]) {no_inline} : (tensor<2x8xf32>, tensor<2x4xf32>) -> tensor<2x4xf32>
// CHECK-NEXT: return %[[Y]]
// CHECK: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<2x8xf32>, %[[RA:.+]]: tensor<2x4xf32>) -> tensor<2x4xf32>
// CHECK-SAME: epilogue = "residual"
// CHECK: linalg.generic {{.+}} ins(%{{.+}}, %[[RA]] : tensor<2x4xf32>, tensor<2x4xf32>)
// CHECK: %[[S:.+]] = arith.addf %in{{.*}}, %{{.+}} : f32
// CHECK-NEXT: linalg.yield %[[S]]

func.func @residual_f32(%x: tensor<2x8xf32>, %r: tensor<2x4xf32>) -> tensor<2x4xf32> {
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %e = tensor.empty() : tensor<2x4xf32>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%r, %y : tensor<2x4xf32>, tensor<2x4xf32>) outs(%e : tensor<2x4xf32>) {
  ^bb0(%in: f32, %in2: f32, %out: f32):
    %s = arith.addf %in, %in2 : f32
    linalg.yield %s : f32
  } -> tensor<2x4xf32>
  return %g : tensor<2x4xf32>
}
func.func private @lowbit_qlinear_0(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}

// -----

// Residual add on bf16 (one bf16 addf), the output rounded once in the reference body.
// CHECK-LABEL: func.func @residual_bf16
// CHECK: call @lowbit_qlinear_0(%{{.+}}, %{{.+}}) {no_inline} : (tensor<2x8xbf16>, tensor<2x4xbf16>) -> tensor<2x4xbf16>
// CHECK: epilogue = "residual"
// CHECK: linalg.generic {{.+}} ins(%{{.+}}, %arg1 : tensor<2x4xf32>, tensor<2x4xbf16>) outs(%{{.+}} : tensor<2x4xbf16>)
// CHECK-NEXT: ^bb0
// CHECK-NEXT: arith.extf %{{.+}} : bf16 to f32
// CHECK-NEXT: arith.addf
// CHECK-NEXT: arith.truncf

func.func @residual_bf16(%x: tensor<2x8xbf16>, %r: tensor<2x4xbf16>) -> tensor<2x4xbf16> {
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<2x8xbf16>) -> tensor<2x4xbf16>
  %e = tensor.empty() : tensor<2x4xbf16>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y, %r : tensor<2x4xbf16>, tensor<2x4xbf16>) outs(%e : tensor<2x4xbf16>) {
  ^bb0(%in: bf16, %in2: bf16, %out: bf16):
    %s = arith.addf %in, %in2 : bf16
    linalg.yield %s : bf16
  } -> tensor<2x4xbf16>
  return %g : tensor<2x4xbf16>
}
func.func private @lowbit_qlinear_0(%x: tensor<2x8xbf16>) -> tensor<2x4xbf16> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xbf16>
  return %e : tensor<2x4xbf16>
}

// -----

// Activation, then the residual add: both fold (act first, as the kernel does).
// CHECK-LABEL: func.func @relu_then_residual
// CHECK: call @lowbit_qlinear_0(%{{.+}}, %{{.+}}) {no_inline}
// CHECK-NOT: linalg.generic
// CHECK: epilogue = "relu+residual"
// CHECK: arith.maximumf
// CHECK-NEXT: arith.addf

func.func @relu_then_residual(%x: tensor<2x8xf32>, %r: tensor<2x4xf32>) -> tensor<2x4xf32> {
  %c0 = arith.constant 0.0 : f32
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %e = tensor.empty() : tensor<2x4xf32>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y, %r : tensor<2x4xf32>, tensor<2x4xf32>) outs(%e : tensor<2x4xf32>) {
  ^bb0(%in: f32, %in2: f32, %out: f32):
    %a = arith.maximumf %in, %c0 : f32
    %s = arith.addf %in2, %a : f32
    linalg.yield %s : f32
  } -> tensor<2x4xf32>
  return %g : tensor<2x4xf32>
}
func.func private @lowbit_qlinear_0(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}

// -----

// A [B, S, K] activation: the call sits between collapse/expand_shape; the residual is
// collapsed the same way and the fused call's result expanded back.
// CHECK-LABEL: func.func @residual_3d
// CHECK-SAME: %[[R:[a-z0-9_]+]]: tensor<2x3x4xf32>
// CHECK: %[[RC:.+]] = tensor.collapse_shape %[[R]] {{\[}}[0, 1], [2]] : tensor<2x3x4xf32> into tensor<6x4xf32>
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%{{.+}}, %[[RC]]) {no_inline} : (tensor<6x8xf32>, tensor<6x4xf32>) -> tensor<6x4xf32>
// CHECK-NEXT: %[[E:.+]] = tensor.expand_shape %[[Y]] {{\[}}[0, 1], [2]] output_shape [2, 3, 4]
// CHECK-NEXT: return %[[E]]

func.func @residual_3d(%x: tensor<2x3x8xf32>, %r: tensor<2x3x4xf32>) -> tensor<2x3x4xf32> {
  %c = tensor.collapse_shape %x [[0, 1], [2]] : tensor<2x3x8xf32> into tensor<6x8xf32>
  %y = call @lowbit_qlinear_0(%c) {no_inline} : (tensor<6x8xf32>) -> tensor<6x4xf32>
  %y3 = tensor.expand_shape %y [[0, 1], [2]] output_shape [2, 3, 4] : tensor<6x4xf32> into tensor<2x3x4xf32>
  %e = tensor.empty() : tensor<2x3x4xf32>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1, d2) -> (d0, d1, d2)>, affine_map<(d0, d1, d2) -> (d0, d1, d2)>, affine_map<(d0, d1, d2) -> (d0, d1, d2)>], iterator_types = ["parallel", "parallel", "parallel"]} ins(%y3, %r : tensor<2x3x4xf32>, tensor<2x3x4xf32>) outs(%e : tensor<2x3x4xf32>) {
  ^bb0(%in: f32, %in2: f32, %out: f32):
    %s = arith.addf %in, %in2 : f32
    linalg.yield %s : f32
  } -> tensor<2x3x4xf32>
  return %g : tensor<2x3x4xf32>
}
func.func private @lowbit_qlinear_0(%x: tensor<6x8xf32>) -> tensor<6x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<6x4xf32>
  return %e : tensor<6x4xf32>
}

// -----

// Negative: the qlinear result has another use (returned too): nothing folds.
// CHECK-LABEL: func.func @other_use
// CHECK: call @lowbit_qlinear_0(%{{.+}}) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
// CHECK: linalg.generic
// CHECK-NOT: epilogue =

func.func @other_use(%x: tensor<2x8xf32>) -> (tensor<2x4xf32>, tensor<2x4xf32>) {
  %c0 = arith.constant 0.0 : f32
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %e = tensor.empty() : tensor<2x4xf32>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y : tensor<2x4xf32>) outs(%e : tensor<2x4xf32>) {
  ^bb0(%in: f32, %out: f32):
    %a = arith.maximumf %in, %c0 : f32
    linalg.yield %a : f32
  } -> tensor<2x4xf32>
  return %g, %y : tensor<2x4xf32>, tensor<2x4xf32>
}
func.func private @lowbit_qlinear_0(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}

// -----

// Negative: a broadcast residual (bias-like [N] operand) is not a residual.
// CHECK-LABEL: func.func @broadcast_residual
// CHECK: call @lowbit_qlinear_0(%{{.+}}) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
// CHECK: linalg.generic
// CHECK-NOT: epilogue =

func.func @broadcast_residual(%x: tensor<2x8xf32>, %r: tensor<4xf32>) -> tensor<2x4xf32> {
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %e = tensor.empty() : tensor<2x4xf32>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y, %r : tensor<2x4xf32>, tensor<4xf32>) outs(%e : tensor<2x4xf32>) {
  ^bb0(%in: f32, %in2: f32, %out: f32):
    %s = arith.addf %in, %in2 : f32
    linalg.yield %s : f32
  } -> tensor<2x4xf32>
  return %g : tensor<2x4xf32>
}
func.func private @lowbit_qlinear_0(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}

// -----

// Negative: not an activation the kernels have (sigmoid alone; a scale by 2; leaky relu).
// CHECK-LABEL: func.func @not_an_activation
// CHECK-COUNT-3: linalg.generic
// CHECK-NOT: epilogue =

func.func @not_an_activation(%x: tensor<2x8xf32>) -> (tensor<2x4xf32>, tensor<2x4xf32>, tensor<2x4xf32>) {
  %c1 = arith.constant 1.0 : f32
  %c2 = arith.constant 2.0 : f32
  %c0 = arith.constant 0.0 : f32
  %cs = arith.constant 0.01 : f32
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %y2 = call @lowbit_qlinear_1(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %y3 = call @lowbit_qlinear_2(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %e = tensor.empty() : tensor<2x4xf32>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y : tensor<2x4xf32>) outs(%e : tensor<2x4xf32>) {
  ^bb0(%in: f32, %out: f32):
    %n = arith.negf %in : f32
    %ex = math.exp %n : f32
    %d = arith.addf %ex, %c1 : f32
    %sg = arith.divf %c1, %d : f32
    linalg.yield %sg : f32
  } -> tensor<2x4xf32>
  %e2 = tensor.empty() : tensor<2x4xf32>
  %g2 = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y2 : tensor<2x4xf32>) outs(%e2 : tensor<2x4xf32>) {
  ^bb0(%in: f32, %out: f32):
    %m = arith.mulf %in, %c2 : f32
    linalg.yield %m : f32
  } -> tensor<2x4xf32>
  %e3 = tensor.empty() : tensor<2x4xf32>
  %g3 = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%y3 : tensor<2x4xf32>) outs(%e3 : tensor<2x4xf32>) {
  ^bb0(%in: f32, %out: f32):
    %p = arith.cmpf ugt, %in, %c0 : f32
    %l = arith.mulf %in, %cs : f32
    %s = arith.select %p, %in, %l : f32
    linalg.yield %s : f32
  } -> tensor<2x4xf32>
  return %g, %g2, %g3 : tensor<2x4xf32>, tensor<2x4xf32>, tensor<2x4xf32>
}
func.func private @lowbit_qlinear_0(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}
func.func private @lowbit_qlinear_1(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}
func.func private @lowbit_qlinear_2(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}

// -----

// Negative: an activation after a sum of two partial products (a K range split over two
// layers, summed, then relu) must not fold: the kernels apply activations only to the
// whole-K result of one call. relu(a + r) is not "act(a) + r" either.
// CHECK-LABEL: func.func @act_after_k_split
// CHECK: call @lowbit_qlinear_0(%{{.+}}) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
// CHECK: call @lowbit_qlinear_1(%{{.+}}) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
// CHECK: linalg.generic
// CHECK-NOT: epilogue =

func.func @act_after_k_split(%x0: tensor<2x8xf32>, %x1: tensor<2x8xf32>) -> tensor<2x4xf32> {
  %c0 = arith.constant 0.0 : f32
  %p0 = call @lowbit_qlinear_0(%x0) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %p1 = call @lowbit_qlinear_1(%x1) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
  %e = tensor.empty() : tensor<2x4xf32>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%p0, %p1 : tensor<2x4xf32>, tensor<2x4xf32>) outs(%e : tensor<2x4xf32>) {
  ^bb0(%in: f32, %in2: f32, %out: f32):
    %s = arith.addf %in, %in2 : f32
    %a = arith.maximumf %s, %c0 : f32
    linalg.yield %a : f32
  } -> tensor<2x4xf32>
  return %g : tensor<2x4xf32>
}
func.func private @lowbit_qlinear_0(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}
func.func private @lowbit_qlinear_1(%x: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<4x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x4xf32>
  return %e : tensor<2x4xf32>
}

// -----

// Negative: a merged call's slices (gate/up of SwiGLU after lowbit-merge-sibling-qlinear)
// are not the call's result: silu(gate) * up stays a generic.
// CHECK-LABEL: func.func @merged_slices
// CHECK: call @lowbit_qlinear_0(%{{.+}}) {no_inline} : (tensor<2x8xf32>) -> tensor<2x8xf32>
// CHECK: linalg.generic
// CHECK-NOT: epilogue =

func.func @merged_slices(%x: tensor<2x8xf32>) -> tensor<2x4xf32> {
  %c1 = arith.constant 1.0 : f32
  %y = call @lowbit_qlinear_0(%x) {no_inline} : (tensor<2x8xf32>) -> tensor<2x8xf32>
  %gt = tensor.extract_slice %y[0, 0] [2, 4] [1, 1] : tensor<2x8xf32> to tensor<2x4xf32>
  %up = tensor.extract_slice %y[0, 4] [2, 4] [1, 1] : tensor<2x8xf32> to tensor<2x4xf32>
  %e = tensor.empty() : tensor<2x4xf32>
  %g = linalg.generic {indexing_maps = [affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>, affine_map<(d0, d1) -> (d0, d1)>], iterator_types = ["parallel", "parallel"]} ins(%gt, %up : tensor<2x4xf32>, tensor<2x4xf32>) outs(%e : tensor<2x4xf32>) {
  ^bb0(%in: f32, %in2: f32, %out: f32):
    %n = arith.negf %in : f32
    %ex = math.exp %n : f32
    %d = arith.addf %ex, %c1 : f32
    %sg = arith.divf %c1, %d : f32
    %s = arith.mulf %in, %sg : f32
    %t = arith.mulf %s, %in2 : f32
    linalg.yield %t : f32
  } -> tensor<2x4xf32>
  return %g : tensor<2x4xf32>
}
func.func private @lowbit_qlinear_0(%x: tensor<2x8xf32>) -> tensor<2x8xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "test", out_features = 8 : i64, weight_format = "ternary"}, lowbit.weights = {codes = dense<1> : tensor<8x8xi8>, scales = dense<5.000000e-01> : tensor<1x1xf32>}, no_inline} {
  %e = tensor.empty() : tensor<2x8xf32>
  return %e : tensor<2x8xf32>
}
