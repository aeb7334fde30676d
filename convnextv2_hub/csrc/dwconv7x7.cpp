// convnextv2_hub::dwconv7x7: the 7x7 depthwise convolution (stride 1, padding 3, with bias) that
// starts every ConvNeXt block, on a channels_last map, for the compiled CPU graphs (compiled.py).
//
// Why not oneDNN's: inside a compiled graph each of its calls pays ~65 us of setup, and at batch 1
// the convolutions are small (Tiny's stage 4: 7 x 7 x 768), so 18 calls cost ~3 ms of a ~17 ms
// forward. Here each task takes one image and 16 channels, copies them (as fp32) into a zero-padded
// buffer that stays in L2, and computes rows of 7 or 8 outputs with all 49 taps in registers' reach:
// no bounds checks in the inner loop, fp32 accumulation, fp32 weights.
//
// Built on first use by native.py (GCC/Clang vector extensions, so any ISA the compiler targets).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int K = 7, PAD = 3, CB = 16;  // kernel size, padding, channels per task (one fp32 vector)

typedef float floatv __attribute__((vector_size(64), aligned(4)));
typedef uint32_t u32v __attribute__((vector_size(64), aligned(4)));
typedef uint16_t u16v __attribute__((vector_size(32), aligned(2)));

inline floatv load(const float* p) { return *reinterpret_cast<const floatv*>(p); }
inline floatv load(const c10::BFloat16* p) {
  u32v bits = __builtin_convertvector(*reinterpret_cast<const u16v*>(p), u32v) << 16;
  floatv v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline void store(float* p, floatv v) { *reinterpret_cast<floatv*>(p) = v; }
inline void store(c10::BFloat16* p, floatv v) {
  u32v bits;
  std::memcpy(&bits, &v, sizeof v);
  bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even, as c10::BFloat16 does for finite values
  *reinterpret_cast<u16v*>(p) = __builtin_convertvector(bits >> 16, u16v);
}

// The first `n` channels at p as a vector (the rest zero), and back: a partial last channel block.
template <typename T>
inline floatv load_first(const T* p, int n) {
  if (n == CB) return load(p);
  float tmp[CB] = {};
  for (int c = 0; c < n; ++c) tmp[c] = static_cast<float>(p[c]);
  return load(tmp);
}
template <typename T>
inline void store_first(T* p, floatv v, int n) {
  if (n == CB) return store(p, v);
  T tmp[CB];
  store(tmp, v);
  std::copy(tmp, tmp + n, p);
}

// Channels [c0, c0 + cn) of one H x W image. buf holds the zero-padded copy: (H + 6) x Wp x CB floats.
template <typename T, int TW>
void conv_channel_block(const T* in, const float* weight, const float* bias, T* out, int H, int W, int C,
                        int c0, int cn, float* buf) {
  const int tiles = (W + TW - 1) / TW, Wp = tiles * TW + 2 * PAD;
  const floatv zero = {};
  // Only the border is zeroed: the interior is overwritten below.
  for (int h = 0; h < H + 2 * PAD; ++h) {
    bool pad_row = h < PAD || h >= H + PAD;
    for (int x = 0; x < Wp; ++x)
      if (pad_row || x < PAD || x >= W + PAD) store(buf + (h * Wp + x) * CB, zero);
  }
  for (int h = 0; h < H; ++h)
    for (int x = 0; x < W; ++x)
      store(buf + ((h + PAD) * Wp + x + PAD) * CB, load_first(in + (int64_t(h) * W + x) * C + c0, cn));
  floatv w[K * K];
  for (int k = 0; k < K * K; ++k) w[k] = load_first(weight + k * C + c0, cn);
  const floatv b = load_first(bias + c0, cn);

  for (int oh = 0; oh < H; ++oh)
    for (int tile = 0; tile < tiles; ++tile) {
      const int ow0 = tile * TW;
      floatv acc[TW];
#pragma GCC unroll 8
      for (int t = 0; t < TW; ++t) acc[t] = b;
      for (int kh = 0; kh < K; ++kh) {
        const float* row = buf + ((oh + kh) * Wp + ow0) * CB;
#pragma GCC unroll 7
        for (int kw = 0; kw < K; ++kw) {
          const floatv wv = w[kh * K + kw];
#pragma GCC unroll 8
          for (int t = 0; t < TW; ++t) acc[t] += load(row + (t + kw) * CB) * wv;
        }
      }
      T* o = out + (int64_t(oh) * W + ow0) * C + c0;
      for (int t = 0; t < std::min(TW, W - ow0); ++t) store_first(o + int64_t(t) * C, acc[t], cn);
    }
}

template <typename T>
void dwconv7x7_nhwc(const T* in, const float* weight, const float* bias, T* out, int64_t N, int H, int W, int C) {
  const int blocks = (C + CB - 1) / CB;
  // Rows of 7 outputs where the width allows (ConvNeXt's 56/28/14/7 at 224), else 8.
  const bool sevens = W % 7 == 0;
  const int Wp = (sevens ? W : (W + 7) / 8 * 8) + 2 * PAD;
  const size_t buf_size = size_t(H + 2 * PAD) * Wp * CB;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> buf;  // reused across calls: no allocation or page faults per call
    if (buf.size() < buf_size) buf.resize(buf_size);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / blocks, offset = n * H * W * C;
      const int c0 = int(i % blocks) * CB, cn = std::min(CB, C - c0);
      if (sevens)
        conv_channel_block<T, 7>(in + offset, weight, bias, out + offset, H, W, C, c0, cn, buf.data());
      else
        conv_channel_block<T, 8>(in + offset, weight, bias, out + offset, H, W, C, c0, cn, buf.data());
    }
  });
}

// x: N x C x H x W (any layout; channels_last is copy-free), fp32 or bf16. weight: 49 x C (taps
// row-major, then channels), bias: C; both fp32. Returns x's dtype, channels_last.
at::Tensor dwconv7x7(const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& bias_) {
  TORCH_CHECK(x_.dim() == 4, "dwconv7x7: x must be N x C x H x W, got ", x_.dim(), " dimensions");
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kBFloat16,
              "dwconv7x7: x must be float32 or bfloat16, got ", x_.scalar_type());
  const auto x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  const auto weight = weight_.to(at::kFloat).contiguous(), bias = bias_.to(at::kFloat).contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.numel() == K * K * C && bias.numel() == C,
              "dwconv7x7: weight must be 49 x C and bias C for C = ", C);
  auto out = at::empty({N, C, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (x.scalar_type() == at::kBFloat16)
    dwconv7x7_nhwc(x.const_data_ptr<c10::BFloat16>(), weight.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                   out.mutable_data_ptr<c10::BFloat16>(), N, int(H), int(W), int(C));
  else
    dwconv7x7_nhwc(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                   out.mutable_data_ptr<float>(), N, int(H), int(W), int(C));
  return out;
}

}  // namespace

// The schema is defined in native.py (with its shape function for torch.compile).
TORCH_LIBRARY_IMPL(convnextv2_hub, CPU, m) { m.impl("dwconv7x7", &dwconv7x7); }
