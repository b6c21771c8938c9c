// RUN: not lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-dense-brgemm-calls)' 2>/dev/null | filecheck %s
// RUN: not lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-dense-brgemm-calls)' 2>&1 >/dev/null | filecheck %s --check-prefix=ERR

// A packed f32 tile inside a forall: one dispatch at the top of the function (dtype 1,
// m 2, n 32, k 8, lda 8, panel stride 256, ldc 64, no batch strides, flags B_PACKED=2);
// the invoke passes the tile's base pointers and element offsets. Two tiles with the same
// description share the handle.
// CHECK-LABEL: func.func @packed_f32
// CHECK-SAME: (%[[X:.+]]: memref<4x8xf32>, %[[Y:.+]]: memref<4x64xf32>)
// CHECK-DAG: %[[DT:.+]] = arith.constant 1 : i32
// CHECK-DAG: %[[M:.+]] = arith.constant 2 : i64
// CHECK-DAG: %[[N:.+]] = arith.constant 32 : i64
// CHECK-DAG: %[[K:.+]] = arith.constant 8 : i64
// CHECK-DAG: %[[LDB:.+]] = arith.constant 256 : i64
// CHECK-DAG: %[[LDC:.+]] = arith.constant 64 : i64
// CHECK-DAG: %[[Z:.+]] = arith.constant 0 : i64
// CHECK: %[[H:.+]] = call @lowbit_brgemm_dispatch(%[[DT]], %[[M]], %[[N]], %[[K]], %{{.+}}, %[[LDB]], %[[LDC]], %[[Z]], %[[Z]], %{{.+}})
// CHECK-NOT: call @lowbit_brgemm_dispatch
// CHECK: scf.forall
// CHECK: %[[A:.+]] = memref.subview %[[X]]
// CHECK: %[[C:.+]] = memref.subview
// CHECK: %[[BASE:.+]], %[[OFF:.+]], %{{.+}}:2, %{{.+}}:2 = memref.extract_strided_metadata %[[A]]
// CHECK: %[[AP:.+]] = memref.extract_aligned_pointer_as_index %[[A]]
// CHECK: %[[API:.+]] = arith.index_cast %[[AP]] : index to i64
// CHECK: %[[APTR:.+]] = llvm.inttoptr %[[API]] : i64 to !llvm.ptr
// CHECK: %[[AOFF:.+]] = arith.index_cast %[[OFF]] : index to i64
// CHECK: call @lowbit_brgemm_invoke(%[[H]], %[[APTR]], %[[AOFF]], %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}) : (i64, !llvm.ptr, i64, !llvm.ptr, i64, !llvm.ptr, i64, i64) -> i32
// CHECK-NOT: linalg.contract
// CHECK: call @lowbit_brgemm_invoke(%[[H]],
// CHECK-NOT: linalg.contract
// CHECK: return
// CHECK-DAG: func.func private @lowbit_brgemm_dispatch(i32, i64, i64, i64, i64, i64, i64, i64, i64, i64) -> i64
// CHECK-DAG: func.func private @lowbit_brgemm_invoke(i64, !llvm.ptr, i64, !llvm.ptr, i64, !llvm.ptr, i64, i64) -> i32
#a = affine_map<(d0, d1, d2, d3) -> (d0, d3)>
#b = affine_map<(d0, d1, d2, d3) -> (d1, d3, d2)>
#c = affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>
memref.global "private" constant @packed : memref<2x8x32xf32> = dense<1.0>
func.func @packed_f32(%x: memref<4x8xf32>, %y: memref<4x64xf32>) {
  %p = memref.get_global @packed : memref<2x8x32xf32>
  %y3 = memref.expand_shape %y [[0], [1, 2]] output_shape [4, 2, 32] : memref<4x64xf32> into memref<4x2x32xf32>
  scf.forall (%i, %j) in (2, 2) {
    %r = affine.apply affine_map<(d0) -> (d0 * 2)>(%i)
    %a = memref.subview %x[%r, 0] [2, 8] [1, 1] : memref<4x8xf32> to memref<2x8xf32, strided<[8, 1], offset: ?>>
    %b = memref.subview %p[%j, 0, 0] [1, 8, 32] [1, 1, 1] : memref<2x8x32xf32> to memref<1x8x32xf32, strided<[256, 32, 1], offset: ?>>
    %c = memref.subview %y3[%r, %j, 0] [2, 1, 32] [1, 1, 1] : memref<4x2x32xf32> to memref<2x1x32xf32, strided<[64, 32, 1], offset: ?>>
    linalg.contract indexing_maps = [#a, #b, #c] {lowbit.brgemm = "packed"}
      ins(%a, %b : memref<2x8xf32, strided<[8, 1], offset: ?>>, memref<1x8x32xf32, strided<[256, 32, 1], offset: ?>>)
      outs(%c : memref<2x1x32xf32, strided<[64, 32, 1], offset: ?>>)
  }
  %a0 = memref.subview %x[0, 0] [2, 8] [1, 1] : memref<4x8xf32> to memref<2x8xf32, strided<[8, 1]>>
  %b0 = memref.subview %p[0, 0, 0] [1, 8, 32] [1, 1, 1] : memref<2x8x32xf32> to memref<1x8x32xf32, strided<[256, 32, 1]>>
  %c0 = memref.subview %y3[0, 0, 0] [2, 1, 32] [1, 1, 1] : memref<4x2x32xf32> to memref<2x1x32xf32, strided<[64, 32, 1]>>
  linalg.contract indexing_maps = [#a, #b, #c] {lowbit.brgemm = "packed"}
    ins(%a0, %b0 : memref<2x8xf32, strided<[8, 1]>>, memref<1x8x32xf32, strided<[256, 32, 1]>>)
    outs(%c0 : memref<2x1x32xf32, strided<[64, 32, 1]>>)
  return
}

// -----

// bf16 packed (dtype 2): A is [m, k/2, 2], so k = 2 * 4 = 8 and lda = 8; the VNNI panel
// stride is 256. A row-major bmm tile (unit batch) gets its own description (flags 0).
// CHECK-LABEL: func.func @bf16_and_bmm
// CHECK-DAG: %[[BF:.+]] = arith.constant 2 : i32
// CHECK-DAG: %[[F32:.+]] = arith.constant 1 : i32
// CHECK-DAG: %[[C0:.+]] = arith.constant 0 : i64
// CHECK-DAG: %[[C2:.+]] = arith.constant 2 : i64
// CHECK-DAG: %[[C3:.+]] = arith.constant 3 : i64
// CHECK-DAG: %[[C5:.+]] = arith.constant 5 : i64
// CHECK-DAG: %[[C7:.+]] = arith.constant 7 : i64
// CHECK-DAG: %[[C8:.+]] = arith.constant 8 : i64
// CHECK-DAG: %[[C32:.+]] = arith.constant 32 : i64
// CHECK-DAG: %[[C256:.+]] = arith.constant 256 : i64
// CHECK-DAG: call @lowbit_brgemm_dispatch(%[[BF]], %[[C2]], %[[C32]], %[[C8]], %[[C8]], %[[C256]], %[[C32]], %[[C0]], %[[C0]], %[[C2]])
// CHECK-DAG: call @lowbit_brgemm_dispatch(%[[F32]], %[[C3]], %[[C5]], %[[C7]], %[[C7]], %[[C5]], %[[C5]], %[[C0]], %[[C0]], %[[C0]])
// CHECK-NOT: linalg.contract
// CHECK-NOT: linalg.batch_matmul
// CHECK-COUNT-2: call @lowbit_brgemm_invoke
#a = affine_map<(d0, d1, d2, d3, d4) -> (d0, d3, d4)>
#b = affine_map<(d0, d1, d2, d3, d4) -> (d1, d3, d2, d4)>
#c = affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2)>
func.func @bf16_and_bmm(%x: memref<2x4x2xbf16>, %p: memref<1x4x32x2xbf16>, %y: memref<2x1x32xf32>,
                        %u: memref<1x3x7xf32>, %v: memref<1x7x5xf32>, %w: memref<1x3x5xf32>) {
  linalg.contract indexing_maps = [#a, #b, #c] {lowbit.brgemm = "packed"}
    ins(%x, %p : memref<2x4x2xbf16>, memref<1x4x32x2xbf16>) outs(%y : memref<2x1x32xf32>)
  linalg.batch_matmul {lowbit.brgemm = "rowmajor"} ins(%u, %v : memref<1x3x7xf32>, memref<1x7x5xf32>) outs(%w : memref<1x3x5xf32>)
  return
}

// -----

// A tile marked beta0 by lowbit-dense-tile overwrites C (BETA_0 = 1): with a bf16 C it also
// stores bf16 (C_BF16 = 4), so flags = 1 | 2 | 4 = 7; with f32 C, flags = 1 | 2 = 3.
// CHECK-LABEL: func.func @beta0_tiles
// CHECK-DAG: %[[F3:.+]] = arith.constant 3 : i64
// CHECK-DAG: %[[F7:.+]] = arith.constant 7 : i64
// CHECK-DAG: call @lowbit_brgemm_dispatch(%{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %[[F7]])
// CHECK-DAG: call @lowbit_brgemm_dispatch(%{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %[[F3]])
// CHECK-COUNT-2: call @lowbit_brgemm_invoke
#a = affine_map<(d0, d1, d2, d3, d4) -> (d0, d3, d4)>
#b = affine_map<(d0, d1, d2, d3, d4) -> (d1, d3, d2, d4)>
#c = affine_map<(d0, d1, d2, d3, d4) -> (d0, d1, d2)>
func.func @beta0_tiles(%x: memref<2x4x2xbf16>, %p: memref<1x4x32x2xbf16>, %y: memref<2x1x32xbf16>,
                       %z: memref<2x1x32xf32>) {
  linalg.contract indexing_maps = [#a, #b, #c] {lowbit.brgemm = "packed", lowbit.brgemm_beta0}
    ins(%x, %p : memref<2x4x2xbf16>, memref<1x4x32x2xbf16>) outs(%y : memref<2x1x32xbf16>)
  linalg.contract indexing_maps = [#a, #b, #c] {lowbit.brgemm = "packed", lowbit.brgemm_beta0}
    ins(%x, %p : memref<2x4x2xbf16>, memref<1x4x32x2xbf16>) outs(%z : memref<2x1x32xf32>)
  return
}

// -----

// A shape-generic tile: rows (a token-count tail), K and B's leading dimension (a KV
// length) are dynamic. They are read from the tile's memref metadata and dispatched at the
// tile; the invoke runs when the runtime accepts the description (handle > 0), otherwise
// the tile op itself runs (else branch, loops later): never a wrong answer.
// CHECK-LABEL: func.func @dynamic_rowmajor
// CHECK-NOT: call @lowbit_brgemm_dispatch
// CHECK: scf.forall
// CHECK:   %[[A:.+]] = memref.subview
// CHECK:   %{{.+}}, %{{.+}}, %[[AS:.+]]:2, %[[AT:.+]]:2 = memref.extract_strided_metadata %[[A]]
// CHECK:   %[[M:.+]] = arith.index_cast %[[AS]]#0 : index to i64
// CHECK:   %[[K:.+]] = arith.index_cast %[[AS]]#1 : index to i64
// CHECK:   %[[H:.+]] = func.call @lowbit_brgemm_dispatch(%{{.+}}, %[[M]], %{{.+}}, %[[K]], %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %{{.+}})
// CHECK:   %[[OK:.+]] = arith.cmpi sgt, %[[H]], %{{.+}} : i64
// CHECK:   scf.if %[[OK]] {
// CHECK:     func.call @lowbit_brgemm_invoke(%[[H]],
// CHECK:   } else {
// CHECK:     linalg.matmul ins(%[[A]], %{{.+}} : memref<?x?xf32, strided<[?, 1], offset: ?>>, memref<?x64xf32, strided<[?, 1], offset: ?>>)
// CHECK-NOT: lowbit.brgemm
// CHECK:   }
// CHECK: return
func.func @dynamic_rowmajor(%x: memref<?x?xf32>, %y: memref<?x64xf32>, %z: memref<?x64xf32>) {
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %m = memref.dim %x, %c0 : memref<?x?xf32>
  %k = memref.dim %x, %c1 : memref<?x?xf32>
  %n = affine.apply affine_map<()[s0] -> (s0 ceildiv 32)>()[%m]
  scf.forall (%i) in (%n) {
    %r = affine.apply affine_map<(d0) -> (d0 * 32)>(%i)
    %sz = affine.min affine_map<(d0)[s0] -> (d0 * -32 + s0, 32)>(%i)[%m]
    %a = memref.subview %x[%r, 0] [%sz, %k] [1, 1] : memref<?x?xf32> to memref<?x?xf32, strided<[?, 1], offset: ?>>
    %c = memref.subview %z[%r, 0] [%sz, 64] [1, 1] : memref<?x64xf32> to memref<?x64xf32, strided<[64, 1], offset: ?>>
    %b = memref.subview %y[0, 0] [%k, 64] [1, 1] : memref<?x64xf32> to memref<?x64xf32, strided<[64, 1]>>
    %bc = memref.cast %b : memref<?x64xf32, strided<[64, 1]>> to memref<?x64xf32, strided<[?, 1], offset: ?>>
    linalg.matmul {lowbit.brgemm = "rowmajor", lowbit.brgemm_tile = array<i64: 32, 64>}
      ins(%a, %bc : memref<?x?xf32, strided<[?, 1], offset: ?>>, memref<?x64xf32, strided<[?, 1], offset: ?>>)
      outs(%c : memref<?x64xf32, strided<[64, 1], offset: ?>>)
  }
  return
}

// -----

// A packed beta-0 tile with a dynamic row count: dispatched at the tile with m from the
// metadata (bf16 K doubled from the pair count is static here); the fallback zero-fills C
// before running the contraction as loops (its init was a dropped zero fill).
// CHECK-LABEL: func.func @dynamic_packed_beta0
// CHECK: memref.extract_strided_metadata
// CHECK: %[[H:.+]] = {{.*}}call @lowbit_brgemm_dispatch
// CHECK: scf.if
// CHECK:   {{.*}}call @lowbit_brgemm_invoke(%[[H]],
// CHECK: } else {
// CHECK:   linalg.fill
// CHECK:   linalg.contract
// CHECK: }
#pa = affine_map<(d0, d1, d2, d3) -> (d0, d3)>
#pb = affine_map<(d0, d1, d2, d3) -> (d1, d3, d2)>
#pc = affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>
func.func @dynamic_packed_beta0(%x: memref<?x8xf32, strided<[8, 1], offset: ?>>, %p: memref<1x8x32xf32>, %y: memref<?x1x32xf32, strided<[32, 32, 1], offset: ?>>) {
  linalg.contract indexing_maps = [#pa, #pb, #pc] {lowbit.brgemm = "packed", lowbit.brgemm_beta0}
    ins(%x, %p : memref<?x8xf32, strided<[8, 1], offset: ?>>, memref<1x8x32xf32>)
    outs(%y : memref<?x1x32xf32, strided<[32, 32, 1], offset: ?>>)
  return
}

// -----

// Negative: untagged matmuls are left alone and nothing is declared.
// CHECK-LABEL: func.func @untagged
// CHECK: linalg.matmul
// CHECK-NOT: lowbit_brgemm
func.func @untagged(%a: memref<3x7xf32>, %b: memref<7x5xf32>, %c: memref<3x5xf32>) {
  linalg.matmul ins(%a, %b : memref<3x7xf32>, memref<7x5xf32>) outs(%c : memref<3x5xf32>)
  return
}

// -----

// ERR: runs after bufferization; this BRGEMM tile still works on tensors
func.func @on_tensors(%a: tensor<3x7xf32>, %b: tensor<7x5xf32>, %c: tensor<3x5xf32>) -> tensor<3x5xf32> {
  %r = linalg.matmul {lowbit.brgemm = "rowmajor"} ins(%a, %b : tensor<3x7xf32>, tensor<7x5xf32>) outs(%c : tensor<3x5xf32>) -> tensor<3x5xf32>
  return %r : tensor<3x5xf32>
}

// -----

// ERR: operands need unit column strides
func.func @dynamic_column_stride(%a: memref<3x7xf32>, %b: memref<7x5xf32, strided<[?, ?]>>, %c: memref<3x5xf32>) {
  linalg.matmul {lowbit.brgemm = "rowmajor"} ins(%a, %b : memref<3x7xf32>, memref<7x5xf32, strided<[?, ?]>>) outs(%c : memref<3x5xf32>)
  return
}

// -----

// ERR: operands need unit column strides
func.func @column_stride(%a: memref<3x7xf32>, %b: memref<7x5xf32, strided<[10, 2]>>, %c: memref<3x5xf32>) {
  linalg.matmul {lowbit.brgemm = "rowmajor"} ins(%a, %b : memref<3x7xf32>, memref<7x5xf32, strided<[10, 2]>>) outs(%c : memref<3x5xf32>)
  return
}
