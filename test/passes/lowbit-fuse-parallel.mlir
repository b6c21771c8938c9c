// RUN: lowbit-opt %s --split-input-file --pass-pipeline='builtin.module(lowbit-fuse-parallel{min-task-elements=4096 max-tasks=8}, canonicalize, cse)' | filecheck %s

// Softmax over 128 rows of 127: max, exp, sum and divide fused into one forall over row
// blocks (127*128/4096 -> 3 tasks of 43 rows), each op once per task.
// CHECK-LABEL: func.func @softmax
// CHECK-SAME: (%[[X:.+]]: tensor<128x127xf32>)
// CHECK: %[[R:.+]] = scf.forall (%[[I:.+]]) in (3) shared_outs(%[[OUT:.+]] = %{{.+}}) -> (tensor<128x127xf32>)
// CHECK:   %[[XS:.+]] = tensor.extract_slice %[[X]][%{{.+}}, 0] [%{{.+}}, 127] [1, 1]
// CHECK:   %[[MAXI:.+]] = linalg.fill
// CHECK:   %[[MAX:.+]] = linalg.generic {{.+}} ins(%[[XS]] : tensor<?x127xf32>) outs(%[[MAXI]] : tensor<?xf32>)
// CHECK:     arith.maximumf
// CHECK:   %[[EXP:.+]] = linalg.generic {{.+}} ins(%[[XS]], %[[MAX]] : tensor<?x127xf32>, tensor<?xf32>)
// CHECK:     math.exp
// CHECK:   %[[SUMI:.+]] = linalg.fill
// CHECK:   %[[SUM:.+]] = linalg.generic {{.+}} ins(%[[EXP]] : tensor<?x127xf32>) outs(%[[SUMI]] : tensor<?xf32>)
// CHECK:   %[[DIV:.+]] = linalg.generic {{.+}} ins(%[[EXP]], %[[SUM]] : tensor<?x127xf32>, tensor<?xf32>)
// CHECK:     arith.divf
// CHECK:   scf.forall.in_parallel
// CHECK:     tensor.parallel_insert_slice %[[DIV]] into %[[OUT]]
// CHECK-NOT: linalg.generic
// CHECK: return %[[R]]
#id = affine_map<(d0, d1) -> (d0, d1)>
#row = affine_map<(d0, d1) -> (d0)>
func.func @softmax(%x: tensor<128x127xf32>) -> tensor<128x127xf32> {
  %ninf = arith.constant 0xFF800000 : f32
  %zero = arith.constant 0.0 : f32
  %e1 = tensor.empty() : tensor<128xf32>
  %m0 = linalg.fill ins(%ninf : f32) outs(%e1 : tensor<128xf32>) -> tensor<128xf32>
  %m = linalg.generic {indexing_maps = [#id, #row], iterator_types = ["parallel", "reduction"]}
      ins(%x : tensor<128x127xf32>) outs(%m0 : tensor<128xf32>) {
  ^bb0(%in: f32, %out: f32):
    %r = arith.maximumf %in, %out : f32
    linalg.yield %r : f32
  } -> tensor<128xf32>
  %e2 = tensor.empty() : tensor<128x127xf32>
  %ex = linalg.generic {indexing_maps = [#id, #row, #id], iterator_types = ["parallel", "parallel"]}
      ins(%x, %m : tensor<128x127xf32>, tensor<128xf32>) outs(%e2 : tensor<128x127xf32>) {
  ^bb0(%in: f32, %mx: f32, %out: f32):
    %d = arith.subf %in, %mx : f32
    %r = math.exp %d : f32
    linalg.yield %r : f32
  } -> tensor<128x127xf32>
  %s0 = linalg.fill ins(%zero : f32) outs(%e1 : tensor<128xf32>) -> tensor<128xf32>
  %s = linalg.generic {indexing_maps = [#id, #row], iterator_types = ["parallel", "reduction"]}
      ins(%ex : tensor<128x127xf32>) outs(%s0 : tensor<128xf32>) {
  ^bb0(%in: f32, %out: f32):
    %r = arith.addf %in, %out : f32
    linalg.yield %r : f32
  } -> tensor<128xf32>
  %y = linalg.generic {indexing_maps = [#id, #row, #id], iterator_types = ["parallel", "parallel"]}
      ins(%ex, %s : tensor<128x127xf32>, tensor<128xf32>) outs(%e2 : tensor<128x127xf32>) {
  ^bb0(%in: f32, %sm: f32, %out: f32):
    %r = arith.divf %in, %sm : f32
    linalg.yield %r : f32
  } -> tensor<128x127xf32>
  return %y : tensor<128x127xf32>
}

// -----

// A producer whose result is also returned is not fused (it would be computed twice),
// and a 1-D op is split into aligned chunks: 17 * 4097 elements -> 8 tasks of 8768.
// CHECK-LABEL: func.func @shared_producer
// CHECK: %[[P:.+]] = scf.forall (%{{.+}}) in (8)
// CHECK:   arith.mulf
// CHECK: %[[C:.+]] = scf.forall (%{{.+}}) in (8)
// CHECK:   arith.addf
// CHECK: return %[[P]], %[[C]]
#v = affine_map<(d0) -> (d0)>
func.func @shared_producer(%a: tensor<69649xf32>) -> (tensor<69649xf32>, tensor<69649xf32>) {
  %e = tensor.empty() : tensor<69649xf32>
  %p = linalg.generic {indexing_maps = [#v, #v], iterator_types = ["parallel"]} ins(%a : tensor<69649xf32>) outs(%e : tensor<69649xf32>) {
  ^bb0(%in: f32, %out: f32):
    %r = arith.mulf %in, %in : f32
    linalg.yield %r : f32
  } -> tensor<69649xf32>
  %c = linalg.generic {indexing_maps = [#v, #v], iterator_types = ["parallel"]} ins(%p : tensor<69649xf32>) outs(%e : tensor<69649xf32>) {
  ^bb0(%in: f32, %out: f32):
    %r = arith.addf %in, %in : f32
    linalg.yield %r : f32
  } -> tensor<69649xf32>
  return %p, %c : tensor<69649xf32>, tensor<69649xf32>
}

// -----

// Negative: too little work for two tasks (decode: one row of 4096), and a producer
// broadcast along the tiled rows (every task would need all of it) stays outside.
// CHECK-LABEL: func.func @small
// CHECK-NOT: scf.forall
// CHECK: return
#r2 = affine_map<(d0, d1) -> (d0, d1)>
func.func @small(%x: tensor<1x4095xf32>) -> tensor<1x4095xf32> {
  %e = tensor.empty() : tensor<1x4095xf32>
  %y = linalg.generic {indexing_maps = [#r2, #r2], iterator_types = ["parallel", "parallel"]} ins(%x : tensor<1x4095xf32>) outs(%e : tensor<1x4095xf32>) {
  ^bb0(%in: f32, %out: f32):
    %r = arith.negf %in : f32
    linalg.yield %r : f32
  } -> tensor<1x4095xf32>
  return %y : tensor<1x4095xf32>
}

// CHECK-LABEL: func.func @broadcast_producer
// CHECK: %[[W:.+]] = linalg.generic {{.+}} ins(%{{.+}} : tensor<4096xbf16>)
// CHECK:   arith.extf
// CHECK: scf.forall
// CHECK:   linalg.generic {{.+}} ins(%{{.+}}, %[[W]] : tensor<{{.+}}x4096xf32>, tensor<4096xf32>)
#col = affine_map<(d0, d1) -> (d1)>
#vec = affine_map<(d0) -> (d0)>
func.func @broadcast_producer(%x: tensor<64x4096xf32>, %w: tensor<4096xbf16>) -> tensor<64x4096xf32> {
  %ew = tensor.empty() : tensor<4096xf32>
  %wf = linalg.generic {indexing_maps = [#vec, #vec], iterator_types = ["parallel"]} ins(%w : tensor<4096xbf16>) outs(%ew : tensor<4096xf32>) {
  ^bb0(%in: bf16, %out: f32):
    %r = arith.extf %in : bf16 to f32
    linalg.yield %r : f32
  } -> tensor<4096xf32>
  %e = tensor.empty() : tensor<64x4096xf32>
  %y = linalg.generic {indexing_maps = [#r2, #col, #r2], iterator_types = ["parallel", "parallel"]} ins(%x, %wf : tensor<64x4096xf32>, tensor<4096xf32>) outs(%e : tensor<64x4096xf32>) {
  ^bb0(%in: f32, %s: f32, %out: f32):
    %r = arith.mulf %in, %s : f32
    linalg.yield %r : f32
  } -> tensor<64x4096xf32>
  return %y : tensor<64x4096xf32>
}

// -----

// Dynamic rows (a shape-generic token count): planned as if T = dynamic-extent (128):
// 128 * 1024 / 4096 -> 8 tasks of 16 rows; the block of 16 rows stays fixed, so the forall
// runs ceil(T / 16) tasks at run time and the last one takes the tail (affine.min).
// With fewer rows than two tasks' worth (2 * 4096 / 1024 = 8: decode's T = 1) the group
// runs without a forall, as a static compile of that size would: an OpenMP region costs
// more than one row. Both versions are there, chosen at run time by scf.if.
// CHECK-LABEL: func.func @softmax_dyn
// CHECK-SAME: (%[[X:.+]]: tensor<?x1024xf32>)
// CHECK: %[[T:.+]] = tensor.dim %[[X]], %c0
// CHECK: %[[BIG:.+]] = arith.cmpi sge, %[[T]], %c8 : index
// CHECK: %[[R:.+]] = scf.if %[[BIG]] -> (tensor<?x1024xf32>) {
// CHECK:   %[[N:.+]] = affine.apply #{{.+}}()[%[[T]]]
// CHECK:   scf.forall (%[[I:.+]]) in (%[[N]]) shared_outs(%{{.+}} = %{{.+}}) -> (tensor<?x1024xf32>)
// CHECK:     %[[OFF:.+]] = affine.apply #{{.+}}(%[[I]])
// CHECK:     %[[SZ:.+]] = affine.min #{{.+}}(%[[I]])[%[[T]]]
// CHECK:     tensor.extract_slice %[[X]][%[[OFF]], 0] [%[[SZ]], 1024] [1, 1]
// CHECK:     linalg.fill
// CHECK:     arith.maximumf
// CHECK:     math.exp
// CHECK:     scf.forall.in_parallel
// CHECK: } else {
// CHECK-NOT: scf.forall
// CHECK:   linalg.fill
// CHECK:   arith.maximumf
// CHECK:   math.exp
// CHECK:   scf.yield
// CHECK: }
// CHECK: return %[[R]]
#id = affine_map<(d0, d1) -> (d0, d1)>
#row = affine_map<(d0, d1) -> (d0)>
func.func @softmax_dyn(%x: tensor<?x1024xf32>) -> tensor<?x1024xf32> {
  %c0 = arith.constant 0 : index
  %t = tensor.dim %x, %c0 : tensor<?x1024xf32>
  %ninf = arith.constant 0xFF800000 : f32
  %e1 = tensor.empty(%t) : tensor<?xf32>
  %m0 = linalg.fill ins(%ninf : f32) outs(%e1 : tensor<?xf32>) -> tensor<?xf32>
  %m = linalg.generic {indexing_maps = [#id, #row], iterator_types = ["parallel", "reduction"]}
      ins(%x : tensor<?x1024xf32>) outs(%m0 : tensor<?xf32>) {
  ^bb0(%in: f32, %out: f32):
    %r = arith.maximumf %in, %out : f32
    linalg.yield %r : f32
  } -> tensor<?xf32>
  %e2 = tensor.empty(%t) : tensor<?x1024xf32>
  %y = linalg.generic {indexing_maps = [#id, #row, #id], iterator_types = ["parallel", "parallel"]}
      ins(%x, %m : tensor<?x1024xf32>, tensor<?xf32>) outs(%e2 : tensor<?x1024xf32>) {
  ^bb0(%in: f32, %mx: f32, %out: f32):
    %d = arith.subf %in, %mx : f32
    %r = math.exp %d : f32
    linalg.yield %r : f32
  } -> tensor<?x1024xf32>
  return %y : tensor<?x1024xf32>
}

// -----

// Attention scores [heads, T, S] with T dynamic: heads are split first (tile 1), then the
// dynamic rows in fixed blocks: 4 * 128 * 256 / 4096 -> 8 tasks = 4 heads x 2 -> 64 rows.
// CHECK-LABEL: func.func @heads_dyn
// CHECK: arith.cmpi sge, %{{.+}}, %c8
// CHECK: scf.if
// CHECK: scf.forall (%{{.+}}, %{{.+}}) in (4, %{{.+}}) shared_outs
// CHECK:   affine.min
// CHECK:   tensor.extract_slice %{{.+}}[%{{.+}}, %{{.+}}, 0] [1, %{{.+}}, 256] [1, 1, 1] : tensor<4x?x256xf32> to tensor<1x?x256xf32>
// CHECK:   arith.mulf
#id3 = affine_map<(d0, d1, d2) -> (d0, d1, d2)>
func.func @heads_dyn(%x: tensor<4x?x256xf32>) -> tensor<4x?x256xf32> {
  %c1 = arith.constant 1 : index
  %t = tensor.dim %x, %c1 : tensor<4x?x256xf32>
  %e = tensor.empty(%t) : tensor<4x?x256xf32>
  %y = linalg.generic {indexing_maps = [#id3, #id3], iterator_types = ["parallel", "parallel", "parallel"]}
      ins(%x : tensor<4x?x256xf32>) outs(%e : tensor<4x?x256xf32>) {
  ^bb0(%in: f32, %out: f32):
    %r = arith.mulf %in, %in : f32
    linalg.yield %r : f32
  } -> tensor<4x?x256xf32>
  return %y : tensor<4x?x256xf32>
}

// -----

// Negative: a dynamic dim with a tiny static row (16 elements): even at T = 128 there is
// not enough work for two tasks, so the op stays sequential.
// CHECK-LABEL: func.func @narrow_dyn
// CHECK-NOT: scf.forall
// CHECK: linalg.generic
#n2 = affine_map<(d0, d1) -> (d0, d1)>
func.func @narrow_dyn(%x: tensor<?x16xf32>) -> tensor<?x16xf32> {
  %c0 = arith.constant 0 : index
  %t = tensor.dim %x, %c0 : tensor<?x16xf32>
  %e = tensor.empty(%t) : tensor<?x16xf32>
  %y = linalg.generic {indexing_maps = [#n2, #n2], iterator_types = ["parallel", "parallel"]}
      ins(%x : tensor<?x16xf32>) outs(%e : tensor<?x16xf32>) {
  ^bb0(%in: f32, %out: f32):
    %r = arith.negf %in : f32
    linalg.yield %r : f32
  } -> tensor<?x16xf32>
  return %y : tensor<?x16xf32>
}

// -----

// A fill with a dynamic dim (the zero init of an attention-score matmul) gets the
// small-extent sequential path too (its extent is read from the fill's init).
// CHECK-LABEL: func.func @fill_dyn
// CHECK: %[[T:.+]] = tensor.dim %{{.+}}, %c1 : tensor<16x?x256xf32>
// CHECK: arith.cmpi sge, %[[T]], %c2 : index
// CHECK: scf.if
// CHECK:   scf.forall
// CHECK:     linalg.fill
// CHECK: } else {
// CHECK:   linalg.fill
func.func @fill_dyn(%e: tensor<16x?x256xf32>) -> tensor<16x?x256xf32> {
  %zero = arith.constant 0.0 : f32
  %f = linalg.fill ins(%zero : f32) outs(%e : tensor<16x?x256xf32>) -> tensor<16x?x256xf32>
  return %f : tensor<16x?x256xf32>
}
