"""The embedded default: a tiny Qwen2-architecture model on the shipped synthetic mixture, on CPU.

    python -m merit_jax.main --config configs/default.py [--workdir DIR] [--config.KEY=VALUE ...]

Every other config in configs/ starts from this one and overrides what differs; each key is documented next
to it here, and the stages' docs (docs/*.md) say more.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "workdir/default"  # overridden by --workdir
  c.seed = 0

  # --- model -------------------------------------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.hf_path = ""  # a local Hugging Face directory; "" builds `m.tiny` from random weights (needs `basin`)
  m.model_type = "qwen2"  # family of the random model when hf_path is "": qwen2 (from `m.tiny`) | qwen2_5_vl
  # Architecture of the random tiny model (Qwen2Config fields); vocab_size comes from the tokenizer.
  m.tiny = ml_collections.ConfigDict(dict(
      hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
      tie_word_embeddings=True))
  m.param_dtype = "float32"  # master weights
  m.compute_dtype = "float32"  # "bfloat16" on accelerators
  m.remat = "none"  # none | full | dots (jax.checkpoint policy inside each decoder block)
  # decoder layers (and vision blocks) as one lax.scan over a bf16 (compute-dtype) stacked copy of their weights:
  # compile time and program size independent of depth; equal to the unrolled loop in fp32 up to summation order
  # (docs/TRAINING.md). Off for this 2-layer model (nothing to gain); on in the Qwen2.5 0.5B/1.5B/7B and VL configs
  m.scan_layers = False
  # xla | cudnn (cuDNN flash kernel, packed rows as ragged offsets: NVIDIA GPUs) | splash (Pallas TPU kernel
  # over packed rows); neither kernel materialises T x S scores. splash
  # needs seq lengths that are multiples of 128, else falls back to xla; interpreted, slowly, off TPU)
  m.attention = "xla"
  # attention=cudnn: the segments (packed examples + padding) per row its packed layout tells apart; its
  # workspace grows with it (docs/TRAINING.md); a training plan with a fuller row is refused up front.
  m.max_segments = 16
  m.logits_chunk = 512  # positions whose logits exist at once in a loss (0: all): [B, 512, V] fp32, not [B, S, V]

  # --- mesh --------------------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tp=1))  # -1: all remaining devices

  # --- data --------------------------------------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.path = ""  # file or directory of task records; "" generates the shipped synthetic mixture
  d.tasks = ()  # optional tuple of {"name": ..., "path": ...}; overrides `path`
  d.tokenizer = ""  # tokenizer directory; "" uses the model's (or the synthetic mixture's) tokenizer
  d.image_root = ""  # Vision-FLAN images resolve against this
  d.image_min_pixels = 0  # Qwen2.5-VL image resize bounds (0: the model's preprocessor_config.json)
  d.image_max_pixels = 0
  d.max_image_pixels = 50_000_000  # image files larger than this (pixels) are refused, naming the record
  d.max_len = 128  # tokens per example; longer examples follow `truncation`
  d.truncation = "left"  # left (drop the oldest prompt tokens) | right | skip
  d.heldout_fraction = 0.1
  d.heldout_max = 64  # per task
  d.seed = 0
  # the shipped mixture (merit_jax/data/synthetic.py, docs/DATA.md): 16 tasks in 4 families, sizes 0.5-1.5x the mean
  d.synthetic = ml_collections.ConfigDict(dict(seed=0, examples_per_task=240))

  # --- basin: short joint pre-alignment giving a merge-ready θ⁰ --------------------------------------
  c.basin = b = ml_collections.ConfigDict()
  b.enabled = True
  # 150: the synthetic tasks' formats are learned (a mergeable θ⁰), their position skills half-way, so the task
  # gradients show the families (~150-200 steps; docs/SPLIT.md); a shared basin, not a converged model
  b.steps = 150
  b.learning_rate = 3e-3

  # --- extract: dataset-level gradients at θ⁰ -------------------------------------------------------
  c.extract = e = ml_collections.ConfigDict()
  e.n_calib = 200  # calibration examples per task (paper: 200)
  e.micro_chunk = 16  # examples per vmap(grad) chunk: bounds peak memory
  e.reduction = "sketch"  # full | stride | sketch
  e.dim = 4096  # d for sketch
  e.stride = 7  # s for stride
  e.per_example = "mean"  # mean | unit (normalise each example's gradient first) | tokens (token-weighted)
  e.include = (".*",)  # regexes over parameter paths
  e.exclude = ("embed_tokens", "lm_head")
  e.keep_example_sketches = True  # needed for the calibration-stability curve
  # auto | per_example (vmap(grad)) | batched (one gradient of the weighted loss per chunk: a training step's
  # cost and memory; same vector for per_example=mean|tokens); auto: batched when nothing per-example is kept
  e.gradients = "auto"
  # batched path only: pack each task's examples into rows (first fit in its sequence bucket, kept apart by
  # segment ids, as training does): the same vector without the padding's compute (docs/EXTRACT.md)
  e.pack = False
  e.remat = ""  # the extraction's model.remat ("": model.remat); its micro-chunks may afford less recompute
  # the extraction's model.logits_chunk (-1: model's; 0: whole rows' logits at once, no chunk recomputed in the
  # backward: faster where the micro-chunk's [rows, S, V] float32 logits fit)
  e.logits_chunk = -1
  e.seed = 0  # of the sketch's hash
  e.stability_sizes = (10, 25, 50, 100, 200)  # m of the calibration-stability curve
  e.stability_draws = 20  # random m-subsets per task and m
  # the curve's reference: this many training examples per task held apart from the n calibration ones (paper:
  # 1,000; fewer where a task has fewer; 0: the mean of all n calibration examples, which reads high)
  e.stability_reference = 1000

  # --- split ---------------------------------------------------------------------------------------
  c.split = s = ml_collections.ConfigDict()
  s.method = "merit"  # merit | random | conflict | none
  s.depth = 2  # K = 2**depth groups
  s.seed = 0  # random split; restarts of the conflict baseline
  s.axes = "global"  # global: level l cuts along global principal axis l | local: PCA again inside each group
  s.center = True  # centre the cosine rows before PCA (removes the component every task shares)
  s.restarts = 16  # seeded restarts of the `conflict` baseline's k-means

  # --- train (branches, and joint training when split.method=none) ------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.optimizer = "adamw"  # adamw | sgd
  t.learning_rate = 1e-3
  t.schedule = "cosine"  # cosine | linear | constant
  t.warmup_steps = 10
  t.weight_decay = 0.0
  t.grad_clip = 1.0
  t.epochs = 1.0
  t.batch_size = 16  # sequences per step, global
  t.seq_len = 128  # packed row length
  t.grad_accum = 1
  t.checkpoint_every = 50
  t.keep_checkpoints = 2
  t.eval_every = 0  # 0: only at the end
  t.log_every = 2  # steps between training-loss log points (the report plots them)
  t.min_lr_ratio = 0.0  # the schedule decays to learning_rate * min_lr_ratio
  t.no_decay = (r"(^|/)bias$", r"(^|/)scale$", r"(^|/)embed_tokens/embedding$")  # no weight decay
  t.freeze = ()  # regexes of parameters that get no update (VL configs: ("^visual/",), the vision tower)
  t.adam_b1, t.adam_b2, t.adam_eps = 0.9, 0.999, 1e-8
  t.momentum = 0.9  # sgd
  t.batch_tokens = 0  # >0: global batch given in tokens (rows = batch_tokens // seq_len) instead of batch_size
  t.eval_batch_size = 0  # 0: batch_size
  t.loader_threads = 1  # threads building batches (Qwen2.5-VL: image decoding; raise it for real images)

  # --- merge ---------------------------------------------------------------------------------------
  c.merge = g = ml_collections.ConfigDict()
  g.method = "tokens"  # tokens | uniform | weights | task_arithmetic | ties | dare
  g.weights = ()  # for method=weights (normalised; a warning if they do not sum to 1)
  g.dtype = ""  # "" keeps the inputs' dtype
  g.base = ""  # θ⁰ for task_arithmetic / ties / dare ("" = WORKDIR/basin)
  g.lam = 1.0  # task arithmetic scale
  g.density = 0.2  # TIES: fraction of each task vector kept
  g.drop_p = 0.9  # DARE: drop probability

  # --- export / evaluate / report ------------------------------------------------------------------
  c.export = ml_collections.ConfigDict(dict(dtype="float32"))
  c.evaluate = v = ml_collections.ConfigDict()
  v.baselines = ("joint", "uniform")  # any of joint, joint2, random, conflict, uniform
  v.max_new_tokens = 16
  v.noise_sigmas = (0.01, 0.05, 0.1)
  v.noise_draws = 2
  v.lmc_points = 5
  # Hessian–PCA alignment at θ⁰ (docs/SPLIT.md): |cos| of each split axis's parameter-space direction with the
  # span of the top-k Hessian eigenvectors of the training loss, against random directions. ~15 s here; it
  # costs ~k+40 Hessian-vector products and a Lanczos basis of 44 x the selected parameters (off at 0.5B+).
  v.hessian_alignment = True
  v.hessian_k = 10  # the paper: top-10
  v.hessian_examples = 64  # training examples (round-robin over the tasks) in the loss whose Hessian is taken
  v.hessian_max_bytes = 4 << 30  # skipped (with the reason in the report) when the Lanczos basis needs more

  # --- plan (python -m merit_jax.plan): the run's size when no data is at hand ---------------------------
  c.plan = ml_collections.ConfigDict(dict(tokens=0, tasks=0))  # training tokens (one epoch), tasks; 0: the data's
  # mean tokens of a calibration example: with extract.pack, how many rows a task's examples fill (0: each one a
  # full sequence bucket, i.e. no gain from packing)
  c.plan.example_tokens = 0
  return c
