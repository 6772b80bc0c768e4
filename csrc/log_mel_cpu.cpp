// Log-mel spectrogram on the CPU: each task takes a chunk of one clip's frames, gathers them by
// reflect index (no padded copy) times the window, runs ATen's real FFT (pocketfft) on the chunk,
// forms the power, multiplies with the filterbank and writes log values, all while the chunk is
// in cache. Tasks run in parallel (at::parallel_for); ATen ops inside run single-threaded.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "log_mel.h"

namespace mmfast {
namespace {

constexpr int64_t kChunk = 256;

at::Tensor log_mel_cpu(const at::Tensor& waveform, const at::Tensor& window, const at::Tensor& filters, int64_t n_fft,
                       int64_t hop_length, bool center, bool reflect, double power, int64_t log_mode,
                       std::optional<double> clamp_min) {
  const LogMelShape shape = check_log_mel(waveform, window, filters, n_fft, hop_length, center);
  const at::Tensor wave = waveform.contiguous();
  const at::Tensor win = window.contiguous();
  const at::Tensor bank = filters.contiguous();
  at::Tensor out = at::empty({shape.batch, shape.n_mels, shape.frames}, waveform.options());
  const float* x = wave.data_ptr<float>();
  const float* w = win.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int64_t chunks = (shape.frames + kChunk - 1) / kChunk;
  const double log_scale = log_mode == 1 ? 1.0 / std::log(10.0) : 1.0;

  at::parallel_for(0, shape.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor frames = at::empty({kChunk, n_fft}, waveform.options());
    at::Tensor magnitude = at::empty({kChunk, shape.n_freq}, waveform.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t first = (task % chunks) * kChunk;
      const int64_t count = std::min(kChunk, shape.frames - first);
      const float* clip = x + b * shape.samples;
      float* f = frames.data_ptr<float>();
      for (int64_t i = 0; i < count; ++i) {
        const int64_t start = (first + i) * hop_length - shape.pad;
        float* row = f + i * n_fft;
        if (start >= 0 && start + n_fft <= shape.samples) {  // inside the clip: a plain (vectorized) copy
          const float* source = clip + start;
          for (int64_t k = 0; k < n_fft; ++k) row[k] = source[k] * w[k];
          continue;
        }
        for (int64_t k = 0; k < n_fft; ++k) {  // at the edges: padding by index
          const int64_t position = start + k;
          float sample = 0.0f;
          if (reflect) {
            sample = clip[reflect_index(position, shape.samples)];
          } else if (position >= 0 && position < shape.samples) {
            sample = clip[position];
          }
          row[k] = sample * w[k];
        }
      }
      const at::Tensor spectrum = at::view_as_real(at::fft_rfft(frames.narrow(0, 0, count), n_fft, -1)).contiguous();
      const float* s = spectrum.data_ptr<float>();
      float* m = magnitude.data_ptr<float>();
      for (int64_t i = 0; i < count * shape.n_freq; ++i) {
        const float value = s[2 * i] * s[2 * i] + s[2 * i + 1] * s[2 * i + 1];
        m[i] = power == 1.0 ? std::sqrt(value) : value;
      }
      const at::Tensor mel = at::mm(magnitude.narrow(0, 0, count), bank);  // [count, n_mels]
      const float* values = mel.data_ptr<float>();
      for (int64_t i = 0; i < count; ++i) {
        for (int64_t j = 0; j < shape.n_mels; ++j) {
          float value = values[i * shape.n_mels + j];
          if (clamp_min.has_value()) value = std::max(value, static_cast<float>(*clamp_min));
          if (log_mode != 0) value = static_cast<float>(std::log(value) * log_scale);
          y[(b * shape.n_mels + j) * shape.frames + first + i] = value;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) { m.impl("log_mel", &log_mel_cpu); }

}  // namespace mmfast
