// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-contiguous-call-operands)' | filecheck %s

// lowbit-contiguous-call-operands, right after one-shot bufferization: a strided view cast to
// the identity layout for a kernel function is copied into a fresh identity buffer (inputs
// before the call, the output after it). Minimized from a Hugging Face static cache read up to
// the current length (LOWBIT_DUMP_IR=<dir>, 04-bufferize.mlir).

// Keys/values: rows 0..n of a 32-slot cache (row stride 512): copied in; q is an identity
// buffer (no copy); the output too.
// CHECK-LABEL: func.func @prefill(
// CHECK-SAME: %[[Q:[^:]+]]: memref<1x4x?x16xf32>, %[[K:[^:]+]]: memref<1x2x32x16xf32>, %[[N:[^:]+]]: index, %[[O:[^:]+]]: memref<1x4x?x16xf32>)
// CHECK: %[[VIEW:.+]] = memref.subview %[[K]][0, 0, 0, 0] [1, 2, %[[N]], 16]
// CHECK: %[[D:.+]] = memref.dim %[[VIEW]], %c2
// CHECK: %[[FRESH:.+]] = memref.alloc(%[[D]]) : memref<1x2x?x16xf32>
// CHECK: memref.copy %[[VIEW]], %[[FRESH]]
// CHECK: call @lowbit_attention_0(%[[Q]], %[[FRESH]], %[[FRESH2:.+]], %[[O]])
// CHECK-NOT: memref.copy
// CHECK: return
func.func @prefill(%q: memref<1x4x?x16xf32>, %k: memref<1x2x32x16xf32>, %n: index, %out: memref<1x4x?x16xf32>) {
  %view = memref.subview %k[0, 0, 0, 0] [1, 2, %n, 16] [1, 1, 1, 1] : memref<1x2x32x16xf32> to memref<1x2x?x16xf32, strided<[1024, 512, 16, 1]>>
  %cast = memref.cast %view : memref<1x2x?x16xf32, strided<[1024, 512, 16, 1]>> to memref<1x2x?x16xf32>
  call @lowbit_attention_0(%q, %cast, %cast, %out) : (memref<1x4x?x16xf32>, memref<1x2x?x16xf32>, memref<1x2x?x16xf32>, memref<1x4x?x16xf32>) -> ()
  return
}
func.func private @lowbit_attention_0(%q: memref<1x4x?x16xf32>, %k: memref<1x2x?x16xf32>, %v: memref<1x2x?x16xf32>, %o: memref<1x4x?x16xf32>) attributes {lowbit.attention = {causal = true, scale = 2.500000e-01 : f64}} {
  return
}

// -----

// The output operand is a strided view: the kernel writes a fresh buffer, copied back after.
// CHECK-LABEL: func.func @strided_output(
// CHECK: %[[VIEW:.+]] = memref.subview %arg1[0, 0] [4, %arg2] [1, 1]
// CHECK: %[[FRESH:.+]] = memref.alloc(%{{.+}}) : memref<4x?xf32>
// CHECK-NOT: memref.copy %[[VIEW]], %[[FRESH]]
// CHECK: call @lowbit_qlinear_0(%arg0, %[[FRESH]])
// CHECK-NEXT: memref.copy %[[FRESH]], %[[VIEW]]
func.func @strided_output(%x: memref<4x16xf32>, %y: memref<4x16xf32>, %n: index) {
  %view = memref.subview %y[0, 0] [4, %n] [1, 1] : memref<4x16xf32> to memref<4x?xf32, strided<[16, 1]>>
  %cast = memref.cast %view : memref<4x?xf32, strided<[16, 1]>> to memref<4x?xf32>
  call @lowbit_qlinear_0(%x, %cast) : (memref<4x16xf32>, memref<4x?xf32>) -> ()
  return
}
func.func private @lowbit_qlinear_0(%x: memref<4x16xf32>, %y: memref<4x?xf32>) attributes {lowbit.qlinear = {}} {
  return
}

// -----

// Left alone: a cast whose static strides are the identity ones, identity operands, and
// calls of functions that are not lowbit kernels.
// CHECK-LABEL: func.func @unchanged(
// CHECK-NOT: memref.alloc
// CHECK-NOT: memref.copy
// CHECK: call @lowbit_qlinear_0(%{{.+}}, %arg1)
// CHECK: call @other(%{{.+}})
func.func @unchanged(%x: memref<4x16xf32>, %y: memref<4x8xf32>, %z: memref<8x16xf32>, %n: index) {
  %view = memref.subview %z[0, 0] [4, 16] [1, 1] : memref<8x16xf32> to memref<4x16xf32, strided<[16, 1]>>
  %cast = memref.cast %view : memref<4x16xf32, strided<[16, 1]>> to memref<4x16xf32>
  call @lowbit_qlinear_0(%cast, %y) : (memref<4x16xf32>, memref<4x8xf32>) -> ()
  %view2 = memref.subview %z[0, 0] [8, %n] [1, 1] : memref<8x16xf32> to memref<8x?xf32, strided<[16, 1]>>
  %cast2 = memref.cast %view2 : memref<8x?xf32, strided<[16, 1]>> to memref<8x?xf32>
  call @other(%cast2) : (memref<8x?xf32>) -> ()
  return
}
func.func private @lowbit_qlinear_0(%x: memref<4x16xf32>, %y: memref<4x8xf32>) attributes {lowbit.qlinear = {}} {
  return
}
func.func private @other(%a: memref<8x?xf32>) {
  return
}
