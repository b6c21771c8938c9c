// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-vectorize)' | filecheck %s

// A gather from a view that keeps part of each row (z[:, :40] of a 2x48 tensor): the
// vectorizer's gather linearizes indices over the view's shape (row stride 40) while its
// buffer has row stride 48, so the view is copied to a contiguous tensor once, before the
// loops, and every gather reads the copy.
// CHECK-LABEL: func.func @gather_from_column_slice
// CHECK: %[[V:.+]] = tensor.extract_slice %{{.+}}[0, 0] [2, 40] [1, 1]
// CHECK: %[[C:.+]] = bufferization.alloc_tensor() copy(%[[V]]) : tensor<2x40xf32>
// CHECK: scf.for
// CHECK-NOT: bufferization.alloc_tensor
// CHECK: vector.gather %[[C]]
func.func @gather_from_column_slice(%z: tensor<2x48xf32>, %idx: tensor<3xi64>) -> tensor<3x40xf32> {
  %v = tensor.extract_slice %z[0, 0] [2, 40] [1, 1] : tensor<2x48xf32> to tensor<2x40xf32>
  %e = tensor.empty() : tensor<3x40xf32>
  %r = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]}
      ins(%idx : tensor<3xi64>) outs(%e : tensor<3x40xf32>) {
  ^bb0(%i: i64, %o: f32):
    %row = arith.index_cast %i : i64 to index
    %col = linalg.index 1 : index
    %x = tensor.extract %v[%row, %col] : tensor<2x40xf32>
    linalg.yield %x : f32
  } -> tensor<3x40xf32>
  return %r : tensor<3x40xf32>
}

// -----

// Negative: a function argument has the identity layout; gathers read it directly.
// CHECK-LABEL: func.func @gather_from_argument
// CHECK-NOT: bufferization.alloc_tensor
// CHECK: vector.gather %arg0
func.func @gather_from_argument(%z: tensor<2x40xf32>, %idx: tensor<3xi64>) -> tensor<3x40xf32> {
  %e = tensor.empty() : tensor<3x40xf32>
  %r = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]}
      ins(%idx : tensor<3xi64>) outs(%e : tensor<3x40xf32>) {
  ^bb0(%i: i64, %o: f32):
    %row = arith.index_cast %i : i64 to index
    %col = linalg.index 1 : index
    %x = tensor.extract %z[%row, %col] : tensor<2x40xf32>
    linalg.yield %x : f32
  } -> tensor<3x40xf32>
  return %r : tensor<3x40xf32>
}

// -----

// Negative: a slice of whole rows (z[1:3]) is contiguous; no copy.
// CHECK-LABEL: func.func @gather_from_row_slice
// CHECK-NOT: bufferization.alloc_tensor
// CHECK: vector.gather
func.func @gather_from_row_slice(%z: tensor<4x40xf32>, %idx: tensor<3xi64>) -> tensor<3x40xf32> {
  %v = tensor.extract_slice %z[1, 0] [2, 40] [1, 1] : tensor<4x40xf32> to tensor<2x40xf32>
  %e = tensor.empty() : tensor<3x40xf32>
  %r = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]}
      ins(%idx : tensor<3xi64>) outs(%e : tensor<3x40xf32>) {
  ^bb0(%i: i64, %o: f32):
    %row = arith.index_cast %i : i64 to index
    %col = linalg.index 1 : index
    %x = tensor.extract %v[%row, %col] : tensor<2x40xf32>
    linalg.yield %x : f32
  } -> tensor<3x40xf32>
  return %r : tensor<3x40xf32>
}

// -----

// Edge: a strided view with a dynamic number of rows (z[:, ::2]) is copied too.
// CHECK-LABEL: func.func @gather_from_dynamic_strided_slice
// CHECK: %[[V:.+]] = tensor.extract_slice
// CHECK: %[[C:.+]] = bufferization.alloc_tensor() copy(%[[V]]) : tensor<?x20xf32>
// CHECK: vector.gather %[[C]]
func.func @gather_from_dynamic_strided_slice(%z: tensor<?x40xf32>, %idx: tensor<3xi64>) -> tensor<3x20xf32> {
  %c0 = arith.constant 0 : index
  %n = tensor.dim %z, %c0 : tensor<?x40xf32>
  %v = tensor.extract_slice %z[0, 0] [%n, 20] [1, 2] : tensor<?x40xf32> to tensor<?x20xf32>
  %e = tensor.empty() : tensor<3x20xf32>
  %r = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]}
      ins(%idx : tensor<3xi64>) outs(%e : tensor<3x20xf32>) {
  ^bb0(%i: i64, %o: f32):
    %row = arith.index_cast %i : i64 to index
    %col = linalg.index 1 : index
    %x = tensor.extract %v[%row, %col] : tensor<?x20xf32>
    linalg.yield %x : f32
  } -> tensor<3x20xf32>
  return %r : tensor<3x20xf32>
}
