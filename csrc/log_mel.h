// Shared argument checks and geometry of the log-mel op.
#pragma once
#include <ATen/ATen.h>

#ifdef __CUDACC__
#define MMFAST_HOST_DEVICE __host__ __device__
#else
#define MMFAST_HOST_DEVICE
#endif

namespace mmfast {

struct LogMelShape {
  int64_t batch, samples, frames, pad, n_freq, n_mels;
};

inline LogMelShape check_log_mel(const at::Tensor& waveform, const at::Tensor& window, const at::Tensor& filters,
                                 int64_t n_fft, int64_t hop_length, bool center) {
  TORCH_CHECK(waveform.dim() == 2 && waveform.scalar_type() == at::kFloat,
              "mmfast::log_mel: waveform must be float32 [B, T], got ", waveform.scalar_type(), " ",
              waveform.sizes());
  TORCH_CHECK(window.dim() == 1 && window.size(0) == n_fft && window.scalar_type() == at::kFloat,
              "mmfast::log_mel: window must be float32 [n_fft=", n_fft, "], got ", window.sizes());
  TORCH_CHECK(filters.dim() == 2 && filters.size(0) == n_fft / 2 + 1 && filters.scalar_type() == at::kFloat,
              "mmfast::log_mel: filters must be float32 [n_fft / 2 + 1 = ", n_fft / 2 + 1, ", n_mels], got ",
              filters.sizes());
  TORCH_CHECK(hop_length >= 1 && n_fft >= 1, "mmfast::log_mel: n_fft and hop_length must be >= 1");
  TORCH_CHECK(window.device() == waveform.device() && filters.device() == waveform.device(),
              "mmfast::log_mel: waveform, window and filters must be on one device");
  LogMelShape shape;
  shape.batch = waveform.size(0);
  shape.samples = waveform.size(1);
  shape.pad = center ? n_fft / 2 : 0;
  TORCH_CHECK(shape.samples >= 1 && shape.samples + 2 * shape.pad >= n_fft,
              "mmfast::log_mel: ", shape.samples, " samples give no frame of n_fft=", n_fft);
  shape.frames = (shape.samples + 2 * shape.pad - n_fft) / hop_length + 1;
  shape.n_freq = n_fft / 2 + 1;
  shape.n_mels = filters.size(1);
  return shape;
}

// numpy's "reflect" padding as an index, folded again for pads longer than the signal.
MMFAST_HOST_DEVICE inline int64_t reflect_index(int64_t position, int64_t length) {
  if (length == 1) return 0;
  const int64_t period = 2 * (length - 1);
  int64_t folded = position % period;
  if (folded < 0) folded += period;
  return folded < length ? folded : period - folded;
}

}  // namespace mmfast
