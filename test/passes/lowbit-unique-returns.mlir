// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-unique-returns)' | filecheck %s
// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-unique-returns, one-shot-bufferize{bufferize-function-boundaries=1 function-boundary-type-conversion=identity-layout-map}, buffer-results-to-out-params{hoist-static-allocs=true modify-public-functions=true})' | filecheck %s --check-prefix=BUF

// One value returned twice (what CSE makes of `(x + 1, x + 1)`): the repeat is a copy.
// CHECK-LABEL: func.func @twice
// CHECK: %[[V:.+]] = linalg.generic
// CHECK: %[[C:.+]] = bufferization.alloc_tensor() copy(%[[V]])
// CHECK: return %[[V]], %[[C]]
// BUF-LABEL: func.func @twice
// BUF-SAME: (%{{.+}}: memref<4xf32>, %{{.+}}: memref<4xf32>, %{{.+}}: memref<4xf32>)
func.func @twice(%x: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>) {
  %e = tensor.empty() : tensor<4xf32>
  %v = linalg.generic {indexing_maps = [affine_map<(i) -> (i)>, affine_map<(i) -> (i)>], iterator_types = ["parallel"]}
      ins(%x : tensor<4xf32>) outs(%e : tensor<4xf32>) {
  ^bb0(%a: f32, %o: f32):
    %one = arith.constant 1.0 : f32
    %r = arith.addf %a, %one : f32
    linalg.yield %r : f32
  } -> tensor<4xf32>
  return %v, %v : tensor<4xf32>, tensor<4xf32>
}

// -----

// An argument returned as it is also gets its own buffer.
// CHECK-LABEL: func.func @passthrough
// CHECK: %[[C:.+]] = bufferization.alloc_tensor() copy(%arg0)
// CHECK: return %[[C]]
func.func @passthrough(%x: tensor<4xf32>) -> tensor<4xf32> {
  return %x : tensor<4xf32>
}

// -----

// Negative: distinct computed results are left alone.
// CHECK-LABEL: func.func @distinct
// CHECK-NOT: alloc_tensor
// CHECK: return
func.func @distinct(%x: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>) {
  %e = tensor.empty() : tensor<4xf32>
  %a = linalg.generic {indexing_maps = [affine_map<(i) -> (i)>, affine_map<(i) -> (i)>], iterator_types = ["parallel"]}
      ins(%x : tensor<4xf32>) outs(%e : tensor<4xf32>) {
  ^bb0(%v: f32, %o: f32):
    %r = arith.negf %v : f32
    linalg.yield %r : f32
  } -> tensor<4xf32>
  %b = linalg.generic {indexing_maps = [affine_map<(i) -> (i)>, affine_map<(i) -> (i)>], iterator_types = ["parallel"]}
      ins(%x : tensor<4xf32>) outs(%e : tensor<4xf32>) {
  ^bb0(%v: f32, %o: f32):
    %r = math.absf %v : f32
    linalg.yield %r : f32
  } -> tensor<4xf32>
  return %a, %b : tensor<4xf32>, tensor<4xf32>
}

// -----

// Shape-generic: a dynamic tensor returned twice gets its copy too (sizes from the value).
// CHECK-LABEL: func.func @twice_dynamic
// CHECK: %[[V:.+]] = linalg.generic
// CHECK: %[[C:.+]] = bufferization.alloc_tensor() copy(%[[V]]) : tensor<?xf32>
// CHECK: return %[[V]], %[[C]]
// BUF-LABEL: func.func @twice_dynamic
// BUF-SAME: (%{{.+}}: memref<?xf32>, %{{.+}}: memref<?xf32>, %{{.+}}: memref<?xf32>)
func.func @twice_dynamic(%x: tensor<?xf32>) -> (tensor<?xf32>, tensor<?xf32>) {
  %c0 = arith.constant 0 : index
  %n = tensor.dim %x, %c0 : tensor<?xf32>
  %e = tensor.empty(%n) : tensor<?xf32>
  %v = linalg.generic {indexing_maps = [affine_map<(i) -> (i)>, affine_map<(i) -> (i)>], iterator_types = ["parallel"]}
      ins(%x : tensor<?xf32>) outs(%e : tensor<?xf32>) {
  ^bb0(%a: f32, %o: f32):
    %one = arith.constant 1.0 : f32
    %r = arith.addf %a, %one : f32
    linalg.yield %r : f32
  } -> tensor<?xf32>
  return %v, %v : tensor<?xf32>, tensor<?xf32>
}
