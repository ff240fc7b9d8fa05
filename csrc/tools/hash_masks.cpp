// Host program for tests/test_cuda_ext.py: evaluates the subset-mask hash of bingo_hash.cuh (the
// header the CUDA kernels use) on the CPU, so the CUDA hash is checked bit for bit against
// bingo_kernels.hashing without a GPU. Built by g++ and by nvcc (-x cu, which compiles the
// __host__ __device__ variant of the header).
//
// stdin, one case per line: seed search k_start K unit_offset U P, where P is "s <bits>" (one
// scalar float32 probability, as its IEEE bit pattern) or "u <bits_0> ... <bits_U-1>" (per unit).
// stdout: K lines of U characters '0'/'1' (1: subset k resets unit u), then a line "end".
#include <cstdint>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "../bingo_hash.cuh"

static float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

int main() {
  uint64_t seed, search, k_start, num_subsets, unit_offset, num_units;
  std::string kind;
  while (std::cin >> seed >> search >> k_start >> num_subsets >> unit_offset >> num_units >> kind) {
    std::vector<float> prob(kind == "u" ? num_units : 1);
    for (float& p : prob) {
      uint32_t bits;
      std::cin >> bits;
      p = from_bits(bits);
    }
    const uint32_t base = bingo::key_base(static_cast<uint32_t>(seed), static_cast<uint32_t>(search));
    std::string line(num_units, '0');
    for (uint64_t k = 0; k < num_subsets; ++k) {
      const uint32_t key = bingo::subset_key(base, static_cast<uint32_t>(k_start), static_cast<uint32_t>(k));
      for (uint64_t u = 0; u < num_units; ++u) {
        const float p = prob[kind == "u" ? u : 0];
        line[u] = bingo::included(key, bingo::unit_hash(unit_offset + u), bingo::inclusion_threshold(p)) ? '1' : '0';
      }
      std::cout << line << '\n';
    }
    std::cout << "end" << std::endl;
  }
  return 0;
}
