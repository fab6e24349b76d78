// The Python extension module lstm_fused._C: importing it loads the library
// and so runs the op registrations (csrc/ops.cpp and the device files). It
// has no Python functions of its own; the CMake build (no Python) omits it.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
