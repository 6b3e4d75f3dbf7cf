// The Python module `epg._C`.
//
// Importing it loads this shared library, whose static initializers register
// the ops in registration.cpp with the dispatcher (torch.ops.epg_C.*). The
// module itself only carries build information; it uses the plain CPython API
// (no pybind11), so it must be imported after `import torch` has loaded the
// torch shared libraries.
#include <Python.h>

#include <torch/version.h>

#ifdef EPG_WITH_CUDA
#define EPG_WITH_CUDA_INT 1
#else
#define EPG_WITH_CUDA_INT 0
#endif

// at::parallel_for runs on one thread unless the extension is compiled with OpenMP.
#ifdef _OPENMP
#define EPG_WITH_OPENMP_INT 1
#else
#define EPG_WITH_OPENMP_INT 0
#endif

namespace {

PyModuleDef epg_C_module = {
    PyModuleDef_HEAD_INIT,
    "epg._C",
    "Native kernels of epg. Importing this module registers torch.ops.epg_C.*.\n\n"
    "Attributes:\n"
    "  WITH_CUDA (int): 1 if the CUDA kernels were compiled in, else 0.\n"
    "  WITH_OPENMP (int): 1 if the CPU kernels use torch's OpenMP threads, else 0 (one thread).\n"
    "  TORCH_VERSION (str): torch version the extension was compiled against.\n",
    -1,       // m_size: no per-module state
    nullptr,  // m_methods
    nullptr,  // m_slots
    nullptr,  // m_traverse
    nullptr,  // m_clear
    nullptr,  // m_free
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&epg_C_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "WITH_CUDA", EPG_WITH_CUDA_INT) < 0 ||
      PyModule_AddIntConstant(m, "WITH_OPENMP", EPG_WITH_OPENMP_INT) < 0 ||
      PyModule_AddStringConstant(m, "TORCH_VERSION", TORCH_VERSION) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
