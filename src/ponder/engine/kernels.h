// ponder's matrix kernels (kernels.cpp), shared by the fused layer steps (fused.cpp).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>

namespace ponder {
// y = x W^T (+ b) for x (..., K) and W (N, K). A few rows (3..16) take ponder's own streaming kernel, which reads
// each weight row once for all of them; one row and many rows stay with ATen (MKL's gemv / gemm).
// A uint8 (N, K/32, B) weight is block-quantised (models/quant.py) and takes qlinear.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b = std::nullopt);
// y = x W^T (+ b) for a block-quantised W (Q8_0, Q4_0, Q4_1): activations quantised to int8 per block, integer
// block dot products, float32 out.
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b = std::nullopt);
bool is_quantised(const at::Tensor& w);
// The instruction set the kernels run with: "auto" (the best this CPU has), "avx512vnni", "avx512", "avx2" or
// "scalar".
void set_isa(const std::string& name);
std::string isa();
// The largest row count the few-rows kernel takes (0 turns it off).
void set_max_rows(int64_t m);
int64_t max_rows();
}  // namespace ponder
