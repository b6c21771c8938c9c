// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-convert-attention)' | filecheck %s

// lowbit-convert-attention: `torch.lowbit.attention` (lowbit.compiler.attention_op; what a
// supported F.scaled_dot_product_attention becomes) turns into a call of a private function
// with a placeholder body, which lowbit-lower-attention replaces after bufferization by the
// runtime's fused kernel. Inputs minimized from LOWBIT_DUMP_IR=<dir> (00-import.mlir).

// Static shapes, a [T, S] boolean mask: the call passes q, k, v, the mask and a fresh out
// tensor; the function records scale and causal and its body reads every input.
// CHECK-LABEL: func.func @static_mask(
// CHECK-NOT: torch.operator
// CHECK: %[[Q:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[1,4,3,16],f32> -> tensor<1x4x3x16xf32>
// CHECK: %[[K:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[1,4,10,16],f32> -> tensor<1x4x10x16xf32>
// CHECK: %[[V:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[1,4,10,16],f32> -> tensor<1x4x10x16xf32>
// CHECK: %[[M:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[3,10],i1> -> tensor<3x10xi1>
// CHECK: %[[E:.+]] = tensor.empty() : tensor<1x4x3x16xf32>
// CHECK: %[[R:.+]] = call @lowbit_attention_0(%[[Q]], %[[K]], %[[V]], %[[M]], %[[E]])
// CHECK: torch_c.from_builtin_tensor %[[R]] : tensor<1x4x3x16xf32> -> !torch.vtensor<[1,4,3,16],f32>
// CHECK: func.func private @lowbit_attention_0(%[[AQ:.+]]: tensor<1x4x3x16xf32>, %[[AK:.+]]: tensor<1x4x10x16xf32>, %[[AV:.+]]: tensor<1x4x10x16xf32>, %[[AM:.+]]: tensor<3x10xi1>, %[[AO:.+]]: tensor<1x4x3x16xf32>) -> tensor<1x4x3x16xf32>
// CHECK-SAME: lowbit.attention = {causal = false, scale = 2.500000e-01 : f64}
// CHECK-SAME: no_inline
// CHECK-DAG: tensor.extract %[[AQ]]
// CHECK-DAG: tensor.extract %[[AK]]
// CHECK-DAG: tensor.extract %[[AV]]
// CHECK-DAG: tensor.extract %[[AM]]
// CHECK: linalg.fill ins(%{{.+}} : f32) outs(%[[AO]] : tensor<1x4x3x16xf32>)
func.func @static_mask(%q: !torch.vtensor<[1,4,3,16],f32>, %k: !torch.vtensor<[1,4,10,16],f32>, %v: !torch.vtensor<[1,4,10,16],f32>, %m: !torch.vtensor<[3,10],i1>) -> !torch.vtensor<[1,4,3,16],f32> {
  %scale = torch.constant.float 2.500000e-01
  %false = torch.constant.bool false
  %0 = torch.operator "torch.lowbit.attention"(%q, %k, %v, %m, %scale, %false) : (!torch.vtensor<[1,4,3,16],f32>, !torch.vtensor<[1,4,10,16],f32>, !torch.vtensor<[1,4,10,16],f32>, !torch.vtensor<[3,10],i1>, !torch.float, !torch.bool) -> !torch.vtensor<[1,4,3,16],f32>
  return %0 : !torch.vtensor<[1,4,3,16],f32>
}

// -----

// Shape-generic bf16 GQA (8 query heads over 2 kv heads), causal, no mask: the mask operand
// is dropped, the out tensor takes B and T from q at run time.
// CHECK-LABEL: func.func @dynamic_gqa_causal(
// CHECK: %[[Q:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[?,8,?,64],bf16> -> tensor<?x8x?x64xbf16>
// CHECK: %[[K:.+]] = torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[?,2,?,64],bf16> -> tensor<?x2x?x64xbf16>
// CHECK: %[[V:.+]] = torch_c.to_builtin_tensor
// CHECK: %[[B:.+]] = tensor.dim %[[Q]], %c0
// CHECK: %[[T:.+]] = tensor.dim %[[Q]], %c2
// CHECK: %[[E:.+]] = tensor.empty(%[[B]], %[[T]]) : tensor<?x8x?x64xbf16>
// CHECK: call @lowbit_attention_0(%[[Q]], %[[K]], %[[V]], %[[E]]) : (tensor<?x8x?x64xbf16>, tensor<?x2x?x64xbf16>, tensor<?x2x?x64xbf16>, tensor<?x8x?x64xbf16>) -> tensor<?x8x?x64xbf16>
// CHECK: func.func private @lowbit_attention_0(
// CHECK-SAME: lowbit.attention = {causal = true, scale = 1.250000e-01 : f64}
// CHECK: arith.extf
// CHECK: arith.truncf
// CHECK: linalg.fill
func.func @dynamic_gqa_causal(%q: !torch.vtensor<[?,8,?,64],bf16>, %k: !torch.vtensor<[?,2,?,64],bf16>, %v: !torch.vtensor<[?,2,?,64],bf16>) -> !torch.vtensor<[?,8,?,64],bf16> {
  %none = torch.constant.none
  %scale = torch.constant.float 1.250000e-01
  %true = torch.constant.bool true
  %0 = torch.operator "torch.lowbit.attention"(%q, %k, %v, %none, %scale, %true) : (!torch.vtensor<[?,8,?,64],bf16>, !torch.vtensor<[?,2,?,64],bf16>, !torch.vtensor<[?,2,?,64],bf16>, !torch.none, !torch.float, !torch.bool) -> !torch.vtensor<[?,8,?,64],bf16>
  return %0 : !torch.vtensor<[?,8,?,64],bf16>
}

// -----

// Edge shapes: a 4-D [B, 1, T, S] mask with dynamic dims, T = 1 (decode); and a 0-d mask.
// CHECK-LABEL: func.func @mask4d_decode(
// CHECK: torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[?,1,?,?],i1> -> tensor<?x1x?x?xi1>
// CHECK: call @lowbit_attention_0(
// CHECK-LABEL: func.func @mask0d(
// CHECK: torch_c.to_builtin_tensor %{{.+}} : !torch.vtensor<[],i1> -> tensor<i1>
// CHECK: call @lowbit_attention_1(
// CHECK: func.func private @lowbit_attention_0(%{{.+}}: tensor<?x4x1x32xf32>, %{{.+}}: tensor<?x4x?x32xf32>, %{{.+}}: tensor<?x4x?x32xf32>, %[[M4:.+]]: tensor<?x1x?x?xi1>,
// CHECK: tensor.extract %[[M4]][%c0, %c0, %c0, %c0] : tensor<?x1x?x?xi1>
// CHECK: func.func private @lowbit_attention_1(%{{.+}}: tensor<1x1x2x8xf32>, %{{.+}}: tensor<1x1x5x8xf32>, %{{.+}}: tensor<1x1x5x8xf32>, %[[M0:.+]]: tensor<i1>,
// CHECK: tensor.extract %[[M0]][] : tensor<i1>
func.func @mask4d_decode(%q: !torch.vtensor<[?,4,1,32],f32>, %k: !torch.vtensor<[?,4,?,32],f32>, %v: !torch.vtensor<[?,4,?,32],f32>, %m: !torch.vtensor<[?,1,?,?],i1>) -> !torch.vtensor<[?,4,1,32],f32> {
  %scale = torch.constant.float 0.17677669529663687
  %false = torch.constant.bool false
  %0 = torch.operator "torch.lowbit.attention"(%q, %k, %v, %m, %scale, %false) : (!torch.vtensor<[?,4,1,32],f32>, !torch.vtensor<[?,4,?,32],f32>, !torch.vtensor<[?,4,?,32],f32>, !torch.vtensor<[?,1,?,?],i1>, !torch.float, !torch.bool) -> !torch.vtensor<[?,4,1,32],f32>
  return %0 : !torch.vtensor<[?,4,1,32],f32>
}
func.func @mask0d(%q: !torch.vtensor<[1,1,2,8],f32>, %k: !torch.vtensor<[1,1,5,8],f32>, %v: !torch.vtensor<[1,1,5,8],f32>, %m: !torch.vtensor<[],i1>) -> !torch.vtensor<[1,1,2,8],f32> {
  %scale = torch.constant.float 1.000000e+00
  %false = torch.constant.bool false
  %0 = torch.operator "torch.lowbit.attention"(%q, %k, %v, %m, %scale, %false) : (!torch.vtensor<[1,1,2,8],f32>, !torch.vtensor<[1,1,5,8],f32>, !torch.vtensor<[1,1,5,8],f32>, !torch.vtensor<[],i1>, !torch.float, !torch.bool) -> !torch.vtensor<[1,1,2,8],f32>
  return %0 : !torch.vtensor<[1,1,2,8],f32>
}

// -----

// Left alone (the partitioner runs the op's eager implementation): a scale that is not a
// constant, f16, a dynamic head count, 6 query heads over 4 kv heads, a float mask.
// CHECK-LABEL: func.func @not_converted(
// CHECK-COUNT-5: torch.operator "torch.lowbit.attention"
// CHECK-NOT: call @lowbit_attention
// CHECK-NOT: func.func private @lowbit_attention
func.func @not_converted(%q: !torch.vtensor<[1,4,3,16],f32>, %k: !torch.vtensor<[1,4,10,16],f32>, %s: !torch.float,
                         %qh: !torch.vtensor<[1,4,3,16],f16>, %kh: !torch.vtensor<[1,4,10,16],f16>,
                         %qd: !torch.vtensor<[1,?,3,16],f32>, %kd: !torch.vtensor<[1,?,10,16],f32>,
                         %q6: !torch.vtensor<[1,6,3,16],f32>, %mf: !torch.vtensor<[3,10],f32>) {
  %none = torch.constant.none
  %scale = torch.constant.float 2.500000e-01
  %false = torch.constant.bool false
  %0 = torch.operator "torch.lowbit.attention"(%q, %k, %k, %none, %s, %false) : (!torch.vtensor<[1,4,3,16],f32>, !torch.vtensor<[1,4,10,16],f32>, !torch.vtensor<[1,4,10,16],f32>, !torch.none, !torch.float, !torch.bool) -> !torch.vtensor<[1,4,3,16],f32>
  %1 = torch.operator "torch.lowbit.attention"(%qh, %kh, %kh, %none, %scale, %false) : (!torch.vtensor<[1,4,3,16],f16>, !torch.vtensor<[1,4,10,16],f16>, !torch.vtensor<[1,4,10,16],f16>, !torch.none, !torch.float, !torch.bool) -> !torch.vtensor<[1,4,3,16],f16>
  %2 = torch.operator "torch.lowbit.attention"(%qd, %kd, %kd, %none, %scale, %false) : (!torch.vtensor<[1,?,3,16],f32>, !torch.vtensor<[1,?,10,16],f32>, !torch.vtensor<[1,?,10,16],f32>, !torch.none, !torch.float, !torch.bool) -> !torch.vtensor<[1,?,3,16],f32>
  %3 = torch.operator "torch.lowbit.attention"(%q6, %k, %k, %none, %scale, %false) : (!torch.vtensor<[1,6,3,16],f32>, !torch.vtensor<[1,4,10,16],f32>, !torch.vtensor<[1,4,10,16],f32>, !torch.none, !torch.float, !torch.bool) -> !torch.vtensor<[1,6,3,16],f32>
  %4 = torch.operator "torch.lowbit.attention"(%q, %k, %k, %mf, %scale, %false) : (!torch.vtensor<[1,4,3,16],f32>, !torch.vtensor<[1,4,10,16],f32>, !torch.vtensor<[1,4,10,16],f32>, !torch.vtensor<[3,10],f32>, !torch.float, !torch.bool) -> !torch.vtensor<[1,4,3,16],f32>
  return
}

// -----

// Keys and values repeated per query head (Llama's / transformers' repeat_kv: unsqueeze(2),
// expand, clone, view; 8 query heads over 2 kv heads): the call reads the [1, 2, S, D]
// cache itself, once per kv head, instead of the copy. A view straight of the expand (no
// clone) and _unsafe_view are the same form.
// CHECK-LABEL: func.func @repeated_kv(
// CHECK-SAME: %[[K:[a-z0-9]+]]: !torch.vtensor<[1,2,64,32],f32>, %[[V:[a-z0-9]+]]: !torch.vtensor<[1,2,64,32],f32>
// CHECK: torch_c.to_builtin_tensor %[[K]] : !torch.vtensor<[1,2,64,32],f32> -> tensor<1x2x64x32xf32>
// CHECK: torch_c.to_builtin_tensor %[[V]] : !torch.vtensor<[1,2,64,32],f32> -> tensor<1x2x64x32xf32>
// CHECK: call @lowbit_attention_0({{.+}}) : (tensor<1x8x1x32xf32>, tensor<1x2x64x32xf32>, tensor<1x2x64x32xf32>, tensor<1x64xi1>, tensor<1x8x1x32xf32>)
func.func @repeated_kv(%q: !torch.vtensor<[1,8,1,32],f32>, %k: !torch.vtensor<[1,2,64,32],f32>, %v: !torch.vtensor<[1,2,64,32],f32>, %m: !torch.vtensor<[1,64],i1>) -> !torch.vtensor<[1,8,1,32],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %int4 = torch.constant.int 4
  %int8 = torch.constant.int 8
  %int32 = torch.constant.int 32
  %int64 = torch.constant.int 64
  %false = torch.constant.bool false
  %scale = torch.constant.float 0.17677669529663687
  %e5 = torch.prim.ListConstruct %int1, %int2, %int4, %int64, %int32 : (!torch.int, !torch.int, !torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %s4 = torch.prim.ListConstruct %int1, %int8, %int64, %int32 : (!torch.int, !torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %ku = torch.aten.unsqueeze %k, %int2 : !torch.vtensor<[1,2,64,32],f32>, !torch.int -> !torch.vtensor<[1,2,1,64,32],f32>
  %ke = torch.aten.expand %ku, %e5, %false : !torch.vtensor<[1,2,1,64,32],f32>, !torch.list<int>, !torch.bool -> !torch.vtensor<[1,2,4,64,32],f32>
  %kc = torch.aten.clone %ke, %int0 : !torch.vtensor<[1,2,4,64,32],f32>, !torch.int -> !torch.vtensor<[1,2,4,64,32],f32>
  %kr = torch.aten.view %kc, %s4 : !torch.vtensor<[1,2,4,64,32],f32>, !torch.list<int> -> !torch.vtensor<[1,8,64,32],f32>
  %vu = torch.aten.unsqueeze %v, %int2 : !torch.vtensor<[1,2,64,32],f32>, !torch.int -> !torch.vtensor<[1,2,1,64,32],f32>
  %ve = torch.aten.expand %vu, %e5, %false : !torch.vtensor<[1,2,1,64,32],f32>, !torch.list<int>, !torch.bool -> !torch.vtensor<[1,2,4,64,32],f32>
  %vr = torch.aten._unsafe_view %ve, %s4 : !torch.vtensor<[1,2,4,64,32],f32>, !torch.list<int> -> !torch.vtensor<[1,8,64,32],f32>
  %0 = torch.operator "torch.lowbit.attention"(%q, %kr, %vr, %m, %scale, %false) : (!torch.vtensor<[1,8,1,32],f32>, !torch.vtensor<[1,8,64,32],f32>, !torch.vtensor<[1,8,64,32],f32>, !torch.vtensor<[1,64],i1>, !torch.float, !torch.bool) -> !torch.vtensor<[1,8,1,32],f32>
  return %0 : !torch.vtensor<[1,8,1,32],f32>
}

// -----

// Repeats that are not the per-head form keep the expanded operands (H kv heads): the
// unsqueeze on dim 1 (heads repeated as blocks, not per head), an expand that also
// broadcasts the batch, a dynamic S, and k in the form while v is not.
// CHECK-LABEL: func.func @not_repeated_kv(
// CHECK-COUNT-4: call @lowbit_attention_{{[0-9]+}}({{.+}}) : (tensor<{{[0-9?]+}}x8x1x32xf32>, tensor<{{[0-9?]+}}x8x{{[0-9?]+}}x32xf32>, tensor<{{[0-9?]+}}x8x{{[0-9?]+}}x32xf32>
func.func @not_repeated_kv(%q: !torch.vtensor<[1,8,1,32],f32>, %q2: !torch.vtensor<[2,8,1,32],f32>, %k: !torch.vtensor<[1,2,64,32],f32>, %kd: !torch.vtensor<[1,2,?,32],f32>, %qd: !torch.vtensor<[1,8,1,32],f32>, %plain: !torch.vtensor<[1,8,64,32],f32>) {
  %none = torch.constant.none
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %int4 = torch.constant.int 4
  %int8 = torch.constant.int 8
  %int32 = torch.constant.int 32
  %int64 = torch.constant.int 64
  %intm1 = torch.constant.int -1
  %false = torch.constant.bool false
  %scale = torch.constant.float 0.17677669529663687
  // unsqueeze(1): [1, 1, 2, 64, 32] -> expand [1, 4, 2, 64, 32] -> view [1, 8, 64, 32]
  %b5 = torch.prim.ListConstruct %int1, %int4, %int2, %int64, %int32 : (!torch.int, !torch.int, !torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %s4 = torch.prim.ListConstruct %int1, %int8, %int64, %int32 : (!torch.int, !torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %bu = torch.aten.unsqueeze %k, %int1 : !torch.vtensor<[1,2,64,32],f32>, !torch.int -> !torch.vtensor<[1,1,2,64,32],f32>
  %be = torch.aten.expand %bu, %b5, %false : !torch.vtensor<[1,1,2,64,32],f32>, !torch.list<int>, !torch.bool -> !torch.vtensor<[1,4,2,64,32],f32>
  %br = torch.aten.view %be, %s4 : !torch.vtensor<[1,4,2,64,32],f32>, !torch.list<int> -> !torch.vtensor<[1,8,64,32],f32>
  %0 = torch.operator "torch.lowbit.attention"(%q, %br, %br, %none, %scale, %false) : (!torch.vtensor<[1,8,1,32],f32>, !torch.vtensor<[1,8,64,32],f32>, !torch.vtensor<[1,8,64,32],f32>, !torch.none, !torch.float, !torch.bool) -> !torch.vtensor<[1,8,1,32],f32>
  // batch broadcast: [1, 2, 1, 64, 32] -> [2, 2, 4, 64, 32]
  %c5 = torch.prim.ListConstruct %int2, %int2, %int4, %int64, %int32 : (!torch.int, !torch.int, !torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %c4 = torch.prim.ListConstruct %int2, %int8, %int64, %int32 : (!torch.int, !torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %cu = torch.aten.unsqueeze %k, %int2 : !torch.vtensor<[1,2,64,32],f32>, !torch.int -> !torch.vtensor<[1,2,1,64,32],f32>
  %ce = torch.aten.expand %cu, %c5, %false : !torch.vtensor<[1,2,1,64,32],f32>, !torch.list<int>, !torch.bool -> !torch.vtensor<[2,2,4,64,32],f32>
  %cr = torch.aten.view %ce, %c4 : !torch.vtensor<[2,2,4,64,32],f32>, !torch.list<int> -> !torch.vtensor<[2,8,64,32],f32>
  %1 = torch.operator "torch.lowbit.attention"(%q2, %cr, %cr, %none, %scale, %false) : (!torch.vtensor<[2,8,1,32],f32>, !torch.vtensor<[2,8,64,32],f32>, !torch.vtensor<[2,8,64,32],f32>, !torch.none, !torch.float, !torch.bool) -> !torch.vtensor<[2,8,1,32],f32>
  // dynamic S
  %d5 = torch.prim.ListConstruct %int1, %int2, %int4, %intm1, %int32 : (!torch.int, !torch.int, !torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %d4 = torch.prim.ListConstruct %int1, %int8, %intm1, %int32 : (!torch.int, !torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %du = torch.aten.unsqueeze %kd, %int2 : !torch.vtensor<[1,2,?,32],f32>, !torch.int -> !torch.vtensor<[1,2,1,?,32],f32>
  %de = torch.aten.expand %du, %d5, %false : !torch.vtensor<[1,2,1,?,32],f32>, !torch.list<int>, !torch.bool -> !torch.vtensor<[1,2,4,?,32],f32>
  %dr = torch.aten.view %de, %d4 : !torch.vtensor<[1,2,4,?,32],f32>, !torch.list<int> -> !torch.vtensor<[1,8,?,32],f32>
  %2 = torch.operator "torch.lowbit.attention"(%qd, %dr, %dr, %none, %scale, %false) : (!torch.vtensor<[1,8,1,32],f32>, !torch.vtensor<[1,8,?,32],f32>, !torch.vtensor<[1,8,?,32],f32>, !torch.none, !torch.float, !torch.bool) -> !torch.vtensor<[1,8,1,32],f32>
  // k repeated per head, v an ordinary 8-head tensor
  %e5 = torch.prim.ListConstruct %int1, %int2, %int4, %int64, %int32 : (!torch.int, !torch.int, !torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %ku = torch.aten.unsqueeze %k, %int2 : !torch.vtensor<[1,2,64,32],f32>, !torch.int -> !torch.vtensor<[1,2,1,64,32],f32>
  %ke = torch.aten.expand %ku, %e5, %false : !torch.vtensor<[1,2,1,64,32],f32>, !torch.list<int>, !torch.bool -> !torch.vtensor<[1,2,4,64,32],f32>
  %kr = torch.aten.view %ke, %s4 : !torch.vtensor<[1,2,4,64,32],f32>, !torch.list<int> -> !torch.vtensor<[1,8,64,32],f32>
  %3 = torch.operator "torch.lowbit.attention"(%q, %kr, %plain, %none, %scale, %false) : (!torch.vtensor<[1,8,1,32],f32>, !torch.vtensor<[1,8,64,32],f32>, !torch.vtensor<[1,8,64,32],f32>, !torch.none, !torch.float, !torch.bool) -> !torch.vtensor<[1,8,1,32],f32>
  return
}
