"""The `lm` task: a byte-level transformer on the standard library's sources."""

from typing import Optional, Sequence

import numpy as np

from optax_soaa.benchmarks import data as data_lib
from optax_soaa.benchmarks import models
from optax_soaa.benchmarks.tasks.base import ADAFISHER_LM_STATS_EVERY
from optax_soaa.benchmarks.tasks.base import ARTURO_FMNIST
from optax_soaa.benchmarks.tasks.base import common_hp
from optax_soaa.benchmarks.tasks.base import QUICK_FACTORS
from optax_soaa.benchmarks.tasks.base import round_up
from optax_soaa.benchmarks.tasks.base import Task
from optax_soaa.benchmarks.tasks.base import train_length


def lm(quick: bool = False, steps: Optional[int] = None,
       factors: Optional[Sequence[float]] = None,
       text_file: Optional[str] = None, epochs: Optional[float] = None,
       **_) -> Task:
  if epochs is not None:
    raise ValueError("epochs applies to the classification tasks; give lm"
                     " --steps")
  if quick:
    width, layers, heads, seq_len, batch = 64, 2, 4, 64, 16
    max_bytes, default_steps, n_eval = 1_000_000, 200, 32
  else:
    width, layers, heads, seq_len, batch = 128, 2, 4, 128, 32
    max_bytes, default_steps, n_eval = 4_000_000, 1000, 128
  tokens = data_lib.lm_byte_splits(text_file, max_bytes=max_bytes)
  num_steps = train_length(steps, None, 1, default_steps)
  eval_every = 25 if num_steps >= 100 else max(1, num_steps // 4)
  num_steps = round_up(num_steps, eval_every)

  def windows(stream, n):
    starts = np.linspace(0, stream.size - seq_len - 2, n).astype(np.int64)
    pos = starts[:, None] + np.arange(seq_len)[None, :]
    return stream[pos].astype(np.int32), stream[pos + 1].astype(np.int32)

  model = models.TransformerLM(width=width, num_layers=layers,
                               num_heads=heads, max_len=seq_len)
  source = text_file or "Python standard library .py sources"
  return Task(
      name="lm", kind="lm", model=model,
      example_input=np.zeros((1, seq_len), np.int32),
      train_x=tokens["train"], train_y=None,
      eval_sets={"train": windows(tokens["train"], n_eval),
                 "test": windows(tokens["val"], n_eval)},
      batch_size=batch, num_steps=num_steps, eval_every=eval_every,
      centers={"adam": 3e-3, "sgd": 0.3, "kl": ARTURO_FMNIST["kl_bound"]},
      factors=tuple(factors or QUICK_FACTORS),
      hp=common_hp({}, {}, {"momentum": 0.9},
                    {"stats_every": ADAFISHER_LM_STATS_EVERY}),
      seq_len=seq_len, eval_chunk=32,
      notes=(
          f"Byte-level decoder-only transformer (width {width}, {layers}"
          f" pre-LayerNorm blocks, {heads} heads, context {seq_len}) on"
          f" {source}; {tokens['train'].size:,} training bytes, held-out"
          f" {tokens['val'].size:,} bytes (every 10th file). Batch {batch}"
          " random windows, constant step size. 'test' = held-out split;"
          " loss reported in bits per byte.",),
  )
