// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-legalize-vector-memory)' | filecheck %s

// A masked bf16 store moves its data as i16 (LLVM's x86 ISel aborts on the bf16 form).
// CHECK-LABEL: llvm.func @store_bf16
// CHECK-SAME: (%[[V:.+]]: vector<64xbf16>, %[[P:.+]]: !llvm.ptr, %[[M:.+]]: vector<64xi1>)
// CHECK: %[[I:.+]] = llvm.bitcast %[[V]] : vector<64xbf16> to vector<64xi16>
// CHECK: llvm.intr.masked.store %[[I]], %[[P]], %[[M]] {alignment = 2 : i32} : vector<64xi16>, vector<64xi1> into !llvm.ptr
// CHECK-NOT: bf16> into
llvm.func @store_bf16(%v: vector<64xbf16>, %p: !llvm.ptr, %m: vector<64xi1>) {
  llvm.intr.masked.store %v, %p, %m {alignment = 2 : i32} : vector<64xbf16>, vector<64xi1> into !llvm.ptr
  llvm.return
}

// -----

// Loads convert the pass-through value in and the result back out.
// CHECK-LABEL: llvm.func @load_f16
// CHECK-SAME: (%[[P:.+]]: !llvm.ptr, %[[M:.+]]: vector<4xi1>, %[[PT:.+]]: vector<4xf16>)
// CHECK: %[[PTI:.+]] = llvm.bitcast %[[PT]] : vector<4xf16> to vector<4xi16>
// CHECK: %[[L:.+]] = llvm.intr.masked.load %[[P]], %[[M]], %[[PTI]] {alignment = 2 : i32} : (!llvm.ptr, vector<4xi1>, vector<4xi16>) -> vector<4xi16>
// CHECK: %[[R:.+]] = llvm.bitcast %[[L]] : vector<4xi16> to vector<4xf16>
// CHECK: llvm.return %[[R]] : vector<4xf16>
llvm.func @load_f16(%p: !llvm.ptr, %m: vector<4xi1>, %pt: vector<4xf16>) -> vector<4xf16> {
  %r = llvm.intr.masked.load %p, %m, %pt {alignment = 2 : i32} : (!llvm.ptr, vector<4xi1>, vector<4xf16>) -> vector<4xf16>
  llvm.return %r : vector<4xf16>
}

// -----

// Edge: a one-lane bf16 gather.
// CHECK-LABEL: llvm.func @gather_bf16
// CHECK: llvm.intr.masked.gather %{{.+}}, %{{.+}}, %{{.+}} {alignment = 2 : i32} : (vector<1x!llvm.ptr>, vector<1xi1>, vector<1xi16>) -> vector<1xi16>
// CHECK: llvm.bitcast %{{.+}} : vector<1xi16> to vector<1xbf16>
llvm.func @gather_bf16(%p: vector<1x!llvm.ptr>, %m: vector<1xi1>, %pt: vector<1xbf16>) -> vector<1xbf16> {
  %r = llvm.intr.masked.gather %p, %m, %pt {alignment = 2 : i32} : (vector<1x!llvm.ptr>, vector<1xi1>, vector<1xbf16>) -> vector<1xbf16>
  llvm.return %r : vector<1xbf16>
}

// -----

// Bool vectors: memory holds a byte per element, so loads read i8 lanes and truncate,
// stores extend to i8 (LLVM would pack <64 x i1> into 8 bytes).
// CHECK-LABEL: llvm.func @bool_load_store
// CHECK-SAME: (%[[P:.+]]: !llvm.ptr, %[[Q:.+]]: !llvm.ptr)
// CHECK: %[[B:.+]] = llvm.load %[[P]] {alignment = 1 : i64} : !llvm.ptr -> vector<64xi8>
// CHECK: %[[M:.+]] = llvm.trunc %[[B]] : vector<64xi8> to vector<64xi1>
// CHECK: %[[W:.+]] = llvm.zext %[[M]] : vector<64xi1> to vector<64xi8>
// CHECK: llvm.store %[[W]], %[[Q]] {alignment = 1 : i64} : vector<64xi8>, !llvm.ptr
// CHECK: llvm.return %[[M]] : vector<64xi1>
llvm.func @bool_load_store(%p: !llvm.ptr, %q: !llvm.ptr) -> vector<64xi1> {
  %m = llvm.load %p {alignment = 1 : i64} : !llvm.ptr -> vector<64xi1>
  llvm.store %m, %q {alignment = 1 : i64} : vector<64xi1>, !llvm.ptr
  llvm.return %m : vector<64xi1>
}

// -----

// A masked bool load: the i1 *mask* operand stays i1, the data goes through i8.
// CHECK-LABEL: llvm.func @bool_masked_load
// CHECK: %[[PT:.+]] = llvm.zext %{{.+}} : vector<16xi1> to vector<16xi8>
// CHECK: %[[L:.+]] = llvm.intr.masked.load %{{.+}}, %{{.+}}, %[[PT]] {alignment = 1 : i32} : (!llvm.ptr, vector<16xi1>, vector<16xi8>) -> vector<16xi8>
// CHECK: llvm.trunc %[[L]] : vector<16xi8> to vector<16xi1>
llvm.func @bool_masked_load(%p: !llvm.ptr, %m: vector<16xi1>, %pt: vector<16xi1>) -> vector<16xi1> {
  %r = llvm.intr.masked.load %p, %m, %pt {alignment = 1 : i32} : (!llvm.ptr, vector<16xi1>, vector<16xi1>) -> vector<16xi1>
  llvm.return %r : vector<16xi1>
}

// -----

// Negative: f32 data, scalar bools and scalar bf16 are left alone.
// CHECK-LABEL: llvm.func @untouched
// CHECK-NOT: llvm.bitcast
// CHECK-NOT: llvm.zext
// CHECK: llvm.intr.masked.store %{{.+}} : vector<16xf32>, vector<16xi1> into !llvm.ptr
// CHECK: llvm.load %{{.+}} : !llvm.ptr -> bf16
// CHECK: llvm.load %{{.+}} : !llvm.ptr -> i1
llvm.func @untouched(%v: vector<16xf32>, %p: !llvm.ptr, %m: vector<16xi1>) -> bf16 {
  llvm.intr.masked.store %v, %p, %m {alignment = 4 : i32} : vector<16xf32>, vector<16xi1> into !llvm.ptr
  %l = llvm.load %p {alignment = 2 : i64} : !llvm.ptr -> bf16
  %b = llvm.load %p : !llvm.ptr -> i1
  llvm.return %l : bf16
}
