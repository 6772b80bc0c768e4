// The schemas of mmfast's custom ops; implementations register per device in their own files.
#include <torch/library.h>

TORCH_LIBRARY(mmfast, m) {
  // waveform float32 [B, T]; window float32 [n_fft]; filters float32 [n_fft / 2 + 1, n_mels].
  // log_mode: 0 none, 1 log10, 2 natural log. Returns float32 [B, n_mels, frames].
  m.def(
      "log_mel(Tensor waveform, Tensor window, Tensor filters, int n_fft, int hop_length, bool center, "
      "bool reflect, float power, int log_mode, float? clamp_min) -> Tensor");
}

// Lets setup.py's build import as the Python module `mmfast._C` (importing it registers the ops).
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
