// PNG scanline reconstruction (PNG spec §9, "Filtering"): the inflated image data,
// one filter-type byte before each row, back to pixels. Paeth dominates photographs
// (824 of 900 rows of an MVTec bottle image) and is serial along a row, so it is
// written branch-free (conditional moves) with the bytes of one pixel as independent
// chains: 9.3 ms (numba, branches) -> about 2 ms per 900 x 900 RGB image. Plain C++,
// no instruction-set variants: the same code runs on x86 and ARM.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "bind_common.hpp"

namespace pyad {

namespace {

inline int paeth(int a, int b, int c) {
    // p = a + b - c; pick the neighbour nearest p, ties in the order a, b, c
    const int pa = std::abs(b - c), pb = std::abs(a - c), pc = std::abs(a + b - 2 * c);
    const int bc = pb <= pc ? b : c;
    return (pa <= pb && pa <= pc) ? a : bc;
}

// Paeth for B bytes per pixel with the left pixel kept in registers: B independent
// dependency chains, no store-to-load round trip through `cur`.
template <int B>
void paeth_row(const uint8_t* src, const uint8_t* prev, uint8_t* cur, int64_t n) {
    int a[B], c[B];
    for (int k = 0; k < B; ++k) a[k] = cur[k] = uint8_t(src[k] + prev[k]), c[k] = prev[k];
    for (int64_t x = B; x + B <= n; x += B) {
        for (int k = 0; k < B; ++k) {
            const int b = prev[x + k];
            a[k] = uint8_t(src[x + k] + paeth(a[k], b, c[k]));
            cur[x + k] = uint8_t(a[k]);
            c[k] = b;
        }
    }
}

// One row: `src` the filtered bytes, `prev` the previous reconstructed row (zeros
// for the first), `cur` the output. Returns false for an unknown filter type.
bool unfilter_row(int type, const uint8_t* src, const uint8_t* prev, uint8_t* cur, int64_t n, int bpp) {
    switch (type) {
        case 0:
            std::memcpy(cur, src, n);
            return true;
        case 1:
            for (int64_t x = 0; x < bpp && x < n; ++x) cur[x] = src[x];
            for (int64_t x = bpp; x < n; ++x) cur[x] = uint8_t(src[x] + cur[x - bpp]);
            return true;
        case 2:
            for (int64_t x = 0; x < n; ++x) cur[x] = uint8_t(src[x] + prev[x]);
            return true;
        case 3:
            for (int64_t x = 0; x < bpp && x < n; ++x) cur[x] = uint8_t(src[x] + (prev[x] >> 1));
            for (int64_t x = bpp; x < n; ++x) cur[x] = uint8_t(src[x] + ((cur[x - bpp] + prev[x]) >> 1));
            return true;
        case 4:
            if (bpp == 3) return paeth_row<3>(src, prev, cur, n), true;
            if (bpp == 4) return paeth_row<4>(src, prev, cur, n), true;
            for (int64_t x = 0; x < bpp && x < n; ++x) cur[x] = uint8_t(src[x] + prev[x]);
            for (int64_t x = bpp; x < n; ++x) cur[x] = uint8_t(src[x] + paeth(cur[x - bpp], prev[x], prev[x - bpp]));
            return true;
        default:
            return false;
    }
}

// raw: [height * (1 + row_bytes)] uint8, the inflated IDAT stream -> [height, row_bytes].
py::array_t<uint8_t> png_unfilter(const py::array& raw, int64_t height, int64_t row_bytes, int bpp) {
    require(raw, "raw", "uint8", 1);
    if (height < 1 || row_bytes < 1 || bpp < 1 || bpp > 8)
        throw py::value_error("png_unfilter: expected height, row_bytes >= 1 and 1 <= bpp <= 8");
    if (raw.shape(0) < height * (row_bytes + 1))
        throw py::value_error("raw: shorter than height * (row_bytes + 1): truncated image data");
    py::array_t<uint8_t> out({height, row_bytes});
    const uint8_t* in = static_cast<const uint8_t*>(raw.data());
    uint8_t* o = out.mutable_data();
    bool ok = true;
    {
        py::gil_scoped_release release;
        std::vector<uint8_t> zeros(row_bytes, 0);
        for (int64_t y = 0; y < height && ok; ++y) {
            const uint8_t* src = in + y * (row_bytes + 1);
            const uint8_t* prev = y ? o + (y - 1) * row_bytes : zeros.data();
            ok = unfilter_row(src[0], src + 1, prev, o + y * row_bytes, row_bytes, bpp);
        }
    }
    if (!ok) throw py::value_error("raw: unknown PNG filter type (damaged image data)");
    return out;
}

}  // namespace

void register_png(py::module_& m) {
    m.def("png_unfilter", &png_unfilter, py::arg("raw"), py::arg("height"), py::arg("row_bytes"), py::arg("bpp"),
          "Inflated PNG image data [height*(1+row_bytes)] uint8 -> reconstructed rows [height, row_bytes] uint8.");
}

}  // namespace pyad
