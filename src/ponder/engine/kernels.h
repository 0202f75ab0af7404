// ponder's matrix kernels (kernels.cpp), shared by the fused layer steps (fused.cpp).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>

namespace ponder {
// y = x W^T (+ b) for x (..., K) and W (N, K). A few rows (3..16) take ponder's own streaming kernel, which reads
// each weight row once for all of them; one row and many rows stay with ATen (MKL's gemv / gemm).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b = std::nullopt);
// The instruction set the kernels run with: "auto" (the best this CPU has), "avx512", "avx2" or "scalar".
void set_isa(const std::string& name);
std::string isa();
// The largest row count the few-rows kernel takes (0 turns it off).
void set_max_rows(int64_t m);
int64_t max_rows();
}  // namespace ponder
