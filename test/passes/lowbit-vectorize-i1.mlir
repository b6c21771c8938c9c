// RUN: lowbit-opt %s --pass-pipeline='builtin.module(lowbit-vectorize)' | filecheck %s

// Negative: ops reading bool (i1) tensors stay scalar. LLVM bit-packs vector<Nxi1> while
// i1 tensors hold one byte per element, so a vectorized mask load would read wrong data
// (this broke scaled_dot_product_attention with a boolean mask).
// CHECK-LABEL: func.func @masked_fill
// CHECK-NOT: vector.transfer_read
// CHECK: linalg.generic
// CHECK: arith.select
func.func @masked_fill(%mask: tensor<32x48xi1>, %x: tensor<32x48xf32>) -> tensor<32x48xf32> {
  %ninf = arith.constant 0xFF800000 : f32
  %e = tensor.empty() : tensor<32x48xf32>
  %r = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]}
      ins(%mask, %x : tensor<32x48xi1>, tensor<32x48xf32>) outs(%e : tensor<32x48xf32>) {
  ^bb0(%m: i1, %v: f32, %o: f32):
    %s = arith.select %m, %v, %ninf : f32
    linalg.yield %s : f32
  } -> tensor<32x48xf32>
  return %r : tensor<32x48xf32>
}

// Positive control: the same op on an f32 mask is vectorized.
// CHECK-LABEL: func.func @float_mask
// CHECK: vector.transfer_read
func.func @float_mask(%mask: tensor<32x48xf32>, %x: tensor<32x48xf32>) -> tensor<32x48xf32> {
  %e = tensor.empty() : tensor<32x48xf32>
  %r = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]}
      ins(%mask, %x : tensor<32x48xf32>, tensor<32x48xf32>) outs(%e : tensor<32x48xf32>) {
  ^bb0(%m: f32, %v: f32, %o: f32):
    %s = arith.mulf %m, %v : f32
    linalg.yield %s : f32
  } -> tensor<32x48xf32>
  return %r : tensor<32x48xf32>
}
