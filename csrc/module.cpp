// Python module `lineas_fast._C`. Importing it loads this library, which runs the TORCH_LIBRARY
// registrations of every csrc/*.cpp file (ops appear under torch.ops.lineas.*). Plain helpers that
// are not tensor ops are exposed here with pybind11.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lineas_fast C++ CPU kernels (ops are registered as torch.ops.lineas.*)";
  m.def("has_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether the extension was compiled with OpenMP.");
  m.def("max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  }, "OpenMP threads the CPU kernels would use.");
}
