"""lowbit-lower-qlinear: replace bufferized qlinear bodies by microkernel calls.

Matches each `@lowbit_qlinear_*` function after bufferization (signature
`(memref<MxK>, memref<MxN>)`, attributes `lowbit.tiles` and `lowbit.packed`) and replaces
its reference body by:

    [int8]  lowbit_qquant_act(x -> xq, per-token scales, per-K-block row sums)
                                                  in blocks of rows on threads (scf.forall)
                                                  when M is more than one block; xq's rows
                                                  lowbit_qgemm_act_stride(Kp) bytes apart
            h = lowbit_qgemm_dispatch(...)        one per (M tail?, N tail?) tile shape,
                                                  hoisted out of the loops
            scf.forall (%nt) in (N tiles) {       output-row tiles run on threads
              scf.for %mt in M tiles {            the weight panel stays in cache
                [residual] copy r's tile into y's tile (then hot in cache)
                lowbit_qgemm_invoke(h, x/xq, packed weights, y, offsets, K-block count)
            } }

A fused epilogue (`epilogue` in the spec, lowbit-fuse-qlinear-epilogue) becomes dispatch
flags: the activation (LOWBIT_QF_ACT_*) and, for a residual, LOWBIT_QF_BETA1 on an output
tile that the copy above made hold the residual: y = r + act(...), rounded once. Such a
function is `(x, r, y)` after bufferization. Every invoke covers all K-blocks of the
layer (count = number of K-blocks), which the activations need: they are not linear and
must never see a partial K sum.

The kernel arguments are validated at compile time by calling the runtime's dispatch
with the same values; a combination it rejects leaves the reference body in place (it
still computes the layer, on the generic path) and records why in `lowbit.report`.
Pointers cross into the runtime as i64 (`memref.extract_aligned_pointer_as_index`),
which the x86-64 SysV ABI passes exactly like a pointer.
"""
from __future__ import annotations

import ctypes
import dataclasses

from torch_mlir import ir

from lowbit.passes.pack_weights import PACKED_ATTR, dict_attr_values
from lowbit.passes.qlinear import (QLINEAR_ATTR, WEIGHTS_ATTR, add_report_entry, bound_info, declare_functions,
                                   epilogue_from_attr, is_bound, qlinear_functions, spec_from_attr)
from lowbit.passes.registry import ModulePass, PassError, register_pass
from lowbit.passes.tile_qlinear import KERNEL_NB, TILES_ATTR

T_INT8, T_F32, T_BF16 = 1, 2, 3
F_BETA1, F_BIAS = 1, 2
F_AUNIT = 64  # lowbit_qquant_act: activations already int8 values (act_format int8_unit), scale 1
F_ACT = {"relu": 8, "silu": 16, "relu2": 32}  # LOWBIT_QF_ACT_*
_TYPE_CODE = {"f32": T_F32, "bf16": T_BF16}
_ELEM_BYTES = {"f32": 4, "bf16": 2}

DECLARATIONS = {
    "lowbit_qquant_act": "(i32, i64, i64, i64, i64, i64, i32, i64, i64, i64, i64, i64) -> i32",
    "lowbit_qgemm_dispatch": "(i32, i32, i32, i64, i64, i64, i64, i64, i64, i64, i64, i64, i32) -> i64",
    "lowbit_qgemm_invoke": "(i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64) -> i32",
}


@dataclasses.dataclass
class _Kernel:
    m: int
    n: int
    args: tuple


QUANT_TASK_ELEMENTS = 16384  # activations per quantization task (rows x K) on threads


def _emit_quant(emit, m_index: str, spec, k: int, kblock: int, ldq: int, nkb: int, x_elem: str) -> None:
    """`lowbit_qquant_act` of the rows of x (`m_index` of them) into %xqp (rows `ldq` bytes
    apart) / %sxp / %rsp.

    Each row is quantized on its own, so blocks of rows run as an `scf.forall` on the threads
    when there is more than one block (a prefill); one block (a decode step's single row) is
    a plain call, without a parallel region to enter. Serially, this was ~4% of a 128-token
    prefill during which the other thread waited."""
    rows = max(1, -(-QUANT_TASK_ELEMENTS // k))
    decl = DECLARATIONS["lowbit_qquant_act"]
    emit(f"  %xtype = arith.constant {_TYPE_CODE[x_elem]} : i32")
    emit(f"  %qflags = arith.constant {F_AUNIT if spec.act_format == 'int8_unit' else 0} : i32")
    consts = {"k": k, "kb": kblock, "ldq": ldq, "nkb": nkb, "xrow": k * _ELEM_BYTES[x_elem], "rsrow": 4 * nkb,
              "four": 4}
    for key, value in consts.items():
        emit(f"  %q_{key} = arith.constant {value} : i64")
    emit(f"  %q_rows = arith.constant {rows} : index")
    emit(f"  %q_many = arith.cmpi ugt, {m_index}, %q_rows : index")
    emit("  scf.if %q_many {")
    emit(f"    %q_tasks = arith.ceildivui {m_index}, %q_rows : index")
    emit("    scf.forall (%q_t) in (%q_tasks) {")
    emit("      %q_r0_i = arith.muli %q_t, %q_rows : index")
    emit(f"      %q_left = arith.subi {m_index}, %q_r0_i : index")
    emit("      %q_n_i = arith.minui %q_left, %q_rows : index")
    emit("      %q_r0 = arith.index_cast %q_r0_i : index to i64")
    emit("      %q_n = arith.index_cast %q_n_i : index to i64")
    for ptr, stride in (("xp", "%q_xrow"), ("xqp", "%q_ldq"), ("sxp", "%q_four"), ("rsp", "%q_rsrow")):
        emit(f"      %q_{ptr}_off = arith.muli %q_r0, {stride} : i64")
        emit(f"      %q_{ptr} = arith.addi %{ptr}, %q_{ptr}_off : i64")
    emit("      %q_rc = func.call @lowbit_qquant_act(%xtype, %q_xp, %q_n, %q_k, %q_k, %q_kb, %qflags, "
         "%q_xqp, %q_ldq, %q_sxp, %q_rsp, %q_nkb) : " + decl)
    emit("    }")
    emit("  } else {")
    emit(f"    %q_m = arith.index_cast {m_index} : index to i64")
    emit("    %qrc = func.call @lowbit_qquant_act(%xtype, %xp, %q_m, %q_k, %q_k, %q_kb, %qflags, "
         "%xqp, %q_ldq, %sxp, %rsp, %q_nkb) : " + decl)
    emit("  }")


def _memref_shape_elem(t: ir.Type) -> tuple[list[int], str]:
    mt = ir.MemRefType(t)
    return list(mt.shape), str(mt.element_type)


def _dispatch_args(wfmt, atype, ctype, m, n, kblock, lda, ldb, ldc, stride_a, stride_b, ld_aux, flags):
    return (wfmt, atype, ctype, m, n, kblock, lda, ldb, ldc, stride_a, stride_b, ld_aux, flags)


def _check_dispatch(args: tuple) -> int:
    from lowbit.runtime.library import load_runtime
    lib = load_runtime()
    fn = lib.lowbit_qgemm_dispatch
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int32] * 3 + [ctypes.c_int64] * 9 + [ctypes.c_int32]
    return int(fn(*args))


def _act_stride(kp: int) -> int:
    """The runtime's row stride for int8 activations of kp values (lowbit_qgemm_act_stride):
    compiled layers quantize into rows this far apart and dispatch their tiles with it."""
    from lowbit.runtime.qgemm import act_stride
    return act_stride(kp)


@register_pass
@dataclasses.dataclass
class LowerQLinear(ModulePass):
    """Replace tiled, packed qlinear function bodies (on memrefs) by dispatch/invoke calls."""

    NAME = "lowbit-lower-qlinear"

    def run(self, module: ir.Operation) -> None:
        from lowbit.runtime.qgemm import FORMATS

        lowered = False
        for func in qlinear_functions(module):
            if is_bound(func):
                lowered |= self._lower_bound(module, func, FORMATS)
                continue
            if PACKED_ATTR not in func.attributes or TILES_ATTR not in func.attributes:
                continue
            fn_type = ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value)
            epilogue = epilogue_from_attr(func.attributes[QLINEAR_ATTR])
            arity = 3 if epilogue.residual else 2
            if len(fn_type.inputs) != arity or fn_type.results or not isinstance(fn_type.inputs[0], ir.MemRefType):
                continue  # not bufferized into (x, [r,] y) out-param form yet
            spec, _ = spec_from_attr(func.attributes[QLINEAR_ATTR])
            tiles = dict_attr_values(func.attributes[TILES_ATTR])
            packed = dict_attr_values(func.attributes[PACKED_ATTR])
            name = ir.StringAttr(func.attributes["sym_name"]).value
            text, reason = self._lowered_text(name, spec, tiles, packed, fn_type, FORMATS[spec.weight_format],
                                              epilogue)
            if text is None:
                add_report_entry(module, kind="lowering", function=name, result="generic path", reason=reason)
                continue
            # Parse next to declarations of what the body references, so it verifies alone.
            context = [f'memref.global "private" @{packed["symbol"]} : memref<{packed["bytes"]}xi8>']
            if packed["bias"]:
                context.append(f'memref.global "private" @{packed["bias"]} : memref<{spec.out_features}xf32>')
            context += [f"func.func private @{n}{sig}" for n, sig in DECLARATIONS.items()]
            parsed = ir.Module.parse("\n".join(context) + "\n" + text)
            new_func = parsed.body.operations[len(context)].operation
            for attr in (QLINEAR_ATTR, TILES_ATTR, PACKED_ATTR, "no_inline"):
                new_func.attributes[attr] = func.attributes[attr]
            new_func.attributes["lowbit.lowered"] = ir.UnitAttr.get()
            new_func.detach_from_parent()
            ir.InsertionPoint(func).insert(new_func)
            func.erase()
            lowered = True
        if lowered:
            declare_functions(module, DECLARATIONS)

    def _lower_bound(self, module: ir.Operation, func: ir.Operation, formats: dict) -> bool:
        """Bound functions (weights as buffers) must be lowered: their body only poisons y."""
        name = ir.StringAttr(func.attributes["sym_name"]).value
        if "lowbit.lowered" in func.attributes:
            return False
        fn_type = ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value)
        epilogue = epilogue_from_attr(func.attributes[QLINEAR_ATTR])
        bound = bound_info(func)
        arity = 3 + int(epilogue.residual) + bound["bias"]
        if len(fn_type.inputs) != arity or fn_type.results or not isinstance(fn_type.inputs[0], ir.MemRefType):
            return False  # not bufferized into out-param form yet
        if TILES_ATTR not in func.attributes:
            raise PassError(f"{name}: run lowbit-tile-qlinear before lowering bound qlinear functions")
        spec, _ = spec_from_attr(func.attributes[QLINEAR_ATTR])
        tiles = dict_attr_values(func.attributes[TILES_ATTR])
        text, reason = _bound_text(name, spec, tiles, bound, fn_type, formats[spec.weight_format], epilogue)
        if text is None:
            raise PassError(f"{name} ({spec.describe()}): the microkernels cannot run this bound layer: {reason}")
        context = [f"func.func private @{n}{sig}" for n, sig in DECLARATIONS.items()]
        parsed = ir.Module.parse("\n".join(context) + "\n" + text)
        new_func = parsed.body.operations[len(context)].operation
        for attr in (QLINEAR_ATTR, TILES_ATTR, "lowbit.bound", "no_inline"):
            new_func.attributes[attr] = func.attributes[attr]
        new_func.attributes["lowbit.lowered"] = ir.UnitAttr.get()
        new_func.detach_from_parent()
        ir.InsertionPoint(func).insert(new_func)
        func.erase()
        return True

    def _lowered_text(self, name, spec, tiles, packed, fn_type, wfmt, epilogue):
        (m, k), x_elem = _memref_shape_elem(fn_type.inputs[0])
        (m2, n), y_elem = _memref_shape_elem(fn_type.inputs[-1])
        if x_elem not in _TYPE_CODE or y_elem not in _TYPE_CODE or m != m2 or n != spec.out_features:
            return None, f"unsupported signature {fn_type}"
        residual = epilogue.residual
        if residual and _memref_shape_elem(fn_type.inputs[1]) != ([m, n], y_elem):
            return None, f"residual {fn_type.inputs[1]} does not match the output"
        kblock, nkb = packed["kblock"], packed["num_kblocks"]
        kp = kblock * nkb
        m_tile = min(tiles["m_tile"], m)
        n_tile = min(tiles["n_tile"], n)  # one tile of all rows when N fits in one
        num_nt, num_mt = -(-n // n_tile), -(-m // m_tile)
        n_last, m_last = n - (num_nt - 1) * n_tile, m - (num_mt - 1) * m_tile
        int8 = spec.act_format in ("int8", "int8_unit")
        atype = T_INT8 if int8 else _TYPE_CODE[x_elem]
        ctype = _TYPE_CODE[y_elem]
        flags = F_BIAS if packed["bias"] else 0
        if epilogue.activation:
            flags |= F_ACT[epilogue.activation]
        if residual:
            flags |= F_BETA1
        pad = (not int8) and kp != k
        lda = _act_stride(kp) if int8 else kp if pad else k
        ld_aux = nkb
        shapes = {(mt, nt) for mt in {m_tile, m_last} for nt in {n_tile, n_last}}
        handles = {}
        for mt, nt in sorted(shapes):
            args = _dispatch_args(wfmt, atype, ctype, mt, nt, kblock, lda, packed["nblock_bytes"], n,
                                  kblock, packed["kblock_bytes"], ld_aux, flags)
            rc = _check_dispatch(args)
            if rc < 0:
                from lowbit.runtime.library import error_string
                return None, f"kernel rejects tile {mt}x{nt} (kblock {kblock}): {error_string(rc)}"
            handles[(mt, nt)] = args

        lines = []
        emit = lines.append
        xt = f"memref<{m}x{k}x{x_elem}>"
        yt = f"memref<{m}x{n}x{y_elem}>"
        r_arg = f"%r: {yt}, " if residual else ""
        emit(f"func.func private @{name}(%x: {xt}, {r_arg}%y: {yt}) {{")
        emit(f"  %w = memref.get_global @{packed['symbol']} : memref<{packed['bytes']}xi8>")
        emit(f"  %wp_i = memref.extract_aligned_pointer_as_index %w : memref<{packed['bytes']}xi8> -> index")
        emit("  %wp = arith.index_cast %wp_i : index to i64")
        emit(f"  %yp_i = memref.extract_aligned_pointer_as_index %y : {yt} -> index")
        emit("  %yp = arith.index_cast %yp_i : index to i64")
        emit("  %zero64 = arith.constant 0 : i64")
        if packed["bias"]:
            emit(f"  %b = memref.get_global @{packed['bias']} : memref<{n}xf32>")
            emit(f"  %bp_i = memref.extract_aligned_pointer_as_index %b : memref<{n}xf32> -> index")
            emit("  %bp = arith.index_cast %bp_i : index to i64")
        else:
            emit("  %bp = arith.constant 0 : i64")
        deallocs = []
        if int8:
            emit(f"  %xp_i = memref.extract_aligned_pointer_as_index %x : {xt} -> index")
            emit("  %xp = arith.index_cast %xp_i : index to i64")
            for var, shape, elem in (("xq", m * lda, "i8"), ("sx", m, "f32"), ("rs", m * nkb, "i32")):
                emit(f"  %{var} = memref.alloc() {{alignment = 64 : i64}} : memref<{shape}x{elem}>")
                emit(f"  %{var}p_i = memref.extract_aligned_pointer_as_index %{var} : memref<{shape}x{elem}> -> index")
                emit(f"  %{var}p = arith.index_cast %{var}p_i : index to i64")
                deallocs.append((var, f"memref<{shape}x{elem}>"))
            emit(f"  %q_m_i = arith.constant {m} : index")
            _emit_quant(emit, "%q_m_i", spec, k, kblock, lda, nkb, x_elem)
            a_ptr, as_ptr, sum_ptr = "%xqp", "%sxp", "%rsp"
        elif pad:
            emit(f"  %xpad = memref.alloc() {{alignment = 64 : i64}} : memref<{m}x{kp}x{x_elem}>")
            emit(f"  %padzero = arith.constant 0.0 : {x_elem}")
            emit(f"  linalg.fill ins(%padzero : {x_elem}) outs(%xpad : memref<{m}x{kp}x{x_elem}>)")
            emit(f"  %xsub = memref.subview %xpad[0, 0] [{m}, {k}] [1, 1] : memref<{m}x{kp}x{x_elem}> to "
                 f"memref<{m}x{k}x{x_elem}, strided<[{kp}, 1]>>")
            emit(f"  memref.copy %x, %xsub : {xt} to memref<{m}x{k}x{x_elem}, strided<[{kp}, 1]>>")
            emit(f"  %xp_i = memref.extract_aligned_pointer_as_index %xpad : memref<{m}x{kp}x{x_elem}> -> index")
            emit("  %xp = arith.index_cast %xp_i : index to i64")
            deallocs.append(("xpad", f"memref<{m}x{kp}x{x_elem}>"))
            a_ptr, as_ptr, sum_ptr = "%xp", "%zero64", "%zero64"
        else:
            emit(f"  %xp_i = memref.extract_aligned_pointer_as_index %x : {xt} -> index")
            emit("  %xp = arith.index_cast %xp_i : index to i64")
            a_ptr, as_ptr, sum_ptr = "%xp", "%zero64", "%zero64"

        # Dispatch once per tile shape, outside the loops.
        for i, ((mt, nt), args) in enumerate(sorted(handles.items())):
            types = ["i32"] * 3 + ["i64"] * 9 + ["i32"]
            names = []
            for j, (value, ty) in enumerate(zip(args, types)):
                emit(f"  %d{i}_{j} = arith.constant {value} : {ty}")
                names.append(f"%d{i}_{j}")
            emit(f"  %h_{mt}_{nt} = func.call @lowbit_qgemm_dispatch({', '.join(names)}) : "
                 + DECLARATIONS["lowbit_qgemm_dispatch"])
        emit(f"  %count = arith.constant {nkb} : i64")
        emit(f"  %lda = arith.constant {lda} : i64")
        emit(f"  %ldc = arith.constant {n} : i64")
        emit(f"  %nkb = arith.constant {nkb} : i64")
        emit(f"  %ldb = arith.constant {packed['nblock_bytes']} : i64")
        emit(f"  %ntile = arith.constant {n_tile} : i64")
        emit(f"  %mtile = arith.constant {m_tile} : i64")
        emit(f"  %blocks_per_tile = arith.constant {n_tile // KERNEL_NB} : i64")
        emit(f"  %last_nt = arith.constant {num_nt - 1} : i64")
        emit(f"  %last_mt = arith.constant {num_mt - 1} : i64")
        emit("  %c0 = arith.constant 0 : index")
        emit("  %c1 = arith.constant 1 : index")
        emit(f"  %num_mt = arith.constant {num_mt} : index")
        if residual:
            for cname, value in (("m_last", m_last), ("m_tile", m_tile), ("n_last", n_last), ("n_tile", n_tile)):
                emit(f"  %c_{cname} = arith.constant {value} : index")
        emit(f"  scf.forall (%nt_i) in ({num_nt}) {{")
        emit("    %nt = arith.index_cast %nt_i : index to i64")
        emit("    %n0 = arith.muli %nt, %ntile : i64")
        emit("    %nblk = arith.muli %nt, %blocks_per_tile : i64")
        emit("    %b_off = arith.muli %nblk, %ldb : i64")
        emit("    %is_ntail = arith.cmpi eq, %nt, %last_nt : i64")
        emit("    scf.for %mt_i = %c0 to %num_mt step %c1 {")
        emit("      %mt = arith.index_cast %mt_i : index to i64")
        emit("      %m0 = arith.muli %mt, %mtile : i64")
        emit("      %is_mtail = arith.cmpi eq, %mt, %last_mt : i64")
        # Select the handle for this tile's shape.
        full_m = f"%h_{m_tile}_{n_tile}", f"%h_{m_tile}_{n_last}"
        tail_m = f"%h_{m_last}_{n_tile}", f"%h_{m_last}_{n_last}"
        emit(f"      %hm_full = arith.select %is_ntail, {full_m[1]}, {full_m[0]} : i64")
        emit(f"      %hm_tail = arith.select %is_ntail, {tail_m[1]}, {tail_m[0]} : i64")
        emit("      %h = arith.select %is_mtail, %hm_tail, %hm_full : i64")
        emit("      %a_off = arith.muli %m0, %lda : i64")
        emit("      %c_row = arith.muli %m0, %ldc : i64")
        emit("      %c_off = arith.addi %c_row, %n0 : i64")
        emit("      %sum_off = arith.muli %m0, %nkb : i64")
        if residual:
            # y's tile first holds r's tile; the kernel then adds into it (BETA1).
            tile_t = f"memref<?x?x{y_elem}, strided<[{n}, 1], offset: ?>>"
            emit("      %mt_rows = arith.select %is_mtail, %c_m_last, %c_m_tile : index")
            emit("      %nt_cols = arith.select %is_ntail, %c_n_last, %c_n_tile : index")
            emit("      %m0_i = arith.index_cast %m0 : i64 to index")
            emit("      %n0_i = arith.index_cast %n0 : i64 to index")
            emit(f"      %r_tile = memref.subview %r[%m0_i, %n0_i] [%mt_rows, %nt_cols] [1, 1] : {yt} to {tile_t}")
            emit(f"      %y_tile = memref.subview %y[%m0_i, %n0_i] [%mt_rows, %nt_cols] [1, 1] : {yt} to {tile_t}")
            emit(f"      memref.copy %r_tile, %y_tile : {tile_t} to {tile_t}")
        emit(f"      %rc = func.call @lowbit_qgemm_invoke(%h, {a_ptr}, %a_off, %wp, %b_off, %yp, %c_off, "
             f"{as_ptr}, %m0, {sum_ptr}, %sum_off, %bp, %n0, %count) : " + DECLARATIONS["lowbit_qgemm_invoke"])
        emit("    }")
        emit("  }")
        for var, ty in deallocs:
            emit(f"  memref.dealloc %{var} : {ty}")
        emit("  return")
        emit("}")
        return "\n".join(lines), ""


def _m_chunks(m_tile: int) -> list[int]:
    """Row counts the M loop runs kernels with: full tiles, then a remainder taken greedily in
    chunks of 64/16/4/1 rows, so a dynamic M needs a few fixed tile shapes, not one per M."""
    return [m_tile] + [c for c in (64, 16, 4, 1) if c < m_tile]


def _bound_text(name, spec, tiles, bound, fn_type, wfmt, epilogue):
    """The body of a bound qlinear function `(x, [r], w, [b], y)` on memrefs, any M.

    Like the constant form, but the weight and bias are arguments and M is read at run time:
    the M loop runs full `m_tile` row tiles and then the remainder in chunks of 64/16/4/1
    rows, each chunk shape with its own dispatched kernel (hoisted out of the loops).
    """
    ins = list(fn_type.inputs)
    residual = epilogue.residual
    (m, k), x_elem = _memref_shape_elem(ins[0])
    (m2, n), y_elem = _memref_shape_elem(ins[-1])
    if x_elem not in _TYPE_CODE or y_elem not in _TYPE_CODE or n != spec.out_features or k != spec.in_features:
        return None, f"unsupported signature {fn_type}"
    kblock, nkb = bound["kblock"], bound["num_kblocks"]
    kp = kblock * nkb
    n_tile = min(tiles["n_tile"], n)
    num_nt = -(-n // n_tile)
    n_last = n - (num_nt - 1) * n_tile
    chunks = _m_chunks(max(1, tiles["m_tile"]))
    int8 = spec.act_format in ("int8", "int8_unit")
    atype = T_INT8 if int8 else _TYPE_CODE[x_elem]
    ctype = _TYPE_CODE[y_elem]
    flags = F_BIAS if bound["bias"] else 0
    if epilogue.activation:
        flags |= F_ACT[epilogue.activation]
    if residual:
        flags |= F_BETA1
    pad = (not int8) and kp != k
    lda = _act_stride(kp) if int8 else kp if pad else k
    handles = {}
    for mc in chunks:
        for nt in sorted({n_tile, n_last}):
            args = _dispatch_args(wfmt, atype, ctype, mc, nt, kblock, lda, bound["nblock_bytes"], n,
                                  kblock, bound["kblock_bytes"], nkb, flags)
            rc = _check_dispatch(args)
            if rc < 0:
                from lowbit.runtime.library import error_string
                return None, f"kernel rejects tile {mc}x{nt} (kblock {kblock}): {error_string(rc)}"
            handles[(mc, nt)] = args

    ms = "?" if ir.ShapedType.is_dynamic_size(m) else str(m)
    xt = f"memref<{ms}x{k}x{x_elem}>"
    yt = f"memref<{ms}x{n}x{y_elem}>"
    wt = f"memref<{bound['bytes']}xi8>"
    bt = f"memref<{n}xf32>"
    lines = []
    emit = lines.append
    params = [f"%x: {xt}"] + ([f"%r: {yt}"] if residual else []) + [f"%w: {wt}"]
    params += ([f"%b: {bt}"] if bound["bias"] else []) + [f"%y: {yt}"]
    emit(f"func.func private @{name}({', '.join(params)}) {{")
    emit("  %c0 = arith.constant 0 : index")
    emit("  %c1 = arith.constant 1 : index")
    emit(f"  %m_i = memref.dim %x, %c0 : {xt}")
    emit("  %m = arith.index_cast %m_i : index to i64")
    for var, val, ty in (("w", "%w", wt), ("y", "%y", yt)):
        emit(f"  %{var}p_i = memref.extract_aligned_pointer_as_index {val} : {ty} -> index")
        emit(f"  %{var}p = arith.index_cast %{var}p_i : index to i64")
    emit("  %zero64 = arith.constant 0 : i64")
    if bound["bias"]:
        emit(f"  %bp_i = memref.extract_aligned_pointer_as_index %b : {bt} -> index")
        emit("  %bp = arith.index_cast %bp_i : index to i64")
    else:
        emit("  %bp = arith.constant 0 : i64")
    deallocs = []
    if int8:
        emit(f"  %xp_i = memref.extract_aligned_pointer_as_index %x : {xt} -> index")
        emit("  %xp = arith.index_cast %xp_i : index to i64")
        for var, per_row, elem in (("xq", lda, "i8"), ("sx", 1, "f32"), ("rs", nkb, "i32")):
            emit(f"  %{var}_rows = arith.constant {per_row} : index")
            emit(f"  %{var}_n = arith.muli %m_i, %{var}_rows : index")
            emit(f"  %{var} = memref.alloc(%{var}_n) {{alignment = 64 : i64}} : memref<?x{elem}>")
            emit(f"  %{var}p_i = memref.extract_aligned_pointer_as_index %{var} : memref<?x{elem}> -> index")
            emit(f"  %{var}p = arith.index_cast %{var}p_i : index to i64")
            deallocs.append((var, f"memref<?x{elem}>"))
        _emit_quant(emit, "%m_i", spec, k, kblock, lda, nkb, x_elem)
        a_ptr, as_ptr, sum_ptr = "%xqp", "%sxp", "%rsp"
    elif pad:
        pt = f"memref<?x{kp}x{x_elem}>"
        emit(f"  %xpad = memref.alloc(%m_i) {{alignment = 64 : i64}} : {pt}")
        emit(f"  %padzero = arith.constant 0.0 : {x_elem}")
        emit(f"  linalg.fill ins(%padzero : {x_elem}) outs(%xpad : {pt})")
        sub = f"memref<?x{k}x{x_elem}, strided<[{kp}, 1]>>"
        emit(f"  %xsub = memref.subview %xpad[0, 0] [%m_i, {k}] [1, 1] : {pt} to {sub}")
        emit(f"  memref.copy %x, %xsub : {xt} to {sub}")
        emit(f"  %xp_i = memref.extract_aligned_pointer_as_index %xpad : {pt} -> index")
        emit("  %xp = arith.index_cast %xp_i : index to i64")
        deallocs.append(("xpad", pt))
        a_ptr, as_ptr, sum_ptr = "%xp", "%zero64", "%zero64"
    else:
        emit(f"  %xp_i = memref.extract_aligned_pointer_as_index %x : {xt} -> index")
        emit("  %xp = arith.index_cast %xp_i : index to i64")
        a_ptr, as_ptr, sum_ptr = "%xp", "%zero64", "%zero64"

    types = ["i32"] * 3 + ["i64"] * 9 + ["i32"]
    for i, ((mc, nt), args) in enumerate(sorted(handles.items())):
        names = []
        for j, (value, ty) in enumerate(zip(args, types)):
            emit(f"  %d{i}_{j} = arith.constant {value} : {ty}")
            names.append(f"%d{i}_{j}")
        emit(f"  %h_{mc}_{nt} = func.call @lowbit_qgemm_dispatch({', '.join(names)}) : "
             + DECLARATIONS["lowbit_qgemm_dispatch"])
    emit(f"  %count = arith.constant {nkb} : i64")
    emit(f"  %lda = arith.constant {lda} : i64")
    emit(f"  %ldc = arith.constant {n} : i64")
    emit(f"  %nkb = arith.constant {nkb} : i64")
    emit(f"  %ldb = arith.constant {bound['nblock_bytes']} : i64")
    emit(f"  %ntile = arith.constant {n_tile} : i64")
    emit(f"  %blocks_per_tile = arith.constant {n_tile // KERNEL_NB} : i64")
    emit(f"  %last_nt = arith.constant {num_nt - 1} : i64")
    if residual:
        emit(f"  %c_n_last = arith.constant {n_last} : index")
        emit(f"  %c_n_tile = arith.constant {n_tile} : index")
    emit(f"  scf.forall (%nt_i) in ({num_nt}) {{")
    emit("    %nt = arith.index_cast %nt_i : index to i64")
    emit("    %n0 = arith.muli %nt, %ntile : i64")
    emit("    %nblk = arith.muli %nt, %blocks_per_tile : i64")
    emit("    %b_off = arith.muli %nblk, %ldb : i64")
    emit("    %is_ntail = arith.cmpi eq, %nt, %last_nt : i64")
    if residual:
        emit("    %nt_cols = arith.select %is_ntail, %c_n_last, %c_n_tile : index")
        emit("    %n0_i = arith.index_cast %n0 : i64 to index")
    base, rem = "%c0", "%m_i"
    for ci, mc in enumerate(chunks):
        emit(f"    %s{ci} = arith.constant {mc} : index")
        emit(f"    %cnt{ci} = arith.divui {rem}, %s{ci} : index")
        emit(f"    %h{ci} = arith.select %is_ntail, %h_{mc}_{n_last}, %h_{mc}_{n_tile} : i64")
        emit(f"    scf.for %i{ci} = %c0 to %cnt{ci} step %c1 {{")
        emit(f"      %off{ci} = arith.muli %i{ci}, %s{ci} : index")
        emit(f"      %m0_i{ci} = arith.addi {base}, %off{ci} : index")
        emit(f"      %m0{ci} = arith.index_cast %m0_i{ci} : index to i64")
        emit(f"      %a_off{ci} = arith.muli %m0{ci}, %lda : i64")
        emit(f"      %c_row{ci} = arith.muli %m0{ci}, %ldc : i64")
        emit(f"      %c_off{ci} = arith.addi %c_row{ci}, %n0 : i64")
        emit(f"      %sum_off{ci} = arith.muli %m0{ci}, %nkb : i64")
        if residual:
            tile_t = f"memref<{mc}x?x{y_elem}, strided<[{n}, 1], offset: ?>>"
            emit(f"      %r_tile{ci} = memref.subview %r[%m0_i{ci}, %n0_i] [{mc}, %nt_cols] [1, 1] : {yt} to {tile_t}")
            emit(f"      %y_tile{ci} = memref.subview %y[%m0_i{ci}, %n0_i] [{mc}, %nt_cols] [1, 1] : {yt} to {tile_t}")
            emit(f"      memref.copy %r_tile{ci}, %y_tile{ci} : {tile_t} to {tile_t}")
        emit(f"      %rc{ci} = func.call @lowbit_qgemm_invoke(%h{ci}, {a_ptr}, %a_off{ci}, %wp, %b_off, %yp, "
             f"%c_off{ci}, {as_ptr}, %m0{ci}, {sum_ptr}, %sum_off{ci}, %bp, %n0, %count) : "
             + DECLARATIONS["lowbit_qgemm_invoke"])
        emit("    }")
        emit(f"    %used{ci} = arith.muli %cnt{ci}, %s{ci} : index")
        emit(f"    %base{ci} = arith.addi {base}, %used{ci} : index")
        emit(f"    %rem{ci} = arith.subi {rem}, %used{ci} : index")
        base, rem = f"%base{ci}", f"%rem{ci}"
    emit("  }")
    for var, ty in deallocs:
        emit(f"  memref.dealloc %{var} : {ty}")
    emit("  return")
    emit("}")
    return "\n".join(lines), ""
