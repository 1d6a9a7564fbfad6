/* C ABI of the block-sparse attention kernel library (docs/ARCHITECTURE.md, "The kernel library and the plugin").
 *
 * Plain C types only, so that ctypes, the TensorRT plugin and any other front end share one core.
 * All functions are asynchronous on `stream`, allocate nothing, and never synchronise.
 */
#ifndef SAEXPORT_BSA_H
#define SAEXPORT_BSA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature or the workspace layout changes: an engine records the workspace size it was
 * built with, so a library that needs more must refuse it (2: the tile counter after the row masks). */
#define SAEXPORT_BSA_ABI_VERSION 2

enum saexport_bsa_dtype { SAEXPORT_BSA_FP16 = 0, SAEXPORT_BSA_BF16 = 1 };

enum saexport_bsa_status {
    SAEXPORT_BSA_OK = 0,
    SAEXPORT_BSA_UNSUPPORTED_HEAD_DIM = 1, /* head_dim must be 64 or 128 */
    SAEXPORT_BSA_UNSUPPORTED_BLOCK = 2,    /* block_size must be 64 or 128 */
    SAEXPORT_BSA_UNSUPPORTED_DTYPE = 3,
    SAEXPORT_BSA_BAD_SHAPE = 4,            /* a size is not positive */
    SAEXPORT_BSA_CUDA_ERROR = 5            /* a launch failed: see cudaGetLastError's message */
};

int saexport_bsa_abi_version(void);
const char* saexport_bsa_status_string(int status);

/* Bytes of workspace: the row bitmasks, heads * ceil(L/block) * ceil(ceil(L/block)/32) * 4, and 4 for the
 * kernel's tile counter. */
size_t saexport_bsa_workspace_size(int heads, int seq_len, int block_size);

/* out = block-sparse attention(q, k, v) for step *step_index (a device pointer, clamped to [0, steps)).
 * q, k, v, out: contiguous [batch, seq_len, heads, head_dim] of `dtype`, on the device.
 * topology: int32 [heads, n, ceil(n/4)] packed levels; budgets: int32 [steps, heads]; both on the device.
 * workspace: at least saexport_bsa_workspace_size() bytes, 4-byte aligned, not shared with a launch that may run
 * at the same time (it holds this launch's row masks and tile counter). stream: a cudaStream_t. */
int saexport_bsa_forward(const void* q, const void* k, const void* v, void* out, int dtype, int batch, int seq_len,
                         int heads, int head_dim, int block_size, float scale, const int32_t* topology,
                         const int32_t* budgets, int steps, const int32_t* step_index, void* workspace,
                         void* stream);

#ifdef __cplusplus
}
#endif

#endif /* SAEXPORT_BSA_H */
