"""Jobs that measure distilled sets rather than make them: KRR evaluation (`evaluate`), finite
networks trained on a set (`transfer`), KRR-ST's pre-training and knowledge-distillation
evaluations (`pretrain`, `kd`), image grids (`show`) and the benchmark table (`benchmark`).

Each module exposes its config dataclass and a `JOB` (`kip.command.Job`) from which its command
in `experiments/` is generated. Dependencies point one way: experiments -> evaluation -> methods
-> kip.
"""
