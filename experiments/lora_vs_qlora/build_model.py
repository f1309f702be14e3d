"""Build an experiment's random-weight model once, before its sweep, so that no job's time includes the build.

    python experiments/lora_vs_qlora/build_model.py +experiment=lora_vs_qlora_gpu_8b

Takes the same overrides as `python -m qlora_lab`; prints the model folder (under paths.cache_dir).
"""

import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere in the checkout
from qlora_lab.config import project_root, register  # noqa: E402
from qlora_lab.models import model_path  # noqa: E402

register()
with initialize_config_dir(config_dir=str(Path(project_root()) / "conf"), version_base="1.3"):
    cfg = compose(config_name="config", overrides=sys.argv[1:])
start = time.perf_counter()
path = model_path(cfg)
print(f"{cfg.model.name_or_path}: {path} ready in {time.perf_counter() - start:.1f} s")
