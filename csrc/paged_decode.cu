// Paged KV-cache decode attention: kernel entry points and the torch binding.
//
// This one file builds two ways:
//   * nvcc (default): the kernels, device code in paged_decode_kernel.cuh. -DHFE_HEAD_DIM=64|128|256
//     restricts an object to one head dim so the JIT build compiles head dims in parallel; without
//     it every head dim is compiled (the CI compile check does that).
//   * host C++ with -DHFE_TORCH_BINDING (compiled as C++, no CUDA headers): registers the operators
//     torch.ops.hf_efficient_C.paged_decode and .kernel_info with TORCH_LIBRARY and calls the
//     kernel entry points with raw pointers and the caller's CUDA stream.

#ifndef HFE_TORCH_BINDING

#include "paged_decode_kernel.cuh"

namespace hfe {

#if !defined(HFE_HEAD_DIM) || HFE_HEAD_DIM == 64
const char* paged_decode_launch_d64(const PagedDecodeParams& p, void* stream) {
  return pd::launch_head_dim<64>(p, stream);
}
const char* paged_decode_info_d64(int m_tiles, int is_bf16, int variant, int device, int info[4]) {
  return pd::info_head_dim<64>(m_tiles, is_bf16, variant, device, info);
}
#endif

#if !defined(HFE_HEAD_DIM) || HFE_HEAD_DIM == 128
const char* paged_decode_launch_d128(const PagedDecodeParams& p, void* stream) {
  return pd::launch_head_dim<128>(p, stream);
}
const char* paged_decode_info_d128(int m_tiles, int is_bf16, int variant, int device, int info[4]) {
  return pd::info_head_dim<128>(m_tiles, is_bf16, variant, device, info);
}
#endif

#if !defined(HFE_HEAD_DIM) || HFE_HEAD_DIM == 256
const char* paged_decode_launch_d256(const PagedDecodeParams& p, void* stream) {
  return pd::launch_head_dim<256>(p, stream);
}
const char* paged_decode_info_d256(int m_tiles, int is_bf16, int variant, int device, int info[4]) {
  return pd::info_head_dim<256>(m_tiles, is_bf16, variant, device, info);
}
#endif

}  // namespace hfe

#else  // HFE_TORCH_BINDING

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "paged_decode.cuh"

namespace {

template <typename P>
P* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<P*>(t->data_ptr()) : nullptr;
}

int log2_exact(int64_t x) {
  int l = 0;
  while ((int64_t{1} << l) < x) ++l;
  TORCH_CHECK((int64_t{1} << l) == x, "paged_decode: block_size must be a power of two, got ", x);
  return l;
}

// Shapes, dtypes and devices are validated by the Python launcher; this checks what memory safety
// needs and fills the parameter block.
void paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& seqlens, const std::optional<at::Tensor>& block_table,
                  const std::optional<at::Tensor>& batch_idx, const std::optional<at::Tensor>& leftpad,
                  const std::optional<at::Tensor>& alibi, at::Tensor& out,
                  const std::optional<at::Tensor>& lse, const std::optional<at::Tensor>& out_partial,
                  const std::optional<at::Tensor>& lse_partial, double softmax_scale, double softcap,
                  int64_t window_left, int64_t window_right, int64_t num_splits, int64_t tiles_per_split,
                  int64_t variant, bool pdl, int64_t stream) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "paged_decode: 4-d q/k/v");
  TORCH_CHECK(q.stride(3) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_decode: head_dim must be contiguous");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes(), "paged_decode: out must be contiguous like q");
  TORCH_CHECK(num_splits >= 1 && num_splits <= hfe::kMaxSplits, "paged_decode: num_splits must be in [1, ",
              hfe::kMaxSplits, "], got ", num_splits);
  TORCH_CHECK(tiles_per_split >= 0, "paged_decode: tiles_per_split >= 0");
  if (num_splits > 1) {
    TORCH_CHECK(out_partial.has_value() && lse_partial.has_value(), "paged_decode: split buffers missing");
    TORCH_CHECK(out_partial->numel() >= num_splits * q.numel() &&
                    lse_partial->numel() >= num_splits * q.numel() / q.size(3),
                "paged_decode: split buffers too small");
  }
  hfe::PagedDecodeParams p{};
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.seqlens = static_cast<const int32_t*>(seqlens.data_ptr());
  p.block_table = ptr_or_null<const int32_t>(block_table);
  p.batch_idx = ptr_or_null<const int32_t>(batch_idx);
  p.leftpad = ptr_or_null<const int32_t>(leftpad);
  p.alibi = ptr_or_null<const float>(alibi);
  p.out = out.data_ptr();
  p.lse = ptr_or_null<float>(lse);
  p.out_partial = ptr_or_null<float>(out_partial);
  p.lse_partial = ptr_or_null<float>(lse_partial);
  p.q_stride_b = q.stride(0);
  p.q_stride_t = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.k_stride_page = k_cache.stride(0);
  p.k_stride_tok = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.v_stride_page = v_cache.stride(0);
  p.v_stride_tok = v_cache.stride(1);
  p.v_stride_head = v_cache.stride(2);
  p.bt_stride = block_table.has_value() ? block_table->stride(0) : 0;
  p.alibi_stride_b = (alibi.has_value() && alibi->dim() == 2) ? alibi->stride(0) : 0;
  p.batch = static_cast<int>(q.size(0));
  p.q_len = static_cast<int>(q.size(1));
  p.nheads = static_cast<int>(q.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.nheads_k = static_cast<int>(k_cache.size(2));
  TORCH_CHECK(p.nheads % p.nheads_k == 0, "paged_decode: nheads must be a multiple of nheads_k");
  p.block_size_log2 = block_table.has_value() ? log2_exact(k_cache.size(1)) : 0;
  p.num_splits = static_cast<int>(num_splits);
  p.tiles_per_split = static_cast<int>(tiles_per_split);
  p.bt_cols = block_table.has_value() ? static_cast<int>(block_table->size(1)) : 0;
  TORCH_CHECK(k_cache.size(0) <= INT32_MAX && k_cache.size(1) <= INT32_MAX, "paged_decode: cache too large");
  p.num_pages = static_cast<int>(k_cache.size(0));
  const int64_t cache_len = block_table.has_value() ? (int64_t)p.bt_cols << p.block_size_log2 : k_cache.size(1);
  p.cache_len = static_cast<int>(std::min<int64_t>(cache_len, INT32_MAX));
  p.variant = static_cast<int>(variant);
  p.pdl = pdl ? 1 : 0;
  p.is_bf16 = q.scalar_type() == at::ScalarType::BFloat16 ? 1 : 0;
  TORCH_CHECK(p.is_bf16 || q.scalar_type() == at::ScalarType::Half, "paged_decode: fp16 or bf16 only");
  constexpr double kLog2e = 1.4426950408889634;
  p.use_softcap = softcap > 0.0 ? 1 : 0;
  p.scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  p.softcap_log2 = static_cast<float>(softcap * kLog2e);
  p.softcap_inv = softcap > 0.0 ? static_cast<float>(softmax_scale / softcap) : 0.f;
  p.window_left = static_cast<int>(window_left);
  p.window_right = static_cast<int>(window_right);
  hfe::paged_decode_plan_rows(p);

  void* s = reinterpret_cast<void*>(stream);
  const char* err = nullptr;
  switch (p.head_dim) {
    case 64: err = hfe::paged_decode_launch_d64(p, s); break;
    case 128: err = hfe::paged_decode_launch_d128(p, s); break;
    case 256: err = hfe::paged_decode_launch_d256(p, s); break;
    default: TORCH_CHECK(false, "paged_decode: head_dim must be 64, 128 or 256, got ", p.head_dim);
  }
  TORCH_CHECK(err == nullptr, "paged_decode kernel launch failed: ", err);
}

// [keys per tile, thread blocks per SM, threads per block, shared memory bytes]
std::vector<int64_t> kernel_info(int64_t head_dim, int64_t m_tiles, bool bf16, int64_t variant,
                                 int64_t device) {
  int info[4] = {0, 0, 0, 0};
  const int mt = static_cast<int>(m_tiles), v = static_cast<int>(variant), dev = static_cast<int>(device);
  const char* err = nullptr;
  switch (head_dim) {
    case 64: err = hfe::paged_decode_info_d64(mt, bf16, v, dev, info); break;
    case 128: err = hfe::paged_decode_info_d128(mt, bf16, v, dev, info); break;
    case 256: err = hfe::paged_decode_info_d256(mt, bf16, v, dev, info); break;
    default: TORCH_CHECK(false, "paged_decode: head_dim must be 64, 128 or 256, got ", head_dim);
  }
  TORCH_CHECK(err == nullptr, "paged_decode kernel_info failed: ", err);
  return {info[0], info[1], info[2], info[3]};
}

}  // namespace

TORCH_LIBRARY(hf_efficient_C, m) {
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, Tensor? block_table, "
      "Tensor? batch_idx, Tensor? leftpad, Tensor? alibi, Tensor(a!) out, Tensor(b!)? lse, "
      "Tensor(c!)? out_partial, Tensor(d!)? lse_partial, float softmax_scale, float softcap, "
      "int window_left, int window_right, int num_splits, int tiles_per_split, int variant, bool pdl, int stream) -> ()",
      &paged_decode);
  m.def("kernel_info(int head_dim, int m_tiles, bool bf16, int variant, int device) -> int[]", &kernel_info);
}

#endif  // HFE_TORCH_BINDING
