"""The recipes: one controller script per algorithm (``<name>.py``) and its default config
(``<name>.yaml``, starting from ``base.yaml``). Installed as ``hybridflow.recipes``, so the
``hybridflow`` command runs them without a checkout: ``hybridflow grpo key=value ...`` is
``python recipes/grpo.py key=value ...`` (see hybridflow/trainer/main.py)."""
