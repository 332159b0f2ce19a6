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

py::object gaussian_factor(const py::array& s2, const py::array& s1, double count, double eps, py::array& packed,
                           py::object held) {
    require(s2, "s2", "float64", 2);
    require(s1, "s1", "float64", 2);
    require(packed, "packed", "float32", 2);
    const int64_t p = s1.shape(0), d = s1.shape(1), t = d * (d + 1) / 2;
    if (s2.shape(0) != p || s2.shape(1) != t || packed.shape(0) != p || packed.shape(1) != t)
        throw py::value_error("s2: shapes of s2 [p, d(d+1)/2], s1 [p, d] and packed do not match");
    if (!(count >= 2)) throw py::value_error("count: expected at least 2 images");
    const double* hp = nullptr;
    int64_t h = 0;
    py::array hx;
    if (!held.is_none()) {
        hx = held.cast<py::array>();
        require(hx, "held", "float64", 3);
        h = hx.shape(1);
        if (hx.shape(0) != p || hx.shape(2) != d || h < 1 || count - h < 2)
            throw py::value_error("held: expected [p, h, d] with 1 <= h <= count - 2");
        hp = static_cast<const double*>(hx.data());
    }
    py::array_t<float> out({p, h});
    const double* s2p = static_cast<const double*>(s2.data());
    const double* s1p = static_cast<const double*>(s1.data());
    float* pk = static_cast<float*>(packed.mutable_data());
    float* op = out.mutable_data();
    int64_t bad;
    {
        py::gil_scoped_release release;
        bad = active().gaussian_factor(s2p, s1p, p, d, count, eps, pk, hp, h, op);
    }
    if (bad >= 0)
        throw py::value_error("eps: covariance is not positive definite (position " + std::to_string(bad) +
                              "); use eps > 0");
    if (held.is_none()) return py::none();
    return std::move(out);
}

void gaussian_update(const py::array& x, const py::array& shift, py::array& s1, py::array& s2) {
    require(x, "batch", "float32", 3);
    require(shift, "shift", "float32", 2);
    require(s1, "s1", "float64", 2);
    require(s2, "s2", "float64", 2);
    const int64_t n = x.shape(0), p = x.shape(1), d = x.shape(2);
    if (shift.shape(0) != p || shift.shape(1) != d || s1.shape(0) != p || s1.shape(1) != d || s2.shape(0) != p ||
        s2.shape(1) != d * (d + 1) / 2)
        throw py::value_error("batch: shapes of batch [n, p, d], shift [p, d], s1 [p, d] and s2 [p, d(d+1)/2] do not match");
    if (!s1.writeable() || !s2.writeable()) throw py::value_error("s1: the sums must be writeable");
    const float* xp = static_cast<const float*>(x.data());
    const float* cp = static_cast<const float*>(shift.data());
    double* s1p = static_cast<double*>(s1.mutable_data());
    double* s2p = static_cast<double*>(s2.mutable_data());
    py::gil_scoped_release release;
    active().gaussian_update(xp, n, p, d, cp, s1p, s2p);
}

}  // namespace

void register_mahalanobis(py::module_& m) {
    m.def("gaussian_factor", &gaussian_factor, py::arg("s2"), py::arg("s1"), py::arg("count"), py::arg("eps"),
          py::arg("packed"), py::arg("held") = py::none(),
          "Packed sums s2 [p,d(d+1)/2] f64, s1 [p,d] f64 of count images -> A = L^-1 of each (scatter/(count-1) "
          "+ eps I) into packed [p,d(d+1)/2] f32; held [p,h,d] f64 (deviations from the sums' shift of h of "
          "the images) -> their distances [p,h] f32 without them, else None.");
    m.def("gaussian_update", &gaussian_update, py::arg("batch"), py::arg("shift"), py::arg("s1"), py::arg("s2"),
          "batch [n,p,d] f32, shift [p,d] f32: s1 [p,d] f64 += sum of y = batch - shift, s2 [p,d(d+1)/2] f64 += "
          "the packed lower triangle of sum y y^T (float64 throughout), in place.");
    m.def("mahalanobis", &mahalanobis, py::arg("features"), py::arg("mean"), py::arg("factor"),
          "features [N,P,d] f32, mean [P,d] f32, factor [P,d(d+1)/2] f32|f16 -> distances [N,P] f32.");
}

}  // namespace pyad
