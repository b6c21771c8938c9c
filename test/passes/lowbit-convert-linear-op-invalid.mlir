// RUN: not lowbit-opt %s --pass-pipeline='builtin.module(lowbit-convert-linear-op)' 2>&1 | filecheck %s

// Corrupt data: ternary code 3 (byte 0xFF) is not a value of the format.
// CHECK: corrupt packed weight
func.func @corrupt(%arg0: !torch.vtensor<[2,8],f32>) -> !torch.vtensor<[2,4],f32> {
  %0 = torch.vtensor.literal(dense<[[255, 152], [73, 64], [10, 154], [37, 128]]> : tensor<4x2xui8>) : !torch.vtensor<[4,2],ui8>
  %1 = torch.vtensor.literal(dense<0.5> : tensor<1x1xf32>) : !torch.vtensor<[1,1],f32>
  %none = torch.constant.none
  %str = torch.constant.str "ternary"
  %str_0 = torch.constant.str "tensor"
  %int0 = torch.constant.int 0
  %int8 = torch.constant.int 8
  %int4 = torch.constant.int 4
  %str_1 = torch.constant.str "none"
  %3 = torch.operator "torch.lowbit.linear"(%arg0, %0, %1, %none, %none, %str, %str_0, %int0, %int8, %int4, %str_1, %int0) : (!torch.vtensor<[2,8],f32>, !torch.vtensor<[4,2],ui8>, !torch.vtensor<[1,1],f32>, !torch.none, !torch.none, !torch.str, !torch.str, !torch.int, !torch.int, !torch.int, !torch.str, !torch.int) -> !torch.vtensor<[2,4],f32>
  return %3 : !torch.vtensor<[2,4],f32>
}
