// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-parallel-copy)' | filecheck %s
// RUN: not lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-parallel-copy{tasks=1})' 2>&1 >/dev/null | filecheck %s --check-prefix=ERR

// ERR: lowbit-parallel-copy: min-bytes must be >= 1 and tasks >= 2, got 262144 and 1

// A dynamic copy into half of a concatenation buffer (RoPE's rotate_half after
// bufferization): the copy becomes a call of a helper that splits dimension 1 (the first
// one that is not 1) into at most 16 row blocks on an scf.forall when the copy has at least
// 256 KiB and two rows to split at run time, and copies serially otherwise.
// CHECK-LABEL: func.func @rotate_half(
// CHECK-SAME: %[[A:[^:]+]]: memref<1x16x?x64xf32>
// CHECK: %[[HALF:.+]] = memref.subview
// CHECK-NOT: memref.copy
// CHECK: call @lowbit_parallel_copy_0(%[[A]], %[[HALF]]) : (memref<1x16x?x64xf32>, memref<1x16x?x64xf32, strided<[?, ?, 128, 1], offset: 64>>) -> ()
// CHECK: func.func private @lowbit_parallel_copy_0(%[[S:[^:]+]]: memref<1x16x?x64xf32>, %[[D:[^:]+]]: memref<1x16x?x64xf32, strided<[?, ?, 128, 1], offset: 64>>)
// CHECK-DAG: %[[MIN:.+]] = arith.constant 262144 : index
// CHECK-DAG: %[[ROWS:.+]] = arith.constant 16 : index
// CHECK: %[[BIG:.+]] = arith.cmpi uge, %{{.+}}, %[[MIN]] : index
// CHECK: scf.if
// CHECK: %[[CHUNK:.+]] = arith.ceildivui %[[ROWS]], %{{.+}} : index
// CHECK: scf.forall (%[[T:.+]]) in (%{{.+}}) {
// CHECK: %[[O:.+]] = arith.muli %[[T]], %[[CHUNK]] : index
// CHECK: %[[LEN:.+]] = arith.minui
// CHECK: %[[SS:.+]] = memref.subview %[[S]][0, %[[O]], 0, 0] [1, %[[LEN]], %{{.+}}, 64] [1, 1, 1, 1] : memref<1x16x?x64xf32> to memref<1x?x?x64xf32, strided<[?, ?, 64, 1], offset: ?>>
// CHECK: %[[DS:.+]] = memref.subview %[[D]][0, %[[O]], 0, 0] [1, %[[LEN]], %{{.+}}, 64] [1, 1, 1, 1] : memref<1x16x?x64xf32, strided<[?, ?, 128, 1], offset: 64>> to memref<1x?x?x64xf32, strided<[?, ?, 128, 1], offset: ?>>
// CHECK: memref.copy %[[SS]], %[[DS]]
// CHECK: } else {
// CHECK: memref.copy %[[S]], %[[D]] : memref<1x16x?x64xf32> to memref<1x16x?x64xf32, strided<[?, ?, 128, 1], offset: 64>>
func.func @rotate_half(%a: memref<1x16x?x64xf32>, %b: memref<1x16x?x128xf32>) {
  %c2 = arith.constant 2 : index
  %n = memref.dim %a, %c2 : memref<1x16x?x64xf32>
  %s = memref.subview %b[0, 0, 0, 64] [1, 16, %n, 64] [1, 1, 1, 1] : memref<1x16x?x128xf32> to memref<1x16x?x64xf32, strided<[?, ?, 128, 1], offset: 64>>
  memref.copy %a, %s : memref<1x16x?x64xf32> to memref<1x16x?x64xf32, strided<[?, ?, 128, 1], offset: 64>>
  return
}

// -----

// Static copies: 512 x 256 f32 (512 KiB) is split on dimension 0; two copies of the same
// types share one helper. 64 x 1024 bf16 (128 KiB) is below the threshold and stays.
// CHECK-LABEL: func.func @static_copies(
// CHECK: call @lowbit_parallel_copy_0(
// CHECK: call @lowbit_parallel_copy_0(
// CHECK: memref.copy %{{.+}}, %{{.+}} : memref<64x1024xbf16> to memref<64x1024xbf16>
// CHECK: func.func private @lowbit_parallel_copy_0(%{{.+}}: memref<512x256xf32>, %{{.+}}: memref<512x256xf32>)
// CHECK: scf.forall
// CHECK: memref.subview %{{.+}}[%{{.+}}, 0] [%{{.+}}, 256] [1, 1] : memref<512x256xf32> to memref<?x256xf32, strided<[256, 1], offset: ?>>
// CHECK-NOT: func.func private @lowbit_parallel_copy_1
func.func @static_copies(%a: memref<512x256xf32>, %b: memref<512x256xf32>, %c: memref<512x256xf32>, %d: memref<64x1024xbf16>, %e: memref<64x1024xbf16>) {
  memref.copy %a, %b : memref<512x256xf32> to memref<512x256xf32>
  memref.copy %a, %c : memref<512x256xf32> to memref<512x256xf32>
  memref.copy %d, %e : memref<64x1024xbf16> to memref<64x1024xbf16>
  return
}

// -----

// Negative: a copy inside an scf.forall (its threads are busy), a copy between two views
// of one buffer (the row blocks could overlap), and a copy with no dimension to split.
// CHECK-LABEL: func.func @left_alone(
// CHECK-NOT: call @lowbit_parallel_copy
// CHECK: scf.forall
// CHECK: memref.copy %{{.+}}, %{{.+}} : memref<?x4096xf32> to memref<?x4096xf32>
// CHECK: memref.copy %{{.+}}, %{{.+}} : memref<1024x1024xf32, strided<[2048, 1]>> to memref<1024x1024xf32, strided<[2048, 1], offset: 1024>>
// CHECK: memref.copy %{{.+}}, %{{.+}} : memref<1x1x1xf32> to memref<1x1x1xf32>
// CHECK-NOT: func.func private @lowbit_parallel_copy
func.func @left_alone(%a: memref<?x4096xf32>, %b: memref<?x4096xf32>, %w: memref<1024x2048xf32>, %u: memref<1x1x1xf32>, %v: memref<1x1x1xf32>) {
  scf.forall (%i) in (2) {
    memref.copy %a, %b : memref<?x4096xf32> to memref<?x4096xf32>
  }
  %l = memref.subview %w[0, 0] [1024, 1024] [1, 1] : memref<1024x2048xf32> to memref<1024x1024xf32, strided<[2048, 1]>>
  %r = memref.subview %w[0, 1024] [1024, 1024] [1, 1] : memref<1024x2048xf32> to memref<1024x1024xf32, strided<[2048, 1], offset: 1024>>
  memref.copy %l, %r : memref<1024x1024xf32, strided<[2048, 1]>> to memref<1024x1024xf32, strided<[2048, 1], offset: 1024>>
  memref.copy %u, %v : memref<1x1x1xf32> to memref<1x1x1xf32>
  return
}

// -----

// Edge: a 1-D dynamic copy of index values (8 bytes each) is split on its only dimension;
// a helper name already taken in the module is skipped.
// CHECK-LABEL: func.func @one_dim(
// CHECK: call @lowbit_parallel_copy_1(
// CHECK: func.func private @lowbit_parallel_copy_0()
// CHECK: func.func private @lowbit_parallel_copy_1(%{{.+}}: memref<?xindex>, %{{.+}}: memref<?xindex>)
// CHECK: arith.constant 8 : index
// CHECK: memref.subview %{{.+}}[%{{.+}}] [%{{.+}}] [1] : memref<?xindex> to memref<?xindex, strided<[1], offset: ?>>
func.func @one_dim(%a: memref<?xindex>, %b: memref<?xindex>) {
  memref.copy %a, %b : memref<?xindex> to memref<?xindex>
  return
}
func.func private @lowbit_parallel_copy_0() {
  return
}
