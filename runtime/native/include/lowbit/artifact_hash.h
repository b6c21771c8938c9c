/* A fast 128-bit content digest of a byte range, for the compile cache's weight keys.
 *
 * Not cryptographic. It is two XXH64 hashes (Yann Collet's xxHash, 64-bit variant, exactly
 * as specified: https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md) of the same
 * bytes with two seeds, computed in one pass: out[0] = XXH64(data, seed0), out[1] =
 * XXH64(data, seed1). It detects accidental changes (any edit of the weights gives another
 * key with probability 1 - ~2^-64 or better); it is not meant to resist a crafted collision,
 * which the compile cache does not need (whoever chooses the weights chooses the outputs).
 * Single-threaded; reads the memory once (memory-bandwidth bound on current x86 cores).
 */
#ifndef LOWBIT_ARTIFACT_HASH_H
#define LOWBIT_ARTIFACT_HASH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LOWBIT_ARTIFACT_API __attribute__((visibility("default")))

/* XXH64 of `n` bytes at `data` with `seed` (the reference algorithm; data may be unaligned). */
LOWBIT_ARTIFACT_API uint64_t lowbit_artifact_xxh64(const void* data, size_t n, uint64_t seed);

/* out[0] = XXH64(data, n, seed0), out[1] = XXH64(data, n, seed1), in one pass over the data. */
LOWBIT_ARTIFACT_API void lowbit_artifact_digest128(const void* data, size_t n, uint64_t seed0,
                                                   uint64_t seed1, uint64_t out[2]);

#ifdef __cplusplus
}
#endif

#endif
