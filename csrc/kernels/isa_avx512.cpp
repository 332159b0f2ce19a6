// The kernels compiled for one instruction set (flags in CMakeLists.txt).
#define PYAD_TARGET_AVX512
#define PYAD_NS pyad_avx512
#define PYAD_ISA_NAME "avx512"
#include "impl.hpp"

namespace pyad {
const KernelTable* table_avx512() { return &PYAD_NS::table; }
}  // namespace pyad
