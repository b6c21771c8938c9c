// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-guard-traps)' | filecheck %s

// A signed remainder by a run-time divisor: the divisor becomes 1 where it is 0 or where
// INT_MIN is divided by -1, and a zero divisor raises trap bit 0.
// CHECK-LABEL: module attributes {lowbit.traps = ["integer division by zero", "index out of range"]}
// CHECK: memref.global "public" @_mlir_lowbit_traps : memref<i32> = dense<0>
// CHECK-LABEL: func.func @remsi
// CHECK: %[[ZERO:.+]] = arith.cmpi eq, %[[B:.+]], %{{.+}} : i32
// CHECK: %[[MIN:.+]] = arith.cmpi eq, %[[A:.+]], %c-2147483648_i32 : i32
// CHECK: %[[NEG:.+]] = arith.cmpi eq, %[[B]], %c-1_i32 : i32
// CHECK: %[[OVF:.+]] = arith.andi %[[MIN]], %[[NEG]]
// CHECK: %[[BAD:.+]] = arith.ori %[[ZERO]], %[[OVF]]
// CHECK: %[[SAFE:.+]] = arith.select %[[BAD]], %c1_i32, %[[B]] : i32
// CHECK: scf.if %[[ZERO]] {
// CHECK:   %[[FLAG:.+]] = memref.get_global @_mlir_lowbit_traps
// CHECK:   memref.atomic_rmw ori %{{.+}}, %[[FLAG]][]
// CHECK: }
// CHECK: arith.remsi %[[A]], %[[SAFE]] : i32
#map = affine_map<(d0) -> (d0)>
func.func @remsi(%a: memref<7xi32>, %b: memref<7xi32>, %o: memref<7xi32>) {
  linalg.generic {indexing_maps = [#map, #map, #map], iterator_types = ["parallel"]} ins(%a, %b : memref<7xi32>, memref<7xi32>) outs(%o : memref<7xi32>) {
  ^bb0(%x: i32, %y: i32, %z: i32):
    %q = arith.remsi %x, %y : i32
    linalg.yield %q : i32
  }
  return
}

// -----

// Unsigned division: only a zero divisor is replaced (no overflow case); i8 edge width.
// CHECK-LABEL: func.func @divui
// CHECK: %[[ZERO:.+]] = arith.cmpi eq, %[[B:.+]], %{{.+}} : i8
// CHECK-NOT: arith.andi
// CHECK: %[[SAFE:.+]] = arith.select %[[ZERO]], %{{.+}}, %[[B]] : i8
// CHECK: arith.divui %{{.+}}, %[[SAFE]] : i8
func.func @divui(%a: i8, %b: i8) -> i8 {
  %q = arith.divui %a, %b : i8
  return %q : i8
}

// -----

// Constant divisors other than 0 and -1 cannot trap: nothing to guard.
// CHECK-LABEL: func.func @constant_divisor
// CHECK-NOT: arith.select
// CHECK: arith.floordivsi %arg0, %c7_i64
// CHECK: arith.ceildivsi %arg1, %cst
// CHECK-NOT: memref.atomic_rmw
// CHECK: return
func.func @constant_divisor(%a: i64, %v: vector<4xi64>) -> (i64, vector<4xi64>) {
  %c7 = arith.constant 7 : i64
  %cst = arith.constant dense<3> : vector<4xi64>
  %q = arith.floordivsi %a, %c7 : i64
  %r = arith.ceildivsi %v, %cst : vector<4xi64>
  return %q, %r : i64, vector<4xi64>
}

// -----

// A constant -1 divisor is guarded for INT_MIN; a vector divisor raises through an or-reduction.
// CHECK-LABEL: func.func @minus_one_and_vector
// CHECK: arith.select
// CHECK: arith.divsi %arg0, %{{.+}} : i16
// CHECK: %[[Z:.+]] = arith.cmpi eq, %arg2, %{{.+}} : vector<8xi16>
// CHECK: %[[ANY:.+]] = vector.reduction <or>, %[[Z]] : vector<8xi1> into i1
// CHECK: scf.if %[[ANY]]
// CHECK: arith.remsi %arg1, %{{.+}} : vector<8xi16>
func.func @minus_one_and_vector(%a: i16, %v: vector<8xi16>, %w: vector<8xi16>) -> (i16, vector<8xi16>) {
  %m1 = arith.constant -1 : i16
  %q = arith.divsi %a, %m1 : i16
  %r = arith.remsi %v, %w : vector<8xi16>
  return %q, %r : i16, vector<8xi16>
}

// -----

// A data-dependent load in a generic body (embedding) with torch-mlir's asserts: the asserts
// raise their own bits (2, 3) instead of aborting, and the load only happens in range.
// CHECK-LABEL: module attributes {lowbit.traps = ["integer division by zero", "index out of range", "index must be smaller than dim size", "index must be larger or equal to 0"]}
// CHECK-LABEL: func.func @embedding
// CHECK-NOT: cf.assert
// CHECK: %[[OK:.+]] = arith.xori %{{.+}}, %true
// CHECK: scf.if %[[OK]] {
// CHECK: memref.atomic_rmw ori %c4_i32
// CHECK: memref.atomic_rmw ori %c8_i32
// CHECK: %[[IN0:.+]] = arith.cmpi ult, %[[I:.+]], %c10
// CHECK: %[[IN1:.+]] = arith.cmpi ult, %{{.+}}, %c4
// CHECK: %[[BOTH:.+]] = arith.andi %[[IN0]], %[[IN1]]
// CHECK: %[[V:.+]] = scf.if %[[BOTH]] -> (f32) {
// CHECK:   %[[L:.+]] = memref.load %arg1[%[[I]], %{{.+}}]
// CHECK:   scf.yield %[[L]]
// CHECK: } else {
// CHECK:   memref.atomic_rmw ori %c2_i32
// CHECK:   scf.yield %cst
// CHECK: linalg.yield %[[V]] : f32
#map0 = affine_map<(d0, d1) -> (d0)>
#map1 = affine_map<(d0, d1) -> (d0, d1)>
func.func @embedding(%idx: memref<3xi64>, %w: memref<10x4xf32>, %o: memref<3x4xf32>) {
  %c10 = arith.constant 10 : index
  %c0_i64 = arith.constant 0 : i64
  linalg.generic {indexing_maps = [#map0, #map1], iterator_types = ["parallel", "parallel"]} ins(%idx : memref<3xi64>) outs(%o : memref<3x4xf32>) {
  ^bb0(%in: i64, %out: f32):
    %0 = arith.index_cast %in : i64 to index
    %1 = linalg.index 1 : index
    %2 = arith.cmpi slt, %0, %c10 : index
    cf.assert %2, "index must be smaller than dim size"
    %3 = arith.cmpi sge, %in, %c0_i64 : i64
    cf.assert %3, "index must be larger or equal to 0"
    %4 = memref.load %w[%0, %1] : memref<10x4xf32>
    linalg.yield %4 : f32
  }
  return
}

// -----

// Asserts and loads outside generic bodies (shape checks) are left alone.
// CHECK-LABEL: func.func @outside
// CHECK: cf.assert %arg0, "shape mismatch"
// CHECK: memref.load %arg1[%arg2] : memref<?xf32>
func.func @outside(%c: i1, %m: memref<?xf32>, %i: index) -> f32 {
  cf.assert %c, "shape mismatch"
  %v = memref.load %m[%i] : memref<?xf32>
  return %v : f32
}

// -----

// A vectorized gather (what lowbit-vectorize makes of index_select) on a dynamic memref:
// lanes outside the element count are disabled and raise bit 1.
// CHECK-LABEL: func.func @gather
// CHECK: %[[D0:.+]] = memref.dim %arg0, %c0
// CHECK: %[[POS:.+]] = arith.addi %{{.+}}, %{{.+}} : vector<4xindex>
// CHECK: %[[IN:.+]] = arith.cmpi ult, %[[POS]], %{{.+}} : vector<4xindex>
// CHECK: %[[EN:.+]] = arith.andi %arg2, %[[IN]] : vector<4xi1>
// CHECK: vector.reduction <or>
// CHECK: memref.atomic_rmw ori %c2_i32
// CHECK: vector.gather %arg0[%c0{{.*}}, %c0{{.*}}] [%arg1], %[[EN]], %arg3
func.func @gather(%m: memref<?x4xf32>, %lanes: vector<4xindex>, %mask: vector<4xi1>, %pass: vector<4xf32>) -> vector<4xf32> {
  %c0 = arith.constant 0 : index
  %g = vector.gather %m[%c0, %c0] [%lanes], %mask, %pass : memref<?x4xf32>, vector<4xindex>, vector<4xi1>, vector<4xf32> into vector<4xf32>
  return %g : vector<4xf32>
}

// -----

// An assert tagged lowbit.trap outside any generic (lowbit-convert-index-put's row loop, whose
// failing path rewrites a row as it is): raises the bit of its message, "index out of range"
// (bit 1, an IndexError), and the loop goes on.
// CHECK-LABEL: module attributes {lowbit.traps = ["integer division by zero", "index out of range"]}
// CHECK-LABEL: func.func @tagged
// CHECK-NOT: cf.assert
// CHECK: scf.for
// CHECK: %[[FAILED:.+]] = arith.xori %{{.+}}, %true
// CHECK: scf.if %[[FAILED]]
// CHECK: memref.atomic_rmw ori %c2_i32
func.func @tagged(%m: memref<?xi64>, %n: index) {
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %c8 = arith.constant 8 : i64
  scf.for %t = %c0 to %n step %c1 {
    %v = memref.load %m[%t] : memref<?xi64>
    %ok = arith.cmpi slt, %v, %c8 : i64
    cf.assert %ok, "index out of range" {lowbit.trap}
  }
  return
}
