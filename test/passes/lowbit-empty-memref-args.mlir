// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-empty-memref-args)' | filecheck %s
// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-empty-memref-args, finalize-memref-to-llvm, convert-func-to-llvm{use-bare-ptr-memref-call-conv=1}, convert-to-llvm, reconcile-unrealized-casts)' | filecheck %s --check-prefix=LLVM

// A zero-element memref argument with an identity layout (`memref<5x0xf32>`) has no static
// strides for MLIR, so the bare-pointer convention did not apply to the function, which
// then expected descriptors while the JIT passes one pointer per tensor (a crash at run
// time). Its type gets a static strided layout; its uses read an empty alloca instead.

// CHECK-LABEL: func.func @forward
// CHECK-SAME: (%[[A:.*]]: memref<5x0xf32, strided<[1, 1]>>, %[[B:.*]]: memref<5xf32>, %[[C:.*]]: memref<2x0x3xf32, strided<[3, 3, 1]>>, %[[D:.*]]: memref<7xf32>)
// CHECK-DAG: %[[E:.*]] = memref.alloca() : memref<5x0xf32>
// CHECK-DAG: memref.alloca() : memref<2x0x3xf32>
// CHECK: memref.copy %[[E]], %[[E]]
// CHECK-NOT: %[[A]]
// LLVM-LABEL: llvm.func @forward
// LLVM-SAME: (%{{.*}}: !llvm.ptr, %{{.*}}: !llvm.ptr, %{{.*}}: !llvm.ptr, %{{.*}}: !llvm.ptr)
func.func @forward(%arg0: memref<5x0xf32>, %arg1: memref<5xf32>, %arg2: memref<2x0x3xf32>, %arg3: memref<7xf32>) {
  %cst = arith.constant 0.000000e+00 : f32
  %c0 = arith.constant 0 : index
  memref.store %cst, %arg1[%c0] : memref<5xf32>
  memref.copy %arg0, %arg0 : memref<5x0xf32> to memref<5x0xf32>
  return
}

// -----

// Private functions (called from inside the module) and non-empty memrefs are unchanged.
// CHECK-LABEL: func.func private @helper
// CHECK-SAME: memref<5x0xf32>)
// CHECK-LABEL: func.func @dense
// CHECK-SAME: memref<5x2xf32>)
func.func private @helper(%arg0: memref<5x0xf32>) {
  return
}
func.func @dense(%arg0: memref<5x2xf32>) {
  return
}
