// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-math-approx, canonicalize, cse)' | filecheck %s
// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-math-approx{functions=tanh}, canonicalize)' | filecheck %s --check-prefix=ONLY-TANH

// exp on a vector becomes a polynomial and exponent-field arithmetic: no libm call left.
// CHECK-LABEL: func.func @exp_vector
// CHECK-SAME: (%[[X:.+]]: vector<17xf32>)
// CHECK-NOT: math.exp
// CHECK: math.roundeven %{{.+}} : vector<17xf32>
// CHECK: math.fma
// CHECK: arith.shli %{{.+}} : vector<17xi32>
// CHECK: arith.bitcast %{{.+}} : vector<17xi32> to vector<17xf32>
// CHECK: %[[NAN:.+]] = arith.cmpf uno, %[[X]], %[[X]] : vector<17xf32>
// CHECK: %[[R:.+]] = arith.select %[[NAN]], %[[X]], %{{.+}} : vector<17xi1>, vector<17xf32>
// CHECK: return %[[R]]
// ONLY-TANH-LABEL: func.func @exp_vector
// ONLY-TANH: math.exp
func.func @exp_vector(%x: vector<17xf32>) -> vector<17xf32> {
  %y = math.exp %x : vector<17xf32>
  return %y : vector<17xf32>
}

// -----

// bf16 tanh and erf (scalar, as in a linalg.generic body) are computed in f32, rounded once.
// CHECK-LABEL: func.func @bf16_scalar
// CHECK-SAME: (%[[X:.+]]: bf16)
// CHECK: %[[XF:.+]] = arith.extf %[[X]] : bf16 to f32
// CHECK-NOT: math.tanh
// CHECK-NOT: math.erf
// CHECK: %[[T:.+]] = arith.truncf %{{.+}} : f32 to bf16
// CHECK: %[[E:.+]] = arith.truncf %{{.+}} : f32 to bf16
// CHECK: return %[[T]], %[[E]]
// ONLY-TANH-LABEL: func.func @bf16_scalar
// ONLY-TANH-NOT: math.tanh
// ONLY-TANH: math.erf
func.func @bf16_scalar(%x: bf16) -> (bf16, bf16) {
  %t = math.tanh %x : bf16
  %e = math.erf %x : bf16
  return %t, %e : bf16, bf16
}

// -----

// x ** 3 with a constant exponent becomes two multiplications; x ** -2 a reciprocal.
// CHECK-LABEL: func.func @fpowi
// CHECK-SAME: (%[[X:.+]]: f32)
// CHECK-NOT: math.fpowi
// CHECK: %[[SQ:.+]] = arith.mulf %[[X]], %[[X]] : f32
// CHECK: %[[CUBE:.+]] = arith.mulf %[[X]], %[[SQ]] : f32
// CHECK: %[[INV:.+]] = arith.divf %{{.+}}, %[[SQ]] : f32
// CHECK: return %[[CUBE]], %[[INV]]
func.func @fpowi(%x: f32) -> (f32, f32) {
  %c3 = arith.constant 3 : i64
  %cm2 = arith.constant -2 : i64
  %y = math.fpowi %x, %c3 : f32, i64
  %z = math.fpowi %x, %cm2 : f32, i64
  return %y, %z : f32, f32
}

// -----

// Negative: f64 math, other functions and a non-constant exponent are left alone.
// CHECK-LABEL: func.func @untouched
// CHECK: math.exp %{{.+}} : f64
// CHECK: math.sin %{{.+}} : f32
// CHECK: math.fpowi
func.func @untouched(%x: f64, %y: f32, %n: i32) -> (f64, f32, f32) {
  %a = math.exp %x : f64
  %b = math.sin %y : f32
  %c = math.fpowi %y, %n : f32, i32
  return %a, %b, %c : f64, f32, f32
}

// -----

// Shape-generic: exp in the body of a generic on a dynamic tensor is replaced too.
// CHECK-LABEL: func.func @exp_dynamic_body
// CHECK: linalg.generic
// CHECK-NOT: math.exp
// CHECK: math.fma
// CHECK: } -> tensor<?xf32>
// ONLY-TANH-LABEL: func.func @exp_dynamic_body
// ONLY-TANH: math.exp
func.func @exp_dynamic_body(%x: tensor<?xf32>, %e: tensor<?xf32>) -> tensor<?xf32> {
  %y = linalg.generic {indexing_maps = [affine_map<(d0) -> (d0)>, affine_map<(d0) -> (d0)>], iterator_types = ["parallel"]} ins(%x : tensor<?xf32>) outs(%e : tensor<?xf32>) {
  ^bb0(%in: f32, %out: f32):
    %r = math.exp %in : f32
    linalg.yield %r : f32
  } -> tensor<?xf32>
  return %y : tensor<?xf32>
}
