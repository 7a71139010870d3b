// Absorbed MLA attention for sequences with one new token (decode), read straight from the
// paged latent cache: one call per layer instead of a gather and two small GEMMs per sequence.
// Each (sequence, head) is computed alone, in a fixed order.
#include "common.h"

#include <cmath>
#include <vector>

namespace ds3dist {
namespace {

// One head of one sequence: s_j = scale * q . kv_j over all c columns, p = softmax(s),
// out = sum_j p_j kv_j[0:r] (float32 throughout, rounded once into out).
template <typename T>
void attend_one(const float* q, const T* pool, const int64_t* pages, int64_t kv_len,
                int64_t page_size, int64_t c, int64_t r, float scale, float* scores, float* acc,
                T* out) {
  auto row = [&](int64_t j) { return pool + (pages[j / page_size] * page_size + j % page_size) * c; };
  float top = -INFINITY;
  for (int64_t j = 0; j < kv_len; ++j) {
    dot_rows<1>(row(j), q, c, scores + j);
    scores[j] *= scale;
    top = std::max(top, scores[j]);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < kv_len; ++j) sum += (scores[j] = std::exp(scores[j] - top));
  std::fill(acc, acc + r, 0.f);
  for (int64_t j = 0; j < kv_len; ++j) axpy(scores[j], row(j), r, acc);
  for (int64_t i = 0; i < r; ++i) out[i] = static_cast<T>(acc[i] / sum);
}

template <typename T>
void decode(const at::Tensor& q_thc, const int64_t* rows, const int64_t* kv_lens,
            const int64_t* page_starts, const int64_t* page_ids, const at::Tensor& pool,
            int64_t r, double scale, at::Tensor& out_thr, int64_t groups) {
  const int64_t h = q_thc.size(1), c = q_thc.size(2), page_size = pool.size(1);
  const T* qp = q_thc.const_data_ptr<T>();
  const T* poolp = pool.const_data_ptr<T>();
  T* outp = out_thr.data_ptr<T>();
  int64_t longest = 0;
  for (int64_t g = 0; g < groups; ++g) longest = std::max(longest, kv_lens[g]);
  at::parallel_for(0, groups * h, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> q(c), scores(longest), acc(r);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t g = i / h, head = i % h, t = rows[g];
      const T* qh = qp + (t * h + head) * c;
      for (int64_t k = 0; k < c; ++k) q[k] = static_cast<float>(qh[k]);
      attend_one(q.data(), poolp, page_ids + page_starts[g], kv_lens[g], page_size, c, r,
                 static_cast<float>(scale), scores.data(), acc.data(), outp + (t * h + head) * r);
    }
  });
}

}  // namespace

// Sequences g: query row rows[g] of q_thc [T, H, C] (latent-absorbed queries), keys 0 ..
// kv_lens[g] - 1 in the pages page_ids[page_starts[g] ...] of pool [pages, page_size, C];
// writes row rows[g] of out_thr [T, H, r] (the attended latents) and no others. bf16 or float32.
void mla_decode(const at::Tensor& q_thc, const at::Tensor& rows, const at::Tensor& kv_lens,
                const at::Tensor& page_starts, const at::Tensor& page_ids,
                const at::Tensor& pool, int64_t r, double scale, at::Tensor& out_thr) {
  const auto dt = q_thc.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kFloat, "mla_decode: bf16 or float32 only");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q_thc, &pool, &out_thr})
    TORCH_CHECK(t->scalar_type() == dt && t->is_contiguous() && t->device().is_cpu(),
                "mla_decode: contiguous CPU tensors of one dtype only");
  const int64_t groups = rows.size(0), c = q_thc.size(2), page_size = pool.size(1);
  TORCH_CHECK(kv_lens.size(0) == groups && page_starts.size(0) == groups && pool.size(2) == c &&
              out_thr.size(0) == q_thc.size(0) && out_thr.size(1) == q_thc.size(1) &&
              out_thr.size(2) == r && r <= c, "mla_decode: shapes do not agree");
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* kp = kv_lens.data_ptr<int64_t>();
  const int64_t* sp = page_starts.data_ptr<int64_t>();
  const int64_t* ip = page_ids.data_ptr<int64_t>();
  for (int64_t g = 0; g < groups; ++g)
    TORCH_CHECK(rp[g] >= 0 && rp[g] < q_thc.size(0) && kp[g] >= 1 && sp[g] >= 0 &&
                sp[g] + (kp[g] + page_size - 1) / page_size <= page_ids.size(0),
                "mla_decode: group ", g, " out of range");
  for (int64_t i = 0; i < page_ids.size(0); ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < pool.size(0), "mla_decode: page id out of range");
  if (dt == at::kFloat)
    decode<float>(q_thc, rp, kp, sp, ip, pool, r, scale, out_thr, groups);
  else
    decode<c10::BFloat16>(q_thc, rp, kp, sp, ip, pool, r, scale, out_thr, groups);
}

}  // namespace ds3dist
