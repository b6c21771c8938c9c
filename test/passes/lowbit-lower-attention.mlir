// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-lower-attention)' | filecheck %s
// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-lower-attention{max-group-queries=1 min-parallel-work=7})' | filecheck %s --check-prefix=OPT

// lowbit-lower-attention: a bufferized fused-attention function (made by
// lowbit-convert-attention, out-param form (q, k, v, [mask,] out)) gets the runtime kernel's
// invocations instead of its placeholder body; sizes are read at run time.

// A [T, S] mask with dynamic B/T/S, GQA 8:2: one validating call (empty head range), a
// lowbit.trap assert on its result, then either one call for all heads or, for
// B*H*T*S*D >= min-parallel-work, an scf.forall over work units: c parts of each of the
// B*Hkv KV-head groups (c = min(G, ceil(threads / groups)) for T <= 4, else G = one head per
// unit), each unit's call covering heads [grp*G + part*G/c, grp*G + (part+1)*G/c).
// CHECK-LABEL: func.func private @lowbit_attention_0(
// CHECK-SAME: %[[Q:.+]]: memref<?x8x?x64xf32>, %[[K:.+]]: memref<?x2x?x64xf32>, %[[V:.+]]: memref<?x2x?x64xf32>, %[[M:.+]]: memref<?x?xi1>, %[[O:.+]]: memref<?x8x?x64xf32>)
// CHECK-SAME: lowbit.lowered
// CHECK-NOT: linalg.fill
// CHECK: %[[B:.+]] = arith.index_cast %{{.+}} : index to i64
// CHECK: %[[H:.+]] = arith.index_cast %{{.+}} : index to i64
// CHECK: %[[T:.+]] = arith.index_cast %{{.+}} : index to i64
// CHECK: %[[D:.+]] = arith.index_cast %{{.+}} : index to i64
// CHECK: memref.dim %[[K]], %c1
// CHECK-NEXT: %[[HKV:.+]] = arith.index_cast
// CHECK: memref.dim %[[K]], %c2
// CHECK: memref.extract_aligned_pointer_as_index %[[M]]
// CHECK: memref.dim %[[M]], %c0
// CHECK: memref.dim %[[M]], %c1
// CHECK: %[[SCALE:.+]] = arith.constant 1.250000e-01 : f32
// CHECK: %[[RC:.+]] = call @lowbit_attention_invoke(%c2_i32, {{.+}}, %[[SCALE]], %c1_i32, %c0_i64, %c0_i64)
// CHECK: %[[OK:.+]] = arith.cmpi eq, %[[RC]], %c0_i32
// CHECK: cf.assert %[[OK]], "lowbit attention: the mask does not broadcast to [B, H, T, S]" {lowbit.trap}
// CHECK: %[[BH:.+]] = arith.muli %[[B]], %[[H]] : i64
// CHECK: arith.constant 65536 : i64
// CHECK: %[[BIG:.+]] = arith.cmpi sge
// CHECK: scf.if %[[OK]] {
// CHECK-NEXT: %[[G:.+]] = arith.divsi %[[H]], %[[HKV]] : i64
// CHECK-NEXT: %[[GROUPS:.+]] = arith.muli %[[B]], %[[HKV]] : i64
// CHECK-NEXT: %[[NT32:.+]] = func.call @omp_get_max_threads() : () -> i32
// CHECK-NEXT: %[[NT:.+]] = arith.extsi %[[NT32]]
// CHECK-NEXT: %[[GROUPS1:.+]] = arith.maxsi %[[GROUPS]], %c1_i64
// CHECK: %[[FILL:.+]] = arith.divsi %{{.+}}, %[[GROUPS1]] : i64
// CHECK-NEXT: %[[CG:.+]] = arith.minsi %[[FILL]], %[[G]] : i64
// CHECK-NEXT: %[[MAXT:.+]] = arith.constant 4 : i64
// OPT-LABEL: func.func private @lowbit_attention_0(
// OPT: arith.constant 7 : i64
// OPT: arith.constant 1 : i64
// OPT-NEXT: arith.cmpi sle
// CHECK-NEXT: %[[SHORT:.+]] = arith.cmpi sle, %[[T]], %[[MAXT]] : i64
// CHECK-NEXT: %[[C:.+]] = arith.select %[[SHORT]], %[[CG]], %[[G]] : i64
// CHECK-NEXT: %[[UNITS:.+]] = arith.muli %[[GROUPS]], %[[C]] : i64
// CHECK-NEXT: %[[MANY:.+]] = arith.cmpi sgt, %[[UNITS]], %c1_i64 : i64
// CHECK-NEXT: %[[PAR:.+]] = arith.andi %[[BIG]], %[[MANY]] : i1
// CHECK-NEXT: scf.if %[[PAR]] {
// CHECK-NEXT: %[[UNITS_I:.+]] = arith.index_cast %[[UNITS]] : i64 to index
// CHECK-NEXT: scf.forall (%[[U_I:.+]]) in (%[[UNITS_I]]) {
// CHECK-NEXT: %[[U:.+]] = arith.index_cast %[[U_I]] : index to i64
// CHECK-NEXT: %[[GRP:.+]] = arith.divsi %[[U]], %[[C]] : i64
// CHECK-NEXT: %[[PART:.+]] = arith.remsi %[[U]], %[[C]] : i64
// CHECK-NEXT: %[[G0:.+]] = arith.muli %[[GRP]], %[[G]] : i64
// CHECK-NEXT: %[[P0:.+]] = arith.muli %[[PART]], %[[G]] : i64
// CHECK-NEXT: %[[O0:.+]] = arith.divsi %[[P0]], %[[C]] : i64
// CHECK-NEXT: %[[PART1:.+]] = arith.addi %[[PART]], %c1_i64 : i64
// CHECK-NEXT: %[[P1:.+]] = arith.muli %[[PART1]], %[[G]] : i64
// CHECK-NEXT: %[[O1:.+]] = arith.divsi %[[P1]], %[[C]] : i64
// CHECK-NEXT: %[[B0:.+]] = arith.addi %[[G0]], %[[O0]] : i64
// CHECK-NEXT: %[[B1:.+]] = arith.addi %[[G0]], %[[O1]] : i64
// CHECK-NEXT: call @lowbit_attention_invoke({{.+}}, %[[B0]], %[[B1]])
// CHECK: } else {
// CHECK-NEXT: call @lowbit_attention_invoke({{.+}}, %c0_i64, %[[BH]])
// CHECK-DAG: func.func private @lowbit_attention_invoke(i32, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, f32, i32, i64, i64) -> i32
// CHECK-DAG: func.func private @omp_get_max_threads() -> i32
func.func private @lowbit_attention_0(%q: memref<?x8x?x64xf32>, %k: memref<?x2x?x64xf32>, %v: memref<?x2x?x64xf32>, %m: memref<?x?xi1>, %out: memref<?x8x?x64xf32>) attributes {lowbit.attention = {causal = true, scale = 1.250000e-01 : f64}, no_inline} {
  %nan = arith.constant 0x7FC00000 : f32
  linalg.fill ins(%nan : f32) outs(%out : memref<?x8x?x64xf32>)
  return
}

// -----

// bf16 without a mask: a null mask pointer (0) and sizes 1; dtype code 3.
// CHECK-LABEL: func.func private @lowbit_attention_1(
// CHECK-SAME: memref<1x4x3x16xbf16>
// CHECK: call @lowbit_attention_invoke(%c3_i32, %{{.+}}, %{{.+}}, %{{.+}}, %c0_i64, %{{.+}}, {{.+}}, %c1_i64, %c1_i64, %c1_i64, %c1_i64,
func.func private @lowbit_attention_1(%q: memref<1x4x3x16xbf16>, %k: memref<1x4x10x16xbf16>, %v: memref<1x4x10x16xbf16>, %out: memref<1x4x3x16xbf16>) attributes {lowbit.attention = {causal = false, scale = 2.500000e-01 : f64}, no_inline} {
  return
}

// -----

// Not bufferized yet (tensor results): left alone.
// CHECK-LABEL: func.func private @lowbit_attention_2(
// CHECK-NOT: lowbit.lowered
// CHECK: linalg.fill
// CHECK-NOT: lowbit_attention_invoke
func.func private @lowbit_attention_2(%q: tensor<1x4x3x16xf32>, %k: tensor<1x4x10x16xf32>, %v: tensor<1x4x10x16xf32>, %out: tensor<1x4x3x16xf32>) -> tensor<1x4x3x16xf32> attributes {lowbit.attention = {causal = false, scale = 2.500000e-01 : f64}, no_inline} {
  %nan = arith.constant 0x7FC00000 : f32
  %0 = linalg.fill ins(%nan : f32) outs(%out : tensor<1x4x3x16xf32>) -> tensor<1x4x3x16xf32>
  return %0 : tensor<1x4x3x16xf32>
}

// -----

// Edge shapes. MHA (H == Hkv, static 1x16xTx128): the same units code (G = 1, so every unit
// is one head whatever c is); nothing is specialized at compile time.
// CHECK-LABEL: func.func private @lowbit_attention_3(
// CHECK-SAME: memref<1x16x128x128xf32>
// CHECK: arith.divsi
// CHECK: scf.forall
// CHECK: call @lowbit_attention_invoke(
// CHECK: } else {
func.func private @lowbit_attention_3(%q: memref<1x16x128x128xf32>, %k: memref<1x16x128x128xf32>, %v: memref<1x16x128x128xf32>, %out: memref<1x16x128x128xf32>) attributes {lowbit.attention = {causal = true, scale = 8.838834764831845e-02 : f64}, no_inline} {
  return
}

// -----

// MQA (Hkv == 1) with a per-head [B, H, T, S] mask (rank 4: all four sizes passed) and a
// dynamic S: one KV-head group per batch row, split over the threads by c.
// CHECK-LABEL: func.func private @lowbit_attention_4(
// CHECK-SAME: %[[Q:.+]]: memref<2x8x1x64xf32>, %[[K:.+]]: memref<2x1x?x64xf32>, %{{.+}}: memref<2x1x?x64xf32>, %[[M:.+]]: memref<2x8x1x?xi1>
// CHECK: memref.dim %[[M]], %c0
// CHECK: memref.dim %[[M]], %c1
// CHECK: memref.dim %[[M]], %c2
// CHECK: memref.dim %[[M]], %c3
// CHECK: call @lowbit_attention_invoke(%c2_i32, {{.+}}, %c0_i64, %c0_i64)
// CHECK: func.call @omp_get_max_threads()
// CHECK: scf.forall
func.func private @lowbit_attention_4(%q: memref<2x8x1x64xf32>, %k: memref<2x1x?x64xf32>, %v: memref<2x1x?x64xf32>, %m: memref<2x8x1x?xi1>, %out: memref<2x8x1x64xf32>) attributes {lowbit.attention = {causal = false, scale = 1.250000e-01 : f64}, no_inline} {
  return
}

// -----

// Not the kernel's forms: f16 elements, a rank-3 query. Left alone, and no declarations.
// CHECK-LABEL: func.func private @lowbit_attention_5(
// CHECK-NOT: lowbit.lowered
// CHECK-LABEL: func.func private @lowbit_attention_6(
// CHECK-NOT: lowbit.lowered
// CHECK-NOT: lowbit_attention_invoke
// CHECK-NOT: omp_get_max_threads
func.func private @lowbit_attention_5(%q: memref<1x4x3x16xf16>, %k: memref<1x4x10x16xf16>, %v: memref<1x4x10x16xf16>, %out: memref<1x4x3x16xf16>) attributes {lowbit.attention = {causal = false, scale = 2.500000e-01 : f64}, no_inline} {
  return
}
func.func private @lowbit_attention_6(%q: memref<4x3x16xf32>, %k: memref<4x10x16xf32>, %v: memref<4x10x16xf32>, %out: memref<4x3x16xf32>) attributes {lowbit.attention = {causal = false, scale = 2.500000e-01 : f64}, no_inline} {
  return
}
