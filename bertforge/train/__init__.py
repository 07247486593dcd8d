"""Training machinery, independent of the task: the loop (loop.py), one optimizer step
(step.py), optimizer and schedule (optim.py), checkpoints (checkpoint.py), torchrun
(distributed.py), devices and precision (runtime.py), torch.compile (compiling.py), logs and
trackers (runlog.py, tracking.py) and the checks that a run fits (consistency.py)."""
