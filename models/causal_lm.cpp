#include "models/causal_lm.h"

#include "models/decoder_block.h"
#include "ops/elementwise.h"
#include "ops/embedding.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "runtime/error.h"

namespace omniq {

CausalLM::CausalLM(const std::string& model_dir, DType compute, Device dev) : compute_(compute), device_(dev) {
  ModelCheckpoint ckpt(model_dir);
  config_ = ckpt.config();
  embeddings_ = ckpt.load_embeddings(compute, dev);
  blocks_.reserve(static_cast<size_t>(ckpt.num_blocks()));
  for (int64_t i = 0; i < ckpt.num_blocks(); ++i) blocks_.push_back(ckpt.load_block(i, compute, dev));
  head_ = ckpt.load_head(compute, dev, &embeddings_);
}

Tensor embed_tokens(const ModelConfig& cfg, const NamedWeights& embeddings, const Tensor& ids_any, Device dev) {
  OMNIQ_CHECK(ids_any.ndim() == 2 && ids_any.dtype() == DType::i32, "embed: ids must be i32 [B, T], got %s",
              ids_any.str().c_str());
  Tensor ids = ids_any.device() == dev ? ids_any.alias() : ids_any.to(dev);
  int64_t B = ids.size(0), T = ids.size(1);
  Tensor x = embedding_forward(ids, embeddings.get("embed_tokens.weight"));  // [B, T, E]
  if (const Tensor* proj = embeddings.find("project_in.weight")) x = linear_forward(x, *proj);
  if (cfg.is_opt()) {
    // OPT's learned positions: row = position + 2 (transformers' OPTLearnedPositionalEmbedding).
    OMNIQ_CHECK(T <= cfg.max_position_embeddings, "sequence of %lld tokens exceeds max_position_embeddings %lld",
                static_cast<long long>(T), static_cast<long long>(cfg.max_position_embeddings));
    std::vector<int32_t> pos(static_cast<size_t>(B * T));
    for (int64_t i = 0; i < B * T; ++i) pos[static_cast<size_t>(i)] = static_cast<int32_t>(i % T + cfg.position_offset);
    Tensor pos_ids = Tensor::from_i32(pos, {B, T}, dev);
    x = add(x, embedding_forward(pos_ids, embeddings.get("embed_positions.weight")));
  }
  return x;
}

Tensor CausalLM::embed(const Tensor& ids) const { return embed_tokens(config_, embeddings_, ids, device_); }

Tensor CausalLM::head(const Tensor& hidden) const {
  Tensor h = hidden.alias();
  if (config_.is_llama()) {
    h = rmsnorm_forward(h, head_.get("norm.weight"), config_.norm_eps, nullptr);
  } else if (config_.has_final_norm()) {
    h = layernorm_forward(h, head_.get("final_layer_norm.weight"), head_.get("final_layer_norm.bias"),
                          config_.norm_eps, nullptr, nullptr);
  }
  if (const Tensor* proj = head_.find("project_out.weight")) h = linear_forward(h, *proj);
  return linear_forward(h, head_.get("lm_head.weight"));
}

Tensor CausalLM::block_forward(int64_t i, const Tensor& x) const {
  if (!hooks_) return decoder_block_forward(config_, blocks_.at(static_cast<size_t>(i)), x);
  ag::Tape t;
  return std::move(decoder_block_forward(t, config_, block_params(blocks_.at(static_cast<size_t>(i))),
                                         ag::constant(x.alias()), hooks_)->value);
}

Tensor CausalLM::forward(const Tensor& ids) const {
  Tensor x = embed(ids);
  for (int64_t i = 0; i < num_blocks(); ++i) x = block_forward(i, x);
  return head(x);
}

}  // namespace omniq
