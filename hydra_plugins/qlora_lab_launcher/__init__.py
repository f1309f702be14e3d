"""QLoRA Lab's Hydra plugins: the isolated launcher and the equal-memory sweeper (Hydra only loads plugins
from the `hydra_plugins` namespace)."""
