// cbam-insert's optional CPU kernel: one CBAM forward (inference, float32; 1-, 2- or 3-D maps, contiguous or
// channels-last) in a single call. Built on first use by cbam_insert.native (torch.utils.cpp_extension); the
// package works without it. The maths is the module's:
//   a  = sigmoid(fc2(relu(fc1(avg_p x))) + fc2(relu(fc1(max_p x))))        (N, C)
//   F' = a * x;  s = [mean_c F'; max_c F'] (or [max; mean]);  m = sigmoid(conv_kxk(s))   (N, H, W)
//   out = F' * m
// in three passes over x: spatial mean+max; channel mean+max of a*x (F' is not stored); and
// out = (x * a) * m (the same products as storing F', so bit-equal to doing so), with the MLP and the
// small convolution between them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlockBytes = int64_t(1) << 22;  // samples per block: about 4 MiB of x

// max that keeps a NaN, as torch.amax does
inline float nan_max(float m, float v) { return (std::isnan(v) || v > m) ? v : m; }

inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

float hsum(const Vec& v) {
  alignas(64) float buf[Vec::size()];
  v.store(buf);
  float s = 0.f;
  for (int i = 0; i < Vec::size(); ++i) s += buf[i];
  return s;
}

float hmax(const Vec& v) {
  alignas(64) float buf[Vec::size()];
  v.store(buf);
  float m = kNegInf;
  for (int i = 0; i < Vec::size(); ++i) m = nan_max(m, buf[i]);
  return m;
}

float dot(const float* a, const float* b, int64_t n) {
  constexpr int64_t L = Vec::size();
  Vec s0(0.f), s1(0.f);
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + i + L), Vec::loadu(b + i + L), s1);
  }
  for (; i + L <= n; i += L) s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
  float s = hsum(s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// spatial mean and max of each (sample, channel) row of x
void spatial_pool(const float* x, int64_t rows, int64_t P, float* mean, float* mx) {
  constexpr int64_t L = Vec::size();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* row = x + r * P;
      Vec s0(0.f), s1(0.f), m0(kNegInf), m1(kNegInf);
      int64_t j = 0;
      for (; j + 2 * L <= P; j += 2 * L) {
        Vec v0 = Vec::loadu(row + j), v1 = Vec::loadu(row + j + L);
        s0 = s0 + v0;
        s1 = s1 + v1;
        m0 = at::vec::maximum(m0, v0);
        m1 = at::vec::maximum(m1, v1);
      }
      for (; j + L <= P; j += L) {
        Vec v = Vec::loadu(row + j);
        s0 = s0 + v;
        m0 = at::vec::maximum(m0, v);
      }
      float s = hsum(s0 + s1);
      float m = hmax(at::vec::maximum(m0, m1));
      for (; j < P; ++j) {
        s += row[j];
        m = nan_max(m, row[j]);
      }
      mean[r] = s / static_cast<float>(P);
      mx[r] = m;
    }
  });
}

// a (N, C) = sigmoid(sum over the two descriptors of fc2(relu(fc1(d))))
void channel_gate(const float* mean, const float* mx, int64_t N, int64_t C, int64_t H, const float* w1,
                  const float* b1, const float* w2, const float* b2, float* a) {
  // hidden activations, rows [avg of sample 0..N-1 ; max of sample 0..N-1]
  std::vector<float> hid(2 * N * H);
  at::parallel_for(0, H, std::max<int64_t>(1, 16384 / std::max<int64_t>(C * N, 1)), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const float* wj = w1 + j * C;
      const float bias = b1 ? b1[j] : 0.f;
      for (int64_t n = 0; n < N; ++n) {
        hid[n * H + j] = std::max(dot(wj, mean + n * C, C) + bias, 0.f);
        hid[(N + n) * H + j] = std::max(dot(wj, mx + n * C, C) + bias, 0.f);
      }
    }
  });
  at::parallel_for(0, C, std::max<int64_t>(1, 16384 / std::max<int64_t>(H * N, 1)), [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const float* wc = w2 + c * H;
      const float bias = b2 ? b2[c] : 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const float avg_logit = dot(wc, hid.data() + n * H, H) + bias;
        const float max_logit = dot(wc, hid.data() + (N + n) * H, H) + bias;
        a[n * C + c] = sigmoid(avg_logit + max_logit);
      }
    }
  });
}

// NHWC spatial mean and max of each channel: tasks of (sample, channel chunk) walk all positions
void spatial_pool_nhwc(const float* x, int64_t N, int64_t P, int64_t C, float* mean, float* mx) {
  constexpr int64_t L = Vec::size();
  constexpr int64_t kChannels = 256;  // channels a task: the accumulators stay in L1
  constexpr int64_t kRun = 256;       // positions summed before being added to the total (pairwise-ish)
  const int64_t chunks = (C + kChannels - 1) / kChannels;
  at::parallel_for(0, N * chunks, 1, [&](int64_t b, int64_t e) {
    alignas(64) float total[kChannels];
    alignas(64) float part[kChannels];
    alignas(64) float best[kChannels];
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / chunks, c0 = (t % chunks) * kChannels, len = std::min(kChannels, C - c0);
      const int64_t vlen = len - len % L;
      std::fill(total, total + len, 0.f);
      std::fill(best, best + len, kNegInf);
      const float* xs = x + n * P * C + c0;
      for (int64_t p0 = 0; p0 < P; p0 += kRun) {
        std::fill(part, part + len, 0.f);
        const int64_t p1 = std::min(P, p0 + kRun);
        for (int64_t p = p0; p < p1; ++p) {
          const float* row = xs + p * C;
          for (int64_t j = 0; j < vlen; j += L) {
            Vec v = Vec::loadu(row + j);
            (Vec::loadu(part + j) + v).store(part + j);
            at::vec::maximum(Vec::loadu(best + j), v).store(best + j);
          }
          for (int64_t j = vlen; j < len; ++j) {
            part[j] += row[j];
            best[j] = nan_max(best[j], row[j]);
          }
        }
        for (int64_t j = 0; j < len; ++j) total[j] += part[j];
      }
      for (int64_t j = 0; j < len; ++j) {
        mean[n * C + c0 + j] = total[j] / static_cast<float>(P);
        mx[n * C + c0 + j] = best[j];
      }
    }
  });
}

// ---- channel pooling and the output, for each layout ----

// NCHW: channel sum and max of a * x at `len` consecutive positions (len <= kPositions) starting at xs, whose
// channel planes are P apart; mean and max written to mean_out / max_out
constexpr int64_t kPositions = 512;  // positions at a time: the two accumulators stay in L1
void pool_positions(const float* xs, const float* as, int64_t C, int64_t P, int64_t len, float* mean_out,
                    float* max_out) {
  constexpr int64_t L = Vec::size();
  alignas(64) float acc[kPositions];
  alignas(64) float mx[kPositions];
  const int64_t vlen = len - len % L;
  std::fill(acc, acc + len, 0.f);
  std::fill(mx, mx + len, kNegInf);
  for (int64_t c = 0; c < C; ++c) {
    const float* row = xs + c * P;
    const float ac = as[c];
    const Vec av(ac);
    for (int64_t j = 0; j < vlen; j += L) {
      Vec v = Vec::loadu(row + j) * av;
      (Vec::loadu(acc + j) + v).store(acc + j);
      at::vec::maximum(Vec::loadu(mx + j), v).store(mx + j);
    }
    for (int64_t j = vlen; j < len; ++j) {
      const float v = row[j] * ac;
      acc[j] += v;
      mx[j] = nan_max(mx[j], v);
    }
  }
  const float inv = static_cast<float>(C);
  for (int64_t j = 0; j < len; ++j) {
    mean_out[j] = acc[j] / inv;
    max_out[j] = mx[j];
  }
}

// NHWC: channel mean and max of a * x at one position (its C channels contiguous at row)
void pool_position(const float* row, const float* as, int64_t C, float* mean_out, float* max_out) {
  constexpr int64_t L = Vec::size();
  const int64_t vlen = C - C % L;
  Vec s(0.f), m(kNegInf);
  for (int64_t j = 0; j < vlen; j += L) {
    Vec v = Vec::loadu(row + j) * Vec::loadu(as + j);
    s = s + v;
    m = at::vec::maximum(m, v);
  }
  float sum = hsum(s), best = hmax(m);
  for (int64_t j = vlen; j < C; ++j) {
    const float v = row[j] * as[j];
    sum += v;
    best = nan_max(best, v);
  }
  *mean_out = sum / static_cast<float>(C);
  *max_out = best;
}

// acc[0:W] += the kh x k convolution of one Hh x W plane at output row y (zero padding)
void conv_row_into(const float* plane, int64_t y, int64_t Hh, int64_t W, const float* w, int64_t kh, int64_t k,
                   float* acc) {
  constexpr int64_t L = Vec::size();
  for (int64_t dy = 0; dy < kh; ++dy) {
    const int64_t yy = y + dy - kh / 2;
    if (yy < 0 || yy >= Hh) continue;
    const float* in = plane + yy * W;
    const float* wr = w + dy * k;
    for (int64_t dx = 0; dx < k; ++dx) {
      const int64_t off = dx - k / 2;
      const int64_t x0 = std::max<int64_t>(0, -off), x1 = std::min<int64_t>(W, W - off);
      const float wv = wr[dx];
      const Vec wvec(wv);
      int64_t xx = x0;
      for (; xx + L <= x1; xx += L)
        at::vec::fmadd(wvec, Vec::loadu(in + xx + off), Vec::loadu(acc + xx)).store(acc + xx);
      for (; xx < x1; ++xx) acc[xx] += wv * in[xx + off];
    }
  }
}

// o[0:len] = (x[0:len] * ac) * m[0:len]  (NCHW: one channel's stretch of positions)
inline void scale_stretch(const float* x, float ac, const float* m, int64_t len, float* o) {
  constexpr int64_t L = Vec::size();
  const Vec av(ac);
  int64_t j = 0;
  for (; j + L <= len; j += L) ((Vec::loadu(x + j) * av) * Vec::loadu(m + j)).store(o + j);
  for (; j < len; ++j) o[j] = (x[j] * ac) * m[j];
}

// o[0:C] = (x[0:C] * a[0:C]) * mp  (NHWC: one position's channels)
inline void scale_position(const float* x, const float* a, float mp, int64_t C, float* o) {
  constexpr int64_t L = Vec::size();
  const Vec mv(mp);
  int64_t j = 0;
  for (; j + L <= C; j += L) ((Vec::loadu(x + j) * Vec::loadu(a + j)) * mv).store(o + j);
  for (; j < C; ++j) o[j] = (x[j] * a[j]) * mp;
}

// channel mean and max of a * x, written as the two planes of `pooled` (N, 2, P)
void channel_pool(const float* x, const float* a, int64_t N, int64_t C, int64_t P, bool max_first, bool nhwc,
                  float* pooled) {
  if (nhwc) {
    at::parallel_for(0, N * P, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / P, p = t % P;
        pool_position(x + t * C, a + n * C, C, pooled + (n * 2 + (max_first ? 1 : 0)) * P + p,
                      pooled + (n * 2 + (max_first ? 0 : 1)) * P + p);
      }
    });
    return;
  }
  const int64_t chunks = (P + kPositions - 1) / kPositions;
  at::parallel_for(0, N * chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / chunks, p0 = (t % chunks) * kPositions, len = std::min(kPositions, P - p0);
      pool_positions(x + n * C * P + p0, a + n * C, C, P, len, pooled + (n * 2 + (max_first ? 1 : 0)) * P + p0,
                     pooled + (n * 2 + (max_first ? 0 : 1)) * P + p0);
    }
  });
}

// m (N, P) = sigmoid(scale * (conv(pooled) + bias) + shift) for maps of T x Hh x W positions (1-D: T = Hh = 1,
// 2-D: T = 1) and a kernel of kt x kh x k (1 where a dim is absent), zero padding of half the kernel; scale and
// shift are an eval-mode BatchNorm folded (1 and 0 without one). Weights are [channel][dt][dy][dx].
void spatial_gate(const float* pooled, int64_t N, int64_t T, int64_t Hh, int64_t W, const float* w, int64_t kt,
                  int64_t kh, int64_t k, const float* bias, float scale, float shift, float* m) {
  const int64_t P = T * Hh * W, rows = T * Hh;
  at::parallel_for(0, N * rows, std::max<int64_t>(1, 2048 / std::max<int64_t>(W * k * kh * kt, 1)),
                   [&](int64_t b, int64_t e) {
    std::vector<float> acc(W);
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / rows, t = (r % rows) / Hh, y = r % Hh;
      std::fill(acc.begin(), acc.end(), bias ? bias[0] : 0.f);
      for (int64_t ch = 0; ch < 2; ++ch) {
        for (int64_t dt = 0; dt < kt; ++dt) {
          const int64_t tt = t + dt - kt / 2;
          if (tt < 0 || tt >= T) continue;
          conv_row_into(pooled + (n * 2 + ch) * P + tt * Hh * W, y, Hh, W, w + (ch * kt + dt) * kh * k, kh, k,
                        acc.data());
        }
      }
      float* out = m + n * P + (t * Hh + y) * W;
      for (int64_t xx = 0; xx < W; ++xx) out[xx] = sigmoid(acc[xx] * scale + shift);
    }
  });
}

// out = (x * a) * m; out may be x
void apply_gates(const float* x, const float* a, const float* m, int64_t N, int64_t C, int64_t P, bool nhwc,
                 float* out) {
  if (nhwc) {
    at::parallel_for(0, N * P, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) scale_position(x + t * C, a + (t / P) * C, m[t], C, out + t * C);
    });
    return;
  }
  at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(P, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) scale_stretch(x + r * P, a[r], m + (r / C) * P, P, out + r * P);
  });
}

const float* data_or_null(const c10::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

// channels-last: channels_last for 4-D, channels_last_3d for 5-D tensors
void check(const torch::Tensor& t, const char* what, bool channels_last = false) {
  const auto format = !channels_last ? at::MemoryFormat::Contiguous
                      : t.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                     : at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && (t.dim() >= 4 || !channels_last) &&
                  t.is_contiguous(format),
              "cbam_insert native kernel: ", what, " must be a contiguous (or channels-last) float32 CPU tensor");
}

// a float32 CPU parameter, made contiguous (a copy only when it is not)
torch::Tensor as_param(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat, "cbam_insert native kernel: ", what,
              " must be a float32 CPU tensor");
  return t.contiguous();
}

// the one value of a 1-element float32 parameter or buffer (already through as_param), or `otherwise`
double scalar_of(const c10::optional<torch::Tensor>& t, double otherwise) {
  if (!t.has_value() || !t->defined()) return otherwise;
  TORCH_CHECK(t->numel() == 1, "cbam_insert native kernel: the spatial BatchNorm must have one channel");
  return static_cast<double>(t->data_ptr<float>()[0]);
}

}  // namespace

// The module's forward on a contiguous or channels-last x (N x C x L, N x C x H x W or N x C x T x H x W); `out`
// (x's strides) may be `x` itself (input reuse). Returns `out`.
torch::Tensor cbam_forward(torch::Tensor x, torch::Tensor fc1_w, c10::optional<torch::Tensor> fc1_b,
                           torch::Tensor fc2_w, c10::optional<torch::Tensor> fc2_b, torch::Tensor conv_w,
                           c10::optional<torch::Tensor> conv_b, bool max_first, c10::optional<torch::Tensor> bn_w,
                           c10::optional<torch::Tensor> bn_b, c10::optional<torch::Tensor> bn_mean,
                           c10::optional<torch::Tensor> bn_var, double bn_eps, torch::Tensor out) {
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5 && out.sizes() == x.sizes() && out.strides() == x.strides(),
              "cbam_insert native kernel: x and out must be N x C x L, N x C x H x W or N x C x T x H x W with the "
              "same strides");
  // channels-last unless plainly contiguous (a tensor can be both, e.g. with 1 x 1 maps)
  const bool nhwc = !x.is_contiguous();
  check(x, "x", nhwc);
  check(out, "out", nhwc);
  // parameters in any layout (model.to(memory_format=torch.channels_last) makes the conv's weight NHWC)
  fc1_w = as_param(fc1_w, "fc1.weight");
  fc2_w = as_param(fc2_w, "fc2.weight");
  conv_w = as_param(conv_w, "conv.weight");
  for (auto* b : {&fc1_b, &fc2_b, &conv_b, &bn_w, &bn_b, &bn_mean, &bn_var})
    if (b->has_value() && (*b)->defined()) *b = as_param(**b, "a bias or norm parameter");
  const int64_t dims = x.dim() - 2;
  const int64_t N = x.size(0), C = x.size(1), W = x.size(-1);
  const int64_t Hh = dims >= 2 ? x.size(-2) : 1, T = dims == 3 ? x.size(2) : 1, P = T * Hh * W;
  const int64_t H = fc1_w.size(0), k = conv_w.size(-1), kh = dims >= 2 ? k : 1, kt = dims == 3 ? k : 1;
  TORCH_CHECK(fc1_w.size(1) == C && fc2_w.size(0) == C && fc2_w.size(1) == H && conv_w.dim() == x.dim() &&
                  conv_w.numel() == 2 * kt * kh * k && k % 2,
              "cbam_insert native kernel: parameter shapes do not match x");
  if (x.numel() == 0) return out;
  float scale = 1.f, shift = 0.f;  // the spatial BatchNorm in eval mode: z * scale + shift
  if (bn_mean.has_value() && bn_mean->defined()) {
    TORCH_CHECK(bn_var.has_value() && bn_var->defined() && bn_mean->numel() == 1 && bn_var->numel() == 1,
                "cbam_insert native kernel: BatchNorm needs its running mean and variance");
    const double inv = 1.0 / std::sqrt(scalar_of(bn_var, 1.0) + bn_eps);
    const double gain = scalar_of(bn_w, 1.0);
    scale = static_cast<float>(gain * inv);
    shift = static_cast<float>(scalar_of(bn_b, 0.0) - scalar_of(bn_mean, 0.0) * gain * inv);
  }
  auto scratch = torch::empty({2 * N * C + N * C + 2 * N * P + N * P}, x.options());
  float* mean = scratch.data_ptr<float>();
  float* mx = mean + N * C;
  float* a = mx + N * C;
  float* pooled = a + N * C;
  float* m = pooled + 2 * N * P;
  // a few samples at a time, so that the later passes find the block in cache
  const int64_t sample_bytes = C * P * static_cast<int64_t>(sizeof(float));
  const int64_t step = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(sample_bytes, 1));
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    const int64_t nb = std::min(step, N - n0);
    const float* px = x.data_ptr<float>() + n0 * C * P;
    if (nhwc)
      spatial_pool_nhwc(px, nb, P, C, mean + n0 * C, mx + n0 * C);
    else
      spatial_pool(px, nb * C, P, mean + n0 * C, mx + n0 * C);
    if (nb == 1) {
      channel_gate(mean + n0 * C, mx + n0 * C, nb, C, H, fc1_w.data_ptr<float>(), data_or_null(fc1_b),
                   fc2_w.data_ptr<float>(), data_or_null(fc2_b), a + n0 * C);
    } else {  // several samples: two matrix products (the per-channel dots above are short for fc2)
      auto desc = scratch.narrow(0, 0, 2 * N * C).view({2, N, C}).narrow(1, n0, nb);
      auto hidden = at::linear(desc, fc1_w, fc1_b);
      hidden.relu_();
      auto gate = scratch.narrow(0, 2 * N * C + n0 * C, nb * C).view({nb, C});
      at::sigmoid_out(gate, at::linear(hidden, fc2_w, fc2_b).sum(0));
    }
    const float* pa = a + n0 * C;
    float* po = out.data_ptr<float>() + n0 * C * P;
    channel_pool(px, pa, nb, C, P, max_first, nhwc, pooled + n0 * 2 * P);
    spatial_gate(pooled + n0 * 2 * P, nb, T, Hh, W, conv_w.data_ptr<float>(), kt, kh, k, data_or_null(conv_b), scale,
                 shift, m + n0 * P);
    apply_gates(px, pa, m + n0 * P, nb, C, P, nhwc, po);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("cbam_forward", &cbam_forward, "CBAM inference forward, float32 CPU, contiguous or channels-last");
}
