// Shared by every binding file: pybind11 headers and argument checks. The
// Python layer (pyad/kernels) validates user input and converts layouts; the
// checks here only guard the C++ against a wrong call from that layer.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "kernels/dispatch.hpp"

namespace py = pybind11;

namespace pyad {

void register_system(py::module_& m);
void register_mahalanobis(py::module_& m);
void register_coreset(py::module_& m);
void register_pooling(py::module_& m);
void register_png(py::module_& m);
void register_conv(py::module_& m);
void register_knn(py::module_& m);

inline bool has_dtype(const py::array& a, const char* dtype) { return a.dtype().is(py::dtype(dtype)); }

// Raises ValueError unless `a` is a C-contiguous `ndim`-d array of `dtype`.
inline void require(const py::array& a, const char* name, const char* dtype, int ndim) {
    if (!has_dtype(a, dtype) || a.ndim() != ndim || !(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + ": expected a C-contiguous " + std::to_string(ndim) +
                              "-d " + dtype + " array");
}

inline int pool_mode(const std::string& mode) {
    if (mode == "avg") return kAvg;
    if (mode == "max") return kMax;
    if (mode == "avgmax") return kAvgMax;
    if (mode == "unfold") return kUnfold;
    throw py::value_error("mode: expected 'avg', 'max', 'avgmax' or 'unfold', got '" + mode + "'");
}

}  // namespace pyad
