"""The jitted train step and what it is made of: optimizer, loss, state and batch shardings.

`bird_jax.train` (the trainer), `bird_jax.compile` (ahead-of-time compile for a TPU slice) and evaluation all
build the step, the state and its shardings here, so what is compiled ahead of time is what trains.

What the step does, per optimizer step:
* the batch is split into `grad_accum` micro-batches *strided* over the global batch (micro-batch k holds rows
  k, k + grad_accum, …), so each device's rows of every micro-batch are rows it already holds: no resharding;
* only the trained parameters are differentiated: the frozen ViT trunk (BiRD stage 2) runs forward only, no
  activation of it is kept for backward and no gradient of it is ever formed;
* the LM loss is computed from the final hidden states in sequence chunks (`loss_chunk` tokens), never the
  whole `[B, L, V]` float32 logits; its gradient is formed in the same pass (no recomputed logits) and chunks
  with no supervised token (image slots, prompts) are skipped;
* the model's logical activation constraints are live (`nn.logical_axis_rules`), so activations stay sharded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bird_jax import sharding as shd

BATCH_FIELDS = ("input_ids", "labels", "loss_mask", "segment_ids", "positions", "pixel_values")


def model_config_from(config: ml_collections.ConfigDict, tokenizer) -> Any:
  """The QwenVLConfig of this run; a demo tokenizer decides the vocab and the image token ids."""
  from bird_jax.model import QwenVLConfig

  fields = {**config.model.to_dict(), **lora_fields(config)}
  if config.init_from:
    hf = json.loads((Path(config.init_from) / "config.json").read_text())
    keep = {k: fields[k] for k in ("dtype", "param_dtype", "scan_layers", "remat_policy", "vision_remat_policy",
                                   "attention_impl", *lora_fields(config))}
    return QwenVLConfig.from_hf_config(hf, **keep)
  if not config.data.tokenizer:
    fields["vocab_size"] = max(fields["vocab_size"], tokenizer.vocab_size)
    fields["image_start_id"] = tokenizer.special["img_start"]
  cfg = QwenVLConfig(**fields)
  if tokenizer.special["img_start"] != cfg.image_start_id or tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer (vocab {tokenizer.vocab_size}, <img> {tokenizer.special['img_start']}) does not "
                     f"fit the model (vocab {cfg.vocab_size}, image_start_id {cfg.image_start_id})")
  return cfg


def lora_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.lora as QwenVLConfig fields (rank 0 = no adapters: the full fine-tuning of BiRD)."""
  lora = config.get("lora")
  if lora is None or not lora.rank:
    return {"lora_rank": 0}
  return {"lora_rank": int(lora.rank), "lora_alpha": float(lora.alpha), "lora_dropout": float(lora.dropout),
          "lora_targets": tuple(lora.targets)}


def uses_lora(config: ml_collections.ConfigDict) -> bool:
  return bool(lora_fields(config)["lora_rank"])


def lora_base(config: ml_collections.ConfigDict) -> str:
  """The frozen base a LoRA checkpoint's trained params go on, as its metadata names it."""
  return config.init_from or f"random init, seed {config.seed}"


# ------------------------------------------------------------------------------------------------ optimizer


def learning_rate(tc: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 over warmup_ratio of the steps (none at warmup_ratio=0), then cosine or constant."""
  warmup = int(round(tc.warmup_ratio * total_steps))
  if tc.schedule == "cosine":
    if not warmup:
      return optax.cosine_decay_schedule(tc.lr, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
  if tc.schedule == "constant":
    if not warmup:
      return optax.constant_schedule(tc.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warmup), optax.constant_schedule(tc.lr)],
                                [warmup])
  raise ValueError(f"config.train.schedule={tc.schedule!r}; use 'cosine' or 'constant'")


def trainable_of(tc: ml_collections.ConfigDict, params: Any) -> Any:
  """Bool pytree over `params`: which leaves the optimizer trains (config.train.train_vit/_resampler/_llm).
  A model with LoRA adapters trains them and keeps the decoder's base weights frozen."""
  from bird_jax.model import trainable_mask
  from bird_jax.model.lora import lora_mask

  has_adapters = any(jax.tree.leaves(lora_mask(params)))
  return trainable_mask(params, train_vit=tc.train_vit, train_resampler=tc.train_resampler,
                        train_llm=tc.train_llm and not has_adapters)


def stored_dtypes(config: ml_collections.ConfigDict, params: Any) -> Any:
  """The dtype each param is kept in: its own, except that with LoRA the frozen weights are stored in
  config.lora.base_dtype (bf16 halves the 9.6B base; adapters and the resampler stay in the model's param_dtype
  of float32, which the optimizer updates)."""
  base = jnp.dtype(config.lora.base_dtype) if uses_lora(config) else None
  return jax.tree.map(lambda t, p: p.dtype if (t or base is None) else base, trainable_of(config.train, params),
                      params)


def tree_bytes(tree: Any) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def prune(tree: Any, keep: Any) -> Any:
  """The nested dict `tree` with only the leaves where `keep` is True (and no empty dicts)."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      sub = prune(v, keep[k])
      if sub:
        out[k] = sub
    elif keep[k]:
      out[k] = v
  return out


def graft(tree: Any, part: Any) -> Any:
  """`tree` with the leaves of `part` (a nested dict such as `prune` makes) put in place or added."""
  if not isinstance(part, dict):
    return part
  out = dict(tree)
  for k, v in part.items():
    out[k] = graft(tree[k], v) if k in tree else v
  return out


def build_optimizer(tc: ml_collections.ConfigDict, params: Any, total_steps: int) -> optax.GradientTransformation:
  """AdamW (clipped, decoupled weight decay on matrices) on the trained leaves; frozen leaves carry no state."""
  # Decay matrices and embeddings only; norms, biases and the fixed sin-cos tables are left alone.
  decay = jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.chain(
    optax.clip_by_global_norm(tc.grad_clip),
    optax.adamw(learning_rate(tc, total_steps), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                mask=decay),
  )
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_of(tc, params))
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


# ------------------------------------------------------------------------------------------------ loss


def split_params(params: Any, trainable: Any) -> tuple[Any, Any]:
  """(trained, frozen): the same tree twice, each with None where the other one has the leaf."""
  return (jax.tree.map(lambda t, p: p if t else None, trainable, params),
          jax.tree.map(lambda t, p: None if t else p, trainable, params))


def merge_params(trainable: Any, trained: Any, frozen: Any) -> Any:
  return jax.tree.map(lambda t, a, b: a if t else b, trainable, trained, frozen)


def chunked_token_nll(hidden: jax.Array, head: jax.Array, labels: jax.Array, weights: jax.Array,
                      chunk: int) -> jax.Array:
  """Sum over tokens of weights · (logsumexp(logits) − logits[label]), logits = hidden @ head in float32,
  `chunk` tokens of each row at a time, so at most one chunk's `[B, chunk, V]` logits exist at once.
  hidden [B, L, E], head [E, V].

  The gradient is formed in the same pass as the loss (softmax − one-hot is the logits' cotangent, at hand
  while the chunk's logits are), so backward never recomputes the `[B, chunk, V]` logits: 3 head-sized matmuls
  per token instead of the 4 of a rematerialised chunk. Each row's supervised tokens are moved to its front
  first (a stable per-row permutation; rows stay on their devices), and a chunk no row supervises is skipped
  at run time: image slots and prompt tokens, most of a Med-GRIT row, cost no head FLOPs."""
  return _fused_nll(hidden, head, labels, weights, max(1, min(chunk, hidden.shape[1])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_nll(hidden, head, labels, weights, chunk):
  return _fused_nll_fwd(hidden, head, labels, weights, chunk)[0]


def _fused_nll_fwd(hidden, head, labels, weights, chunk):
  b, length, e = hidden.shape
  # Supervised tokens first in each row, in order; `order` undoes it for the hidden states' cotangent.
  order = jnp.argsort(weights == 0, axis=1, stable=True)
  row_gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
  h, y, w = row_gather(hidden, order), row_gather(labels, order), row_gather(weights, order)
  pad = (-length) % chunk
  if pad:  # padded positions carry weight 0
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    y, w = jnp.pad(y, ((0, 0), (0, pad))), jnp.pad(w, ((0, 0), (0, pad)))
  n = (length + pad) // chunk
  by_chunk = lambda x: x.reshape((b, n, chunk) + x.shape[2:]).swapaxes(0, 1)
  # Vocabulary-parallel: the head stays split over its vocabulary on the model axes (loss_vocab) and each chunk's
  # rows are gathered to it, so no device ever holds the whole [E, V] head or its [E, V] float32 gradient.
  w_head = nn.with_logical_constraint(head.astype(hidden.dtype), ("loss_embed", "loss_vocab"))
  d_head0 = nn.with_logical_constraint(jnp.zeros(head.shape, jnp.float32), ("loss_embed", "loss_vocab"))

  def one_chunk(carry, xs):
    total, d_head = carry
    hc, yc, wc = xs

    def supervised(total, d_head):
      hc_ = nn.with_logical_constraint(hc, ("loss_batch", None, "loss_embed"))
      logits = jnp.einsum("bce,ev->bcv", hc_, w_head, preferred_element_type=jnp.float32)
      logits = nn.with_logical_constraint(logits, ("loss_batch", None, "loss_vocab"))
      lse = jax.nn.logsumexp(logits, axis=-1)
      picked = jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0]
      # d(loss)/d(logits) = w · (softmax − one-hot(label))
      d_logits = jnp.exp(logits - lse[..., None]) * wc[..., None]
      d_logits = d_logits - jax.nn.one_hot(yc, logits.shape[-1], dtype=jnp.float32) * wc[..., None]
      d_logits = nn.with_logical_constraint(d_logits.astype(hc.dtype), ("loss_batch", None, "loss_vocab"))
      dh = jnp.einsum("bcv,ev->bce", d_logits, w_head, preferred_element_type=jnp.float32).astype(hc.dtype)
      d_head = d_head + jnp.einsum("bce,bcv->ev", hc_, d_logits, preferred_element_type=jnp.float32)
      return total + ((lse - picked) * wc).sum(), d_head, dh

    def skipped(total, d_head):
      return total, d_head, jnp.zeros_like(hc)

    total, d_head, dh = jax.lax.cond(jnp.any(wc != 0), supervised, skipped, total, d_head)
    return (total, d_head), dh

  (total, d_head), dh = jax.lax.scan(one_chunk, (jnp.zeros((), jnp.float32), d_head0),
                                      (by_chunk(h), by_chunk(y), by_chunk(w)))
  dh = dh.swapaxes(0, 1).reshape(b, n * chunk, e)[:, :length]
  d_hidden = row_gather(dh, jnp.argsort(order, axis=1))
  return total, (d_hidden, d_head.astype(head.dtype))


def _fused_nll_bwd(chunk, residuals, g):
  d_hidden, d_head = residuals
  return (d_hidden * g.astype(d_hidden.dtype), d_head * g.astype(d_head.dtype), None, None)


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)


def token_nll(model: nn.Module, params: Any, batch: dict[str, jax.Array], loss_chunk: int = 0,
              rngs: dict[str, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL over supervised tokens, number of supervised tokens), in float32.
  loss_chunk > 0: the chunked loss (`chunked_token_nll`); 0: full `[B, L, V]` logits (the reference).
  rngs: {"dropout": key} turns the LoRA adapters' dropout on."""
  weights = batch["loss_mask"].astype(jnp.float32)
  kwargs = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], rngs=rngs)
  if loss_chunk:
    hidden = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"], return_hidden=True,
                         **kwargs)
    return chunked_token_nll(hidden, params["llm"]["lm_head"], batch["labels"], weights, loss_chunk), weights.sum()
  logits = model.apply({"params": params}, batch["input_ids"], batch["pixel_values"], **kwargs)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
  return (nll * weights).sum(), weights.sum()


# ------------------------------------------------------------------------------------------------ the step


def micro_batches(batch: dict[str, jax.Array], grad_accum: int) -> dict[str, jax.Array]:
  """[B, ...] -> [grad_accum, B / grad_accum, ...], micro-batch k = rows k, k + grad_accum, … (strided, so a
  device's share of every micro-batch is among the rows it holds)."""
  def split(x):
    x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))

  return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *, trainable: Any, grad_accum: int = 1,
                    rules=shd.DEFAULT_RULES, loss_chunk: int = 0, param_shardings: Any = None, dropout_seed: int = 0):
  """One optimizer step (state, batch) -> (state, metrics). `trainable`: bool pytree over the params (frozen
  leaves are neither differentiated nor updated). With grad_accum > 1 the micro-batches are scanned in-step
  and their gradients summed, then divided by the supervised-token count of the whole batch, so the result
  equals the big-batch gradient. `rules`: the logical-axis rules the model's activation constraints use.
  LoRA dropout draws from a key that is a function of (dropout_seed, step, micro-batch): a resumed run
  drops exactly what an unbroken one does."""

  compute = jnp.dtype(model.config.compute_dtype)
  dropout = model.config.lora_rank > 0 and model.config.lora_dropout > 0

  def loss(trained, frozen, mb, key):
    params = merge_params(trainable, trained, frozen)
    if compute.itemsize == 2:
      # Every decoder weight is cast to the compute dtype where it is used (kernels, biases, RMSNorm scales,
      # the embedding and the head), so casting the whole stack here computes the same numbers; but the
      # per-layer gradients of the scanned stack then come out of the scan in 16 bits and are widened once,
      # outside it, instead of as a second float32 copy of all decoder gradients per micro-batch.
      params = {**params, "llm": jax.tree.map(lambda x: x.astype(compute), params["llm"])}
    return token_nll(model, params, mb, loss_chunk, rngs={"dropout": key} if dropout else None)

  grad_fn = jax.value_and_grad(loss, has_aux=True)

  def keep_sharded(grads):
    if param_shardings is None:
      return grads
    return jax.tree.map(lambda t, g, s: jax.lax.with_sharding_constraint(g, s) if t else g,
                        trainable, grads, param_shardings)

  def train_step(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    params = state["params"]
    trained, frozen = split_params(params, trainable)
    step_key = jax.random.fold_in(jax.random.key(dropout_seed), state["step"])
    with nn.logical_axis_rules(rules):
      if grad_accum == 1:
        (loss_sum, count), grads = grad_fn(trained, frozen, batch, step_key)
      else:
        def body(carry, xs):
          g_acc, l_acc, n_acc = carry
          k, mb = xs
          (loss_mb, n), g = grad_fn(trained, frozen, mb, jax.random.fold_in(step_key, k))
          return (keep_sharded(jax.tree.map(jnp.add, g_acc, g)), l_acc + loss_mb, n_acc + n), None

        zeros = keep_sharded(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained))
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, count), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum),
                                                                micro_batches(batch, grad_accum)))
    denom = jnp.maximum(count, 1.0)
    grads = keep_sharded(jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trained))
    # The optimizer sees the whole tree; the frozen leaves' zeros feed only set_to_zero, whose updates are
    # dropped below, so XLA never forms them.
    full = merge_params(trainable, grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(full, state["opt_state"], params)
    new_params = jax.tree.map(lambda t, p, u: (p + u).astype(p.dtype) if t else p, trainable, params, updates)
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": optax.global_norm(grads)}
    return new_state, metrics

  return train_step


# ------------------------------------------------------------------------------------------------ shardings


def optimizer_shardings(opt_state_shapes: Any, params: Any, param_shardings: Any, mesh) -> Any:
  """Each optimizer-state leaf takes the sharding of the parameter it mirrors (Adam's moments share their
  param's path and shape); anything else (step counts) is replicated. Derived, never compiled: compiling
  `tx.init` to read XLA's choice needs the whole model's temporaries (58 GB for the 9.6B model)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  by_path = {_dict_keys(path): (leaf.shape, sharding)
             for (path, leaf), sharding in zip(leaves, jax.tree.leaves(param_shardings), strict=True)}

  def pick(path, leaf):
    keys = _dict_keys(path)
    for i in range(len(keys)):
      shape, sharding = by_path.get(keys[i:], (None, None))
      if shape == tuple(leaf.shape):
        return sharding
    return shd.replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, opt_state_shapes)


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def create_state_shardings(model_cfg, tx_builder, mesh, rules, seed: int, dtypes_of=None):
  """Shapes first: abstract boxed params → logical specs → NamedShardings; init jitted into those shardings.
  `dtypes_of(params)`: the dtype each param is kept in (default: as initialised).
  Returns (tx, init_state, abstract_state, state_shardings)."""
  from bird_jax.model import init_params

  boxed = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(seed)))
  param_shardings = shd.logical_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  dtypes = dtypes_of(abstract_params) if dtypes_of else jax.tree.map(lambda p: p.dtype, abstract_params)
  abstract_params = jax.tree.map(lambda p, d: jax.ShapeDtypeStruct(p.shape, d), abstract_params, dtypes)
  tx = tx_builder(abstract_params)
  opt_shardings = optimizer_shardings(jax.eval_shape(tx.init, abstract_params), abstract_params, param_shardings,
                                      mesh)
  state_shardings = {"step": shd.replicated(mesh), "params": param_shardings, "opt_state": opt_shardings}

  def init_state():
    params = jax.tree.map(lambda p, d: p.astype(d), nn.unbox(init_params(model_cfg, jax.random.key(seed))), dtypes)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(init_state)
  return tx, init_state, abstract_state, state_shardings


def fresh_state(init_from: str, model_cfg, tx: optax.GradientTransformation, init_state, state_shardings):
  """Step-0 state in its target shardings: the Hugging Face checkpoint's weights when `init_from` is set
  (loaded tensor by tensor straight into the shardings, never random-initialised first), else random."""
  if not init_from:
    return jax.jit(init_state, out_shardings=state_shardings)()
  from bird_jax.model.convert import load_params
  from bird_jax.model.lora import lora_mask

  abstract = jax.eval_shape(init_state)["params"]
  params = load_params(init_from, model_cfg, shardings=state_shardings["params"],
                       dtypes=jax.tree.map(lambda a: a.dtype, abstract))
  if model_cfg.lora_rank:  # adapters are not in a Qwen-VL checkpoint: theirs is the step-0 init (B = 0)
    adapters = lora_mask(abstract)
    params = graft(params, jax.jit(lambda: prune(init_state()["params"], adapters),
                                   out_shardings=prune(state_shardings["params"], adapters))())
  return jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)},
                 out_shardings=state_shardings, donate_argnums=(0,))(params)


def images_per_row(config: ml_collections.ConfigDict, n_queries: int, seq_len: int | None = None) -> int:
  """Image slots per training row: data.images_per_row, or as many one-image records as fit a packed row
  (the data pipeline's rule; `seq_len` defaults to data.seq_len)."""
  from bird_jax.data.pipeline import default_max_images

  if not config.data.packing:
    return 1
  return config.data.get("images_per_row", 0) or default_max_images(n_queries, seq_len or config.data.seq_len)


def pixel_dtype(model_cfg) -> np.dtype:
  """Pixels travel in the model's compute dtype when it is 16-bit: the ViT casts them to it first anyway, so
  this loses nothing and halves the batch's bytes on host, on the wire and on device."""
  return np.dtype(model_cfg.compute_dtype) if np.dtype(model_cfg.compute_dtype).itemsize == 2 else np.dtype(np.float32)


def host_batch(batch: dict[str, np.ndarray], model_cfg) -> dict[str, np.ndarray]:
  """The data pipeline's batch as the step takes it (pixels in `pixel_dtype`)."""
  return {**batch, "pixel_values": np.asarray(batch["pixel_values"]).astype(pixel_dtype(model_cfg), copy=False)}


def abstract_batch(config: ml_collections.ConfigDict, model_cfg, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch of one optimizer step as ShapeDtypeStructs in its shardings (what `to_global` makes)."""
  b, length = config.train.batch_size, config.data.seq_len
  n_img, s = images_per_row(config, model_cfg.n_queries), model_cfg.image_size
  shapes = {"input_ids": ((b, length), jnp.int32), "labels": ((b, length), jnp.int32),
            "loss_mask": ((b, length), jnp.float32), "segment_ids": ((b, length), jnp.int32),
            "positions": ((b, length), jnp.int32), "pixel_values": ((b, n_img, s, s, 3), pixel_dtype(model_cfg))}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(shd.batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


@dataclasses.dataclass
class TrainStep:
  """Everything the trainer and the ahead-of-time compile share: the model, optimizer, state shardings and
  the jitted step (state donated)."""
  model: nn.Module
  tx: optax.GradientTransformation
  init_state: Any
  abstract_state: Any
  state_shardings: Any
  step: Any  # jax.jit(train_step)
  trainable: Any  # bool pytree over the params
  # With LoRA a checkpoint holds the trained params and the optimizer state only: the frozen base is the
  # `init_from` checkpoint (or the seed's random init) it was trained from, pointed to by its metadata.
  trained_only: bool = False

  def to_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint stores of `state`."""
    if not self.trained_only:
      return state
    return {**state, "params": prune(state["params"], self.trainable)}

  def checkpoint_target(self) -> dict[str, Any]:
    """The abstract tree (with shardings) a checkpoint restores into."""
    return shd.abstract_with_shardings(self.to_checkpoint(self.abstract_state),
                                       self.to_checkpoint(self.state_shardings))

  def from_checkpoint(self, restored: dict[str, Any], fresh: dict[str, Any] | None) -> dict[str, Any]:
    """The full state from a restored checkpoint; `fresh` (the step-0 state: the base weights) fills in
    what a trained-only checkpoint leaves out."""
    if not self.trained_only:
      return restored
    return {**restored, "params": graft(fresh["params"], restored["params"])}


def build_train_step(config: ml_collections.ConfigDict, model_cfg, mesh) -> TrainStep:
  from bird_jax.model import QwenVL

  tc = config.train
  rules = shd.rules_from_config(config.mesh.rules)
  tx, init_state, abstract_state, state_shardings = create_state_shardings(
    model_cfg, lambda p: build_optimizer(tc, p, tc.steps), mesh, rules, config.seed,
    dtypes_of=functools.partial(stored_dtypes, config))
  model = QwenVL(model_cfg)
  trainable = trainable_of(tc, abstract_state["params"])
  fn = make_train_step(model, tx, trainable=trainable, grad_accum=tc.grad_accum,
                       rules=rules, loss_chunk=tc.get("loss_chunk", 0),
                       param_shardings=state_shardings["params"], dropout_seed=config.seed)
  # Batches arrive as global arrays already laid out by `to_global`; jit takes their sharding as given.
  step = jax.jit(fn, donate_argnums=(0,), in_shardings=(state_shardings, None), out_shardings=(state_shardings, None))
  return TrainStep(model, tx, init_state, abstract_state, state_shardings, step, trainable,
                   trained_only=uses_lora(config))
