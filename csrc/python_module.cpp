// Makes prunepath_ops._C importable as a Python module; importing it loads the
// shared library, whose static initialisers register the ops with torch.
// Built by setup.py only; libtorch users load the CMake library instead.
#include <Python.h>

static struct PyModuleDef prunepath_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&prunepath_module); }
