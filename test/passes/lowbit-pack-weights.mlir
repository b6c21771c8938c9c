// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-pack-weights)' | filecheck %s

// RUN: not lowbit-opt %S/lowbit-tile-qlinear.mlir --split-input-file --pass-pipeline='builtin.module(lowbit-pack-weights)' 2>&1 | filecheck %s --check-prefix=UNTILED

// UNTILED: run lowbit-tile-qlinear before lowbit-pack-weights

// A 4x8 ternary layer in one K-block of 8: 64-row n-block = 128 bytes of codes +
// 64 fp32 scales (0.165519208 = 0x3E297DDE, little endian DE7D293E) + 64 int32 offsets.
// CHECK: func.func private @lowbit_qlinear_0
// CHECK-SAME: lowbit.packed = {bias = "lowbit_qlinear_0_bias", bytes = 384 : i64, kblock = 8 : i64, kblock_bytes = 384 : i64, nblock_bytes = 384 : i64, num_kblocks = 1 : i64, symbol = "lowbit_qlinear_0_packed"}
// CHECK: memref.global "private" constant @lowbit_qlinear_0_packed : memref<384xi8> = dense<"0x{{[0-9A-F]*}}DE7D293EDE7D293E{{[0-9A-F]*}}"> {alignment = 64 : i64}
// CHECK: memref.global "private" constant @lowbit_qlinear_0_bias : memref<4xf32> = dense<[-0.229166105, -0.162752241, -0.247006699, -0.331124306]>
#map = affine_map<(d0, d1, d2) -> (d0, d2)>
#map1 = affine_map<(d0, d1, d2) -> (d1, d2)>
#map2 = affine_map<(d0, d1, d2) -> (d0, d1)>
#map3 = affine_map<(d0, d1) -> (d0, d1)>
#map4 = affine_map<(d0, d1) -> (d1)>
module {
  func.func @forward(%arg0: tensor<2x8xf32>) -> tensor<2x4xf32> {
    %0 = call @lowbit_qlinear_0(%arg0) {no_inline} : (tensor<2x8xf32>) -> tensor<2x4xf32>
    return %0 : tensor<2x4xf32>
  }
  func.func private @lowbit_qlinear_0(%arg0: tensor<2x8xf32>) -> tensor<2x4xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 8 : i64, origin = "lowbit.linear", out_features = 4 : i64, weight_format = "ternary"}, lowbit.weights = {bias = dense<[-0.229166105, -0.162752241, -0.247006699, -0.331124306]> : tensor<4xf32>, codes = dense<[[0, 1, -1, -1, -1, 1, 0, 1], [0, 1, -1, 0, -1, -1, -1, 0], [1, 1, -1, -1, 1, 1, 0, 1], [0, 0, 1, -1, -1, -1, -1, 1]]> : tensor<4x8xi8>, scales = dense<0.165519208> : tensor<1x1xf32>}, lowbit.tiles = {kblock = 8 : i64, m_tile = 2 : i64, n_tile = 64 : i64, threads = 2 : i64}, no_inline} {
    %cst = arith.constant 0.165519208 : f32
    %cst_0 = arith.constant {lowbit.role = "codes"} dense<[[0, 1, -1, -1, -1, 1, 0, 1], [0, 1, -1, 0, -1, -1, -1, 0], [1, 1, -1, -1, 1, 1, 0, 1], [0, 0, 1, -1, -1, -1, -1, 1]]> : tensor<4x8xi8>
    %cst_1 = arith.constant {lowbit.role = "bias"} dense<[-0.229166105, -0.162752241, -0.247006699, -0.331124306]> : tensor<4xf32>
    %cst_2 = arith.constant 0.000000e+00 : f32
    %0 = tensor.empty() : tensor<2x4xf32>
    %1 = linalg.fill ins(%cst_2 : f32) outs(%0 : tensor<2x4xf32>) -> tensor<2x4xf32>
    %2 = linalg.generic {indexing_maps = [#map, #map1, #map2], iterator_types = ["parallel", "parallel", "reduction"]} ins(%arg0, %cst_0 : tensor<2x8xf32>, tensor<4x8xi8>) outs(%1 : tensor<2x4xf32>) {
    ^bb0(%in: f32, %in_3: i8, %out: f32):
      %4 = arith.sitofp %in_3 : i8 to f32
      %5 = arith.mulf %4, %cst : f32
      %6 = arith.mulf %in, %5 : f32
      %7 = arith.addf %out, %6 : f32
      linalg.yield %7 : f32
    } -> tensor<2x4xf32>
    %3 = linalg.generic {indexing_maps = [#map3, #map4, #map3], iterator_types = ["parallel", "parallel"]} ins(%2, %cst_1 : tensor<2x4xf32>, tensor<4xf32>) outs(%0 : tensor<2x4xf32>) {
    ^bb0(%in: f32, %in_3: f32, %out: f32):
      %4 = arith.addf %in, %in_3 : f32
      linalg.yield %4 : f32
    } -> tensor<2x4xf32>
    return %3 : tensor<2x4xf32>
  }
}
