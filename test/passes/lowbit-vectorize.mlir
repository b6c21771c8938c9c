// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-vectorize{vector-bits=512 unroll=1}, canonicalize, cse)' | filecheck %s
// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-vectorize{vector-bits=512 unroll=1}, canonicalize, cse, one-shot-bufferize{bufferize-function-boundaries=1 function-boundary-type-conversion=identity-layout-map}, canonicalize, cse, canonicalize)' | filecheck %s --check-prefix=BUF

// An elementwise op with a tail: 17 = 16 + 1 -> one full vector, one masked remainder.
// After bufferization the masked tail writes in place: no temporary buffer and copy.
// BUF-LABEL: func.func @add_tail
// BUF-NOT: memref.copy
// BUF: return
// CHECK-LABEL: func.func @add_tail
// CHECK-SAME: (%[[A:.+]]: tensor<3x17xf32>, %[[B:.+]]: tensor<3x17xf32>)
// CHECK: %[[FLAT_A:.+]] = tensor.collapse_shape %[[A]]
// CHECK: scf.for
// CHECK:   %[[VA:.+]] = vector.transfer_read %{{.+}} : tensor<16xf32>, vector<16xf32>
// CHECK:   %[[VB:.+]] = vector.transfer_read %{{.+}} : tensor<16xf32>, vector<16xf32>
// CHECK:   %[[S:.+]] = arith.addf %[[VA]], %[[VB]] : vector<16xf32>
// CHECK:   vector.transfer_write %[[S]]
// CHECK: %[[M:.+]] = vector.constant_mask [3] : vector<16xi1>
// CHECK: vector.transfer_read %{{.+}}, %[[M]]
// CHECK: vector.transfer_write %{{.+}}, %[[M]]
// CHECK-NOT: linalg.generic
func.func @add_tail(%a: tensor<3x17xf32>, %b: tensor<3x17xf32>) -> tensor<3x17xf32> {
  %e = tensor.empty() : tensor<3x17xf32>
  %r = linalg.add ins(%a, %b : tensor<3x17xf32>, tensor<3x17xf32>) outs(%e : tensor<3x17xf32>) -> tensor<3x17xf32>
  return %r : tensor<3x17xf32>
}

// -----

// A row reduction over 4097 elements: per row, 256 full vectors combined lane-wise into a
// vector of partial maxima carried in registers (no horizontal reduction in the loop),
// a masked tail folded into the partials, then one horizontal reduction.
// After bufferization the masked tail writes in place: no temporary buffer and copy.
// BUF-LABEL: func.func @row_max
// BUF-NOT: memref.copy
// BUF: return
// CHECK-LABEL: func.func @row_max
// CHECK-DAG: %[[NEG_INF:.+]] = arith.constant dense<0xFF800000> : vector<16xf32>
// CHECK: scf.for %[[ROW:.+]] = %c0 to %c5 step %c1
// CHECK:   %[[PART:.+]] = scf.for %{{.+}} = %c0 to %c4096 step %c16 iter_args(%[[ACC:.+]] = %[[NEG_INF]]) -> (vector<16xf32>)
// CHECK:     %[[V:.+]] = vector.transfer_read %{{.+}} : tensor<1x16xf32>, vector<16xf32>
// CHECK-NOT: vector.multi_reduction
// CHECK:     %[[M:.+]] = arith.maximumf %[[V]], %[[ACC]] : vector<16xf32>
// CHECK:     scf.yield %[[M]] : vector<16xf32>
// CHECK:   vector.transfer_write %[[PART]]
// CHECK:   %[[TAIL_MASK:.+]] = vector.constant_mask [1] : vector<16xi1>
// CHECK:   vector.transfer_read %{{.+}}, %[[TAIL_MASK]]
// CHECK:   arith.maximumf
// CHECK:   vector.multi_reduction <maximumf>, %{{.+}} [1] : vector<1x16xf32> to vector<1xf32>
// CHECK-NOT: linalg.generic
#id = affine_map<(d0, d1) -> (d0, d1)>
#row = affine_map<(d0, d1) -> (d0)>
func.func @row_max(%x: tensor<5x4097xf32>, %init: tensor<5xf32>) -> tensor<5xf32> {
  %r = linalg.generic {indexing_maps = [#id, #row], iterator_types = ["parallel", "reduction"]}
      ins(%x : tensor<5x4097xf32>) outs(%init : tensor<5xf32>) {
  ^bb0(%in: f32, %out: f32):
    %m = arith.maximumf %in, %out : f32
    linalg.yield %m : f32
  } -> tensor<5xf32>
  return %r : tensor<5xf32>
}

// -----

// Tiny shapes need no loop at all: a 1x1 fill is a single vector. A 16-bit float op of
// odd width gets a masked power-of-two vector (LLVM's x86 backend aborts on v3bf16 and
// v17bf16 arithmetic).
// CHECK-LABEL: func.func @tiny
// CHECK-NOT: scf.for
// CHECK: vector.transfer_write %{{.+}} : vector<1xf32>, tensor<1x1xf32>
// CHECK-NOT: vector<3xbf16>
// CHECK: %[[MASK:.+]] = vector.constant_mask [3] : vector<4xi1>
// CHECK: %[[X:.+]] = vector.transfer_read %{{.+}}, %[[MASK]] {{.+}} : tensor<3xbf16>, vector<4xbf16>
// CHECK: %[[NEG:.+]] = arith.negf %[[X]] : vector<4xbf16>
// CHECK: vector.transfer_write %[[NEG]], %{{.+}}, %[[MASK]] {{.+}} : vector<4xbf16>, tensor<3xbf16>
func.func @tiny(%x: tensor<3xbf16>) -> (tensor<1x1xf32>, tensor<3xbf16>) {
  %c = arith.constant 1.0 : f32
  %e = tensor.empty() : tensor<1x1xf32>
  %f = linalg.fill ins(%c : f32) outs(%e : tensor<1x1xf32>) -> tensor<1x1xf32>
  %e3 = tensor.empty() : tensor<3xbf16>
  %y = linalg.negf ins(%x : tensor<3xbf16>) outs(%e3 : tensor<3xbf16>) -> tensor<3xbf16>
  return %f, %y : tensor<1x1xf32>, tensor<3xbf16>
}

// -----

// Negative: matmuls and contraction generics belong to the matmul passes.
// CHECK-LABEL: func.func @matmul_untouched
// CHECK: linalg.matmul
// CHECK: linalg.generic
// CHECK-NOT: vector.
#ma = affine_map<(m, n, k) -> (m, k)>
#mb = affine_map<(m, n, k) -> (k, n)>
#mc = affine_map<(m, n, k) -> (m, n)>
func.func @matmul_untouched(%a: tensor<4x8xf32>, %b: tensor<8x4xf32>, %c: tensor<4x4xf32>) -> (tensor<4x4xf32>, tensor<4x4xf32>) {
  %r = linalg.matmul ins(%a, %b : tensor<4x8xf32>, tensor<8x4xf32>) outs(%c : tensor<4x4xf32>) -> tensor<4x4xf32>
  %g = linalg.generic {indexing_maps = [#ma, #mb, #mc], iterator_types = ["parallel", "parallel", "reduction"]}
      ins(%a, %b : tensor<4x8xf32>, tensor<8x4xf32>) outs(%c : tensor<4x4xf32>) {
  ^bb0(%x: f32, %y: f32, %acc: f32):
    %p = arith.mulf %x, %y : f32
    %s = arith.addf %acc, %p : f32
    linalg.yield %s : f32
  } -> tensor<4x4xf32>
  return %r, %g : tensor<4x4xf32>, tensor<4x4xf32>
}

// -----

// Negative for the split: a reduction over the outer dim (column sums) is not an
// innermost reduction; each row tile is added into a vector of column sums.
// CHECK-LABEL: func.func @col_sum
// CHECK-NOT: vector.multi_reduction <add>, %{{.+}} [1]
// CHECK: scf.for %{{.+}} = %c0 to %c300 step %c1
// CHECK:   scf.for %{{.+}} = %c0 to %c48 step %c16
// CHECK:     arith.addf %{{.+}} : vector<16xf32>
// CHECK-NOT: linalg.generic
#cs_id = affine_map<(d0, d1) -> (d0, d1)>
#cs_col = affine_map<(d0, d1) -> (d1)>
func.func @col_sum(%x: tensor<300x48xf32>, %init: tensor<48xf32>) -> tensor<48xf32> {
  %r = linalg.generic {indexing_maps = [#cs_id, #cs_col], iterator_types = ["reduction", "parallel"]}
      ins(%x : tensor<300x48xf32>) outs(%init : tensor<48xf32>) {
  ^bb0(%in: f32, %out: f32):
    %s = arith.addf %in, %out : f32
    linalg.yield %s : f32
  } -> tensor<48xf32>
  return %r : tensor<48xf32>
}

// -----

// Integer remainder is kept scalar: x86 has no SIMD integer division, and the padding
// lanes of the masked tail (17 = 16 + 1) would divide by zero (SIGFPE at run time).
// CHECK-LABEL: func.func @int_rem_scalar
// CHECK: linalg.generic
// CHECK:   arith.remsi %{{.+}}, %{{.+}} : i32
// CHECK-NOT: vector.transfer_read
func.func @int_rem_scalar(%a: tensor<3x17xi32>, %b: tensor<3x17xi32>) -> tensor<3x17xi32> {
  %e = tensor.empty() : tensor<3x17xi32>
  %r = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]} ins(%a, %b : tensor<3x17xi32>, tensor<3x17xi32>) outs(%e : tensor<3x17xi32>) {
  ^bb0(%x: i32, %y: i32, %o: i32):
    %q = arith.remsi %x, %y : i32
    linalg.yield %q : i32
  } -> tensor<3x17xi32>
  return %r : tensor<3x17xi32>
}

// -----

// Integer addition next to it still vectorizes (only division is kept scalar).
// CHECK-LABEL: func.func @int_add_vector
// CHECK: vector.transfer_read {{.+}} vector<16xi32>
// CHECK: arith.addi {{.+}} : vector<16xi32>
// CHECK-NOT: linalg.generic
func.func @int_add_vector(%a: tensor<3x17xi32>, %b: tensor<3x17xi32>) -> tensor<3x17xi32> {
  %e = tensor.empty() : tensor<3x17xi32>
  %r = linalg.add ins(%a, %b : tensor<3x17xi32>, tensor<3x17xi32>) outs(%e : tensor<3x17xi32>) -> tensor<3x17xi32>
  return %r : tensor<3x17xi32>
}

// -----

// A dynamic row length (softmax over the KV length): the split reduction keeps a vector of
// partial maxima over the full vectors (loop bound rounded down to 16 at run time), then
// the masked tail (create_mask of the remaining count), then one horizontal reduction.
// After bufferization the masked tail writes in place: no temporary buffer and copy.
// BUF-LABEL: func.func @rowmax_dyn_inner
// BUF-NOT: memref.copy
// BUF: return
// CHECK-LABEL: func.func @rowmax_dyn_inner
// CHECK: %[[DIM:.+]] = tensor.dim %{{.+}}, %c1 : tensor<4x?xf32>
// CHECK: scf.for %{{.+}} = %c0 to %c4 step %c1
// CHECK:   %[[FULL:.+]] = affine.apply #{{.+}}()[%[[DIM]]]
// CHECK:   %[[PART:.+]] = scf.for %{{.+}} = %c0 to %[[FULL]] step %c16 iter_args(%{{.+}} = %{{.+}}) -> (vector<16xf32>)
// CHECK:     vector.transfer_read {{.+}} : tensor<1x16xf32>, vector<16xf32>
// CHECK:     arith.maximumf {{.+}} : vector<16xf32>
// CHECK-NOT:   vector.multi_reduction
// CHECK:   scf.for %{{.+}} = %[[FULL]] to %[[DIM]] step %c16
// CHECK:     vector.create_mask
// CHECK:   vector.multi_reduction <maximumf>, {{.+}} [1] : vector<1x16xf32> to vector<1xf32>
// CHECK-NOT: linalg.generic
#idd = affine_map<(d0, d1) -> (d0, d1)>
#rowd = affine_map<(d0, d1) -> (d0)>
func.func @rowmax_dyn_inner(%x: tensor<4x?xf32>) -> tensor<4xf32> {
  %ninf = arith.constant 0xFF800000 : f32
  %e1 = tensor.empty() : tensor<4xf32>
  %m0 = linalg.fill ins(%ninf : f32) outs(%e1 : tensor<4xf32>) -> tensor<4xf32>
  %m = linalg.generic {indexing_maps = [#idd, #rowd], iterator_types = ["parallel", "reduction"]}
      ins(%x : tensor<4x?xf32>) outs(%m0 : tensor<4xf32>) {
  ^bb0(%in: f32, %out: f32):
    %r = arith.maximumf %in, %out : f32
    linalg.yield %r : f32
  } -> tensor<4xf32>
  return %m : tensor<4xf32>
}

// -----

// Dynamic rows of an identity-map elementwise op: flattened to one dynamic loop, full
// vectors up to the rounded-down bound, one masked remainder.
// After bufferization the masked tail writes in place: no temporary buffer and copy.
// BUF-LABEL: func.func @add_dyn_rows
// BUF-NOT: memref.copy
// BUF: return
// CHECK-LABEL: func.func @add_dyn_rows
// CHECK: tensor.collapse_shape %{{.+}} {{\[\[}}0, 1]] : tensor<?x33xf32> into tensor<?xf32>
// CHECK: %[[N:.+]] = tensor.dim %{{.+}}, %c0 : tensor<?xf32>
// CHECK: %[[FULL:.+]] = affine.apply #{{.+}}()[%[[N]]]
// CHECK: scf.for %{{.+}} = %c0 to %[[FULL]] step %c16
// CHECK:   arith.addf {{.+}} : vector<16xf32>
// CHECK: scf.for %{{.+}} = %[[FULL]] to %[[N]] step %c16
// CHECK:   vector.create_mask
// CHECK:   arith.addf {{.+}} : vector<16xf32>
// CHECK: tensor.expand_shape
// CHECK-NOT: linalg.generic
func.func @add_dyn_rows(%a: tensor<?x33xf32>, %b: tensor<?x33xf32>) -> tensor<?x33xf32> {
  %c0 = arith.constant 0 : index
  %t = tensor.dim %a, %c0 : tensor<?x33xf32>
  %e = tensor.empty(%t) : tensor<?x33xf32>
  %r = linalg.add ins(%a, %b : tensor<?x33xf32>, tensor<?x33xf32>) outs(%e : tensor<?x33xf32>) -> tensor<?x33xf32>
  return %r : tensor<?x33xf32>
}

// -----

// Dynamic rows broadcast against a static column vector (not identity maps: no flatten):
// rows one by one, columns in vectors with a peeled masked tail.
// After bufferization the masked tail writes in place: no temporary buffer and copy.
// BUF-LABEL: func.func @scale_dyn_rows
// BUF-NOT: memref.copy
// BUF: return
// CHECK-LABEL: func.func @scale_dyn_rows
// CHECK: scf.for %{{.+}} = %c0 to %{{.+}} step %c1
// CHECK:   scf.for %{{.+}} = %c0 to %c32 step %c16
// CHECK:     arith.mulf {{.+}} : vector<16xf32>
// CHECK:   vector.constant_mask [4] : vector<16xi1>
// CHECK-NOT: linalg.generic
func.func @scale_dyn_rows(%a: tensor<?x36xf32>, %w: tensor<36xf32>) -> tensor<?x36xf32> {
  %c0 = arith.constant 0 : index
  %t = tensor.dim %a, %c0 : tensor<?x36xf32>
  %e = tensor.empty(%t) : tensor<?x36xf32>
  %r = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (j)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]} ins(%a, %w : tensor<?x36xf32>, tensor<36xf32>) outs(%e : tensor<?x36xf32>) {
  ^bb0(%x: f32, %y: f32, %o: f32):
    %q = arith.mulf %x, %y : f32
    linalg.yield %q : f32
  } -> tensor<?x36xf32>
  return %r : tensor<?x36xf32>
}

// -----

// Not flattened: a dynamic tile inside a forall is a strided view that cannot be proven
// contiguous (collapsing it would copy the tile out and back), and a body with
// tensor.extract (a gather) would rebuild its n-d indices from a flat one with vector
// integer div/rem. Rows stay a loop; columns are vectors.
// CHECK-LABEL: func.func @no_flatten_dyn_tile
// CHECK-NOT: tensor.collapse_shape
// CHECK: scf.forall
// CHECK:   scf.for
// CHECK:     arith.addf {{.+}} : vector<16xf32>
// CHECK-LABEL: func.func @no_flatten_gather
// CHECK-NOT: tensor.collapse_shape
// CHECK-NOT: arith.divsi
// CHECK: vector.transfer_read
#i2 = affine_map<(d0, d1) -> (d0, d1)>
func.func @no_flatten_dyn_tile(%a: tensor<?x32xf32>) -> tensor<?x32xf32> {
  %c0 = arith.constant 0 : index
  %t = tensor.dim %a, %c0 : tensor<?x32xf32>
  %e = tensor.empty(%t) : tensor<?x32xf32>
  %n = affine.apply affine_map<()[s0] -> (s0 ceildiv 8)>()[%t]
  %r = scf.forall (%i) in (%n) shared_outs(%o = %e) -> (tensor<?x32xf32>) {
    %off = affine.apply affine_map<(d0) -> (d0 * 8)>(%i)
    %sz = affine.min affine_map<(d0)[s0] -> (d0 * -8 + s0, 8)>(%i)[%t]
    %s = tensor.extract_slice %a[%off, 0] [%sz, 32] [1, 1] : tensor<?x32xf32> to tensor<?x32xf32>
    %d = tensor.extract_slice %o[%off, 0] [%sz, 32] [1, 1] : tensor<?x32xf32> to tensor<?x32xf32>
    %y = linalg.generic {indexing_maps = [#i2, #i2], iterator_types = ["parallel", "parallel"]} ins(%s : tensor<?x32xf32>) outs(%d : tensor<?x32xf32>) {
    ^bb0(%x: f32, %z: f32):
      %q = arith.addf %x, %x : f32
      linalg.yield %q : f32
    } -> tensor<?x32xf32>
    scf.forall.in_parallel {
      tensor.parallel_insert_slice %y into %o[%off, 0] [%sz, 32] [1, 1] : tensor<?x32xf32> into tensor<?x32xf32>
    }
  }
  return %r : tensor<?x32xf32>
}
func.func @no_flatten_gather(%src: tensor<4x32xf32>, %e: tensor<3x32xf32>) -> tensor<3x32xf32> {
  %y = linalg.generic {indexing_maps = [#i2], iterator_types = ["parallel", "parallel"]} outs(%e : tensor<3x32xf32>) {
  ^bb0(%z: f32):
    %i = linalg.index 0 : index
    %j = linalg.index 1 : index
    %c1 = arith.constant 1 : index
    %k = arith.addi %i, %c1 : index
    %v = tensor.extract %src[%k, %j] : tensor<4x32xf32>
    linalg.yield %v : f32
  } -> tensor<3x32xf32>
  return %y : tensor<3x32xf32>
}
