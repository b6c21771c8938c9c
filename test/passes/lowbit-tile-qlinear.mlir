// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-tile-qlinear{target=l1=32K,l2=1M,l3=32M,cores=2})' | filecheck %s
// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-tile-qlinear{target=l1=32K,l2=1M,l3=32M,cores=2 n-tile=128 m-tile=8})' | filecheck %s --check-prefix=OVERRIDE
// RUN: not lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-tile-qlinear{n-tile=100})' 2>&1 | filecheck %s --check-prefix=BAD

// BAD: n-tile must be a multiple of 64, got 100

// GEMV (M = 1), per-channel ternary 4096x4096: one K-block of all of K; 64 n-blocks over
// 2 threads x 4 tasks give 8 blocks (512 rows) per task.
// CHECK-LABEL: func.func private @lowbit_qlinear_0
// CHECK-SAME: lowbit.tiles = {kblock = 4096 : i64, m_tile = 1 : i64, n_tile = 512 : i64, threads = 2 : i64}
// OVERRIDE-LABEL: func.func private @lowbit_qlinear_0
// OVERRIDE-SAME: lowbit.tiles = {kblock = 4096 : i64, m_tile = 8 : i64, n_tile = 128 : i64, threads = 2 : i64}
func.func private @lowbit_qlinear_0(%x: tensor<1x4096xf32>) -> tensor<1x4096xf32> attributes {lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "channel", group_size = 0 : i64, in_features = 4096 : i64, origin = "test", out_features = 4096 : i64, weight_format = "ternary"}} {
  %e = tensor.empty() : tensor<1x4096xf32>
  return %e : tensor<1x4096xf32>
}

// -----

// Prefill (M = 128) with int8 activations: the activation panel 128 x 4096 B fits half
// of L2, so all rows go to one kernel call.
// CHECK-LABEL: func.func private @lowbit_qlinear_0
// CHECK-SAME: lowbit.tiles = {kblock = 4096 : i64, m_tile = 128 : i64, n_tile = 512 : i64, threads = 2 : i64}
func.func private @lowbit_qlinear_0(%x: tensor<128x4096xf32>) -> tensor<128x4096xf32> attributes {lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "channel", group_size = 0 : i64, in_features = 4096 : i64, origin = "test", out_features = 4096 : i64, weight_format = "ternary"}} {
  %e = tensor.empty() : tensor<128x4096xf32>
  return %e : tensor<128x4096xf32>
}

// -----

// fp32 activations are 4 bytes: 32 rows per call; per-group scales force kblock = group.
// CHECK-LABEL: func.func private @lowbit_qlinear_0
// CHECK-SAME: lowbit.tiles = {kblock = 128 : i64, m_tile = 32 : i64, n_tile = 64 : i64, threads = 2 : i64}
func.func private @lowbit_qlinear_0(%x: tensor<128x4096xf32>) -> tensor<128x100xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "group", group_size = 128 : i64, in_features = 4096 : i64, origin = "test", out_features = 100 : i64, weight_format = "int2_asym"}} {
  %e = tensor.empty() : tensor<128x100xf32>
  return %e : tensor<128x100xf32>
}

// -----

// Edge shape: K = 20 for 1-bit weights rounds the single K-block up to the granule of 8.
// CHECK-LABEL: func.func private @lowbit_qlinear_0
// CHECK-SAME: lowbit.tiles = {kblock = 24 : i64, m_tile = 3 : i64, n_tile = 64 : i64, threads = 2 : i64}
func.func private @lowbit_qlinear_0(%x: tensor<3x20xf32>) -> tensor<3x5xf32> attributes {lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "channel", group_size = 0 : i64, in_features = 20 : i64, origin = "test", out_features = 5 : i64, weight_format = "int1"}} {
  %e = tensor.empty() : tensor<3x5xf32>
  return %e : tensor<3x5xf32>
}

// -----

// Negative: functions without lowbit.qlinear are not touched.
// CHECK-LABEL: func.func private @plain
// CHECK-NOT: lowbit.tiles
func.func private @plain(%x: tensor<1x8xf32>) -> tensor<1x8xf32> {
  return %x : tensor<1x8xf32>
}
