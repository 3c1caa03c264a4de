// Paged KV-cache decode attention: the parameter block shared by the kernels and the torch binding.
//
// This header includes neither CUDA nor torch headers, so the binding (host C++ compiled against
// torch) and the kernels (nvcc, no torch) agree on one plain struct.
#pragma once

#include <cstdint>

namespace hfe {

constexpr int kMaxSplits = 256;

// All strides are in elements; the last (head_dim) dimension of q, k_cache, v_cache is contiguous.
struct PagedDecodeParams {
  const void* q;                // (batch, q_len, nheads, head_dim)
  const void* k;                // paged: (num_blocks, block_size, nheads_k, head_dim)
  const void* v;                //   contiguous: (batch_cache, seqlen_cache, nheads_k, head_dim)
  const int32_t* seqlens;       // (batch,) visible keys per sequence, new tokens included
  const int32_t* block_table;   // (batch, max_blocks) or nullptr (contiguous cache)
  const int32_t* batch_idx;     // (batch,) row of the contiguous cache, or nullptr
  const int32_t* leftpad;       // (batch,) first valid key, or nullptr
  const float* alibi;           // (batch?, nheads) fp32 slopes, or nullptr
  void* out;                    // (batch, q_len, nheads, head_dim), dtype of q, contiguous
  float* lse;                   // (batch, nheads, q_len) natural log, or nullptr
  float* out_partial;           // (num_splits, batch, q_len, nheads, head_dim), used when num_splits > 1
  float* lse_partial;           // (num_splits, batch, q_len, nheads), log2 domain

  int64_t q_stride_b, q_stride_t, q_stride_h;
  int64_t k_stride_page, k_stride_tok, k_stride_head;
  int64_t v_stride_page, v_stride_tok, v_stride_head;
  int64_t bt_stride;            // block_table row stride
  int64_t alibi_stride_b;       // 0 when slopes are (nheads,)

  int batch, q_len, nheads, nheads_k, head_dim;
  int block_size_log2;          // paged cache only
  int num_splits;               // >= 1 (grid size along the key axis), <= kMaxSplits
  int tiles_per_split;          // host plan from max_seqlen_k; raised on device if a sequence is longer
  int bt_cols;                  // block_table columns (max blocks per sequence)
  int num_pages;                // k_cache.size(0): valid page ids / cache rows are [0, num_pages)
  int cache_len;                // keys a sequence can hold: bt_cols * block_size, or seqlen_cache
  int rows_per_chunk;           // query rows (q_len * group) served by one thread block, <= 128
  int num_row_chunks;
  int m_tiles;                  // 16-row MMA tiles per block: 1, 2, 4 or 8
  int variant;                  // tile/stage variant: 0, or 3 (fewer stages, more blocks per SM); see Cfg
  int is_bf16;                  // 1: bfloat16, 0: float16
  int pdl;                      // 1: programmatic dependent launch (sm_90+): start before the previous kernel ends

  float scale_log2;             // softmax_scale * log2(e)   (no softcap)
  float softcap_log2;           // softcap * log2(e)          (softcap > 0)
  float softcap_inv;            // softmax_scale / softcap    (softcap > 0)
  int use_softcap;
  int window_left, window_right;  // -1 = unbounded
};

// Kernel entry points, one per head dim (each may live in its own object file).
// Return nullptr on success or a static error string.
const char* paged_decode_launch_d64(const PagedDecodeParams& p, void* stream);
const char* paged_decode_launch_d128(const PagedDecodeParams& p, void* stream);
const char* paged_decode_launch_d256(const PagedDecodeParams& p, void* stream);

// info[0] = keys per tile, info[1] = thread blocks per SM, info[2] = threads, info[3] = smem bytes.
const char* paged_decode_info_d64(int m_tiles, int is_bf16, int variant, int device, int info[4]);
const char* paged_decode_info_d128(int m_tiles, int is_bf16, int variant, int device, int info[4]);
const char* paged_decode_info_d256(int m_tiles, int is_bf16, int variant, int device, int info[4]);

// Rows of one thread block and MMA tiles: the launcher (Python) mirrors this.
inline void paged_decode_plan_rows(PagedDecodeParams& p) {
  const int rows = p.q_len * (p.nheads / p.nheads_k);
  p.num_row_chunks = (rows + 127) / 128;
  p.rows_per_chunk = (rows + p.num_row_chunks - 1) / p.num_row_chunks;
  const int tiles = (p.rows_per_chunk + 15) / 16;
  p.m_tiles = tiles <= 1 ? 1 : tiles <= 2 ? 2 : tiles <= 4 ? 4 : 8;
}

}  // namespace hfe
