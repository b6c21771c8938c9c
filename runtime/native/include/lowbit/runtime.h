/* lowbit native runtime: C ABI shared by the JIT, AOT artifacts and the Python side.
 *
 * Conventions (libxsmm / tpp-mlir style):
 *  - `*_dispatch` is pure: it validates a kernel description and returns a handle (> 0)
 *    that the compiler hoists out of loops, or a negative LOWBIT_E* error code.
 *  - `*_invoke` runs a dispatched kernel on base pointers + element offsets. It does no
 *    validation beyond what dispatch did; callers pass what dispatch described.
 */
#ifndef LOWBIT_RUNTIME_H
#define LOWBIT_RUNTIME_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LOWBIT_API __attribute__((visibility("default")))

/* Error codes returned (negated) by dispatch functions. */
enum {
  LOWBIT_OK = 0,
  LOWBIT_E_UNSUPPORTED = 1, /* unsupported format / dtype / flag combination */
  LOWBIT_E_SHAPE = 2,       /* zero, negative or non-multiple sizes */
  LOWBIT_E_LEADING_DIM = 3, /* leading dimension smaller than the row length */
  LOWBIT_E_ALIGNMENT = 4,   /* size or stride not a multiple of the format's block */
  LOWBIT_E_ISA = 5,         /* requested ISA not available on this CPU */
  LOWBIT_E_TABLE_FULL = 6,  /* too many distinct kernels dispatched */
};

/* Instruction-set paths, best first. */
enum {
  LOWBIT_ISA_SCALAR = 0,
  LOWBIT_ISA_AVX2 = 1,   /* AVX2 + FMA (+ AVX-VNNI where present) */
  LOWBIT_ISA_AVX512 = 2, /* AVX-512 F/BW/VL/VNNI (+VBMI, BF16 where present) */
  LOWBIT_ISA_AMX = 3,    /* AVX-512 + AMX tiles: AMX-INT8 for int8 GEMMs of enough rows
                            (lowbit_qgemm_amx_min_rows), AMX-BF16 for dense bf16 BRGEMMs
                            (lowbit_brgemm_amx_min_rows); everything else runs AVX-512 */
};

/* The ISA the runtime uses: the best the CPU supports, or LOWBIT_ISA=scalar|avx2|avx512|amx
 * from the environment (read once, case-insensitive; an unknown name or an ISA the CPU lacks
 * falls back to the best one and lowbit_rt_isa_error() reports -LOWBIT_E_UNSUPPORTED or
 * -LOWBIT_E_ISA). AMX counts as supported only when CPUID reports AMX-TILE/INT8, the OS
 * enabled the tile state in XCR0 and Linux granted this process the tile data
 * (arch_prctl ARCH_REQ_XCOMP_PERM, requested once at the first ISA query). */
LOWBIT_API int32_t lowbit_rt_isa(void);
LOWBIT_API int32_t lowbit_rt_isa_supported(int32_t isa);
LOWBIT_API int32_t lowbit_rt_set_isa(int32_t isa); /* returns 0 or -LOWBIT_E_ISA */
LOWBIT_API const char* lowbit_rt_isa_name(int32_t isa);
LOWBIT_API int32_t lowbit_rt_isa_error(void);
LOWBIT_API const char* lowbit_rt_error_string(int64_t code);
LOWBIT_API int32_t lowbit_rt_abi_version(void);

/* CPU features (CPUID and OS-enabled register state), a mask of LOWBIT_CPU_*. */
enum {
  LOWBIT_CPU_AVX2 = 1 << 0,
  LOWBIT_CPU_FMA = 1 << 1,
  LOWBIT_CPU_AVX512F = 1 << 2,
  LOWBIT_CPU_AVX512BW = 1 << 3,
  LOWBIT_CPU_AVX512VL = 1 << 4,
  LOWBIT_CPU_AVX512VNNI = 1 << 5,
  LOWBIT_CPU_AVX512VBMI = 1 << 6,
  LOWBIT_CPU_AVX512BF16 = 1 << 7,
  LOWBIT_CPU_AVX_VNNI = 1 << 8,
  LOWBIT_CPU_AMX_TILE = 1 << 9,
  LOWBIT_CPU_AMX_INT8 = 1 << 10,
  LOWBIT_CPU_AMX_BF16 = 1 << 11,
};
LOWBIT_API int32_t lowbit_rt_cpu_features(void);

/* Buffers of compiled code (memref.alloc) come from a bounded cache of large blocks
 * (memref_alloc.cpp, LOWBIT_ALLOC_CACHE_MB). Bytes held in it, and release them all. */
LOWBIT_API int64_t lowbit_rt_cached_memory(void);
LOWBIT_API void lowbit_rt_release_cached_memory(void);

/* Calls n compiled entries `void fns[i](void **args[i])` in order. flags[i], when not NULL, is
 * entry i's trap flag (passes/guard_traps.py): cleared before the call and read after it; the
 * first entry that set it stops the sequence and its index is returned. -1: all ran. */
LOWBIT_API int64_t lowbit_rt_run_calls(int64_t n, void* const* fns, void* const* args,
                                       int32_t* const* flags);

/* A recorded copy (an entry for lowbit_rt_run_calls): memmove(*args[0], *args[1], *args[2]). */
LOWBIT_API void lowbit_rt_copy_entry(void** args);

/* Greedy decoding with a recorded step (runtime/replay.py, Plan.decode): up to `steps` times,
 * run the n entries as lowbit_rt_run_calls does, take the argmax of the step's `vocab` logits
 * (fp32, or bf16 when logits_bf16; the first maximum, a NaN counting as the maximum as in
 * torch.argmax), store it in tokens_out[s] and in *token (the next step's input), add 1 to
 * *pos, and call on_token(token) when given (a non-zero return stops after this step).
 * Returns the number of steps completed; a trap stops the loop before its argmax, with the
 * entry's index in *trapped (else -1). */
typedef int32_t (*lowbit_token_fn)(int64_t token);
LOWBIT_API int64_t lowbit_rt_decode_calls(int64_t n, void* const* fns, void* const* args,
                                          int32_t* const* flags, int64_t steps, int64_t* token,
                                          int64_t* pos, const void* logits, int32_t logits_bf16,
                                          int64_t vocab, int64_t* tokens_out,
                                          lowbit_token_fn on_token, int64_t* trapped);

#ifdef __cplusplus
}
#endif
#include "lowbit/brgemm.h"
#include "lowbit/qgemm.h"
#endif
