// OpenMP when the compiler has it, a single thread otherwise.
#pragma once
#ifdef _OPENMP
#include <omp.h>
static inline int pyad_thread_num() { return omp_get_thread_num(); }
static inline int pyad_team_size() { return omp_get_num_threads(); }
static inline int pyad_max_threads() { return omp_get_max_threads(); }
#else
static inline int pyad_thread_num() { return 0; }
static inline int pyad_team_size() { return 1; }
static inline int pyad_max_threads() { return 1; }
#endif
