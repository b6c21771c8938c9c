// RUN: lowbit-opt %s --pass-pipeline='builtin.module(lowbit-lower-scalar-transfers)' | filecheck %s

// A 0-d read from a strided view (a column of a wider buffer) becomes a scalar load.
// CHECK-LABEL: func.func @read_strided
// CHECK-SAME: (%[[M:.+]]: memref<1xf32, strided<[114], offset: ?>>, %[[I:.+]]: index)
// CHECK: %[[S:.+]] = memref.load %[[M]][%[[I]]]
// CHECK: %[[V:.+]] = vector.broadcast %[[S]] : f32 to vector<f32>
// CHECK-NOT: vector.transfer_read
// CHECK: return %[[V]]
func.func @read_strided(%m: memref<1xf32, strided<[114], offset: ?>>, %i: index) -> vector<f32> {
  %pad = arith.constant 0.0 : f32
  %v = vector.transfer_read %m[%i], %pad : memref<1xf32, strided<[114], offset: ?>>, vector<f32>
  return %v : vector<f32>
}

// A 0-d write becomes a scalar store.
// CHECK-LABEL: func.func @write_strided
// CHECK: %[[E:.+]] = vector.extract %{{.+}}[] : f32 from vector<f32>
// CHECK: memref.store %[[E]]
// CHECK-NOT: vector.transfer_write
func.func @write_strided(%m: memref<3x4xf32, strided<[8, 2]>>, %v: vector<f32>, %i: index) {
  vector.transfer_write %v, %m[%i, %i] : vector<f32>, memref<3x4xf32, strided<[8, 2]>>
  return
}

// Negative: ordinary 1-D transfers are left to the vector lowering.
// CHECK-LABEL: func.func @vector_read
// CHECK: vector.transfer_read
func.func @vector_read(%m: memref<16xf32>) -> vector<16xf32> {
  %c0 = arith.constant 0 : index
  %pad = arith.constant 0.0 : f32
  %v = vector.transfer_read %m[%c0], %pad {in_bounds = [true]} : memref<16xf32>, vector<16xf32>
  return %v : vector<16xf32>
}

// Shape-generic: a 0-d read from a view with dynamic size, stride and offset.
// CHECK-LABEL: func.func @read_dynamic
// CHECK: %[[S:.+]] = memref.load %{{.+}}[%{{.+}}] : memref<?xf32, strided<[?], offset: ?>>
// CHECK: vector.broadcast %[[S]] : f32 to vector<f32>
// CHECK-NOT: vector.transfer_read
func.func @read_dynamic(%m: memref<?xf32, strided<[?], offset: ?>>, %i: index) -> vector<f32> {
  %pad = arith.constant 0.0 : f32
  %v = vector.transfer_read %m[%i], %pad : memref<?xf32, strided<[?], offset: ?>>, vector<f32>
  return %v : vector<f32>
}
