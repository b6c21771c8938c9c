// The driver runs upstream passes by name and rejects unknown lowbit passes.
// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(canonicalize)' | filecheck %s
// RUN: not lowbit-opt %s --pass-pipeline='builtin.module(lowbit-no-such-pass)' 2>&1 | filecheck %s --check-prefix=UNKNOWN
// RUN: lowbit-opt --list-passes | filecheck %s --check-prefix=LIST

// UNKNOWN: unknown lowbit pass 'lowbit-no-such-pass'
// LIST: lowbit passes

// CHECK-LABEL: func.func @fold_add
// CHECK-NEXT: %[[C:.+]] = arith.constant 3 : i32
// CHECK-NEXT: return %[[C]]
func.func @fold_add() -> i32 {
  %a = arith.constant 1 : i32
  %b = arith.constant 2 : i32
  %c = arith.addi %a, %b : i32
  return %c : i32
}

// -----

// CHECK-LABEL: func.func @second_chunk
func.func @second_chunk(%x: f32) -> f32 {
  return %x : f32
}
