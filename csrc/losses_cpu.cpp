// CPU kernels of the per-sample loss ops.
//
// Forward: the samples are cut into chunks of kChunk elements; at::parallel_for
// sums each chunk's squares (each square rounded in the compute type, as on the
// GPU) into a double, the chunks of a sample are added in order, and
// loss_finish() turns S_b into (loss_b, stat_b). Backward: one elementwise pass.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "losses.h"
#include "losses_op.h"

namespace epg {

// Elements per forward task (and per partial sum).
constexpr int64_t kChunk = 16384;

LossOut loss_forward_cpu(LossKind kind, const at::Tensor& pred, const at::Tensor& target,
                         const at::Tensor& weight, double c) {
  const char* op = loss_op_name(kind, /*backward=*/false);
  loss_check_args(kind, pred, target, weight, c);
  check_backend_device(pred, /*cuda=*/false, op, "pred");
  const at::Tensor p = pred.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor w = weight.to(loss_compute_dtype(pred)).contiguous();
  LossOut out = loss_empty_outputs(p);
  const int64_t B = p.size(0);
  if (B == 0) return out;
  const int64_t M = p.numel() / B;
  const int64_t chunks = std::max<int64_t>(1, (M + kChunk - 1) / kChunk);
  std::vector<double> partial(static_cast<size_t>(B * chunks), 0.0);

  dispatch_loss_dtypes(p.scalar_type(), t.scalar_type(), op, [&](auto pred_tag, auto target_tag) {
    using P = decltype(pred_tag);
    using U = decltype(target_tag);
    using A = acc_t<P>;
    const P* pp = p.const_data_ptr<P>();
    const U* tp = t.const_data_ptr<U>();
    const int64_t grain =
        std::max<int64_t>(1, kCpuGrainSize / std::max<int64_t>(1, std::min(M, kChunk)));
    at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks;
        const int64_t lo = b * M + (task % chunks) * kChunk;
        const int64_t hi = std::min(lo + kChunk, (b + 1) * M);
        double acc = 0.0;
        for (int64_t i = lo; i < hi; ++i) {
          acc += static_cast<double>(
              squared_difference(static_cast<A>(pp[i]), static_cast<A>(tp[i])));
        }
        partial[static_cast<size_t>(task)] = acc;
      }
    });
    const A* wp = w.const_data_ptr<A>();
    A* loss = std::get<0>(out).mutable_data_ptr<A>();
    A* stat = std::get<1>(out).mutable_data_ptr<A>();
    const A c2 = static_cast<A>(c * c);
    for (int64_t b = 0; b < B; ++b) {
      double sum = 0.0;
      for (int64_t k = 0; k < chunks; ++k) sum += partial[static_cast<size_t>(b * chunks + k)];
      const LossValue<A> r = loss_finish(kind, static_cast<A>(sum), M, wp[b], c2);
      loss[b] = r.loss;
      stat[b] = r.stat;
    }
  });
  return out;
}

at::Tensor loss_backward_cpu(LossKind kind, const at::Tensor& grad, const at::Tensor& pred,
                             const at::Tensor& target, const at::Tensor& weight,
                             const at::Tensor& sqsum, double c) {
  const char* op = loss_op_name(kind, /*backward=*/true);
  loss_backward_check_args(kind, grad, pred, target, weight, sqsum, c);
  check_backend_device(pred, /*cuda=*/false, op, "pred");
  const at::ScalarType ct = loss_compute_dtype(pred);
  const at::Tensor p = pred.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor g = grad.to(ct).contiguous();
  const at::Tensor w = weight.to(ct).contiguous();
  const at::Tensor s = kind == LossKind::kPseudoHuber ? sqsum.to(ct).contiguous() : w;
  at::Tensor grad_pred = p.new_empty(p.sizes());
  const int64_t n = p.numel();
  if (n == 0) return grad_pred;
  const int64_t B = p.size(0);
  const int64_t M = n / B;

  dispatch_loss_dtypes(p.scalar_type(), t.scalar_type(), op, [&](auto pred_tag, auto target_tag) {
    using P = decltype(pred_tag);
    using U = decltype(target_tag);
    using A = acc_t<P>;
    const A* gp = g.const_data_ptr<A>();
    const A* wp = w.const_data_ptr<A>();
    const A* sp = s.const_data_ptr<A>();
    const A c2 = static_cast<A>(c * c);
    std::vector<A> factor(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      factor[static_cast<size_t>(b)] = loss_grad_factor(kind, gp[b], wp[b], M, sp[b], c2);
    }
    const P* pp = p.const_data_ptr<P>();
    const U* tp = t.const_data_ptr<U>();
    P* out = grad_pred.mutable_data_ptr<P>();
    at::parallel_for(0, n, kCpuGrainSize, [&](int64_t begin, int64_t end) {
      int64_t b = begin / M;
      int64_t next = (b + 1) * M;
      A k = factor[static_cast<size_t>(b)];
      for (int64_t i = begin; i < end; ++i) {
        if (i == next) {
          ++b;
          next += M;
          k = factor[static_cast<size_t>(b)];
        }
        out[i] = static_cast<P>(loss_grad_point(k, static_cast<A>(pp[i]), static_cast<A>(tp[i])));
      }
    });
  });
  return grad_pred;
}

LossOut weighted_mse_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                              const at::Tensor& weight) {
  return loss_forward_cpu(LossKind::kWeightedMse, pred, target, weight, 0.0);
}

at::Tensor weighted_mse_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred,
                                          const at::Tensor& target, const at::Tensor& weight) {
  return loss_backward_cpu(LossKind::kWeightedMse, grad, pred, target, weight, at::Tensor(), 0.0);
}

LossOut pseudo_huber_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                              const at::Tensor& weight, double c) {
  return loss_forward_cpu(LossKind::kPseudoHuber, pred, target, weight, c);
}

at::Tensor pseudo_huber_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred,
                                          const at::Tensor& target, const at::Tensor& weight,
                                          const at::Tensor& sqsum, double c) {
  return loss_backward_cpu(LossKind::kPseudoHuber, grad, pred, target, weight, sqsum, c);
}

}  // namespace epg
