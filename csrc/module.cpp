// pyad._core: the compiled kernels. One register_* call per binding file.
#include "bind_common.hpp"

PYBIND11_MODULE(_core, m) {
    m.doc() = "pyad's compiled kernels (Mahalanobis, greedy coreset, patch pooling, Winograd transforms, k-NN merge, PNG rows)";
    pyad::register_system(m);
    pyad::register_mahalanobis(m);
    pyad::register_coreset(m);
    pyad::register_pooling(m);
    pyad::register_png(m);
    pyad::register_conv(m);
    pyad::register_knn(m);
}
