// Log-mel spectrogram on a GPU: one block per (frame, clip). The windowed frame, gathered by
// reflect index, sits in shared memory; threads take frequency bins and sum the DFT from a
// twiddle table indexed by (k * q) mod n_fft (exact angles); then the filterbank and the log.
// The Triton kernel (DFT as tensor-core GEMMs) is the default GPU path; this one is measured
// against it in `mmfast bench log_mel`.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "log_mel.h"

namespace mmfast {
namespace {

__global__ void log_mel_kernel(const float* __restrict__ wave, const float* __restrict__ window,
                               const float* __restrict__ filters, const float* __restrict__ cos_table,
                               const float* __restrict__ sin_table, float* __restrict__ out, int64_t samples,
                               int64_t frames, int n_fft, int hop_length, int pad, bool reflect, int n_freq,
                               int n_mels, bool magnitude, int log_mode, bool clamp, float clamp_min) {
  extern __shared__ float shared[];
  float* frame = shared;            // [n_fft]
  float* spectrum = shared + n_fft;  // [n_freq]
  const int64_t f = blockIdx.x;
  const int64_t b = blockIdx.y;
  const float* clip = wave + b * samples;
  for (int k = threadIdx.x; k < n_fft; k += blockDim.x) {
    const int64_t position = f * hop_length + k - pad;
    float sample = 0.0f;
    if (reflect) {
      sample = clip[reflect_index(position, samples)];
    } else if (position >= 0 && position < samples) {
      sample = clip[position];
    }
    frame[k] = sample * window[k];
  }
  __syncthreads();
  for (int q = threadIdx.x; q < n_freq; q += blockDim.x) {
    float real = 0.0f, imag = 0.0f;
    int angle = 0;  // (k * q) mod n_fft, advanced without overflow
    for (int k = 0; k < n_fft; ++k) {
      real += frame[k] * cos_table[angle];
      imag -= frame[k] * sin_table[angle];
      angle += q;
      if (angle >= n_fft) angle -= n_fft;
    }
    const float power = real * real + imag * imag;
    spectrum[q] = magnitude ? sqrtf(power) : power;
  }
  __syncthreads();
  for (int m = threadIdx.x; m < n_mels; m += blockDim.x) {
    float value = 0.0f;
    for (int q = 0; q < n_freq; ++q) value += spectrum[q] * filters[q * n_mels + m];
    if (clamp) value = fmaxf(value, clamp_min);
    if (log_mode == 1) value = log10f(value);
    if (log_mode == 2) value = logf(value);
    out[(b * n_mels + m) * frames + f] = value;
  }
}

at::Tensor log_mel_cuda(const at::Tensor& waveform, const at::Tensor& window, const at::Tensor& filters, int64_t n_fft,
                        int64_t hop_length, bool center, bool reflect, double power, int64_t log_mode,
                        std::optional<double> clamp_min) {
  const LogMelShape shape = check_log_mel(waveform, window, filters, n_fft, hop_length, center);
  TORCH_CHECK(shape.frames < 65536 * 32768LL && shape.batch < 65536, "mmfast::log_mel: grid too large");
  const c10::cuda::CUDAGuard guard(waveform.device());
  const at::Tensor wave = waveform.contiguous();
  const at::Tensor win = window.contiguous();
  const at::Tensor bank = filters.contiguous();
  const at::Tensor angles = at::arange(n_fft, waveform.options().dtype(at::kDouble)) * (2.0 * M_PI / n_fft);
  const at::Tensor cos_table = at::cos(angles).to(at::kFloat);
  const at::Tensor sin_table = at::sin(angles).to(at::kFloat);
  at::Tensor out = at::empty({shape.batch, shape.n_mels, shape.frames}, waveform.options());
  const dim3 grid(static_cast<unsigned>(shape.frames), static_cast<unsigned>(shape.batch));
  const size_t shared = (n_fft + shape.n_freq) * sizeof(float);
  log_mel_kernel<<<grid, 256, shared, c10::cuda::getCurrentCUDAStream()>>>(
      wave.data_ptr<float>(), win.data_ptr<float>(), bank.data_ptr<float>(), cos_table.data_ptr<float>(),
      sin_table.data_ptr<float>(), out.data_ptr<float>(), shape.samples, shape.frames, static_cast<int>(n_fft),
      static_cast<int>(hop_length), static_cast<int>(shape.pad), reflect, static_cast<int>(shape.n_freq),
      static_cast<int>(shape.n_mels), power == 1.0, static_cast<int>(log_mode), clamp_min.has_value(),
      static_cast<float>(clamp_min.value_or(0.0)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) { m.impl("log_mel", &log_mel_cuda); }

}  // namespace mmfast
