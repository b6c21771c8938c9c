// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-inplace-results)' | filecheck %s

// lowbit-inplace-results, after buffer-results-to-out-params: the trailing copy of an input
// updated in place (a KV cache, see lowbit-convert-index-put) to its out-param runs only when
// the caller passed another buffer; the module records [input, output] pairs for the JIT.

// Two caches (inputs 0 and 2 of 3) returned as results 0 and 1; result 2 is a fresh value
// written straight into its out-param (no copy, untouched).
// CHECK-LABEL: module attributes {lowbit.inplace_results = {{\[}}[0, 0], [2, 1]]}
// CHECK: func.func @forward(%[[K:.+]]: memref<1x2x16x8xf32>, %{{.+}}: memref<1xi64>, %[[V:.+]]: memref<1x2x16x8xf32>, %[[KO:.+]]: memref<1x2x16x8xf32>, %[[VO:.+]]: memref<1x2x16x8xf32>, %{{.+}}: memref<1x2xf32>)
// CHECK: %[[PK:.+]] = memref.extract_aligned_pointer_as_index %[[K]]
// CHECK: %[[PKO:.+]] = memref.extract_aligned_pointer_as_index %[[KO]]
// CHECK: %[[DK:.+]] = arith.cmpi ne, %[[PK]], %[[PKO]] : index
// CHECK: scf.if %[[DK]] {
// CHECK-NEXT: memref.copy %[[K]], %[[KO]]
// CHECK: %[[PV:.+]] = memref.extract_aligned_pointer_as_index %[[V]]
// CHECK: %[[PVO:.+]] = memref.extract_aligned_pointer_as_index %[[VO]]
// CHECK: %[[DV:.+]] = arith.cmpi ne, %[[PV]], %[[PVO]] : index
// CHECK: scf.if %[[DV]] {
// CHECK-NEXT: memref.copy %[[V]], %[[VO]]
// CHECK: return
func.func @forward(%k: memref<1x2x16x8xf32>, %pos: memref<1xi64>, %v: memref<1x2x16x8xf32>,
                   %k_out: memref<1x2x16x8xf32>, %v_out: memref<1x2x16x8xf32>, %y: memref<1x2xf32>)
    attributes {lowbit.num_inputs = 3 : i64} {
  %c0 = arith.constant 0.0 : f32
  linalg.fill ins(%c0 : f32) outs(%y : memref<1x2xf32>)
  memref.copy %k, %k_out : memref<1x2x16x8xf32> to memref<1x2x16x8xf32>
  memref.copy %v, %v_out : memref<1x2x16x8xf32> to memref<1x2x16x8xf32>
  return
}

// -----

// Dynamic shapes (the descriptor calling convention): the same guard.
// CHECK-LABEL: module attributes {lowbit.inplace_results = {{\[}}[0, 0]]}
// CHECK: scf.if
// CHECK-NEXT: memref.copy %arg0, %arg2 : memref<?x16xbf16> to memref<?x16xbf16>
func.func @forward(%c: memref<?x16xbf16>, %n: memref<?xi64>, %c_out: memref<?x16xbf16>) attributes {lowbit.num_inputs = 2 : i64} {
  memref.copy %c, %c_out : memref<?x16xbf16> to memref<?x16xbf16>
  return
}

// -----

// Left alone: no lowbit.num_inputs (not an entry the JIT calls), a private function, a copy
// between two inputs, a copy that is not among the last ops (later code may read the
// out-param), and a copy from an out-param.
// CHECK-LABEL: module {
// CHECK-NOT: lowbit.inplace_results
// CHECK-NOT: scf.if
// CHECK-LABEL: func.func @no_count(
// CHECK: memref.copy %arg0, %arg1
// CHECK-LABEL: func.func private @hidden(
// CHECK: memref.copy %arg0, %arg1
// CHECK-LABEL: func.func @input_to_input(
// CHECK: memref.copy %arg0, %arg1
// CHECK-LABEL: func.func @not_trailing(
// CHECK: memref.copy %arg0, %arg1
// CHECK-NEXT: linalg.fill
// CHECK-LABEL: func.func @from_out_param(
// CHECK: memref.copy %arg1, %arg0
func.func @no_count(%a: memref<4xf32>, %out: memref<4xf32>) {
  memref.copy %a, %out : memref<4xf32> to memref<4xf32>
  return
}
func.func private @hidden(%a: memref<4xf32>, %out: memref<4xf32>) attributes {lowbit.num_inputs = 1 : i64} {
  memref.copy %a, %out : memref<4xf32> to memref<4xf32>
  return
}
func.func @input_to_input(%a: memref<4xf32>, %b: memref<4xf32>) attributes {lowbit.num_inputs = 2 : i64} {
  memref.copy %a, %b : memref<4xf32> to memref<4xf32>
  return
}
func.func @not_trailing(%a: memref<4xf32>, %out: memref<4xf32>, %y: memref<4xf32>) attributes {lowbit.num_inputs = 1 : i64} {
  %c0 = arith.constant 0.0 : f32
  memref.copy %a, %out : memref<4xf32> to memref<4xf32>
  linalg.fill ins(%c0 : f32) outs(%y : memref<4xf32>)
  return
}
func.func @from_out_param(%a: memref<4xf32>, %out: memref<4xf32>) attributes {lowbit.num_inputs = 1 : i64} {
  memref.copy %out, %a : memref<4xf32> to memref<4xf32>
  return
}
