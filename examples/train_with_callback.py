"""Fine-tune a classifier with transformers' Trainer and watch its attention with attnprobe.

    pip install 'attnprobe[tensorboard]'
    python examples/train_with_callback.py --out runs/example
    tensorboard --logdir runs/example

Everything here is an ordinary Trainer script; the two attnprobe lines are marked. Without --model it
fine-tunes the bundled all-MiniLM-L6-v2 checkpoint (offline, it ships with attnprobe's dependencies).
"""

from __future__ import annotations

import argparse

import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

from attnprobe.training.callback import AttentionDiagnosticsCallback  # attnprobe, line 1 of 2

TRAIN = [("a good film with good acting", 1), ("a bad plot and bad jokes", 0), ("good fun, good music", 1),
         ("bad sound, bad light", 0), ("the cast was good", 1), ("the ending was bad", 0),
         ("good pacing and a good score", 1), ("bad dialogue throughout", 0)] * 4
PROBE_TEXTS = ["The cat sat on the mat.", "A good film, good acting.", "The committee approved the budget.",
               "Why did the old man leave so early?"]


class Examples(torch.utils.data.Dataset):
    def __init__(self, tokenizer, rows):
        self.items = [{**tokenizer(text, truncation=True, max_length=64), "labels": label} for text, label in rows]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a save_pretrained() folder (default: the bundled MiniLM)")
    parser.add_argument("--out", default="runs/example")
    parser.add_argument("--max-steps", type=int, default=16)
    opts = parser.parse_args()
    if opts.model is None:
        from attnprobe.models.checkpoints import ALIASES, alias_path

        opts.model = str(alias_path(ALIASES["minilm-l6"]))

    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    model = AutoModelForSequenceClassification.from_pretrained(opts.model, num_labels=2)
    args = TrainingArguments(output_dir=opts.out, max_steps=opts.max_steps, per_device_train_batch_size=8,
                             learning_rate=5e-5, eval_strategy="steps", eval_steps=opts.max_steps // 2,
                             eval_on_start=True, logging_steps=4, save_strategy="no", report_to="tensorboard",
                             use_cpu=not torch.cuda.is_available(), seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Examples(tokenizer, TRAIN),
                      eval_dataset=Examples(tokenizer, TRAIN[:8]), processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.add_callback(AttentionDiagnosticsCallback(  # attnprobe, line 2 of 2
        texts=PROBE_TEXTS, every_n_steps=4, trainer=trainer))
    trainer.train()


if __name__ == "__main__":
    main()
