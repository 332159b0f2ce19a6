// The kernels compiled for one instruction set (flags in CMakeLists.txt).
#define PYAD_TARGET_AVX2
#define PYAD_NS pyad_avx2
#define PYAD_ISA_NAME "avx2"
#include "impl.hpp"

namespace pyad {
const KernelTable* table_avx2() { return &PYAD_NS::table; }
}  // namespace pyad
