// convnextv2_hub::dwconv7x7_layernorm: how every ConvNeXt block starts, the 7x7 depthwise conv
// (stride 1, padding 3, with bias) followed by the LayerNorm over channels, in one pass over a
// channels_last map, for the compiled CPU graphs (compiled.py). Returns the normalised map as NHWC.
//
// Why not oneDNN's conv + inductor's LayerNorm: inside a compiled graph each oneDNN call pays its
// setup again, and at batch 1 the convs are small (Tiny's stage 4: 7 x 7 x 768). Here each thread
// takes a run of output rows. It keeps the 7 input rows a row needs, zero-padded and in fp32, in a
// ring buffer (each input row is converted once), computes the conv for all channels, 16 at a time
// (one fp32 vector) for 7 or 8 neighbouring outputs, into a row buffer in L1, and normalises that
// row before writing it: the conv's output never goes to memory. fp32 accumulation, fp32 weights.
//
// Built on first use by native.py (GCC/Clang vector extensions, so any ISA the compiler targets).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int K = 7, PAD = 3, CB = 16;  // kernel size, padding, channels per vector
constexpr int LN_POSITIONS = 8;

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

// The first `n` values at p as a vector (the rest zero), and back: a channel count not a multiple of 16.
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

// Sum of a vector's lanes, by halves.
inline float sum(floatv v) {
  typedef float half __attribute__((vector_size(32)));
  typedef float quarter __attribute__((vector_size(16)));
  half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[1]) + (q[2] + q[3]);
}

struct Shape {
  int64_t N;
  int H, W, C;
  int Cp;     // C rounded up to a multiple of CB; the padding lanes hold zeros
  int tiles;  // output tiles of TW columns per row
  int Wp;     // padded input row width: tiles * TW + 2 * PAD
};

// Output rows [begin, end) of the flattened N * H rows.
template <typename T, int TW>
void conv_norm_rows(const T* in, const float* weight, const float* bias, const float* ln_weight,
                    const float* ln_bias, float eps, T* out, const Shape& s, int64_t begin, int64_t end) {
  const int H = s.H, W = s.W, C = s.C, Cp = s.Cp;
  const size_t row_floats = size_t(s.Wp) * Cp;
  // ring[(r + PAD) % K] holds padded input row r; the buffers are reused across calls.
  thread_local std::vector<float> ring, row_out, ln_params;
  ring.resize(K * row_floats);
  row_out.resize(size_t(s.tiles * TW + LN_POSITIONS) * Cp);
  ln_params.assign(2 * Cp, 0.f);  // the LayerNorm's weight and bias, zero-padded to Cp
  std::copy(ln_weight, ln_weight + C, ln_params.begin());
  std::copy(ln_bias, ln_bias + C, ln_params.begin() + Cp);
  const float *ln_w = ln_params.data(), *ln_b = ln_params.data() + Cp;
  int64_t ring_key[K];
  std::fill(ring_key, ring_key + K, -1);  // which (image, row) each slot holds: image * (H + 2 PAD) + row + PAD

  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / H;
    const int oh = int(i % H);
    const float* rows[K];
    for (int kh = 0; kh < K; ++kh) {
      const int r = oh + kh - PAD, slot = (r + PAD + K) % K;
      const int64_t key = n * (H + 2 * PAD) + r + PAD;
      float* dst = ring.data() + slot * row_floats;
      if (ring_key[slot] != key) {
        ring_key[slot] = key;
        if (r >= 0 && r < H) {
          // Laid out by channel block (Cp / CB blocks of Wp x CB), so that a tile reads consecutive
          // floats. Zeros left and right; the row itself fills all CB lanes of its columns.
          const T* src = in + ((n * H + r) * W) * C;
          for (int c0 = 0; c0 < C; c0 += CB) {
            float* block = dst + c0 * s.Wp;
            std::memset(block, 0, sizeof(float) * PAD * CB);
            std::memset(block + (W + PAD) * CB, 0, sizeof(float) * (s.Wp - W - PAD) * CB);
            for (int x = 0; x < W; ++x)
              store(block + (x + PAD) * CB, load_first(src + int64_t(x) * C + c0, std::min(CB, C - c0)));
          }
        } else {
          std::memset(dst, 0, sizeof(float) * row_floats);
        }
      }
      rows[kh] = dst;
    }
    // The conv, 16 channels x TW columns at a time, into row_out (fp32, W x Cp).
    for (int c0 = 0; c0 < Cp; c0 += CB) {
      const int cn = std::min(CB, C - c0);
      floatv w[K * K];
      for (int k = 0; k < K * K; ++k) w[k] = load_first(weight + k * C + c0, cn);
      const floatv b = load_first(bias + c0, cn);
      for (int tile = 0; tile < s.tiles; ++tile) {
        const int ow0 = tile * TW;
        floatv acc[TW];
#pragma GCC unroll 8
        for (int t = 0; t < TW; ++t) acc[t] = b;
        for (int kh = 0; kh < K; ++kh) {
          const float* row = rows[kh] + c0 * s.Wp + ow0 * CB;
#pragma GCC unroll 7
          for (int kw = 0; kw < K; ++kw) {
            const floatv wv = w[kh * K + kw];
#pragma GCC unroll 8
            for (int t = 0; t < TW; ++t) acc[t] += load(row + (t + kw) * CB) * wv;
          }
        }
#pragma GCC unroll 8
        for (int t = 0; t < TW; ++t) store(row_out.data() + (ow0 + t) * Cp + c0, acc[t]);
      }
    }
    // The LayerNorm of each position over its C channels (two passes: mean, then variance), for
    // LN_POSITIONS positions at a time: one position's chain of sums, square root and division is
    // latency-bound, independent chains overlap. The padding lanes are zero, so they add nothing to
    // the sum and exactly (Cp - C) * mean^2 to the squares, which is taken off again.
    T* o = out + i * W * C;
    for (int x0 = 0; x0 < W; x0 += LN_POSITIONS) {
      const float* p = row_out.data() + x0 * Cp;  // row_out has room for LN_POSITIONS past W
      float mean[LN_POSITIONS], rstd[LN_POSITIONS];
      floatv acc[LN_POSITIONS] = {};
      for (int c0 = 0; c0 < Cp; c0 += CB)
#pragma GCC unroll 8
        for (int j = 0; j < LN_POSITIONS; ++j) acc[j] += load(p + j * Cp + c0);
#pragma GCC unroll 8
      for (int j = 0; j < LN_POSITIONS; ++j) {
        mean[j] = sum(acc[j]) / C;
        acc[j] = floatv{};
      }
      for (int c0 = 0; c0 < Cp; c0 += CB)
#pragma GCC unroll 8
        for (int j = 0; j < LN_POSITIONS; ++j) {
          const floatv d = load(p + j * Cp + c0) - mean[j];
          acc[j] += d * d;
        }
#pragma GCC unroll 8
      for (int j = 0; j < LN_POSITIONS; ++j)
        rstd[j] = 1.f / std::sqrt(std::max(0.f, (sum(acc[j]) - (Cp - C) * mean[j] * mean[j]) / C) + eps);
      for (int j = 0; j < std::min(LN_POSITIONS, W - x0); ++j)
        for (int c0 = 0; c0 < Cp; c0 += CB)
          store_first(o + int64_t(x0 + j) * C + c0,
                      (load(p + j * Cp + c0) - mean[j]) * rstd[j] * load(ln_w + c0) + load(ln_b + c0),
                      std::min(CB, C - c0));
    }
  }
}

template <typename T>
void run(const T* in, const float* weight, const float* bias, const float* ln_weight, const float* ln_bias,
         float eps, T* out, int64_t N, int H, int W, int C) {
  // Tiles of 7 outputs where the width allows (ConvNeXt's 56/28/14/7 at 224), else 8.
  const bool sevens = W % 7 == 0;
  const int TW = sevens ? 7 : 8, tiles = (W + TW - 1) / TW;
  const Shape s{N, H, W, C, (C + CB - 1) / CB * CB, tiles, tiles * TW + 2 * PAD};
  // Contiguous runs of rows per thread, so that consecutive rows share their input rows.
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    if (sevens)
      conv_norm_rows<T, 7>(in, weight, bias, ln_weight, ln_bias, eps, out, s, begin, end);
    else
      conv_norm_rows<T, 8>(in, weight, bias, ln_weight, ln_bias, eps, out, s, begin, end);
  });
}

// x: N x C x H x W (any layout; channels_last is copy-free), fp32 or bf16. weight: 49 x C (taps
// row-major, then channels); bias, ln_weight, ln_bias: C; all fp32. Returns N x H x W x C in x's dtype.
at::Tensor dwconv7x7_layernorm(const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& bias_,
                               const at::Tensor& ln_weight_, const at::Tensor& ln_bias_, double eps) {
  TORCH_CHECK(x_.dim() == 4, "dwconv7x7_layernorm: x must be N x C x H x W, got ", x_.dim(), " dimensions");
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kBFloat16,
              "dwconv7x7_layernorm: x must be float32 or bfloat16, got ", x_.scalar_type());
  const auto x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  auto fp32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const auto weight = fp32(weight_), bias = fp32(bias_), ln_weight = fp32(ln_weight_), ln_bias = fp32(ln_bias_);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.numel() == K * K * C && bias.numel() == C && ln_weight.numel() == C && ln_bias.numel() == C,
              "dwconv7x7_layernorm: weight must be 49 x C and the others C for C = ", C);
  auto out = at::empty({N, H, W, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.scalar_type() == at::kBFloat16)
    run(x.const_data_ptr<c10::BFloat16>(), weight.const_data_ptr<float>(), bias.const_data_ptr<float>(),
        ln_weight.const_data_ptr<float>(), ln_bias.const_data_ptr<float>(), float(eps),
        out.mutable_data_ptr<c10::BFloat16>(), N, int(H), int(W), int(C));
  else
    run(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), bias.const_data_ptr<float>(),
        ln_weight.const_data_ptr<float>(), ln_bias.const_data_ptr<float>(), float(eps),
        out.mutable_data_ptr<float>(), N, int(H), int(W), int(C));
  return out;
}

}  // namespace

// The schema is defined in native.py (with its shape function for torch.compile).
TORCH_LIBRARY_IMPL(convnextv2_hub, CPU, m) { m.impl("dwconv7x7_layernorm", &dwconv7x7_layernorm); }
