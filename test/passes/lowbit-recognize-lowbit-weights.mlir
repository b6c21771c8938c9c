// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-recognize-lowbit-weights)' | filecheck %s
// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-recognize-lowbit-weights{formats=ternary,int1,int2_sym,int2_asym,int4_sym group-sizes=8})' | filecheck %s --check-prefix=OPT

// Positive: 2-bit codes packed 4 per byte (lowest bits first), offset 2, per-row scales,
// transposed for linalg.matmul -> int2_sym per channel, codes recovered exactly.
// Row 0: byte 0xE4 -> codes 0 1 2 3 -> q = -2 -1 0 1; row 1: byte 0x4F -> 3 3 0 1 -> 1 1 -2 -1.
// CHECK: lowbit.report = [{
// CHECK-SAME: format = "int2_sym/channel a=none"
// CHECK-SAME: origin = "dequant-subgraph"
// CHECK-SAME: result = "recognized"
// CHECK-SAME: shape = "1x4 @ 2x4^T"
// CHECK: func.func @packed_2bit(%[[X:.+]]: tensor<1x4xf32>)
// CHECK-NEXT: %[[Y:.+]] = call @lowbit_qlinear_0(%[[X]]) {no_inline} : (tensor<1x4xf32>) -> tensor<1x2xf32>
// CHECK-NEXT: return %[[Y]]
// CHECK: func.func private @lowbit_qlinear_0
// CHECK-SAME: granularity = "channel"
// CHECK-SAME: origin = "dequant-subgraph"
// CHECK-SAME: weight_format = "int2_sym"
// CHECK: arith.constant {lowbit.role = "codes"} dense<{{\[\[}}-2, -1, 0, 1], [1, 1, -2, -1]]> : tensor<2x4xi8>
// CHECK: arith.constant {lowbit.role = "scales"} dense<{{\[\[}}5.000000e-01], [2.500000e-01]]> : tensor<2x1xf32>
#unpack_in = affine_map<(n, k) -> (n, k floordiv 4)>
#id = affine_map<(n, k) -> (n, k)>
#row = affine_map<(n, k) -> (n)>
func.func @packed_2bit(%x: tensor<1x4xf32>) -> tensor<1x2xf32> {
  %packed = arith.constant dense<[[-28], [79]]> : tensor<2x1xi8>
  %scale = arith.constant dense<[0.5, 0.25]> : tensor<2xf32>
  %c3_i8 = arith.constant 3 : i8
  %c2_i32 = arith.constant 2 : i32
  %c4 = arith.constant 4 : index
  %c2 = arith.constant 2 : index
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<2x4xf32>
  %w = linalg.generic {indexing_maps = [#unpack_in, #row, #id], iterator_types = ["parallel", "parallel"]}
      ins(%packed, %scale : tensor<2x1xi8>, tensor<2xf32>) outs(%e : tensor<2x4xf32>) {
  ^bb0(%byte: i8, %s: f32, %out: f32):
    %k = linalg.index 1 : index
    %pos = arith.remui %k, %c4 : index
    %sh = arith.muli %pos, %c2 : index
    %sh8 = arith.index_cast %sh : index to i8
    %v = arith.shrui %byte, %sh8 : i8
    %code = arith.andi %v, %c3_i8 : i8
    %ci = arith.extui %code : i8 to i32
    %q = arith.subi %ci, %c2_i32 : i32
    %qf = arith.sitofp %q : i32 to f32
    %wv = arith.mulf %qf, %s : f32
    linalg.yield %wv : f32
  } -> tensor<2x4xf32>
  %et = tensor.empty() : tensor<4x2xf32>
  %wt = linalg.transpose ins(%w : tensor<2x4xf32>) outs(%et : tensor<4x2xf32>) permutation = [1, 0]
  %ey = tensor.empty() : tensor<1x2xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%ey : tensor<1x2xf32>) -> tensor<1x2xf32>
  %y = linalg.matmul ins(%x, %wt : tensor<1x4xf32>, tensor<4x2xf32>) outs(%acc : tensor<1x2xf32>) -> tensor<1x2xf32>
  return %y : tensor<1x2xf32>
}

// -----

// Positive, edge shapes: QAT ternary fp weight (K = 3, N = 1) read as [N, K] by a
// matmul_transpose_b-like generic over a 3-D activation, with a bias added afterwards:
// ternary with one scale for the whole tensor, bias absorbed.
// CHECK: format = "ternary/tensor a=none"
// CHECK-SAME: origin = "fp-weights"
// CHECK: func.func @qat_ternary_transpose_b(%[[X:.+]]: tensor<2x1x3xf32>)
// CHECK: %[[C:.+]] = tensor.collapse_shape %[[X]] {{\[\[}}0, 1], [2]] : tensor<2x1x3xf32> into tensor<2x3xf32>
// CHECK: %[[Y:.+]] = call @lowbit_qlinear_0(%[[C]])
// CHECK: %[[E:.+]] = tensor.expand_shape %[[Y]]
// CHECK-NEXT: return %[[E]] : tensor<2x1x1xf32>
// CHECK: arith.constant {lowbit.role = "codes"} dense<{{\[\[}}1, 0, -1]]> : tensor<1x3xi8>
// CHECK: arith.constant {lowbit.role = "scales"} dense<7.500000e-01> : tensor<1x1xf32>
// CHECK: arith.constant {lowbit.role = "bias"} dense<2.000000e+00> : tensor<1xf32>
func.func @qat_ternary_transpose_b(%x: tensor<2x1x3xf32>) -> tensor<2x1x1xf32> {
  %w = arith.constant dense<[[0.75, 0.0, -0.75]]> : tensor<1x3xf32>
  %b = arith.constant dense<[2.0]> : tensor<1xf32>
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<2x1x1xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%e : tensor<2x1x1xf32>) -> tensor<2x1x1xf32>
  %mm = linalg.generic {indexing_maps = [affine_map<(b, m, n, k) -> (b, m, k)>, affine_map<(b, m, n, k) -> (n, k)>, affine_map<(b, m, n, k) -> (b, m, n)>],
                        iterator_types = ["parallel", "parallel", "parallel", "reduction"]}
      ins(%x, %w : tensor<2x1x3xf32>, tensor<1x3xf32>) outs(%acc : tensor<2x1x1xf32>) {
  ^bb0(%a: f32, %wv: f32, %o: f32):
    %p = arith.mulf %a, %wv : f32
    %s = arith.addf %o, %p : f32
    linalg.yield %s : f32
  } -> tensor<2x1x1xf32>
  %y = linalg.generic {indexing_maps = [affine_map<(b, m, n) -> (b, m, n)>, affine_map<(b, m, n) -> (n)>, affine_map<(b, m, n) -> (b, m, n)>],
                       iterator_types = ["parallel", "parallel", "parallel"]}
      ins(%mm, %b : tensor<2x1x1xf32>, tensor<1xf32>) outs(%e : tensor<2x1x1xf32>) {
  ^bb0(%v: f32, %bv: f32, %o: f32):
    %s = arith.addf %v, %bv : f32
    linalg.yield %s : f32
  } -> tensor<2x1x1xf32>
  return %y : tensor<2x1x1xf32>
}

// -----

// Positive: batch_matmul whose weight is a constant broadcast over the batch; binary
// (+-s) values per row -> int1 per channel (int1 is preferred: fewer bits).
// CHECK: format = "int1/channel a=none"
// CHECK: func.func @batch_broadcast
// CHECK-NOT: linalg.batch_matmul
// CHECK: call @lowbit_qlinear_0
// CHECK: dense<{{\[\[}}1, -1], [-1, 1], [1, 1]]> : tensor<3x2xi8>
func.func @batch_broadcast(%x: tensor<2x5x2xf32>) -> tensor<2x5x3xf32> {
  %w = arith.constant dense<[[0.5, -0.5, 2.0], [-0.5, 0.5, 2.0]]> : tensor<2x3xf32>
  %zero = arith.constant 0.0 : f32
  %eb = tensor.empty() : tensor<2x2x3xf32>
  %wb = linalg.broadcast ins(%w : tensor<2x3xf32>) outs(%eb : tensor<2x2x3xf32>) dimensions = [0]
  %e = tensor.empty() : tensor<2x5x3xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%e : tensor<2x5x3xf32>) -> tensor<2x5x3xf32>
  %y = linalg.batch_matmul ins(%x, %wb : tensor<2x5x2xf32>, tensor<2x2x3xf32>) outs(%acc : tensor<2x5x3xf32>) -> tensor<2x5x3xf32>
  return %y : tensor<2x5x3xf32>
}

// -----

// Groups: K = 17, per-group scales of 8 (last group of 1) -> recognized only when the
// option allows group size 8 (default sizes are 256/128/64/32, all >= K or too coarse).
// CHECK: reason = "the weight is not exactly int1 or ternary or int2_sym or int2_asym values x scales
// CHECK: func.func @groups_k17
// CHECK: linalg.matmul
// OPT: format = "ternary/group8 a=none"
// OPT: func.func @groups_k17
// OPT: call @lowbit_qlinear_0
// OPT: scales"} dense<{{\[\[}}1.000000e+00, 2.000000e+00, 4.000000e+00]]>
func.func @groups_k17(%x: tensor<1x17xf32>) -> tensor<1x1xf32> {
  %w = arith.constant dense<[[1.0], [-1.0], [0.0], [1.0], [1.0], [1.0], [0.0], [1.0],
                             [2.0], [-2.0], [0.0], [2.0], [2.0], [2.0], [0.0], [-2.0], [4.0]]> : tensor<17x1xf32>
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<1x1xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%e : tensor<1x1xf32>) -> tensor<1x1xf32>
  %y = linalg.matmul ins(%x, %w : tensor<1x17xf32>, tensor<17x1xf32>) outs(%acc : tensor<1x1xf32>) -> tensor<1x1xf32>
  return %y : tensor<1x1xf32>
}

// -----

// Negative: 5 distinct values in a row fit no 2-bit format; with int4 enabled they do.
// CHECK: reason = "the weight is not exactly int1 or ternary or int2_sym or int2_asym values x scales
// CHECK-SAME: rows hold up to 5 distinct values; it fits int4_sym/channel, which the option 'formats' does not enable"
// CHECK-SAME: result = "not recognized"
// CHECK: func.func @five_values
// CHECK-NEXT: arith.constant dense
// CHECK: linalg.matmul
// OPT: format = "int4_sym/channel a=none"
func.func @five_values(%x: tensor<3x5xf32>) -> tensor<3x1xf32> {
  %w = arith.constant dense<[[-2.0], [-1.0], [0.0], [1.0], [2.0]]> : tensor<5x1xf32>
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<3x1xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%e : tensor<3x1xf32>) -> tensor<3x1xf32>
  %y = linalg.matmul ins(%x, %w : tensor<3x5xf32>, tensor<5x1xf32>) outs(%acc : tensor<3x1xf32>) -> tensor<3x1xf32>
  return %y : tensor<3x1xf32>
}

// -----

// Negative: non-constant weight, and an accumulator that does not start at zero.
// CHECK: reason = "the weight is not a foldable constant: depends on a block argument (not a constant)"
// CHECK-SAME: result = "not recognized"
// CHECK: reason = "the accumulator does not start at zero"
// CHECK: func.func @not_constant
// CHECK-NOT: call
// CHECK: linalg.matmul
// CHECK: linalg.matmul
func.func @not_constant(%x: tensor<2x4xf32>, %w: tensor<4x3xf32>) -> (tensor<2x3xf32>, tensor<2x3xf32>) {
  %zero = arith.constant 0.0 : f32
  %one = arith.constant 1.0 : f32
  %wc = arith.constant dense<1.0> : tensor<4x3xf32>
  %e = tensor.empty() : tensor<2x3xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%e : tensor<2x3xf32>) -> tensor<2x3xf32>
  %acc1 = linalg.fill ins(%one : f32) outs(%e : tensor<2x3xf32>) -> tensor<2x3xf32>
  %y = linalg.matmul ins(%x, %w : tensor<2x4xf32>, tensor<4x3xf32>) outs(%acc : tensor<2x3xf32>) -> tensor<2x3xf32>
  %y1 = linalg.matmul ins(%x, %wc : tensor<2x4xf32>, tensor<4x3xf32>) outs(%acc1 : tensor<2x3xf32>) -> tensor<2x3xf32>
  return %y, %y1 : tensor<2x3xf32>, tensor<2x3xf32>
}

// -----

// Negative (malformed dequantization): codes offset by 1.5 give values {-1.5,-0.5,0.5,1.5},
// which no 2-bit format with integer zero points represents; the subgraph is left in place.
// As int4 it is exact: {-3,-1,1,3} x 0.5.
// CHECK: origin = "dequant-subgraph"
// CHECK-SAME: reason = "the weight is not exactly
// CHECK-SAME: it fits int4_sym/channel
// CHECK: func.func @half_offset
// CHECK: arith.shrui
// CHECK: linalg.generic
// OPT: format = "int4_sym/channel a=none"
// OPT: func.func @half_offset
// OPT-NOT: arith.shrui
// OPT: call @lowbit_qlinear_0
// OPT: dense<{{\[\[}}-3, -1, 1, 3]]> : tensor<1x4xi8>
#unpack = affine_map<(n, k) -> (n, k floordiv 4)>
#id2 = affine_map<(n, k) -> (n, k)>
func.func @half_offset(%x: tensor<1x4xf32>) -> tensor<1x1xf32> {
  %packed = arith.constant dense<[[-28]]> : tensor<1x1xi8>
  %c3 = arith.constant 3 : i8
  %c4 = arith.constant 4 : index
  %c2 = arith.constant 2 : index
  %half = arith.constant 1.5 : f32
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<1x4xf32>
  %w = linalg.generic {indexing_maps = [#unpack, #id2], iterator_types = ["parallel", "parallel"]}
      ins(%packed : tensor<1x1xi8>) outs(%e : tensor<1x4xf32>) {
  ^bb0(%byte: i8, %out: f32):
    %k = linalg.index 1 : index
    %pos = arith.remui %k, %c4 : index
    %sh = arith.muli %pos, %c2 : index
    %sh8 = arith.index_cast %sh : index to i8
    %v = arith.shrui %byte, %sh8 : i8
    %code = arith.andi %v, %c3 : i8
    %f = arith.uitofp %code : i8 to f32
    %q = arith.subf %f, %half : f32
    linalg.yield %q : f32
  } -> tensor<1x4xf32>
  %ey = tensor.empty() : tensor<1x1xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%ey : tensor<1x1xf32>) -> tensor<1x1xf32>
  %y = linalg.generic {indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>, affine_map<(m, n, k) -> (m, n)>],
                       iterator_types = ["parallel", "parallel", "reduction"]}
      ins(%x, %w : tensor<1x4xf32>, tensor<1x4xf32>) outs(%acc : tensor<1x1xf32>) {
  ^bb0(%a: f32, %b: f32, %o: f32):
    %p = arith.mulf %a, %b : f32
    %s = arith.addf %o, %p : f32
    linalg.yield %s : f32
  } -> tensor<1x1xf32>
  return %y : tensor<1x1xf32>
}
