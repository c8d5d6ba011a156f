"""Run control: what the loop does about a completed step (``decide``) and doing it (``apply``).

``decide`` holds the run's one decision point (:class:`~prorl_megatron.control.decide.Controller`):
the reset schedule, the stage entries and the health checks, as triggers over the step's metrics,
turned into actions in one precedence. ``apply`` carries the actions out on the trainer (reference
and optimizer resets, a stage's settings, rollbacks, stops). Neither is part of the algorithm.
"""
