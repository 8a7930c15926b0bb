"""Fashion-MNIST: CNN teacher (1.63M params) -> MLP student (0.10M), KD vs scratch.

Default (the README's quick start): the whole pipeline on the full dataset:
train the teacher, then for 3 seeds train the student from scratch and
distilled, on all of the training set and on 3% of it (Hinton et al. 2015,
section 6), then write WORKDIR/report.{json,md,png}.

    python -m kdjax.main --config=configs/fashion_mnist.py --workdir=/tmp/kd_fmnist

Measured runtime on a 2-core CPU: 25m49s end to end, install included (most
of it the teacher's forward passes in the distill steps). Presets
(`--config=configs/fashion_mnist.py:<preset>`):
  smoke   a few hundred steps of everything, 1 seed: ~1 minute on CPU.
  teacher only the teacher (mode=teacher).
Any field can be overridden, e.g. --config.distill.temperature=4.
"""

import ml_collections


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # teacher | scratch | distill | evaluate | pipeline (all of them in order)
  # | aot_check (compile for config.aot.topology; see below).
  config.mode = "pipeline"
  config.seed = 0  # Student init, dropout and data order (single-run modes).
  config.variant = ""  # Pipeline variant name of this run (set by the pipeline).

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist_idx"  # A shipped builder or any tfds name.
  config.data.data_dir = ""  # tfds data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.data.source_dir = "/usr/share/datasets/fashion-mnist"  # The idx files.
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.input_key = "image"  # Feature holding the model input.
  config.data.label_key = "label"  # Feature holding the integer class.
  config.data.input_shape = (28, 28, 1)  # One example, for model init.
  config.data.input_scale = 255.0  # Inputs are divided by this.
  config.data.num_classes = 10
  config.data.train_fraction = 1.0  # Use a fixed random subset of the train split.
  config.data.subset_seed = 0  # Which subset (the same for every run seed).
  config.data.cache_in_memory = True  # Decode the splits once into host memory.
  config.data.augment_max_shift = 2  # Pixels of random shift when augmenting.
  config.data.augment_flip = True  # Random horizontal flips when augmenting.

  config.teacher = ml_collections.ConfigDict()
  config.teacher.model = ml_collections.ConfigDict(dict(
      name="cnn",  # See kdjax.models.MODELS.
      channels=(32, 64),  # Conv channels per stage (each stage halves H, W).
      convs_per_stage=1,
      dense_features=512,
      dropout_rate=0.3))
  config.teacher.checkpoint_dir = ""  # distill/evaluate: '' = WORKDIR/teacher.
  config.teacher.train = _train(num_epochs=15, augment=True, weight_decay=5e-4)

  config.student = ml_collections.ConfigDict()
  config.student.model = ml_collections.ConfigDict(dict(
      name="mlp", hidden=(128,), dropout_rate=0.0))
  config.student.train = _train(num_epochs=40, augment=False)

  config.distill = ml_collections.ConfigDict()
  config.distill.alpha = 0.5  # Weight of T^2 * KL(teacher_T || student_T).
  config.distill.temperature = 2.0  # T, dividing both models' logits.
  config.distill.hard_labels = "dataset"  # Or 'teacher' (its argmax).
  # Output-level terms; () = Hinton's (('kl', alpha), ('ce', 1 - alpha)). Else a
  # tuple of dicts: name (kdjax.distill.losses.OBJECTIVES or 'ce'), weight, optional
  # weight_end + schedule (constant|linear|cosine) and the loss's options
  # (beta for jsd, lam for skew KLs, k for topk_kl).
  config.distill.terms = ()
  config.distill.temperature_end = -1.0  # < 0: constant temperature.
  config.distill.temperature_schedule = "constant"  # constant|linear|cosine.
  # Feature terms: dicts(student=<sown path>, teacher=<sown path>,
  # loss=mse|cosine|attention_kl, weight, [teacher_index]).
  config.distill.features = ()
  # More frozen teachers: dicts(checkpoint_dir=..., model=dict(name=..., ...),
  # weight=...). config.teacher is the first, weighted by teacher_weight.
  config.distill.extra_teachers = ()
  config.distill.teacher_weight = 1.0
  config.distill.combine = "ensemble"  # ensemble (probability space) | sum (of losses).
  # A teacher cache dir (mode=cache_teacher) to distill from instead of a
  # teacher: the teacher is never loaded; '' = the online teacher.
  config.distill.teacher_cache = ""

  # mode='cache_teacher' (kdjax/teacher_cache.py): the frozen teacher's top k
  # log-probs at config.distill.temperature, per token or example.
  config.cache = ml_collections.ConfigDict()
  config.cache.dir = ""  # '' = WORKDIR/teacher_cache.
  config.cache.split = ""  # '' = data.train_split (its train_fraction subset).
  config.cache.k = 64  # Kept per token/example (capped at vocab/classes).
  config.cache.dtype = "bfloat16"  # Of the log-probs: bfloat16 | float32.
  config.cache.records_per_shard = 256  # Sequences/examples per shard file.
  config.cache.batch_size = 0  # Teacher batch; 0 = student.train.batch_size.
  config.cache.chunk_size = 0  # LM positions per head chunk; 0 = all at once.

  config.pipeline = ml_collections.ConfigDict()
  config.pipeline.seeds = (0, 1, 2)  # One scratch and one distilled student each.
  config.pipeline.small_data_fraction = 0.03  # 0 disables the small-data runs.
  config.pipeline.small_data_num_epochs = 150  # Same step count order as full data.

  config.parallel = ml_collections.ConfigDict()
  config.parallel.backend = "shard_map"  # Or 'pmap' (same per-device step).

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000  # Save every N steps (and at the end).
  config.checkpoint.keep = 2  # Keep the newest K.
  config.checkpoint.async_save = True  # Write in the background.
  # A run whose every checkpoint is damaged stops (nothing is deleted);
  # True sets them aside and starts over from step 0.
  config.checkpoint.restart_if_unreadable = False

  # Several processes (hosts). On a Cloud TPU VM nothing needs setting: the
  # slice's workers are found automatically. Elsewhere set the three fields
  # below on every process (or $KDJAX_COORDINATOR_ADDRESS,
  # $KDJAX_NUM_PROCESSES, $KDJAX_PROCESS_ID); the fields win over the env.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""  # host:port of process 0; '' = env or auto.
  config.distributed.num_processes = 0  # 0 = env or auto; 1 = never start jax.distributed.
  config.distributed.process_id = -1  # This process, 0..num_processes-1; -1 = env or auto.
  config.distributed.initialization_timeout = 60  # Seconds to reach the coordinator.
  config.distributed.auto_on_tpu = True  # Start it on a Cloud TPU VM without fields.

  # mode='aot_check': compile the training steps for a Cloud TPU topology on
  # this machine (needs libtpu: pip install "jax[tpu]==0.10.2") and refuse a
  # config whose per-chip memory would not fit.
  config.aot = ml_collections.ConfigDict()
  config.aot.topology = ""  # e.g. 'v5e:2x2', 'v5e:2x4', 'v4:2x2x1', 'v5p:2x2x1'.
  config.aot.steps = "auto"  # Comma list of teacher,scratch,distill; auto =
  # the teacher step (unless teacher.checkpoint_dir is set) and the distill step.
  config.aot.hbm_limit_gib = 0.0  # Per-device limit; 0 = the chip's HBM.

  config.log_every_steps = 100  # Progress line + TensorBoard scalars.
  config.eval_every_steps = 0  # Test-set accuracy every N steps; 0 = every epoch.

  if preset:
    _apply_preset(config, preset)
  return config


def _train(**overrides) -> ml_collections.ConfigDict:
  train = ml_collections.ConfigDict(dict(
      batch_size=128,  # Global batch (all devices, all hosts).
      num_epochs=10,  # Passes over the (sub)set; ignored if num_steps > 0.
      num_steps=0,  # Overrides num_epochs when > 0.
      optimizer="adamw",  # adam | adamw | sgd.
      learning_rate=1e-3,  # Peak learning rate.
      schedule="cosine",  # constant | cosine (after linear warmup).
      warmup_steps=200,
      weight_decay=1e-4,  # adamw only.
      grad_clip_norm=0.0,  # 0 disables clipping.
      grad_accum_steps=1,  # Micro-batches per step (same math, less memory).
      augment=False,  # Random shift/flip of the inputs.
  ))
  train.update(overrides)
  return train


def _apply_preset(config: ml_collections.ConfigDict, preset: str) -> None:
  if preset == "smoke":
    config.teacher.train.num_steps = 300
    config.student.train.num_steps = 200
    config.pipeline.seeds = (0,)
    config.pipeline.small_data_num_epochs = 20
    config.log_every_steps = 50
    config.eval_every_steps = 100
  elif preset == "teacher":
    config.mode = "teacher"
  else:
    raise ValueError(f"Unknown preset {preset!r}; allowed: 'smoke', 'teacher'.")
