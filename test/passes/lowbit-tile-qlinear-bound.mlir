// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-tile-qlinear{target=l1=32K,l2=1M,l3=32M,cores=2})' | filecheck %s
// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-tile-qlinear{target=l1=32K,l2=1M,l3=32M,cores=2 kblock=128 m-tile=8})' | filecheck %s --check-prefix=OVERRIDE

// lowbit-tile-qlinear on *bound* qlinear functions (lowbit.bound: the weight was packed at
// bind time with a kblock the tiles must keep). Inputs as lowbit-convert-linear-op makes
// them from torch.lowbit.packed_linear (03-lowbit.mlir of LOWBIT_DUMP_IR runs).

// Dynamic M, int8 activations: tiles as if M were unbounded (m_tile = half of L2 / K bytes =
// 8192 rows), kblock the bound one (64 = K here), two 64-row n-tiles for N = 128.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<?x64xf32>
// CHECK-SAME: lowbit.bound = {bias = 1 : i64, bytes = 3072 : i64, kblock = 64 : i64
// CHECK-SAME: lowbit.tiles = {kblock = 64 : i64, m_tile = 8192 : i64, n_tile = 64 : i64, threads = 2 : i64}
// OVERRIDE-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<?x64xf32>
// OVERRIDE-SAME: lowbit.tiles = {kblock = 64 : i64, m_tile = 8 : i64, n_tile = 64 : i64, threads = 2 : i64}

func.func private @lowbit_qlinear_0(%arg0: tensor<?x64xf32>, %arg1: tensor<3072xi8>, %arg2: tensor<128xf32>, %out: tensor<?x128xf32>) -> tensor<?x128xf32> attributes {lowbit.bound = {bias = 1 : i64, bytes = 3072 : i64, kblock = 64 : i64, kblock_bytes = 1536 : i64, nblock_bytes = 1536 : i64, num_kblocks = 1 : i64}, lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 64 : i64, origin = "bound", out_features = 128 : i64, weight_format = "ternary"}, no_inline} {
  %cst = arith.constant 0x7FC00000 : f32
  %0 = linalg.fill ins(%cst : f32) outs(%out : tensor<?x128xf32>) -> tensor<?x128xf32>
  return %0 : tensor<?x128xf32>
}

// -----

// The weight was packed with kblock 256 (two K-blocks of K = 512); the automatic choice
// would be one 512-wide block. The bound kblock is kept (the packed bytes depend on it),
// also over an explicit kblock option.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<?x512xf32>
// CHECK-SAME: lowbit.tiles = {kblock = 256 : i64, m_tile = 1024 : i64, n_tile = 64 : i64, threads = 2 : i64}
// OVERRIDE-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<?x512xf32>
// OVERRIDE-SAME: lowbit.tiles = {kblock = 256 : i64, m_tile = 8 : i64, n_tile = 64 : i64, threads = 2 : i64}

func.func private @lowbit_qlinear_0(%arg0: tensor<?x512xf32>, %arg1: tensor<9216xi8>, %out: tensor<?x64xf32>) -> tensor<?x64xf32> attributes {lowbit.bound = {bias = 0 : i64, bytes = 9216 : i64, kblock = 256 : i64, kblock_bytes = 4608 : i64, nblock_bytes = 9216 : i64, num_kblocks = 2 : i64}, lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 512 : i64, origin = "bound", out_features = 64 : i64, weight_format = "ternary"}, no_inline} {
  %cst = arith.constant 0x7FC00000 : f32
  %0 = linalg.fill ins(%cst : f32) outs(%out : tensor<?x64xf32>) -> tensor<?x64xf32>
  return %0 : tensor<?x64xf32>
}

// -----

// Static M = 3: m_tile is M.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<3x64xf32>
// CHECK-SAME: lowbit.tiles = {kblock = 64 : i64, m_tile = 3 : i64, n_tile = 64 : i64, threads = 2 : i64}
// OVERRIDE-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<3x64xf32>
// OVERRIDE-SAME: lowbit.tiles = {kblock = 64 : i64, m_tile = 8 : i64

func.func private @lowbit_qlinear_0(%arg0: tensor<3x64xf32>, %arg1: tensor<3072xi8>, %out: tensor<3x128xf32>) -> tensor<3x128xf32> attributes {lowbit.bound = {bias = 0 : i64, bytes = 3072 : i64, kblock = 64 : i64, kblock_bytes = 1536 : i64, nblock_bytes = 1536 : i64, num_kblocks = 1 : i64}, lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 64 : i64, origin = "bound", out_features = 128 : i64, weight_format = "ternary"}, no_inline} {
  %cst = arith.constant 0x7FC00000 : f32
  %0 = linalg.fill ins(%cst : f32) outs(%out : tensor<3x128xf32>) -> tensor<3x128xf32>
  return %0 : tensor<3x128xf32>
}

// -----

// bf16 weight-only, dynamic M, K = 30 packed with kblock 32: 2-byte activations, m_tile =
// 512K / (32 * 2).
// CHECK-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<?x30xbf16>
// CHECK-SAME: lowbit.tiles = {kblock = 32 : i64, m_tile = 8192 : i64, n_tile = 64 : i64, threads = 2 : i64}
// OVERRIDE-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<?x30xbf16>
// OVERRIDE-SAME: lowbit.tiles = {kblock = 32 : i64, m_tile = 8 : i64

func.func private @lowbit_qlinear_0(%arg0: tensor<?x30xbf16>, %arg1: tensor<1024xi8>, %arg2: tensor<64xf32>, %out: tensor<?x64xbf16>) -> tensor<?x64xbf16> attributes {lowbit.bound = {bias = 1 : i64, bytes = 1024 : i64, kblock = 32 : i64, kblock_bytes = 1024 : i64, nblock_bytes = 1024 : i64, num_kblocks = 1 : i64}, lowbit.qlinear = {act_format = "none", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 30 : i64, origin = "bound", out_features = 64 : i64, weight_format = "ternary"}, no_inline} {
  %cst = arith.constant 0x7FC0 : bf16
  %0 = linalg.fill ins(%cst : bf16) outs(%out : tensor<?x64xbf16>) -> tensor<?x64xbf16>
  return %0 : tensor<?x64xbf16>
}

// -----

// N = 2048 (32 kernel blocks, 2 threads x 4 tasks): 4 blocks per n-tile; dynamic M with K = 256.
// CHECK-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<?x256xf32>
// CHECK-SAME: lowbit.tiles = {kblock = 256 : i64, m_tile = 2048 : i64, n_tile = 256 : i64, threads = 2 : i64}
// OVERRIDE-LABEL: func.func private @lowbit_qlinear_0(%{{.+}}: tensor<?x256xf32>
// OVERRIDE-SAME: lowbit.tiles = {kblock = 256 : i64, m_tile = 8 : i64, n_tile = 256 : i64

func.func private @lowbit_qlinear_0(%arg0: tensor<?x256xf32>, %arg1: tensor<147456xi8>, %out: tensor<?x2048xf32>) -> tensor<?x2048xf32> attributes {lowbit.bound = {bias = 0 : i64, bytes = 147456 : i64, kblock = 256 : i64, kblock_bytes = 4608 : i64, nblock_bytes = 4608 : i64, num_kblocks = 1 : i64}, lowbit.qlinear = {act_format = "int8", act_group_size = 0 : i64, granularity = "tensor", group_size = 0 : i64, in_features = 256 : i64, origin = "bound", out_features = 2048 : i64, weight_format = "ternary"}, no_inline} {
  %cst = arith.constant 0x7FC00000 : f32
  %0 = linalg.fill ins(%cst : f32) outs(%out : tensor<?x2048xf32>) -> tensor<?x2048xf32>
  return %0 : tensor<?x2048xf32>
}
