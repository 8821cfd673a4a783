"""The training wing: the refine job and everything attnprobe adds to Hugging Face training.

Owns refine itself (refine.py), the Trainer glue: examples, training arguments, the epoch recorder,
checkpoints and trackers (trainer.py), classification scores (scores.py), masked-LM pretraining (masked_lm.py),
the run folder and resuming (run_folder.py), what a run inherits from its starting checkpoint (lineage.py),
patterns before and after training (stage_patterns.py), the Trainer that probes its own evaluation
(probing_trainer.py) and the user-facing TrainerCallback (callback.py, public as ``attnprobe.hf``). Imports
every wing below it (runtime, formulas, capture, models, data, scanning), transformers and accelerate; never
the report wing.
"""
