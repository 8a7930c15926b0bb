"""The Llama import cache: a checkpoint rewritten at the same path is read
again, not served from the first read."""

import numpy as np

from kdjax.weights import pretrained
from kdjax.weights.exporters import hf_llama
import test_export_llama as export_case


def test_a_rewritten_checkpoint_is_read_again(tmp_path):
  fields = export_case.BASE
  tokenizer = str(tmp_path / "tokenizer.json")
  export_case.train_tokenizer().save(tokenizer)
  out = str(tmp_path / "student")
  loaded = []
  for seed in (1, 2):
    params = export_case.random_params(fields, seed=seed)
    hf_llama.export_hf(out, params, fields, tokenizer_path=tokenizer,
                       overwrite=True)
    loaded.append(pretrained.load_pretrained(
        export_case.abstract(fields), "llama:" + out, model_fields=fields))
    np.testing.assert_array_equal(loaded[-1]["embed"]["embedding"],
                                  params["embed"]["embedding"])
