// RUN: not lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-convert-linear-op)' 2>&1 | filecheck %s

// A packed buffer whose size does not match the layout of the declared format, shape and
// kblock (ternary 128x64, kblock 64: 2560 bytes) is an error naming both sizes, not a
// kernel reading past the buffer at run time.
// CHECK: chunk 0: error: lowbit.packed_linear at {{.+}}: packed weight is !torch.vtensor<[2500],si8>, the ternary/tensor{{.*}} layout with kblock 64 needs 2560 int8 bytes
func.func @short_packed(%x: !torch.vtensor<[?,64],f32>, %w: !torch.vtensor<[2500],si8>) -> !torch.vtensor<[?,128],f32> {
  %none = torch.constant.none
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "tensor"
  %int0 = torch.constant.int 0
  %int64 = torch.constant.int 64
  %int128 = torch.constant.int 128
  %str_2 = torch.constant.str "int8"
  %0 = torch.operator "torch.lowbit.packed_linear"(%x, %w, %none, %str, %str_0, %int0, %int64, %int128, %int64, %str_2) : (!torch.vtensor<[?,64],f32>, !torch.vtensor<[2500],si8>, !torch.none, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.int, !torch.str) -> !torch.vtensor<[?,128],f32>
  return %0 : !torch.vtensor<[?,128],f32>
}

// -----

// The right byte count for another kblock (kblock 32 instead of 64 for K = 64) is still
// the wrong layout.
// CHECK: chunk 1: error: lowbit.packed_linear at {{.+}}: packed weight is !torch.vtensor<[2560],si8>, the {{.+}} layout with kblock 32 needs {{[0-9]+}} int8 bytes
func.func @other_kblock(%x: !torch.vtensor<[2,64],f32>, %w: !torch.vtensor<[2560],si8>) -> !torch.vtensor<[2,128],f32> {
  %none = torch.constant.none
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "tensor"
  %int0 = torch.constant.int 0
  %int64 = torch.constant.int 64
  %int128 = torch.constant.int 128
  %int32 = torch.constant.int 32
  %str_2 = torch.constant.str "none"
  %0 = torch.operator "torch.lowbit.packed_linear"(%x, %w, %none, %str, %str_0, %int0, %int64, %int128, %int32, %str_2) : (!torch.vtensor<[2,64],f32>, !torch.vtensor<[2560],si8>, !torch.none, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.int, !torch.str) -> !torch.vtensor<[2,128],f32>
  return %0 : !torch.vtensor<[2,128],f32>
}

// -----

// Packed bytes must be int8: an f32 buffer of the right element count is rejected.
// CHECK: chunk 2: error: lowbit.packed_linear at {{.+}}: packed weight is !torch.vtensor<[2560],f32>
func.func @float_packed(%x: !torch.vtensor<[2,64],f32>, %w: !torch.vtensor<[2560],f32>) -> !torch.vtensor<[2,128],f32> {
  %none = torch.constant.none
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "tensor"
  %int0 = torch.constant.int 0
  %int64 = torch.constant.int 64
  %int128 = torch.constant.int 128
  %str_2 = torch.constant.str "none"
  %0 = torch.operator "torch.lowbit.packed_linear"(%x, %w, %none, %str, %str_0, %int0, %int64, %int128, %int64, %str_2) : (!torch.vtensor<[2,64],f32>, !torch.vtensor<[2560],f32>, !torch.none, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.int, !torch.str) -> !torch.vtensor<[2,128],f32>
  return %0 : !torch.vtensor<[2,128],f32>
}
