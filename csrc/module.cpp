// The Python extension module lstm_fused._C: importing it loads the library
// and so runs the op registrations (csrc/ops.cpp and the device files). Its
// one function, cpu_isa(), names the instruction set of the CPU kernels
// (cpu/fused.h). The CMake build (no Python) omits this file.
#include <Python.h>

#include "cpu/fused.h"

namespace {
PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(lstm_fused::cpu::fused_isa());
}
PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels: avx512, avx2 or generic."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&def);
}
