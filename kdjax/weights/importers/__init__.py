"""Weight importers: pretrained checkpoints -> kdjax Linen params.

hf_bert: Hugging Face BERT directories (config.json, model.safetensors,
tokenizer.json), e.g. all-MiniLM-L6-v2.
"""
