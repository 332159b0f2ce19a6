#include "bind_common.hpp"

namespace pyad {

namespace {

py::array_t<float> mahalanobis(const py::array& x, const py::array& mean, const py::array& factor) {
    require(x, "features", "float32", 3);
    require(mean, "mean", "float32", 2);
    const bool half = has_dtype(factor, "float16");
    require(factor, "factor", half ? "float16" : "float32", 2);
    const int64_t n = x.shape(0), p = x.shape(1), d = x.shape(2);
    if (mean.shape(0) != p || mean.shape(1) != d || factor.shape(0) != p || factor.shape(1) != d * (d + 1) / 2)
        throw py::value_error("features: shape does not match the fitted mean/factor");
    py::array_t<float> out({n, p});
    const float* xp = static_cast<const float*>(x.data());
    const float* mp = static_cast<const float*>(mean.data());
    const void* fp = factor.data();
    float* op = out.mutable_data();
    {
        py::gil_scoped_release release;
        const KernelTable& t = active();
        if (half) t.mahalanobis_f16(xp, n, p, d, mp, static_cast<const uint16_t*>(fp), op);
        else t.mahalanobis_f32(xp, n, p, d, mp, static_cast<const float*>(fp), op);
    }
    return out;
}

}  // namespace

void register_mahalanobis(py::module_& m) {
    m.def("mahalanobis", &mahalanobis, py::arg("features"), py::arg("mean"), py::arg("factor"),
          "features [N,P,d] f32, mean [P,d] f32, factor [P,d(d+1)/2] f32|f16 -> distances [N,P] f32.");
}

}  // namespace pyad
