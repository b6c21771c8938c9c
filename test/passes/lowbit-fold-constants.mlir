// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-fold-constants)' | filecheck %s

// Two-bit codes packed 4 per byte along K, lowest bits first, unpacked with shifts
// computed from linalg.index, offset by 2, scaled per row, transposed for the matmul.
// Row 0: byte 0xE4 -> codes 0 1 2 3; row 1: byte 0x4F -> codes 3 3 0 1.
// CHECK: module attributes {lowbit.report = [{kind = "fold"
// CHECK-SAME: result = "folded", shape = "4x2"
// CHECK: func.func @packed_2bit
// CHECK: %[[W:.+]] = arith.constant {lowbit.folded} dense<{{\[\[}}-1.000000e+00, 2.500000e-01], [-5.000000e-01, 2.500000e-01], [0.000000e+00, -5.000000e-01], [5.000000e-01, -2.500000e-01]]> : tensor<4x2xf32>
// CHECK-NOT: arith.shrui
// CHECK-NOT: linalg.transpose
// CHECK: linalg.matmul ins(%arg0, %[[W]] :
#unpack_in = affine_map<(n, k) -> (n, k floordiv 4)>
#id = affine_map<(n, k) -> (n, k)>
#row = affine_map<(n, k) -> (n)>
func.func @packed_2bit(%x: tensor<1x4xf32>) -> tensor<1x2xf32> {
  %packed = arith.constant dense<[[-28], [79]]> : tensor<2x1xi8>
  %scale = arith.constant dense<[0.5, 0.25]> : tensor<2xf32>
  %c2_i8 = arith.constant 2 : i8
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

// Codes split in two nibbles and re-joined with tensor.concat + collapse_shape (the
// shape torch-mlir gives `torch.stack([p >> 4, p & 15], -1).reshape(n, -1)`).
// CHECK: func.func @nibbles_concat
// CHECK: arith.constant {lowbit.folded} dense<{{\[\[}}1.000000e+00, 1.500000e+01], [1.400000e+01, 0.000000e+00], [-1.600000e+01, 3.000000e+00]]> : tensor<3x2xf32>
// CHECK-NOT: tensor.concat
#id3 = affine_map<(a, b, c) -> (a, b, c)>
func.func @nibbles_concat(%x: tensor<1x3xf32>) -> tensor<1x2xf32> {
  // Bytes 0x1F -> nibbles (1, 15) and 0xE0 -> (14, 0), high nibble first.
  %packed = arith.constant dense<[[[31]], [[-32]]]> : tensor<2x1x1xi8>
  %c4 = arith.constant 4 : i8
  %c15 = arith.constant 15 : i8
  %c16 = arith.constant 16.0 : f32
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<2x1x1xi8>
  %hi = linalg.generic {indexing_maps = [#id3, #id3], iterator_types = ["parallel", "parallel", "parallel"]}
      ins(%packed : tensor<2x1x1xi8>) outs(%e : tensor<2x1x1xi8>) {
  ^bb0(%in: i8, %out: i8):
    %v = arith.shrui %in, %c4 : i8
    %m = arith.andi %v, %c15 : i8
    linalg.yield %m : i8
  } -> tensor<2x1x1xi8>
  %lo = linalg.generic {indexing_maps = [#id3, #id3], iterator_types = ["parallel", "parallel", "parallel"]}
      ins(%packed : tensor<2x1x1xi8>) outs(%e : tensor<2x1x1xi8>) {
  ^bb0(%in: i8, %out: i8):
    %m = arith.andi %in, %c15 : i8
    linalg.yield %m : i8
  } -> tensor<2x1x1xi8>
  %cat = tensor.concat dim(2) %hi, %lo : (tensor<2x1x1xi8>, tensor<2x1x1xi8>) -> tensor<2x1x2xi8>
  %flat = tensor.collapse_shape %cat [[0, 1], [2]] : tensor<2x1x2xi8> into tensor<2x2xi8>
  %ef = tensor.empty() : tensor<2x2xf32>
  %f = linalg.generic {indexing_maps = [affine_map<(a, b) -> (a, b)>, affine_map<(a, b) -> (a, b)>], iterator_types = ["parallel", "parallel"]}
      ins(%flat : tensor<2x2xi8>) outs(%ef : tensor<2x2xf32>) {
  ^bb0(%in: i8, %out: f32):
    %u = arith.uitofp %in : i8 to f32
    linalg.yield %u : f32
  } -> tensor<2x2xf32>
  // Rows of the weight are the 2 unpacked rows plus one row of (-16, 3) built by padding.
  %p = tensor.pad %f low[0, 0] high[1, 0] {
  ^bb0(%i: index, %j: index):
    tensor.yield %zero : f32
  } : tensor<2x2xf32> to tensor<3x2xf32>
  %row = arith.constant dense<[[-16.0, 3.0]]> : tensor<1x2xf32>
  %w = tensor.insert_slice %row into %p[2, 0] [1, 2] [1, 1] : tensor<1x2xf32> into tensor<3x2xf32>
  %ey = tensor.empty() : tensor<1x2xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%ey : tensor<1x2xf32>) -> tensor<1x2xf32>
  %y = linalg.matmul ins(%x, %w : tensor<1x3xf32>, tensor<3x2xf32>) outs(%acc : tensor<1x2xf32>) -> tensor<1x2xf32>
  return %y : tensor<1x2xf32>
}

// -----

// Negative: the weight is a function argument, nothing to fold, no report entry.
// CHECK: module {
// CHECK-NEXT: func.func @not_constant
// CHECK-NOT: lowbit.folded
// CHECK: linalg.matmul ins(%arg0, %arg1
func.func @not_constant(%x: tensor<2x4xf32>, %w: tensor<4x3xf32>) -> tensor<2x3xf32> {
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<2x3xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%e : tensor<2x3xf32>) -> tensor<2x3xf32>
  %y = linalg.matmul ins(%x, %w : tensor<2x4xf32>, tensor<4x3xf32>) outs(%acc : tensor<2x3xf32>) -> tensor<2x3xf32>
  return %y : tensor<2x3xf32>
}

// -----

// Negative: a transcendental op (not bit-reproducible in numpy) and a poison shift are
// not folded; the graph is unchanged and the report names the op.
// CHECK: lowbit.report
// CHECK-SAME: reason = "math.exp: operation is not supported by the interpreter"
// CHECK-SAME: reason = "arith.shrui: shift amount >= bit width 8 (poison)"
// CHECK: func.func @unsupported
// CHECK-NOT: lowbit.folded
// CHECK: math.exp
// CHECK: arith.shrui
#id2 = affine_map<(a, b) -> (a, b)>
func.func @unsupported(%x: tensor<1x2xf32>) -> (tensor<1x2xf32>, tensor<1x2xf32>) {
  %c = arith.constant dense<[[1.0, 2.0], [3.0, 4.0]]> : tensor<2x2xf32>
  %ci = arith.constant dense<[[1, 2], [3, 4]]> : tensor<2x2xi8>
  %c8 = arith.constant 8 : i8
  %zero = arith.constant 0.0 : f32
  %e = tensor.empty() : tensor<2x2xf32>
  %w = linalg.generic {indexing_maps = [#id2, #id2], iterator_types = ["parallel", "parallel"]}
      ins(%c : tensor<2x2xf32>) outs(%e : tensor<2x2xf32>) {
  ^bb0(%in: f32, %out: f32):
    %v = math.exp %in : f32
    linalg.yield %v : f32
  } -> tensor<2x2xf32>
  %w2 = linalg.generic {indexing_maps = [#id2, #id2], iterator_types = ["parallel", "parallel"]}
      ins(%ci : tensor<2x2xi8>) outs(%e : tensor<2x2xf32>) {
  ^bb0(%in: i8, %out: f32):
    %v = arith.shrui %in, %c8 : i8
    %f = arith.sitofp %v : i8 to f32
    linalg.yield %f : f32
  } -> tensor<2x2xf32>
  %ey = tensor.empty() : tensor<1x2xf32>
  %acc = linalg.fill ins(%zero : f32) outs(%ey : tensor<1x2xf32>) -> tensor<1x2xf32>
  %y = linalg.matmul ins(%x, %w : tensor<1x2xf32>, tensor<2x2xf32>) outs(%acc : tensor<1x2xf32>) -> tensor<1x2xf32>
  %y2 = linalg.matmul ins(%x, %w2 : tensor<1x2xf32>, tensor<2x2xf32>) outs(%acc : tensor<1x2xf32>) -> tensor<1x2xf32>
  return %y, %y2 : tensor<1x2xf32>, tensor<1x2xf32>
}
