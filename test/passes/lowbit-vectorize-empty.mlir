// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-vectorize{vector-bits=512 unroll=1}, canonicalize, cse)' | filecheck %s

// Ops whose iteration space is empty (a static zero-trip loop) are folded to their inits:
// `x.sum(-1)` of a [5, 0] tensor is the zero fill. Tiling it would ask for a 0-lane vector
// (vector_sizes [1, 0]), which crashed MLIR with a SIGSEGV (issue 13).

#map = affine_map<(d0, d1) -> (d0, d1)>
#map1 = affine_map<(d0, d1) -> (d0)>
// CHECK-LABEL: func.func @sum_empty_inner
// CHECK-SAME: (%{{.*}}: tensor<5x0xf32>) -> tensor<5xf32>
// CHECK-NOT: linalg.generic
// CHECK-NOT: vector<1x0xf32>
// CHECK: %[[Z:.*]] = arith.constant dense<0.000000e+00> : vector<5xf32>
// CHECK: %[[W:.*]] = vector.transfer_write %[[Z]]
// CHECK: return %[[W]] : tensor<5xf32>
func.func @sum_empty_inner(%arg0: tensor<5x0xf32>) -> tensor<5xf32> {
  %cst = arith.constant 0.000000e+00 : f32
  %0 = tensor.empty() : tensor<5xf32>
  %1 = linalg.fill ins(%cst : f32) outs(%0 : tensor<5xf32>) -> tensor<5xf32>
  %2 = linalg.generic {indexing_maps = [#map, #map1], iterator_types = ["parallel", "reduction"]} ins(%arg0 : tensor<5x0xf32>) outs(%1 : tensor<5xf32>) {
  ^bb0(%in: f32, %out: f32):
    %3 = arith.addf %in, %out : f32
    linalg.yield %3 : f32
  } -> tensor<5xf32>
  return %2 : tensor<5xf32>
}

// -----

// The reduction dim is empty in the middle (`x.sum(1)` of [2, 0, 3]): the [2, 3] zero fill.
#map = affine_map<(d0, d1, d2) -> (d0, d1, d2)>
#map1 = affine_map<(d0, d1, d2) -> (d0, d2)>
// CHECK-LABEL: func.func @sum_empty_middle
// CHECK-NOT: linalg.generic
// CHECK: %[[Z:.*]] = arith.constant dense<0.000000e+00> : vector<3xf32>
// CHECK: %[[R:.*]] = scf.for
// CHECK: vector.transfer_write %[[Z]]
// CHECK-NOT: vector.transfer_read
// CHECK: return %[[R]] : tensor<2x3xf32>
func.func @sum_empty_middle(%arg0: tensor<2x0x3xf32>) -> tensor<2x3xf32> {
  %cst = arith.constant 0.000000e+00 : f32
  %0 = tensor.empty() : tensor<2x3xf32>
  %1 = linalg.fill ins(%cst : f32) outs(%0 : tensor<2x3xf32>) -> tensor<2x3xf32>
  %2 = linalg.generic {indexing_maps = [#map, #map1], iterator_types = ["parallel", "reduction", "parallel"]} ins(%arg0 : tensor<2x0x3xf32>) outs(%1 : tensor<2x3xf32>) {
  ^bb0(%in: f32, %out: f32):
    %3 = arith.addf %in, %out : f32
    linalg.yield %3 : f32
  } -> tensor<2x3xf32>
  return %2 : tensor<2x3xf32>
}

// -----

// An empty parallel dim with an inner reduction (`x.sum(-1)` of [2, 0, 3]) and an
// elementwise op on an empty tensor: both results are their (empty) inits.
#map = affine_map<(d0, d1, d2) -> (d0, d1, d2)>
#map1 = affine_map<(d0, d1, d2) -> (d0, d1)>
#id = affine_map<(d0, d1) -> (d0, d1)>
// CHECK-LABEL: func.func @empty_outputs
// CHECK-NOT: linalg.generic
// CHECK-NOT: linalg.fill
// CHECK-NOT: vector.transfer
// CHECK: %[[E:.*]] = tensor.empty() : tensor<2x0xf32>
// CHECK: return %[[E]], %[[E]] : tensor<2x0xf32>, tensor<2x0xf32>
func.func @empty_outputs(%arg0: tensor<2x0x3xf32>, %arg1: tensor<2x0xf32>) -> (tensor<2x0xf32>, tensor<2x0xf32>) {
  %cst = arith.constant 0.000000e+00 : f32
  %0 = tensor.empty() : tensor<2x0xf32>
  %1 = linalg.fill ins(%cst : f32) outs(%0 : tensor<2x0xf32>) -> tensor<2x0xf32>
  %2 = linalg.generic {indexing_maps = [#map, #map1], iterator_types = ["parallel", "parallel", "reduction"]} ins(%arg0 : tensor<2x0x3xf32>) outs(%1 : tensor<2x0xf32>) {
  ^bb0(%in: f32, %out: f32):
    %3 = arith.addf %in, %out : f32
    linalg.yield %3 : f32
  } -> tensor<2x0xf32>
  %4 = linalg.generic {indexing_maps = [#id, #id], iterator_types = ["parallel", "parallel"]} ins(%arg1 : tensor<2x0xf32>) outs(%0 : tensor<2x0xf32>) {
  ^bb0(%in: f32, %out: f32):
    %5 = arith.addf %in, %in : f32
    linalg.yield %5 : f32
  } -> tensor<2x0xf32>
  return %2, %4 : tensor<2x0xf32>, tensor<2x0xf32>
}

// -----

// A dynamic dim is not folded (it may be non-zero at run time): still tiled and masked.
#map = affine_map<(d0, d1) -> (d0, d1)>
#map1 = affine_map<(d0, d1) -> (d0)>
// CHECK-LABEL: func.func @sum_dynamic
// CHECK: vector.multi_reduction
func.func @sum_dynamic(%arg0: tensor<5x?xf32>) -> tensor<5xf32> {
  %cst = arith.constant 0.000000e+00 : f32
  %0 = tensor.empty() : tensor<5xf32>
  %1 = linalg.fill ins(%cst : f32) outs(%0 : tensor<5xf32>) -> tensor<5xf32>
  %2 = linalg.generic {indexing_maps = [#map, #map1], iterator_types = ["parallel", "reduction"]} ins(%arg0 : tensor<5x?xf32>) outs(%1 : tensor<5xf32>) {
  ^bb0(%in: f32, %out: f32):
    %3 = arith.addf %in, %out : f32
    linalg.yield %3 : f32
  } -> tensor<5xf32>
  return %2 : tensor<5xf32>
}
