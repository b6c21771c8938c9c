// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-math-promote-bf16, canonicalize, cse)' | filecheck %s

// A bf16 GELU body computes in f32 and rounds once, at the yield.
// CHECK-LABEL: func.func @gelu_bf16
// CHECK: ^bb0(%[[IN:.+]]: bf16, %{{.+}}: bf16):
// CHECK:   %[[X:.+]] = arith.extf %[[IN]] : bf16 to f32
// CHECK:   %[[D:.+]] = arith.mulf %[[X]], %{{.+}} : f32
// CHECK:   %[[E:.+]] = math.erf %[[D]] : f32
// CHECK:   %[[A:.+]] = arith.addf %[[E]], %{{.+}} : f32
// CHECK:   %[[M:.+]] = arith.mulf %[[X]], %[[A]] : f32
// CHECK:   %[[R:.+]] = arith.truncf %[[M]] : f32 to bf16
// CHECK:   linalg.yield %[[R]] : bf16
#id = affine_map<(d0) -> (d0)>
func.func @gelu_bf16(%x: tensor<17xbf16>) -> tensor<17xbf16> {
  %c = arith.constant 0.707 : bf16
  %one = arith.constant 1.0 : bf16
  %e = tensor.empty() : tensor<17xbf16>
  %y = linalg.generic {indexing_maps = [#id, #id], iterator_types = ["parallel"]} ins(%x : tensor<17xbf16>) outs(%e : tensor<17xbf16>) {
  ^bb0(%in: bf16, %out: bf16):
    %d = arith.mulf %in, %c : bf16
    %r = math.erf %d : bf16
    %a = arith.addf %r, %one : bf16
    %m = arith.mulf %in, %a : bf16
    linalg.yield %m : bf16
  } -> tensor<17xbf16>
  return %y : tensor<17xbf16>
}

// -----

// SiLU computed in f32, truncated to bf16, then multiplied in bf16: the multiply reuses
// the f32 value instead of extending the rounded one.
// CHECK-LABEL: func.func @silu_mul_bf16
// CHECK: ^bb0(%[[A:.+]]: bf16, %[[B:.+]]: bf16, %{{.+}}: bf16):
// CHECK:   %[[S:.+]] = arith.mulf %{{.+}}, %{{.+}} : f32
// CHECK:   %[[BF:.+]] = arith.extf %[[B]] : bf16 to f32
// CHECK:   %[[P:.+]] = arith.mulf %[[S]], %[[BF]] : f32
// CHECK:   %[[R:.+]] = arith.truncf %[[P]] : f32 to bf16
// CHECK:   linalg.yield %[[R]]
#id = affine_map<(d0) -> (d0)>
func.func @silu_mul_bf16(%a: tensor<5xbf16>, %b: tensor<5xbf16>) -> tensor<5xbf16> {
  %half = arith.constant 0.5 : f32
  %e = tensor.empty() : tensor<5xbf16>
  %y = linalg.generic {indexing_maps = [#id, #id, #id], iterator_types = ["parallel"]} ins(%a, %b : tensor<5xbf16>, tensor<5xbf16>) outs(%e : tensor<5xbf16>) {
  ^bb0(%x: bf16, %u: bf16, %out: bf16):
    %xf = arith.extf %x : bf16 to f32
    %s = arith.mulf %xf, %half : f32
    %t = arith.truncf %s : f32 to bf16
    %m = arith.mulf %t, %u : bf16
    linalg.yield %m : bf16
  } -> tensor<5xbf16>
  return %y : tensor<5xbf16>
}

// -----

// Negative: f32 bodies and bf16 arithmetic outside linalg.generic are unchanged.
// CHECK-LABEL: func.func @untouched
// CHECK: arith.addf %{{.+}}, %{{.+}} : bf16
// CHECK: arith.addf %{{.+}}, %{{.+}} : f32
// CHECK-NOT: arith.extf
func.func @untouched(%x: bf16, %t: tensor<3xf32>) -> (bf16, tensor<3xf32>) {
  %y = arith.addf %x, %x : bf16
  %e = tensor.empty() : tensor<3xf32>
  %z = linalg.generic {indexing_maps = [affine_map<(d0) -> (d0)>, affine_map<(d0) -> (d0)>], iterator_types = ["parallel"]} ins(%t : tensor<3xf32>) outs(%e : tensor<3xf32>) {
  ^bb0(%in: f32, %out: f32):
    %r = arith.addf %in, %in : f32
    linalg.yield %r : f32
  } -> tensor<3xf32>
  return %y, %z : bf16, tensor<3xf32>
}

// -----

// Shape-generic: a body on dynamic tensors is promoted the same way (bodies are scalar).
// CHECK-LABEL: func.func @silu_bf16_dynamic
// CHECK: ^bb0(%[[IN:.+]]: bf16, %{{.+}}: bf16):
// CHECK:   %[[X:.+]] = arith.extf %[[IN]] : bf16 to f32
// CHECK:   math.exp %{{.+}} : f32
// CHECK:   %[[R:.+]] = arith.truncf %{{.+}} : f32 to bf16
// CHECK:   linalg.yield %[[R]] : bf16
// CHECK: } -> tensor<?x?xbf16>
#id2 = affine_map<(d0, d1) -> (d0, d1)>
func.func @silu_bf16_dynamic(%x: tensor<?x?xbf16>, %e: tensor<?x?xbf16>) -> tensor<?x?xbf16> {
  %one = arith.constant 1.0 : bf16
  %y = linalg.generic {indexing_maps = [#id2, #id2], iterator_types = ["parallel", "parallel"]} ins(%x : tensor<?x?xbf16>) outs(%e : tensor<?x?xbf16>) {
  ^bb0(%in: bf16, %out: bf16):
    %n = arith.negf %in : bf16
    %ex = math.exp %n : bf16
    %d = arith.addf %ex, %one : bf16
    %r = arith.divf %in, %d : bf16
    linalg.yield %r : bf16
  } -> tensor<?x?xbf16>
  return %y : tensor<?x?xbf16>
}
