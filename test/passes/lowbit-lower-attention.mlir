// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-lower-attention)' | filecheck %s

// lowbit-lower-attention: a bufferized fused-attention function (made by
// lowbit-convert-attention, out-param form (q, k, v, [mask,] out)) gets the runtime kernel's
// invocations instead of its placeholder body; sizes are read at run time.

// A [T, S] mask with dynamic B/T/S, GQA 8:2: one validating call (empty head range), a
// lowbit.trap assert on its result, then either one call for all heads or one per head in
// an scf.forall (B*H*T*S*D >= min-parallel-work).
// CHECK-LABEL: func.func private @lowbit_attention_0(
// CHECK-SAME: %[[Q:.+]]: memref<?x8x?x64xf32>, %[[K:.+]]: memref<?x2x?x64xf32>, %[[V:.+]]: memref<?x2x?x64xf32>, %[[M:.+]]: memref<?x?xi1>, %[[O:.+]]: memref<?x8x?x64xf32>)
// CHECK-SAME: lowbit.lowered
// CHECK-NOT: linalg.fill
// CHECK: memref.dim %[[Q]], %c0
// CHECK: memref.dim %[[K]], %c2
// CHECK: memref.extract_aligned_pointer_as_index %[[M]]
// CHECK: memref.dim %[[M]], %c0
// CHECK: memref.dim %[[M]], %c1
// CHECK: %[[SCALE:.+]] = arith.constant 1.250000e-01 : f32
// CHECK: %[[RC:.+]] = call @lowbit_attention_invoke(%c2_i32, {{.+}}, %[[SCALE]], %c1_i32, %c0_i64, %c0_i64)
// CHECK: %[[OK:.+]] = arith.cmpi eq, %[[RC]], %c0_i32
// CHECK: cf.assert %[[OK]], "lowbit attention: the mask does not broadcast to [B, H, T, S]" {lowbit.trap}
// CHECK: arith.constant 65536 : i64
// CHECK: scf.if %[[OK]] {
// CHECK: scf.forall (%[[I:.+]]) in (%{{.+}}) {
// CHECK: call @lowbit_attention_invoke(
// CHECK: } else {
// CHECK: call @lowbit_attention_invoke(
// CHECK: func.func private @lowbit_attention_invoke(i32, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, f32, i32, i64, i64) -> i32
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
