"""Defaults every target config starts from (not a target itself: `--config=_base` is not offered)."""

from __future__ import annotations

import dataclasses

import ml_collections

from bird_jax.model.config import QwenVLConfig


def model_config(preset: QwenVLConfig) -> ml_collections.ConfigDict:
  """All QwenVLConfig fields, so every one of them can be overridden with --config.model.FIELD=... (except the
  LoRA ones: those come from --config.lora.*)."""
  return ml_collections.ConfigDict({k: v for k, v in dataclasses.asdict(preset).items()
                                    if not k.startswith("lora_")})


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/default"
  # The TPU slice this config is sized for (`python -m bird_jax.compile --config=NAME` checks it fits); "" none.
  c.topology = ""
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # "folder": an existing Med-GRIT folder (data_gen output or the official release) in data.raw_dir;
  # "phantom": generate the built-in synthetic set under workdir (the demo configs; its options: data.phantom).
  c.data.source = "folder"
  c.data.raw_dir = ""
  c.data.builder_config = "generated"  # or "official" (released Med-GRIT file names)
  c.data.tfds_dir = ""  # default: <workdir>/tfds
  c.data.tokenizer = ""  # a checkpoint dir with qwen.tiktoken, or a tokenizer.json; "" -> train a demo BPE
  c.data.tokenizer_vocab_size = 1024
  c.data.seq_len = 2048
  c.data.images_per_row = 0  # image slots per packed row; 0 -> as many one-image records as fit seq_len
  c.data.packing = True
  c.data.loss_on = "assistant"  # or "qwen_official"
  c.data.worker_count = 0
  c.data.system_prompt = "You are a helpful assistant."  # "" -> no system turn
  # A first data stage: the first `steps` optimizer steps read this set instead (same model, optimizer and
  # lr schedule), then training moves on to the main set: a warm-up set (e.g. single-object grounding before
  # crowded images, or one modality before all), and with `keep` a share of it mixed in for the rest of the run.
  c.data.curriculum = ml_collections.ConfigDict()
  c.data.curriculum.steps = 0  # 0 -> no first stage
  c.data.curriculum.raw_dir = ""  # a Med-GRIT folder; "" with data.source=phantom -> data.phantom.curriculum
  c.data.curriculum.seq_len = 0  # 0 -> data.seq_len
  # After the first stage, this fraction of the steps (evenly spread) still reads the first-stage set, so what
  # it taught is not unlearned on the main set; 0 -> a clean switch.
  c.data.curriculum.keep = 0.0

  c.model = model_config(QwenVLConfig.qwen_vl_chat_7b())
  c.init_from = ""  # a Hugging Face Qwen-VL(-Chat) checkpoint directory; "" -> random init

  # LoRA (docs/lora.md): rank > 0 trains low-rank adapters on the decoder's projections instead of its weights;
  # the resampler stays trained (train.train_resampler), the ViT and the decoder's base weights are frozen and
  # kept in base_dtype; checkpoints then hold the adapters, the resampler and their optimizer state only.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  # Modules of the HF Qwen-VL decoder layer (Qwen-VL's own finetune.py LoRA adapts c_attn, attn.c_proj, w1, w2).
  c.lora.targets = ("c_attn", "attn.c_proj", "w1", "w2", "mlp.c_proj")
  c.lora.base_dtype = "bfloat16"

  # Mesh axes (data, fsdp, tensor); exactly one -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, -1, 1)
  c.mesh.rules = ()  # () -> bird_jax.sharding.DEFAULT_RULES

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32  # global, in sequences per optimizer step
  c.train.grad_accum = 1  # micro-batches per step, accumulated inside the jitted step
  # LM loss over this many tokens of the sequence at a time (logits recomputed in backward); 0 -> whole rows
  c.train.loss_chunk = 512
  c.train.lr = 2e-5
  c.train.schedule = "cosine"  # or "constant"
  c.train.warmup_ratio = 0.01
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.grad_clip = 1.0
  # BiRD stage 2: ViT frozen, resampler + LLM trained.
  c.train.train_vit = False
  c.train.train_resampler = True
  c.train.train_llm = True
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.max_to_keep = 2
  c.train.max_minutes = 0.0  # >0: stop early (and checkpoint) after this much training time
  # >0: also checkpoint whenever this many minutes passed since the last save (a preemption without notice then
  # loses at most that much work, whatever the step time); checkpoint_every still applies
  c.train.checkpoint_minutes = 0.0
  # Orbax checkpoints; "" -> <workdir>/checkpoints. A gs://bucket/... path goes through Orbax's own filesystem
  # layer (etils epath + gcsfs, tensorstore for the arrays; pip install -e ".[gcs]"), so a recreated spot slice
  # or a requeued job resumes from the bucket (launch/README.md).
  c.train.checkpoint_dir = ""
  # TensorBoard event files of the logged metrics (tensorboardX; gs:// through its google-cloud-storage
  # writer); "" -> none.
  c.train.tensorboard_dir = ""

  c.eval = ml_collections.ConfigDict()
  c.eval.at_end = True
  c.eval.tasks = ("VG", "RO")
  c.eval.max_examples = 0  # per task; 0 = all
  c.eval.batch_size = 16
  c.eval.max_new_tokens = 80  # the paper's setting for VG, RO and GC
  c.eval.max_new_tokens_mii = 100
  # Held-out evaluation during training every this many steps (0 = off), on the first every_max_examples
  # test questions per task (0 = all): scores per step in eval_curve.jsonl and the log.
  c.eval.every = 0
  c.eval.every_max_examples = 150
  # VG samples of each eval.every evaluation drawn into TensorBoard (green reference, red predicted boxes).
  c.eval.tensorboard_images = 4
  return c
