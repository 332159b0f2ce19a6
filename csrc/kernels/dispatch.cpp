#include "dispatch.hpp"

#include <atomic>
#include <stdexcept>

#include "parallel.hpp"

namespace pyad {

const KernelTable* table_scalar();
#if defined(__x86_64__) || defined(_M_X64)
const KernelTable* table_sse();
const KernelTable* table_avx2();
const KernelTable* table_avx512();
#elif defined(__aarch64__)
const KernelTable* table_neon();
#endif

namespace {

struct Isa {
    const char* name;
    const KernelTable* (*table)();
    bool (*supported)();
};

bool always() { return true; }

#if defined(__x86_64__) || defined(_M_X64)
// __builtin_cpu_supports also checks that the OS saves the wider registers.
bool has_sse() { return __builtin_cpu_supports("sse4.1"); }
bool has_avx2() {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
    return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
const Isa kIsas[] = {{"scalar", table_scalar, always},
                     {"sse", table_sse, has_sse},
                     {"avx2", table_avx2, has_avx2},
                     {"avx512", table_avx512, has_avx512}};
#elif defined(__aarch64__)
const Isa kIsas[] = {{"scalar", table_scalar, always}, {"neon", table_neon, always}};  // NEON is baseline
#else
const Isa kIsas[] = {{"scalar", table_scalar, always}};
#endif

const KernelTable* widest() {
    const KernelTable* t = nullptr;
    for (const Isa& isa : kIsas)
        if (isa.supported()) t = isa.table();
    return t;
}

std::atomic<const KernelTable*> g_active{nullptr};
std::atomic<int> g_threads{0};

}  // namespace

std::vector<std::string> compiled_isas() {
    std::vector<std::string> out;
    for (const Isa& isa : kIsas) out.emplace_back(isa.name);
    return out;
}

std::vector<std::string> supported_isas() {
    std::vector<std::string> out;
    for (const Isa& isa : kIsas)
        if (isa.supported()) out.emplace_back(isa.name);
    return out;
}

const KernelTable& active() {
    const KernelTable* t = g_active.load(std::memory_order_acquire);
    if (t == nullptr) {
        t = widest();
        g_active.store(t, std::memory_order_release);
    }
    return *t;
}

void select_isa(const std::string& name) {
    for (const Isa& isa : kIsas) {
        if (name == isa.name) {
            if (!isa.supported()) throw std::invalid_argument("ISA '" + name + "' is not supported by this CPU");
            g_active.store(isa.table(), std::memory_order_release);
            return;
        }
    }
    throw std::invalid_argument("ISA '" + name + "' is not compiled into this build");
}

int num_threads() {
    int n = g_threads.load(std::memory_order_relaxed);
    return n > 0 ? n : pyad_max_threads();
}

void set_num_threads(int n) { g_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

}  // namespace pyad
