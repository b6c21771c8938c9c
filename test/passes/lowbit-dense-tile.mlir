// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-dense-tile{threads=2 min-task-flops=0}, canonicalize)' | filecheck %s
// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-dense-tile{tile-m=1 tile-n=32 threads=1}, canonicalize)' | filecheck %s --check-prefix=OPT
// RUN: not lowbit-opt %s --pass-pipeline='builtin.module(lowbit-dense-tile{tile-m=-1})' 2>&1 | filecheck %s --check-prefix=BADOPT

// BADOPT: options must be non-negative

// A Linear weight (torch-mlir: linalg.transpose of a constant [N, K]) is packed at compile
// time into [N/32, K, 32] panels: row k of panel 0 holds W[0..31, k], so the first packed
// row is W's first column (0, 2, 4, ...) and the second its second column (1, 3, 5, ...).
// CHECK-LABEL: func.func @linear_f32
// CHECK-SAME: (%[[X:.+]]: tensor<4x2xf32>)
// CHECK-DAG: %[[P:.+]] = arith.constant dense<{{\[\[\[}}0.000000e+00, 2.000000e+00, 4.000000e+00, {{.*}}6.200000e+01], [1.000000e+00, 3.000000e+00, {{.*}}6.300000e+01]]]> : tensor<1x2x32xf32>
// The zero-filled init is not read: the fill is dropped and the tile overwrites C (beta 0).
// CHECK-DAG: %[[E:.+]] = tensor.empty() : tensor<4x32xf32>
// CHECK-DAG: %[[EMPTY:.+]] = tensor.expand_shape %[[E]] {{\[\[}}0], [1, 2]] output_shape [4, 1, 32]
// CHECK-NOT: linalg.fill
// CHECK-NOT: linalg.transpose
// CHECK: %[[R:.+]] = scf.forall (%[[I:.+]]) in (4) shared_outs(%[[OUT:.+]] = %[[EMPTY]]) -> (tensor<4x1x32xf32>)
// CHECK-DAG: %[[A:.+]] = tensor.extract_slice %[[X]][%[[I]], 0] [1, 2] [1, 1]
// CHECK-DAG: %[[C:.+]] = tensor.extract_slice %[[OUT]][%[[I]], 0, 0] [1, 1, 32] [1, 1, 1]
// CHECK: linalg.contract {{.*}}{lowbit.brgemm = "packed", lowbit.brgemm_beta0, lowbit.brgemm_tile = array<i64: 1, 32>} ins(%[[A]], %[[P]] : tensor<1x2xf32>, tensor<1x2x32xf32>) outs(%[[C]] : tensor<1x1x32xf32>)
// CHECK: tensor.collapse_shape %[[R]] {{\[\[}}0], [1, 2]] : tensor<4x1x32xf32> into tensor<4x32xf32>
// OPT-LABEL: func.func @linear_f32
// OPT: scf.forall ({{.+}}) in (4)
// OPT: lowbit.brgemm_tile = array<i64: 1, 32>
func.func @linear_f32(%x: tensor<4x2xf32>) -> tensor<4x32xf32> {
  %w = arith.constant dense<[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0], [10.0, 11.0], [12.0, 13.0], [14.0, 15.0], [16.0, 17.0], [18.0, 19.0], [20.0, 21.0], [22.0, 23.0], [24.0, 25.0], [26.0, 27.0], [28.0, 29.0], [30.0, 31.0], [32.0, 33.0], [34.0, 35.0], [36.0, 37.0], [38.0, 39.0], [40.0, 41.0], [42.0, 43.0], [44.0, 45.0], [46.0, 47.0], [48.0, 49.0], [50.0, 51.0], [52.0, 53.0], [54.0, 55.0], [56.0, 57.0], [58.0, 59.0], [60.0, 61.0], [62.0, 63.0]]> : tensor<32x2xf32>
  %e = tensor.empty() : tensor<2x32xf32>
  %wt = linalg.transpose ins(%w : tensor<32x2xf32>) outs(%e : tensor<2x32xf32>) permutation = [1, 0]
  %zero = arith.constant 0.0 : f32
  %o = tensor.empty() : tensor<4x32xf32>
  %c = linalg.fill ins(%zero : f32) outs(%o : tensor<4x32xf32>) -> tensor<4x32xf32>
  %r = linalg.matmul ins(%x, %wt : tensor<4x2xf32>, tensor<2x32xf32>) outs(%c : tensor<4x32xf32>) -> tensor<4x32xf32>
  return %r : tensor<4x32xf32>
}

// -----

// bf16: B is packed in VNNI pairs [N/32, K/2, 32, 2] and A is viewed as [M, K/2, 2].
// CHECK-LABEL: func.func @bf16_constant_b
// CHECK-SAME: (%[[X:.+]]: tensor<2x4xbf16>, %[[ACC:.+]]: tensor<2x32xf32>)
// CHECK-DAG: %[[P:.+]] = arith.constant dense<{{.+}}> : tensor<1x2x32x2xbf16>
// CHECK-DAG: %[[C3:.+]] = tensor.expand_shape %[[ACC]] {{\[\[}}0], [1, 2]] output_shape [2, 1, 32]
// CHECK-DAG: %[[A3:.+]] = tensor.expand_shape %[[X]] {{\[\[}}0], [1, 2]] output_shape [2, 2, 2]
// CHECK: scf.forall (%[[I:.+]]) in (2) shared_outs(%[[OUT:.+]] = %[[C3]])
// CHECK: %[[A:.+]] = tensor.extract_slice %[[A3]][%[[I]], 0, 0] [1, 2, 2] [1, 1, 1]
// CHECK: linalg.contract {{.*}}{lowbit.brgemm = "packed", {{.*}}} ins(%[[A]], %[[P]] : tensor<1x2x2xbf16>, tensor<1x2x32x2xbf16>) outs({{.+}} : tensor<1x1x32xf32>)
func.func @bf16_constant_b(%x: tensor<2x4xbf16>, %acc: tensor<2x32xf32>) -> tensor<2x32xf32> {
  %w = arith.constant dense<1.5> : tensor<4x32xbf16>
  %r = linalg.matmul ins(%x, %w : tensor<2x4xbf16>, tensor<4x32xbf16>) outs(%acc : tensor<2x32xf32>) -> tensor<2x32xf32>
  return %r : tensor<2x32xf32>
}

// -----

// bf16 Linear with a zero init whose f32 product is only rounded to bf16: the tile writes
// bf16 C directly (beta 0); neither the fill nor the rounding generic is left.
// CHECK-LABEL: func.func @bf16_rounded
// CHECK-NOT: linalg.fill
// CHECK: scf.forall {{.+}} -> (tensor<3x1x32xbf16>)
// CHECK: linalg.contract {{.*}}lowbit.brgemm_beta0{{.*}} outs({{.+}} : tensor<1x1x32xbf16>)
// CHECK-NOT: linalg.generic
// CHECK: return {{.+}} : tensor<3x32xbf16>
func.func @bf16_rounded(%x: tensor<3x4xbf16>) -> tensor<3x32xbf16> {
  %w = arith.constant dense<1.5> : tensor<4x32xbf16>
  %zero = arith.constant 0.0 : f32
  %o = tensor.empty() : tensor<3x32xf32>
  %c = linalg.fill ins(%zero : f32) outs(%o : tensor<3x32xf32>) -> tensor<3x32xf32>
  %r = linalg.matmul ins(%x, %w : tensor<3x4xbf16>, tensor<4x32xbf16>) outs(%c : tensor<3x32xf32>) -> tensor<3x32xf32>
  %e = tensor.empty() : tensor<3x32xbf16>
  %b = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]} ins(%r : tensor<3x32xf32>) outs(%e : tensor<3x32xbf16>) {
  ^bb0(%in: f32, %out: bf16):
    %t = arith.truncf %in : f32 to bf16
    linalg.yield %t : bf16
  } -> tensor<3x32xbf16>
  return %b : tensor<3x32xbf16>
}

// -----

// Negative for both folds: a non-zero init is read (beta 1), and a product that is also
// used in f32 keeps its f32 C and the separate rounding.
// CHECK-LABEL: func.func @bf16_not_folded
// CHECK: %[[ONE:.+]] = linalg.fill
// CHECK: linalg.contract
// CHECK-NOT: lowbit.brgemm_beta0
// CHECK-SAME: outs({{.+}} : tensor<1x1x32xf32>)
// CHECK: linalg.generic
// CHECK: arith.truncf
func.func @bf16_not_folded(%x: tensor<3x4xbf16>) -> (tensor<3x32xbf16>, tensor<3x32xf32>) {
  %w = arith.constant dense<1.5> : tensor<4x32xbf16>
  %one = arith.constant 1.0 : f32
  %o = tensor.empty() : tensor<3x32xf32>
  %c = linalg.fill ins(%one : f32) outs(%o : tensor<3x32xf32>) -> tensor<3x32xf32>
  %r = linalg.matmul ins(%x, %w : tensor<3x4xbf16>, tensor<4x32xbf16>) outs(%c : tensor<3x32xf32>) -> tensor<3x32xf32>
  %e = tensor.empty() : tensor<3x32xbf16>
  %b = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]} ins(%r : tensor<3x32xf32>) outs(%e : tensor<3x32xbf16>) {
  ^bb0(%in: f32, %out: bf16):
    %t = arith.truncf %in : f32 to bf16
    linalg.yield %t : bf16
  } -> tensor<3x32xbf16>
  return %b, %r : tensor<3x32xbf16>, tensor<3x32xf32>
}

// -----

// A matmul-like generic reading a constant B^T [N, K] is packed too (no transpose op).
// CHECK-LABEL: func.func @generic_b_transposed
// CHECK-NOT: linalg.generic
// CHECK: %[[P:.+]] = arith.constant dense<2.000000e+00> : tensor<1x3x32xf32>
// CHECK: linalg.contract {{.*}}{lowbit.brgemm = "packed", {{.*}}} ins(%{{.+}}, %[[P]] : tensor<1x3xf32>, tensor<1x3x32xf32>)
// CHECK-NOT: linalg.generic
func.func @generic_b_transposed(%x: tensor<1x3xf32>, %acc: tensor<1x32xf32>) -> tensor<1x32xf32> {
  %w = arith.constant dense<2.0> : tensor<32x3xf32>
  %r = linalg.generic {indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>, affine_map<(m, n, k) -> (m, n)>], iterator_types = ["parallel", "parallel", "reduction"]} ins(%x, %w : tensor<1x3xf32>, tensor<32x3xf32>) outs(%acc : tensor<1x32xf32>) {
  ^bb0(%a: f32, %b: f32, %c: f32):
    %p = arith.mulf %a, %b : f32
    %s = arith.addf %c, %p : f32
    linalg.yield %s : f32
  } -> tensor<1x32xf32>
  return %r : tensor<1x32xf32>
}

// -----

// Activations x activations (bmm): tiles of the named op over batch, M and N, B row-major.
// CHECK-LABEL: func.func @bmm_activations
// CHECK-SAME: (%[[X:.+]]: tensor<2x4x8xf32>, %[[Y:.+]]: tensor<2x8x16xf32>, %[[C:.+]]: tensor<2x4x16xf32>)
// CHECK: scf.forall (%[[B:.+]], %[[I:.+]]) in (2, 2) shared_outs(%[[OUT:.+]] = %[[C]])
// CHECK: tensor.extract_slice %[[Y]][%[[B]], 0, 0] [1, 8, 16] [1, 1, 1]
// CHECK: linalg.batch_matmul {lowbit.brgemm = "rowmajor", lowbit.brgemm_tile = array<i64: 2, 16>} ins({{.+}} : tensor<1x2x8xf32>, tensor<1x8x16xf32>) outs({{.+}} : tensor<1x2x16xf32>)
func.func @bmm_activations(%x: tensor<2x4x8xf32>, %y: tensor<2x8x16xf32>, %c: tensor<2x4x16xf32>) -> tensor<2x4x16xf32> {
  %r = linalg.batch_matmul ins(%x, %y : tensor<2x4x8xf32>, tensor<2x8x16xf32>) outs(%c : tensor<2x4x16xf32>) -> tensor<2x4x16xf32>
  return %r : tensor<2x4x16xf32>
}

// -----

// Edge: N = 17 is not a multiple of the panel width, so the constant is not packed and
// the matmul is tiled with B row-major; M = 1 (a GEMV) still becomes one BRGEMM tile.
// CHECK-LABEL: func.func @odd_n_gemv
// CHECK-NOT: tensor<1x3x32xf32>
// CHECK: linalg.matmul {lowbit.brgemm = "rowmajor", lowbit.brgemm_tile = array<i64: 1, 17>}
// CHECK-SAME: ins({{.+}} : tensor<1x3xf32>, tensor<3x17xf32>) outs({{.+}} : tensor<1x17xf32>)
func.func @odd_n_gemv(%x: tensor<1x3xf32>, %acc: tensor<1x17xf32>) -> tensor<1x17xf32> {
  %w = arith.constant dense<1.0> : tensor<3x17xf32>
  %r = linalg.matmul ins(%x, %w : tensor<1x3xf32>, tensor<3x17xf32>) outs(%acc : tensor<1x17xf32>) -> tensor<1x17xf32>
  return %r : tensor<1x17xf32>
}

// -----

// Negative: the pass must not fire on f16, integer matmuls, an f32 result of mixed
// inputs, or an empty product (K = 0: the result is the init; issue 13's zero-K bmm
// raised a division by zero in tile planning).
// CHECK-LABEL: func.func @not_matched
// CHECK-NOT: scf.forall
// CHECK-NOT: lowbit.brgemm
// CHECK: linalg.matmul ins({{.+}} : tensor<4x8xf16>, tensor<8x32xf16>)
// CHECK: linalg.matmul ins({{.+}} : tensor<4x8xi32>, tensor<8x32xi32>)
// CHECK: linalg.matmul ins({{.+}} : tensor<4x8xbf16>, tensor<8x32xf32>)
// CHECK: linalg.batch_matmul ins({{.+}} : tensor<2x3x0xf32>, tensor<2x0x5xf32>)
func.func @not_matched(%h: tensor<4x8xf16>, %hb: tensor<8x32xf16>,
                       %ch: tensor<4x32xf16>, %i: tensor<4x8xi32>, %ib: tensor<8x32xi32>, %ci: tensor<4x32xi32>,
                       %mx: tensor<4x8xbf16>, %mb: tensor<8x32xf32>, %c: tensor<4x32xf32>,
                       %za: tensor<2x3x0xf32>, %zb: tensor<2x0x5xf32>, %zc: tensor<2x3x5xf32>)
    -> (tensor<4x32xf16>, tensor<4x32xi32>, tensor<4x32xf32>, tensor<2x3x5xf32>) {
  %1 = linalg.matmul ins(%h, %hb : tensor<4x8xf16>, tensor<8x32xf16>) outs(%ch : tensor<4x32xf16>) -> tensor<4x32xf16>
  %2 = linalg.matmul ins(%i, %ib : tensor<4x8xi32>, tensor<8x32xi32>) outs(%ci : tensor<4x32xi32>) -> tensor<4x32xi32>
  %3 = linalg.matmul ins(%mx, %mb : tensor<4x8xbf16>, tensor<8x32xf32>) outs(%c : tensor<4x32xf32>) -> tensor<4x32xf32>
  %4 = linalg.batch_matmul ins(%za, %zb : tensor<2x3x0xf32>, tensor<2x0x5xf32>) outs(%zc : tensor<2x3x5xf32>) -> tensor<2x3x5xf32>
  return %1, %2, %3, %4 : tensor<4x32xf16>, tensor<4x32xi32>, tensor<4x32xf32>, tensor<2x3x5xf32>
}

// -----

// Dynamic M (a shape-generic token count) with a constant Linear weight: packed as for a
// static M; the M tile is planned at dynamic-extent (128) and kept as a fixed block, so
// the forall runs ceil(M / 128) x N/32 tiles, the last M tile bounded by affine.min.
// CHECK-LABEL: func.func @dynamic_m_constant_weight
// CHECK-SAME: (%[[X:.+]]: tensor<?x2xf32>)
// CHECK: tensor.dim %[[X]], %c0
// CHECK: tensor.expand_shape %{{.+}} {{\[\[}}0], [1, 2]] output_shape [%{{.+}}, 1, 32] : tensor<?x32xf32> into tensor<?x1x32xf32>
// CHECK: scf.forall (%[[I:.+]]) in (%{{.+}}) shared_outs
// CHECK:   %[[SZ:.+]] = affine.min #{{.+}}(%[[I]])[%{{.+}}]
// CHECK:   tensor.extract_slice %[[X]][%{{.+}}, 0] [%[[SZ]], 2] [1, 1]
// CHECK:   linalg.contract {{.*}}lowbit.brgemm = "packed"{{.*}} ins(%{{.+}}, %{{.+}} : tensor<?x2xf32>, tensor<1x2x32xf32>) outs(%{{.+}} : tensor<?x1x32xf32>)
// CHECK: tensor.collapse_shape {{.+}} : tensor<?x1x32xf32> into tensor<?x32xf32>
func.func @dynamic_m_constant_weight(%x: tensor<?x2xf32>) -> tensor<?x32xf32> {
  %w = arith.constant dense<1.0> : tensor<32x2xf32>
  %e = tensor.empty() : tensor<2x32xf32>
  %wt = linalg.transpose ins(%w : tensor<32x2xf32>) outs(%e : tensor<2x32xf32>) permutation = [1, 0]
  %c0 = arith.constant 0 : index
  %m = tensor.dim %x, %c0 : tensor<?x2xf32>
  %zero = arith.constant 0.0 : f32
  %o = tensor.empty(%m) : tensor<?x32xf32>
  %c = linalg.fill ins(%zero : f32) outs(%o : tensor<?x32xf32>) -> tensor<?x32xf32>
  %r = linalg.matmul ins(%x, %wt : tensor<?x2xf32>, tensor<2x32xf32>) outs(%c : tensor<?x32xf32>) -> tensor<?x32xf32>
  return %r : tensor<?x32xf32>
}

// -----

// A Linear weight that is a function argument (bound at run time) read through the
// transpose torch-mlir inserts, dynamic M: row-major BRGEMM tiles (128 / 4 tasks -> 32
// rows, planned at dynamic-extent for threads=2 x 2 tasks) on the transposed
// weight (the transpose is left to the codegen passes), not scalar loops.
// CHECK-LABEL: func.func @dynamic_m_weight_argument
// CHECK-SAME: (%[[X:.+]]: tensor<?x64xf32>, %[[W:.+]]: tensor<48x64xf32>)
// CHECK: %[[WT:.+]] = linalg.transpose ins(%[[W]] : tensor<48x64xf32>)
// CHECK: scf.forall
// CHECK:   affine.min
// CHECK:   linalg.matmul {lowbit.brgemm = "rowmajor", lowbit.brgemm_tile = array<i64: 32, 48>} ins(%{{.+}}, %[[WT]] : tensor<?x64xf32>, tensor<64x48xf32>) outs(%{{.+}} : tensor<?x48xf32>)
func.func @dynamic_m_weight_argument(%x: tensor<?x64xf32>, %w: tensor<48x64xf32>) -> tensor<?x48xf32> {
  %e = tensor.empty() : tensor<64x48xf32>
  %wt = linalg.transpose ins(%w : tensor<48x64xf32>) outs(%e : tensor<64x48xf32>) permutation = [1, 0]
  %c0 = arith.constant 0 : index
  %m = tensor.dim %x, %c0 : tensor<?x64xf32>
  %zero = arith.constant 0.0 : f32
  %o = tensor.empty(%m) : tensor<?x48xf32>
  %c = linalg.fill ins(%zero : f32) outs(%o : tensor<?x48xf32>) -> tensor<?x48xf32>
  %r = linalg.matmul ins(%x, %wt : tensor<?x64xf32>, tensor<64x48xf32>) outs(%c : tensor<?x48xf32>) -> tensor<?x48xf32>
  return %r : tensor<?x48xf32>
}

// -----

// A matmul-like generic reading a non-constant B^T [N, K] (N dynamic: B is an activation):
// B is transposed once into a row-major tensor and the named matmul is tiled.
// CHECK-LABEL: func.func @generic_b_transposed_argument
// CHECK-SAME: (%[[X:.+]]: tensor<4x8xf32>, %[[BT:.+]]: tensor<?x8xf32>, %{{.+}}: tensor<4x?xf32>)
// CHECK: %[[N:.+]] = tensor.dim %[[BT]], %c0
// CHECK: %[[E:.+]] = tensor.empty(%[[N]]) : tensor<8x?xf32>
// CHECK: %[[B:.+]] = linalg.transpose ins(%[[BT]] : tensor<?x8xf32>) outs(%[[E]] : tensor<8x?xf32>) permutation = [1, 0]
// CHECK: scf.forall
// CHECK:   linalg.matmul {lowbit.brgemm = "rowmajor", {{.+}}} ins(%{{.+}}, %{{.+}} : tensor<4x8xf32>, tensor<8x?xf32>)
// CHECK-NOT: linalg.generic
func.func @generic_b_transposed_argument(%x: tensor<4x8xf32>, %bt: tensor<?x8xf32>, %acc: tensor<4x?xf32>) -> tensor<4x?xf32> {
  %r = linalg.generic {indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>, affine_map<(m, n, k) -> (m, n)>], iterator_types = ["parallel", "parallel", "reduction"]} ins(%x, %bt : tensor<4x8xf32>, tensor<?x8xf32>) outs(%acc : tensor<4x?xf32>) {
  ^bb0(%a: f32, %b: f32, %o: f32):
    %p = arith.mulf %a, %b : f32
    %s = arith.addf %o, %p : f32
    linalg.yield %s : f32
  } -> tensor<4x?xf32>
  return %r : tensor<4x?xf32>
}

// -----

// Attention with dynamic T and KV length S: scores q @ k^T [4, T, 64] x [4, 64, S] and
// p @ v [4, T, S] x [4, S, 64] (dynamic K). Tiles over (head, T block, S block) with tails.
// CHECK-LABEL: func.func @attention_dynamic
// CHECK: scf.forall (%{{.+}}, %{{.+}}, %{{.+}}) in (4, %{{.+}}, %{{.+}})
// CHECK:   linalg.batch_matmul {lowbit.brgemm = "rowmajor", {{.+}}} ins(%{{.+}}, %{{.+}} : tensor<1x?x64xf32>, tensor<1x64x?xf32>) outs(%{{.+}} : tensor<1x?x?xf32>)
// CHECK: scf.forall (%{{.+}}, %{{.+}}) in (4, %{{.+}})
// CHECK:   linalg.batch_matmul {lowbit.brgemm = "rowmajor", {{.+}}} ins(%{{.+}}, %{{.+}} : tensor<1x?x?xf32>, tensor<1x?x64xf32>) outs(%{{.+}} : tensor<1x?x64xf32>)
func.func @attention_dynamic(%q: tensor<4x?x64xf32>, %kt: tensor<4x64x?xf32>, %v: tensor<4x?x64xf32>,
                             %s0: tensor<4x?x?xf32>, %o0: tensor<4x?x64xf32>) -> tensor<4x?x64xf32> {
  %s = linalg.batch_matmul ins(%q, %kt : tensor<4x?x64xf32>, tensor<4x64x?xf32>) outs(%s0 : tensor<4x?x?xf32>) -> tensor<4x?x?xf32>
  %o = linalg.batch_matmul ins(%s, %v : tensor<4x?x?xf32>, tensor<4x?x64xf32>) outs(%o0 : tensor<4x?x64xf32>) -> tensor<4x?x64xf32>
  return %o : tensor<4x?x64xf32>
}

// -----

// A weight packed at bind time arrives as a function argument, already in the blocked
// form this pass emits for a constant (lowbit.brgemm = "packed", no tile yet), M dynamic:
// it is tiled like the constant case (fixed 128-row blocks, 32-column panels).
// CHECK-LABEL: func.func @packed_argument_f32
// CHECK-SAME: (%[[X:.+]]: tensor<?x64xf32>, %[[P:.+]]: tensor<4x64x32xf32>, %[[C:.+]]: tensor<?x4x32xf32>)
// CHECK: scf.forall (%{{.+}}, %{{.+}}) in (%{{.+}}, {{[0-9]+}}) shared_outs(%{{.+}} = %[[C]])
// CHECK:   linalg.contract {{.*}}lowbit.brgemm = "packed"{{.*}} ins(%{{.+}}, %{{.+}} : tensor<?x64xf32>, tensor<{{[0-9]+}}x64x32xf32>) outs(%{{.+}} : tensor<?x{{[0-9]+}}x32xf32>)
func.func @packed_argument_f32(%x: tensor<?x64xf32>, %p: tensor<4x64x32xf32>, %c: tensor<?x4x32xf32>) -> tensor<?x4x32xf32> {
  %r = linalg.contract indexing_maps = [affine_map<(d0, d1, d2, d3) -> (d0, d3)>, affine_map<(d0, d1, d2, d3) -> (d1, d3, d2)>, affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>]
      {lowbit.brgemm = "packed", lowbit.brgemm_beta0}
      ins(%x, %p : tensor<?x64xf32>, tensor<4x64x32xf32>) outs(%c : tensor<?x4x32xf32>) -> tensor<?x4x32xf32>
  return %r : tensor<?x4x32xf32>
}

// -----

// bf16: VNNI pairs, A viewed as [M, K/2, 2]; bf16 C (the rounding folded in).
// CHECK-LABEL: func.func @packed_argument_bf16
// CHECK: scf.forall
// CHECK:   linalg.contract {{.*}}lowbit.brgemm = "packed"{{.*}} ins(%{{.+}}, %{{.+}} : tensor<?x32x2xbf16>, tensor<{{[0-9]+}}x32x32x2xbf16>) outs(%{{.+}} : tensor<?x{{[0-9]+}}x32xbf16>)
func.func @packed_argument_bf16(%x: tensor<?x32x2xbf16>, %p: tensor<2x32x32x2xbf16>, %c: tensor<?x2x32xbf16>) -> tensor<?x2x32xbf16> {
  %r = linalg.contract indexing_maps = [affine_map<(d0, d1, d2, d3, d4) -> (d0, d3, d4)>, affine_map<(d0, d1, d2, d3, d4) -> (d1, d3, d2, d4)>, affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2)>]
      {lowbit.brgemm = "packed", lowbit.brgemm_beta0}
      ins(%x, %p : tensor<?x32x2xbf16>, tensor<2x32x32x2xbf16>) outs(%c : tensor<?x2x32xbf16>) -> tensor<?x2x32xbf16>
  return %r : tensor<?x2x32xbf16>
}

// -----

// torch-mlir's bf16 addmm: both operands extended to f32 before an f32 matmul. The pass
// runs the bf16 matmul of the sources (exact products, f32 accumulation), so the weight
// is packed as bf16 VNNI pairs and the activation is read as bf16.
// CHECK-LABEL: func.func @bf16_addmm_form
// CHECK-SAME: (%[[X:.+]]: tensor<2x4xbf16>, %[[ACC:.+]]: tensor<2x32xf32>)
// CHECK: %[[P:.+]] = arith.constant dense<{{.+}}> : tensor<1x2x32x2xbf16>
// CHECK: %[[A3:.+]] = tensor.expand_shape %[[X]]
// CHECK: linalg.contract {{.*}}ins({{.+}}, %[[P]] : tensor<1x2x2xbf16>, tensor<1x2x32x2xbf16>)
// CHECK-NOT: arith.extf
#id = affine_map<(d0, d1) -> (d0, d1)>
func.func @bf16_addmm_form(%x: tensor<2x4xbf16>, %acc: tensor<2x32xf32>) -> tensor<2x32xf32> {
  %w = arith.constant dense<0.5> : tensor<32x4xbf16>
  %e = tensor.empty() : tensor<4x32xbf16>
  %wt = linalg.transpose ins(%w : tensor<32x4xbf16>) outs(%e : tensor<4x32xbf16>) permutation = [1, 0]
  %ex = tensor.empty() : tensor<2x4xf32>
  %xf = linalg.generic {indexing_maps = [#id, #id], iterator_types = ["parallel", "parallel"]} ins(%x : tensor<2x4xbf16>) outs(%ex : tensor<2x4xf32>) {
  ^bb0(%in: bf16, %out: f32):
    %v = arith.extf %in : bf16 to f32
    linalg.yield %v : f32
  } -> tensor<2x4xf32>
  %ew = tensor.empty() : tensor<4x32xf32>
  %wf = linalg.generic {indexing_maps = [#id, #id], iterator_types = ["parallel", "parallel"]} ins(%wt : tensor<4x32xbf16>) outs(%ew : tensor<4x32xf32>) {
  ^bb0(%in: bf16, %out: f32):
    %v = arith.extf %in : bf16 to f32
    linalg.yield %v : f32
  } -> tensor<4x32xf32>
  %r = linalg.matmul ins(%xf, %wf : tensor<2x4xf32>, tensor<4x32xf32>) outs(%acc : tensor<2x32xf32>) -> tensor<2x32xf32>
  return %r : tensor<2x32xf32>
}

// -----

// bf16 Linear with dynamic M whose f32 product is only rounded to bf16: the folded tile
// writes bf16 C into a new dynamic tensor (its size read from the original C).
// CHECK-LABEL: func.func @bf16_rounded_dynamic_m
// CHECK-NOT: linalg.fill
// CHECK: %[[E:.+]] = tensor.empty(%{{.+}}) : tensor<?x32xbf16>
// CHECK: scf.forall {{.+}} -> (tensor<?x1x32xbf16>)
// CHECK: linalg.contract {{.*}}lowbit.brgemm_beta0{{.*}} outs({{.+}} : tensor<?x1x32xbf16>)
// CHECK-NOT: linalg.generic
// CHECK: return {{.+}} : tensor<?x32xbf16>
func.func @bf16_rounded_dynamic_m(%x: tensor<?x4xbf16>) -> tensor<?x32xbf16> {
  %w = arith.constant dense<1.5> : tensor<4x32xbf16>
  %zero = arith.constant 0.0 : f32
  %c0 = arith.constant 0 : index
  %m = tensor.dim %x, %c0 : tensor<?x4xbf16>
  %o = tensor.empty(%m) : tensor<?x32xf32>
  %c = linalg.fill ins(%zero : f32) outs(%o : tensor<?x32xf32>) -> tensor<?x32xf32>
  %r = linalg.matmul ins(%x, %w : tensor<?x4xbf16>, tensor<4x32xbf16>) outs(%c : tensor<?x32xf32>) -> tensor<?x32xf32>
  %e = tensor.empty(%m) : tensor<?x32xbf16>
  %b = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]} ins(%r : tensor<?x32xf32>) outs(%e : tensor<?x32xbf16>) {
  ^bb0(%in: f32, %out: bf16):
    %t = arith.truncf %in : f32 to bf16
    linalg.yield %t : bf16
  } -> tensor<?x32xbf16>
  return %b : tensor<?x32xbf16>
}

// -----

// The bind-time packed form as lowbit-convert-linear-op emits it: a zero-filled init and
// lowbit.brgemm_beta0. The tile overwrites C, so the fill (a pass over C) is dropped.
// CHECK-LABEL: func.func @packed_argument_zero_init
// CHECK-NOT: linalg.fill
// CHECK: scf.forall
// CHECK:   linalg.contract {{.*}}lowbit.brgemm = "packed", lowbit.brgemm_beta0
// CHECK-NOT: linalg.fill
func.func @packed_argument_zero_init(%x: tensor<?x64xf32>, %p: tensor<4x64x32xf32>) -> tensor<?x4x32xf32> {
  %c0 = arith.constant 0 : index
  %m = tensor.dim %x, %c0 : tensor<?x64xf32>
  %e = tensor.empty(%m) : tensor<?x4x32xf32>
  %zero = arith.constant 0.0 : f32
  %c = linalg.fill ins(%zero : f32) outs(%e : tensor<?x4x32xf32>) -> tensor<?x4x32xf32>
  %r = linalg.contract indexing_maps = [affine_map<(d0, d1, d2, d3) -> (d0, d3)>, affine_map<(d0, d1, d2, d3) -> (d1, d3, d2)>, affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>]
      {lowbit.brgemm = "packed", lowbit.brgemm_beta0}
      ins(%x, %p : tensor<?x64xf32>, tensor<4x64x32xf32>) outs(%c : tensor<?x4x32xf32>) -> tensor<?x4x32xf32>
  return %r : tensor<?x4x32xf32>
}

// -----

// bf16, bind-time packed, as lowbit-convert-linear-op emits it: zero-filled f32 C,
// collapsed to [M, N] and rounded to bf16. The tile stores bf16 C itself (beta 0, one
// rounding in the kernel): no fill, no f32 C, no rounding pass.
// CHECK-LABEL: func.func @packed_argument_bf16_rounded
// CHECK-NOT: linalg.fill
// CHECK: scf.forall {{.+}} -> (tensor<?x2x32xbf16>)
// CHECK:   linalg.contract {{.*}}lowbit.brgemm = "packed", lowbit.brgemm_beta0{{.*}} outs(%{{.+}} : tensor<?x{{[0-9]+}}x32xbf16>)
// CHECK: %[[Y:.+]] = tensor.collapse_shape %{{.+}} {{\[\[}}0], [1, 2]] : tensor<?x2x32xbf16> into tensor<?x64xbf16>
// CHECK-NOT: linalg.generic
// CHECK: return %[[Y]]
func.func @packed_argument_bf16_rounded(%x: tensor<?x32x2xbf16>, %p: tensor<2x32x32x2xbf16>) -> tensor<?x64xbf16> {
  %c0 = arith.constant 0 : index
  %m = tensor.dim %x, %c0 : tensor<?x32x2xbf16>
  %e = tensor.empty(%m) : tensor<?x2x32xf32>
  %zero = arith.constant 0.0 : f32
  %c = linalg.fill ins(%zero : f32) outs(%e : tensor<?x2x32xf32>) -> tensor<?x2x32xf32>
  %r = linalg.contract indexing_maps = [affine_map<(d0, d1, d2, d3, d4) -> (d0, d3, d4)>, affine_map<(d0, d1, d2, d3, d4) -> (d1, d3, d2, d4)>, affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2)>]
      {lowbit.brgemm = "packed", lowbit.brgemm_beta0}
      ins(%x, %p : tensor<?x32x2xbf16>, tensor<2x32x32x2xbf16>) outs(%c : tensor<?x2x32xf32>) -> tensor<?x2x32xf32>
  %y = tensor.collapse_shape %r [[0], [1, 2]] : tensor<?x2x32xf32> into tensor<?x64xf32>
  %eb = tensor.empty(%m) : tensor<?x64xbf16>
  %b = linalg.generic {indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]} ins(%y : tensor<?x64xf32>) outs(%eb : tensor<?x64xbf16>) {
  ^bb0(%in: f32, %out: bf16):
    %t = arith.truncf %in : f32 to bf16
    linalg.yield %t : bf16
  } -> tensor<?x64xbf16>
  return %b : tensor<?x64xbf16>
}
