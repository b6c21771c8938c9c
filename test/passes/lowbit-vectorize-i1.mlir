// RUN: lowbit-opt %s --pass-pipeline='builtin.module(lowbit-vectorize)' | filecheck %s

// Ops reading bool (i1) tensors are vectorized like any other: the byte-per-element
// memory layout of i1 memrefs is restored at the LLVM level by
// lowbit-legalize-vector-memory (LLVM bit-packs <N x i1> in memory; test/passes/
// lowbit-legalize-vector-memory.mlir and the SDPA-with-mask tests cover that).
// CHECK-LABEL: func.func @masked_fill
// CHECK: %[[M:.+]] = vector.transfer_read %{{.+}} : tensor<{{.+}}xi1>, vector<{{.+}}xi1>
// CHECK: arith.select %[[M]], %{{.+}} : vector<{{.+}}xi1>, vector<{{.+}}xf32>
// CHECK-NOT: linalg.generic
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
