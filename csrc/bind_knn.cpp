#include "bind_common.hpp"

namespace pyad {

namespace {

// Writes into caller-owned buffers (the running k nearest of the Python layer's loop).
void knn_merge(const py::array& g, const py::array& norms, int64_t offset, py::array& dist, py::array& idx) {
    require(g, "g", "float32", 2);
    require(norms, "norms", "float32", 1);
    require(dist, "dist", "float32", 2);
    require(idx, "idx", "int64", 2);
    if (!dist.writeable() || !idx.writeable()) throw py::value_error("dist, idx: expected writable arrays");
    const int64_t n = g.shape(0), m = g.shape(1), k = dist.shape(1);
    if (norms.shape(0) != m) throw py::value_error("norms: expected one norm per column of g");
    if (dist.shape(0) != n || idx.shape(0) != n || idx.shape(1) != k)
        throw py::value_error("dist, idx: expected shape [rows of g, k]");
    if (k < 1) throw py::value_error("dist: expected k >= 1 columns");
    if (offset < 0) throw py::value_error("offset: expected >= 0");
    const float* gp = static_cast<const float*>(g.data());
    const float* np_ = static_cast<const float*>(norms.data());
    float* dp = static_cast<float*>(dist.mutable_data());
    int64_t* ip = static_cast<int64_t*>(idx.mutable_data());
    py::gil_scoped_release release;
    active().knn_merge(gp, n, m, np_, offset, k, dp, ip);
}

}  // namespace

void register_knn(py::module_& m) {
    m.def("knn_merge", &knn_merge, py::arg("g"), py::arg("norms"), py::arg("offset"), py::arg("dist"), py::arg("idx"),
          "g [N,M] f32 (q.b of bank rows [offset, offset+M)), norms [M] f32 (their squared norms): merges "
          "norms - 2 g into the k smallest per row, dist [N,k] f32 / idx [N,k] i64, in place.");
}

}  // namespace pyad
