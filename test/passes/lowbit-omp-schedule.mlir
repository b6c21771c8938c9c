// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(scf-forall-to-parallel, convert-scf-to-openmp, lowbit-omp-schedule)' | filecheck %s
// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(scf-forall-to-parallel, convert-scf-to-openmp, lowbit-omp-schedule{kind=guided kernels=lowbit_qquant_act})' | filecheck %s --check-prefix=OPT
// RUN: not lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-omp-schedule{kind=auto})' 2>&1 >/dev/null | filecheck %s --check-prefix=ERR

// lowbit-omp-schedule on the OpenMP loops convert-scf-to-openmp makes of scf.forall.
// ERR: lowbit-omp-schedule: kind must be one of static, dynamic, guided, not 'auto'

// A loop over weight-panel tasks (lowbit-lower-qlinear's N tiles, the kernel call inside
// an M loop): dynamic schedule.
// CHECK-LABEL: func.func @qgemm_tasks
// CHECK: omp.parallel
// CHECK: omp.wsloop schedule(dynamic)
// CHECK: scf.for
// CHECK: call @lowbit_qgemm_invoke
// OPT-LABEL: func.func @qgemm_tasks
// OPT-NOT: schedule(
// OPT: call @lowbit_qgemm_invoke
func.func private @lowbit_qgemm_invoke(i64, i64) -> i32
func.func @qgemm_tasks(%h: i64, %tiles: index, %mt: index) {
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  scf.forall (%t) in (%tiles) {
    scf.for %i = %c0 to %mt step %c1 {
      %ti = arith.index_cast %t : index to i64
      %rc = func.call @lowbit_qgemm_invoke(%h, %ti) : (i64, i64) -> i32
    }
  }
  return
}

// -----

// Attention units and dense BRGEMM tasks: dynamic too, one wsloop each.
// CHECK-LABEL: func.func @attention_and_brgemm
// CHECK: omp.wsloop schedule(dynamic)
// CHECK: call @lowbit_attention_invoke
// CHECK: omp.wsloop schedule(dynamic)
// CHECK: call @lowbit_brgemm_invoke
func.func private @lowbit_attention_invoke(i64) -> i32
func.func private @lowbit_brgemm_invoke(i64) -> i32
func.func @attention_and_brgemm(%units: index, %n: index) {
  scf.forall (%u) in (%units) {
    %ui = arith.index_cast %u : index to i64
    %rc = func.call @lowbit_attention_invoke(%ui) : (i64) -> i32
  }
  scf.forall (%t) in (%n) {
    %ti = arith.index_cast %t : index to i64
    %rc = func.call @lowbit_brgemm_invoke(%ti) : (i64) -> i32
  }
  return
}

// -----

// Negative: generated code (an elementwise row loop) and a loop calling a runtime function
// that is not a task kernel (the activation quantization's row blocks) keep the static
// default; with `kernels=lowbit_qquant_act` the latter is the one scheduled (guided).
// CHECK-LABEL: func.func @not_tasks
// CHECK-NOT: schedule(
// CHECK: return
// OPT-LABEL: func.func @not_tasks
// OPT: omp.wsloop {
// OPT: arith.addf
// OPT: omp.wsloop schedule(guided)
// OPT: call @lowbit_qquant_act
func.func private @lowbit_qquant_act(i64) -> i32
func.func @not_tasks(%a: memref<?xf32>, %n: index) {
  scf.forall (%i) in (%n) {
    %v = memref.load %a[%i] : memref<?xf32>
    %w = arith.addf %v, %v : f32
    memref.store %w, %a[%i] : memref<?xf32>
  }
  scf.forall (%t) in (%n) {
    %ti = arith.index_cast %t : index to i64
    %rc = func.call @lowbit_qquant_act(%ti) : (i64) -> i32
  }
  return
}

// -----

// Edge: a loop that already has a schedule keeps it; nothing to convert leaves the module as it is.
// CHECK-LABEL: func.func @scheduled
// CHECK: omp.wsloop schedule(static)
// CHECK-LABEL: func.func @no_loops
// CHECK-NEXT: return
func.func private @lowbit_qgemm_invoke(i64) -> i32
func.func @scheduled(%n: index, %h: i64) {
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  omp.parallel {
    omp.wsloop schedule(static) {
      omp.loop_nest (%i) : index = (%c0) to (%n) step (%c1) {
        %rc = func.call @lowbit_qgemm_invoke(%h) : (i64) -> i32
        omp.yield
      }
    }
    omp.terminator
  }
  return
}
func.func @no_loops() {
  return
}
