// Paged KV-cache decode attention: device code.
//
// One thread block serves one (sequence, kv head, split) and every query row of that kv head: the
// group of query heads times the q_len new tokens (GQA packing), so each K/V byte is read once.
// K/V tiles of N keys stream through a STAGES-deep shared-memory ring filled by 16-byte cp.async
// (page lookups prefetched one tile ahead); warps compute S = Q K^T and O += P V on tensor cores
// (mma.sync m16n8k16, fp32 accumulation) with an online softmax in the log2 domain. Warps split
// the block's query rows into 16-row MMA tiles and, when there are fewer tiles than warps, the
// keys of each K/V tile; their partial results merge in shared memory at the end. With split-KV,
// each split writes (out, lse) in fp32 and a second kernel merges the splits by LSE.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "paged_decode.cuh"

namespace hfe {
namespace pd {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Small PTX wrappers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// .cg: L2 only (K/V are streamed once); src_bytes == 0 zero-fills without reading.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
struct TypeOps;

template <>
struct TypeOps<half> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct TypeOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---------------------------------------------------------------------------------------------
// Compile-time configuration
// ---------------------------------------------------------------------------------------------
// D: head dim; MT: 16-row MMA tiles of query rows per block (1, 2, 4, 8); V: tuning variant.
template <int D, int MT, int V>
struct Cfg {
  static constexpr int NUM_WARPS = MT >= 8 ? 8 : 4;
  static constexpr int THREADS = NUM_WARPS * 32;
  static constexpr int K_WARPS = NUM_WARPS / MT;  // warps that share one row tile, splitting keys
  static constexpr int N0 = (16 * K_WARPS > 8192 / D) ? 16 * K_WARPS : 8192 / D;
  // Variants: 0 = N0 keys x 3 stages; 3 = N0 x 2 stages (MT == 1 only: more resident blocks per SM). The numbers
  // are those of the tuning sweeps; variants 1, 2 and 4 (N0 x 4, 2*N0 x 2, 2*N0 x 3) never won one and are gone.
  static constexpr int N = N0;  // keys per K/V tile
  static constexpr int STAGES = V == 3 ? 2 : 3;
  // Resident blocks per SM the register allocation must allow (the hot loop must not spill): 1 = cap 255.
  // Variant 3 at head dim 64 is capped at 168 registers (three blocks per SM; unbounded it takes ~190, two
  // blocks): +25% at 64 x 4096 (H200 sweep). Head dim 128 spills under that cap and keeps two blocks per SM.
  static constexpr int MIN_BLOCKS = (V == 3 && D <= 64) ? 3 : 1;
  static constexpr int KPW = N / K_WARPS;  // keys per warp per tile
  static constexpr int NT = KPW / 8;       // 8-key MMA n-tiles of S per warp
  static constexpr int CPR = D / 8;        // 16-byte chunks per K/V row
  static constexpr int ROWS_PER_PASS = THREADS / CPR;
  static constexpr int LOADS = N / ROWS_PER_PASS;  // K (and V) rows each thread copies per tile
  static constexpr int TILE = N * D;               // elements of one K (or V) tile
  static constexpr int QROWS = MT * 16;
  static constexpr bool Q_IN_REGS = D <= 128;
  static constexpr int OSTRIDE = D + 4;  // fp32 row stride of the merge buffer
  static constexpr int PIPE_BYTES = (2 * STAGES * TILE + QROWS * D) * 2;
  static constexpr int MERGE_BYTES = (NUM_WARPS * 16 * OSTRIDE + 2 * NUM_WARPS * 16) * 4;
  static constexpr int SMEM = PIPE_BYTES > MERGE_BYTES ? PIPE_BYTES : MERGE_BYTES;
  static_assert(KPW % 16 == 0, "each warp needs whole 16-key MMA k-steps");
  static_assert(N % ROWS_PER_PASS == 0, "tile rows must split evenly over the threads");
  static_assert(CPR >= 8, "the XOR swizzle needs at least 8 chunks per row");
};

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][D] tile.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Programmatic dependent launch (sm_90+): when launched with the attribute, a kernel may start while the previous
// kernel in the stream still runs. It waits here for that kernel's completion (and memory) before touching any
// data, then lets the next kernel launch. Without the attribute both instructions are no-ops.
__device__ __forceinline__ void grid_dependency_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <typename Kernel>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream, bool pdl,
                          const PagedDecodeParams& p) {
  if (!pdl) {
    kernel<<<grid, threads, smem, stream>>>(p);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

// ---------------------------------------------------------------------------------------------
// Main kernel: grid (num_splits, nheads_k * num_row_chunks, batch)
// ---------------------------------------------------------------------------------------------
template <typename T, int D, int MT, int V>
__global__ void __launch_bounds__(Cfg<D, MT, V>::THREADS, Cfg<D, MT, V>::MIN_BLOCKS)
    paged_decode_kernel(const PagedDecodeParams p) {
  using C = Cfg<D, MT, V>;
  using Ops = TypeOps<T>;
  constexpr int N = C::N, STAGES = C::STAGES, KPW = C::KPW, NT = C::NT, CPR = C::CPR;
  constexpr int LOADS = C::LOADS, TILE = C::TILE, K_WARPS = C::K_WARPS, THREADS = C::THREADS;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + STAGES * TILE;
  T* sQ = sV + STAGES * TILE;

  constexpr bool BATCH = LOADS * (STAGES - 1) <= 16;  // first tiles' pages held in registers
  grid_dependency_sync();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int mw = warp / K_WARPS, kw = warp % K_WARPS;
  const int split = blockIdx.x;
  const int hk = blockIdx.y / p.num_row_chunks, chunk = blockIdx.y % p.num_row_chunks;
  const int b = blockIdx.z;
  const int G = p.nheads / p.nheads_k;
  const int row0 = chunk * p.rows_per_chunk;
  const int nrows = min(p.rows_per_chunk, p.q_len * G - row0);

  // ---- producer: page lookups and cp.async of K/V tiles ----
  const T* kbase = reinterpret_cast<const T*>(p.k) + hk * p.k_stride_head;
  const T* vbase = reinterpret_cast<const T*>(p.v) + hk * p.v_stride_head;
  const int32_t* bt = p.block_table ? p.block_table + b * p.bt_stride : nullptr;
  // Memory safety: a cache row / page id outside [0, num_pages) is replaced by -1, and every copy
  // from page -1 is skipped (cp.async zero-fills): such keys read as zero K and V.
  const int row_const = p.batch_idx ? p.batch_idx[b] : b;
  const int page_const = (unsigned)row_const < (unsigned)p.num_pages ? row_const : -1;
  const int bs_mask = (1 << p.block_size_log2) - 1;
  const int ld_row = tid / CPR, ld_chunk = tid % CPR;

  // Page of each K/V row this thread copies for tile `tile` of a run starting at key `base`.
  // Reads stay inside the block-table row; rows past the sequence are never copied.
  auto fetch_pages = [&](int base, int tile, int (&dst)[LOADS]) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int blk = (base + tile * N + i * C::ROWS_PER_PASS + ld_row) >> p.block_size_log2;
      dst[i] = bt ? ((unsigned)blk < (unsigned)p.bt_cols ? __ldg(bt + blk) : -1) : page_const;
    }
  };
  // Without a left window a paged split starts at a host-known key: look its first pages up
  // while seqlens[b] is still in flight.
  // (Batched only while the page arrays stay small; large configs fetch stage by stage.)
  const bool spec = BATCH && bt != nullptr && p.window_left < 0;
  const int key0_spec = split * p.tiles_per_split * N;
  int pgp[BATCH ? STAGES - 1 : 1][LOADS];
  int pg[LOADS];
  if constexpr (BATCH) {
    if (spec) {
#pragma unroll
      for (int s = 0; s < STAGES - 1; ++s) fetch_pages(key0_spec, s, pgp[s]);
    }
  }

  // Visible key range of this block's rows (query i of q_len sits at position L - q_len + i).
  // Keys at positions >= cache_len (beyond the block table / the contiguous cache) are not attended
  // to, and a negative left pad counts as 0: no input value moves a read outside the tensors.
  const int L = p.seqlens[b];
  const int L_kv = min(L, p.cache_len);
  const int start = max(p.leftpad ? p.leftpad[b] : 0, 0);
  const int qpos_lo = L - p.q_len + row0 / G;
  const int qpos_hi = L - p.q_len + (row0 + nrows - 1) / G;
  int lo = start, hi = L_kv, lo_in = start, hi_in = L_kv;  // [lo, hi): any row; [lo_in, hi_in): all rows
  if (p.window_left >= 0) {
    lo = max(lo, qpos_lo - p.window_left);
    lo_in = max(lo_in, qpos_hi - p.window_left);
  }
  if (p.window_right >= 0) {
    hi = min(hi, qpos_hi + p.window_right + 1);
    hi_in = min(hi_in, qpos_lo + p.window_right + 1);
  }
  const int ntiles = hi > lo ? (hi - lo + N - 1) / N : 0;
  // Splits own fixed runs of tiles_per_split tiles (planned from the longest sequence), so short
  // sequences leave their later splits empty; raised if this sequence outgrew the plan.
  const int tps = max(p.tiles_per_split, (ntiles + p.num_splits - 1) / p.num_splits);
  const int tile0 = split * tps;
  const int my_tiles = max(min(ntiles, tile0 + tps) - tile0, 0);
  const int key0 = lo + tile0 * N;  // first key position of this split

  if (my_tiles == 0 && p.num_splits > 1) {  // nothing to do: the merge skips -inf splits
    for (int r = tid; r < nrows; r += THREADS) {
      const int gr = row0 + r;
      const int64_t orow = ((int64_t)b * p.q_len + gr / G) * p.nheads + hk * G + gr % G;
      p.lse_partial[(int64_t)split * p.batch * p.q_len * p.nheads + orow] = -INFINITY;
    }
    return;
  }

  auto issue_tile = [&](int tile, int slot, const int (&pgs)[LOADS]) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int r = i * C::ROWS_PER_PASS + ld_row;
      const int pos = key0 + tile * N + r;
      const bool ok = pos < hi && (unsigned)pgs[i] < (unsigned)p.num_pages;
      const int off = bt ? (pos & bs_mask) : pos;
      const int64_t ko = (int64_t)pgs[i] * p.k_stride_page + (int64_t)off * p.k_stride_tok + ld_chunk * 8;
      const int64_t vo = (int64_t)pgs[i] * p.v_stride_page + (int64_t)off * p.v_stride_tok + ld_chunk * 8;
      const int so = slot * TILE + swz<D>(r, ld_chunk);
      cp_async_16(smem_u32(sK + so), ok ? kbase + ko : kbase, ok ? 16 : 0);
      cp_async_16(smem_u32(sV + so), ok ? vbase + vo : vbase, ok ? 16 : 0);
    }
  };

  if constexpr (BATCH) {
    if (!spec || key0 != key0_spec) {
#pragma unroll
      for (int s = 0; s < STAGES - 1; ++s) fetch_pages(key0, s, pgp[s]);
    }
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < my_tiles) issue_tile(s, s, pgp[s]);
      cp_async_commit();
    }
  } else {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < my_tiles) {
        fetch_pages(key0, s, pg);
        issue_tile(s, s, pg);
      }
      cp_async_commit();
    }
  }
  // Head dim 256 with 16 rows per thread keeps no page registers across the compute (they would
  // spill next to its 128 accumulator registers): it looks pages up right before each issue.
  constexpr bool PREFETCH = !(D == 256 && LOADS > 8);
  if (PREFETCH && STAGES - 1 < my_tiles) fetch_pages(key0, STAGES - 1, pg);

  // ---- query rows -> shared memory (zero rows past nrows) ----
  for (int idx = tid; idx < C::QROWS * CPR; idx += THREADS) {
    const int r = idx / CPR, c = idx % CPR;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < nrows) {
      const int gr = row0 + r, t = gr / G, h = gr % G;
      const T* src = reinterpret_cast<const T*>(p.q) + b * p.q_stride_b + t * p.q_stride_t +
                     (int64_t)(hk * G + h) * p.q_stride_h + c * 8;
      val = *reinterpret_cast<const uint4*>(src);
    }
    *reinterpret_cast<uint4*>(sQ + swz<D>(r, c)) = val;
  }
  __syncthreads();

  // A-fragment of Q for k-step ks (16 head-dim columns) of this warp's 16 rows.
  auto load_q = [&](uint32_t a[4], int ks) {
    const int r = mw * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
    ldsm_x4(a, smem_u32(sQ + swz<D>(r, 2 * ks + (lane >> 4))));
  };
  uint32_t qf[C::Q_IN_REGS ? D / 16 : 1][4];
  if constexpr (C::Q_IN_REGS) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) load_q(qf[ks], ks);
  }

  // Per-thread rows (fragment rows lane/4 and lane/4 + 8 of this warp's tile).
  int qpos[2];
  float slope[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = min(mw * 16 + (lane >> 2) + 8 * i, nrows - 1);
    const int gr = row0 + r;
    qpos[i] = L - p.q_len + gr / G;
    slope[i] = p.alibi ? p.alibi[b * p.alibi_stride_b + hk * G + gr % G] * kLog2e : 0.f;
  }

  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  // ---- main loop over this split's K/V tiles ----
  for (int it = 0; it < my_tiles; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile `it` visible to all; slot of tile it-1 free for reuse
    {
      const int nt = it + STAGES - 1;
      if (nt < my_tiles) {
        if constexpr (!PREFETCH) fetch_pages(key0, nt, pg);
        issue_tile(nt, nt % STAGES, pg);
        if constexpr (PREFETCH) {
          if (nt + 1 < my_tiles) fetch_pages(key0, nt + 1, pg);
        }
      }
      cp_async_commit();
    }
    const T* tK = sK + (it % STAGES) * TILE;
    const T* tV = sV + (it % STAGES) * TILE;
    const int wkey0 = key0 + it * N + kw * KPW;  // first key position of this warp's slice

    // S = Q K^T  (16 x KPW per warp)
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[4];
      if constexpr (C::Q_IN_REGS) {
        a[0] = qf[ks][0];
        a[1] = qf[ks][1];
        a[2] = qf[ks][2];
        a[3] = qf[ks][3];
      } else {
        load_q(a, ks);
      }
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        uint32_t bk[4];
        const int r = kw * KPW + 16 * j + (lane >> 4) * 8 + (lane & 7);
        ldsm_x4(bk, smem_u32(tK + swz<D>(r, 2 * ks + ((lane >> 3) & 1))));
        Ops::mma(s[2 * j], a, bk[0], bk[1]);
        Ops::mma(s[2 * j + 1], a, bk[2], bk[3]);
      }
    }

    // Scale (log2 domain), softcap, ALiBi, mask.
    const bool need_mask = !(wkey0 >= lo_in && wkey0 + KPW <= hi_in);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1;
        const int col = wkey0 + 8 * j + 2 * (lane & 3) + (e & 1);
        float x = s[j][e];
        x = p.use_softcap ? p.softcap_log2 * tanh_approx(x * p.softcap_inv) : x * p.scale_log2;
        if (p.alibi) x -= slope[i] * fabsf((float)(qpos[i] - col));
        if (need_mask) {
          const bool ok = col >= start && col < L_kv &&
                          (p.window_left < 0 || col >= qpos[i] - p.window_left) &&
                          (p.window_right < 0 || col <= qpos[i] + p.window_right);
          if (!ok) x = -INFINITY;
        }
        s[j][e] = x;
      }
    }

    // Online softmax.
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
    }
    float m_use[2], alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      m_use[i] = mx[i] == -INFINITY ? 0.f : mx[i];
      alpha[i] = ex2(m_run[i] - m_use[i]);
      m_run[i] = mx[i];
      l_run[i] *= alpha[i];
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][0] = ex2(s[j][0] - m_use[0]);
      s[j][1] = ex2(s[j][1] - m_use[0]);
      s[j][2] = ex2(s[j][2] - m_use[1]);
      s[j][3] = ex2(s[j][3] - m_use[1]);
      l_run[0] += s[j][0] + s[j][1];
      l_run[1] += s[j][2] + s[j][3];
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }

    // O += P V
#pragma unroll
    for (int kk = 0; kk < KPW / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = Ops::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = Ops::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bv[4];
        const int r = kw * KPW + 16 * kk + ((lane >> 3) & 1) * 8 + (lane & 7);
        ldsm_x4_t(bv, smem_u32(tV + swz<D>(r, 2 * dp + (lane >> 4))));
        Ops::mma(o[2 * dp], pa, bv[0], bv[1]);
        Ops::mma(o[2 * dp + 1], pa, bv[2], bv[3]);
      }
    }
  }

  // ---- merge the warps that shared a row tile, normalise, write ----
  cp_async_wait<0>();
  __syncthreads();  // pipeline smem is reused below
  float* sO = reinterpret_cast<float*>(smem_raw);
  float* sM = sO + C::NUM_WARPS * 16 * C::OSTRIDE;
  float* sL = sM + C::NUM_WARPS * 16;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
  const int fr = lane >> 2;  // fragment row
  if ((lane & 3) == 0) {
    sM[warp * 16 + fr] = m_run[0];
    sM[warp * 16 + fr + 8] = m_run[1];
  }
  __syncthreads();
  float f[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mt = -INFINITY;
#pragma unroll
    for (int k = 0; k < K_WARPS; ++k) mt = fmaxf(mt, sM[(mw * K_WARPS + k) * 16 + fr + 8 * i]);
    f[i] = m_run[i] == -INFINITY ? 0.f : ex2(m_run[i] - mt);
  }
  float* myO = sO + warp * 16 * C::OSTRIDE;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const int col = 8 * j + 2 * (lane & 3);
    *reinterpret_cast<float2*>(myO + fr * C::OSTRIDE + col) = make_float2(o[j][0] * f[0], o[j][1] * f[0]);
    *reinterpret_cast<float2*>(myO + (fr + 8) * C::OSTRIDE + col) =
        make_float2(o[j][2] * f[1], o[j][3] * f[1]);
  }
  if ((lane & 3) == 0) {
    sL[warp * 16 + fr] = l_run[0] * f[0];
    sL[warp * 16 + fr + 8] = l_run[1] * f[1];
  }
  __syncthreads();

  constexpr int C4 = D / 4;
  for (int idx = tid; idx < C::QROWS * C4; idx += THREADS) {
    const int r = idx / C4, c4 = idx % C4;
    if (r >= nrows) break;  // rows ascend with idx
    const int tile_w = (r >> 4) * K_WARPS, rr = r & 15;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    float lt = 0.f, mt = -INFINITY;
#pragma unroll
    for (int k = 0; k < K_WARPS; ++k) {
      const float4 v = *reinterpret_cast<const float4*>(sO + ((tile_w + k) * 16 + rr) * C::OSTRIDE + 4 * c4);
      acc.x += v.x;
      acc.y += v.y;
      acc.z += v.z;
      acc.w += v.w;
      lt += sL[(tile_w + k) * 16 + rr];
      mt = fmaxf(mt, sM[(tile_w + k) * 16 + rr]);
    }
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
    const float lse2 = lt > 0.f ? mt + __log2f(lt) : -INFINITY;
    const int gr = row0 + r, t = gr / G, hq = hk * G + gr % G;
    const int64_t orow = ((int64_t)b * p.q_len + t) * p.nheads + hq;
    if (p.num_splits == 1) {
      uint2 packed;
      packed.x = Ops::pack(acc.x * inv, acc.y * inv);
      packed.y = Ops::pack(acc.z * inv, acc.w * inv);
      *reinterpret_cast<uint2*>(reinterpret_cast<T*>(p.out) + orow * D + 4 * c4) = packed;
      if (c4 == 0 && p.lse) p.lse[((int64_t)b * p.nheads + hq) * p.q_len + t] = lse2 * kLn2;
    } else {
      const int64_t prow = (int64_t)split * p.batch * p.q_len * p.nheads + orow;
      *reinterpret_cast<float4*>(p.out_partial + prow * D + 4 * c4) =
          make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
      if (c4 == 0) p.lse_partial[prow] = lse2;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Split merge: grid ceil(rows / RPB), 128 threads; a row = one (batch, token, head).
// All split LSEs of the block's rows are loaded at once into shared memory, one warp per row turns
// them into weights, then each thread sums 4 columns over the splits with many loads in flight.
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(128) paged_decode_combine_kernel(const PagedDecodeParams p) {
  using Ops = TypeOps<T>;
  constexpr int TPR = D / 4;  // threads per row, 4 floats each
  constexpr int RPB = 128 / TPR;
  __shared__ float s_w[RPB][kMaxSplits];
  __shared__ float s_inv[RPB], s_lse[RPB];
  const int64_t rows = (int64_t)p.batch * p.q_len * p.nheads;
  const int64_t row0 = (int64_t)blockIdx.x * RPB;
  const int S = p.num_splits;
  grid_dependency_sync();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int i = tid; i < RPB * S; i += 128) {
    const int r = i / S, s = i % S;
    s_w[r][s] = row0 + r < rows ? p.lse_partial[s * rows + row0 + r] : -INFINITY;
  }
  __syncthreads();
  for (int r = warp; r < RPB; r += 4) {
    float mx = -INFINITY;
    for (int s = lane; s < S; s += 32) mx = fmaxf(mx, s_w[r][s]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (int s = lane; s < S; s += 32) {
      const float w = mx == -INFINITY ? 0.f : ex2(s_w[r][s] - mx);
      s_w[r][s] = w;
      sum += w;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) {
      s_inv[r] = sum > 0.f ? 1.f / sum : 0.f;
      s_lse[r] = sum > 0.f ? (mx + __log2f(sum)) * kLn2 : -INFINITY;
    }
  }
  __syncthreads();

  const int r = tid / TPR, c4 = tid % TPR;
  const int64_t row = row0 + r;
  if (row >= rows) return;
  const float* src = p.out_partial + row * D + 4 * c4;
  const int64_t split_stride = rows * D;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
  for (int s = 0; s < S; ++s) {
    const float w = s_w[r][s];
    const float4 v = *reinterpret_cast<const float4*>(src + s * split_stride);
    // Empty splits (w == 0) never wrote their partial: select, don't multiply (it may be NaN).
    acc.x += w > 0.f ? w * v.x : 0.f;
    acc.y += w > 0.f ? w * v.y : 0.f;
    acc.z += w > 0.f ? w * v.z : 0.f;
    acc.w += w > 0.f ? w * v.w : 0.f;
  }
  const float inv = s_inv[r];
  uint2 packed;
  packed.x = Ops::pack(acc.x * inv, acc.y * inv);
  packed.y = Ops::pack(acc.z * inv, acc.w * inv);
  *reinterpret_cast<uint2*>(reinterpret_cast<T*>(p.out) + row * D + 4 * c4) = packed;
  if (c4 == 0 && p.lse) {
    const int hq = row % p.nheads;
    const int64_t bt = row / p.nheads;  // b * q_len + t
    const int t = bt % p.q_len, b = bt / p.q_len;
    p.lse[((int64_t)b * p.nheads + hq) * p.q_len + t] = s_lse[r];
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
template <typename T, int D, int MT, int V>
const char* launch_config(const PagedDecodeParams& p, cudaStream_t stream) {
  using C = Cfg<D, MT, V>;
  auto kernel = paged_decode_kernel<T, D, MT, V>;
  // The shared-memory opt-in is per device; set it once (not during a graph capture's replays).
  static bool smem_set[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  if (dev < 0 || dev >= 64 || !smem_set[dev]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
    if (err != cudaSuccess) return cudaGetErrorString(err);
    if (dev >= 0 && dev < 64) smem_set[dev] = true;
  }
  dim3 grid(p.num_splits, p.nheads_k * p.num_row_chunks, p.batch);
  err = launch_kernel(kernel, grid, C::THREADS, C::SMEM, stream, p.pdl != 0, p);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  if (p.num_splits > 1) {
    constexpr int RPB = 128 / (D / 4);
    const int64_t rows = (int64_t)p.batch * p.q_len * p.nheads;
    err = launch_kernel(paged_decode_combine_kernel<T, D>, dim3((unsigned)((rows + RPB - 1) / RPB)), 128, 0,
                        stream, p.pdl != 0, p);
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  return nullptr;
}

template <typename T, int D, int MT, int V>
const char* info_config(int device, int info[4]) {
  using C = Cfg<D, MT, V>;
  auto kernel = paged_decode_kernel<T, D, MT, V>;
  int prev = 0;
  cudaGetDevice(&prev);
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  int blocks = 0;
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, C::THREADS, C::SMEM);
  cudaSetDevice(prev);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  info[0] = C::N;
  info[1] = blocks;
  info[2] = C::THREADS;
  info[3] = C::SMEM;
  return nullptr;
}

// Variant 3 is compiled for the hot path only (bf16, one row tile, head dim 64/128); any other variant number
// runs variant 0.
template <typename T, int D>
constexpr bool kHasVariants = (D == 64 || D == 128) && std::is_same<T, __nv_bfloat16>::value;

template <typename T, int D, int MT>
const char* launch_mt(const PagedDecodeParams& p, cudaStream_t stream) {
  if constexpr (MT == 1 && kHasVariants<T, D>) {
    if (p.variant == 3) return launch_config<T, D, 1, 3>(p, stream);
  }
  return launch_config<T, D, MT, 0>(p, stream);
}

template <typename T, int D, int MT>
const char* info_mt(int variant, int device, int info[4]) {
  if constexpr (MT == 1 && kHasVariants<T, D>) {
    if (variant == 3) return info_config<T, D, 1, 3>(device, info);
  }
  return info_config<T, D, MT, 0>(device, info);
}

template <typename T, int D>
const char* launch_dtype(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (p.m_tiles) {
    case 1: return launch_mt<T, D, 1>(p, stream);
    case 2: return launch_mt<T, D, 2>(p, stream);
    case 4: return launch_mt<T, D, 4>(p, stream);
    case 8: return launch_mt<T, D, 8>(p, stream);
    default: return "paged_decode: m_tiles must be 1, 2, 4 or 8";
  }
}

template <typename T, int D>
const char* info_dtype(int m_tiles, int variant, int device, int info[4]) {
  switch (m_tiles) {
    case 1: return info_mt<T, D, 1>(variant, device, info);
    case 2: return info_mt<T, D, 2>(variant, device, info);
    case 4: return info_mt<T, D, 4>(variant, device, info);
    case 8: return info_mt<T, D, 8>(variant, device, info);
    default: return "paged_decode: m_tiles must be 1, 2, 4 or 8";
  }
}

template <int D>
const char* launch_head_dim(const PagedDecodeParams& p, void* stream) {
  if (p.head_dim != D) return "paged_decode: head_dim does not match the kernel";
  auto s = reinterpret_cast<cudaStream_t>(stream);
  return p.is_bf16 ? launch_dtype<__nv_bfloat16, D>(p, s) : launch_dtype<half, D>(p, s);
}

template <int D>
const char* info_head_dim(int m_tiles, int is_bf16, int variant, int device, int info[4]) {
  return is_bf16 ? info_dtype<__nv_bfloat16, D>(m_tiles, variant, device, info)
                 : info_dtype<half, D>(m_tiles, variant, device, info);
}

}  // namespace pd
}  // namespace hfe
