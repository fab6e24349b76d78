// The Python extension module lstm_fused._C: importing it loads the library
// and so runs the op registrations (csrc/ops.cpp and the device files).
// cpu_isa() names the instruction set of the CPU kernels (cpu/fused.h),
// build_info() how setup.py built it (JSON, from the header it generates).
// The CMake build (no Python) omits this file.
#include <Python.h>

#include "cpu/fused.h"
#include "lstm_fused_build_info.h"

namespace {
PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(lstm_fused::cpu::fused_isa());
}
PyObject* build_info(PyObject*, PyObject*) {
  return PyUnicode_FromString(LSTM_FUSED_BUILD_INFO);
}
PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels: avx512, avx2 or generic."},
    {"build_info", build_info, METH_NOARGS, "How setup.py built this extension, as JSON."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&def);
}
